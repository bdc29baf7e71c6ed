"""The inference server over real HTTP: a uvicorn server on a free loopback port, the embedded default models
and a small DCFormer_SigLIP built here in the published layout (no default findings model ships)."""

from __future__ import annotations

import base64
import gzip
import json
import shutil
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import nibabel as nib
import numpy as np
import pytest
import schemathesis
import torch
from hypothesis import HealthCheck, settings
from safetensors.torch import save_file
from schemathesis.checks import not_a_server_error

from voxtext.api import Segmenter
from voxtext.checkpoints import PACKAGE_WEIGHTS
from voxtext.cli import main
from voxtext.errors import Cancelled
from voxtext.findings import DEFAULT_FINDINGS, FindingsRanker, format_ranking
from voxtext.models.dcformer import med3dvlm_config
from voxtext.models.siglip import DCFormerSigLIP, SigLIPConfig, rank_findings
from voxtext.phantom import generate_phantom
from voxtext.report import Reporter
from voxtext.server.app import ServerConfig, build_app, create_app, running
from voxtext.server.client import RemoteFindingsRanker, RemoteReporter, RemoteSegmenter, ServerError
from voxtext.server.codec import encode_volume, masks_from_layers
from voxtext.server.workers import ModelSlot
from voxtext.volume import Volume

TOKEN = "s3cret-token"


@pytest.fixture(scope="module")
def segmenter() -> Segmenter:
    return Segmenter("default", device="cpu")


@contextmanager
def serve(model: Segmenter | Reporter | FindingsRanker, concurrency: int = 1, max_queue: int = 4,
          kind: str = "segmentation", name: str = "default", **config) -> Iterator[str]:
    """A real uvicorn server on a free loopback port serving ``model`` as a ``kind`` slot; yields its URL."""
    slot = ModelSlot(name, kind, model, concurrency, max_queue)
    with running(create_app(ServerConfig(**config), {name: slot})) as url:
        yield url


def load(url: str, index: int = 0) -> dict:
    return httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {TOKEN}"}).json()["loaded"][index]


def load_all(url: str) -> list[dict]:
    return httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {TOKEN}"}).json()["loaded"]


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
    """A phantom in a 77 x 77 x 51 cm field of view (over a hundred windows on the default model's 5 mm grid)."""
    case = generate_phantom(3, shape=(96, 96, 64), spacing=(8.0, 8.0, 8.0))
    return Volume(case.image, case.affine)


# With these, accurate segmentation of long_volume() takes about 12 s on 2 CPU cores (one prompt: 2 s).
LONG_PROMPTS = ["liver", "spleen", "stomach", "pancreas", "left kidney", "right kidney", "aorta",
                "inferior vena cava", "vertebrae", "urinary bladder"]


def test_round_trip_equals_in_process(segmenter: Segmenter, tmp_path) -> None:
    case = generate_phantom(5, shape=(36, 36, 24), spacing=(4.0, 4.0, 4.0))  # the central 14 cm: one window
    path = tmp_path / "ct.nii.gz"
    Volume(case.image, case.affine).save(path)
    prompts = ["liver", "hepatic parenchyma"]  # two phrasings of one organ: overlapping masks, two label-map layers
    local = segmenter.segment(path, prompts, quality="fast")
    assert (local.masks.sum(0) > 1).any()  # overlapping masks must survive the trip
    with serve(segmenter, token=TOKEN) as url, RemoteSegmenter(url, TOKEN) as remote:
        ticks: list[tuple[int, int]] = []
        result = remote.segment(path, prompts, quality="fast", progress=lambda d, t: ticks.append((d, t)))
        assert remote.models()["loaded"][0]["completed"] == 1
        # Learned on MR only: answered empty on this CT by default; the model's own answer when allowed.
        withheld, allowed = (remote.segment(path, ["brain tumor"], quality="fast", other_modalities=other)
                             for other in (False, True))
        out = tmp_path / "cli.nii.gz"
        assert main(["segment", str(path), "-p", "liver", "-o", str(out), "--quality", "fast", "-q",
                     "--server", url, "--token", TOKEN]) == 0
    np.testing.assert_array_equal(np.asarray(nib.load(out).dataobj), local.masks[0])
    assert result.prompts == local.prompts
    assert result.masks.shape == local.masks.shape and result.masks.any()
    np.testing.assert_array_equal(result.masks, local.masks)
    np.testing.assert_array_equal(result.affine, local.affine)
    assert result.volumes_ml() == local.volumes_ml()
    assert result.refined == local.refined == prompts  # CT (guessed from its values): refined by attenuation
    assert all(0 < d <= t for d, t in ticks)
    assert not withheld.masks.any() and "answered empty" in withheld.cautions["brain tumor"]
    local_allowed = segmenter.segment(path, ["brain tumor"], quality="fast", other_modalities=True)
    np.testing.assert_array_equal(allowed.masks, local_allowed.masks)
    assert allowed.cautions == local_allowed.cautions and "unvalidated" in allowed.cautions["brain tumor"]


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
        no_findings = httpx.post(f"{url}/v1/findings", headers=auth, files={"volume": upload})
        assert no_findings.status_code == 404
        assert "voxtext serve --findings dcformer-siglip" in no_findings.json()["detail"]


def test_full_queue_503_and_disconnect_frees_the_slot(segmenter: Segmenter) -> None:
    auth = {"Authorization": f"Bearer {TOKEN}"}
    form = {"prompts": LONG_PROMPTS, "quality": "accurate"}
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
            first = pool.submit(remote.segment, long_volume(), LONG_PROMPTS, cancel=cancel)
            wait_for(url, lambda s: s["running"] == 1, 30)
            busy = httpx.post(f"{url}/v1/segment", headers=auth, data={"prompts": ["liver"], "quality": "fast"},
                              files={"volume": encode_volume(tiny(1))})
            assert busy.status_code == 503 and int(busy.headers["Retry-After"]) >= 1
            cancel.set()
            with pytest.raises(Cancelled):
                first.result(30)
        wait_for(url, lambda s: s["running"] == 0 and s["cancelled"] == 2, 15)
        assert RemoteSegmenter(url, TOKEN).segment(tiny(1), "liver", quality="fast").masks.shape == (1, 16, 16, 16)


def make_tiny_siglip(folder: Path) -> Path:
    """A randomly initialised DCFormer_SigLIP in the published layout: the reference's ``config.json``
    (``model_type: dec_clip``; our ``vision_variant`` and a small ``input_size``), ``model.safetensors``, the
    tokenizer files, and ``text_encoder/config.json`` (a one-layer DistilBERT) as ``language_model_name_or_path``."""
    from transformers import BertTokenizerFast, DistilBertConfig

    words = sorted({w for text in DEFAULT_FINDINGS for w in text.split()} | {"liver", "lesion", "normal"})
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words, *letters, *(f"##{c}" for c in letters)]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(str(folder / "vocab.txt")).save_pretrained(folder)
    text = DistilBertConfig(vocab_size=len(vocab), dim=32, n_layers=1, n_heads=2, hidden_dim=64,
                            max_position_embeddings=64)
    text.save_pretrained(folder / "text_encoder")
    config = SigLIPConfig(hidden_size=16, bias=-1.0, language_model_name_or_path="text_encoder")
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["DEC_CLIP"], "model_type": "dec_clip", "loss_type": "sigmoid", "vision_encoder": "dcformer",
        "hidden_size": config.hidden_size, "t_prime": config.t_prime, "bias": config.bias,
        "language_model_name_or_path": config.language_model_name_or_path, "input_size": [32, 32, 32],
        "vision_variant": "nano"}, indent=2))
    torch.manual_seed(0)
    model = DCFormerSigLIP(config, text, med3dvlm_config("nano"))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "model.safetensors")
    return folder


@pytest.fixture(scope="module")
def siglip_folder(tmp_path_factory) -> Path:
    return make_tiny_siglip(tmp_path_factory.mktemp("siglip") / "tiny-siglip")


@pytest.fixture(scope="module")
def ranker(siglip_folder: Path) -> FindingsRanker:
    return FindingsRanker(siglip_folder, device="cpu")


def small(seed: int) -> Volume:
    """The central 48 mm of a phantom at 4 mm: one model window, the cheapest real job."""
    case = generate_phantom(seed, shape=(12, 12, 12), spacing=(4.0, 4.0, 4.0))
    return Volume(case.image, case.affine, "CT")


def test_findings_equal_in_process(ranker: FindingsRanker, siglip_folder: Path, tmp_path, capsys) -> None:
    case = generate_phantom(7, shape=(24, 24, 24), spacing=(6.0, 6.0, 6.0))
    path = tmp_path / "ct.nii.gz"
    Volume(case.image, case.affine).save(path)
    texts = ["liver lesion", "kidney stone", "pleural effusion", "no acute abnormality"]
    local = ranker.rank(path, texts)
    assert sorted(f.text for f in local) == sorted(texts) and len({f.probability for f in local}) == len(texts)
    assert [f.probability for f in local] == sorted((f.probability for f in local), reverse=True)
    reference = rank_findings(ranker.model, ranker.tokenizer, ranker.prepare(path), texts)  # the model's own
    assert [f.text for f in local] == [text for text, _ in reference]
    np.testing.assert_allclose([f.probability for f in local], [p for _, p in reference], rtol=1e-6)
    local_default = ranker.rank(path)
    assert sorted(f.text for f in local_default) == sorted(DEFAULT_FINDINGS)
    name = str(siglip_folder)
    with serve(ranker, kind="findings", name=name, token=TOKEN) as url, RemoteFindingsRanker(url, TOKEN) as remote:
        for remote_ranked, want in ((remote.rank(path, texts), local), (remote.rank(path), local_default)):
            assert [f.text for f in remote_ranked] == [f.text for f in want]
            np.testing.assert_allclose([(f.probability, f.logit) for f in remote_ranked],
                                       [(f.probability, f.logit) for f in want], rtol=1e-6, atol=1e-7)
        assert remote.model_name == name
        capsys.readouterr()
        assert main(["findings", str(path), "--findings", *texts, "--server", url, "--token", TOKEN]) == 0
        remote_table = capsys.readouterr().out

        auth = {"Authorization": f"Bearer {TOKEN}"}
        upload = {"volume": path.read_bytes()}
        for form, status, reason in (({"model": "dcformer-siglip"}, 404, "not loaded"),
                                     ({"findings": [f"finding {i}" for i in range(65)]}, 422, "findings"),
                                     ({"findings": ["kidney stone", "   "]}, 422, "empty finding")):
            response = httpx.post(f"{url}/v1/findings", headers=auth, data=form, files=upload)
            assert response.status_code == status and reason in json.dumps(response.json()), response.text
        malformed = httpx.post(f"{url}/v1/findings", headers=auth, files={"volume": b"not a volume" * 40})
        assert malformed.status_code == 422 and "not a NIfTI or NRRD" in malformed.json()["detail"]
        refused = httpx.post(f"{url}/v1/findings", headers={"Authorization": "Bearer wrong"}, files=upload)
        assert refused.status_code == 401
        models = remote.models()
        assert models["loaded"][0]["kind"] == "findings" and models["loaded"][0]["completed"] == 3
        assert {"name": "dcformer-siglip", "kind": "findings"}.items() <= next(
            m for m in models["known"] if m["name"] == "dcformer-siglip").items()
        assert "/v1/findings" in httpx.get(f"{url}/openapi.json").json()["paths"]
    assert main(["findings", str(path), "--findings", *texts, "--model", name, "--device", "cpu"]) == 0
    assert capsys.readouterr().out == remote_table == format_ranking(local) + "\n"
    assert main(["models"]) == 0
    assert "dcformer-siglip" in capsys.readouterr().out.split("zero-shot findings")[1]
    served = build_app(ServerConfig(), [], "cpu", vlms=[], findings=[name]).state.slots  # voxtext serve --findings
    assert [(slot.kind, slot.name) for slot in served.values()] == [("findings", name)]


@pytest.fixture(scope="module")
def long_reporter(tmp_path_factory) -> Reporter:
    """The embedded VLM whose generation_config.json asks for at least 2000 new tokens: a report of minutes."""
    folder = tmp_path_factory.mktemp("vlm") / "long"
    shutil.copytree(PACKAGE_WEIGHTS / "vlm-default", folder)
    path = folder / "generation_config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | {"min_new_tokens": 2000, "max_new_tokens": 2000}))
    return Reporter(folder, device="cpu")


def first_tokens(url: str, count: int, **form) -> tuple[list[dict], float]:
    """Stream a report, read its first ``count`` events and drop the connection; (events, seconds to read them)."""
    t0 = time.monotonic()
    with httpx.Client(timeout=60) as client, client.stream(
            "POST", f"{url}/v1/report", params={"stream": "true"}, headers={"Authorization": f"Bearer {TOKEN}"},
            data=form, files={"volume": encode_volume(small(0))}) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        events = [json.loads(next(lines)) for _ in range(count)]
        seconds = time.monotonic() - t0
        assert load(url)["running"] == 1
        busy = httpx.post(f"{url}/v1/report", headers={"Authorization": f"Bearer {TOKEN}"},
                          files={"volume": encode_volume(small(1))})
        assert busy.status_code == 503 and int(busy.headers["Retry-After"]) >= 1
    return events, seconds  # leaving the blocks closed the connection mid-generation


def test_disconnect_mid_report_frees_the_slot(long_reporter: Reporter) -> None:
    with serve(long_reporter, kind="report", concurrency=1, max_queue=0, token=TOKEN) as url:
        events, _ = first_tokens(url, 3, max_new_tokens="2000")
        closed = time.monotonic()
        assert [e["event"] for e in events] == ["token"] * 3
        status = wait_for(url, lambda s: s["running"] == 0 and s["cancelled"] == 1, 10)
        freed = time.monotonic() - closed
        assert (status["completed"], status["queued"], status["failed"]) == (0, 0, 0)
        # The slot is free: the next report starts at once, far sooner than the 2000 tokens of the first one.
        events, seconds = first_tokens(url, 1, max_new_tokens="2000")
        assert events[0]["event"] == "token"
        status = wait_for(url, lambda s: s["running"] == 0 and s["cancelled"] == 2, 10)
        assert status["completed"] == 0 and status["rejected"] == 2
    print(f"slot free {freed:.2f} s after the disconnect; the next report's first token after {seconds:.2f} s")
    assert freed < 5 and seconds < 15, (freed, seconds)


MIX = ("health", "segment", "models", "findings", "report", "health", "ask", "models", "findings", "health",
       "segment", "models", "findings", "report", "health", "ask", "models", "findings", "health", "models",
       "health", "models", "health", "models", "health")  # 25 requests per client, every kind in every client
QUESTION, CHOICES, FINDINGS = "Is there a kidney stone?", ["yes", "no"], ["liver lesion", "kidney stone", "ascites"]
SLOT_OF = {"segment": "segmentation", "report": "report", "ask": "report", "findings": "findings"}


def test_200_mixed_requests_from_8_clients_all_accounted_for(segmenter: Segmenter, reporter: Reporter,
                                                             ranker: FindingsRanker) -> None:
    volumes = [small(0), small(1)]
    uploads = [encode_volume(v) for v in volumes]
    expected = [{"segment": segmenter.segment(v, "liver", quality="fast").masks,
                 "report": reporter.report(v, greedy=True, max_new_tokens=6),
                 "ask": reporter.ask(v, QUESTION, CHOICES, greedy=True, max_new_tokens=4).text,
                 "findings": ranker.rank(v, FINDINGS)} for v in volumes]
    assert not np.array_equal(expected[0]["segment"], expected[1]["segment"])  # a mix-up would show
    slots = {"segmentation": ModelSlot("default", "segmentation", segmenter, 1, 1),
             "report": ModelSlot("default", "report", reporter, 1, 1),
             "findings": ModelSlot("tiny-siglip", "findings", ranker, 1, 1)}
    auth = {"Authorization": f"Bearer {TOKEN}"}

    def call(http: httpx.Client, kind: str, v: int) -> tuple[int, object]:
        """One request: (status, what it answered: the checked content, or the 503's Retry-After)."""
        files = {"volume": uploads[v]}
        if kind in ("health", "models"):
            response = http.get("/health" if kind == "health" else "/v1/models")
            return response.status_code, response.json()
        if kind == "report":  # streamed: token events, then the result
            with http.stream("POST", "/v1/report", params={"stream": "true"}, data={"greedy": "true",
                             "max_new_tokens": "6"}, files=files) as response:
                if response.status_code != 200:
                    response.read()
                    return response.status_code, response.headers.get("Retry-After")
                events = [json.loads(line) for line in response.iter_lines()]
            assert {e["event"] for e in events[:-1]} <= {"token"} and events[-1]["event"] == "result", events
            return 200, events[-1]["result"]["text"]
        path, form = {"segment": ("/v1/segment", {"prompts": ["liver"], "quality": "fast", "modality": "CT"}),
                      "ask": ("/v1/ask", {"question": QUESTION, "choices": CHOICES, "greedy": "true",
                                          "max_new_tokens": "4"}),
                      "findings": ("/v1/findings", {"findings": FINDINGS})}[kind]
        response = http.post(path, data=form, files=files)
        if response.status_code != 200:
            return response.status_code, response.headers.get("Retry-After")
        body = response.json()
        if kind == "segment":
            labels = np.asarray(nib.Nifti1Image.from_bytes(gzip.decompress(base64.b64decode(body["labelmap"]))).dataobj)
            return 200, masks_from_layers(labels, [s["layer"] for s in body["segments"]])
        return 200, body["text"] if kind == "ask" else [(f["text"], f["probability"]) for f in body["findings"]]

    with running(create_app(ServerConfig(token=TOKEN), slots)) as url:
        def client(c: int) -> list[tuple[int, str, int, int, object]]:
            with httpx.Client(base_url=url, headers=auth, timeout=120) as http:
                return [(c * len(MIX) + j, kind, v, *call(http, kind, v))
                        for j in range(len(MIX)) for kind, v in [(MIX[(j + 3 * c) % len(MIX)], (c + j) % 2)]]

        t0 = time.monotonic()
        with ThreadPoolExecutor(8) as pool:
            results = [r for rs in pool.map(client, range(8)) for r in rs]
        seconds = time.monotonic() - t0
        status = {s["kind"]: s for s in load_all(url)}
    assert sorted(r[0] for r in results) == list(range(200))  # every request answered, none twice
    outcomes = {(kind, code) for _, kind, _, code, _ in results}
    assert {code for _, code in outcomes} <= {200, 503}, outcomes  # no 5xx but the documented back-pressure
    assert {kind for kind, code in outcomes if code == 200} == set(SLOT_OF) | {"health", "models"}
    for _, kind, v, code, answer in results:
        if code == 503:
            assert kind in SLOT_OF and int(answer) >= 1  # Retry-After
        elif kind == "health":
            assert answer["status"] == "ok"
        elif kind == "models":
            assert sorted(s["kind"] for s in answer["loaded"]) == ["findings", "report", "segmentation"]
        elif kind == "segment":
            np.testing.assert_array_equal(answer, expected[v]["segment"])
        elif kind == "findings":
            want = expected[v]["findings"]
            assert [t for t, _ in answer] == [f.text for f in want]
            np.testing.assert_allclose([p for _, p in answer], [f.probability for f in want], rtol=1e-6)
        else:
            assert answer == expected[v][kind]
    for slot, state in status.items():  # the server's own accounts agree with the clients'
        codes = [code for _, kind, _, code, _ in results if SLOT_OF.get(kind) == slot]
        assert (state["completed"], state["rejected"]) == (codes.count(200), codes.count(503)), (slot, state)
        assert (state["failed"], state["cancelled"], state["running"], state["queued"]) == (0, 0, 0, 0), state
    print(f"200 requests from 8 clients in {seconds:.1f} s: "
          + ", ".join(f"{k} {s['completed']} done/{s['rejected']} refused" for k, s in status.items()))
    assert seconds < 60


def test_non_loopback_bind_needs_a_token(monkeypatch, capsys) -> None:
    monkeypatch.delenv("VOXTEXT_TOKEN", raising=False)
    assert main(["serve", "--host", "0.0.0.0", "--port", "1"]) == 2
    assert "without a token" in capsys.readouterr().err


@pytest.fixture(scope="module")
def api_schema(segmenter: Segmenter, reporter: Reporter, ranker: FindingsRanker) -> Iterator[schemathesis.BaseSchema]:
    slots = {"segment": ModelSlot("default", "segmentation", segmenter),
             "report": ModelSlot("default", "report", reporter),
             "findings": ModelSlot("tiny-siglip", "findings", ranker)}
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
        assert remote.ask(path, question, choices, score=True) == reporter.ask(path, question, choices, score=True)
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
