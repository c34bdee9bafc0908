"""Where an image request's time to first Euler step goes on `janusflow serve --max-batch 4`: the server
in-process, C client threads in a closed loop of streamed 30-step requests. The image scheduler's calls
are timed by wrapping them (prefix prefills, step calls, VAE decodes), and each request's wait is split
into: queue (the route hands it to the engine -> the engine takes it: the rest of the running round),
prefix, other requests' step calls before its first one, and its own first step call (with its images).

    python tools/experiments/serve_image_wait.py MODEL ARTIFACTS [--step-images K] [--clients 4 --requests 16]
"""

from __future__ import annotations

import argparse
import socket
import threading
import time
from collections import Counter

import httpx
import numpy as np
import uvicorn
from serve_images import clients_loop, one  # this folder's load client (sys.path[0] when run as a script)

import janusflow_trt.image_batch as ib
from janusflow_trt import Pipeline
from janusflow_trt.serve.app import Settings, create_app
from janusflow_trt.serve.engine import EngineLoop

STEPS = 30
spans: list[tuple[str, float, float, object]] = []  # (kind, start, end, info)
taken: dict[int, float] = {}  # id(ImageRequest) -> when the engine took it
routed: list[float] = []  # when each route handed its job to the engine


def timed(kind: str, fn, info=lambda *a: None):
    def wrapper(*a, **k):
        before = info(*a)  # the call's arguments as they were before it ran
        t0 = time.perf_counter()
        out = fn(*a, **k)
        spans.append((kind, t0, time.perf_counter(), before))
        return out
    return wrapper


def instrument() -> None:
    ib.prefix_row = timed("prefix", ib.prefix_row)
    ib.ImageBatch._step = timed("step", ib.ImageBatch._step,
                                lambda self, g: (g.images, [id(r) for r in g.reqs if r.done == 0]))
    ib.ImageBatch._decode = timed("vae", ib.ImageBatch._decode)
    submit, engine_submit = ib.ImageBatch.submit, EngineLoop.submit

    def on_submit(self, req):
        taken[id(req)] = time.perf_counter()
        submit(self, req)

    def on_engine_submit(self, job):
        routed.append(time.perf_counter())
        engine_submit(self, job)

    ib.ImageBatch.submit, EngineLoop.submit = on_submit, on_engine_submit


def closed_loop(base: str, clients: int, requests: int) -> list[float]:
    with httpx.Client() as c:
        one(c, base, STEPS, 0)  # warm-up
    spans.clear()
    taken.clear()
    routed.clear()
    return clients_loop(base, clients, requests, STEPS)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model")
    ap.add_argument("artifacts")
    ap.add_argument("--step-images", type=int, default=None, help="--image-step-images (default: the server's)")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--requests", type=int, default=16)
    args = ap.parse_args()
    instrument()
    pipe = Pipeline.from_pretrained(args.model, backend="ort", artifacts=args.artifacts)
    pipe.generate("warm up", steps=2)
    app = create_app(pipe, Settings("m", max_batch=4, image_step_images=args.step_images, max_queue=256))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True).start()
    while not srv.started:
        time.sleep(0.1)
    t0 = time.perf_counter()
    firsts = closed_loop(f"http://127.0.0.1:{sock.getsockname()[1]}", args.clients, args.requests)
    wall = time.perf_counter() - t0
    srv.should_exit = True
    rows = []
    for rid, take in taken.items():
        own = next((s for s in spans if s[0] == "step" and rid in s[3][1]), None)
        if own is None:
            continue
        route = max(t for t in routed if t <= take)
        before = Counter()
        for kind, a, b, _ in spans:
            if a >= take and b <= own[1] and kind != "vae":
                before[kind] += b - a
        rows.append({"queue": take - route, **before, "own_step": own[2] - own[1], "own_images": own[3][0],
                     "server_ttfes": own[2] - route})
    print(f"{args.requests / wall * 60:.2f} images/min; client TTFES p50 / p90 "
          f"{np.percentile(firsts, 50) * 1e3:.0f} / {np.percentile(firsts, 90) * 1e3:.0f} ms")
    for kind in ("prefix", "step", "vae"):
        d = [b - a for k, a, b, info in spans if k == kind and (k != "step" or info[0] == 1)]
        print(f"{kind}{' (1 image)' if kind == 'step' else ''}: {len(d)} calls, median {np.median(d) * 1e3:.0f} ms")
    keys = ["queue", "prefix", "step", "own_step", "own_images", "server_ttfes"]
    for q in (50, 90):
        print(f"p{q}", {k: round(float(np.percentile([r.get(k, 0) for r in rows], q)) * (1 if k == "own_images"
                                                                                           else 1e3), 1) for k in keys})


if __name__ == "__main__":
    main()
