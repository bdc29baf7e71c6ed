"""Work running in a worker process: start, poll without blocking, cancel, collect the result.

:class:`WorkerJob` is the process and its JSON-line protocol (see :mod:`worker`), shared by every module
of the extension; :class:`SegmentationJob` is TextSeg's segmentation run.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Literal

import numpy as np

from . import worker
from .options import SegmentOptions

State = Literal["running", "done", "failed", "cancelled"]
CANCEL_GRACE_S = 5.0  # after this the worker is killed, not asked
LOG_LINES = 200
LIBRARY_ROOT = Path(__file__).resolve().parents[1]  # the folder holding TextSegLib


@dataclass(frozen=True)
class JobEvent:
    """One report from the worker: ``status``, ``progress``, ``log`` or the final ``done``/``error``."""

    kind: str
    message: str = ""
    done: int = 0
    total: int = 0
    reason: str = ""  # of an error: see JobError.kind


class JobError(RuntimeError):
    """A job failed; ``kind`` is cancelled, dependencies, weights, memory, input, internal or crashed."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class WorkerJob:
    """One worker process running ``script FOLDER`` on the job laid out in ``folder`` (removed by :meth:`close`).

    The folder holding ``TextSegLib`` is put on the worker's ``PYTHONPATH``, so any module's worker script
    can serve the protocol with :func:`TextSegLib.worker.serve`. ``what`` names the work in messages.
    """

    crash_hint = "try quality 'fast' or device CPU."

    def __init__(self, script: str | Path, folder: Path, python: str | None = None,
                 what: str = "segmentation") -> None:
        self.folder, self.what = folder, what
        self.state: State = "running"
        self.error: JobError | None = None
        self.log: deque[str] = deque(maxlen=LOG_LINES)
        self._events: queue.Queue[JobEvent | None] = queue.Queue()
        self._open_streams = 2
        self._final: JobEvent | None = None
        self._kill_at: float | None = None
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(LIBRARY_ROOT), env.get("PYTHONPATH")]))
        self._process = subprocess.Popen(
            [python or sys.executable, str(script), str(self.folder)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
            text=True, encoding="utf-8", errors="replace", start_new_session=os.name != "nt",
        )
        for stream, parse in ((self._process.stdout, _parse_event), (self._process.stderr, _log_event)):
            threading.Thread(target=self._read, args=(stream, parse), daemon=True).start()

    def _read(self, stream: IO[str], parse: Callable[[str], JobEvent]) -> None:
        for line in stream:
            if line.strip():
                self._events.put(parse(line.rstrip("\n")))
        self._events.put(None)

    @property
    def finished(self) -> bool:
        return self.state != "running"

    def poll(self) -> list[JobEvent]:
        """Events since the last call (never blocks); updates :attr:`state` once the worker has ended."""
        events = []
        while True:
            try:
                event = self._events.get_nowait()
            except queue.Empty:
                break
            if event is None:
                self._open_streams -= 1
                continue
            if event.kind == "log":
                self.log.append(event.message)
            if event.kind in ("done", "error"):
                self._final = event
            events.append(event)
        if self._kill_at is not None and time.monotonic() > self._kill_at and self._process.poll() is None:
            self._kill()
        if self.state == "running" and self._open_streams == 0 and self._process.poll() is not None:
            self._conclude()
        return events

    def _conclude(self) -> None:
        code = self._process.returncode
        if self._kill_at is not None:  # cancelled, even if the worker finished meanwhile: nothing is applied
            self.error = JobError("cancelled", f"{self.what.capitalize()} cancelled.")
        elif self._final is not None and self._final.kind == "done" and code == 0:
            self.state = "done"
            return
        elif self._final is not None and self._final.kind == "error":
            self.error = JobError(self._final.reason, self._final.message)
        else:
            message = (f"The {self.what} process stopped unexpectedly (exit code {code}). If the volume is large "
                       "this usually means it ran out of memory: " + self.crash_hint)
            if self.log:
                message += " Last output: " + " | ".join(list(self.log)[-3:])
            self.error = JobError("crashed", message)
        self.state = "cancelled" if self.error.kind == "cancelled" else "failed"

    def cancel(self) -> None:
        """Ask the worker to stop (it stops at the next window); it is killed if still running after a grace time."""
        if self.finished or self._kill_at is not None:
            return
        self._kill_at = time.monotonic() + CANCEL_GRACE_S
        try:
            self._process.stdin.close()
        except OSError:
            pass

    def _kill(self) -> None:
        """Kill the worker and its children (a Slicer launcher starts the real Python as a child)."""
        if os.name == "nt":
            subprocess.run(["taskkill", "/F", "/T", "/PID", str(self._process.pid)], capture_output=True)
        else:
            try:
                os.killpg(self._process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def wait(self, on_event: Callable[[JobEvent], None] | None = None, interval_s: float = 0.05) -> State:
        """Block until the job ends, passing each event to ``on_event``."""
        while not self.finished:
            for event in self.poll():
                if on_event is not None:
                    on_event(event)
            time.sleep(interval_s)
        return self.state

    def close(self) -> None:
        """Stop the worker if it still runs and delete the temporary folder."""
        if self._process.poll() is None:
            self._kill()
            self._process.wait()
        for stream in (self._process.stdin, self._process.stdout, self._process.stderr):
            try:
                stream.close()
            except OSError:
                pass
        shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> WorkerJob:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _check_done(self) -> None:
        if self.state != "done":
            raise self.error or JobError("internal", f"the {self.what} has not finished yet")


class SegmentationJob(WorkerJob):
    """One worker process segmenting ``volume`` (axes i, j, k; ``affine`` voxel -> RAS) for ``prompts``."""

    def __init__(
        self,
        volume: np.ndarray,
        affine: np.ndarray,
        prompts: Sequence[str],
        options: SegmentOptions,
        python: str | None = None,
        modality: str | None = None,
    ) -> None:
        self.prompts, self.options, self.affine = list(prompts), options, np.asarray(affine, dtype=float)
        self.shape = tuple(volume.shape)
        folder = Path(tempfile.mkdtemp(prefix="textseg-"))
        worker.write_job(folder, volume, self.affine, self.prompts, options.to_json(), modality)
        super().__init__(worker.__file__, folder, python)

    def result(self):
        """The :class:`voxtext.segmentation.Segmentation` of a finished job; raises :class:`JobError` otherwise."""
        from voxtext.segmentation import Segmentation

        self._check_done()
        with np.load(self.folder / worker.RESULT_FILE, allow_pickle=False) as data:
            masks = data["masks"]
            probabilities = data["probabilities"] if "probabilities" in data else None
            notes = json.loads(str(data["notes"]))
        if masks.shape != (len(self.prompts), *self.shape):
            raise JobError("internal", f"the worker returned masks of shape {masks.shape} for a {self.shape} volume")
        return Segmentation(masks, self.prompts, self.affine, probabilities, model=self.options.model,
                            lesion_stage=notes["lesion_stage"], cautions=notes["cautions"], refined=notes["refined"])


def _parse_event(line: str) -> JobEvent:
    try:
        data = json.loads(line)
        kind = data["event"]
    except (ValueError, KeyError, TypeError):
        return JobEvent("log", line)
    return JobEvent(kind, data.get("message", ""), int(data.get("done", 0)), int(data.get("total", 0)),
                    data.get("kind", ""))


def _log_event(line: str) -> JobEvent:
    return JobEvent("log", line)
