"""Ctrl-C and SIGTERM during training: finish the current step, save a checkpoint, stop."""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Callable
from typing import Optional


class StopSignals:
    """While active (a `with` block in the main thread), the first SIGINT / SIGTERM only records its name in
    `request` and prints `notice(name)`; the loop stops after the current step (under FSDP2 the request is
    shared, so every process stops after the same step). A second signal aborts at once
    (KeyboardInterrupt). Elsewhere than the main thread it does nothing."""

    def __init__(self, notice: Callable[[str], str]):
        self.notice = notice
        self.request: Optional[str] = None
        self._old: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        if self.request is not None:
            raise KeyboardInterrupt
        self.request = signal.Signals(signum).name
        print(self.notice(self.request), file=sys.stderr, flush=True)

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old = {}
