"""GPU checks (`-m gpu`, run by `janusflow gpu-check` / `make gpu-check`): real TensorRT engines and real
CUDA graphs on the tiny checkpoint. Nothing here is mocked; without a GPU (or TensorRT) each test skips
with the reason. Not yet run on a GPU by this project: see the README's "On a GPU" section."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from rt import run_np

from janusflow_trt.export.specs import build_specs, compare, dummy_inputs
from janusflow_trt.janusflow_ref.config import load_config

pytestmark = pytest.mark.gpu

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible to torch")


def _has_tensorrt() -> bool:
    try:
        import tensorrt

        return hasattr(tensorrt, "Builder")
    except ImportError:
        return False


needs_trt = pytest.mark.skipif(not (_has_tensorrt() and torch.cuda.is_available()),
                               reason="TensorRT (pip install 'janusflow-trt[tensorrt]') and a CUDA GPU needed")


@pytest.fixture(scope="module")
def fp32_engines(tiny_onnx, tmp_path_factory):
    from janusflow_trt.export.torch_to_onnx import parse_graphs
    from janusflow_trt.export.trt_build import build

    out = tmp_path_factory.mktemp("engines") / "fp32"
    build(tiny_onnx, out, "fp32", parse_graphs(None), out.parent / "timing.cache", 3, 4.0, progress=False)
    return out


def _cases(spec, cfg):
    if spec.name == "llm":
        return [{}, {"S": 1}]  # prefill profile (example S=3), decode profile
    if spec.name == "llm_gen":
        return [{"S": 1 + cfg.num_gen_tokens}]  # its one profile: an Euler step
    return [{}]


@needs_trt
def test_trt_fp32_engines_match_ort(tiny_dir, tiny_onnx, fp32_engines):
    from janusflow_trt.runtime.backends import OrtBackend
    from janusflow_trt.runtime.trt_backend import TrtBackend

    cfg = load_config(tiny_dir)
    ort, trt = OrtBackend(tiny_onnx, cfg), TrtBackend(fp32_engines, cfg, "fp32")
    bad = []
    for name, spec in build_specs(cfg).items():
        for sizes in _cases(spec, cfg):
            feeds = dummy_inputs(spec, seed=3, **sizes)
            want, got = run_np(ort, name, feeds), run_np(trt, name, feeds)
            for t in spec.outputs:
                r = compare(got[t.name], want[t.name], t.tol)
                if not r["ok"]:
                    bad.append(f"{name}{sizes} {t.name}: {r}")
    assert not bad, bad


@needs_trt
def test_trt_cuda_graph_replay_equals_eager(tiny_dir, fp32_engines):
    from janusflow_trt.runtime.trt_backend import TrtBackend

    cfg = load_config(tiny_dir)
    trt = TrtBackend(fp32_engines, cfg, "fp32")
    spec = build_specs(cfg)["gen_dec"]
    results = {}
    for capture in (False, True):
        bufs = trt.buffers("gen_dec", {t.name: spec.shape(t) for t in spec.inputs})
        outs = []
        for seed in (1, 2, 3):  # inputs written in place: the replayed graph must read the new values
            for k, v in dummy_inputs(spec, seed=seed).items():
                bufs[k].copy_(torch.from_numpy(v))
            torch.cuda.synchronize()
            trt.enqueue("gen_dec", capture=capture)
            trt.stream.synchronize()
            outs.append(bufs["z_next"].cpu().numpy().copy())
        results[capture] = outs
    assert trt.engines["gen_dec"].step is not None and trt.engines["gen_dec"].step.replays == 2
    for a, b in zip(results[False], results[True], strict=True):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(results[True][0], results[True][1])


@needs_trt
def test_trt_refuses_engines_for_another_gpu(tiny_dir, fp32_engines, tmp_path):
    import shutil

    from janusflow_trt.export.engine_manifest import EngineMismatchError
    from janusflow_trt.runtime.trt_backend import TrtBackend

    other = tmp_path / "other"
    shutil.copytree(fp32_engines, other)
    m = json.loads((other / "engines.json").read_text())
    m["gpu"]["compute_capability"] = "1.0"
    (other / "engines.json").write_text(json.dumps(m))
    with pytest.raises(EngineMismatchError, match="rebuild here"):
        TrtBackend(other, load_config(tiny_dir), "fp32")


def _euler_captured_vs_eager(backend, cfg, processor, monkeypatch, steps=4):
    """The runtime's Euler loop with the step captured as one CUDA graph == the same loop run eagerly."""
    from rt import rt_euler

    from janusflow_trt.runtime import cuda_graph

    replays = []
    call = cuda_graph.CapturedStep.__call__
    monkeypatch.setattr(cuda_graph.CapturedStep, "__call__", lambda self: (call(self), replays.append(self.replays)))
    z = np.random.default_rng(0).standard_normal((2, 4, 48, 48)).astype(np.float32)
    backend.capturable = False
    eager = rt_euler(backend, cfg, processor, "a red fox", z, steps, 2.0)
    assert not replays
    backend.capturable = True
    graphed = rt_euler(backend, cfg, processor, "a red fox", z, steps, 2.0)
    assert replays[-1] == steps - 1  # captured at the first step, replayed at every other
    for a, b in zip(graphed, eager, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@needs_cuda
def test_torch_cuda_euler_step_capture_equals_eager(tiny_dir, processor, monkeypatch):
    from janusflow_trt.runtime.torch_cuda import TorchCudaBackend

    _euler_captured_vs_eager(TorchCudaBackend(tiny_dir), load_config(tiny_dir), processor, monkeypatch)


@needs_trt
def test_trt_euler_step_capture_equals_eager(tiny_dir, fp32_engines, processor, monkeypatch):
    """The whole Euler step (three engines and the carry) as one captured CUDA graph == enqueued eagerly."""
    from janusflow_trt.runtime.trt_backend import TrtBackend

    cfg = load_config(tiny_dir)
    _euler_captured_vs_eager(TrtBackend(fp32_engines, cfg, "fp32"), cfg, processor, monkeypatch)


@needs_trt
def test_pipeline_trt_generate_matches_ort(tiny_dir, tiny_onnx, fp32_engines):
    """End to end through the API: the device Euler loop on FP32 engines vs ONNX Runtime, same noise."""
    from janusflow_trt import Pipeline

    kw = dict(num_images=2, steps=4, seed=7)
    ort = Pipeline.from_pretrained(tiny_dir, backend="ort", artifacts=tiny_onnx).generate("a red fox", **kw)
    trt = Pipeline.from_pretrained(tiny_dir, backend="trt", artifacts=fp32_engines).generate("a red fox", **kw)
    r = compare(trt.latents, ort.latents, build_specs(load_config(tiny_dir))["gen_dec"].outputs[1].tol)
    assert r["ok"], r


def _greedy_answer(backend, tiny_dir, processor, test_image, n):
    from PIL import Image

    from janusflow_trt.janusflow_ref.sampling import SamplingParams
    from janusflow_trt.runtime import chat

    cfg = load_config(tiny_dir)
    inputs = processor.chat_inputs(Image.open(test_image), "What is this?")
    return list(chat.chat_tokens(backend, cfg, inputs, SamplingParams(max_new_tokens=n), eos_id=-100))


@needs_cuda
def test_cuda_graph_decode_step_equals_eager(tiny_dir, processor, test_image, monkeypatch):
    """The device decode step (runtime/decode.py) captured per KV bucket and replayed == run eagerly,
    over a bucket change (a recapture)."""
    from janusflow_trt.runtime import cuda_graph
    from janusflow_trt.runtime.torch_cuda import TorchCudaBackend

    replays = []
    call = cuda_graph.CapturedStep.__call__
    monkeypatch.setattr(cuda_graph.CapturedStep, "__call__", lambda self: (call(self), replays.append(self.replays)))
    b = TorchCudaBackend(tiny_dir)
    b.capturable = False
    eager = _greedy_answer(b, tiny_dir, processor, test_image, 150)
    assert not replays
    b.capturable = True
    graphed = _greedy_answer(b, tiny_dir, processor, test_image, 150)
    assert graphed == eager
    assert max(replays) > 20 and replays.count(0) >= 2  # a capture per KV bucket, replays in each


@needs_trt
def test_trt_decode_step_capture_equals_host_loop(tiny_dir, tiny_onnx, fp32_engines, processor, test_image):
    """Greedy chat on TensorRT with the captured device decode step == ORT FP32's answer."""
    from janusflow_trt.runtime.backends import OrtBackend
    from janusflow_trt.runtime.trt_backend import TrtBackend

    cfg = load_config(tiny_dir)
    trt = TrtBackend(fp32_engines, cfg, "fp32")
    ort = OrtBackend(tiny_onnx, cfg)
    assert _greedy_answer(trt, tiny_dir, processor, test_image, 40) == \
        _greedy_answer(ort, tiny_dir, processor, test_image, 40)
