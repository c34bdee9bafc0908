"""`janusflow bench-serve`: load on `janusflow serve` through the `openai` async client, reported the way
vLLM's `bench serve` and NVIDIA's AIPerf report it.

It starts the server itself (`janusflow serve` as a subprocess on a free 127.0.0.1 port, waits for
/ready, stops it at the end) or targets `--url`. Each run is a closed loop at one concurrency (N clients,
each sends its next request when its last one ended) or an open loop at a Poisson request rate, bounded by
a request count AND a time; warm-up requests run first and are not counted.

Per request: TTFT (request sent -> the first token's chunk), ITL (gaps between token chunks, pooled, as
vLLM's ITL; the server streams one chunk per token, "" where a token completes no text yet), TPOT
((E2E - TTFT) / (output tokens - 1): vLLM's TPOT, AIPerf's "inter token latency"), E2E latency; per
run: output tokens/s, requests/s, images/min (all over the run's wall time), goodput (requests/s that
met the SLO) and the server's time to first Euler step (its /metrics histogram, scraped before and
after the run).

Chat answers have a fixed length: each request sends `max_tokens` and the server's `ignore_eos`
extension (as vLLM's), so a random-weight model's early end-of-sentence token does not shorten them; a
chat answer counts as correct when it has exactly `max_tokens` tokens and finish_reason "length".
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import os
import platform
import random
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import matplotlib
import numpy as np
import openai
import psutil
from openai import AsyncOpenAI
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from tqdm import tqdm

from janusflow_trt.errors import InputError, JanusFlowError
from janusflow_trt.files import write_into

matplotlib.use("Agg")  # before pyplot: the chart goes to a file, never to a screen
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402

QUESTION = "Describe this image in detail."
IMAGE_PROMPT = "A cute and adorable baby fox with big brown eyes, autumn leaves in the background, highly detailed."
EULER_METRIC = "janusflow_time_to_first_euler_step_seconds"  # a histogram the server may export
WORKLOADS = ("chat", "images", "mixed")
QUANTILES = (50, 90, 99)


@dataclass(frozen=True)
class SLO:
    """A request is "good" when it meets every bound of its kind (vLLM's --goodput, in ms)."""

    ttft_ms: float = 2000.0
    tpot_ms: float = 100.0
    image_ms: float = 30_000.0

    def good(self, s: Sample) -> bool:
        if not s.ok:
            return False
        if s.kind == "image":
            return s.e2e * 1e3 <= self.image_ms
        return s.ttft is not None and s.ttft * 1e3 <= self.ttft_ms and (s.tpot is None or s.tpot * 1e3 <= self.tpot_ms)


@dataclass
class Sample:
    """One request as the client saw it (times in seconds from its send)."""

    kind: str  # "chat" | "image"
    ok: bool = False
    error: str | None = None
    ttft: float | None = None
    chunks: list[float] = field(default_factory=list)  # arrival time of each content chunk
    e2e: float = 0.0
    output_tokens: int = 0
    images: int = 0
    text: str = ""
    pngs: list[bytes] = field(default_factory=list)

    @property
    def itl(self) -> list[float]:
        return list(np.diff(self.chunks)) if len(self.chunks) > 1 else []

    @property
    def tpot(self) -> float | None:
        if self.ttft is None or self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)


@dataclass(frozen=True)
class Workload:
    """What the requests ask: a chat about one of `images` (a 64-token answer by default) or a
    `image_steps`-step generation; `mixed` makes every `image_every`-th request an image."""

    name: str
    max_tokens: int
    image_steps: int
    image_every: int
    images: tuple[str, ...]  # data: URLs

    def kind(self, i: int) -> str:
        if self.name == "mixed":
            return "image" if i % self.image_every == self.image_every - 1 else "chat"
        return "image" if self.name == "images" else "chat"


def test_images(n: int, seed: int = 0) -> tuple[str, ...]:
    """n distinct random 384x384 PNGs as data: URLs (distinct, so no request repeats another's input)."""
    rng = np.random.default_rng(seed)
    urls = []
    for _ in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (384, 384, 3), dtype=np.uint8)).save(buf, format="PNG")
        urls.append("data:image/png;base64," + base64.b64encode(buf.getvalue()).decode())
    return tuple(urls)


def chat_messages(image_url: str, question: str = QUESTION) -> list[dict[str, Any]]:
    return [{"role": "user", "content": [{"type": "text", "text": question},
                                         {"type": "image_url", "image_url": {"url": image_url}}]}]


async def chat_once(client: AsyncOpenAI, model: str, image_url: str, max_tokens: int,
                    question: str = QUESTION) -> Sample:
    """A streamed greedy chat with usage; correct when it has exactly max_tokens tokens."""
    s = Sample("chat")
    t0 = time.perf_counter()
    try:
        stream = await client.chat.completions.create(
            model=model, messages=chat_messages(image_url, question), max_tokens=max_tokens,  # type: ignore[arg-type]
            temperature=0.0, stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        finish, text = None, []
        async for chunk in stream:
            now = time.perf_counter() - t0
            if chunk.choices:
                delta = chunk.choices[0].delta
                if delta.content is not None and delta.role is None:  # a token's chunk (not the role chunk)
                    s.ttft = now if s.ttft is None else s.ttft
                    s.chunks.append(now)
                    text.append(delta.content)
                finish = chunk.choices[0].finish_reason or finish
            if chunk.usage is not None:
                s.output_tokens = chunk.usage.completion_tokens
        s.e2e, s.text = time.perf_counter() - t0, "".join(text)
        s.ok = s.output_tokens == max_tokens and finish == "length"
        if not s.ok:
            s.error = f"{s.output_tokens} tokens (finish {finish}), expected {max_tokens} (length)"
    except openai.APIError as e:
        s.e2e, s.error = time.perf_counter() - t0, f"{type(e).__name__}: {e}"
    return s


async def image_once(client: AsyncOpenAI, model: str, steps: int, seed: int) -> Sample:
    """One seeded 384x384 image; correct when one PNG of that size comes back."""
    s = Sample("image")
    t0 = time.perf_counter()
    try:
        r = await client.images.generate(model=model, prompt=IMAGE_PROMPT, n=1, size="384x384",
                                         response_format="b64_json",
                                         extra_body={"seed": seed, "num_inference_steps": steps})
        s.e2e = time.perf_counter() - t0
        s.pngs = [base64.b64decode(d.b64_json or "") for d in r.data or []]
        sizes = [Image.open(io.BytesIO(p)).size for p in s.pngs]
        s.images, s.ok = len(s.pngs), sizes == [(384, 384)]
        if not s.ok:
            s.error = f"image sizes {sizes}, expected [(384, 384)]"
    except (openai.APIError, OSError) as e:
        s.e2e, s.error = time.perf_counter() - t0, f"{type(e).__name__}: {e}"
    return s


def request(client: AsyncOpenAI, model: str, w: Workload, i: int):
    if w.kind(i) == "image":
        return image_once(client, model, w.image_steps, seed=i)
    return chat_once(client, model, w.images[i % len(w.images)], w.max_tokens)


async def closed_loop(client: AsyncOpenAI, model: str, w: Workload, concurrency: int, n: int, duration: float,
                      bar: tqdm) -> tuple[list[Sample], float]:
    """`concurrency` clients; each sends its next request when its last one ended, until n were sent or
    `duration` seconds passed. -> samples, wall seconds (first send -> last answer)."""
    out: list[Sample] = []
    t0, nxt = time.perf_counter(), iter(range(n))

    async def client_loop() -> None:
        for i in nxt:
            if time.perf_counter() - t0 > duration:
                return
            out.append(await request(client, model, w, i))
            bar.update()

    await asyncio.gather(*(client_loop() for _ in range(concurrency)))
    return out, time.perf_counter() - t0


async def open_loop(client: AsyncOpenAI, model: str, w: Workload, rate: float, n: int, duration: float, seed: int,
                    bar: tqdm) -> tuple[list[Sample], float]:
    """Requests sent at Poisson arrivals of `rate` per second (exponential gaps, seeded), whatever is in
    flight, until n were sent or `duration` seconds passed."""
    rng = random.Random(seed)
    t0, tasks = time.perf_counter(), []

    async def one(i: int) -> Sample:
        s = await request(client, model, w, i)
        bar.update()
        return s

    at = 0.0
    for i in range(n):
        if at > duration:
            break
        await asyncio.sleep(max(at - (time.perf_counter() - t0), 0.0))
        tasks.append(asyncio.create_task(one(i)))
        at += rng.expovariate(rate)
    out = list(await asyncio.gather(*tasks))
    return out, time.perf_counter() - t0


def pct(values: list[float], scale: float = 1e3) -> dict[str, float | None]:
    """p50 / p90 / p99 and the mean, in ms (numpy's linear interpolation, as vLLM's bench)."""
    if not values:
        return {**{f"p{q}": None for q in QUANTILES}, "mean": None}
    a = np.asarray(values) * scale
    return {**{f"p{q}": round(float(np.percentile(a, q)), 3) for q in QUANTILES}, "mean": round(float(a.mean()), 3)}


def summarize(samples: list[Sample], wall: float, slo: SLO) -> dict[str, Any]:
    ok = [s for s in samples if s.ok]
    chat = [s for s in ok if s.kind == "chat"]
    tokens = sum(s.output_tokens for s in ok)
    images = sum(s.images for s in ok)
    errors: dict[str, int] = {}
    for s in samples:
        if not s.ok:
            key = (s.error or "?")[:160]
            errors[key] = errors.get(key, 0) + 1
    return {
        "requests": len(samples), "completed": len(ok), "failed": len(samples) - len(ok), "errors": errors,
        "chat_requests": len(chat), "image_requests": sum(1 for s in ok if s.kind == "image"),
        "duration_s": round(wall, 3), "output_tokens": tokens, "images": images,
        "output_tokens_per_s": round(tokens / wall, 3) if wall else None,
        "requests_per_s": round(len(ok) / wall, 3) if wall else None,
        "images_per_min": round(images / wall * 60, 3) if wall else None,
        "goodput_requests_per_s": round(sum(slo.good(s) for s in samples) / wall, 3) if wall else None,
        "ttft_ms": pct([s.ttft for s in chat if s.ttft is not None]),
        "itl_ms": pct([g for s in chat for g in s.itl]),
        "itl_max_ms": round(max((g for s in chat for g in s.itl), default=0.0) * 1e3, 3),
        "tpot_ms": pct([t for s in chat if (t := s.tpot) is not None]),
        "e2e_ms": pct([s.e2e for s in ok]),
        "image_e2e_ms": pct([s.e2e for s in ok if s.kind == "image"]),
    }


# -- the server's /metrics --------------------------------------------------------------------------------
def scrape(url: str) -> dict[str, dict[float, float]]:
    """Cumulative bucket counts {le: count} of each histogram /metrics exports."""
    text = httpx.get(url + "/metrics", timeout=30).text
    out: dict[str, dict[float, float]] = {}
    for fam in text_string_to_metric_families(text):
        if fam.type != "histogram":
            continue
        for s in fam.samples:
            if s.name.endswith("_bucket"):
                le = float(s.labels["le"])
                out.setdefault(fam.name, {})[le] = out.get(fam.name, {}).get(le, 0.0) + s.value
    return out


def histogram_quantiles(before: dict[float, float], after: dict[float, float]) -> dict[str, float | None]:
    """p50 / p90 / p99 in ms of the observations between two scrapes, interpolated inside a bucket as
    Prometheus' histogram_quantile does (so only as fine as the buckets)."""
    les = sorted(after)
    counts = [after[le] - before.get(le, 0.0) for le in les]
    total = counts[-1] if counts else 0.0
    res: dict[str, float | None] = {"count": total}
    for q in QUANTILES:
        if total <= 0:
            res[f"p{q}"] = None
            continue
        rank, lo, below = q / 100 * total, 0.0, 0.0
        for le, c in zip(les, counts, strict=True):
            if c >= rank:
                hi = les[-2] if le == float("inf") else le  # +Inf: the highest finite bound, as Prometheus
                res[f"p{q}"] = round((lo + (hi - lo) * (rank - below) / max(c - below, 1e-12)) * 1e3, 3)
                break
            lo, below = le, c
    return res


# -- a server started for the run ---------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def started_server(model: Path, artifacts: Path, max_batch: int, log_path: Path, threads: int | None,
                   timeout: float = 300.0) -> Iterator[tuple[str, psutil.Process]]:
    """`janusflow serve` as a subprocess on a free 127.0.0.1 port -> (URL, its process), once /ready
    answers; stopped (SIGTERM, then SIGKILL after 20 s) on every exit."""
    port = free_port()
    cmd = [sys.executable, "-m", "janusflow_trt.cli", "serve", "--model", str(model), "--backend", "ort",
           "--artifacts", str(artifacts), "--port", str(port), "--max-batch", str(max_batch),
           "--max-queue", "1024", "--served-model-name", "bench"]
    if threads:
        cmd += ["--threads", str(threads)]
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                tail = log_path.read_text(errors="replace").strip().splitlines()[-1:] or ["(no output)"]
                raise JanusFlowError(f"the server exited with code {proc.returncode}: {tail[0]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/ready", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise JanusFlowError(f"the server was not ready within {timeout:.0f} s (log: {log_path})")
            time.sleep(0.2)
        yield url, psutil.Process(proc.pid)
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def rss_mb(proc: psutil.Process | None) -> float | None:
    return round(proc.memory_info().rss / 2**20, 1) if proc is not None else None


# -- runs -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Plan:
    workloads: tuple[str, ...]
    concurrency: tuple[int, ...]
    rates: tuple[float, ...]
    requests: int
    duration: float
    warmup: int
    max_tokens: int
    image_steps: int
    image_every: int
    slo: SLO
    seed: int = 0


async def run_plan(url: str, plan: Plan, server: psutil.Process | None, progress: bool = True) -> dict[str, Any]:
    client = AsyncOpenAI(base_url=url + "/v1", api_key=os.environ.get("OPENAI_API_KEY", "unused"),
                         timeout=600, max_retries=0)
    model = (await client.models.list()).data[0].id
    images = test_images(8, plan.seed)
    runs = []
    for name in plan.workloads:
        w = Workload(name, plan.max_tokens, plan.image_steps, plan.image_every, images)
        for i in range(plan.warmup):  # not counted: first-call allocations, the KV cache's growth
            s = await request(client, model, w, i)
            if not s.ok:
                raise JanusFlowError(f"a warm-up {s.kind} request failed: {s.error}")
        modes = [("closed", float(c)) for c in plan.concurrency] + [("open", r) for r in plan.rates]
        for mode, x in modes:
            before = scrape(url)
            label = f"{name} c={int(x)}" if mode == "closed" else f"{name} {x:g} req/s"
            with tqdm(total=plan.requests, desc=label, unit="req", disable=not progress, leave=False) as bar:
                if mode == "closed":
                    samples, wall = await closed_loop(client, model, w, int(x), plan.requests, plan.duration, bar)
                else:
                    samples, wall = await open_loop(client, model, w, x, plan.requests, plan.duration, plan.seed,
                                                    bar)
            after = scrape(url)
            run = {"workload": name, "mode": mode, **({"concurrency": int(x)} if mode == "closed" else {"rate": x}),
                   **summarize(samples, wall, plan.slo), "server_rss_mb": rss_mb(server)}
            run["first_euler_step_ms"] = histogram_quantiles(before.get(EULER_METRIC, {}), after[EULER_METRIC]) \
                if EULER_METRIC in after else None
            runs.append(run)
            if progress:
                tqdm.write(line(run))
    await client.close()
    return {"model": model, "runs": runs}


def line(r: dict[str, Any]) -> str:
    x = f"c={r['concurrency']}" if r["mode"] == "closed" else f"{r['rate']:g}/s"
    return (f"{r['workload']:6s} {x:>7s}  {r['completed']}/{r['requests']} ok  {r['output_tokens_per_s']} tok/s  "
            f"{r['images_per_min']} img/min  TTFT p50 {r['ttft_ms']['p50']} ms  ITL p50 {r['itl_ms']['p50']} ms")


def targets(runs: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The issue's chat targets, where the run has chat at concurrency 1 and 8: output tokens/s at 8 >= 4x
    at 1; TTFT p50 at 8 <= 3x at 1."""
    at = {r["concurrency"]: r for r in runs if r["workload"] == "chat" and r["mode"] == "closed"}
    if 1 not in at or 8 not in at or not at[1]["output_tokens_per_s"] or not at[1]["ttft_ms"]["p50"]:
        return None
    tok = at[8]["output_tokens_per_s"] / at[1]["output_tokens_per_s"]
    ttft = at[8]["ttft_ms"]["p50"] / at[1]["ttft_ms"]["p50"]
    return {"chat_tokens_per_s_8_over_1": round(tok, 3), "chat_tokens_per_s_target": ">= 4", "tokens_met": tok >= 4,
            "chat_ttft_p50_8_over_1": round(ttft, 3), "chat_ttft_target": "<= 3", "ttft_met": ttft <= 3}


# -- reports ------------------------------------------------------------------------------------------------
def _ms(d: dict[str, Any] | None) -> str:
    if not d or d.get("p50") is None:
        return "-"
    return " / ".join(f"{d[f'p{q}']:.0f}" for q in QUANTILES)


def markdown(res: dict[str, Any]) -> str:
    m = res["meta"]
    rows = ["| workload | load | ok / sent | out tok/s | req/s | img/min | goodput req/s | TTFT ms p50/90/99 | "
            "ITL ms p50/90/99 | TPOT ms p50 | E2E ms p50/90/99 | 1st Euler step ms p50/90/99 |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["runs"]:
        x = f"c={r['concurrency']}" if r["mode"] == "closed" else f"Poisson {r['rate']:g}/s"
        tpot = r["tpot_ms"]["p50"]
        rows.append(f"| {r['workload']} | {x} | {r['completed']} / {r['requests']} | {r['output_tokens_per_s']:.1f} | "
                    f"{r['requests_per_s']:.2f} | {r['images_per_min']:.1f} | {r['goodput_requests_per_s']:.2f} | "
                    f"{_ms(r['ttft_ms'])} | {_ms(r['itl_ms'])} | {'-' if tpot is None else f'{tpot:.1f}'} | "
                    f"{_ms(r['e2e_ms'])} | {_ms(r['first_euler_step_ms'])} |")
    out = [f"# `janusflow bench-serve`: {m['model_desc']}", "",
           f"Command: `{m['command']}`", "",
           f"Server: {m['server']}. Client: `openai` {m['versions']['openai']} AsyncOpenAI, streamed chats with "
           f"`max_tokens` {m['max_tokens']} and `ignore_eos` (fixed-length answers), images of "
           f"{m['image_steps']} Euler steps; mixed = every {m['image_every']}th request an image. Each load: at "
           f"most {m['requests']} requests and {m['duration_s']:g} s, after {m['warmup']} warm-up requests.",
           f"Machine: {m['machine']}.", "",
           f"SLO for goodput: chat TTFT <= {m['slo']['ttft_ms']:g} ms and TPOT <= {m['slo']['tpot_ms']:g} ms; "
           f"image end-to-end <= {m['slo']['image_ms']:g} ms.", "", *rows, ""]
    if m.get("euler_note"):
        out += [m["euler_note"], ""]
    t = res.get("targets")
    if t:
        out += [f"Chat targets (issue 23): output tokens/s at c=8 / c=1 = **{t['chat_tokens_per_s_8_over_1']:.2f}** "
                f"(target >= 4: {'met' if t['tokens_met'] else 'missed'}); TTFT p50 at c=8 / c=1 = "
                f"**{t['chat_ttft_p50_8_over_1']:.2f}** (target <= 3: {'met' if t['ttft_met'] else 'missed'}).", ""]
    return "\n".join(out)


def plot(res: dict[str, Any], path: str) -> None:
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for wl in dict.fromkeys(r["workload"] for r in res["runs"]):
        rs = [r for r in res["runs"] if r["workload"] == wl and r["mode"] == "closed"]
        if not rs:
            continue
        c = [r["concurrency"] for r in rs]
        if wl == "images":
            img = axes[0].twinx()  # images/min on its own scale
            img.plot(c, [r["images_per_min"] for r in rs], "s--", color="tab:red", label="images: images/min")
            img.set_ylabel("images/min")
            img.legend(fontsize=8, loc="lower right")
        else:
            axes[0].plot(c, [r["output_tokens_per_s"] for r in rs], "o-", label=f"{wl}: output tokens/s")
            axes[0].set_ylabel("output tokens/s")
            for q, style in (("p50", "o-"), ("p90", "^:")):
                axes[1].plot(c, [r["ttft_ms"][q] for r in rs], style, label=f"{wl} TTFT {q}")
                axes[2].plot(c, [r["itl_ms"][q] for r in rs], style, label=f"{wl} ITL {q}")
    for ax, title in zip(axes, ("throughput", "time to first token (ms)", "inter-token latency (ms)"), strict=True):
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.set_xlabel("concurrent clients")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    fig.suptitle(res["meta"]["model_desc"], fontsize=10)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=110)
    plt.close(fig)


def machine() -> str:
    return (f"{platform.processor() or platform.machine()}, {psutil.cpu_count(logical=False)} physical / "
            f"{psutil.cpu_count()} logical cores, {psutil.virtual_memory().total / 2**30:.0f} GiB, "
            f"{platform.system()} {platform.release()}, Python {platform.python_version()}")


def write_results(res: dict[str, Any], out: Path, name: str) -> list[Path]:
    return write_into(out, [(f"{name}.json", lambda p: Path(p).write_text(json.dumps(res, indent=1) + "\n")),
                            (f"{name}.md", lambda p: Path(p).write_text(markdown(res))),
                            (f"{name}.png", lambda p: plot(res, p))])


def check_url(url: str) -> str:
    url = url.rstrip("/").removesuffix("/v1")
    if not url.startswith(("http://", "https://")):
        raise InputError(f"--url must be an http(s) URL, got {url!r}")
    return url


def wait_ready(url: str) -> None:
    try:
        r = httpx.get(url + "/ready", timeout=10)
    except httpx.HTTPError as e:
        raise JanusFlowError(f"--url {url}: no server answers ({type(e).__name__})") from None
    if r.status_code != 200:
        raise JanusFlowError(f"--url {url}: /ready answered {r.status_code}")



# -- soak: many mixed requests with malformed ones among them ------------------------------------------------
def malformed(image_url: str, model: str) -> list[tuple[str, str, str, bytes | dict | None]]:
    """(name, method, path, body) of requests the server must refuse with a 4xx error object."""
    chat = {"model": model, "messages": chat_messages(image_url), "max_tokens": 4}
    img = {"model": model, "prompt": "a fox"}
    b64 = base64.b64encode
    return [
        ("bad json", "POST", "/v1/chat/completions", b"{bad"),
        ("not an object", "POST", "/v1/chat/completions", b"[1]"),
        ("wrong type", "POST", "/v1/chat/completions", {**chat, "max_tokens": "4"}),
        ("unknown model", "POST", "/v1/chat/completions", {**chat, "model": "gpt-9"}),
        ("remote image", "POST", "/v1/chat/completions", {**chat, "messages": chat_messages("https://x/cat.png")}),
        ("not an image", "POST", "/v1/chat/completions",
         {**chat, "messages": chat_messages("data:image/png;base64," + b64(b"hello").decode())}),
        ("gif", "POST", "/v1/chat/completions", {**chat, "messages": chat_messages("data:image/gif;base64,R0lG")}),
        ("bad base64", "POST", "/v1/chat/completions", {**chat, "messages": chat_messages("data:image/png;base64,@@")}),
        ("no image", "POST", "/v1/chat/completions", {**chat, "messages": [{"role": "user", "content": "hi"}]}),
        ("multi-turn", "POST", "/v1/chat/completions",
         {**chat, "messages": chat_messages(image_url) + [{"role": "assistant", "content": "x"}]}),
        ("max_tokens beyond context", "POST", "/v1/chat/completions", {**chat, "max_tokens": 1_000_000}),
        ("prompt beyond context", "POST", "/v1/chat/completions",
         {**chat, "messages": chat_messages(image_url, "word " * 20_000)}),
        ("temperature", "POST", "/v1/chat/completions", {**chat, "temperature": 5}),
        ("image size", "POST", "/v1/images/generations", {**img, "size": "512x512"}),
        ("image n", "POST", "/v1/images/generations", {**img, "n": 10_000}),
        ("image steps", "POST", "/v1/images/generations", {**img, "num_inference_steps": 0}),
        ("empty prompt", "POST", "/v1/images/generations", {**img, "prompt": "  "}),
        ("unknown route", "POST", "/v1/completions", {}),
        ("wrong method", "GET", "/v1/chat/completions", None),
    ]


async def refused(http: httpx.AsyncClient, method: str, path: str, body: bytes | dict | None) -> str | None:
    """None when the server refused the request properly (a 4xx with an OpenAI error object holding a
    message, no traceback), else what was wrong."""
    kw: dict[str, Any] = {}
    if isinstance(body, bytes):
        kw = {"content": body, "headers": {"content-type": "application/json"}}
    elif body is not None:
        kw = {"json": body}
    try:
        r = await http.request(method, path, **kw)
    except httpx.HTTPError as e:
        return f"{type(e).__name__}: {e}"
    if not 400 <= r.status_code < 500:
        return f"status {r.status_code}"
    try:
        err = r.json()["error"]
        ok = isinstance(err.get("message"), str) and len(err["message"]) > 5 and "Traceback" not in r.text
    except (ValueError, KeyError, TypeError, AttributeError):
        ok = False
    return None if ok else f"status {r.status_code} without an error object: {r.text[:120]!r}"


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)


PIXEL_TOL = 2  # uint8 levels: batched Euler steps change GEMM shapes, hence the last bits of the latents


async def soak(url: str, server: psutil.Process | None, n: int, concurrency: int, n_bad: int, max_tokens: int,
               image_steps: int, image_every: int, seed: int = 0, progress: bool = True) -> dict[str, Any]:
    """n valid requests (chat about 4 images, every image_every-th an image of 2 seeds) and n_bad malformed
    ones, shuffled, at `concurrency`. A valid answer is correct when it equals the same request's answer
    run alone before the load (chat: the same text and max_tokens tokens; image: every pixel within
    PIXEL_TOL); a malformed one when refused with a 4xx error object. Server RSS after the solo runs
    (the warm-up) against the end."""
    client = AsyncOpenAI(base_url=url + "/v1", api_key=os.environ.get("OPENAI_API_KEY", "unused"), timeout=600,
                         max_retries=0)
    model = (await client.models.list()).data[0].id
    images = test_images(4, seed)
    w = Workload("mixed", max_tokens, image_steps, image_every, images)
    refs: dict[tuple[str, int], Sample] = {}
    for key, make in [(("chat", i), lambda i=i: chat_once(client, model, images[i], max_tokens)) for i in range(4)] + \
                     [(("image", s), lambda s=s: image_once(client, model, image_steps, s)) for s in range(2)]:
        refs[key] = await make()
        if not refs[key].ok:
            raise JanusFlowError(f"the solo {key[0]} request failed: {refs[key].error}")
    burst = [request(client, model, w, i) for i in range(concurrency)]  # the batch at its size, uncounted
    if not all(s.ok for s in await asyncio.gather(*burst)):
        raise JanusFlowError("a warm-up request failed")
    rss0 = rss_mb(server)
    bad = malformed(images[0], model)
    jobs: list[tuple[str, int]] = [("valid", i) for i in range(n)] + [("bad", i) for i in range(n_bad)]
    random.Random(seed).shuffle(jobs)
    samples: list[Sample] = []
    wrong: dict[str, int] = {}
    refusals: dict[str, int] = {}
    rss: list[float | None] = []
    headers = {"Authorization": f"Bearer {os.environ.get('OPENAI_API_KEY', 'unused')}"}
    t0, it = time.perf_counter(), iter(jobs)
    async with httpx.AsyncClient(base_url=url, timeout=600, headers=headers) as http:
        with tqdm(total=len(jobs), desc="soak", unit="req", disable=not progress) as bar:

            async def worker() -> None:
                for kind, i in it:
                    if kind == "bad":
                        name, method, path, body = bad[i % len(bad)]
                        if (why := await refused(http, method, path, body)) is not None:
                            wrong[f"malformed {name}: {why}"] = wrong.get(f"malformed {name}: {why}", 0) + 1
                        else:
                            refusals[name] = refusals.get(name, 0) + 1
                    else:
                        image = w.kind(i) == "image"
                        s = await (image_once(client, model, image_steps, i % 2) if image
                                   else chat_once(client, model, images[i % 4], max_tokens))
                        ref = refs[("image", i % 2) if image else ("chat", i % 4)]
                        if s.ok and image and np.abs(pixels(s.pngs[0]) - pixels(ref.pngs[0])).max() > PIXEL_TOL:
                            s.ok, s.error = False, "image differs from its solo run"
                        elif s.ok and not image and s.text != ref.text:
                            s.ok, s.error = False, "answer differs from its solo run"
                        samples.append(s)
                    bar.update()
                    if bar.n % 50 == 0:
                        rss.append(rss_mb(server))

            await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
        ready = (await http.get("/ready")).status_code
    await client.close()
    rss_end = rss_mb(server)
    res = summarize(samples, wall, SLO())
    valid_ok = res["failed"] == 0
    bad_ok = sum(refusals.values()) == n_bad
    growth = (rss_end - rss0) / rss0 if rss0 and rss_end else None
    return {"model": model, "valid": res, "malformed": {"sent": n_bad, "refused_properly": sum(refusals.values()),
                                                        "by_kind": refusals},
            # how much of a reference answer is visible text: random weights sample ids the test tokenizer
            # may decode to nothing, and then equal texts say little
            "reference_text_chars": [len(refs[("chat", i)].text) for i in range(4)],
            "wrong": wrong, "ready_status_at_end": ready, "server_rss_mb": {"after_warmup": rss0, "end": rss_end,
                                                                          "every_50": rss},
            "rss_growth": None if growth is None else round(growth, 4),
            "checks": {"every valid request correct": valid_ok, "every malformed one a 4xx error object": bad_ok,
                       "/ready 200 at the end": ready == 200,
                       "RSS growth after warm-up < 10%": None if growth is None else growth < 0.10}}


def soak_markdown(res: dict[str, Any]) -> str:
    m, v = res["meta"], res["valid"]
    rows = [f"| {k} | {'-' if ok is None else ('pass' if ok else 'FAIL')} |" for k, ok in res["checks"].items()]
    return "\n".join([
        f"# `janusflow bench-serve --soak`: {m['model_desc']}", "", f"Command: `{m['command']}`", "",
        f"{m['requests']} valid requests (chat with `max_tokens` {m['max_tokens']} and `ignore_eos` about 4 "
        f"images; every {m['image_every']}th an image of {m['image_steps']} Euler steps, 2 seeds) and "
        f"{res['malformed']['sent']} malformed ones ({len(res['malformed']['by_kind'])} kinds), shuffled, at "
        f"concurrency {m['concurrency']}. Correct: the same text / pixels (within {PIXEL_TOL} levels) as the "
        f"same request run alone before the load.", f"Machine: {m['machine']}.", "",
        "| check | result |", "|---|---|", *rows, "",
        f"Valid: {v['completed']} / {v['requests']} correct ({v['chat_requests']} chats, "
        f"{v['image_requests']} images) in "
        f"{v['duration_s']:.0f} s; TTFT p50/p90/p99 {_ms(v['ttft_ms'])} ms, E2E {_ms(v['e2e_ms'])} ms. "
        f"Malformed: {res['malformed']['refused_properly']} / {res['malformed']['sent']} refused with a 4xx error "
        f"object. Server RSS {res['server_rss_mb']['after_warmup']} MB after warm-up, "
        f"{res['server_rss_mb']['end']} MB at the end (growth {res['rss_growth']}).",
        *(["", "Wrong: " + json.dumps(res["wrong"])] if res["wrong"] else []), ""])
