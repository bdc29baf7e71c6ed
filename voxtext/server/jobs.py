"""What every model router shares: the upload, the job's answer (JSON or NDJSON) and cancel-on-disconnect.

A router submits a job to its :class:`~voxtext.server.workers.ModelSlot` with :func:`submit_upload` and
answers with :func:`respond`; the stream's intermediate events come from the router's ``poll``.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any

from fastapi import File, HTTPException, Request, UploadFile
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel

from ..errors import InputError
from .codec import TooLargeError
from .workers import Job, JobFunction, ModelSlot

log = logging.getLogger("voxtext.server")
Poll = Callable[[bool], list[dict[str, Any]]]  # finished -> the events to send now
VolumeUpload = Annotated[UploadFile, File(description="NIfTI (.nii, .nii.gz) or NRRD with attached data")]

RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"description": "missing or wrong bearer token"},
    404: {"description": "model not loaded"},
    413: {"description": "request body or decoded volume too large"},
    422: {"description": "malformed volume or invalid option, with the reason"},
    503: {"description": "the model's queue is full; see Retry-After"},
}


def stream_responses(events: str) -> dict[int | str, dict[str, Any]]:
    """OpenAPI responses of an endpoint whose ``stream=true`` sends ``events`` before its result."""
    return {200: {"content": {"application/x-ndjson": {}},
                  "description": f"The result; with `stream=true` an NDJSON stream of {events} ending in one "
                                 "`result` (this object under `result`) or `error` event."},
            **RESPONSES}


async def submit_upload(slot: ModelSlot, volume: VolumeUpload,
                        job: Callable[[bytes], JobFunction[Any, BaseModel]]) -> Job[BaseModel]:
    """Read the uploaded volume (422 when empty) and queue ``job(data)`` on ``slot`` (503 when full)."""
    data = await volume.read()
    if not data:
        raise HTTPException(422, "the uploaded volume is empty")
    return slot.submit(job(data))


async def respond(job: Job[BaseModel], request: Request, stream: bool, poll: Poll,
                  interval: float) -> BaseModel | Response:
    """The job's result as JSON, or with ``stream`` as NDJSON: ``poll``'s events every ``interval`` s."""
    if stream:
        return StreamingResponse(_events(job, poll, interval), media_type="application/x-ndjson")
    try:
        while not (await asyncio.wait({job.future}, timeout=0.25))[0]:
            if await request.is_disconnected():
                return Response(status_code=499)  # nobody reads it; the finally clause cancels the job
        return job.future.result()
    finally:
        job.abort()  # no-op once finished; stops the job if this handler itself is cancelled


def _line(event: dict[str, Any]) -> bytes:
    return (json.dumps(event) + "\n").encode()


async def _events(job: Job[BaseModel], poll: Poll, interval: float) -> AsyncIterator[bytes]:
    """``poll(False)``'s events until the job ends, ``poll(True)``'s, then one ``result`` or ``error`` event."""
    try:
        while not (await asyncio.wait({job.future}, timeout=interval))[0]:
            for event in poll(False):
                yield _line(event)
        for event in poll(True):
            yield _line(event)
        try:
            yield _line({"event": "result", "result": job.future.result().model_dump()})
        except InputError as error:
            yield _line({"event": "error", "status": 413 if isinstance(error, TooLargeError) else 422,
                         "detail": str(error)})
        except Exception as error:  # reported to the client; the traceback stays in the server log
            log.exception("job failed")
            yield _line({"event": "error", "status": 500, "detail": type(error).__name__})
    finally:
        job.abort()  # the client went away (or the stream ended): stop the job, free its place
