"""`janusflow bench` end to end on the tiny checkpoint: it runs, writes its three files, and every
ratio it reports is a finite positive number."""

from __future__ import annotations

import json
import math

from janusflow_trt.cli import main


def test_bench_end_to_end(tiny_dir, tiny_onnx, tmp_path, capsys):
    out = tmp_path / "bench"
    rc = main(["bench", "--model", str(tiny_dir), "--artifacts", str(tiny_onnx),
               "--backends", "baseline,torch-fast,ort", "--contexts", "16", "--steps", "1", "--quick",
               "--threads", "2", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["bench.json", "bench.md", "bench.png"]
    res = json.loads((out / "bench.json").read_text())
    assert set(res["backends"]) == {"baseline", "torch-fast", "ort"}
    for name, r in res["backends"].items():
        ratios = [*r["speedup_vs_baseline"].values(), r["euler_vs_floor"], *r["decode_vs_floor"].values()]
        assert len(ratios) >= 9 and all(math.isfinite(x) and x > 0 for x in ratios), (name, ratios)
    assert all(math.isclose(x, 1.0) for x in res["backends"]["baseline"]["speedup_vs_baseline"].values())
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| stage |" in (out / "bench.md").read_text()



def test_bench_refuses_a_missing_precision_before_timing_anything(tiny_dir, tiny_onnx, tmp_path, capfd):
    """An export without int8-cpu: one line, exit 2, nothing written, and the FP32 backend was not timed
    first (it used to be timed in full before the int8-cpu backend failed to load)."""
    from contract import snapshot

    argv = ["bench", "--model", tiny_dir, "--artifacts", tiny_onnx, "--backends", "ort", "--precision",
            "fp32,int8-cpu", "--contexts", "16", "--steps", "1", "--quick", "--out", tmp_path / "bench"]
    before = snapshot(tmp_path, tiny_dir, tiny_onnx)
    capfd.readouterr()
    rc = main([str(a) for a in argv])
    out, err = capfd.readouterr()
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, (rc, err)
    assert "not exported at precision int8-cpu" in err and "re-export with --precision fp32,int8-cpu" in err, err
    assert "benchmarking" not in out, out
    assert snapshot(tmp_path, tiny_dir, tiny_onnx) == before
