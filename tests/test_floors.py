"""The benchmark's floor probes: best over sizes and repeats, with the spread reported."""

from __future__ import annotations

from janusflow_trt.benchmarks import floors


def test_probe_reports_best_over_sizes_and_repeats_with_spread():
    rates = {"a": [10.0, 30.0, 20.0], "b": [40.0, 5.0]}
    p = floors._probe(rates)
    assert p["best"] == 40.0 and p["per_size_best"] == {"a": 30.0, "b": 40.0}
    assert p["median"] == 20.0 and abs(p["spread"] - (40.0 - 5.0) / 40.0) < 1e-12


def test_probes_run_every_size():
    g = floors.gemm_probe(sizes=(64, 128), repeat=2)
    r = floors.read_probe(mbytes=(4, 8), repeat=2)
    assert set(g["per_size_best"]) == {"64", "128"} and set(r["per_size_best"]) == {"4", "8"}
    for p in (g, r):
        assert p["best"] == max(p["per_size_best"].values()) and p["best"] >= p["median"] > 0
        assert 0 <= p["spread"] < 1
