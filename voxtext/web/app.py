"""``voxtext web``: TextSeg and VLMReport in a browser, on real Slicer views rendered by trame-slicer.

The page (trame, Vue 3 + Vuetify) shows the axial, coronal, sagittal and 3D views of one slicer-core scene;
the side panel drives :class:`~voxtext.web.session.WebSession`, which runs the Slicer module cores. Files
come in by upload (``POST voxtext/upload``) or ``--volume`` at start, never as server paths named by a client;
downloads are ``GET voxtext/download/...``. Everything runs on the server's event loop thread (VTK's thread);
model work runs in the cores' worker processes, polled a few times a second.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
from pathlib import Path

from ..access import bind_refusal
from ..errors import VoxTextError

POLL_S = 0.2
VIEW_LABELS = {"Red": "Axial", "Green": "Coronal", "Yellow": "Sagittal", "ThreeD": "3D"}


def voxtext_layout():
    """Axial and coronal on top, sagittal and 3D below."""
    from trame_slicer.views import Layout, LayoutDirection, ViewLayoutDefinition as View

    row = LayoutDirection.Horizontal
    return Layout(LayoutDirection.Vertical, [Layout(row, [View.axial_view(), View.coronal_view()]),
                                             Layout(row, [View.sagittal_view(), View.threed_view()])])


class VoxTextWeb:
    """The trame server, the Slicer views and the session, wired together."""

    def __init__(self, seg_options=None, report_options=None, token: str | None = None,
                 max_upload_mb: float = 2048.0, server_name: str = "voxtext_web") -> None:
        from trame.app import get_server
        from trame_slicer import module as trame_slicer_module
        from trame_slicer.core import LayoutManager, SlicerApp
        from trame_slicer.rca_view import register_rca_factories

        from .session import WebSession

        self.server = get_server(server_name, client_type="vue3")
        self.server.enable_module(trame_slicer_module)
        self.state, self.ctrl = self.server.state, self.server.controller
        self.token = token
        self.max_upload_bytes = int(max_upload_mb * 2**20)
        self.slicer = SlicerApp()
        register_rca_factories(self.slicer.view_manager, self.server, slice_view_ui_f=self._slice_view_ui,
                               three_d_view_ui_f=self._threed_view_ui)
        self.layout_manager = LayoutManager(self.slicer.scene, self.slicer.view_manager, self.server)
        self.layout_manager.register_layout_dict(LayoutManager.default_grid_configuration())
        self.layout_manager.register_layout("VoxText", voxtext_layout())
        self.layout_manager.set_layout("VoxText")
        self.session = WebSession(self.slicer, seg_options, report_options)
        self._init_state()
        self._build_ui()
        self.ctrl.on_server_bind.add(self._bind_routes)
        self.ctrl.on_server_ready.add(self._on_ready)
        self._pump_task = None

    # --- state and UI --------------------------------------------------------------------------------

    def _init_state(self) -> None:
        from .session import WINDOW_PRESETS

        self.state.update({
            "trame__title": "VoxText Web",
            "volume_name": "", "volume_dicom": False, "loading": False,
            "window_presets": list(WINDOW_PRESETS), "window_preset": "Auto",
            "prompt": "", "segments": [], "error": "", "message": "",
            "job_kind": "", "job_status": "", "job_progress": 0, "job_indeterminate": True,
            "report_text": "", "question": "", "choices": "", "conversation": [],
            "report_demo": self.session.report_options.model == "default",
        })
        self.state.change("window_preset")(self._on_window_preset)

    @staticmethod
    def _view_label(view_id: str, fill=None):
        from trame.widgets import html

        def populate(server, trame_id, view):
            tag = view.get_singleton_tag()
            html.Div(VIEW_LABELS.get(tag, tag), classes=f"voxtext-view voxtext-view-{tag}",
                     style="position:absolute;right:6px;top:4px;color:#ddd;font:12px sans-serif;"
                           "pointer-events:none;z-index:2;")
            if fill is not None:
                fill(server, trame_id, view)

        return populate

    def _slice_view_ui(self, server, trame_id, view) -> None:
        from trame_slicer.app.ui import create_vertical_slice_view_gutter_ui

        self._view_label(trame_id, create_vertical_slice_view_gutter_ui)(server, trame_id, view)

    def _threed_view_ui(self, server, trame_id, view) -> None:
        from trame_slicer.app.ui import create_vertical_view_gutter_ui

        self._view_label(trame_id, create_vertical_view_gutter_ui)(server, trame_id, view)

    def _build_ui(self) -> None:
        from trame.ui.vuetify3 import VAppLayout
        from trame.widgets import html
        from trame.widgets import vuetify3 as v

        upload_js = (
            "const files = Array.from($event.target.files || []); if (!files.length) { return; }"
            "const data = new window.FormData();"
            "files.forEach(f => data.append('files', f, f.name));"
            "loading = true; error = ''; message = 'Uploading ' + files.length + ' file(s)...';"
            "window.fetch('voxtext/upload', {method: 'POST', body: data, credentials: 'same-origin'})"
            ".then(r => r.json().catch(() => ({error: 'upload failed (HTTP ' + r.status + ')'})))"
            ".then(j => { if (j.error) { error = j.error; message = ''; } })"
            ".catch(e => { error = 'upload failed: ' + e; message = ''; })"
            ".finally(() => { loading = false; $event.target.value = ''; });"
        )
        with VAppLayout(self.server, full_height=True) as layout:
            self.ui = layout
            with v.VAppBar(density="compact", color="#1e2a38", theme="dark"):
                v.VToolbarTitle("VoxText Web", classes="flex-grow-0 mr-4")
                with v.VBtn(prepend_icon="mdi-folder-open", variant="tonal", classes="mr-2", loading=("loading",),
                            click="document.getElementById('voxtext-file').click()", id="open-button"):
                    html.Span("Open volume")
                html.Input(type="file", multiple=True, id="voxtext-file", style="display:none",
                           accept=".nii,.gz,.nrrd,.nhdr,.mha,.mhd,.zip,.dcm,*", change=upload_js)
                html.Span("{{ volume_name || 'no volume: open a NIfTI/NRRD file, or DICOM files/zip' }}",
                          classes="text-body-2 mr-4", id="volume-name")
                v.VSpacer()
                v.VSelect(label="Window/level", items=("window_presets",), v_model=("window_preset",),
                          density="compact", hide_details=True, style="max-width:190px", id="window-preset",
                          disabled=("!volume_name",))
            with v.VMain():
                with html.Div(style="display:flex;height:calc(100vh - 48px);"):
                    with html.Div(style="flex:1 1 auto;position:relative;min-width:0;", id="views"):
                        with html.Div(style="position:absolute;inset:0;display:flex;"):
                            self.layout_manager.initialize_layout_grid(layout)
                    with html.Div(style="width:380px;overflow-y:auto;border-left:1px solid #ccc;",
                                  classes="pa-3", id="side-panel"):
                        self._messages_ui(v, html)
                        self._segment_ui(v, html)
                        self._report_ui(v, html)

    def _messages_ui(self, v, html) -> None:
        v.VAlert(v_if=("error",), type="error", density="compact", closable=True, text=("error",),
                 classes="mb-2", id="error", click_close="error = ''")
        v.VAlert(v_if=("message && !error",), type="info", density="compact", text=("message",), classes="mb-2",
                 variant="tonal", id="message")
        with html.Div(v_if=("job_kind",), classes="mb-3", id="progress"):
            html.Div("{{ job_status }}", classes="text-body-2 mb-1")
            v.VProgressLinear(model_value=("job_progress",), indeterminate=("job_indeterminate",), height=6,
                              color="primary")
            v.VBtn("Cancel", click=self.cancel, size="small", variant="outlined", color="error", classes="mt-2",
                   id="cancel-button", prepend_icon="mdi-close")

    def _segment_ui(self, v, html) -> None:
        html.Div("Segment", classes="text-subtitle-1 font-weight-bold")
        with html.Div(classes="d-flex align-center"):
            v.VTextField(v_model=("prompt",), label="Targets, e.g. liver, left kidney", density="compact",
                         hide_details=True, id="prompt", disabled=("!volume_name",),
                         keydown_enter=self.segment, __events=[("keydown_enter", "keydown.enter")])
            v.VBtn("Segment", click=self.segment, color="primary", classes="ml-2", id="segment-button",
                   disabled=("!volume_name || !!job_kind || !prompt",))
        with v.VList(density="compact", id="legend", classes="mt-2"):
            with v.VListItem(v_for="seg in segments", key="seg.id", classes="legend-item px-1",
                             __properties=[("data_segment", "data-segment")], data_segment=("seg.name",)):
                with html.Div(classes="d-flex align-center"):
                    v.VCheckboxBtn(model_value=("seg.visible",), density="compact", classes="flex-grow-0",
                                   update_modelValue=(self.toggle_segment, "[seg.id, $event]"))
                    html.Span(style=("`display:inline-block;width:14px;height:14px;border-radius:3px;"
                                     "background:${seg.color};margin-right:8px`",), classes="legend-swatch")
                    html.Span("{{ seg.name }}", classes="legend-name text-body-2")
                    html.Span("&nbsp;{{ seg.ml }} mL", classes="text-caption text-grey ml-1")
                    html.Span("&nbsp;(lesion stage, in {{ seg.within }})", v_if=("seg.within",),
                              classes="text-caption text-grey ml-1 legend-lesion-stage")
                    v.VIcon("mdi-alert", v_if=("seg.caution",), size="small", color="warning",
                            title=("seg.caution",), classes="ml-1 legend-caution")
                    v.VSpacer()
                    v.VBtn(icon="mdi-delete", size="x-small", variant="text", classes="delete-segment",
                           click=(self.delete_segment, "[seg.id]"))
                v.VSlider(model_value=("seg.opacity",), min=0, max=1, step=0.05, density="compact",
                          hide_details=True, classes="mx-2", end=(self.set_opacity, "[seg.id, $event]"),
                          prepend_icon="mdi-circle-opacity")
        with html.Div(v_if=("segments.length",), classes="d-flex flex-wrap ga-1 mb-4", id="seg-downloads"):
            for kind, label in (("seg.nrrd", ".seg.nrrd"), ("nii.gz", "NIfTI"), ("zip", "NIfTI + labels")):
                v.VBtn(label, href=f"voxtext/download/segmentation/{kind}", size="small", variant="tonal",
                       prepend_icon="mdi-download", raw_attrs=["download"])
            v.VBtn("DICOM SEG", href="voxtext/download/segmentation/dcm", size="small", variant="tonal",
                   prepend_icon="mdi-download", raw_attrs=["download"], disabled=("!volume_dicom",))

    def _report_ui(self, v, html) -> None:
        v.VDivider(classes="my-3")
        with html.Div(classes="d-flex align-center"):
            html.Div("Report", classes="text-subtitle-1 font-weight-bold")
            v.VSpacer()
            v.VBtn("Generate report", click=self.generate_report, color="primary", size="small",
                   id="report-button", disabled=("!volume_name || !!job_kind",))
        html.Div("Embedded demo model, trained on phantoms only: it misses most findings (about half of the "
                 "liver lesions and no kidney lesion on test phantoms); start with --vlm med3dvlm for the "
                 "published model.", v_if=("report_demo",),
                 id="report-demo-note", classes="text-caption text-medium-emphasis")
        html.Pre("{{ report_text }}", id="report-text", classes="text-body-2 my-2 pa-2",
                 style="white-space:pre-wrap;font-family:inherit;background:#f4f6f8;border-radius:4px;"
                       "min-height:3em;")
        with html.Div(v_if=("report_text && job_kind !== 'report'",), classes="d-flex ga-1 mb-2",
                      id="report-downloads"):
            v.VBtn(".txt", href="voxtext/download/report/txt", size="small", variant="tonal",
                   prepend_icon="mdi-download", raw_attrs=["download"])
            v.VBtn(".md", href="voxtext/download/report/md", size="small", variant="tonal",
                   prepend_icon="mdi-download", raw_attrs=["download"])
            v.VBtn("DICOM SR", href="voxtext/download/report/dcm", size="small", variant="tonal",
                   prepend_icon="mdi-download", raw_attrs=["download"], disabled=("!volume_dicom",))
        with html.Div():
            v.VTextField(v_model=("question",), label="Ask a question, e.g. Is there a kidney stone?",
                         density="compact", hide_details=True, id="question", disabled=("!volume_name",),
                         keydown_enter=self.ask, __events=[("keydown_enter", "keydown.enter")])
            with html.Div(classes="d-flex align-center mt-1"):
                v.VTextField(v_model=("choices",), label="Options (optional), e.g. yes, no", density="compact",
                             hide_details=True, id="choices")
                v.VBtn("Ask", click=self.ask, classes="ml-2", id="ask-button",
                       disabled=("!volume_name || !!job_kind || !question",))
        with html.Div(id="conversation", classes="mt-2"):
            with html.Div(v_for="(turn, i) in conversation", key="i", classes="mb-2 qa-turn"):
                html.Div("Q: {{ turn.q }}", classes="text-body-2 font-weight-medium")
                html.Div("A: {{ turn.a }}", classes="text-body-2 qa-answer")

    # --- actions (run on the server loop) ------------------------------------------------------------

    def _guarded(self, action, *args) -> bool:
        from .session import TextSegError, WebError

        try:
            action(*args)
        except (WebError, TextSegError, VoxTextError, ValueError) as error:
            self.state.error = str(error)
            return False
        self.state.error = ""
        return True

    def _refresh(self) -> None:
        s = self.session
        info = s.volume_info()
        self.state.volume_name = info.get("name", "")
        self.state.volume_dicom = info.get("dicom", False)
        self.state.segments = s.segments()
        self.state.report_text = s.report_text if s.running is None or s.running.kind != "report" \
            else s.running.text
        self.state.conversation = [{"q": r.question + (f" [{' / '.join(r.choices)}]" if r.choices else ""),
                                    "a": (f"{r.choices[r.index]} ({r.text})" if r.index is not None else r.text)}
                                   for r in s.conversation()]
        run = s.running
        self.state.job_kind = run.kind if run else ""
        if run:
            self.state.job_status = {"segment": f"Segmenting {', '.join(run.prompts)}: ",
                                     "report": "Writing the report: ", "ask": "Answering: "}[run.kind] + run.status
            self.state.job_indeterminate = not run.total
            self.state.job_progress = 100.0 * run.done / run.total if run.total else 0

    def load_volume(self, path: str | Path, name: str = "") -> None:
        """Load a server-side file or folder (``--volume`` and uploads only; never a client-named path)."""
        volume = self.session.load(path) if not name else self.session.load_files([Path(path)], name)
        preset = self.session.default_window()
        self.state.window_preset = preset
        self._refresh()
        self.state.message = f"Opened {volume.GetName()}."

    def _on_window_preset(self, window_preset, **_):
        if self.session.volume_node is not None:
            self._guarded(self.session.set_window, window_preset)

    def segment(self, *_):
        if self._guarded(self.session.start_segmentation, self.state.prompt):
            self.state.message = ""
        self._refresh()

    def generate_report(self, *_):
        if self._guarded(self.session.start_report):
            self.state.message = ""
        self._refresh()

    def ask(self, *_):
        if self._guarded(self.session.start_question, self.state.question, self.state.choices or ""):
            self.state.message = ""
        self._refresh()

    def cancel(self, *_):
        self.session.cancel()
        self.state.job_status = "Cancelling..."

    def toggle_segment(self, segment_id, visible):
        self._guarded(self.session.set_visible, segment_id, bool(visible))
        self._refresh()

    def set_opacity(self, segment_id, opacity):
        self._guarded(self.session.set_opacity, segment_id, float(opacity))
        self._refresh()

    def delete_segment(self, segment_id):
        self._guarded(self.session.delete, segment_id)
        self._refresh()

    def tick(self) -> None:
        """Forward the running job's events to the page; apply its result once it ended."""
        if self.session.running is None:
            return
        with self.state:
            finished = self.session.poll()
            if finished is not None:
                if finished.ok:
                    self.state.message, self.state.error = finished.message, ""
                    if finished.kind == "ask":
                        self.state.question = ""
                elif finished.cancelled:
                    self.state.message, self.state.error = finished.message, ""
                else:
                    self.state.error = finished.message
            self._refresh()

    async def _pump(self) -> None:
        while True:
            await asyncio.sleep(POLL_S)
            try:
                self.tick()
            except Exception as error:  # noqa: BLE001 - keep the loop alive, show the problem
                with self.state:
                    self.state.error = f"internal error: {error}"

    def _on_ready(self, **_):
        if self._pump_task is None:
            self._pump_task = asyncio.get_event_loop().create_task(self._pump())

    # --- HTTP routes -----------------------------------------------------------------------------------

    def _bind_routes(self, wslink_server) -> None:
        from .security import make_guard

        app = wslink_server.app
        app.middlewares.append(make_guard(self.token))
        app.router.add_post("/voxtext/upload", self._upload)
        app.router.add_get("/voxtext/download/{what}/{kind}", self._download)

    async def _upload(self, request):
        from aiohttp import web

        from .files import WebError

        if self.session.running is not None:
            return web.json_response({"error": "wait for the running job to finish before opening a volume"},
                                     status=409)
        folder = Path(tempfile.mkdtemp(dir=self.session.workdir, prefix="upload-"))
        files, total = [], 0
        reader = await request.multipart()
        async for part in reader:
            if part.filename is None:
                continue
            name = Path(part.filename.replace("\\", "/")).name or f"file{len(files)}"
            target = folder / f"{len(files):05d}" / name
            target.parent.mkdir()
            with open(target, "wb") as sink:
                while chunk := await part.read_chunk(1 << 20):
                    total += len(chunk)
                    if total > self.max_upload_bytes:
                        return web.json_response({"error": f"the upload is larger than "
                                                           f"{self.max_upload_bytes // 2**20} MB"}, status=413)
                    sink.write(chunk)
            files.append(target)
        try:
            with self.state:
                volume = self.session.load_files(files, files[0].name if len(files) == 1 else "")
                self.state.window_preset = self.session.default_window()
                self._refresh()
                self.state.error, self.state.message = "", f"Opened {volume.GetName()}."
        except (WebError, VoxTextError, ValueError, IndexError) as error:
            message = str(error) if files else "no file received"
            with self.state:
                self.state.error = message
            return web.json_response({"error": message}, status=400)
        return web.json_response({"volume": self.session.volume_info()})

    async def _download(self, request):
        from aiohttp import web

        from .files import WebError

        what, kind = request.match_info["what"], request.match_info["kind"]
        try:
            if what == "segmentation":
                path = self.session.export_segmentation(kind)
            elif what == "report":
                path = self.session.export_report(kind)
            else:
                raise WebError(f"nothing to download as {what!r}")
        except (WebError, VoxTextError, ValueError) as error:
            with self.state:
                self.state.error = str(error)
            return web.Response(status=400, text=f"{error}\n")
        return web.FileResponse(path, headers={"Content-Disposition": f'attachment; filename="{path.name}"'})

    # --- life cycle ------------------------------------------------------------------------------------

    def start(self, host: str, port: int, on_ready=None) -> None:
        if on_ready is not None:
            self.ctrl.on_server_ready.add(on_ready)
        argv, sys.argv = sys.argv, sys.argv[:1]  # trame parses sys.argv; ours were parsed already
        try:
            self.server.start(host=host, port=port, open_browser=False, show_connection_info=False, timeout=0,
                              disable_logging=True)
        finally:
            sys.argv = argv
            self.session.close()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="voxtext web", description="TextSeg and VLMReport in a web browser, on "
                                     "Slicer views (trame-slicer). Open the printed URL.")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (non-loopback needs a token)")
    parser.add_argument("--port", type=int, default=8080, help="port (0: any free port)")
    parser.add_argument("--token", default=os.environ.get("VOXTEXT_TOKEN"),
                        help="access token (env VOXTEXT_TOKEN); required off loopback")
    parser.add_argument("--volume", default=None, help="NIfTI/NRRD file or DICOM folder to open at start")
    parser.add_argument("--model", default="default", help="segmentation model: 'default', 'esica', 'esica-lite', "
                                                           "hf://repo or a folder")
    parser.add_argument("--vlm", default="default", help="report model: 'default', 'med3dvlm', hf://repo or a folder")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "gpu"])
    parser.add_argument("--quality", default="fast", choices=["fast", "accurate"])
    parser.add_argument("--max-upload-mb", type=float, default=2048.0)
    return parser


def main_web(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    refusal = bind_refusal("voxtext web", args.host, args.token)
    if refusal:
        print(refusal, file=sys.stderr)
        return 2
    try:
        from .cores import add_cores_to_path

        add_cores_to_path()
        from TextSegLib.options import SegmentOptions
        from VLMReportLib.options import ReportOptions

        seg_options = SegmentOptions(model=args.model, device=args.device, quality=args.quality)
        report_options = ReportOptions(model=args.vlm, device=args.device)
        web = VoxTextWeb(seg_options, report_options, token=args.token or None, max_upload_mb=args.max_upload_mb)
        if args.volume:
            web.load_volume(args.volume)
    except (VoxTextError, ValueError) as error:
        print(f"voxtext web: error: {error}", file=sys.stderr)
        return 2

    def announce(**_):
        shown = f"[{args.host}]" if ":" in args.host else args.host
        query = f"?token={args.token}" if args.token else ""
        print(f"voxtext web: serving http://{shown}:{web.server.port}/{query}", flush=True)

    web.start(args.host, args.port, announce)
    return 0


if __name__ == "__main__":
    sys.exit(main_web())
