"""``RemoteSegmenter``, ``RemoteReporter`` and ``RemoteFindingsRanker``: :class:`voxtext.Segmenter`'s
``segment()``, :class:`voxtext.report.Reporter`'s ``report()`` / ``ask()`` and
:class:`voxtext.findings.FindingsRanker`'s ``rank()`` through a ``voxtext serve`` server."""

from __future__ import annotations

import base64
import gzip
import json
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Self

import httpx
import nibabel as nib
import numpy as np

from ..api import Quality, as_volume, normalize_prompts, progress_callback
from ..errors import Cancelled, InputError, VoxTextError
from ..findings import Finding, normalize_findings
from ..inference import ProgressCallback
from ..postprocess import OverlapPolicy
from ..report import Answer
from ..segmentation import Segmentation
from ..volume import Volume
from .codec import encode_volume, masks_from_layers


class ServerError(VoxTextError):
    """The server refused or failed a request; ``status`` is the HTTP status, ``retry_after`` seconds on 503."""

    def __init__(self, message: str, status: int, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status, self.retry_after = status, retry_after


class RemoteModel:
    """A model resident on a ``voxtext serve`` server: the HTTP session and the streamed request they all make."""

    def __init__(self, url: str, token: str | None = None, model: str = "default", timeout: float = 3600.0) -> None:
        self.model_name = model
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=url.rstrip("/"), headers=headers,
                                  timeout=httpx.Timeout(timeout, connect=10.0))

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def models(self) -> dict:
        """The server's resident models with their queue state, and the named models it knows."""
        response = self._http.get("/v1/models")
        _raise_for_status(response)
        return response.json()

    def _request(self, path: str, volume: Volume, fields: dict[str, object],
                 on_event: Callable[[dict[str, Any]], None], cancel: threading.Event | None = None) -> dict[str, Any]:
        """POST ``volume`` (gzipped NIfTI) with ``fields`` to ``path?stream=true``; the ``result`` event's object.

        Every other event goes to ``on_event``; setting ``cancel`` closes the connection, which stops the job.
        """
        form = {k: _form_value(v) for k, v in {"model": self.model_name, **fields}.items() if v is not None}
        upload = {"volume": ("volume.nii.gz", encode_volume(volume), "application/gzip")}
        with self._http.stream("POST", path, params={"stream": "true"}, data=form, files=upload) as response:
            _raise_for_status(response)
            for line in response.iter_lines():
                if cancel is not None and cancel.is_set():
                    raise Cancelled(f"request to {path} cancelled")  # leaving the block closes the connection
                event = json.loads(line)
                if event["event"] == "error":
                    raise _error(event["status"], event["detail"])
                if event["event"] == "result":
                    return event["result"]
                on_event(event)
        raise ServerError("the server closed the stream without a result", 502)


class RemoteSegmenter(RemoteModel):
    """A segmentation model resident on a ``voxtext serve`` server, used like a local :class:`voxtext.Segmenter`.

    >>> seg = RemoteSegmenter("http://127.0.0.1:8000", token="...").segment("ct.nii.gz", ["liver"])  # doctest: +SKIP
    """

    def segment(
        self,
        volume: Volume | str | Path | np.ndarray,
        prompts: str | Sequence[str],
        *,
        quality: Quality = "accurate",
        threshold: float = 0.5,
        overlap: float | None = None,
        pass_num: int | None = None,
        roi: Sequence[Sequence[int]] | None = None,
        keep_largest: bool = False,
        fill_holes: bool = False,
        overlap_policy: OverlapPolicy = "independent",
        laterality: bool = True,
        lesion_stage: bool = True,
        refine: bool = True,
        other_modalities: bool = False,
        modality: str | None = None,
        return_probabilities: bool = False,
        progress: bool | ProgressCallback = False,
        cancel: threading.Event | None = None,
    ) -> Segmentation:
        """Segment on the server; masks come back on exactly the grid of ``volume``.

        The volume is read here and uploaded as gzipped NIfTI. ``progress`` gets ``(done, total)`` windows
        as the server reports them; setting ``cancel`` closes the connection, which stops the server's job.
        """
        if return_probabilities:
            raise InputError("return_probabilities is not available from a server: use voxtext.Segmenter locally")
        prompts = normalize_prompts(prompts)
        volume = as_volume(volume, modality)
        fields = {"prompts": prompts, "quality": quality, "threshold": threshold,
                  "overlap": overlap, "pass_num": pass_num, "roi": None if roi is None else json.dumps(roi),
                  "keep_largest": keep_largest, "fill_holes": fill_holes, "overlap_policy": overlap_policy,
                  "laterality": laterality, "lesion_stage": lesion_stage, "refine": refine,
                  "other_modalities": other_modalities,
                  "modality": modality or volume.modality}
        with progress_callback(progress) as report:
            def on_event(event: dict[str, Any]) -> None:
                if event["event"] == "progress" and report is not None and event["total"]:
                    report(event["done"], event["total"])

            return _segmentation(self._request("/v1/segment", volume, fields, on_event, cancel), volume)


class RemoteReporter(RemoteModel):
    """A report/VQA model resident on a ``voxtext serve --vlm`` server, used like a local
    :class:`voxtext.report.Reporter`.

    >>> RemoteReporter("http://127.0.0.1:8000", token="...").report("ct.nii.gz", greedy=True)  # doctest: +SKIP
    """

    def report(
        self,
        volume: Volume | str | Path | np.ndarray,
        stream: Callable[[str], None] | None = None,
        greedy: bool = False,
        max_new_tokens: int | None = None,
    ) -> str:
        """A findings report; ``stream`` receives the text piece by piece as the server generates it."""
        fields = {"greedy": greedy, "max_new_tokens": max_new_tokens}
        return self._generate("/v1/report", volume, fields, stream)["text"]

    def ask(
        self,
        volume: Volume | str | Path | np.ndarray,
        question: str,
        choices: Sequence[str] | None = None,
        *,
        stream: Callable[[str], None] | None = None,
        greedy: bool = False,
        max_new_tokens: int | None = None,
        score: bool = False,
    ) -> Answer:
        """Answer ``question``; with ``choices`` the server parses the answer strictly into one of them
        (``score``: ranks them by likelihood, see :meth:`voxtext.report.Reporter.ask`)."""
        fields = {"question": question, "choices": list(choices) if choices else None, "greedy": greedy,
                  "max_new_tokens": max_new_tokens, "score": score}
        result = self._generate("/v1/ask", volume, fields, stream)
        return Answer(result["text"], tuple(result["choices"]), result["index"], tuple(result["scores"]))

    def _generate(self, path: str, volume: Volume | str | Path | np.ndarray, fields: dict[str, object],
                  stream: Callable[[str], None] | None) -> dict[str, Any]:
        def on_event(event: dict[str, Any]) -> None:
            if event["event"] == "token" and stream is not None:
                stream(event["text"])

        return self._request(path, as_volume(volume), fields, on_event)


class RemoteFindingsRanker(RemoteModel):
    """A zero-shot findings model resident on a ``voxtext serve --findings`` server, used like a local
    :class:`voxtext.findings.FindingsRanker`; ``model`` None means the server's first findings model.

    >>> RemoteFindingsRanker("http://127.0.0.1:8000").rank("ct.nii.gz", ["pleural effusion"])  # doctest: +SKIP
    """

    def __init__(self, url: str, token: str | None = None, model: str | None = None, timeout: float = 3600.0) -> None:
        super().__init__(url, token, model or "", timeout)
        self._model = model

    def rank(self, volume: Volume | str | Path | np.ndarray,
             findings: str | Sequence[str] | None = None) -> list[Finding]:
        """The candidate ``findings`` (default: the server's list) by decreasing match probability."""
        texts = normalize_findings(findings) if findings is not None else []
        form = {k: v for k, v in {"model": self._model, "findings": texts}.items() if v}
        upload = {"volume": ("volume.nii.gz", encode_volume(as_volume(volume)), "application/gzip")}
        response = self._http.post("/v1/findings", data=form, files=upload)
        _raise_for_status(response)
        result = response.json()
        self.model_name = result["model"]
        return [Finding(f["text"], f["probability"], f["logit"]) for f in result["findings"]]


def _form_value(value: object) -> str | list[str]:
    if isinstance(value, list):
        return value
    return str(value).lower() if isinstance(value, bool) else str(value)


def _error(status: int, detail: object) -> VoxTextError:
    text = detail if isinstance(detail, str) else json.dumps(detail)
    return InputError(text) if status in (413, 422) else ServerError(f"server answered {status}: {text}", status)


def _raise_for_status(response: httpx.Response) -> None:
    if response.is_success:
        return
    response.read()
    try:
        detail = response.json().get("detail", response.text)
    except ValueError:
        detail = response.text
    if response.status_code == 503:
        retry = float(response.headers.get("Retry-After", "1"))
        raise ServerError(f"server busy: {detail}", 503, retry)
    if response.status_code == 401:
        raise ServerError("the server refused the token (401): pass the server's token", 401)
    raise _error(response.status_code, detail)


def _segmentation(result: dict, volume: Volume) -> Segmentation:
    """The result's label map as masks on ``volume``'s grid (checked against the returned geometry)."""
    image = nib.Nifti1Image.from_bytes(gzip.decompress(base64.b64decode(result["labelmap"])))
    labels = np.asarray(image.dataobj)
    if labels.shape[:3] != volume.shape or not np.allclose(image.affine, volume.affine, rtol=1e-5, atol=1e-4):
        raise ServerError(f"the server's label map grid {labels.shape[:3]} does not match the volume's", 502)
    segments = result["segments"]
    masks = masks_from_layers(labels, [s["layer"] for s in segments])
    within = {s["prompt"]: s["lesion_stage_within"] for s in segments if s.get("lesion_stage_within")}
    cautions = {s["prompt"]: s["caution"] for s in segments if s.get("caution")}
    refined = [s["prompt"] for s in segments if s.get("refined")]
    return Segmentation(masks, [s["prompt"] for s in segments], volume.affine, model=result["model"],
                        lesion_stage=within, cautions=cautions, refined=refined)
