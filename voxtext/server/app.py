"""The FastAPI application, its guard (bearer token, body size) and ``voxtext serve``.

Model families plug in as routers over :class:`~voxtext.server.workers.ModelSlot` objects held in
``app.state.slots`` (a unique key -> slot; requests pick a slot by its name and kind): segmentation is
:mod:`voxtext.server.segment`, report and VQA are :mod:`voxtext.server.report`, zero-shot findings are
:mod:`voxtext.server.findings`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from fastapi.security import HTTPBearer
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .. import __version__
from ..access import bind_refusal, token_matches
from ..errors import InputError
from .codec import TooLargeError
from .workers import ModelSlot, QueueFull

log = logging.getLogger("voxtext.server")
PUBLIC_PATHS = frozenset({"/health", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"})


@dataclass(frozen=True)
class ServerConfig:
    """Limits and credentials of one server process."""

    token: str | None = None
    max_body_mb: float = 512.0
    max_volume_mb: float = 2048.0  # decoded voxels of one uploaded volume

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 2**20)

    @property
    def max_volume_bytes(self) -> int:
        return int(self.max_volume_mb * 2**20)


class Guard:
    """ASGI middleware run before any body is read: bearer token (401), then body size (413)."""

    def __init__(self, app: ASGIApp, token: str | None, max_body: int) -> None:
        self.app, self.token, self.max_body = app, token, max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if self.token is not None and scope["path"] not in PUBLIC_PATHS and not self._authorized(headers):
            response = JSONResponse({"detail": "missing or wrong bearer token"}, 401,
                                    headers={"WWW-Authenticate": "Bearer"})
            return await response(scope, receive, send)
        length = headers.get("content-length", "0")
        if not length.isdigit() or int(length) > self.max_body:
            return await self._too_large(scope, receive, send)
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_body:  # chunked uploads carry no Content-Length
                raise HTTPException(413, self._limit_text())
            return message

        await self.app(scope, limited, send)

    def _authorized(self, headers: dict[str, str]) -> bool:
        scheme, _, credential = headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and token_matches(credential.strip(), self.token)

    def _limit_text(self) -> str:
        return f"request body larger than this server's limit of {self.max_body / 2**20:.0f} MiB"

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        await JSONResponse({"detail": self._limit_text()}, 413, headers={"Connection": "close"})(scope, receive, send)


def create_app(config: ServerConfig, slots: dict[str, ModelSlot]) -> FastAPI:
    """The application serving the resident models in ``slots``; they are closed on shutdown."""
    from .findings import router as findings_router
    from .report import router as report_router
    from .segment import router as segment_router

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        for slot in slots.values():
            slot.close()

    app = FastAPI(title="VoxText inference server", version=__version__, lifespan=lifespan,
                  description="Text-guided 3-D segmentation, reports, visual question answering and zero-shot "
                              "findings. Volumes travel as NIfTI/NRRD bytes, never as JSON arrays. With a token set, "
                              "every endpoint but /health and the schema needs `Authorization: Bearer <token>`.")
    app.state.config, app.state.slots = config, slots
    app.add_middleware(Guard, token=config.token, max_body=config.max_body_bytes)
    # Enforcement is in Guard (before the upload is read); this dependency only documents the scheme.
    secured = [Depends(HTTPBearer(auto_error=False))]

    @app.exception_handler(QueueFull)
    async def queue_full(request: Request, error: QueueFull) -> JSONResponse:
        return JSONResponse({"detail": str(error)}, 503, headers={"Retry-After": str(error.retry_after)})

    @app.exception_handler(InputError)
    async def bad_input(request: Request, error: InputError) -> JSONResponse:
        return JSONResponse({"detail": str(error)}, 413 if isinstance(error, TooLargeError) else 422)

    @app.get("/health", summary="Liveness: the process answers")
    async def health() -> dict[str, str]:
        return {"status": "ok", "version": __version__}

    @app.get("/v1/models", summary="Resident models, their queues, and the named models this server could load",
             dependencies=secured)
    async def models() -> dict[str, list]:
        from ..checkpoints import list_models
        from ..findings import FINDINGS_REGISTRY
        from ..report import VLM_REGISTRY

        known = [("segmentation", list_models()), ("report", VLM_REGISTRY.values()),
                 ("findings", FINDINGS_REGISTRY.values())]
        return {"loaded": [slot.status() for slot in slots.values()],
                "known": [{"name": spec.name, "kind": kind, "description": spec.description}
                          for kind, specs in known for spec in specs]}

    app.include_router(segment_router, dependencies=secured)
    app.include_router(report_router, dependencies=secured)
    app.include_router(findings_router, dependencies=secured)
    return app


def slot_for(request: Request, name: str, kind: str) -> ModelSlot:
    """The resident slot ``name`` of family ``kind``, or 404 naming the ones loaded."""
    slot = next((s for s in request.app.state.slots.values() if s.name == name and s.kind == kind), None)
    if slot is None:
        loaded = [s.name for s in request.app.state.slots.values() if s.kind == kind]
        raise HTTPException(404, f"model {name!r} is not loaded on this server; loaded {kind} models: {loaded}")
    return slot


def build_app(config: ServerConfig, models: list[str], device: str = "auto", precision: str = "fp32",
              concurrency: int = 1, max_queue: int = 4, vlms: Sequence[str] = (),
              findings: Sequence[str] = (), vlm_options: dict | None = None) -> FastAPI:
    """Load each segmentation model, VLM and findings model once into its own slot; the app serving them.

    ``vlm_options`` go to each :class:`voxtext.report.Reporter` (``load_in``, ``device_map``)."""
    from ..api import Segmenter
    from ..findings import FindingsRanker
    from ..report import Reporter

    loaded = [("segmentation", name, Segmenter(name, device, precision)) for name in models] + \
             [("report", name, Reporter(name, device, precision, **(vlm_options or {}))) for name in vlms] + \
             [("findings", name, FindingsRanker(name, device, precision)) for name in findings]
    slots = {f"{kind}:{name}": ModelSlot(name, kind, model, concurrency, max_queue) for kind, name, model in loaded}
    return create_app(config, slots)


@contextmanager
def running(app: FastAPI, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Serve ``app`` with uvicorn in a background thread (port 0: a free one) and yield its URL; stops on exit."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="voxtext-uvicorn", daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError(f"the server could not start on {host}:{port}")
        time.sleep(0.02)
    try:
        yield f"http://{host}:{server.servers[0].sockets[0].getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join()


def main_serve(argv: list[str] | None = None) -> int:
    """``voxtext serve``: load the models once and serve them until interrupted."""
    import uvicorn

    parser = argparse.ArgumentParser(prog="voxtext serve", description="HTTP inference server (FastAPI + uvicorn).")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (non-loopback needs a token)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--token", default=os.environ.get("VOXTEXT_TOKEN"), help="bearer token (env VOXTEXT_TOKEN)")
    parser.add_argument("--model", action="append", help="segmentation model to keep resident (repeatable)")
    parser.add_argument("--vlm", action="append", default=[],
                        help="report/VQA model to keep resident, e.g. default (repeatable)")
    parser.add_argument("--findings", action="append", default=[],
                        help="zero-shot findings model to keep resident: dcformer-siglip, hf://repo or a "
                             "DCFormer_SigLIP folder (repeatable)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--load-in", default=None, choices=["8bit", "4bit"],
                        help="--vlm models: quantize the language model with bitsandbytes (CUDA GPU)")
    parser.add_argument("--device-map", default=None, help="--vlm models: auto, balanced, sequential or a device")
    parser.add_argument("--concurrency", type=int, default=1, help="jobs running at once per model")
    parser.add_argument("--max-queue", type=int, default=4, help="jobs waiting per model before 503")
    parser.add_argument("--max-body-mb", type=float, default=512.0, help="largest request body (413 beyond)")
    args = parser.parse_args(argv)
    refusal = bind_refusal("voxtext serve", args.host, args.token)
    if refusal:
        print(refusal, file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    config = ServerConfig(token=args.token or None, max_body_mb=args.max_body_mb)
    models = list(dict.fromkeys(args.model or ([] if args.vlm or args.findings else ["default"])))
    vlms, findings = list(dict.fromkeys(args.vlm)), list(dict.fromkeys(args.findings))
    app = build_app(config, models, args.device, args.precision, args.concurrency, args.max_queue, vlms, findings,
                    {"load_in": args.load_in, "device_map": args.device_map})
    log.info("serving %s, VLMs %s and findings models %s on %s:%d (token %s)", json.dumps(models), json.dumps(vlms),
             json.dumps(findings), args.host, args.port, "required" if config.token else "off")
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0
