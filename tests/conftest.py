"""Shared fixtures: one tiny checkpoint per session, written by the project's own factory."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    from janusflow_trt.tiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("ckpt") / "tiny", size="tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_model(tiny_dir):
    from janusflow_trt.janusflow_ref.weights import load_model

    return load_model(tiny_dir)


@pytest.fixture(scope="session")
def tiny_vae(tiny_dir):
    from janusflow_trt.janusflow_ref.vae import load_vae

    return load_vae(tiny_dir / "vae")


@pytest.fixture(scope="session")
def processor(tiny_dir):
    from janusflow_trt.janusflow_ref.processor import Processor

    return Processor(tiny_dir)


@pytest.fixture(scope="session")
def test_image(tmp_path_factory):
    rng = np.random.RandomState(0)
    path = tmp_path_factory.mktemp("img") / "noise.png"
    Image.fromarray((rng.rand(200, 300, 3) * 255).astype(np.uint8)).save(path)
    return path


@pytest.fixture(scope="session")
def tiny_onnx(tiny_dir, tmp_path_factory):
    """All six graphs of the tiny checkpoint, exported once per session."""
    from janusflow_trt.export_job import export_graphs

    out = tmp_path_factory.mktemp("export") / "onnx"
    export_graphs(tiny_dir, None, out, progress=False)
    return out


@pytest.fixture(scope="session")
def fp16_onnx(tiny_dir, tmp_path_factory):
    """The tiny checkpoint exported at fp32,fp16 with test_fp16's small calibration, once per session
    (test_fp16, and quality in test_signals / test_full_disk)."""
    from test_fp16 import PLAN, small_inputs

    from janusflow_trt.export_job import export_graphs

    out = tmp_path_factory.mktemp("export16") / "onnx"
    export_graphs(tiny_dir, None, out, progress=False, precisions="fp32,fp16", calib_inputs=small_inputs(),
                  calib_plan=PLAN)
    return out


@pytest.fixture(scope="session")
def int8_onnx(tiny_dir, tmp_path_factory):
    """The tiny checkpoint exported at fp32,int8,int8-cpu with test_int8's small calibration (no gate:
    test_int8_gate runs the gate on copies of it), once per session."""
    import os

    from test_int8 import PLAN

    from janusflow_trt.calibration.data import InputSet, builtin_calibration
    from janusflow_trt.export_job import export_graphs

    b = builtin_calibration()
    out = tmp_path_factory.mktemp("export8") / "onnx"
    mo = os.environ.pop("JANUSFLOW_MODELOPT_PYTHON", None)  # this export uses ORT's quantizer
    try:
        export_graphs(tiny_dir, None, out, progress=False, precisions="fp32,int8,int8-cpu",
                      calib_inputs=InputSet(b.prompts[:4], b.pairs[:2]), calib_plan=PLAN)
    finally:
        if mo:
            os.environ["JANUSFLOW_MODELOPT_PYTHON"] = mo
    return out
