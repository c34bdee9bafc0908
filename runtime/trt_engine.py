"""One TensorRT engine: deserialize, bind persistent device buffers (torch CUDA tensors) for one
profile and set of shapes, enqueue on a stream, replay as a CUDA graph.

After NVIDIA's demo/Diffusion Engine pattern: contexts use USER_MANAGED device memory so every
engine of a pipeline shares one scratch block sized by the largest (they run one after another on
one stream); buffers are allocated at bind time and their addresses stay fixed until the next bind,
which is what CUDA-graph replay requires. GPU only: imported by trt_backend after the checks.
"""

from __future__ import annotations

from pathlib import Path

import tensorrt as trt
import torch

from janusflow_trt.errors import CheckpointError

from .cuda_graph import CapturedStep

TORCH_DTYPES: dict[trt.DataType, torch.dtype] = {
    trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16, trt.DataType.BF16: torch.bfloat16,
    trt.DataType.INT64: torch.int64, trt.DataType.INT32: torch.int32, trt.DataType.INT8: torch.int8,
    trt.DataType.BOOL: torch.bool,
}


def dims(d: trt.Dims) -> tuple[int, ...]:
    return tuple(d[i] for i in range(len(d)))  # the stubs give Dims no __iter__


class Engine:
    def __init__(self, path: Path, logger: trt.ILogger):
        self.path = path
        engine = trt.Runtime(logger).deserialize_cuda_engine(path.read_bytes())
        if engine is None:
            raise CheckpointError(f"TensorRT cannot deserialize {path} (built by another TensorRT?)")
        self.engine = engine
        self.names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.inputs = [n for n in self.names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in self.names if n not in self.inputs]
        self.context = engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
        self.buffers: dict[str, torch.Tensor] = {}  # the current binding
        self.owned: dict[str, torch.Tensor] = {}  # allocated here, reused by later binds of the same shape
        self.bound: tuple | None = None  # (profile, input shapes, external addresses) of the current binding
        self.step: CapturedStep | None = None

    @property
    def device_memory_size(self) -> int:
        return int(self.engine.device_memory_size_v2)

    def set_device_memory(self, block: torch.Tensor) -> None:
        assert block.is_cuda and block.numel() * block.element_size() >= self.device_memory_size
        self.context.set_device_memory(block.data_ptr(), block.numel() * block.element_size())

    def bind(self, profile: int, shapes: dict[str, tuple[int, ...]], stream: torch.cuda.Stream,
             external: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Select `profile`, fix the input shapes, and give every I/O tensor a device buffer: `external`
        ones (e.g. the KV cache owned by the pipeline) as they are, the rest allocated here once."""
        external = external or {}
        key = (profile, tuple(sorted(shapes.items())), tuple(sorted((n, t.data_ptr()) for n, t in external.items())))
        if key == self.bound:
            return self.buffers
        if not self.context.set_optimization_profile_async(profile, stream.cuda_stream):
            raise RuntimeError(f"{self.path.name}: cannot select profile {profile}")
        for n in self.inputs:
            if not self.context.set_input_shape(n, trt.Dims(list(shapes[n]))):
                raise RuntimeError(f"{self.path.name}: shape {shapes[n]} of {n} is outside profile {profile}")
        for n in self.names:
            shape = dims(self.context.get_tensor_shape(n))
            dtype = TORCH_DTYPES[self.engine.get_tensor_dtype(n)]
            t = external.get(n)
            if t is None:
                old = self.owned.get(n)  # never one lent by a caller: that one belongs to someone else
                t = old if old is not None and tuple(old.shape) == shape and old.dtype == dtype else \
                    torch.empty(shape, dtype=dtype, device="cuda")
                self.owned[n] = t
            assert tuple(t.shape) == shape and t.dtype == dtype and t.is_contiguous(), \
                f"{n}: buffer {tuple(t.shape)} {t.dtype}, engine wants {shape} {dtype}"
            self.context.set_tensor_address(n, t.data_ptr())
            self.buffers[n] = t
        self.bound = key
        self.step = None  # addresses or shapes changed: a captured graph would be stale
        return self.buffers

    def enqueue(self, stream: torch.cuda.Stream) -> None:
        """Queue one execution; returns without waiting for the GPU."""
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError(f"{self.path.name}: execute_async_v3 failed (see the TensorRT log)")

    def replay(self, stream: torch.cuda.Stream) -> None:
        """enqueue() as a CUDA graph: eager + capture on the first call after a bind, replay after."""
        if self.step is None:
            self.step = CapturedStep(self.enqueue, stream)
        self.step()
