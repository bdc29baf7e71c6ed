"""``POST /v1/segment``: a NIfTI/NRRD upload plus prompts in, a label map on the input grid out."""

from __future__ import annotations

import base64
import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Annotated, Literal

from fastapi import APIRouter, Form, Query, Request
from fastapi.responses import Response
from pydantic import BaseModel, Field

from ..api import Segmenter
from ..errors import InputError
from .app import slot_for
from .codec import decode_volume, encode_nifti, label_layers
from .jobs import Poll, VolumeUpload, respond, stream_responses, submit_upload
from .workers import Job, ModelSlot

log = logging.getLogger("voxtext.server")
router = APIRouter(tags=["segmentation"])


class SegmentOptions(BaseModel):
    """Form fields of a segmentation request (the volume travels as the ``volume`` file part)."""

    prompts: list[str] = Field(min_length=1, max_length=64, description="targets in plain language, one per field")
    model: str = Field("default", description="a model resident on this server (GET /v1/models)")
    quality: Literal["accurate", "fast"] = "accurate"
    threshold: float = Field(0.5, gt=0.0, lt=1.0)
    overlap: float | None = Field(None, ge=0.0, lt=1.0, description="sliding-window overlap (default: by quality)")
    pass_num: int | None = Field(None, ge=0, le=4, description="refinement passes (default: the checkpoint's)")
    roi: str | None = Field(None, description="voxel bounds as JSON, e.g. [[0,256],[0,512],[40,200]]")
    keep_largest: bool = False
    fill_holes: bool = False
    overlap_policy: Literal["independent", "argmax"] = "independent"
    laterality: bool = True
    lesion_stage: bool = Field(True, description="lesion prompts to the model's lesion stage, when it has one")
    refine: bool = Field(True, description="on CT, boundaries refined by attenuation within a few mm of the model's")
    other_modalities: bool = Field(False, description="answer prompts the model learned on other modalities only "
                                   "(unvalidated; by default answered empty with a caution)")
    modality: Literal["CT", "MR", "PET", "US"] | None = None

    def parsed_roi(self) -> list[list[int]] | None:
        if self.roi is None:
            return None
        try:
            roi = json.loads(self.roi)
            return [[int(start), int(stop)] for start, stop in roi]
        except (ValueError, TypeError) as error:
            raise InputError(f"roi must be JSON [[i0, i1], [j0, j1], [k0, k1]], got {self.roi!r}") from error


class SegmentInfo(BaseModel):
    label: int = Field(description="value of this segment in its layer of the label map")
    layer: int = Field(description="layer (4th axis) holding the segment; 0 when the map is 3-D")
    prompt: str
    voxels: int
    volume_ml: float
    lesion_stage_within: list[str] = Field(
        default_factory=list, description="organs the model's lesion stage sought this lesion in; empty when the "
                                          "main model answered")
    caution: str = Field("", description="why this answer (an empty one above all) may mislead: set when the model "
                                         "was measured unreliable for this target; empty otherwise")
    refined: bool = Field(False, description="its boundary was refined by attenuation (CT)")


class SegmentationResult(BaseModel):
    """The label map on exactly the input grid, with what each label value means."""

    model: str
    shape: list[int] = Field(description="input grid (i, j, k)")
    affine: list[list[float]] = Field(description="voxel -> RAS mm, as decoded from the upload")
    segments: list[SegmentInfo]
    seconds: float = Field(description="server-side time of decode, inference and encode")
    labelmap: str = Field(description="base64 of a gzipped NIfTI-1 label map: (i, j, k), or (i, j, k, layers) "
                                      "when masks overlap")


def _run(data: bytes, options: SegmentOptions, max_bytes: int) -> Callable[[Segmenter, threading.Event, Callable],
                                                                               SegmentationResult]:
    """The job for a worker thread: decode, segment, encode (logs sizes and timings only)."""

    def job(segmenter: Segmenter, cancel: threading.Event, progress: Callable[[int, int], None]) -> SegmentationResult:
        t0 = time.perf_counter()
        volume = decode_volume(data, max_bytes, options.modality)
        result = segmenter.segment(
            volume, options.prompts, quality=options.quality, threshold=options.threshold, overlap=options.overlap,
            pass_num=options.pass_num, roi=options.parsed_roi(), keep_largest=options.keep_largest,
            fill_holes=options.fill_holes, overlap_policy=options.overlap_policy, laterality=options.laterality,
            lesion_stage=options.lesion_stage, refine=options.refine, other_modalities=options.other_modalities,
            modality=options.modality, progress=progress,
            cancel=cancel,
        )
        labels, layer_of = label_layers(result)
        counts = result.masks.reshape(len(result.prompts), -1).sum(1)
        segments = [SegmentInfo(label=i + 1, layer=layer_of[i], prompt=p, voxels=int(counts[i]),
                                volume_ml=float(counts[i]) * result.voxel_volume_ml,
                                lesion_stage_within=result.lesion_stage.get(p, []),
                                caution=result.cautions.get(p, ""), refined=p in result.refined)
                    for i, p in enumerate(result.prompts)]
        encoded = base64.b64encode(encode_nifti(labels, result.affine)).decode("ascii")
        seconds = time.perf_counter() - t0
        log.info("segment: %d bytes in, grid %s, %d prompts, %s, %.2f s", len(data), volume.shape,
                 len(result.prompts), options.quality, seconds)
        return SegmentationResult(model=segmenter.model_name, shape=list(volume.shape),
                                  affine=result.affine.tolist(), segments=segments, seconds=seconds, labelmap=encoded)

    return job


def _progress(job: Job[SegmentationResult]) -> Poll:
    """``progress`` events: the latest ``(done, total)`` windows, with the final count when finished."""

    def poll(finished: bool) -> list[dict]:
        done, total = job.progress
        state = "finished" if finished else "running" if job.started.is_set() else "queued"
        return [{"event": "progress", "state": state, "done": done, "total": total}]

    return poll


@router.post(
    "/v1/segment",
    response_model=SegmentationResult,
    summary="Segment the targets named in `prompts` in an uploaded volume",
    responses=stream_responses("progress events"),
)
async def segment(
    request: Request,
    volume: VolumeUpload,
    options: Annotated[SegmentOptions, Form()],
    stream: Annotated[bool, Query(description="NDJSON progress events, then the result")] = False,
) -> SegmentationResult | Response:
    slot: ModelSlot[Segmenter] = slot_for(request, options.model, "segmentation")
    max_bytes = request.app.state.config.max_volume_bytes
    job = await submit_upload(slot, volume, lambda data: _run(data, options, max_bytes))
    return await respond(job, request, stream, _progress(job), interval=0.5)
