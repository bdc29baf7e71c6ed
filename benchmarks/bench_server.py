"""Throughput and latency of ``voxtext serve`` segmentation with 1, 4 and 8 concurrent clients.

Starts a real server (uvicorn, loopback, embedded default model) in this process and sends requests with
:class:`voxtext.server.client.RemoteSegmenter`; each client sends ``--requests`` jobs back to back. The
volume is the central part of a procedural CT phantom (``--size`` voxels at ``--spacing`` mm).

    python benchmarks/bench_server.py [--clients 1 4 8] [--requests 4] [--concurrency 1] [--quality fast]
"""

from __future__ import annotations

import argparse
import time
from concurrent.futures import ThreadPoolExecutor

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--requests", type=int, default=4, help="requests per client")
    parser.add_argument("--concurrency", type=int, default=1, help="jobs the server runs at once")
    parser.add_argument("--quality", default="fast", choices=["fast", "accurate"])
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--spacing", type=float, default=4.0)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    case = generate_phantom(0, shape=(args.size,) * 3, spacing=(args.spacing,) * 3)
    volume = Volume(case.image, case.affine, "CT")
    segmenter = Segmenter("default", device=args.device)
    segmenter.segment(volume, ["liver"], quality=args.quality)  # warm-up
    slot = ModelSlot("default", "segmentation", segmenter, args.concurrency, max_queue=max(args.clients))
    print(f"volume {volume.shape} at {args.spacing} mm, quality {args.quality}, server concurrency "
          f"{args.concurrency}, {args.requests} requests per client")
    print(f"{'clients':>7} {'requests':>8} {'req/s':>7} {'p50 s':>7} {'p95 s':>7}")
    with running(create_app(ServerConfig(), {"default": slot})) as url:
        for clients in args.clients:
            wall, latencies = run_clients(url, volume, clients, args.requests, args.quality)
            p50, p95 = np.percentile(latencies, [50, 95])
            print(f"{clients:>7} {len(latencies):>8} {len(latencies) / wall:>7.2f} {p50:>7.2f} {p95:>7.2f}")


if __name__ == "__main__":
    main()
