"""The inference server over real HTTP: a uvicorn server on a free loopback port, the embedded default model."""

from __future__ import annotations

import gzip
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import httpx
import nibabel as nib
import numpy as np
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error

from voxtext.api import Segmenter
from voxtext.cli import main
from voxtext.errors import Cancelled
from voxtext.phantom import generate_phantom
from voxtext.report import Reporter
from voxtext.server.app import ServerConfig, create_app, running
from voxtext.server.client import RemoteReporter, RemoteSegmenter, ServerError
from voxtext.server.codec import encode_volume
from voxtext.server.workers import ModelSlot
from voxtext.volume import Volume

TOKEN = "s3cret-token"


@pytest.fixture(scope="module")
def segmenter() -> Segmenter:
    return Segmenter("default", device="cpu")


@contextmanager
def serve(model: Segmenter | Reporter, concurrency: int = 1, max_queue: int = 4, kind: str = "segmentation",
          **config) -> Iterator[str]:
    """A real uvicorn server on a free loopback port serving ``model`` as a ``kind`` slot; yields its URL."""
    slot = ModelSlot("default", kind, model, concurrency, max_queue)
    with running(create_app(ServerConfig(**config), {"default": slot})) as url:
        yield url


def load(url: str) -> dict:
    return httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {TOKEN}"}).json()["loaded"][0]


def wait_for(url: str, condition, seconds: float) -> dict:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        status = load(url)
        if condition(status):
            return status
        time.sleep(0.1)
    raise AssertionError(f"not reached within {seconds} s: {status}")


def tiny(seed: int) -> Volume:
    """The central 128 mm of a phantom at 8 mm (one model window): a fast job."""
    case = generate_phantom(seed, shape=(16, 16, 16), spacing=(8.0, 8.0, 8.0))
    return Volume(case.image, case.affine, "CT")


def long_volume() -> Volume:
    """A phantom whose accurate segmentation takes tens of windows (a minute on 2 CPU cores)."""
    case = generate_phantom(3, shape=(96, 96, 64))
    return Volume(case.image, case.affine)


def test_round_trip_equals_in_process(segmenter: Segmenter, tmp_path) -> None:
    case = generate_phantom(5, shape=(36, 36, 24), spacing=(4.0, 4.0, 4.0))  # the central 14 cm: one window
    path = tmp_path / "ct.nii.gz"
    Volume(case.image, case.affine).save(path)
    prompts = ["liver", "spleen"]  # their masks overlap here: two label-map layers
    local = segmenter.segment(path, prompts, quality="fast")
    assert (local.masks.sum(0) > 1).any()  # overlapping masks must survive the trip
    with serve(segmenter, token=TOKEN) as url, RemoteSegmenter(url, TOKEN) as remote:
        ticks: list[tuple[int, int]] = []
        result = remote.segment(path, prompts, quality="fast", progress=lambda d, t: ticks.append((d, t)))
        assert remote.models()["loaded"][0]["completed"] == 1
        out = tmp_path / "cli.nii.gz"
        assert main(["segment", str(path), "-p", "liver", "-o", str(out), "--quality", "fast", "-q",
                     "--server", url, "--token", TOKEN]) == 0
    np.testing.assert_array_equal(np.asarray(nib.load(out).dataobj), local.masks[0])
    assert result.prompts == local.prompts
    assert result.masks.shape == local.masks.shape and result.masks.any()
    np.testing.assert_array_equal(result.masks, local.masks)
    np.testing.assert_array_equal(result.affine, local.affine)
    assert result.volumes_ml() == local.volumes_ml()
    assert all(0 < d <= t for d, t in ticks)


def test_auth_size_and_malformed_volume(segmenter: Segmenter) -> None:
    upload = encode_volume(tiny(0))
    form = {"prompts": ["liver"], "quality": "fast"}
    with serve(segmenter, token=TOKEN, max_body_mb=0.05) as url:
        assert httpx.get(f"{url}/health").status_code == 200
        assert "/v1/segment" in httpx.get(f"{url}/openapi.json").json()["paths"]
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
            response = httpx.post(f"{url}/v1/segment", headers=headers, data=form, files={"volume": upload})
            assert response.status_code == 401 and response.headers["WWW-Authenticate"] == "Bearer"
        auth = {"Authorization": f"Bearer {TOKEN}"}
        big = httpx.post(f"{url}/v1/segment", headers=auth, data=form, files={"volume": b"\0" * 100_000})
        assert big.status_code == 413

        def chunks() -> Iterator[bytes]:  # no Content-Length: the limit is counted while reading
            yield b'--b\r\nContent-Disposition: form-data; name="volume"; filename="v"\r\n\r\n'
            yield from (b"x" * 10_000 for _ in range(10))

        multipart = {**auth, "Content-Type": "multipart/form-data; boundary=b"}
        assert httpx.post(f"{url}/v1/segment", headers=multipart, content=chunks()).status_code == 413
        for body, reason in ((b"not a volume at all" * 30, "not a NIfTI or NRRD"),
                             (gzip.compress(b"\0" * 400), "not a NIfTI or NRRD"),
                             (b"NRRD0004\ntype: short\ndimension: 3\nsizes: 2 2 2\ndata file: /etc/passwd\n"
                              b"encoding: raw\n\n", "detached NRRD"),
                             (upload[: len(upload) // 2], "corrupt")):
            response = httpx.post(f"{url}/v1/segment", headers=auth, data=form, files={"volume": body})
            assert response.status_code == 422 and reason in response.json()["detail"], response.text
        bad_option = httpx.post(f"{url}/v1/segment", headers=auth, data={**form, "threshold": "2"},
                                files={"volume": upload})
        assert bad_option.status_code == 422
        with pytest.raises(ServerError) as refused:
            RemoteSegmenter(url, "wrong").segment(tiny(0), "liver", quality="fast")
        assert refused.value.status == 401
        with pytest.raises(ServerError, match="not loaded") as missing:
            RemoteSegmenter(url, TOKEN, model="esica").segment(tiny(0), "liver", quality="fast")
        assert missing.value.status == 404


def test_full_queue_503_and_disconnect_frees_the_slot(segmenter: Segmenter) -> None:
    auth = {"Authorization": f"Bearer {TOKEN}"}
    form = {"prompts": ["liver"], "quality": "accurate"}
    with serve(segmenter, concurrency=1, max_queue=0, token=TOKEN) as url:
        # A plain (non-streaming) request whose client gives up after 2 s: the server must notice and cancel.
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}/v1/segment", headers=auth, data=form, files={"volume": encode_volume(long_volume())}, timeout=2.0)
        status = wait_for(url, lambda s: s["running"] == 0 and s["cancelled"] == 1, 15)
        assert status["completed"] == 0 and status["queued"] == 0

        # A streaming job holds the only place: the next request gets 503 + Retry-After, then cancel frees it.
        cancel = threading.Event()
        remote = RemoteSegmenter(url, TOKEN)
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(remote.segment, long_volume(), "liver", cancel=cancel)
            wait_for(url, lambda s: s["running"] == 1, 30)
            busy = httpx.post(f"{url}/v1/segment", headers=auth, data={**form, "quality": "fast"},
                              files={"volume": encode_volume(tiny(1))})
            assert busy.status_code == 503 and int(busy.headers["Retry-After"]) >= 1
            cancel.set()
            with pytest.raises(Cancelled):
                first.result(30)
        wait_for(url, lambda s: s["running"] == 0 and s["cancelled"] == 2, 15)
        assert RemoteSegmenter(url, TOKEN).segment(tiny(1), "liver", quality="fast").masks.shape == (1, 16, 16, 16)


def test_concurrent_mixed_requests_all_accounted_for(segmenter: Segmenter) -> None:
    kinds = [(tiny(0), ["liver"], "fast"), (tiny(1), ["aorta"], "accurate"), (tiny(2), ["liver"], "fast")]
    jobs = [kinds[i % 3] for i in range(12)]  # client c sends jobs c, c+4, c+8: every client mixes all three
    expected = [segmenter.segment(v, p, quality=q).masks for v, p, q in kinds]
    assert all(m.any() for m in expected)
    with serve(segmenter, concurrency=2, max_queue=2, token=TOKEN) as url:
        clients = [RemoteSegmenter(url, TOKEN) for _ in range(4)]

        def run(client: int) -> list[tuple[int, np.ndarray]]:
            return [(i, clients[client].segment(*jobs[i][:2], quality=jobs[i][2]).masks)
                    for i in range(client, len(jobs), 4)]

        with ThreadPoolExecutor(4) as pool:
            results = [r for rs in pool.map(run, range(4)) for r in rs]
        status = load(url)
    assert sorted(i for i, _ in results) == list(range(12))
    for i, masks in results:
        np.testing.assert_array_equal(masks, expected[i % 3])
    assert (status["completed"], status["failed"], status["cancelled"], status["running"]) == (12, 0, 0, 0)


def test_non_loopback_bind_needs_a_token(monkeypatch, capsys) -> None:
    monkeypatch.delenv("VOXTEXT_TOKEN", raising=False)
    assert main(["serve", "--host", "0.0.0.0", "--port", "1"]) == 2
    assert "without a token" in capsys.readouterr().err


@pytest.fixture(scope="module")
def api_schema(segmenter: Segmenter, reporter: Reporter) -> Iterator[schemathesis.BaseSchema]:
    slots = {"segment": ModelSlot("default", "segmentation", segmenter),
             "report": ModelSlot("default", "report", reporter)}
    with running(create_app(ServerConfig(token=TOKEN, max_body_mb=1), slots)) as url:
        yield schemathesis.openapi.from_url(f"{url}/openapi.json")


fuzz = schemathesis.pytest.from_fixture("api_schema")


@fuzz.parametrize()
@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
def test_schema_fuzz_never_5xx(case: schemathesis.Case) -> None:
    case.call_and_validate(headers={"Authorization": f"Bearer {TOKEN}"}, checks=[not_a_server_error])


@pytest.fixture(scope="module")
def reporter() -> Reporter:
    return Reporter("default", device="cpu")


def test_report_and_ask_equal_in_process(reporter: Reporter, tmp_path, capsys) -> None:
    case = generate_phantom(11, shape=(64, 64, 64))
    path = tmp_path / "ct.nii.gz"
    Volume(case.image, case.affine).save(path)
    question, choices = "Is there a kidney stone?", ["yes", "no"]
    local_report = reporter.report(path, greedy=True)
    local_answer = reporter.ask(path, question, choices, greedy=True)
    with serve(reporter, kind="report", token=TOKEN) as url, RemoteReporter(url, TOKEN) as remote:
        pieces: list[str] = []
        assert remote.report(path, stream=pieces.append, greedy=True) == local_report
        assert len(pieces) > 5 and "".join(pieces).strip() == local_report
        assert remote.ask(path, question, choices, greedy=True) == local_answer
        auth = {"Authorization": f"Bearer {TOKEN}"}
        upload = {"volume": path.read_bytes()}
        plain = httpx.post(f"{url}/v1/report", headers=auth, data={"greedy": "true"}, files=upload)
        assert plain.status_code == 200 and plain.json()["text"] == local_report
        open_answer = httpx.post(f"{url}/v1/ask", headers=auth, data={"question": question}, files=upload).json()
        assert open_answer["choices"] == [] and open_answer["index"] is None
        malformed = httpx.post(f"{url}/v1/ask", headers=auth, data={"question": question},
                               files={"volume": b"not a volume" * 40})
        assert malformed.status_code == 422 and "not a NIfTI or NRRD" in malformed.json()["detail"]
        assert remote.models()["loaded"][0]["kind"] == "report"
        capsys.readouterr()
        assert main(["report", str(path), "--greedy", "--server", url, "--token", TOKEN]) == 0
        assert capsys.readouterr().out.strip() == local_report


def test_report_server_auth_and_schema(reporter: Reporter) -> None:
    with serve(reporter, kind="report", token=TOKEN) as url:
        paths = httpx.get(f"{url}/openapi.json").json()["paths"]
        assert {"/v1/report", "/v1/ask"} <= set(paths) and "application/x-ndjson" in \
            paths["/v1/report"]["post"]["responses"]["200"]["content"]
        for endpoint in ("/v1/report", "/v1/ask"):
            response = httpx.post(f"{url}{endpoint}", headers={"Authorization": "Bearer wrong"},
                                  data={"question": "Any lesion?"}, files={"volume": encode_volume(tiny(0))})
            assert response.status_code == 401
        with pytest.raises(ServerError) as refused:
            RemoteReporter(url, "wrong").ask(tiny(0), "Any lesion?", ["yes", "no"])
        assert refused.value.status == 401
        with pytest.raises(ServerError, match="not loaded") as missing:
            RemoteReporter(url, TOKEN, model="med3dvlm").report(tiny(0))
        assert missing.value.status == 404
