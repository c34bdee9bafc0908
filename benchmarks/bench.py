"""`janusflow bench`: per-stage latency of the official-style eager pipeline (the baseline) and of
our runtime backends, side by side in one process, with this machine's floors measured in the same
run. Warm-up excluded; medians of repeats; thread settings explicit and reported."""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import diffusers
import matplotlib
import numpy as np
import onnxruntime
import psutil
import torch
import transformers
from PIL import Image
from transformers import DynamicCache

matplotlib.use("Agg")  # before pyplot: the bench writes its chart to a file, never to a screen
import matplotlib.pyplot as plt  # noqa: E402

from janusflow_trt import Pipeline
from janusflow_trt.engines import ReferenceEngine, RuntimeEngine
from janusflow_trt.files import write_all
from janusflow_trt.janusflow_ref import generation as ref_gen
from janusflow_trt.janusflow_ref.config import JanusFlowConfig, load_config
from janusflow_trt.janusflow_ref.processor import Processor
from janusflow_trt.janusflow_ref.sampling import SamplingParams
from janusflow_trt.janusflow_ref.vae import load_vae, resolve_vae_dir
from janusflow_trt.janusflow_ref.weights import load_model
from janusflow_trt.runtime import text2img
from janusflow_trt.runtime.backends import SeamWrapper
from janusflow_trt.runtime.cpu_isa import cpu_flags, has_bf16, matrix_isa
from janusflow_trt.runtime.decode import Decoder
from janusflow_trt.runtime.euler_step import euler_state, euler_step
from janusflow_trt.runtime.llm import new_cache, prefill
from janusflow_trt.runtime.torch_backend import TorchBackend

from . import floors

PROMPT = "A cute and adorable baby fox with big brown eyes, autumn leaves in the background, highly detailed."


def timed(fn: Callable[[], object], repeat: int, warmup: int = 2) -> float:
    """Median wall time in ms after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def rss_mb() -> float:
    return psutil.Process().memory_info().rss / 2**20


class Baseline:
    """The official demo's pipeline, eager: HF generate-style DynamicCache decode, prompt recomputed
    at every Euler step."""

    name = "baseline"

    def __init__(self, model, vae, processor):
        self.m, self.vae, self.p = model, vae, processor
        self.pipe = Pipeline(model.cfg, processor, ReferenceEngine(model, processor, lambda: vae), "torch")

    @torch.inference_mode()
    def siglip(self, px):
        return self.m.encode_image(torch.from_numpy(px))

    @torch.inference_mode()
    def prefill(self, embeds):
        cache = DynamicCache(config=self.m.cfg.llm)
        out = self.m.language_model(inputs_embeds=torch.from_numpy(embeds), cache=cache, use_cache=True)
        return out, cache

    def ttft(self, image, question):
        return self.pipe.chat(image, question, max_new_tokens=1)

    def chat_decode_ms(self, image, question, tokens: int) -> float:
        self.pipe.chat(image, question, max_new_tokens=tokens)  # warm-up
        return self.pipe.chat(image, question, max_new_tokens=tokens).timings["decode_ms_per_token"]

    @torch.inference_mode()
    def decode_ms(self, embeds, tokens: int) -> float:
        out, cache = self.prefill(embeds)
        tok = int(out.logits[0, -1].argmax())
        times = []
        for _ in range(tokens + 2):
            t0 = time.perf_counter()
            out = self.m.language_model(input_ids=torch.tensor([[tok]]), cache=cache, use_cache=True)
            tok = int(out.logits[0, -1].argmax())
            times.append(time.perf_counter() - t0)
        return statistics.median(times[2:]) * 1e3

    @torch.inference_mode()
    def euler_ms(self, z, repeat: int) -> dict[str, float]:
        prefix, mask = ref_gen.prompt_prefix(self.m, self.p, PROMPT, z.shape[0])
        z_in = torch.from_numpy(np.concatenate([z, z]))
        t = torch.full((z_in.shape[0],), 500.0)
        z_emb, t_emb, skip = self.m.gen_encode(z_in, t)
        llm_in = torch.cat([prefix, t_emb.unsqueeze(1), z_emb], dim=1)
        hidden = self.m.language_model.model(inputs_embeds=llm_in, attention_mask=mask).last_hidden_state
        g = z_emb.shape[1]
        return {
            "enc": timed(lambda: self.m.gen_encode(z_in, t), repeat),
            "llm": timed(lambda: self.m.language_model.model(inputs_embeds=llm_in, attention_mask=mask), repeat),
            "dec": timed(lambda: self.m.gen_decode(hidden[:, -g:], skip, t_emb), repeat),
        }

    @torch.inference_mode()
    def vae_ms(self, z, repeat: int) -> float:
        zt = torch.from_numpy(z)
        return timed(lambda: ref_gen.vae_decode(self.vae, zt), repeat)

    def image_s(self, z, steps: int) -> float:
        return self.pipe.generate(PROMPT, steps=steps, init_latents=z).timings["total_s"] / z.shape[0]


class Timer(SeamWrapper):
    """Times every graph call through the seam (synchronised around each call on a GPU, so a step run
    through it is never captured: this is for the split of a step's time, not for the step's own time)."""

    def __init__(self, inner):
        super().__init__(inner)
        self.capturable, self.stream = False, None
        self.ms: dict[str, list[float]] = {}

    def run(self, graph, feeds):
        sync(self.device)
        t0 = time.perf_counter()
        out = self.inner.run(graph, feeds)
        sync(self.device)
        self.ms.setdefault(graph, []).append((time.perf_counter() - t0) * 1e3)
        return out

    def median(self, graph: str) -> float:
        return statistics.median(self.ms[graph])


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class Runtime:
    """Our pipelines over one backend: user-facing stages (TTFT, chat decode, s/image) through the
    Pipeline users run; per-stage times from the same pipeline's step functions (runtime/decode.py,
    runtime/euler_step.py) on its backend, split per graph call by a Timer around the seam."""

    def __init__(self, pipe: Pipeline, precision: str = "fp32"):
        self.pipe, self.b, self.cfg, self.p = pipe, pipe.engine.backend, pipe.cfg, pipe.processor
        self.name = self.b.name if precision == "fp32" else f"{self.b.name}-{precision}"

    def tensor(self, a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a)).to(self.b.device)

    def siglip(self, px):
        return self.b.run("siglip", {"pixel_values": self.tensor(px)})

    def prefill(self, embeds, backend=None):
        b = backend or self.b
        cache = new_cache(b, self.cfg, 1, embeds.shape[1])  # sized as chat sizes it
        return prefill(b, cache, self.tensor(embeds))["logits"], cache

    def ttft(self, image, question):
        return self.pipe.chat(image, question, max_new_tokens=1)

    def chat_decode_ms(self, image, question, tokens: int) -> float:
        self.pipe.chat(image, question, max_new_tokens=tokens)  # warm-up
        return self.pipe.chat(image, question, max_new_tokens=tokens).timings["decode_ms_per_token"]

    def decode_ms(self, embeds, tokens: int) -> float:
        """Median ms/token of chat's decode step (embed + LLM + cache write + sampling on the device +
        the token id's host read), the cache grown in buckets as in chat."""
        dec = Decoder(self.b, *self.prefill(embeds)[::-1], SamplingParams())
        times = []
        for _ in range(tokens + 2):
            t0 = time.perf_counter()
            dec.step()
            int(dec.ids)
            times.append(time.perf_counter() - t0)
        return statistics.median(times[2:]) * 1e3

    def decode_parts_ms(self, embeds, tokens: int) -> dict[str, float]:
        """Where a decode step's time goes: the embed graph call, the LLM graph call (the rest: host)."""
        timer = Timer(self.b)
        dec = Decoder(timer, *self.prefill(embeds, timer)[::-1], SamplingParams())
        for _ in range(tokens):
            dec.step()
        return {"embed": timer.median("embed"), "llm": timer.median("llm")}

    def decode_weights(self) -> dict | None:
        """The bytes a decode token reads, from the LLM graph file this backend runs (INT8 / FP16 /
        FP32 as stored); None for a backend without ONNX files (FP32 parameters, counted from the config)."""
        file = self.b.graph_file("llm")
        if file is None:
            return None
        w = floors.graph_weight_bytes(file)
        return {"file": file.name, "weight_bytes": w["weights"], "by_dtype": w["by_dtype"],
                "kv_bytes": torch.empty(0, dtype=self.b.kv_dtype).element_size()}

    def euler_ms(self, z, repeat: int) -> dict[str, float]:
        """The pipeline's Euler step (euler_step over an EulerState) at t = 500: the whole step timed as
        it runs, and split per graph call by a Timer."""
        cache = text2img.prefill_prefix(self.b, self.cfg, self.p, PROMPT, z.shape[0])
        st = euler_state(self.b, cache, torch.from_numpy(z), 30, 2.0)
        st.t.fill_(500.0)
        step = timed(lambda: (euler_step(self.b, st), sync(self.b.device)), repeat)
        timer = Timer(self.b)
        for _ in range(repeat + 2):
            euler_step(timer, st)
        return {"enc": timer.median("gen_enc"), "llm": timer.median("llm_gen"), "dec": timer.median("gen_dec"),
                "step": step}

    def vae_ms(self, z, repeat: int) -> float:
        zt = self.tensor(z)
        return timed(lambda: (text2img.vae_decode(self.b, zt), sync(self.b.device)), repeat)

    def image_s(self, z, steps: int) -> float:
        return self.pipe.generate(PROMPT, steps=steps, init_latents=z).timings["total_s"] / z.shape[0]


def measure(runner, cfg, processor, image, contexts, repeat, decode_tokens, e2e_steps, log) -> dict:
    r: dict = {}
    ci = processor.chat_inputs(image, "Describe this image in detail.")
    px = ci.pixel_values.numpy()
    r["siglip_ms"] = timed(lambda: runner.siglip(px), repeat)
    rng = np.random.default_rng(0)
    emb = (rng.standard_normal((1, ci.input_ids.shape[1], cfg.hidden)) * 0.5).astype(np.float32)
    r["prefill_tokens"] = int(emb.shape[1])
    r["prefill_ms"] = timed(lambda: runner.prefill(emb), repeat)
    r["ttft_ms"] = timed(lambda: runner.ttft(image, "Describe this image in detail."), repeat)
    r["chat_decode_ms"] = runner.chat_decode_ms(image, "Describe this image in detail.", 4 * decode_tokens)
    log(f"  {runner.name}: siglip {r['siglip_ms']:.1f} ms, prefill {r['prefill_ms']:.1f} ms, "
        f"TTFT {r['ttft_ms']:.1f} ms, chat decode {r['chat_decode_ms']:.2f} ms/token")
    r["decode_ms"] = {}
    for ctx in contexts:
        e = (rng.standard_normal((1, ctx, cfg.hidden)) * 0.5).astype(np.float32)
        r["decode_ms"][str(ctx)] = runner.decode_ms(e, decode_tokens)
        log(f"  {runner.name}: decode @ {ctx}: {r['decode_ms'][str(ctx)]:.2f} ms/token")
        if hasattr(runner, "decode_parts_ms"):
            r.setdefault("decode_parts_ms", {})[str(ctx)] = runner.decode_parts_ms(e, decode_tokens)
    z = rng.standard_normal((1, *cfg.latent_shape)).astype(np.float32)
    r["euler_ms"] = runner.euler_ms(z, repeat)
    r["euler_ms"].setdefault("step", r["euler_ms"]["enc"] + r["euler_ms"]["llm"] + r["euler_ms"]["dec"])
    r["vae_ms"] = runner.vae_ms(z, repeat)
    log(f"  {runner.name}: Euler step {r['euler_ms']['step']:.1f} ms "
        f"(enc {r['euler_ms']['enc']:.1f} / llm {r['euler_ms']['llm']:.1f} / dec {r['euler_ms']['dec']:.1f}), "
        f"VAE {r['vae_ms']:.1f} ms")
    r["e2e_steps"] = e2e_steps
    r["s_per_image"] = runner.image_s(z, e2e_steps)
    r["rss_mb_after"] = rss_mb()
    if hasattr(runner, "decode_weights"):
        r["decode_weights"] = runner.decode_weights()
    return r


def machine_info(threads: int) -> dict:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "logical_cores": os.cpu_count(), "threads": threads,
            "torch_threads": torch.get_num_threads(), "ort_intra_op_threads": threads,
            "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"), "python": platform.python_version(),
            "matrix_isa": matrix_isa(cpu_flags()), "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
            "transformers": transformers.__version__, "diffusers": diffusers.__version__}


def measure_floors(result: dict) -> None:
    """Measured first: it also brings the CPU and allocator to a steady state before any backend runs."""
    gemm, read = floors.gemm_probe(), floors.read_probe()
    result["floors"] = {"gemm_gflops": gemm["best"], "read_gbs": read["best"], "gemm_probe": gemm, "read_probe": read}
    if has_bf16(cpu_flags()):  # without BF16 instructions the emulated GEMM is slow to even measure (AVX2: minutes)
        g16 = floors.gemm_probe(dtype=torch.bfloat16)
        result["floors"].update(gemm_bf16_gflops=g16["best"], gemm_bf16_probe=g16)
    # one verdict for the run (tools/perf_tables.py reads it): floor ratios are left out of a noisy one
    result["floors"]["noisy"] = any(p["noisy"] for k, p in result["floors"].items() if k.endswith("_probe"))


def add_floors(result: dict, cfg: JanusFlowConfig, prefix_len: int) -> None:
    gflops, gbs = result["floors"]["gemm_gflops"], result["floors"]["read_gbs"]
    ours = floors.euler_step_flops(cfg, 2, prefix_len, recompute_prefix=False)
    official = floors.euler_step_flops(cfg, 2, prefix_len, recompute_prefix=True)
    result["floors"]["euler_step_gflop"] = {"runtime": sum(ours.values()) / 1e9,
                                            "official_loop": sum(official.values()) / 1e9,
                                            "runtime_parts": {k: v / 1e9 for k, v in ours.items()}}
    for name, r in result["backends"].items():
        flop = official if name.startswith("baseline") else ours
        bf16 = name.endswith("-bf16")  # BF16 columns against the BF16 GEMM rate and 2-byte weights
        rate = result["floors"].get("gemm_bf16_gflops", gflops) if bf16 else gflops
        floor_ms = sum(flop.values()) / (rate * 1e9) * 1e3
        r["euler_floor_ms"] = floor_ms
        r["euler_vs_floor"] = r["euler_ms"]["step"] / floor_ms
        w = r.get("decode_weights") or {}  # the run graph's stored bytes; else FP32 parameters
        r["decode_floor_ms"] = {c: floors.decode_bytes(cfg, int(c), 2 if bf16 else 4, w.get("weight_bytes"),
                                                        w.get("kv_bytes")) / (gbs * 1e9) * 1e3
                                for c in r["decode_ms"]}
        r["decode_vs_floor"] = {c: r["decode_ms"][c] / r["decode_floor_ms"][c] for c in r["decode_ms"]}


def ratios(result: dict) -> None:
    for name, r in result["backends"].items():
        # BF16 columns against the baseline in BF16 (the official demo's own precision), the rest against FP32
        base = result["backends"].get("baseline-bf16" if name.endswith("-bf16") else "baseline")
        if base is None:
            continue
        r["speedup_vs_baseline"] = {
            "siglip": base["siglip_ms"] / r["siglip_ms"], "prefill": base["prefill_ms"] / r["prefill_ms"],
            "ttft": base["ttft_ms"] / r["ttft_ms"], "chat_decode": base["chat_decode_ms"] / r["chat_decode_ms"],
            **{f"decode@{c}": base["decode_ms"][c] / r["decode_ms"][c] for c in r["decode_ms"]},
            "euler_step": base["euler_ms"]["step"] / r["euler_ms"]["step"], "vae": base["vae_ms"] / r["vae_ms"],
            "image": base["s_per_image"] / r["s_per_image"],
        }


def markdown(result: dict) -> str:
    names = list(result["backends"])
    b = result["backends"]
    ctxs = list(next(iter(b.values()))["decode_ms"])
    rows = [("SigLIP ms", lambda r: r["siglip_ms"]), (f"prefill ms ({next(iter(b.values()))['prefill_tokens']} tok)",
                                                       lambda r: r["prefill_ms"]),
            ("TTFT ms", lambda r: r["ttft_ms"]), ("chat decode ms/token (API)", lambda r: r["chat_decode_ms"])]
    for c in ctxs:
        rows.append((f"decode ms/token @ {c}", lambda r, c=c: r["decode_ms"][c]))
        rows.append((f"tokens/s @ {c}", lambda r, c=c: 1e3 / r["decode_ms"][c]))
    rows += [("Euler step ms", lambda r: r["euler_ms"]["step"]), ("  encoder ms", lambda r: r["euler_ms"]["enc"]),
             ("  LLM ms", lambda r: r["euler_ms"]["llm"]), ("  decoder ms", lambda r: r["euler_ms"]["dec"]),
             ("VAE ms", lambda r: r["vae_ms"]),
             (f"s/image ({next(iter(b.values()))['e2e_steps']} steps)", lambda r: r["s_per_image"])]
    if "floors" in result:
        rows += [("Euler step / FLOP floor", lambda r: r["euler_vs_floor"])]
        rows += [(f"decode / bandwidth floor @ {c}", lambda r, c=c: r["decode_vs_floor"][c]) for c in ctxs]
    out = ["| stage | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for label, f in rows:
        cells = []
        for n in names:
            v = f(b[n])
            s = b[n].get("speedup_vs_baseline", {})
            key = {"SigLIP ms": "siglip", "TTFT ms": "ttft", "Euler step ms": "euler_step", "VAE ms": "vae",
                   "chat decode ms/token (API)": "chat_decode"}.get(label)
            if label.startswith("decode ms"):
                key = "decode@" + label.rsplit(" ", 1)[1]
            elif label.startswith("prefill"):
                key = "prefill"
            elif label.startswith("s/image"):
                key = "image"
            extra = f" ({s[key]:.2f}x)" if key and n != "baseline" and key in s else ""
            cells.append(f"{v:.3g}{extra}")
        out.append(f"| {label} | " + " | ".join(cells) + " |")
    if "gemm_probe" in result.get("floors", {}):
        g, m = result["floors"]["gemm_probe"], result["floors"]["read_probe"]
        g16 = result["floors"].get("gemm_bf16_probe")
        isa = result["machine"].get("matrix_isa", {})

        def probe(p: dict, unit: str, fmt: str) -> str:
            return (f"{p['best']:{fmt}} {unit} (median {p['median']:{fmt}}, noise {p['noise']:.0%}, CPU share "
                    f"{p['cpu_share']:.0%})")

        bf16 = f"{probe(g16, 'GFLOP/s', '.0f')} BF16, " if g16 else "BF16 not measured (no BF16 instructions), "
        noisy = " - NOISY: the machine was busy, floor ratios are unreliable" if result["floors"]["noisy"] else ""
        out += ["", f"Floors: GEMM {probe(g, 'GFLOP/s', '.0f')} FP32, {bf16}read {probe(m, 'GB/s', '.1f')}{noisy}",
                "", "Matrix ISA: " + ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in isa.items())
                    + ". Columns ending -bf16 compare with baseline-bf16 and with the BF16 GEMM floor."]
    weights = {n: r["decode_weights"] for n, r in b.items() if r.get("decode_weights")}
    if weights:
        out += ["", "Decode floor counts the LLM graph's stored bytes: " + "; ".join(
            f"{n} {w['weight_bytes'] / 1e6:.1f} MB ({w['file']}: " + ", ".join(
                f"{k} {v / 1e6:.1f}" for k, v in w["by_dtype"].items()) + f"), KV {w['kv_bytes']} B/elem"
            for n, w in weights.items())]
    parts = {n: r["decode_parts_ms"] for n, r in b.items() if "decode_parts_ms" in r}
    if parts:
        def line(n, c, p):
            rest = b[n]["decode_ms"][c] - p["embed"] - p["llm"]
            return f"{n} @ {c}: embed {p['embed']:.2f}, LLM {p['llm']:.2f}, rest {rest:.2f}"

        out += ["", "Decode step, by call (ms): " + "; ".join(line(n, c, p) for n, ps in parts.items()
                                                              for c, p in ps.items())]
    return "\n".join(out) + "\n"


def chart(result: dict, path: Path) -> None:
    b = result["backends"]
    ctxs = list(next(iter(b.values()))["decode_ms"])
    stages = ["siglip", "prefill", "ttft", *[f"decode@{c}" for c in ctxs], "euler step", "vae"]

    def vals(r):
        return [r["siglip_ms"], r["prefill_ms"], r["ttft_ms"], *[r["decode_ms"][c] for c in ctxs],
                r["euler_ms"]["step"], r["vae_ms"]]

    fig, ax = plt.subplots(figsize=(10, 4.5))
    width = 0.8 / len(b)
    x = np.arange(len(stages))
    for i, (name, r) in enumerate(b.items()):
        ax.bar(x + i * width, vals(r), width, label=name)
    ax.set_xticks(x + width * (len(b) - 1) / 2, stages, rotation=20)
    ax.set_yscale("log")
    ax.set_ylabel("ms (log)")
    m = result["machine"]
    ax.set_title(f"JanusFlow {result['size']} on {m['cpu'][:40]}, {m['threads']} threads")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_bench(model_dir: Path, artifacts: Path | None, out_dir: Path, backends: list[str], contexts: list[int],
              threads: int, repeat: int = 3, decode_tokens: int = 16, e2e_steps: int = 30, size: str = "?",
              log: Callable[[str], None] = print) -> dict:
    torch.set_num_threads(threads)
    cfg = load_config(model_dir)
    processor = Processor(model_dir)
    image = Image.fromarray((np.random.default_rng(0).random((300, 400, 3)) * 255).astype(np.uint8))
    result = {"size": size, "model": str(model_dir), "machine": machine_info(threads), "contexts": contexts,
              "repeat": repeat, "backends": {}}
    model = load_model(model_dir)
    vae = load_vae(resolve_vae_dir(model_dir, None))
    log(f"loaded model (RSS {rss_mb():.0f} MB); measuring this machine's GEMM rate and read bandwidth ...")
    measure_floors(result)
    model16 = load_model(model_dir).to(torch.bfloat16) if any(b.endswith("-bf16") for b in backends) else None
    runners = {"baseline": lambda: Baseline(model, vae, processor),
               "torch-fast": lambda: Runtime(Pipeline(cfg, processor, RuntimeEngine(
                   TorchBackend(model, vae, threads), cfg, processor), "torch-fast")),
               # the official demo's BF16: the reference model cast to BF16 (its VAE too, by autocast below)
               "baseline-bf16": lambda: Baseline(model16, vae, processor),
               "torch-fast-bf16": lambda: Runtime(Pipeline(cfg, processor, RuntimeEngine(
                   TorchBackend(model16, vae, threads, dtype=torch.bfloat16), cfg, processor), "torch-fast"), "bf16"),
               "ort": lambda: Runtime(Pipeline.from_pretrained(model_dir, "ort", artifacts, threads=threads))}
    for name in backends:
        if name.startswith("ort-") and name not in runners:  # ort-fp16, ort-int8-cpu, ...: that exported variant
            runners[name] = lambda p=name[4:]: Runtime(
                Pipeline.from_pretrained(model_dir, "ort", artifacts, precision=p, threads=threads), p)
        log(f"benchmarking {name} ...")
        # the reference takes FP32 inputs: autocast feeds its BF16 weights BF16 (the demo casts them by hand)
        with torch.autocast("cpu", dtype=torch.bfloat16) if name == "baseline-bf16" else nullcontext():
            result["backends"][name] = measure(runners[name](), cfg, processor, image, contexts, repeat,
                                               decode_tokens, e2e_steps, log)
    prefix_len = len(processor.generation_ids(PROMPT)) - 1
    add_floors(result, cfg, prefix_len)
    ratios(result)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out_dir.mkdir(parents=True, exist_ok=True)
    write_all([(out_dir / "bench.json", lambda t: Path(t).write_text(json.dumps(result, indent=2))),
               (out_dir / "bench.md", lambda t: Path(t).write_text(markdown(result))),
               (out_dir / "bench.png", lambda t: chart(result, t))])
    return result
