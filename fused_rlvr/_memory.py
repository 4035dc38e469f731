"""Peak resident memory of a block of code on Linux, for the CPU memory benchmarks and the demo.

Writing "5" to /proc/self/clear_refs resets the process's RSS high-water mark (VmHWM); VmHWM read after the
block is then the block's own peak. (getrusage's ru_maxrss cannot be reset and, on Linux, a child process
inherits the high-water mark its parent had when it forked.) Where clear_refs is not writable, a thread
samples the current RSS every millisecond instead.
"""

from __future__ import annotations

import ctypes
import threading


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def rss_bytes() -> int:
    return _status_kib("VmRSS") * 1024


class PeakRSS:
    """`with PeakRSS() as m: ...` then m.base, m.peak and m.extra (= peak - base) in bytes."""

    def __enter__(self):
        try:  # hand freed heap pages back, or reused pages would hide the block's own growth
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:
            pass
        self.base = rss_bytes()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self._thread = None
        except OSError:
            self.peak = self.base
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, rss_bytes())

    def __exit__(self, *exc):
        if self._thread is None:
            self.peak = _status_kib("VmHWM") * 1024
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, rss_bytes())
        self.extra = self.peak - self.base
