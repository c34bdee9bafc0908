"""`janusflow bench-serve` (benchmarks/serve_load.py): a small bounded run against a tiny-model server that
the command starts itself, its JSON checked against facts fixed by the run's own arguments (request
counts, tokens = requests x max_tokens, images = requests); malformed arguments refused in one line with
exit code 2 before any server starts."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from janusflow_trt import cli
from janusflow_trt.benchmarks import serve_load as sl


@pytest.mark.parametrize("argv, phrase", [
    (["--concurrency", "a"], "--concurrency"),
    (["--concurrency", "0"], "--concurrency"),
    (["--rates", "-1"], "--rates"),
    (["--rates", "nan"], "--rates"),
    (["--workloads", "chat,video"], "--workloads"),
    (["--concurrency", "", "--rates", ""], "nothing to run"),
    (["--url", "http://127.0.0.1:9", "--model", "m", "--artifacts", "a"], "--url"),
    (["--model", "m"], "--artifacts"),
    (["--slo", "1,2"], "--slo"),
    (["--url", "ftp://x"], "http"),
    (["--requests", "0"], "--requests"),
    (["--duration", "-1"], "--duration"),
    (["--size", "full"], "--size"),
])
def test_bad_arguments_one_line_exit_2(argv, phrase, tmp_path, capsys):
    capsys.readouterr()
    try:
        rc = cli.main(["bench-serve", "--out", str(tmp_path), *argv])
    except SystemExit as e:  # argparse's own refusals
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2, (argv, err)
    assert len(err.strip().splitlines()) == 1 and phrase in err and "Traceback" not in err, (argv, err)
    assert not list(tmp_path.iterdir())  # nothing written


def test_unreachable_url_is_one_line(tmp_path, capsys):
    port = sl.free_port()  # nothing listens on it
    assert cli.main(["bench-serve", "--url", f"http://127.0.0.1:{port}", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "no server answers" in err


def test_bounded_run_against_a_started_server(tiny_dir, tiny_onnx, tmp_path, capsys):
    n, tokens = 5, 6
    rc = cli.main(["bench-serve", "--model", str(tiny_dir), "--artifacts", str(tiny_onnx), "--max-batch", "4",
                   "--workloads", "chat,images", "--concurrency", "1,3", "--rates", "50", "--requests", str(n),
                   "--max-tokens", str(tokens), "--image-steps", "2", "--warmup", "1", "--out", str(tmp_path),
                   "--name", "t"])
    assert rc == 0, capsys.readouterr().err
    res = json.loads((tmp_path / "t.json").read_text())
    runs = res["runs"]
    assert [(r["workload"], r["mode"], r.get("concurrency", r.get("rate"))) for r in runs] == [
        (w, m, x) for w in ("chat", "images") for m, x in (("closed", 1), ("closed", 3), ("open", 50.0))]
    for r in runs:
        assert (r["requests"], r["completed"], r["failed"], r["errors"]) == (n, n, 0, {}), r
        chat = r["workload"] == "chat"
        # fixed by the arguments: every chat answer exactly --max-tokens long; one image per image request
        assert r["output_tokens"] == (n * tokens if chat else 0) and r["images"] == (0 if chat else n)
        assert (r["chat_requests"], r["image_requests"]) == ((n, 0) if chat else (0, n))
        e2e = r["e2e_ms"]
        assert 0 < e2e["p50"] <= e2e["p90"] <= e2e["p99"] <= r["duration_s"] * 1e3
        if chat:
            ttft, itl = r["ttft_ms"], r["itl_ms"]
            assert 0 < ttft["p50"] <= ttft["p90"] <= ttft["p99"] and ttft["p99"] <= e2e["p99"]
            assert itl["p50"] is not None and 0 <= itl["p50"] <= r["itl_max_ms"] <= e2e["p99"]
            assert r["tpot_ms"]["p50"] > 0
        else:
            assert r["ttft_ms"]["p50"] is None and r["image_e2e_ms"] == e2e
        assert r["server_rss_mb"] > 0
    # the closed loop at concurrency 1 sends one request at a time: its wall time is at least the sum of
    # n latencies, which is n x the mean
    c1 = runs[0]
    assert c1["duration_s"] * 1e3 >= n * c1["e2e_ms"]["mean"] * 0.999
    md = (tmp_path / "t.md").read_text()
    assert md.count("\n| chat |") == 3 and md.count("\n| images |") == 3
    assert Image.open(tmp_path / "t.png").format == "PNG"


def test_histogram_quantiles_between_two_scrapes():
    """Prometheus' histogram_quantile over the difference of two cumulative scrapes."""
    before = {0.1: 1.0, 0.2: 1.0, 0.4: 2.0, float("inf"): 2.0}
    after = {0.1: 1.0, 0.2: 5.0, 0.4: 12.0, float("inf"): 12.0}  # 10 new: 4 in (0.1, 0.2], 6 in (0.2, 0.4]
    q = sl.histogram_quantiles(before, after)
    assert q["count"] == 10
    assert q["p50"] == pytest.approx((0.2 + 0.2 * 1 / 6) * 1e3, abs=1e-3)  # rank 5: 1 of the 6 in (0.2, 0.4]
    assert q["p90"] == pytest.approx((0.2 + 0.2 * 5 / 6) * 1e3, abs=1e-3)
    assert sl.histogram_quantiles(after, after)["p50"] is None


def test_soak_counts_every_request(tiny_dir, tiny_onnx, tmp_path, capsys):
    """--soak: valid requests checked against their solo runs, every malformed kind refused with a 4xx
    error object, /ready at the end; the counts are the arguments'."""
    rc = cli.main(["bench-serve", "--model", str(tiny_dir), "--artifacts", str(tiny_onnx), "--max-batch", "4",
                   "--soak", "--requests", "12", "--soak-malformed", "19", "--soak-concurrency", "4",
                   "--max-tokens", "5", "--image-steps", "2", "--out", str(tmp_path)])
    assert rc == 0, capsys.readouterr().err
    res = json.loads((tmp_path / "serve_soak_small.json").read_text())
    assert res["checks"] == {"every valid request correct": True, "every malformed one a 4xx error object": True,
                             "/ready 200 at the end": True, "RSS growth after warm-up < 10%": True}
    v = res["valid"]
    assert (v["requests"], v["completed"], v["chat_requests"], v["image_requests"]) == (12, 12, 9, 3)
    assert v["output_tokens"] == 9 * 5 and v["images"] == 3 and res["wrong"] == {}
    kinds = sl.malformed("data:,", "m")
    assert res["malformed"]["by_kind"] == {name: 1 for name, *_ in kinds} and len(kinds) == 19
    assert min(res["reference_text_chars"]) > 0  # the tiny model's answers are visible text: equality means something
