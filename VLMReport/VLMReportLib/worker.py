"""Background worker: one voxtext report or answer in its own process, ``python worker.py FOLDER``.

FOLDER holds ``job.json`` (options, affine, question, choices) and ``volume.npy`` (voxels, axes i, j, k).
The protocol is TextSeg's (:func:`TextSegLib.worker.serve`), plus ``{"event": "token", "message"}`` for
each piece of generated text; the worker writes ``result.json`` (``text``, ``choices``, ``index``).
Closing its stdin cancels the job (at the next token).
"""

from __future__ import annotations

import functools
import json
import sys
import threading
from pathlib import Path

import numpy as np
from TextSegLib.worker import Emit, explain, job_model, lay_out, read_job, resolve_device, serve

RESULT_FILE = "result.json"
WEIGHTS_HELP = (
    "The embedded default model needs no download; Med3DVLM weights come from "
    "https://huggingface.co/MagicXin/Med3DVLM-Qwen-2.5-7B (downloaded on first use when online). "
    "A local model is a folder holding config.json, the tokenizer and model.safetensors."
)
MEMORY_HELP = "Try the embedded default model, precision bf16 on a GPU, or device CPU"


def write_job(folder: Path, volume: np.ndarray, affine: np.ndarray, options: dict,
              question: str | None = None, choices: list[str] | None = None) -> None:
    """Lay out a job in ``folder`` for :func:`run`: a report when ``question`` is None, else an answer."""
    lay_out(folder, volume, affine, options, question=question, choices=choices or [])


def run(folder: Path, emit: Emit, cancel: threading.Event) -> None:
    """Generate the job's report or answer, streaming it as ``token`` events; raises on failure or cancellation."""
    emit({"event": "status", "message": "Starting voxtext"})
    from voxtext.errors import Cancelled
    from voxtext.report import Reporter
    from voxtext.server.client import RemoteReporter
    from voxtext.volume import Volume

    job = read_job(folder, emit)
    options = job["options"]
    reporter, where = job_model(options, lambda: Reporter(options["model"], device=resolve_device(options["device"]),
                                                          precision=options["precision"]), RemoteReporter)

    def stream(text: str) -> None:
        if cancel.is_set():
            raise Cancelled("generation cancelled")
        emit({"event": "token", "message": text})

    if cancel.is_set():
        raise Cancelled("generation cancelled")
    volume = Volume(job["volume"], np.asarray(job["affine"]))
    decoding = {"stream": stream, "greedy": options["greedy"], "max_new_tokens": options["max_new_tokens"]}
    if job["question"] is None:
        emit({"event": "status", "message": f"Writing the report on {where}"})
        result = {"text": reporter.report(volume, **decoding), "choices": [], "index": None}
    else:
        emit({"event": "status", "message": f"Answering on {where}"})
        scored = bool(job["choices"]) and options["score_choices"]
        answer = reporter.ask(volume, job["question"], job["choices"] or None, score=scored, **decoding)
        result = {"text": answer.text, "choices": list(answer.choices), "index": answer.index}
    partial = folder / ("partial-" + RESULT_FILE)
    partial.write_text(json.dumps(result))
    partial.replace(folder / RESULT_FILE)
    emit({"event": "done"})


if __name__ == "__main__":
    sys.exit(serve(run, explain=functools.partial(explain, what="generation", weights_help=WEIGHTS_HELP,
                                                  memory_help=MEMORY_HELP)))
