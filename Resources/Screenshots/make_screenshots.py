"""Regenerate the README pictures: a TextSeg result on Slicer views, and the VoxText Web page.

``textseg.png``: a procedural phantom segmented by the TextSeg module core (embedded default model), shown in
axial, coronal, sagittal and 3D Slicer views that trame-slicer renders offscreen (no browser, no display).
``web.png``: ``voxtext web`` in headless Chromium after two prompts and a report.

    python Resources/Screenshots/make_screenshots.py [--only textseg|web] [--chromium /usr/bin/chromium]

Runs on CPU in a few minutes; the pictures are written next to this script.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
PROMPTS = ["liver", "stomach", "vertebrae"]
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def make_phantom(folder: Path) -> Path:
    subprocess.run([sys.executable, "-m", "voxtext", "phantom", "--seed", "3", "--out", str(folder), "--shape", "128",
                    "128", "24", "--spacing", "2.4", "2.4", "6"], check=True, cwd=str(REPO), capture_output=True)
    return folder / "image.nii.gz"


def _capture(view) -> np.ndarray:
    from slicer import vtkMRMLLayerDisplayableManager
    from vtkmodules.util.numpy_support import vtk_to_numpy
    from vtkmodules.vtkCommonDataModel import vtkImageData

    view.render()
    image = vtkImageData()
    vtkMRMLLayerDisplayableManager.RenderWindowBufferToImage(view.render_window(), image)
    width, height, _ = image.GetDimensions()
    pixels = vtk_to_numpy(image.GetPointData().GetScalars()).reshape(height, width, -1)[::-1, :, :3]
    return np.ascontiguousarray(pixels)


def textseg_picture(out: Path, image_path: Path, size: int = 480) -> Path:
    """Segment ``PROMPTS`` with the TextSeg core and render the four views offscreen into one picture."""
    from PIL import Image, ImageDraw
    from trame_slicer.core import SlicerApp
    from trame_slicer.views import DirectViewFactory, ViewLayoutDefinition

    from voxtext.web.cores import add_cores_to_path

    add_cores_to_path()
    from TextSegLib.core import TextSegCore
    from TextSegLib.options import SegmentOptions

    app = SlicerApp()
    app.view_manager.register_factory(DirectViewFactory(do_render_offscreen=True))
    layout = {"Axial": ViewLayoutDefinition.axial_view(), "Coronal": ViewLayoutDefinition.coronal_view(),
              "Sagittal": ViewLayoutDefinition.sagittal_view(), "3D": ViewLayoutDefinition.threed_view()}
    views = {name: app.view_manager.create_view(definition) for name, definition in layout.items()}
    for view in views.values():
        view.render_window().SetSize(size, size)
        view.update_size(size, size)
    volume = app.io_manager.load_volumes(str(image_path))[0]  # after the views exist, as in the web app
    app.display_manager.show_volume_in_slice_background(volume)
    volume.GetDisplayNode().AutoWindowLevelOff()
    volume.GetDisplayNode().SetWindowLevel(400, 40)
    core = TextSegCore(app.scene, app.segmentations_logic, app.terminologies_logic)
    started = time.monotonic()
    result = core.segment(volume, PROMPTS, options=SegmentOptions(quality="fast"))
    print(f"segmented {', '.join(PROMPTS)} in {time.monotonic() - started:.0f} s: "
          + ", ".join(f"{k} {v:.0f} mL" for k, v in result.volumes_ml.items()))
    display = result.segmentation_node.GetDisplayNode()
    display.SetOpacity2DFill(0.5)
    app.display_manager.reset_views()
    views["3D"].reset_view()
    tiles = {name: Image.fromarray(_capture(view)) for name, view in views.items()}

    legend_h = 36
    canvas = Image.new("RGB", (2 * size, 2 * size + legend_h), (30, 30, 30))
    for i, name in enumerate(["Axial", "Coronal", "Sagittal", "3D"]):
        x, y = (i % 2) * size, (i // 2) * size
        canvas.paste(tiles[name].resize((size, size)), (x, y))
        ImageDraw.Draw(canvas).text((x + 8, y + 6), name, fill=(230, 230, 230))
    draw = ImageDraw.Draw(canvas)
    x = 10
    segmentation = result.segmentation_node.GetSegmentation()
    for segment_id in result.segment_ids:
        segment = segmentation.GetSegment(segment_id)
        rgb = tuple(round(c * 255) for c in segment.GetColor())
        draw.rectangle([x, 2 * size + 11, x + 14, 2 * size + 25], fill=rgb)
        label = f"{segment.GetName()} ({result.volumes_ml[segment.GetName()]:.0f} mL)"
        draw.text((x + 20, 2 * size + 12), label, fill=(230, 230, 230))
        x += 30 + int(draw.textlength(label))
    draw.text((2 * size - 330, 2 * size + 12), "TextSeg core + embedded default model, phantom CT",
              fill=(160, 160, 160))
    canvas.save(out)
    return out


def web_picture(out: Path, image_path: Path, chromium: str) -> Path:
    """Start ``voxtext web`` on loopback, segment two prompts and write a report in headless Chromium."""
    from playwright.sync_api import sync_playwright

    server = subprocess.Popen([sys.executable, "-m", "voxtext", "web", "--port", "0", "--volume", str(image_path)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=str(REPO))
    try:
        url = ""
        for line in server.stdout:
            if "voxtext web: serving " in line:
                url = line.split("serving ", 1)[1].strip()
                break
        if not url:
            raise RuntimeError("voxtext web did not start")
        with sync_playwright() as p, tempfile.TemporaryDirectory() as profile:
            context = p.chromium.launch_persistent_context(profile, executable_path=chromium, headless=True,
                                                           args=CHROMIUM_ARGS, viewport={"width": 1500, "height": 950})
            page = context.new_page()
            page.goto(url)
            page.wait_for_selector("#volume-name:has-text('image')", timeout=60_000)
            page.fill("#prompt", ", ".join(PROMPTS))
            page.click("#segment-button")
            page.wait_for_function("document.querySelectorAll('.legend-item').length == 3", timeout=600_000)
            page.click("#report-button")
            page.wait_for_selector("#report-downloads", timeout=600_000)
            page.wait_for_timeout(2000)
            page.screenshot(path=str(out))
            context.close()
    finally:
        server.terminate()
        server.wait(10)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["textseg", "web"], default=None)
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        image = make_phantom(Path(tmp) / "phantom")
        if args.only in (None, "textseg"):
            print("wrote", textseg_picture(HERE / "textseg.png", image))
        if args.only in (None, "web"):
            print("wrote", web_picture(HERE / "web.png", image, args.chromium))
    return 0


if __name__ == "__main__":
    sys.exit(main())
