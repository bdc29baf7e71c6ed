"""``POST /v1/findings``: a NIfTI/NRRD upload plus candidate finding texts in, the texts ranked by a
DCFormer_SigLIP model out (zero-shot, :class:`voxtext.findings.FindingsRanker`)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Annotated

from fastapi import APIRouter, Form, HTTPException, Request
from fastapi.responses import Response
from pydantic import BaseModel, Field

from ..errors import Cancelled
from ..findings import DEFAULT_FINDINGS, MAX_FINDING_CHARS, MAX_FINDINGS, FindingsRanker
from .app import slot_for
from .codec import decode_volume
from .jobs import RESPONSES, VolumeUpload, respond, submit_upload
from .workers import JobFunction, ModelSlot

log = logging.getLogger("voxtext.server")
router = APIRouter(tags=["findings"])
KIND = "findings"


class FindingsOptions(BaseModel):
    """Form fields of a findings request (the volume travels as the ``volume`` file part)."""

    findings: list[Annotated[str, Field(min_length=1, max_length=MAX_FINDING_CHARS)]] = Field(
        default_factory=list, max_length=MAX_FINDINGS,
        description=f"candidate finding texts, one per field (none: {len(DEFAULT_FINDINGS)} common CT findings)")
    model: str | None = Field(None, description="a findings model resident on this server (GET /v1/models); "
                                                "default: the first one loaded")


class FindingScore(BaseModel):
    text: str
    probability: float = Field(description="sigmoid(logit): the model's image-text match probability")
    logit: float = Field(description="cos(image, text) * exp(t') + b")


class FindingsResult(BaseModel):
    """The candidate findings by decreasing probability."""

    model: str
    findings: list[FindingScore]
    seconds: float = Field(description="server-side time of decode and scoring")


def _run(data: bytes, findings: list[str], max_bytes: int) -> JobFunction[FindingsRanker, FindingsResult]:
    """The job for a worker thread: decode, score (logs sizes and timings only)."""

    def job(ranker: FindingsRanker, cancel: threading.Event, progress: Callable[[int, int], None]) -> FindingsResult:
        t0 = time.perf_counter()
        volume = decode_volume(data, max_bytes)
        if cancel.is_set():
            raise Cancelled("findings cancelled: the client went away")
        ranked = ranker.rank(volume, findings or None)
        seconds = time.perf_counter() - t0
        log.info("findings: %d bytes in, grid %s, %d findings, %.2f s", len(data), volume.shape, len(ranked), seconds)
        return FindingsResult(model=ranker.model_name, seconds=seconds,
                              findings=[FindingScore(text=f.text, probability=f.probability, logit=f.logit)
                                        for f in ranked])

    return job


def _slot(request: Request, name: str | None) -> ModelSlot[FindingsRanker]:
    if name is not None:
        return slot_for(request, name, KIND)
    slot = next((s for s in request.app.state.slots.values() if s.kind == KIND), None)
    if slot is None:
        raise HTTPException(404, "no zero-shot findings model is loaded on this server: start it with "
                                 "`voxtext serve --findings dcformer-siglip` (or --findings a DCFormer_SigLIP folder)")
    return slot


@router.post("/v1/findings", response_model=FindingsResult, responses=RESPONSES,
             summary="Rank candidate finding texts against an uploaded volume (zero-shot, DCFormer_SigLIP)")
async def findings(request: Request, volume: VolumeUpload,
                   options: Annotated[FindingsOptions, Form()]) -> FindingsResult | Response:
    slot = _slot(request, options.model or None)  # an empty field counts as not given
    max_bytes = request.app.state.config.max_volume_bytes
    job = await submit_upload(slot, volume, lambda data: _run(data, options.findings, max_bytes))
    return await respond(job, request, False, lambda finished: [], interval=0.25)
