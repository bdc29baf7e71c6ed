"""Scale-out with Ray Serve: the same FastAPI app as ``voxtext serve``, one resident model set per replica.

Optional (not in requirements.txt): ``pip install "ray[serve]==2.60.0"``, then

    serve run voxtext.server.ray_serve:application model=default num_replicas=2 num_gpus=1 token=$VOXTEXT_TOKEN

Each replica builds the app on its own worker (the models load there, once); Ray's proxy spreads requests
over replicas, and each replica keeps its own bounded queue (503 + Retry-After when full).
"""

from __future__ import annotations

from fastapi import FastAPI
from ray import serve
from ray.serve import Application

from .app import ServerConfig, build_app


def application(args: dict[str, str]) -> Application:
    """Ray Serve application builder; ``args`` (strings, from ``serve run ... key=value``): ``model`` (comma
    separated), ``device``, ``precision``, ``num_replicas``, ``num_gpus`` per replica, ``max_queue``, ``token``,
    ``max_body_mb``."""
    max_queue = int(args.get("max_queue", 4))
    config = ServerConfig(token=args.get("token") or None, max_body_mb=float(args.get("max_body_mb", 512)))
    models, device, precision = args.get("model", "default").split(","), args.get("device", "auto"), \
        args.get("precision", "fp32")

    def builder() -> FastAPI:  # a plain function: Ray calls it on each replica (a partial would pass as ASGI)
        return build_app(config, models, device, precision, concurrency=1, max_queue=max_queue)

    deployment = serve.deployment(
        serve.ingress(builder)(),
        name="voxtext",
        num_replicas=int(args.get("num_replicas", 1)),
        max_ongoing_requests=1 + max_queue,  # more would only wait in the replica's own queue
        ray_actor_options={"num_gpus": float(args.get("num_gpus", 0))},
    )
    return deployment.bind()
