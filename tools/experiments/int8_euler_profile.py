"""Where does an Euler step's time go, FP32 vs int8-cpu, at the golden widths (issue 24: Euler step >= 2.5x
FP32 on the CPU)? Which part of int8-cpu's time is INT8 work and which stayed float?

Per initialisation, on the exports tools/experiments/int8_speed.py made (WORK/golden-<init>/gate: FP32 and
the quality gate's int8-cpu graphs, their recorded calibration set), one process:
1. the Euler-step graph calls (gen_enc, llm_gen on the llm's session, gen_dec) through the runtime's own
   OrtBackend (its session options, IOBinding), fed the first recorded Euler-step sample of each graph
   (B = 2 for CFG, 577 new tokens, the prompt prefix in the K/V cache); FP32 and int8-cpu calls
   alternate, `--repeat` rounds, min per call; ratios are FP32 time / int8-cpu time of this run;
2. ONNX Runtime's profiler (SessionOptions.enable_profiling) on a second pair of backends, `--profile`
   runs after one warm-up, FP32 and int8-cpu alternating: per op type and per node kernel time, each
   node put in one class: int8 weight product (MatMulIntegerToFloat, QGemm, ...), (de)quantize, float
   weight product, float attention product (activation x activation MatMul: Q@K^T, P@V), float Conv,
   other float (norms, softmax pieces, masks, RoPE, GELU, layout);
3. `--knobs` (first init only): the int8-cpu recipe's knobs the profile points at, each a variant of the
   llm re-derived from the same FP32 graph and calibration set (export/int8.py: derive_int8, the lean
   plan's 8 samples, the recipe patched for the one knob): attention's score products Q@K^T quantized
   (`qk`), all attention products quantized (`allbmm`), only those of the present block (this call's
   own keys: `present_qk`, `present_bmm`, `present_bmm_s8` with their B operand int8 symmetric for the
   u8s8 kernel; the K/V cache's block stays float), per-tensor weights
   (`pertensor`), int8 (s8s8) activations (`s8s8`); each timed as the llm_gen call (last_hidden_state
   only) on a plain session with the runtime's session options, alternating with FP32 and the recipe's
   int8-cpu, min of `--repeat`.
Each node's profiled time is its minimum over the profiled runs (robust to other jobs on the machine),
so a graph's kernel sum can read below its timed call; the shares and classes are the result. Writes
one JSON (default docs/results/int8_euler_profile.json) and prints per graph and for the step: ms per
class, FP32 vs int8-cpu, and the float time int8-cpu keeps. ~3-4 min alone on 2 cores.

  PYTHONPATH=. python tools/experiments/int8_euler_profile.py [--work /tmp/int8_speed] [--inits default,peaked]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from unittest import mock

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnxruntime.quantization import QuantType

from janusflow_trt.benchmarks.bench import machine_info, measure_floors
from janusflow_trt.calibration.record import PLANS, CalibrationData
from janusflow_trt.export import int8 as recipe
from janusflow_trt.export.int8 import activation_matmuls
from janusflow_trt.export.specs import build_specs
from janusflow_trt.files import write_all
from janusflow_trt.janusflow_ref.config import load_config
from janusflow_trt.runtime.backends import OrtBackend

P = "int8-cpu"
STEP = ("gen_enc", "llm_gen", "gen_dec")  # runtime/euler_step.py: one Euler step's graph calls
RECORDED = {"llm_gen": "llm"}  # the recorder files a view's calls under its parent graph
INT8_OPS = {"MatMulIntegerToFloat", "QGemm", "QLinearMatMul", "QLinearConv", "MatMulInteger", "ConvInteger",
            "DynamicQuantizeMatMul", "QAttention", "QLinearAdd", "QLinearMul"}
QDQ_OPS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"}
PRODUCTS = {"MatMul", "FusedMatMul", "Gemm"}
CLASSES = ("int8 weight product", "(de)quantize", "float weight product", "float attention product",
           "float conv", "other float")


def euler_sample(calib: CalibrationData, graph: str) -> dict[str, torch.Tensor]:
    """The first recorded Euler-step call of `graph` (CalibrationData.samples checks each file's sha256)."""
    for (kind, _), feeds in zip(calib.select(graph), calib.samples(graph), strict=False):
        if kind == "euler step":
            return {k: torch.from_numpy(v) for k, v in feeds.items()}
    raise SystemExit(f"{calib.path}: no Euler-step sample of {graph}")


def node_class(op: str, node: str, attention: set[str]) -> str:
    """node: the profiler's node name; a fused node keeps its first node's name before a '/'."""
    if op in INT8_OPS:
        return "int8 weight product"
    if op in QDQ_OPS:
        return "(de)quantize"
    if op in PRODUCTS:
        return "float attention product" if node.split("/")[0] in attention else "float weight product"
    return "float conv" if op == "Conv" else "other float"


def profiled(backends: dict[str, OrtBackend], graph: str, feeds: dict[str, torch.Tensor], runs: int,
             attention: set[str]) -> dict[str, dict]:
    """ONNX Runtime's profiler on each backend's session of `graph` (created with profiling on), `runs`
    calls after one warm-up, the backends alternating call by call -> per backend: ms by class, op type and
    node, each node's time its minimum over the runs (what a quiet run reads; a run slowed by another job
    on the machine does not count)."""
    for b in backends.values():
        b.run(graph, feeds)
    for _ in range(runs):
        for b in backends.values():
            b.run(graph, feeds)
    out = {}
    for p, b in backends.items():
        path = b.sessions[b.view_parent.get(graph, graph)].end_profiling()
        out[p] = summarise(json.loads(Path(path).read_text()), runs, attention)
        os.remove(path)
    return out


def summarise(events: list[dict], runs: int, attention: set[str]) -> dict:
    """The profiler's events -> per op class / op type / node ms, over the last `runs` model runs."""
    timed = sorted((e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"),
                   key=lambda e: e["ts"])[-runs:]
    per_node: dict[tuple[str, str], list[float]] = {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            k = next((i for i, r in enumerate(timed) if r["ts"] <= e["ts"] <= r["ts"] + r["dur"]), None)
            if k is not None:  # a timed run's node (not the warm-up's)
                key = (e["args"]["op_name"], e["name"][: -len("_kernel_time")])
                per_node.setdefault(key, [0.0] * runs)[k] += e["dur"] / 1e3
    by_op: defaultdict[str, float] = defaultdict(float)
    by_class: defaultdict[str, float] = defaultdict(float)
    by_node: defaultdict[str, float] = defaultdict(float)
    for (op, node), ms in per_node.items():
        by_op[op] += min(ms)
        by_class[node_class(op, node, attention)] += min(ms)
        by_node[f"{node} ({op})"] += min(ms)
    total = sum(by_op.values())
    return {"kernel_ms": round(total, 3), "model_run_ms_min": round(min(r["dur"] for r in timed) / 1e3, 3),
            "by_class_ms": {c: round(by_class[c], 3) for c in CLASSES},
            "by_op_ms": {k: round(v, 3) for k, v in largest(by_op)},
            "share_by_op": {k: round(v / total, 4) for k, v in largest(by_op)},
            "top_nodes_ms": {k: round(v, 3) for k, v in largest(by_node)[:12]}}


def largest(d: dict[str, float]) -> list[tuple[str, float]]:
    return sorted(d.items(), key=lambda kv: -kv[1])


def value_products(model: onnx.ModelProto) -> set[str]:
    """The attention products P@V: the activation MatMuls whose first input comes from an Exp (the softmax's
    numerator, through at most one Mul); the other activation MatMuls are the score products Q@K^T."""
    producer = {o: n for n in model.graph.node for o in n.output}

    def from_exp(t: str, depth: int = 2) -> bool:
        n = producer.get(t)
        return n is not None and (n.op_type == "Exp" or (depth > 1 and n.op_type == "Mul"
                                                          and any(from_exp(i, depth - 1) for i in n.input)))
    return {n.name for n in model.graph.node if n.name in set(activation_matmuls(model)) and from_exp(n.input[0])}


def past_products(model: onnx.ModelProto) -> set[str]:
    """The attention products over the K/V cache (the two-block attention's past block): the activation
    MatMuls whose second input is a graph input (past V) or a Transpose of one (past K^T). The others
    read this call's own keys / values (the present block: 577 x 577 per head at an Euler step, 1 x 1 at a
    decode step)."""
    inputs = {i.name for i in model.graph.input}
    producer = {o: n for n in model.graph.node for o in n.output}

    def cached(t: str) -> bool:
        n = producer.get(t)
        return t in inputs or (n is not None and n.op_type == "Transpose" and n.input[0] in inputs)
    return {n.name for n in model.graph.node if n.name in set(activation_matmuls(model)) and cached(n.input[1])}


KNOBS = ("qk", "allbmm", "present_qk", "present_bmm", "present_bmm_s8", "pertensor", "s8s8")


def derive_knob(art: Path, cfg, calib: CalibrationData, knob: str, out: Path) -> dict:
    """The llm's int8-cpu re-derived with one knob changed (the recipe's functions patched for the call)."""
    plan, options = recipe.cpu_plan, recipe.flavour_options
    fp32 = onnx.load(str(art / "llm.onnx"), load_external_data=False)
    present = set(activation_matmuls(fp32)) - past_products(fp32)
    signed_b = sorted({n.input[1] for n in fp32.graph.node if n.name in present})  # present K^T and V

    def cpu_plan(model):
        keep = plan(model)
        if knob == "qk":
            score = set(activation_matmuls(model)) - value_products(model)
            keep = {k: v for k, v in keep.items() if k not in score}
        elif knob == "allbmm":
            keep = {k: v for k, v in keep.items() if k not in set(activation_matmuls(model))}
        elif knob.startswith("present_bmm") or knob == "present_qk":
            quantized = set(activation_matmuls(model)) - past_products(model)
            if knob == "present_qk":
                quantized -= value_products(model)
            keep = {k: v for k, v in keep.items() if k not in quantized}
        return keep

    def flavour_options(precision):
        o = options(precision)
        if knob == "pertensor":
            o["per_channel"] = False
        elif knob == "s8s8":
            o["activation_type"] = QuantType.QInt8
            o["extra_options"] = {**o["extra_options"], "ActivationSymmetric": True}
        elif knob == "present_bmm_s8":  # their B operand int8 symmetric: ORT's u8s8 kernel, not u8u8
            o["extra_options"] = {**o["extra_options"], "TensorQuantOverrides": {
                t: [{"quant_type": QuantType.QInt8, "symmetric": True}] for t in signed_b}}
        return o

    with mock.patch.object(recipe, "cpu_plan", cpu_plan), mock.patch.object(recipe, "flavour_options", flavour_options):
        r = recipe.derive_int8(art / "llm.onnx", build_specs(cfg)["llm"], calib, out, P,
                               limit=PLANS["lean"].measure_samples)
    return {"quantized_nodes": r["recipe"]["quantized_nodes"], "float_nodes": sorted(r["recipe"]["excluded"]),
            "per_channel": knob != "pertensor", "activations": "int8 symmetric" if knob == "s8s8" else "uint8"}


def knobs(art: Path, cfg, calib: CalibrationData, feeds: dict[str, torch.Tensor], names: list[str], repeat: int,
          threads: int) -> dict:
    """Each knob's llm, FP32 and the recipe's int8-cpu llm as llm_gen calls on plain sessions, alternating."""
    so = OrtBackend(art, cfg, threads).options
    x = {k: v.numpy() for k, v in feeds.items()}
    out: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        files = {"fp32": art / "llm.onnx", P: art / f"llm.{P}.onnx"}
        for k in names:
            files[k] = Path(tmp) / f"llm.{k}.onnx"
            t0 = time.perf_counter()
            out[k] = derive_knob(art, cfg, calib, k, files[k])
            out[k]["derive_s"] = round(time.perf_counter() - t0, 1)
        sess = {k: ort.InferenceSession(str(f), so, providers=["CPUExecutionProvider"]) for k, f in files.items()}
        ref = sess["fp32"].run(["last_hidden_state"], x)[0].ravel().astype(np.float64)
        ms: dict[str, list[float]] = {k: [] for k in sess}
        for k, s in sess.items():
            h = s.run(["last_hidden_state"], x)[0].ravel().astype(np.float64)
            out.setdefault(k, {})["cosine_vs_fp32"] = round(float(h @ ref / np.linalg.norm(h) / np.linalg.norm(ref)), 6)
        for _ in range(repeat):
            for k, s in sess.items():
                t0 = time.perf_counter()
                s.run(["last_hidden_state"], x)
                ms[k].append((time.perf_counter() - t0) * 1e3)
    for k, v in ms.items():
        out[k].update(ms_min=round(min(v), 2), speedup_vs_fp32=round(min(ms["fp32"]) / min(v), 3),
                      speedup_vs_recipe=round(min(ms[P]) / min(v), 3))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default="/tmp/int8_speed", help="int8_speed.py's WORK (its golden-<init>/gate exports)")
    ap.add_argument("--size", default="golden")
    ap.add_argument("--inits", default="default,peaked")
    ap.add_argument("--repeat", type=int, default=8, help="timed rounds, FP32 and int8-cpu alternating")
    ap.add_argument("--profile", type=int, default=5, help="profiled runs per graph and precision")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--knobs", default=",".join(KNOBS), help="int8-cpu recipe knobs tried on the first init's "
                    "llm ('' for none): " + ", ".join(KNOBS))
    ap.add_argument("--out", default="docs/results/int8_euler_profile.json")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    result: dict = {"question": "an Euler step's time per graph and per op class, FP32 vs int8-cpu (golden "
                                "widths, recorded Euler-step inputs, the runtime's OrtBackend)",
                    "command": "PYTHONPATH=. python tools/experiments/int8_euler_profile.py " + " ".join(
                        f"--{k} {v}" for k, v in vars(a).items()),
                    "machine": machine_info(a.threads), "repeat": a.repeat, "profiled_runs": a.profile, "inits": {}}
    result["loadavg_start"] = [round(x, 2) for x in os.getloadavg()]  # other jobs on the machine
    measure_floors(result)
    for init in a.inits.split(","):
        art = Path(a.work) / f"{a.size}-{init}" / "gate"
        cfg = load_config(art.parent / "ckpt")
        calib = CalibrationData(art / "calib")
        feeds = {g: euler_sample(calib, RECORDED.get(g, g)) for g in STEP}
        timed = {p: OrtBackend(art, cfg, a.threads, precision=p) for p in ("fp32", P)}
        ms: dict[str, dict[str, list[float]]] = {p: {g: [] for g in STEP} for p in timed}
        for g in STEP:
            for b in timed.values():
                b.run(g, feeds[g])  # sessions created, first-call allocations done
        for _ in range(a.repeat):
            for g in STEP:
                for p, b in timed.items():
                    t0 = time.perf_counter()
                    b.run(g, feeds[g])
                    ms[p][g].append((time.perf_counter() - t0) * 1e3)
        del timed
        mins = {p: {g: min(v) for g, v in d.items()} for p, d in ms.items()}
        info: dict = {"artifacts": str(art), "shapes": {g: {k: list(v.shape) for k, v in f.items()}
                                                         for g, f in feeds.items()},
                      "call_ms_min": {p: {**{g: round(v, 2) for g, v in d.items()}, "step": round(sum(d.values()), 2)}
                                      for p, d in mins.items()},
                      "call_ms_median": {p: {g: round(sorted(v)[len(v) // 2], 2) for g, v in d.items()}
                                         for p, d in ms.items()}}
        info["speedup_vs_fp32"] = {**{g: round(mins["fp32"][g] / mins[P][g], 3) for g in STEP},
                                   "step": round(sum(mins["fp32"].values()) / sum(mins[P].values()), 3)}
        prof: dict = {p: {} for p in ("fp32", P)}
        with tempfile.TemporaryDirectory() as tmp:
            backends = {p: OrtBackend(art, cfg, a.threads, precision=p) for p in prof}
            for g in STEP:
                for p, b in backends.items():
                    b.options.enable_profiling = True  # read when the graph's session is created
                    b.options.profile_file_prefix = f"{tmp}/{p}-{g}"
                fp32_file = art / backends["fp32"].graph_file(g).name
                attention = set(activation_matmuls(onnx.load(str(fp32_file), load_external_data=False)))
                for p, r in profiled(backends, g, feeds[g], a.profile, attention).items():
                    prof[p][g] = r
            del backends
        step = {p: {c: round(sum(prof[p][g]["by_class_ms"][c] for g in STEP), 3) for c in CLASSES} for p in prof}
        info["profile"] = prof
        info["step_by_class_ms"] = step
        kernel = {p: sum(v.values()) for p, v in step.items()}
        int8_float = kernel[P] - step[P]["int8 weight product"] - step[P]["(de)quantize"]
        info["summary"] = {
            "profiled_step_ms": {p: round(v, 2) for p, v in kernel.items()},
            "int8_weight_products_speedup": round(step["fp32"]["float weight product"]
                                                  / (step[P]["int8 weight product"] + step[P]["(de)quantize"]
                                                     + step[P]["float weight product"]), 3),
            "int8cpu_float_ms": round(int8_float, 2), "int8cpu_float_share": round(int8_float / kernel[P], 4),
            # the int8-cpu float time that a 2.5x step leaves room for, everything INT8 unchanged
            "float_ms_for_2_5x": round(kernel["fp32"] / 2.5 - (kernel[P] - int8_float), 2),
            "ratio_if_int8_work_were_free": round(kernel["fp32"] / int8_float, 3)}
        result["inits"][init] = info
        if a.knobs and "knobs" not in result:
            result["knobs"] = {"init": init, "graph": "llm (llm_gen call)",
                               "variants": knobs(art, cfg, calib, feeds["llm_gen"], a.knobs.split(","), a.repeat,
                                                 a.threads)}
    result["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    write_all([(Path(a.out), lambda t: Path(t).write_text(json.dumps(result, indent=2)))])
    print(f"wrote {a.out}; floors {'NOISY' if result['floors']['noisy'] else 'steady'}")
    for init, info in result["inits"].items():
        s = info["summary"]
        print(f"\n{init}: Euler-step calls FP32 / int8-cpu (min of {a.repeat}): " + ", ".join(
            f"{g} {v:.2f}x" for g, v in info["speedup_vs_fp32"].items()))
        print(f"  profiled step ms: FP32 {s['profiled_step_ms']['fp32']:.1f}, "
              f"int8-cpu {s['profiled_step_ms'][P]:.1f}; weight products {s['int8_weight_products_speedup']:.2f}x; "
              f"int8-cpu float {s['int8cpu_float_ms']:.1f} ms "
              f"({100 * s['int8cpu_float_share']:.0f}%), room for {s['float_ms_for_2_5x']:.1f} ms at 2.5x")
        print(f"  {'class':26s} " + " ".join(f"{g + ' fp32':>13s} {g + ' int8':>13s}" for g in STEP))
        for c in CLASSES:
            print(f"  {c:26s} " + " ".join(f"{info['profile']['fp32'][g]['by_class_ms'][c]:13.1f} "
                                            f"{info['profile'][P][g]['by_class_ms'][c]:13.1f}" for g in STEP))
    if "knobs" in result:
        print(f"\nint8-cpu recipe knobs, {result['knobs']['init']} init, llm_gen call (min of {a.repeat}):")
        for k, v in result["knobs"]["variants"].items():
            print(f"  {k:10s} {v['ms_min']:8.1f} ms  vs FP32 {v['speedup_vs_fp32']:.2f}x  vs int8-cpu recipe "
                  f"{v['speedup_vs_recipe']:.2f}x  cosine {v['cosine_vs_fp32']:.6f}")


if __name__ == "__main__":
    main()
