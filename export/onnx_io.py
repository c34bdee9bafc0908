"""ONNX files and ONNX Runtime sessions: saving past protobuf's 2 GiB limit (external data), CPU sessions."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx.external_data_helper import load_external_data_for_model

# A graph whose weights exceed this keeps them in a data file beside it. Protobuf's hard limit is 2 GiB,
# but a proto holding its weights is copied by every load, serialisation and onnxslim pass: the full-size
# SigLIP (1.2 GB) checked inline peaked at 7.9 GB RSS; with its weights in a data file the export checks
# it on the weightless proto (export/torch_to_onnx.py: finish_one), as the LLM.
EXTERNAL_DATA_BYTES = 256 * 2**20


def needs_external_data(nbytes: int) -> bool:
    """Weights (or a file) this large are written as external data (the limit is read at call time)."""
    return nbytes > EXTERNAL_DATA_BYTES


def initializer_bytes(model: onnx.ModelProto) -> int:
    return sum(int(np.prod(t.dims)) * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
               for t in model.graph.initializer)


def save_model(model: onnx.ModelProto, path: Path, big: bool) -> str | None:
    """Write `model` to `path`; big: its weights into one file beside it. -> that file's name, or None."""
    data = path.name + ".data"
    (path.parent / data).unlink(missing_ok=True)
    if big:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=data,
                        size_threshold=1024)
        return data
    onnx.save_model(model, str(path))
    return None


def load_weights(model: onnx.ModelProto, base_dir: Path) -> None:
    """Read `model`'s external tensors (paths relative to base_dir) into the proto."""
    load_external_data_for_model(model, str(base_dir))


def external_files(model: onnx.ModelProto) -> list[str]:
    """The external-data files `model`'s initializers read, sorted."""
    return sorted({kv.value for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL
                   for kv in t.external_data if kv.key == "location"})


def copy_graph(graph: Path, dst: Path) -> Path:
    """The graph file and the external-data files it names, copied into the folder `dst` under the same
    names (a graph names its data files relative to itself). -> the copy of the graph."""
    dst.mkdir(parents=True, exist_ok=True)
    for name in [graph.name, *external_files(onnx.load(str(graph), load_external_data=False))]:
        shutil.copyfile(graph.parent / name, dst / name)
    return dst / graph.name


def save_graph(model: onnx.ModelProto, path: Path, data: str | None = None) -> str:
    """Write `model` whose weights stay in their external-data file (`data`, default path.name + '.data',
    left unchanged): the graph alone is serialised. -> that file's name."""
    data = data or path.name + ".data"
    files = external_files(model)
    assert files == [data], f"{path.name}: weights in {files}, expected [{data}]"
    onnx.save_model(model, str(path))
    return data


def ort_session(path: Path | str, threads: int = 0, lean: bool = False) -> ort.InferenceSession:
    """CPU session; lean: no weight prepacking / arena (export-time checks of multi-GB graphs)."""
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if lean:
        so.enable_cpu_mem_arena = False
        so.add_session_config_entry("session.disable_prepacking", "1")
    if threads:
        so.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
