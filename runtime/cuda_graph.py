"""Capture-once, replay-always for a fixed sequence of GPU work over fixed buffers.

The first call runs the work eagerly (TensorRT and cuBLAS initialise lazily on a first enqueue, and
that initialisation cannot be captured), then captures it; later calls replay the graph. Replaying is
only correct while every shape and buffer address the work touches stays the same: the owner drops the
capture (`reset`) whenever it rebinds.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


class CapturedStep:
    def __init__(self, work: Callable[[torch.cuda.Stream], None], stream: torch.cuda.Stream):
        self.work, self.stream = work, stream
        self.graph: torch.cuda.CUDAGraph | None = None
        self.replays = 0

    def reset(self) -> None:
        self.graph = None

    def __call__(self) -> None:
        if self.graph is not None:
            with torch.cuda.stream(self.stream):
                self.graph.replay()
            self.replays += 1
            return
        self.work(self.stream)  # the warm-up run also produces this call's outputs
        self.stream.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, stream=self.stream):  # recorded, not executed
            self.work(self.stream)
        self.graph = g


class StepRunner:
    """How a step function runs on a backend: called as it is on the CPU (or any backend that is not
    `capturable`); on a capturable GPU backend, enqueued on the backend's stream, captured once as a
    CUDA graph and replayed, the caller's stream then waiting for it. `reset()` when a buffer the step
    touches is reallocated (a KV bucket change)."""

    def __init__(self, backend, work: Callable[[], object]):
        self.work = work
        self.graph = CapturedStep(self._on, backend.stream) if backend.capturable else None

    def _on(self, stream: torch.cuda.Stream) -> None:
        with torch.cuda.stream(stream):
            self.work()

    def reset(self) -> None:
        if self.graph is not None:
            self.graph.reset()

    def write(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        """dst <- src ordered before the next step (on the step's stream when it is captured)."""
        if self.graph is None:
            dst.copy_(src)
            return
        with torch.cuda.stream(self.graph.stream):
            dst.copy_(src)

    def __call__(self) -> None:
        if self.graph is None:
            self.work()
            return
        # the step sees what the caller wrote between steps (a row filled or freed, teacher-forced ids)
        self.graph.stream.wait_stream(torch.cuda.current_stream())
        self.graph()
        torch.cuda.current_stream().wait_stream(self.graph.stream)
