"""Memory bookkeeping for the export's per-graph records: the peak RSS while a block runs, and freed heap
handed back to the OS between graphs (the full-size export's budget is tight)."""

from __future__ import annotations

import ctypes
import gc
import resource
import threading

import psutil


def release_memory() -> None:
    """gc, then hand freed heap back to the OS (glibc keeps it otherwise, and RSS would not drop)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


def release_freed_promptly(threshold: int = 1 << 20) -> None:
    """Allocations of >= threshold bytes taken straight from mmap, so that freeing one returns it to the OS
    at once. glibc's default threshold rises with the sizes it sees (up to 32 MB), after which the big
    numpy / ONNX Runtime buffers of a phase come from the heap and stay resident when freed: at full size
    the int8 range walk left 7.9 GB behind (0.8 GB with this), which the next phase's peak stacked on.
    Setting the threshold also turns glibc's adaptation off. For the export's process, not the runtime's
    (a fresh mapping per big buffer costs page faults a decode step would feel)."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, threshold)
    except (OSError, AttributeError):
        pass


def max_rss_mb() -> dict[str, float]:
    """The kernel's high-water marks so far (what `/usr/bin/time -v` reports as maximum resident set size):
    this process, and the largest of its waited-for children (e.g. the ModelOpt worker)."""
    return {"peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "children_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1)}


class PeakRSS:
    """Samples this process's RSS in a thread: peak during a `with` block (MB)."""

    def __enter__(self):
        self.proc, self.peak, self.stop = psutil.Process(), 0, threading.Event()
        self.peak = self.start = self.proc.memory_info().rss
        self.start_mb = round(self.start / 2**20, 1)
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()
        return self

    def _loop(self):
        while not self.stop.wait(0.05):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)
        self.peak_mb = round(self.peak / 2**20, 1)
