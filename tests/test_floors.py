"""The benchmark's floor probes: best over sizes and repeats; noise within a size and the CPU share the
probe got, and the run's NOISY verdict from them (as bench stores it and tools/perf_tables.py reads it)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

from janusflow_trt.benchmarks import floors


def test_probe_reports_best_over_sizes_and_repeats_with_noise():
    rates = {"a": [10.0, 30.0, 20.0], "b": [40.0, 5.0, 35.0]}
    p = floors._probe(rates, cpu_share=1.0)
    assert p["best"] == 40.0 and p["per_size_best"] == {"a": 30.0, "b": 40.0} and p["median"] == 25.0
    assert abs(p["noise"] - (30.0 - 20.0) / 30.0) < 1e-12 and p["noisy"]  # a: median 20 vs best 30


def test_sizes_that_differ_by_design_are_not_noise():
    """The reported failure: a quiet BF16 probe (bench_small.json: 512^3 at 473, 1024^3 at 876 GFLOP/s)
    marked NOISY on every run by the spread over all sizes. Within each size the repeats agree."""
    quiet = {"512": [473.0, 470.0, 468.0, 471.0], "1024": [876.0, 860.0, 870.0, 866.0]}
    p = floors._probe(quiet, cpu_share=0.97)
    assert p["noise"] < 0.02 and not p["noisy"]
    assert floors._probe(quiet, cpu_share=0.5)["noisy"]  # the same rates while the cores were shared
    one_slow = {"512": [473.0, 470.0, 468.0, 120.0, 471.0]}  # one interrupted repeat: the best and median hold
    assert not floors._probe(one_slow, cpu_share=0.9)["noisy"]
    busy = {"512": [473.0, 300.0, 250.0, 330.0, 280.0]}  # most repeats slowed: noisy
    assert floors._probe(busy, cpu_share=0.9)["noisy"]


# run in a fresh interpreter: the pytest process holds other tests' threads (ONNX Runtime pools, servers),
# whose CPU time the process-wide count would charge to a sleeping probe
CPU_SHARE_PROBES = """
import json, time
from janusflow_trt.benchmarks import floors

def sleep(n):
    time.sleep(0.05)
    return [1.0]

def spin(n):
    t = time.perf_counter()
    while time.perf_counter() - t < 0.1:
        pass
    return [1.0]

print(json.dumps([floors._measure((1, 2), sleep, threads=1), floors._measure((1,), spin, threads=1)]))
"""


def test_cpu_share_is_measured():
    """A probe that sleeps got no CPU (share ~0: noisy); one that computes on its one thread got what the
    scheduler gave it (~1 on an idle core; the CI machine is shared, so only: clearly more than none)."""
    out = subprocess.run([sys.executable, "-c", CPU_SHARE_PROBES], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    idle, busy = json.loads(out.stdout.strip().splitlines()[-1])
    assert idle["cpu_share"] < 0.2 and idle["noisy"], idle
    assert busy["cpu_share"] > max(0.05, 3 * idle["cpu_share"]), (busy, idle)


def test_probes_run_every_size():
    g = floors.gemm_probe(sizes=(64, 128), repeat=2)
    r = floors.read_probe(mbytes=(4, 8), repeat=2)
    assert set(g["per_size_best"]) == {"64", "128"} and set(r["per_size_best"]) == {"4", "8"}
    for p in (g, r):
        assert p["best"] == max(p["per_size_best"].values()) and p["best"] >= p["median"] > 0
        assert 0 <= p["noise"] < 1 and 0 < p["cpu_share"] and isinstance(p["noisy"], bool)


def test_perf_tables_reads_the_stored_verdict():
    """tools/perf_tables.py (standalone): the stored `noisy` decides, and drops the floor ratio rows; a file
    from before it is judged by its spread."""
    spec = importlib.util.spec_from_file_location("perf_tables", Path(__file__).parents[1] / "tools" / "perf_tables.py")
    pt = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pt)
    probe = {"noise": 0.05, "cpu_share": 0.95, "best": 1.0, "median": 1.0}
    quiet = {"noisy": False, "gemm_probe": probe, "read_probe": probe}
    assert not pt.noisy(quiet) and pt.noisy({**quiet, "noisy": True})
    assert pt.noisy({"gemm_probe": {"spread": 0.3}, "read_probe": {"spread": 0.1}})
    assert not pt.noisy({"gemm_probe": {"spread": 0.2}, "read_probe": {"spread": 0.1}})
    assert "NOISY" in pt.probe_note({**quiet, "noisy": True}) and "NOISY" not in pt.probe_note(quiet)
    result = {"backends": {"x": {"prefill_tokens": 1, "e2e_steps": 1}}, "contexts": [16], "floors": quiet}
    assert "Euler step / FLOP floor" in [r[0] for r in pt.rows(result)]
    result["floors"] = {**quiet, "noisy": True}
    assert "Euler step / FLOP floor" not in [r[0] for r in pt.rows(result)]


def _graph_with_constants(tmp_path):
    """An LLM-like graph: an int8 per-channel weight behind DequantizeLinear, an FP16 weight, an FP32
    norm weight, a Constant node, and a token table read only by Gather; the big tensor stored as
    external data (its header alone gives the count)."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.integers(-127, 127, (64, 32), dtype=np.int8), "w_q"),  # 2048 B
        numpy_helper.from_array(rng.random(32, dtype=np.float32), "w_scale"),  # 128 B
        numpy_helper.from_array(np.zeros(32, np.int8), "w_zp"),  # 32 B
        numpy_helper.from_array(rng.random(64, dtype=np.float32), "norm_w"),  # 256 B
        numpy_helper.from_array(rng.random((32, 16)).astype(np.float16), "w16"),  # 1024 B
        numpy_helper.from_array(rng.random((100, 64), dtype=np.float32), "table"),  # 25600 B, Gather only
    ]
    const = helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(
        rng.random(16).astype(np.float16), "c"))  # 32 B
    nodes = [
        helper.make_node("Gather", ["table", "ids"], ["x"]),
        helper.make_node("Mul", ["x", "norm_w"], ["xn"]),
        helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zp"], ["w"], axis=1),
        helper.make_node("MatMul", ["xn", "w"], ["h"]),
        helper.make_node("Cast", ["h"], ["h16"], to=TensorProto.FLOAT16),
        helper.make_node("MatMul", ["h16", "w16"], ["y0"]),
        const, helper.make_node("Add", ["y0", "c"], ["y"]),
    ]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, [1])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [1, 16])], inits)
    path = tmp_path / "g.onnx"
    onnx.save_model(helper.make_model(g), str(path), save_as_external_data=True, location="g.onnx.data",
                    size_threshold=1024)
    return path


def test_graph_weight_bytes_counts_stored_dtypes(tmp_path):
    w = floors.graph_weight_bytes(_graph_with_constants(tmp_path))
    assert w["by_dtype"] == {"int8": 2048 + 32, "float32": 128 + 256, "float16": 1024 + 32}
    assert w["weights"] == 2048 + 32 + 128 + 256 + 1024 + 32
    assert w["gathered"] == 100 * 64 * 4


def test_decode_bytes_uses_the_run_graphs_bytes():
    from janusflow_trt.janusflow_ref.config import parse_config
    from janusflow_trt.tiny import model_config

    cfg = parse_config(model_config("golden", 0))  # h 2048, 2 layers, 16/16 heads, inter 256, vocab 512
    # by hand: 2 x (4 x 2048^2 + 3 x 2048 x 256) + 2048 x 512 = 37,748,736 weights; K+V of 10 tokens
    # in 2 layers of 2048 = 81,920 elements
    assert floors.decode_bytes(cfg, 10) == 4 * (37_748_736 + 81_920)
    assert floors.decode_bytes(cfg, 10, weight_bytes=1000, kv_bytes=2) == 1000 + 2 * 81_920


def test_perf_tables_precision_table_against_both_baselines():
    """The README's FP32 / BF16 / INT8 table: each runtime column over baseline AND baseline-bf16 (hand values)."""
    spec = importlib.util.spec_from_file_location("perf_tables", Path(__file__).parents[1] / "tools" / "perf_tables.py")
    pt = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pt)

    def r(ms):
        return {"siglip_ms": ms, "prefill_ms": ms, "prefill_tokens": 9, "ttft_ms": ms, "chat_decode_ms": ms,
                "decode_ms": {"64": ms}, "euler_ms": {"step": ms, "enc": 1, "llm": 1, "dec": 1}, "vae_ms": ms,
                "s_per_image": ms, "e2e_steps": 1}

    res = {"contexts": [64], "backends": {"baseline": r(10.0), "ort": r(4.0), "baseline-bf16": r(5.0),
                                          "torch-fast-bf16": r(2.5)}}
    lines = pt.precision_table(res)
    assert lines[0] == "| stage | baseline | baseline-bf16 | ort | torch-fast-bf16 |"
    assert "| Euler step ms | 10 | 5 | 4 (2.50x / 1.25x) | 2.5 (4.00x / 2.00x) |" in lines
    assert not any(ln.startswith("| SigLIP") for ln in lines)  # the summary's stages only
