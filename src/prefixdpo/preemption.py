"""Stopping a run cleanly when it is told to stop: SIGTERM (what cluster schedulers send before preemption) or SIGINT.

The first such signal lets the current optimizer step finish, saves a checkpoint and ends training; the run then
exits normally, saying how to resume. A second SIGINT exits at once (a checkpoint being written then stays in its
staging folder and is never read). With several processes every process stops at the same step even if the signal
reached only some of them: at each step end the processes agree through one all-reduce of a flag (only when more
than one process runs).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading

import torch
from transformers import TrainerCallback

logger = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopOnSignal(TrainerCallback):
    """A callback that turns the first SIGTERM/SIGINT into "save a checkpoint and stop after this step".

    ``install()`` / ``uninstall()`` set and restore the handlers (main thread only; elsewhere they do nothing).
    After training, ``stopped_by`` is the signal's name and ``stopped_at`` the step, or both None.
    """

    def __init__(self, accelerator):
        self.accelerator = accelerator
        self.received: int | None = None
        self.stopped_by: str | None = None
        self.stopped_at: int | None = None
        self._previous: dict[int, object] = {}

    def install(self) -> None:
        self.received = self.stopped_by = self.stopped_at = None
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._on_signal)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _on_signal(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        rank = f"[process {self.accelerator.process_index}] " if self.accelerator.num_processes > 1 else ""
        if self.received is None:
            self.received = signum
            print(f"{rank}{name} received: finishing this step, then saving a checkpoint and stopping "
                  "(send SIGINT again to exit at once)", file=sys.stderr, flush=True)
        elif signum == signal.SIGINT:
            print(f"{rank}second SIGINT: exiting now, without saving", file=sys.stderr, flush=True)
            os._exit(128 + signum)

    def _agreed_stop(self) -> bool:
        stop = self.received is not None
        if self.accelerator.num_processes > 1:
            flag = torch.tensor([1 if stop else 0], device=self.accelerator.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            stop = bool(flag.item())
        return stop

    def on_step_end(self, args, state, control, **kwargs):
        if self._agreed_stop():
            control.should_save = True
            control.should_training_stop = True
            self.stopped_by = signal.Signals(self.received).name if self.received is not None else "a signal to another process"
            self.stopped_at = state.global_step
        return control
