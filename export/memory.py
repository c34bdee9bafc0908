"""Memory bookkeeping for the export's per-graph records: the peak RSS while a block runs, and freed heap
handed back to the OS between graphs (the full-size export's budget is tight)."""

from __future__ import annotations

import ctypes
import gc
import threading

import psutil


def release_memory() -> None:
    """gc, then hand freed heap back to the OS (glibc keeps it otherwise, and RSS would not drop)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


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
