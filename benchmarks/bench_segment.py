"""Per-stage time and peak memory of whole-volume ESICA segmentation on this machine.

Synthetic 512x512x300 abdominal CT (the procedural phantom), full-size ESICA with
random weights (timing only), one prompt vs five, fast mode vs the full sliding window.
For the full-size model the whole-volume times are extrapolated from the measured cost of one
window (a 2-core CPU needs tens of minutes for the 1.5 mm sliding window); ``--full`` runs them.

    python benchmarks/bench_segment.py [--threads 2] [--full] [--model default]
"""

from __future__ import annotations

import argparse
import resource
import time
from contextlib import contextmanager

import numpy as np
import torch

from voxtext.api import QUALITY_PRESETS, Segmenter
from voxtext.inference import ESICAInferer, WindowConfig, count_windows
from voxtext.models.esica import ESICA, ESICAConfig
from voxtext.models.esica.text import load_tokenizer, text_config_for
from voxtext.phantom import generate_phantom
from voxtext.preprocess import PreprocessConfig, prepare, restore
from voxtext.volume import Volume

PROMPTS = ["liver", "left kidney", "right kidney", "spleen", "aorta"]
LESION_PROMPTS = ["liver tumor", "liver cyst", "kidney cyst"]  # answered by the default model's lesion stage


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@contextmanager
def stage(rows: list, name: str):
    t0 = time.perf_counter()
    yield
    rows.append((name, time.perf_counter() - t0, peak_rss_mb()))


def report(title: str, rows: list) -> None:
    print(f"\n{title}")
    print("| stage | seconds | peak RSS (MB) |\n|---|---:|---:|")
    for name, sec, mem in rows:
        print(f"| {name} | {sec:.2f} | {mem:.0f} |")


def synthetic_ct() -> Volume:
    case = generate_phantom(seed=2024, shape=(512, 512, 300), spacing=(0.78, 0.78, 1.5), lesions=1.0)
    return Volume(case.image.astype(np.float32), case.affine, "CT")


def full_size_inferer() -> ESICAInferer:
    config = ESICAConfig()  # the published ESICA sizes; random weights are enough for timing
    model = ESICA(config, text_config_for(config.text_model, None, None)).eval()
    # ClinicalBERT's tokenizer is not available offline; any BERT WordPiece ids < its vocabulary do for timing.
    tokenizer = load_tokenizer("sentence-transformers/all-MiniLM-L6-v2")
    return ESICAInferer(model, tokenizer, torch.device("cpu"))


def bench_full_size(volume: Volume, run_full: bool) -> None:
    """Per-stage costs of the published-size model; whole-volume times from measured per-window costs."""
    rows: list = []
    with stage(rows, "build full-size ESICA (252M parameters)"):
        inferer = full_size_inferer()
    roi = inferer.model.config.image_size
    window = torch.rand(1, 1, *roi)
    with stage(rows, "encode one 96^3 window (image encoder + decoder skips)"):
        with torch.no_grad():
            context = inferer.model.encode_image(window)
    decode = {}
    for n in (1, len(PROMPTS)):
        text = inferer.embed_prompts(PROMPTS[:n])
        t0 = time.perf_counter()
        with torch.no_grad():
            inferer.model.decode(context.repeat(n), text)
        decode[n] = time.perf_counter() - t0
        rows.append((f"decode one window for {n} prompt(s) (2 passes)", decode[n], peak_rss_mb()))
    encode = rows[1][1]
    for quality in ("fast", "accurate"):
        preset = QUALITY_PRESETS[quality]
        spacing = max(preset.min_spacing_mm, inferer.model.config.target_spacing)
        with stage(rows, f"[{quality}] preprocess to {spacing} mm"):
            prepared = prepare(volume, PreprocessConfig(target_spacing=spacing))
        n = count_windows(prepared.image.shape, roi, preset.overlap)
        for p in (1, len(PROMPTS)):
            rows.append((f"[{quality}] grid {prepared.image.shape}, {n} windows x (encode + decode {p} prompt(s)), "
                         "extrapolated", n * (encode + decode[p]), peak_rss_mb()))
        if run_full:
            text = inferer.embed_prompts(PROMPTS[:1])
            with stage(rows, f"[{quality}] sliding window, 1 prompt, measured"):
                logits = inferer.logits(torch.from_numpy(prepared.image), text, WindowConfig(overlap=preset.overlap))
            with stage(rows, f"[{quality}] restore onto the input grid + threshold"):
                restore(prepared, torch.sigmoid(logits[0]), "linear") > 0.5
    report("Full-size ESICA (random weights), synthetic 512x512x300 CT", rows)


def bench_model(volume: Volume, model: str) -> None:
    rows: list = []
    with stage(rows, f"load model '{model}'"):
        segmenter = Segmenter(model, device="cpu")
    results = {}
    for quality in ("fast", "accurate"):
        for prompts in (PROMPTS[:1], PROMPTS):
            with stage(rows, f"segment [{quality}], {len(prompts)} prompt(s), end to end"):
                results[quality, len(prompts)] = segmenter.segment(volume, prompts, quality=quality)
    if segmenter.lesion_stage is not None:
        with stage(rows, f"segment [fast], {len(LESION_PROMPTS)} lesion prompts (lesion stage), end to end"):
            segmenter.segment(volume, LESION_PROMPTS, quality="fast")
    report(f"Model '{model}', end to end (load, preprocess, windows, restore)", rows)
    fast, full = results["fast", len(PROMPTS)], results["accurate", len(PROMPTS)]
    print("\nAgreement of fast mode with the full sliding window (Dice per prompt):")
    for p in PROMPTS:
        a, b = fast.mask(p), full.mask(p)
        denom = a.sum() + b.sum()
        print(f"| {p} | {2 * (a & b).sum() / denom if denom else 1.0:.3f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--full", action="store_true", help="run the full-size accurate sliding window for real")
    parser.add_argument("--model", default="default", help="checkpoint for the end-to-end figures")
    parser.add_argument("--skip-full-size", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows: list = []
    with stage(rows, "generate synthetic CT 512x512x300"):
        volume = synthetic_ct()
    report(f"torch {torch.__version__}, {args.threads} threads", rows)
    bench_model(volume, args.model)
    if not args.skip_full_size:
        bench_full_size(volume, args.full)


if __name__ == "__main__":
    main()
