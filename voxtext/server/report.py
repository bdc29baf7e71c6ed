"""``POST /v1/report`` and ``POST /v1/ask``: a NIfTI/NRRD upload in, generated text out (streamable token by token)."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, Form, Query, Request
from fastapi.responses import Response
from pydantic import BaseModel, Field

from ..errors import Cancelled
from ..report import LETTERS, Reporter
from ..volume import Volume
from .app import slot_for
from .codec import decode_volume
from .jobs import Poll, VolumeUpload, respond, stream_responses, submit_upload
from .workers import JobFunction, ModelSlot

log = logging.getLogger("voxtext.server")
router = APIRouter(tags=["report"])
Generate = Callable[[Reporter, Volume, Callable[[str], None]], dict[str, Any]]  # -> result fields
StreamFlag = Annotated[bool, Query(description="NDJSON `token` events (text pieces as generated), then the result")]


class ReportOptions(BaseModel):
    """Form fields of a report request (the volume travels as the ``volume`` file part)."""

    model: str = Field("default", description="a VLM resident on this server (GET /v1/models)")
    greedy: bool = Field(False, description="greedy decoding instead of the checkpoint's defaults")
    max_new_tokens: int | None = Field(None, ge=1, le=4096)


class AskOptions(ReportOptions):
    """Form fields of a question: the report's plus the question and, for a closed question, its options."""

    question: str = Field(min_length=1, max_length=2000, description="e.g. 'Is there a kidney stone?'")
    choices: list[str] = Field(default_factory=list, max_length=len(LETTERS),
                               description="options of a closed question, one per field (none: open question)")
    score: bool = Field(False, description="closed question: rank the options by the log-likelihood of each "
                        "answer instead of generating (the answer is always one of them)")


class ReportResult(BaseModel):
    """The generated text."""

    model: str
    text: str
    seconds: float = Field(description="server-side time of decode and generation")


class AnswerResult(ReportResult):
    """The answer's text and, for a closed question, the option it picks (``index`` null when unparseable)."""

    choices: list[str]
    index: int | None
    scores: list[float] = Field(description="with score: the log-likelihood of each option's answer "
                                "(empty otherwise)")


def _run(data: bytes, max_bytes: int, pieces: queue.SimpleQueue[str], generate: Generate,
         result: type[ReportResult]) -> JobFunction[Reporter, ReportResult]:
    """The job for a worker thread: decode, generate (text pieces into ``pieces``), logging sizes and timings only.

    Each piece first checks the cancel event, so a client that goes away stops generation within a word.
    """

    def job(reporter: Reporter, cancel: threading.Event, progress: Callable[[int, int], None]) -> ReportResult:
        t0 = time.perf_counter()
        volume = decode_volume(data, max_bytes)

        def piece(text: str) -> None:
            if cancel.is_set():
                raise Cancelled("generation cancelled: the client went away")
            pieces.put(text)

        fields = generate(reporter, volume, piece)
        seconds = time.perf_counter() - t0
        log.info("%s: %d bytes in, grid %s, %.2f s", result.__name__, len(data), volume.shape, seconds)
        return result(model=reporter.model_name, seconds=seconds, **fields)

    return job


def _tokens(pieces: queue.SimpleQueue[str]) -> Poll:
    """``token`` events: the text pieces generated since the last poll."""

    def poll(finished: bool) -> list[dict]:
        events = []
        while not pieces.empty():
            events.append({"event": "token", "text": pieces.get()})
        return events

    return poll


async def _generate(request: Request, volume: VolumeUpload, options: ReportOptions, stream: bool,
                    generate: Generate, result: type[ReportResult]) -> ReportResult | Response:
    slot: ModelSlot[Reporter] = slot_for(request, options.model, "report")
    max_bytes, pieces = request.app.state.config.max_volume_bytes, queue.SimpleQueue()
    job = await submit_upload(slot, volume, lambda data: _run(data, max_bytes, pieces, generate, result))
    return await respond(job, request, stream, _tokens(pieces), interval=0.05)


@router.post("/v1/report", response_model=ReportResult, summary="Write a findings report of an uploaded volume",
             responses=stream_responses("`token` events"))
async def report(request: Request, volume: VolumeUpload, options: Annotated[ReportOptions, Form()],
                 stream: StreamFlag = False) -> ReportResult | Response:
    def generate(reporter: Reporter, image: Volume, piece: Callable[[str], None]) -> dict[str, Any]:
        return {"text": reporter.report(image, stream=piece, greedy=options.greedy,
                                        max_new_tokens=options.max_new_tokens)}

    return await _generate(request, volume, options, stream, generate, ReportResult)


@router.post("/v1/ask", response_model=AnswerResult, summary="Answer a question about an uploaded volume",
             responses=stream_responses("`token` events"))
async def ask(request: Request, volume: VolumeUpload, options: Annotated[AskOptions, Form()],
              stream: StreamFlag = False) -> AnswerResult | Response:
    def generate(reporter: Reporter, image: Volume, piece: Callable[[str], None]) -> dict[str, Any]:
        answer = reporter.ask(image, options.question, options.choices, stream=piece, greedy=options.greedy,
                              max_new_tokens=options.max_new_tokens, score=options.score)
        return {"text": answer.text, "choices": list(answer.choices), "index": answer.index,
                "scores": list(answer.scores)}

    return await _generate(request, volume, options, stream, generate, AnswerResult)
