"""``voxtext web``: the session glue on real MRML, the access rules, and the whole app in headless Chromium.

The end-to-end test starts ``voxtext web`` on loopback (with a token), opens it in Debian's chromium driven
by Playwright, segments two prompts with the embedded default model, checks the legend and the segment
colour in the rendered axial view, and writes a report. Screenshots go to ``VOXTEXT_TEST_ARTIFACTS``
(default ``Testing/artifacts/web``).
"""

from __future__ import annotations

import asyncio
import colorsys
import io
import json
import os
import queue
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
DICOM_CASE = REPO.parent / "shared" / "data" / "real_ct_mr_io" / "dicom_case" / "example_ct_dicom"
ARTIFACTS = Path(os.environ.get("VOXTEXT_TEST_ARTIFACTS", REPO / "Testing" / "artifacts" / "web"))
CHROMIUM = os.environ.get("VOXTEXT_CHROMIUM", shutil.which("chromium") or "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]

slicer = pytest.importorskip("slicer")
pytest.importorskip("trame_slicer")


# --- the session: loading, legend, display, downloads on real MRML ----------------------------------------

@pytest.fixture()
def session():
    from trame_slicer.core import SlicerApp

    from voxtext.web.session import WebSession

    web_session = WebSession(SlicerApp())
    yield web_session
    web_session.close()


def _boxes(shape) -> np.ndarray:
    masks = np.zeros((2, *shape), bool)
    masks[0, 100:220, 150:300, 3:9] = True
    masks[1, 300:350, 300:360, 10:15] = True
    return masks


def _add_segments(session, masks, prompts=("liver", "left kidney"), lesion_stage=None, cautions=None):
    from TextSegLib.core import volume_arrays

    from voxtext.segmentation import Segmentation

    _, affine = volume_arrays(session.volume_node)
    result = session.seg_core.apply(Segmentation(masks, list(prompts), affine, lesion_stage=lesion_stage or {},
                                                 cautions=cautions or {}), session.volume_node)
    session.segmentation_node = result.segmentation_node
    return affine


@pytest.mark.skipif(not DICOM_CASE.is_dir(), reason="needs ../shared/data/real_ct_mr_io")
def test_dicom_volume_legend_display_and_downloads(session, tmp_path):
    import highdicom as hd
    import nibabel as nib
    import slicerio

    session.load(DICOM_CASE)
    info = session.volume_info()
    assert info["dimensions"] == [512, 512, 20] and info["dicom"] and len(session.dicom_files) == 20
    assert session.default_window() == "CT abdomen" and session.window() == (400.0, 40.0)
    session.set_window("CT lung")
    assert session.window() == (1500.0, -600.0)

    masks = _boxes(info["dimensions"])
    affine = _add_segments(session, masks)
    legend = session.segments()
    assert [s["name"] for s in legend] == ["liver", "left kidney"]
    liver_rgb = session.seg_core.terminology.lookup("liver").color
    assert legend[0]["color"] == "#" + "".join(f"{round(c * 255):02x}" for c in liver_rgb)
    assert legend[1]["code"] == "Kidney, Left"
    voxel_ml = abs(np.linalg.det(affine[:3, :3])) / 1000
    assert legend[0]["ml"] == pytest.approx(masks[0].sum() * voxel_ml, abs=0.1)

    assert [(s["within"], s["caution"]) for s in legend] == [("", ""), ("", "")]

    names, on_grid, _ = session.masks()
    assert names == ["liver", "left kidney"] and np.array_equal(on_grid, masks)

    # NIfTI: labels on the volume's grid, label table beside it
    with zipfile.ZipFile(session.export_segmentation("zip")) as zf:
        zf.extractall(tmp_path / "nii")
    image = nib.load(next((tmp_path / "nii").glob("*.nii.gz")))
    labels = np.asarray(image.dataobj)
    assert np.allclose(image.affine, affine, atol=1e-4)
    assert np.array_equal(labels == 1, masks[0]) and np.array_equal(labels == 2, masks[1])
    assert json.loads(next((tmp_path / "nii").glob("*.json")).read_text())["labels"] == {"1": "liver",
                                                                                       "2": "left kidney"}
    # .seg.nrrd written by Slicer: names and terminology survive
    seg = slicerio.read_segmentation(str(session.export_segmentation("seg.nrrd")))
    by_name = {s["name"]: s for s in seg["segments"]}
    assert set(by_name) == {"liver", "left kidney"}
    entry = session.seg_core.terminology.lookup("left kidney").entry
    assert by_name["left kidney"]["terminology"] == slicerio.segmentation.terminology_entry_from_string(entry)
    assert "7771000" in entry

    # DICOM SEG: every segment voxel lands at the RAS position of the mask voxel
    dcm = hd.seg.segread(str(session.export_segmentation("dcm")))
    assert [dcm.get_segment_description(i).segment_label for i in (1, 2)] == ["liver", "left kidney"]
    assert dcm.get_segment_description(2).segmented_property_type.value == "64033007"
    for number, mask in ((1, masks[0]), (2, masks[1])):
        volume = dcm.get_volume(segment_numbers=[number], combine_segments=False)
        array = np.asarray(volume.array)[..., 0] > 0
        lps = volume.affine @ np.c_[np.argwhere(array), np.ones(array.sum())].T
        ras_written = np.sort((lps[:3].T * [-1, -1, 1]).round(1), axis=0)
        ras_mask = np.sort((affine @ np.c_[np.argwhere(mask), np.ones(mask.sum())].T)[:3].T.round(1), axis=0)
        assert np.allclose(ras_written, ras_mask, atol=0.05)

    # toggle, opacity, delete
    liver_id = legend[0]["id"]
    session.set_visible(liver_id, False)
    session.set_opacity(legend[1]["id"], 0.3)
    legend = session.segments()
    assert legend[0]["visible"] is False and legend[1]["opacity"] == pytest.approx(0.3)
    session.delete(liver_id)
    assert [s["name"] for s in session.segments()] == ["left kidney"]
    from voxtext.web.files import WebError

    with pytest.raises(WebError, match="no segment"):
        session.set_visible(liver_id, True)
    with pytest.raises(WebError, match="no report yet"):
        session.export_report("txt")


def test_nifti_input_refuses_dicom_seg_and_bad_uploads(session, tmp_path):
    import nibabel as nib

    from voxtext.web.files import WebError

    with pytest.raises(WebError, match="open a volume first"):
        session.start_segmentation("liver")
    array = np.full((40, 30, 10), -1000, np.int16)
    array[10:30, 5:25, 2:8] = 60
    affine = np.diag([1.5, 1.5, 4.0, 1.0])
    nib.save(nib.Nifti1Image(array, affine), tmp_path / "ct.nii.gz")
    session.load_files([tmp_path / "ct.nii.gz"], name="ct.nii.gz")
    assert session.volume_info()["name"] == "ct" and not session.volume_info()["dicom"]
    with pytest.raises(WebError, match="no segments"):
        session.export_segmentation("nii.gz")
    masks = np.zeros((1, 40, 30, 10), bool)
    masks[0, 10:30, 5:25, 2:8] = True
    _add_segments(session, masks, ["liver cyst"], {"liver cyst": ["liver"]}, {"liver cyst": "rarely found"})
    assert [(s["name"], s["within"], s["caution"]) for s in session.segments()] == [("liver cyst", "liver",
                                                                                    "rarely found")]
    with pytest.raises(WebError, match="DICOM SEG needs a DICOM series"):
        session.export_segmentation("dcm")
    with pytest.raises(Exception, match="at least one target"):
        session.start_segmentation(" , ")
    # a zip that escapes its folder is refused before anything is written outside it
    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as zf:
        zf.writestr("../../outside.dcm", b"x")
    with pytest.raises(WebError, match="outside its folder"):
        session.load_files([evil])
    assert not (session.workdir.parent / "outside.dcm").exists()
    with pytest.raises(WebError, match="no volume found"):
        session.load_files([_text_file(tmp_path)])
    assert session.volume_info()["name"] == "ct"  # a refused file leaves the open volume


def _text_file(folder: Path) -> Path:
    path = folder / "notes.txt"
    path.write_text("not an image")
    return path


# --- access rules -------------------------------------------------------------------------------------------

def test_non_loopback_without_token_is_refused(capsys, monkeypatch):
    from voxtext.web.app import main_web

    monkeypatch.delenv("VOXTEXT_TOKEN", raising=False)
    assert main_web(["--host", "0.0.0.0", "--port", "0"]) == 2
    assert "without a token" in capsys.readouterr().err


def test_guard_token_cookie_host_and_origin():
    from aiohttp import web
    from aiohttp.test_utils import TestClient, TestServer

    from voxtext.web.security import COOKIE, make_guard

    async def ok(request):
        return web.Response(text="ok")

    async def scenario(token):
        app = web.Application(middlewares=[make_guard(token)])
        app.router.add_get("/", ok)
        async with TestClient(TestServer(app, host="127.0.0.1")) as client:
            out = {"plain": (await client.get("/")).status,
                   "wrong": (await client.get("/?token=nope")).status,
                   "foreign_origin": (await client.get("/", headers={"Origin": "http://evil.example"})).status,
                   "foreign_host": (await client.get("/", headers={"Host": "evil.example"})).status}
            if token:
                first = await client.get(f"/?token={token}")
                out["with_token"] = first.status
                out["cookie"] = first.cookies.get(COOKIE) is not None
                out["by_cookie"] = (await client.get("/")).status  # the client keeps the cookie
                out["bearer"] = (await client.get("/", headers={"Authorization": f"Bearer {token}"})).status
            return out

    with_token = asyncio.run(scenario("s3cret"))
    assert with_token["plain"] == 401 and with_token["wrong"] == 401 and with_token["foreign_origin"] == 403
    assert with_token["with_token"] == 200 and with_token["cookie"] and with_token["by_cookie"] == 200
    assert with_token["bearer"] == 200
    no_token = asyncio.run(scenario(None))
    assert no_token["plain"] == 200 and no_token["foreign_host"] == 403 and no_token["foreign_origin"] == 403


# --- end to end in a real browser ----------------------------------------------------------------------------

def _chromium() -> str:
    if not Path(CHROMIUM).exists():
        message = f"Chromium not found at {CHROMIUM} (apt-get install chromium, or set VOXTEXT_CHROMIUM)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    pytest.importorskip("playwright")
    return CHROMIUM


class WebServer:
    """``voxtext web`` in a subprocess; its URL comes from the line it prints when ready."""

    def __init__(self, args: list[str], env: dict) -> None:
        self.process = subprocess.Popen([sys.executable, "-m", "voxtext", "web", *args], stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True, env=env, cwd=str(REPO))
        self.lines: queue.Queue[str] = queue.Queue()
        self.log: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.put(line)
            self.log.append(line)

    def url(self, timeout_s: float = 120.0) -> str:
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            try:
                line = self.lines.get(timeout=1.0)
            except queue.Empty:
                if self.process.poll() is not None:
                    break
                continue
            if "voxtext web: serving " in line:
                return line.split("serving ", 1)[1].strip()
        raise AssertionError("voxtext web did not start:\n" + "".join(self.log[-40:]))

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()


def _hue_saturation(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    hsv = np.array([colorsys.rgb_to_hsv(*(p / 255.0)) for p in rgb.reshape(-1, 3)])
    return hsv[:, 0] * 360.0, hsv[:, 1]


def _view_png(page, tag: str) -> np.ndarray:
    from PIL import Image

    view = page.locator(f".voxtext-view-{tag}").locator("xpath=..")
    return np.asarray(Image.open(io.BytesIO(view.screenshot())).convert("RGB")).astype(int)


def _wait_for_change(page, tag: str, before: np.ndarray, timeout_s: float = 20.0) -> np.ndarray:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        page.wait_for_timeout(500)
        now = _view_png(page, tag)
        if now.shape == before.shape and np.abs(now - before).sum(axis=2).max() > 60:
            page.wait_for_timeout(700)  # let the interactive frame be replaced by the final one
            return _view_png(page, tag)
    raise AssertionError(f"the {tag} view did not change")


def test_web_app_end_to_end_in_chromium(tmp_path):
    from playwright.sync_api import sync_playwright

    chromium = _chromium()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    case = tmp_path / "phantom"
    subprocess.run([sys.executable, "-m", "voxtext", "phantom", "--seed", "3", "--out", str(case),
                    "--shape", "128", "128", "24", "--spacing", "2.4", "2.4", "6"], check=True, cwd=str(REPO),
                   capture_output=True)
    token = "e2e-token"
    env = {**os.environ, "VOXTEXT_TOKEN": token}
    server = WebServer(["--port", "0", "--volume", str(case / "image.nii.gz")], env)
    try:
        url = server.url()
        base = url.split("?")[0]
        for bad in (base, base + "?token=wrong"):
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(bad, timeout=10)
            assert refused.value.code == 401
        with sync_playwright() as p:
            context = p.chromium.launch_persistent_context(
                str(tmp_path / "profile"), executable_path=chromium, headless=True, args=CHROMIUM_ARGS,
                viewport={"width": 1500, "height": 950})
            page = context.new_page()
            try:
                _drive(page, url, case / "image.nii.gz")
            except Exception:
                page.screenshot(path=str(ARTIFACTS / "failure.png"))
                raise
            finally:
                context.close()
    finally:
        server.stop()
        (ARTIFACTS / "server.log").write_text("".join(server.log))


def _drive(page, url: str, image: Path) -> None:
    page.goto(url)
    page.wait_for_selector("#volume-name:has-text('image')", timeout=60_000)
    axial_empty = _view_png(page, "Red")
    page.wait_for_timeout(1500)
    page.screenshot(path=str(ARTIFACTS / "01_opened.png"))

    # two prompts, one run; segments appear in the legend with their names and colours
    page.fill("#prompt", "liver, left kidney")
    page.click("#segment-button")
    page.wait_for_selector("#progress", timeout=30_000)
    page.screenshot(path=str(ARTIFACTS / "02_running.png"))
    page.wait_for_function("document.querySelectorAll('.legend-item').length == 2", timeout=300_000)
    names = page.locator(".legend-name").all_inner_texts()
    assert [n.strip() for n in names] == ["liver", "left kidney"]
    swatches = page.locator(".legend-swatch").evaluate_all("els => els.map(e => getComputedStyle(e).backgroundColor)")
    liver_rgb = np.array([int(c) for c in swatches[0].strip("rgb()").split(",")[:3]])
    assert not page.locator("#error").count(), page.locator("#error").inner_text()

    # pixel check: with the liver shown vs hidden, the changed pixels of the axial view have the liver's hue
    shown = _wait_for_change(page, "Red", axial_empty)
    page.screenshot(path=str(ARTIFACTS / "03_segmented.png"))
    page.locator(".legend-item").first.locator("input[type=checkbox]").click()
    hidden = _wait_for_change(page, "Red", shown)
    changed = np.abs(shown - hidden).sum(axis=2) > 45
    assert changed.sum() > 300, f"only {changed.sum()} pixels changed when hiding the liver"
    hue, saturation = _hue_saturation(shown[changed])
    liver_hue, _ = _hue_saturation(liver_rgb[None])
    distance = np.abs((hue - liver_hue[0] + 180) % 360 - 180)
    assert np.median(distance) < 20 and np.median(saturation) > 0.15, (np.median(hue), liver_hue)
    hidden_hue_sat = _hue_saturation(hidden[changed])[1]
    assert np.median(hidden_hue_sat) < 0.1  # underneath is the grey CT
    page.locator(".legend-item").first.locator("input[type=checkbox]").click()
    _wait_for_change(page, "Red", hidden)

    # the report streams in beside the views and can be downloaded; the embedded demo model says what it is
    assert "misses most findings" in page.inner_text("#report-demo-note")
    page.click("#report-button")
    page.wait_for_selector("#report-downloads", timeout=180_000)
    text = page.inner_text("#report-text").strip()
    assert len(text) > 40 and "liver" in text.lower(), text
    page.screenshot(path=str(ARTIFACTS / "04_report.png"))
    download = page.request.get(url.split("?")[0] + "voxtext/download/report/txt")
    assert download.ok and download.text().strip().startswith(text[:40])
    seg = page.request.get(url.split("?")[0] + "voxtext/download/segmentation/seg.nrrd")
    assert seg.ok and len(seg.body()) > 1000

    # a closed question joins the conversation
    page.fill("#question", "Is there a liver lesion?")
    page.fill("#choices", "yes, no")
    page.click("#ask-button")
    page.wait_for_selector(".qa-turn", timeout=180_000)
    assert "Is there a liver lesion? [yes / no]" in page.inner_text(".qa-turn")
    assert page.inner_text(".qa-turn .qa-answer").split(":", 1)[1].strip()
    assert page.input_value("#question") == ""

    # opening a file in the browser replaces the volume and its results; a run can be cancelled
    page.set_input_files("#voxtext-file", str(image))
    page.wait_for_function("!document.querySelectorAll('.legend-item').length && "
                           "!document.querySelector('#report-text').innerText.trim()", timeout=60_000)
    page.wait_for_selector("#message:has-text('Opened image')", timeout=60_000)
    page.fill("#prompt", "spleen")
    page.click("#segment-button")
    page.wait_for_selector("#cancel-button", timeout=30_000)
    page.click("#cancel-button")
    page.wait_for_selector("#message:has-text('cancelled')", timeout=60_000)
    assert not page.locator(".legend-item").count() and not page.locator("#error").count()
    page.screenshot(path=str(ARTIFACTS / "05_cancelled.png"))
