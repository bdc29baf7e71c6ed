"""Throughput and latency of ``voxtext serve`` segmentation with 1, 4 and 8 concurrent clients.

Starts a real server (uvicorn, loopback, embedded default model) in this process and sends requests with
:class:`voxtext.server.client.RemoteSegmenter`; each client sends ``--requests`` jobs back to back. The
volume is the central part of a procedural CT phantom (``--size`` voxels at ``--spacing`` mm).
With ``--ray`` the same application (:mod:`voxtext.server.ray_serve`) runs under a local Ray Serve with
``--replicas`` replicas (needs ``pip install "ray[serve]"``), each with ``--replica-cpus`` CPUs (Ray sets
each replica's torch threads to that).

    python benchmarks/bench_server.py [--clients 1 4 8] [--requests 4] [--concurrency 1] [--quality fast]
    python benchmarks/bench_server.py --ray [--replicas 2] [--replica-cpus 1]
"""

from __future__ import annotations

import argparse
import os
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import numpy as np

from voxtext.api import Segmenter
from voxtext.phantom import generate_phantom
from voxtext.server.app import ServerConfig, create_app, running
from voxtext.server.client import RemoteSegmenter
from voxtext.server.workers import ModelSlot
from voxtext.volume import Volume


def run_clients(url: str, volume: Volume, clients: int, requests: int, quality: str) -> tuple[float, list[float]]:
    """Wall time and per-request latencies of ``clients`` clients sending ``requests`` jobs each."""

    def client(_: int) -> list[float]:
        latencies = []
        with RemoteSegmenter(url) as remote:
            for _ in range(requests):
                t0 = time.perf_counter()
                remote.segment(volume, ["liver"], quality=quality)
                latencies.append(time.perf_counter() - t0)
        return latencies

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        latencies = [x for xs in pool.map(client, range(clients)) for x in xs]
    return time.perf_counter() - t0, latencies


@contextmanager
def local_server(args: argparse.Namespace, volume: Volume) -> Iterator[str]:
    """``voxtext serve``'s app in this process (uvicorn on a free loopback port)."""
    segmenter = Segmenter("default", device=args.device)
    segmenter.segment(volume, ["liver"], quality=args.quality)  # warm-up
    slot = ModelSlot("default", "segmentation", segmenter, args.concurrency, max_queue=max(args.clients))
    with running(create_app(ServerConfig(), {"default": slot})) as url:
        yield url


@contextmanager
def ray_server(args: argparse.Namespace, volume: Volume) -> Iterator[str]:
    """The same application under a local Ray Serve with ``args.replicas`` replicas; yields the proxy's URL."""
    import ray
    from ray import serve

    from voxtext.server.ray_serve import application

    with socket.socket() as probe:  # a free port for Ray's HTTP proxy
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    t0 = time.perf_counter()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(application({"model": "default", "device": args.device, "num_replicas": str(args.replicas),
                               "num_cpus": str(args.replica_cpus), "concurrency": str(args.concurrency),
                               "max_queue": str(max(args.clients))}), name="voxtext", route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        run_clients(url, volume, 2 * args.replicas, 1, args.quality)  # warm-up: every replica serves once
        print(f"Ray {ray.__version__}: {args.replicas} replicas x {args.replica_cpus} CPU up and warm in "
              f"{time.perf_counter() - t0:.0f} s")
        yield url
    finally:
        serve.shutdown()
        ray.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--requests", type=int, default=4, help="requests per client")
    parser.add_argument("--concurrency", type=int, default=1, help="jobs the server runs at once")
    parser.add_argument("--quality", default="fast", choices=["fast", "accurate"])
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--spacing", type=float, default=4.0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--ray", action="store_true", help="serve through a local Ray Serve instead")
    parser.add_argument("--replicas", type=int, default=2, help="Ray Serve replicas (with --ray)")
    parser.add_argument("--replica-cpus", type=float, default=1.0, help="CPUs (torch threads) per replica")
    args = parser.parse_args()

    case = generate_phantom(0, shape=(args.size,) * 3, spacing=(args.spacing,) * 3)
    volume = Volume(case.image, case.affine, "CT")
    where = f"Ray Serve, {args.replicas} replicas" if args.ray else "one server process"
    print(f"{where}: volume {volume.shape} at {args.spacing} mm, quality {args.quality}, concurrency "
          f"{args.concurrency} per model, {args.requests} requests per client, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}")
    with (ray_server if args.ray else local_server)(args, volume) as url:
        print(f"{'clients':>7} {'requests':>8} {'req/s':>7} {'p50 s':>7} {'p95 s':>7}")
        for clients in args.clients:
            wall, latencies = run_clients(url, volume, clients, args.requests, args.quality)
            p50, p95 = np.percentile(latencies, [50, 95])
            print(f"{clients:>7} {len(latencies):>8} {len(latencies) / wall:>7.2f} {p50:>7.2f} {p95:>7.2f}")


if __name__ == "__main__":
    main()
