"""Scale-out with Ray Serve: the same FastAPI app as ``voxtext serve``, one resident model set per replica.

Optional (not in requirements.txt): ``pip install "ray[serve]==2.60.0"``, then

    serve run voxtext.server.ray_serve:application model=default num_replicas=2 num_gpus=1 token=$VOXTEXT_TOKEN

Each replica builds the app on its own worker (the models load there, once); Ray's proxy spreads requests
over replicas, and each replica keeps its own bounded queues (503 + Retry-After when full).
``benchmarks/bench_server.py --ray`` measures it against a single server.
"""

from __future__ import annotations

from fastapi import FastAPI
from ray import serve
from ray.serve import Application

from .app import ServerConfig, build_app


def _names(value: str | None) -> list[str]:
    return [name for name in (value or "").split(",") if name]


def application(args: dict[str, str]) -> Application:
    """Ray Serve application builder; ``args`` (strings, from ``serve run ... key=value``): ``model``, ``vlm``
    and ``findings`` (comma separated; ``model`` defaults to ``default`` when none of the three is given),
    ``device``, ``precision``, ``num_replicas``, ``num_gpus`` and ``num_cpus`` per replica, ``concurrency``,
    ``max_queue``, ``token``, ``max_body_mb``."""
    concurrency, max_queue = int(args.get("concurrency", 1)), int(args.get("max_queue", 4))
    config = ServerConfig(token=args.get("token") or None, max_body_mb=float(args.get("max_body_mb", 512)))
    vlms, findings = _names(args.get("vlm")), _names(args.get("findings"))
    models = _names(args.get("model")) or ([] if vlms or findings else ["default"])
    device, precision = args.get("device", "auto"), args.get("precision", "fp32")

    def builder() -> FastAPI:  # a plain function: Ray calls it on each replica (a partial would pass as ASGI)
        return build_app(config, models, device, precision, concurrency, max_queue, vlms, findings)

    actor_options: dict[str, float] = {"num_gpus": float(args.get("num_gpus", 0))}
    if "num_cpus" in args:
        actor_options["num_cpus"] = float(args["num_cpus"])
    slots = len(models) + len(vlms) + len(findings)
    deployment = serve.deployment(
        serve.ingress(builder)(),
        name="voxtext",
        num_replicas=int(args.get("num_replicas", 1)),
        # Per model, concurrency + max_queue; more would only wait in the replica's own queues.
        max_ongoing_requests=max(1, slots) * (concurrency + max_queue),
        ray_actor_options=actor_options,
    )
    return deployment.bind()
