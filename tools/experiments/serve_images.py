"""Images under load on `janusflow serve` (issue 23's image targets): time to first Euler step (p50/p90)
under a steady stream of requests against one solo Euler step, and images/min at concurrency 4 with
Euler-step batching (--max-batch 4) against one request at a time (--max-batch 1); also what a partial
image's preview costs (the linear latent->RGB map + PNG) against a VAE decode of the same latent.

    python tools/experiments/serve_images.py --model D --artifacts A [--steps 30 --requests 12]
        [--configs batched_c4,time_sliced_c4 --out FILE]   (a subset / another file: a before-after pair)

Closed loop: C client threads each send its next request when its previous one ends. A request is a
streamed generation (`stream: true`, no partial images): the server opens the response after the
request's first Euler step, so the time to the response headers is the time to first Euler step as a
client sees it. Servers are `janusflow serve` subprocesses, one configuration at a time.
Writes docs/results/serve_images.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import torch

from janusflow_trt import Pipeline
from janusflow_trt.benchmarks.bench import timed as bench_timed
from janusflow_trt.files import write_atomic
from janusflow_trt.images import to_uint8
from janusflow_trt.serve.images import png, preview_pngs

ROOT = Path(__file__).resolve().parents[2]
# (name, --max-batch, client concurrency, --image-step-images or None)
CONFIGS = (("one_at_a_time", 1, 1, None), ("unbatched_c4", 1, 4, None), ("batched_c4", 4, 4, 4),
           ("time_sliced_c4", 4, 4, 1))


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q))


def timed(fn, repeat: int) -> float:
    """Median seconds of fn() over `repeat` runs after warm-up (the bench's timer)."""
    return bench_timed(fn, repeat) / 1e3


def solo_costs(args) -> dict[str, float]:
    pipe = Pipeline.from_pretrained(args.model, backend="ort", artifacts=args.artifacts)
    pipe.generate("warm up", steps=2)
    gen = [pipe.generate("a red fox in the snow", steps=args.steps, seed=i).timings for i in range(2)]
    x0 = np.random.default_rng(0).standard_normal((1, 4, 48, 48)).astype(np.float32)

    def vae_png():
        png(to_uint8(pipe.engine.vae(torch.from_numpy(x0)).float().cpu())[0])

    return {"step_ms": min(g["euler_ms_per_step"] for g in gen), "generate_s": min(g["total_s"] for g in gen),
            "preview_linear_ms": timed(lambda: preview_pngs(x0), 20) * 1e3, "preview_vae_ms": timed(vae_png, 5) * 1e3}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(args, max_batch: int, step_images: int | None) -> tuple[subprocess.Popen, str]:
    port = free_port()
    extra = ["--image-step-images", str(step_images)] if step_images else []
    proc = subprocess.Popen([sys.executable, "-m", "janusflow_trt.cli", "serve", "--model", args.model,
                             "--artifacts", args.artifacts, "--port", str(port), "--max-batch", str(max_batch),
                             "--max-queue", "256", *extra], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(base + "/ready").status_code == 200:
                return proc, base
        except httpx.HTTPError:
            pass
        assert proc.poll() is None and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.5)


def one(c: httpx.Client, base: str, steps: int, seed: int) -> tuple[float, float]:
    """-> (time to the response headers = first Euler step, time to the last byte)."""
    body = {"prompt": "a red fox in the snow", "stream": True, "seed": seed, "num_inference_steps": steps}
    t0 = time.perf_counter()
    with c.stream("POST", base + "/v1/images/generations", json=body, timeout=600) as r:
        first = time.perf_counter() - t0
        assert r.status_code == 200, r.read()
        for _ in r.iter_bytes():
            pass
    return first, time.perf_counter() - t0


def clients_loop(base: str, concurrency: int, requests: int, steps: int) -> list[float]:
    """`concurrency` client threads, each sending its next request (seeds 0..requests-1) when its previous
    one ends. -> each request's time to first Euler step."""
    firsts: list[float] = []
    todo = iter(range(requests))
    lock = threading.Lock()

    def client():
        with httpx.Client() as c:
            while True:
                with lock:
                    i = next(todo, None)
                if i is None:
                    return
                first, _ = one(c, base, steps, i)
                with lock:
                    firsts.append(first)

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return firsts


def closed_loop(base: str, concurrency: int, requests: int, steps: int) -> dict[str, float]:
    with httpx.Client() as c:
        one(c, base, steps, 0)  # warm-up
    t0 = time.perf_counter()
    firsts = clients_loop(base, concurrency, requests, steps)
    wall = time.perf_counter() - t0
    text = httpx.get(base + "/metrics").text
    rounds = {k: float(v) for k, v in (ln.split() for ln in text.splitlines()
                                       if ln.startswith("janusflow_euler_round_seconds_") and "{" not in ln)}
    out = {"images_per_min": requests / wall * 60, "ttfes_p50_s": pct(firsts, 50), "ttfes_p90_s": pct(firsts, 90),
           "wall_s": wall}
    if rounds.get("janusflow_euler_round_seconds_count"):
        n = rounds["janusflow_euler_round_seconds_count"]
        out["round_ms"] = rounds["janusflow_euler_round_seconds_sum"] / n * 1e3
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--artifacts", required=True)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--requests", type=int, default=12)
    ap.add_argument("--reverse", action="store_true", help="run the server configurations in reverse order "
                    "(a second pass that cancels a drift in the machine's load)")
    ap.add_argument("--configs", default=",".join(c[0] for c in CONFIGS),
                    help="comma-separated server configurations to run (default: all)")
    ap.add_argument("--out", type=Path, help="results file (default: docs/results/serve_images[_reverse].json)")
    args = ap.parse_args()
    names = args.configs.split(",")
    unknown = set(names) - {c[0] for c in CONFIGS}
    if unknown:
        ap.error(f"unknown --configs {sorted(unknown)}")
    configs = [c for c in CONFIGS if c[0] in names]
    res: dict = {"solo": solo_costs(args), "steps": args.steps, "requests": args.requests}
    for name, max_batch, conc, step_images in configs[::-1] if args.reverse else configs:
        proc, base = serve(args, max_batch, step_images)
        try:
            res[name] = {"max_batch": max_batch, "concurrency": conc, "step_images": step_images or max_batch,
                         **closed_loop(base, conc, args.requests, args.steps)}
        finally:
            proc.terminate()
            proc.wait(30)
        print(name, res[name], flush=True)
    step = res["solo"]["step_ms"] / 1e3
    for name, *_ in configs:
        res[name]["ttfes_p90_in_solo_steps"] = res[name]["ttfes_p90_s"] / step
        if "one_at_a_time" in res:
            res[name]["images_per_min_vs_one_at_a_time"] = \
                res[name]["images_per_min"] / res["one_at_a_time"]["images_per_min"]
    out = args.out or ROOT / "docs" / "results" / f"serve_images{'_reverse' if args.reverse else ''}.json"
    text = json.dumps(res, indent=2) + "\n"
    write_atomic(out, lambda tmp: Path(tmp).write_text(text))
    print("| server | concurrency | images/min (vs one at a time) | TTFES p50 | TTFES p90 | p90 / solo step |"
          " mean image round |\n|---|---|---|---|---|---|---|")
    for name, *_ in configs:
        r = res[name]
        rnd = f"{r['round_ms']:.0f} ms" if "round_ms" in r else "-"
        print(f"| {name}: --max-batch {r['max_batch']}, {r['step_images']} image(s)/step call | {r['concurrency']} | "
              f"{r['images_per_min']:.2f} ({r.get('images_per_min_vs_one_at_a_time', float('nan')):.2f}x) | "
              f"{r['ttfes_p50_s'] * 1e3:.0f} ms | {r['ttfes_p90_s'] * 1e3:.0f} ms | "
              f"{r['ttfes_p90_in_solo_steps']:.2f} | {rnd} |")
    print(json.dumps(res["solo"]))


if __name__ == "__main__":
    main()
