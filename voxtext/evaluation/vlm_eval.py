"""``voxtext eval-report``, ``eval-vqa`` and ``eval-retrieval``: Med3DVLM metrics as the reference measures them.

Scoring and generation are separate steps that one command can chain, as the reference's
``eval_caption.py`` / ``eval_vqa.py`` do:

* ``--pred FILE``: score predictions you already have (JSONL, JSON list or CSV; see :func:`read_records`).
* ``--model M --data MANIFEST``: first generate with :class:`voxtext.report.Reporter` (writes
  ``predictions.jsonl`` into ``--out``), then score it.

Prediction records (one JSON object per line)::

    report: {"id": "case1", "prediction": "The liver ...", "reference": "The liver ..."}   # or a list
    VQA:    {"id": "q1", "prediction": "B. Non-contrast", "answer": "Non-contrast", "question_type": 2,
             "choices": ["Arterial", "Non-contrast", "Venous", "Delayed"], "answer_choice": "B"}   # closed
            {"id": "q2", "prediction": "Liver", "answer": "Liver", "question_type": 3}             # open

Outputs in ``--out``: a per-sample CSV and ``summary.md`` (means, per question type for VQA).
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import sys
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from ..errors import InputError
from .text_metrics import TEXT_METRICS, BertScoreModel, MetricUnavailable, bertscore_model, score_texts

QUESTION_TYPES = {1: "Plane", 2: "Phase", 3: "Organ", 4: "Abnormality", 5: "Location"}
M3D_VQA_COLUMNS = {"Image Path": "image", "Question": "question", "Answer": "answer",
                   "Answer Choice": "answer_choice", "Question Type": "question_type"}
LETTERS = "ABCDEFGH"


# --- input --------------------------------------------------------------------------------------

def read_records(path: str | Path, split: str | None = None) -> list[dict]:
    """Rows of a ``.jsonl`` (an object per line), ``.json`` (a list, or ``{split: [...]}`` as M3D-Cap's
    ``M3D_Cap.json``) or ``.csv`` file (M3D-VQA's column names are mapped to ours)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path} does not exist")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        try:
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as error:
            raise InputError(f"{path} is not JSON Lines: {error}") from error
    elif path.suffix == ".json":
        data = json.loads(text)
        if isinstance(data, dict):
            if split is None or split not in data:
                raise InputError(f"{path} holds the splits {sorted(data)}: choose one with --split")
            data = data[split]
        rows = list(data)
    elif path.suffix == ".csv":
        rows = [_m3d_vqa_row(row) for row in csv.DictReader(text.splitlines())]
    else:
        raise InputError(f"{path}: expected a .jsonl, .json or .csv file")
    if not all(isinstance(r, dict) for r in rows):
        raise InputError(f"{path}: every record must be an object")
    for index, row in enumerate(rows):
        row.setdefault("id", str(index))
        row["id"] = str(row["id"])
    return rows


def _m3d_vqa_row(row: dict) -> dict:
    """M3D-VQA columns (``Question``, ``Choice A``..) to ours; other CSVs pass through (choices split on '|')."""
    out = {M3D_VQA_COLUMNS.get(k, k): v for k, v in row.items() if not k.startswith("Choice ")}
    choices = [row[f"Choice {c}"] for c in LETTERS if row.get(f"Choice {c}") not in (None, "")]
    if choices:
        out["choices"] = choices
    elif isinstance(out.get("choices"), str) and out["choices"]:
        out["choices"] = out["choices"].split("|")
    if isinstance(out.get("reference"), str) and out["reference"].startswith("["):
        out["reference"] = json.loads(out["reference"])
    return out


def read_references(sources: Sequence[str]) -> dict[str, list[str]]:
    """``id -> references`` from files (records with ``reference``/``text``/``answer``) or folders of ``<id>.txt``;
    several sources give several references per id."""
    refs: dict[str, list[str]] = defaultdict(list)
    for source in sources:
        path = Path(source)
        if path.is_dir():
            for file in sorted(path.glob("*.txt")):
                refs[file.stem].append(file.read_text(encoding="utf-8").strip())
            continue
        for row in read_records(path):
            value = next((row[k] for k in ("reference", "text", "answer") if k in row), None)
            if value is None:
                raise InputError(f"{path}: record {row['id']} has no 'reference' (or 'text'/'answer') field")
            refs[row["id"]].extend([value] if isinstance(value, str) else value)
    return dict(refs)


def _references_of(row: dict, extra: dict[str, list[str]] | None, key: str = "reference") -> list[str]:
    refs = list(extra.get(row["id"], [])) if extra else []
    if not refs and row.get(key) not in (None, ""):
        refs = [row[key]] if isinstance(row[key], str) else list(row[key])
    if not refs:
        raise InputError(f"sample {row['id']!r} has no reference: add a {key!r} field or pass --ref")
    return [str(r).strip() for r in refs]


def _prediction_of(row: dict) -> str:
    if "prediction" not in row:
        raise InputError(f"sample {row['id']!r} has no 'prediction' field")
    return str(row["prediction"] or "").strip()


def _question_type(value) -> str:
    try:
        return QUESTION_TYPES.get(int(value), str(value))
    except (TypeError, ValueError):
        return str(value) if value not in (None, "") else "all"


# --- output -------------------------------------------------------------------------------------

def _fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.6f}"


def write_csv(path: Path, columns: Sequence[str], rows: Iterable[dict]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        for row in rows:
            writer.writerow([_fmt(row.get(c)) if isinstance(row.get(c), float) else row.get(c, "") for c in columns])
    return path


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}"


def _notes_markdown(notes: dict[str, str]) -> str:
    return "".join(f"- {metric}: {note}\n" for metric, note in notes.items())


def _metric_table(groups: dict[str, list[dict]], metrics: Sequence[str], first: str) -> list[str]:
    lines = [f"| {first} | n | " + " | ".join(f"{m} (%)" for m in metrics) + " |", "|---" * (len(metrics) + 2) + "|"]
    for name, rows in groups.items():
        lines.append(f"| {name} | {len(rows)} | "
                     + " | ".join(_pct(_mean([r[m] for r in rows if m in r])) for m in metrics) + " |")
    return lines


def _write_predictions(path: Path, rows: Sequence[dict]) -> Path:
    with path.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


# --- scoring ------------------------------------------------------------------------------------

def evaluate_reports(rows: Sequence[dict], out: Path, references: dict[str, list[str]] | None = None,
                     metrics: Sequence[str] = TEXT_METRICS, bertscore: BertScoreModel | None = None,
                     device: str = "cpu") -> tuple[dict[str, float], list[Path]]:
    """Score report predictions; writes ``report_scores.csv`` and ``summary.md``; returns the means."""
    if not rows:
        raise InputError("no samples to score")
    predictions = [_prediction_of(r) for r in rows]
    refs = [_references_of(r, references) for r in rows]
    scores, notes = score_texts(predictions, refs, metrics, bertscore, device)
    done = [m for m in metrics if m in scores[0]]
    means = {m: _mean([s[m] for s in scores]) for m in done}
    out.mkdir(parents=True, exist_ok=True)
    table = [{"id": r["id"], **s, "prediction": p, "reference": refs_[0] if len(refs_) == 1 else json.dumps(refs_)}
             for r, s, p, refs_ in zip(rows, scores, predictions, refs)]
    csv_path = write_csv(out / "report_scores.csv", ["id", *done, "prediction", "reference"], table)
    lines = ["# Report generation", "", f"{len(rows)} samples; per-sample scores averaged (as Med3DVLM's "
             "eval_caption.py).", "", *_metric_table({"all": scores}, done, "samples"), ""]
    summary = out / "summary.md"
    summary.write_text("\n".join(lines) + ("\n" + _notes_markdown(notes) if notes else ""))
    return means, [csv_path, summary]


def substring_choice(prediction: str, letter: str) -> bool:
    """The reference's lenient closed-VQA test: ``"B."`` anywhere in the text ("DNA." counts as A)."""
    return f"{letter}." in prediction


def _correct_index(row: dict) -> int:
    choices = row["choices"]
    letter = str(row.get("answer_choice") or "").strip().rstrip(".").upper()
    if letter and letter in LETTERS[: len(choices)]:
        return LETTERS.index(letter)
    answer = " ".join(str(row.get("answer", "")).split()).lower()
    hits = [i for i, c in enumerate(choices) if " ".join(str(c).split()).lower() == answer]
    if len(hits) != 1:
        raise InputError(f"closed question {row['id']!r}: give 'answer_choice' (a letter) or an 'answer' "
                         "equal to one choice")
    return hits[0]


def evaluate_vqa(rows: Sequence[dict], out: Path, metrics: Sequence[str] = TEXT_METRICS,
                 bertscore: BertScoreModel | None = None, device: str = "cpu") -> tuple[dict, list[Path]]:
    """Closed questions (records with ``choices``): accuracy per type, parsed strictly with
    :func:`voxtext.report.parse_choice`, next to the reference's substring test; open questions: the text
    metrics per type and over all questions. Writes ``vqa_closed.csv``/``vqa_open.csv`` and ``summary.md``."""
    from ..report import parse_choice

    if not rows:
        raise InputError("no questions to score")
    closed = [r for r in rows if r.get("choices")]
    open_ = [r for r in rows if not r.get("choices")]
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    result: dict = {}
    lines = ["# Visual question answering", ""]
    if closed:
        scored = []
        for row in closed:
            prediction, truth = _prediction_of(row), _correct_index(row)
            picked = parse_choice(prediction, [str(c) for c in row["choices"]])
            scored.append({"id": row["id"], "question_type": _question_type(row.get("question_type")),
                           "prediction": prediction, "answer_choice": LETTERS[truth],
                           "parsed": "" if picked is None else LETTERS[picked],
                           "accuracy": float(picked == truth),
                           "accuracy_substring": float(substring_choice(prediction, LETTERS[truth]))})
        written.append(write_csv(out / "vqa_closed.csv", ["id", "question_type", "answer_choice", "parsed",
                                                          "accuracy", "accuracy_substring", "prediction"], scored))
        groups = _by_type(scored)
        result["closed"] = {name: _mean([r["accuracy"] for r in rs]) for name, rs in groups.items()}
        lines += ["## Closed-ended (multiple choice)", "",
                  "accuracy: the answer parsed strictly (a letter or exactly one option); accuracy_substring: the "
                  "reference's test (`\"B.\" in text`), lenient, for comparison with published numbers.", "",
                  *_metric_table(groups, ["accuracy", "accuracy_substring"], "question type"), ""]
    if open_:
        predictions = [_prediction_of(r) for r in open_]
        refs = [_references_of(r, None, "answer") for r in open_]
        scores, notes = score_texts(predictions, refs, metrics, bertscore, device)
        done = [m for m in metrics if m in scores[0]]
        scored = [{"id": r["id"], "question_type": _question_type(r.get("question_type")), **s, "prediction": p,
                   "answer": a[0]} for r, s, p, a in zip(open_, scores, predictions, refs)]
        written.append(write_csv(out / "vqa_open.csv", ["id", "question_type", *done, "prediction", "answer"], scored))
        groups = _by_type(scored)
        result["open"] = {name: {m: _mean([r[m] for r in rs]) for m in done} for name, rs in groups.items()}
        lines += ["## Open-ended", "", "Per-question scores averaged per type, and over all questions (the "
                  "reference prints the per-type means only).", "", *_metric_table(groups, done, "question type"), "",
                  _notes_markdown(notes)]
    summary = out / "summary.md"
    summary.write_text("\n".join(lines).rstrip() + "\n")
    return result, [*written, summary]


def _by_type(scored: Sequence[dict]) -> dict[str, list[dict]]:
    order = {name: i for i, name in enumerate(QUESTION_TYPES.values())}
    groups: dict[str, list[dict]] = defaultdict(list)
    for row in scored:
        groups[row["question_type"]].append(row)
    ordered = {name: groups[name] for name in sorted(groups, key=lambda n: (order.get(n, 99), n))}
    if len(ordered) > 1 or "all" not in ordered:
        ordered["all (mean over questions)"] = list(scored)
    return ordered


# --- generation ---------------------------------------------------------------------------------

def manifest_image(row: dict, root: Path) -> Path:
    """The volume of a manifest record (``image`` or ``volume``), relative paths under ``root``."""
    value = row.get("image") or row.get("volume")
    if not value:
        raise InputError(f"record {row['id']!r} has no 'image' field")
    path = Path(value)
    return path if path.is_absolute() else root / path


def manifest_references(row: dict, root: Path) -> list[str]:
    """The reference text(s) of a manifest record: inline ``reference`` or a ``reference_file``."""
    if row.get("reference") not in (None, ""):
        return [row["reference"]] if isinstance(row["reference"], str) else list(row["reference"])
    file = row.get("reference_file") or row.get("text")  # M3D-Cap: "text" is the path of the report .txt
    if file and (root / file).is_file():
        return [(root / file).read_text(encoding="utf-8").strip()]
    if file and "reference_file" not in row and not str(file).endswith(".txt"):
        return [str(file)]  # "text" holding the report itself
    raise InputError(f"record {row['id']!r} has no 'reference' (text) or 'reference_file'/'text' (a .txt path)")


def generate_reports(reporter, rows: Sequence[dict], root: Path, greedy: bool, max_new_tokens: int | None,
                     progress: Callable[[str], None] | None = None) -> list[dict]:
    out = []
    for index, row in enumerate(rows, 1):
        text = reporter.report(manifest_image(row, root), greedy=greedy, max_new_tokens=max_new_tokens)
        out.append({"id": row["id"], "image": str(row.get("image", "")), "prediction": text,
                    "reference": manifest_references(row, root)})
        if progress:
            progress(f"{index}/{len(rows)} {row['id']}")
    return out


def generate_answers(reporter, rows: Sequence[dict], root: Path, mode: str, greedy: bool,
                     max_new_tokens: int | None, progress: Callable[[str], None] | None = None,
                     score: bool = False) -> list[dict]:
    """Ask each question (closed: with its choices, as M3D-VQA's closed-ended evaluation, or with ``score`` by
    ranking the choices by likelihood; open: without)."""
    out = []
    for index, row in enumerate(rows, 1):
        if not row.get("question"):
            raise InputError(f"record {row['id']!r} has no 'question'")
        record = {k: row[k] for k in ("id", "image", "question", "question_type", "answer") if k in row}
        if mode == "closed":
            if not row.get("choices"):
                raise InputError(f"record {row['id']!r} has no choices: use --mode open")
            answer = reporter.ask(manifest_image(row, root), row["question"], row["choices"], greedy=greedy,
                                  max_new_tokens=max_new_tokens, score=score)
            record.update(choices=list(row["choices"]), answer_choice=row.get("answer_choice", ""))
        else:
            answer = reporter.ask(manifest_image(row, root), row["question"], greedy=greedy, max_new_tokens=max_new_tokens)
        record["prediction"] = answer.text
        out.append(record)
        if progress:
            progress(f"{index}/{len(rows)} {row['id']}")
    return out


# --- command lines ------------------------------------------------------------------------------

def _common(parser: argparse.ArgumentParser, text_metrics: bool = True) -> None:
    parser.add_argument("--out", required=True, help="output folder (created)")
    parser.add_argument("--model", default=None, help="generate first with this VLM: 'default', 'med3dvlm', "
                                                      "hf://repo or a folder (needs --data)")
    parser.add_argument("--data", default=None, help="with --model: manifest (.jsonl/.json/.csv) of the samples")
    parser.add_argument("--data-root", default=None, help="folder that relative paths in --data are under "
                                                          "(default: the manifest's folder)")
    parser.add_argument("--split", default=None, help="split of a .json manifest with splits (e.g. test)")
    parser.add_argument("--limit", type=int, default=None, help="only the first N samples (the reference: 1000)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 or mps")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--greedy", action="store_true", help="greedy decoding; without it the checkpoint's "
                        "generation_config.json samples (the reference's scripts: temperature 1.0, seed 42)")
    parser.add_argument("--seed", type=int, default=42, help="sampling seed (default 42, as the reference)")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="default 256, as the reference")
    parser.add_argument("--allow-slow", action="store_true", help="run a >1B-parameter model on a CPU anyway")
    if text_metrics:
        parser.add_argument("--metrics", nargs="+", default=list(TEXT_METRICS), choices=TEXT_METRICS)
        parser.add_argument("--bertscore-model", default=None,
                            help="BERTScore encoder: default roberta-large layer 17 (the paper's) when cached or "
                                 "downloadable, else the offline all-MiniLM-L6-v2 (not comparable; the summary "
                                 "says which); 'minilm' = always the offline one")
        parser.add_argument("--bertscore-layer", type=int, default=None, help="hidden layer for --bertscore-model")


def _load_rows(args: argparse.Namespace, kind: str) -> tuple[list[dict], Path]:
    if args.model and args.pred:
        raise InputError("give either --pred (score existing predictions) or --model with --data (generate)")
    if not args.model and not args.pred:
        raise InputError(f"nothing to score: pass --pred PREDICTIONS or --model M --data MANIFEST ({kind})")
    if args.model and not args.data:
        raise InputError("--model needs --data, the manifest of volumes to run it on")
    source = Path(args.pred or args.data)
    rows = read_records(source, args.split)
    if args.limit is not None:
        rows = rows[: args.limit]
    return rows, Path(args.data_root) if args.data_root else source.parent


def _reporter(args: argparse.Namespace):
    import torch

    from ..report import Reporter

    random.seed(args.seed)
    torch.manual_seed(args.seed)
    return Reporter(args.model, device=args.device, precision=args.precision, allow_slow=args.allow_slow)


def _device(args: argparse.Namespace) -> str:
    from ..inference import resolve_device

    return str(resolve_device(args.device))


def _bertscore(args: argparse.Namespace) -> BertScoreModel | None:
    if "bertscore" not in args.metrics:
        return None
    try:
        return bertscore_model(args.bertscore_model, args.bertscore_layer)
    except MetricUnavailable as error:
        if args.bertscore_model:
            raise InputError(str(error)) from error
        return None  # score_texts notes it as not computed


def _progress(text: str) -> None:
    print(f"\r{text}", end="", file=sys.stderr, flush=True)


def _generate_and_score(args: argparse.Namespace, kind: str, generate: Callable, score: Callable) -> int:
    """Read the rows, run the model on them first when ``--model`` is given, score them, print the summary."""
    rows, root = _load_rows(args, kind)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.model:
        rows = generate(_reporter(args), rows, root)
        print(f"\nwrote {_write_predictions(out / 'predictions.jsonl', rows)}", file=sys.stderr)
    _, written = score(rows, out)
    print(written[-1].read_text(), end="")
    print("wrote " + ", ".join(map(str, written)))
    return 0


def main_eval_report(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="voxtext eval-report", description="Score generated reports: BLEU-1, "
                                     "ROUGE-1, METEOR, BERTScore (per sample, then the mean), as Med3DVLM.")
    parser.add_argument("--pred", default=None, help="predictions (.jsonl/.json/.csv): id, prediction[, reference]")
    parser.add_argument("--ref", nargs="+", default=None,
                        help="references: files with id + reference (or text), or folders of <id>.txt")
    _common(parser)
    args = parser.parse_args(argv)
    references = read_references(args.ref) if args.ref else None
    return _generate_and_score(
        args, "report",
        lambda reporter, rows, root: generate_reports(reporter, rows, root, args.greedy, args.max_new_tokens,
                                                      _progress),
        lambda rows, out: evaluate_reports(rows, out, references, args.metrics, _bertscore(args), _device(args)))


def main_eval_vqa(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="voxtext eval-vqa", description="Score VQA answers: closed-ended "
                                     "accuracy per question type, open-ended text metrics per type and overall.")
    parser.add_argument("--pred", default=None, help="predictions (.jsonl/.json/.csv): id, prediction, answer, "
                                                     "question_type[, choices, answer_choice]")
    parser.add_argument("--mode", default="closed", choices=["closed", "open"],
                        help="with --model: ask with the choices (closed) or without (open)")
    parser.add_argument("--score", action="store_true", help="with --model --mode closed: pick the most likely "
                        "choice (log-likelihood of each answer) instead of parsing generated text")
    _common(parser)
    args = parser.parse_args(argv)
    return _generate_and_score(
        args, "VQA",
        lambda reporter, rows, root: generate_answers(reporter, rows, root, args.mode, args.greedy,
                                                      args.max_new_tokens, _progress, args.score),
        lambda rows, out: evaluate_vqa(rows, out, args.metrics, _bertscore(args), _device(args)))


def main_eval_retrieval(argv: Sequence[str] | None = None) -> int:
    from .retrieval import evaluate_retrieval

    parser = argparse.ArgumentParser(prog="voxtext eval-retrieval", description="Image-text retrieval recall@1/5/10 "
                                     "of a DCFormer_SigLIP model (IR: image queries, TR: text queries).")
    parser.add_argument("--model", default="dcformer-siglip", help="'dcformer-siglip', hf://repo or a folder")
    parser.add_argument("--data", required=True, help="manifest (.jsonl/.json/.csv) of pairs: image + reference "
                                                      "(text) or reference_file/text (a .txt path)")
    parser.add_argument("--data-root", default=None, help="folder relative paths are under (default: the manifest's)")
    parser.add_argument("--split", default=None, help="split of a .json manifest with splits (e.g. test)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 500, 1000, 2000],
                        help="evaluate the first N pairs for each N (default 100 500 1000 2000, as the reference)")
    parser.add_argument("--out", required=True, help="output folder (created)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    args = parser.parse_args(argv)
    rows = read_records(args.data, args.split)
    root = Path(args.data_root) if args.data_root else Path(args.data).parent
    pairs = [(manifest_image(r, root), manifest_references(r, root)[0]) for r in rows[: max(args.sizes)]]
    written = evaluate_retrieval(args.model, pairs, args.sizes, Path(args.out), args.device, args.precision,
                                 progress=_progress)
    print(file=sys.stderr)
    print(written[-1].read_text(), end="")
    print("wrote " + ", ".join(map(str, written)))
    return 0
