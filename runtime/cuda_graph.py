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
