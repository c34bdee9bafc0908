"""janusflow-trt: DeepSeek JanusFlow as ONNX graphs on ONNX Runtime and TensorRT.

    from janusflow_trt import Pipeline

The repository's top-level folders are this package's subpackages (janusflow_trt.janusflow_ref,
.export, .runtime, .calibration, .benchmarks): symlinks here in the source tree, real folders in the
wheel.
"""

__version__ = "0.1.0"
__all__ = ["GenerateResult", "JanusFlowError", "Pipeline", "__version__"]

from .errors import JanusFlowError  # noqa: E402  (one line, exit 2 in the CLI)


def __getattr__(name: str):
    # lazy: importing a subpackage (errors, specs, the ModelOpt worker) must not load the whole API
    if name in ("GenerateResult", "Pipeline"):
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'janusflow_trt' has no attribute {name!r}")
