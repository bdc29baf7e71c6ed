"""Command line interface: ``voxtext segment``, ``models``, ``eval-seg``, ``report``, ``ask``, ``findings``,
``phantom``, ``train-seg``, ``train-vlm``."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from pathlib import Path

from .errors import VoxTextError


def _output_paths(output: Path) -> tuple[Path, Path]:
    """``seg.nii.gz`` -> (``seg.nii.gz``, ``seg.seg.nrrd``); the JSON sidecar is written beside the NIfTI."""
    name = output.name
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            return output, output.with_name(name[: -len(suffix)] + ".seg.nrrd")
    raise VoxTextError(f"output must end with .nii.gz or .nii, got {output.name!r}")


def cmd_segment(args: argparse.Namespace) -> int:
    from .api import Segmenter

    nifti_path, nrrd_path = _output_paths(Path(args.output))
    sidecar = nifti_path.with_name(nifti_path.name.removesuffix(".gz").removesuffix(".nii") + ".json")
    existing = [p for p in (nifti_path, sidecar, nrrd_path) if p.exists()]
    if existing and not args.overwrite:
        raise VoxTextError(f"{', '.join(map(str, existing))} already exist(s); pass --overwrite to replace")
    if args.model == "default":
        print("Using the embedded default model (voxtext/weights/esica-default); pass --model esica for the published weights.",
              file=sys.stderr)
    if args.server:
        from .server.client import RemoteSegmenter

        segmenter = RemoteSegmenter(args.server, token=args.token, model=args.model)
    else:
        segmenter = Segmenter(args.model, device=args.device, precision=args.precision)
    result = segmenter.segment(
        args.volume,
        args.prompt,
        quality=args.quality,
        threshold=args.threshold,
        overlap=args.overlap,
        keep_largest=args.keep_largest,
        fill_holes=args.fill_holes,
        overlap_policy="argmax" if args.argmax else "independent",
        laterality=not args.no_laterality,
        lesion_stage=not args.no_lesion_stage,
        refine=not args.no_refine,
        other_modalities=args.other_modalities,
        modality=args.modality,
        progress=not args.quiet,
    )
    nifti_path.parent.mkdir(parents=True, exist_ok=True)
    written = result.save_nifti(nifti_path) + [result.save_seg_nrrd(nrrd_path)]
    for prompt, ml in result.volumes_ml().items():
        within = result.lesion_stage.get(prompt)
        print(f"{prompt}: {ml:.1f} mL" + (f" (lesion stage, within {' / '.join(within)})" if within else ""))
        if prompt in result.cautions:
            print(f"  caution: {result.cautions[prompt]}")
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from .checkpoints import list_models
    from .findings import FINDINGS_REGISTRY
    from .report import VLM_REGISTRY

    for title, specs in (("segmentation (--model)", list_models()), ("report/VQA (--model)", VLM_REGISTRY.values()),
                         ("zero-shot findings (findings --model, serve --findings)", FINDINGS_REGISTRY.values())):
        print(title)
        for spec in specs:
            print(f"  {spec.name:16s} {spec.description}")
    return 0


def cmd_eval_seg(args: argparse.Namespace) -> int:
    from .evaluation.report import write_report
    from .evaluation.segmentation_eval import evaluate_folders

    scores = evaluate_folders(args.pred, args.gt, args.tolerance_mm, args.instance)
    written = write_report(scores, Path(args.out))
    print(written[1].read_text(), end="")
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


def _reporter(args: argparse.Namespace):
    from .report import Reporter

    if args.model == "default":
        print("Using the embedded default VLM (voxtext/weights/vlm-default), a demonstration model trained on "
              "phantoms only: it misses most findings (about half of the liver lesions and no kidney lesion on "
              "test phantoms; see its model card). "
              "Pass --model med3dvlm for the published Med3DVLM.", file=sys.stderr)
    if args.server:
        from .server.client import RemoteReporter

        return RemoteReporter(args.server, token=args.token, model=args.model)
    device_map = json.loads(args.device_map) if args.device_map and args.device_map.startswith("{") else args.device_map
    return Reporter(args.model, device=args.device, precision=args.precision, allow_slow=args.allow_slow,
                    load_in=args.load_in, device_map=device_map)


def cmd_report(args: argparse.Namespace) -> int:
    output = Path(args.output) if args.output else None
    if output and output.exists() and not args.overwrite:
        raise VoxTextError(f"{output} already exists; pass --overwrite to replace it")
    text = _reporter(args).report(args.volume, stream=lambda piece: print(piece, end="", flush=True),
                                  greedy=args.greedy, max_new_tokens=args.max_new_tokens)
    print()
    if output:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(text + "\n")
        print(f"wrote {output}", file=sys.stderr)
    return 0


def cmd_ask(args: argparse.Namespace) -> int:
    answer = _reporter(args).ask(args.volume, args.question, args.choices, greedy=args.greedy,
                                 max_new_tokens=args.max_new_tokens, score=args.score)
    print(answer)
    if args.choices and answer.index is None:
        print("voxtext: the answer names none of the choices", file=sys.stderr)
        return 1
    return 0


def cmd_findings(args: argparse.Namespace) -> int:
    from .findings import format_ranking

    if args.server:
        from .server.client import RemoteFindingsRanker

        ranker = RemoteFindingsRanker(args.server, token=args.token, model=args.model)
    else:
        from .findings import FindingsRanker

        ranker = FindingsRanker(args.model or "dcformer-siglip", device=args.device, precision=args.precision)
    print(format_ranking(ranker.rank(args.volume, args.findings)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="voxtext", description="Text-guided 3-D segmentation and reporting.")
    sub = parser.add_subparsers(dest="command", required=True)

    seg = sub.add_parser("segment", help="segment targets named in plain language")
    seg.add_argument("volume", help="NIfTI/NRRD file or DICOM folder")
    seg.add_argument("-p", "--prompt", action="append", required=True, help="target, e.g. 'liver' (repeatable)")
    seg.add_argument("-o", "--output", required=True, help="label map .nii.gz (+ .json and .seg.nrrd beside it)")
    seg.add_argument("--model", default="default", help="'default', 'esica', 'esica-lite', hf://repo or a folder")
    seg.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 or mps")
    seg.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"], help="autocast on GPU")
    seg.add_argument("--quality", default="accurate", choices=["accurate", "fast"])
    seg.add_argument("--threshold", type=float, default=0.5)
    seg.add_argument("--overlap", type=float, default=None, help="sliding-window overlap (default: by quality)")
    seg.add_argument("--modality", default=None, choices=["CT", "MR", "PET", "US"], help="default: from the file")
    seg.add_argument("--keep-largest", action="store_true", help="keep the largest connected component")
    seg.add_argument("--fill-holes", action="store_true")
    seg.add_argument("--argmax", action="store_true", help="disjoint masks: each voxel to the most likely prompt")
    seg.add_argument("--no-laterality", action="store_true",
                     help="keep mask parts on the other side of the body for 'left ...'/'right ...' prompts")
    seg.add_argument("--no-lesion-stage", action="store_true",
                     help="answer lesion prompts with the main model too, not the model's finer-grid lesion stage")
    seg.add_argument("--no-refine", action="store_true",
                     help="keep the model's boundaries on CT (not refined by attenuation within a few mm)")
    seg.add_argument("--other-modalities", action="store_true",
                     help="also answer prompts the model learned on other modalities only (unvalidated; "
                          "by default they are answered empty with a caution)")
    seg.add_argument("--overwrite", action="store_true", help="replace existing output files")
    seg.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    seg.add_argument("--server", default=None, help="segment on a 'voxtext serve' server at this URL")
    seg.add_argument("--token", default=os.environ.get("VOXTEXT_TOKEN"), help="server token (env VOXTEXT_TOKEN)")
    seg.set_defaults(func=cmd_segment)

    models = sub.add_parser("models", help="list the named models")
    models.set_defaults(func=cmd_models)

    ev = sub.add_parser("eval-seg", help="score predicted label maps against ground truth (DSC, NSD, F1)")
    ev.add_argument("--pred", required=True, help="folder of <case>.nii.gz + <case>.json from 'voxtext segment'")
    ev.add_argument("--gt", required=True, help="folder of labels/<case>.nii.gz (or <case>.nii.gz) + prompts.json")
    ev.add_argument("--out", required=True, help="folder for metrics.csv, summary.md and boxplot.png")
    ev.add_argument("--tolerance-mm", type=float, default=2.0, help="NSD tolerance (default 2 mm)")
    ev.add_argument("--instance", action="store_true", help="ground truth holds instances: add F1 at IoU 0.5")
    ev.set_defaults(func=cmd_eval_seg)

    for name, text in (("report", "write a findings report of a volume (streamed)"),
                       ("ask", "answer a question about a volume")):
        vlm = sub.add_parser(name, help=text)
        vlm.add_argument("volume", help="NIfTI/NRRD file or DICOM folder")
        if name == "ask":
            vlm.add_argument("question", help="e.g. 'Is there a kidney stone?'")
            vlm.add_argument("--choices", nargs="+", default=None, help="closed question options, e.g. yes no")
            vlm.add_argument("--score", action="store_true", help="with --choices: pick the option whose answer "
                             "the model finds most likely (log-likelihood of 'A. yes', ...) instead of generating")
        else:
            vlm.add_argument("-o", "--output", default=None, help="also write the report to this text file")
            vlm.add_argument("--overwrite", action="store_true", help="replace an existing output file")
        vlm.add_argument("--model", default="default", help="'default', 'med3dvlm', hf://repo or a folder")
        vlm.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 or mps")
        vlm.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
        vlm.add_argument("--greedy", action="store_true", help="greedy decoding instead of the checkpoint's defaults")
        vlm.add_argument("--max-new-tokens", type=int, default=None)
        vlm.add_argument("--allow-slow", action="store_true", help="run a >1B-parameter model on a CPU anyway")
        vlm.add_argument("--load-in", default=None, choices=["8bit", "4bit"],
                         help="quantize the language model with bitsandbytes (CUDA GPU; vision side unquantized)")
        vlm.add_argument("--device-map", default=None, help="spread the model over devices: auto, balanced, "
                         "sequential, a device (cuda:1) or a JSON {module: device} (replaces --device)")
        vlm.add_argument("--server", default=None, help=f"{name} on a 'voxtext serve --vlm' server at this URL")
        vlm.add_argument("--token", default=os.environ.get("VOXTEXT_TOKEN"), help="server token (env VOXTEXT_TOKEN)")
        vlm.set_defaults(func=cmd_report if name == "report" else cmd_ask)

    fin = sub.add_parser("findings", help="rank candidate findings against a volume (zero-shot, DCFormer_SigLIP)")
    fin.add_argument("volume", help="NIfTI/NRRD file or DICOM folder")
    fin.add_argument("--findings", action="extend", nargs="+", default=None, metavar="TEXT",
                     help="candidate finding texts (repeatable; default: a list of common CT findings)")
    fin.add_argument("--model", default=None, help="'dcformer-siglip' (default here), hf://repo or a folder; with "
                                                   "--server: a findings model of the server (default its first)")
    fin.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 or mps")
    fin.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    fin.add_argument("--server", default=None, help="rank on a 'voxtext serve --findings' server at this URL")
    fin.add_argument("--token", default=os.environ.get("VOXTEXT_TOKEN"), help="server token (env VOXTEXT_TOKEN)")
    fin.set_defaults(func=cmd_findings)

    for name, (_, _, text) in DELEGATED.items():
        sub.add_parser(name, help=text, add_help=False)
    return parser


# Subcommands with their own argument parsers: name -> (module, function, help).
DELEGATED = {
    "phantom": ("voxtext.phantom", "main_phantom", "write a procedural CT phantom case"),
    "train-seg": ("voxtext.training.train_seg", "main", "train or fine-tune ESICA (torchrun for several devices)"),
    "serve": ("voxtext.server.app", "main_serve", "HTTP inference server (FastAPI); --help for options"),
    "train-vlm": ("voxtext.training.train_vlm", "main", "train a Med3DVLM-class report/VQA model"),
    "train-clip": ("voxtext.training.train_clip", "main",
                   "pretrain a DCFormer_SigLIP image-text model (sigmoid loss; torchrun for several devices)"),
    "eval-report": ("voxtext.evaluation.vlm_eval", "main_eval_report",
                    "score generated reports (BLEU-1, ROUGE-1, METEOR, BERTScore), optionally generating them first"),
    "eval-vqa": ("voxtext.evaluation.vlm_eval", "main_eval_vqa",
                 "score VQA answers (closed: accuracy, open: text metrics) per question type"),
    "eval-retrieval": ("voxtext.evaluation.vlm_eval", "main_eval_retrieval",
                       "image-text retrieval recall@1/5/10 of a DCFormer_SigLIP model"),
    "web": ("voxtext.web.app", "main_web", "TextSeg and VLMReport in a web browser on Slicer views (trame-slicer)"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if argv and argv[0] in DELEGATED:
            module, function, _ = DELEGATED[argv[0]]
            return getattr(importlib.import_module(module), function)(argv[1:])
        args = build_parser().parse_args(argv)
        return args.func(args)
    except VoxTextError as exc:
        print(f"voxtext: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
