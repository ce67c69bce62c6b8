"""Ctrl-C and SIGTERM during training: finish the current step, save a checkpoint, exit cleanly.

The first signal only sets a flag the loop checks after each optimizer step (on several processes the flag
is shared, so every rank stops at the same step); a second Ctrl-C interrupts at once. Repeated SIGTERMs
(a launcher such as torchrun forwards one after the terminal's SIGINT) keep waiting for the checkpoint.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any


class StopRequest:
    def __init__(self) -> None:
        self.signal_name: str | None = None

    def requested(self, accelerator: Any) -> bool:
        """Whether any process received a stop signal (a collective call when there are several)."""
        if accelerator.num_processes == 1:
            return self.signal_name is not None
        import torch

        flag = torch.tensor([1.0 if self.signal_name else 0.0], device=accelerator.device)
        return bool(accelerator.reduce(flag, reduction="sum").item() > 0)


@contextmanager
def stop_on_signals() -> Iterator[StopRequest]:
    """Turn SIGINT/SIGTERM into a stop request for the duration of the block (main thread only)."""
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return
    handled = (signal.SIGINT, signal.SIGTERM)
    previous = {number: signal.getsignal(number) for number in handled}

    def on_signal(number: int, frame: FrameType | None) -> None:
        request.signal_name = request.signal_name or signal.Signals(number).name
        signal.signal(signal.SIGINT, previous[signal.SIGINT])  # a second Ctrl-C acts immediately

    for number in handled:
        signal.signal(number, on_signal)
    try:
        yield request
    finally:
        for number in handled:
            signal.signal(number, previous[number])
