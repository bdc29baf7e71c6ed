"""Background worker: runs one voxtext segmentation in its own process, ``python worker.py FOLDER``.

FOLDER holds ``job.json`` (prompts, options, affine) and ``volume.npy`` (voxels, axes i, j, k). The worker
writes ``result.npz`` (``masks``; ``notes``, a JSON string of the result's per-prompt notes: ``lesion_stage``,
prompt -> organs the model's lesion stage sought it in, ``cautions``, prompt -> the model's caution about its
answer, and ``refined``, the prompts whose boundaries were refined by attenuation; when asked, ``probabilities``)
and reports one JSON object per stdout line: ``{"event": "status",
"message"}``, ``{"event": "progress", "done", "total"}``, ``{"event": "error", "kind", "message"}`` or
``{"event": "done"}``. Closing its stdin cancels the job.
Only the standard library, numpy and voxtext are imported, so it runs as a plain script. :func:`serve`
is the protocol itself, for other modules' worker scripts (other events, e.g. ``token``, pass through).
"""

from __future__ import annotations

import json
import os
import sys
import threading
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

JOB_FILE = "job.json"
VOLUME_FILE = "volume.npy"
RESULT_FILE = "result.npz"
WEIGHTS_HELP = (
    "The embedded default model needs no download; ESICA and ESICA-Lite weights come from "
    "https://huggingface.co/MagicXin/ESICA (downloaded on first use when online). "
    "A local model is a folder holding config.json and model.safetensors."
)
Emit = Callable[[dict], None]
Task = Callable[[Path, Emit, threading.Event], None]


def resolve_device(device: str) -> str:
    """voxtext device name for the extension's auto / cpu / gpu choice."""
    if device != "gpu":
        return device
    import torch

    from voxtext.errors import InputError

    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    raise InputError("no GPU was found (neither CUDA nor Apple MPS): choose device CPU or Auto")


def lay_out(folder: Path, volume: np.ndarray, affine: np.ndarray, options: dict, **fields) -> None:
    """Write ``volume`` and the job (``options``, ``affine`` and ``fields``) for a worker's :func:`read_job`."""
    np.save(folder / VOLUME_FILE, volume)
    job = {"options": options, "affine": np.asarray(affine).tolist(), **fields}
    (folder / JOB_FILE).write_text(json.dumps(job))


def read_job(folder: Path, emit: Emit) -> dict:
    """The job laid out in ``folder`` (announcing the model loaded next); voxels under ``job["volume"]``."""
    job = json.loads((folder / JOB_FILE).read_text())
    job["volume"] = np.load(folder / VOLUME_FILE, allow_pickle=False)
    emit({"event": "status", "message": f"Loading model {job['options']['model']}"})
    return job


def write_job(folder: Path, volume: np.ndarray, affine: np.ndarray, prompts: list[str], options: dict,
              modality: str | None = None) -> None:
    """Lay out a segmentation in ``folder`` for :func:`run`."""
    lay_out(folder, volume, affine, options, prompts=prompts, modality=modality)


def job_model(options: dict, local: Callable[[], Any], remote: Callable[..., Any]) -> tuple[Any, str]:
    """The job's model and where it runs: ``remote(url, token, model=...)`` on ``options["server"]`` (the token
    from VOXTEXT_TOKEN, never written to a job file), else ``local()`` on this computer."""
    if options.get("server"):
        return remote(options["server"], os.environ.get("VOXTEXT_TOKEN"), model=options["model"]), options["server"]
    model = local()
    return model, str(model.device)


def run(folder: Path, emit: Emit, cancel: threading.Event) -> None:
    """Segment the job in ``folder`` and write its result; raises on failure or cancellation."""
    emit({"event": "status", "message": "Starting voxtext"})
    from voxtext.api import Segmenter
    from voxtext.errors import Cancelled
    from voxtext.server.client import RemoteSegmenter
    from voxtext.volume import Volume

    job = read_job(folder, emit)
    options = job["options"]
    segmenter, where = job_model(
        options, lambda: Segmenter(options["model"], device=resolve_device(options["device"])), RemoteSegmenter
    )
    if cancel.is_set():
        raise Cancelled("segmentation cancelled")
    volume = Volume(job["volume"], np.asarray(job["affine"]), job.get("modality"))
    emit({"event": "status", "message": f"Segmenting {len(job['prompts'])} target(s) on {where}"})
    result = segmenter.segment(
        volume,
        job["prompts"],
        quality=options["quality"],
        refine=options["refine"],
        other_modalities=options["other_modalities"],
        return_probabilities=options["probabilities"],
        progress=lambda done, total: emit({"event": "progress", "done": done, "total": total}),
        cancel=cancel,
    )
    notes = {"lesion_stage": result.lesion_stage, "cautions": result.cautions, "refined": result.refined}
    arrays = {"masks": result.masks, "notes": np.array(json.dumps(notes))}
    if result.probabilities is not None:
        arrays["probabilities"] = result.probabilities
    partial = folder / ("partial-" + RESULT_FILE)
    np.savez(partial, **arrays)
    partial.replace(folder / RESULT_FILE)
    emit({"event": "done"})


def explain(error: BaseException, what: str = "segmentation", weights_help: str = WEIGHTS_HELP,
            memory_help: str = "Try quality 'fast', fewer targets at once, or device CPU") -> tuple[str, str]:
    """(kind, plain-words message) of a failure: cancelled, dependencies, weights, memory, input or internal."""
    if isinstance(error, ImportError):
        return "dependencies", (
            f"The Python package {error.name or ''} is missing from {sys.executable}. In Slicer, open the TextSeg "
            "module and accept the installation; elsewhere pip install the extension's requirements."
        )
    from voxtext.errors import Cancelled, CheckpointError, VoxTextError

    text = str(error) or type(error).__name__
    if isinstance(error, Cancelled):
        return "cancelled", f"{what.capitalize()} cancelled."
    if isinstance(error, CheckpointError):
        return "weights", f"The model could not be loaded: {text}. {weights_help}"
    if isinstance(error, MemoryError) or "out of memory" in text.lower() or "can't allocate memory" in text:
        return "memory", f"Out of memory. {memory_help} (the CPU usually has more memory than the GPU)."
    if isinstance(error, VoxTextError):
        return "input", text[0].upper() + text[1:]
    return "internal", f"Unexpected error: {type(error).__name__}: {text}"


def _cancel_when_stdin_closes(cancel: threading.Event) -> None:
    sys.stdin.read()
    cancel.set()


def serve(task: Task, argv: list[str] | None = None,
          explain: Callable[[BaseException], tuple[str, str]] = explain) -> int:
    """Run ``task(FOLDER, emit, cancel)`` under the protocol; the exit status (0 done, 1 failed)."""
    argv = sys.argv[1:] if argv is None else argv
    folder = Path(argv[0])
    # The protocol owns the real stdout; anything else printed (libraries, C code) goes to stderr.
    protocol = os.fdopen(os.dup(sys.stdout.fileno()), "w", encoding="utf-8")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())

    def emit(event: dict) -> None:
        protocol.write(json.dumps(event) + "\n")
        protocol.flush()

    cancel = threading.Event()
    threading.Thread(target=_cancel_when_stdin_closes, args=(cancel,), daemon=True).start()
    try:
        task(folder, emit, cancel)
        return 0
    except BaseException as error:  # noqa: BLE001 - every failure is reported to the parent in words
        traceback.print_exc()
        kind, message = explain(error)
        emit({"event": "error", "kind": kind, "message": message})
        return 1


if __name__ == "__main__":
    sys.exit(serve(run))
