"""Save and stop on a signal: the advance warning of a preemption or a time limit.

SLURM sends SIGTERM (or the signal of ``--signal=SIG@SECONDS``) before it kills a job; torchrun
forwards a SIGTERM it receives to its workers and kills them TORCH_ELASTIC_SHUTDOWN_TIMEOUT
(default 30) seconds later. The handler only notes
the signal. The loop asks ``agreed`` at its read-backs (every --log-every-n-steps steps, where it
already waits for the device), so every rank learns, at the same step, that some rank got one:
they save that step's checkpoint together and stop. A second signal to a process ends it at
once, with the signal's default action. Handlers can only be set from the main thread: a run
started from another thread keeps the signals' defaults (said in a warning).
"""
import logging
import signal
import threading

import torch
import torch.distributed as dist


def parse_signals(text):
    """``--stop-signals`` ('TERM,USR1', 'SIGTERM', '' for none) -> [signal.Signals]; ValueError
    naming the unknown name."""
    out = []
    for name in (n.strip().upper() for n in str(text or "").split(",")):
        if not name:
            continue
        full = name if name.startswith("SIG") else "SIG" + name
        if full in ("SIGKILL", "SIGSTOP") or not hasattr(signal, full) or full.startswith("SIG_"):
            raise ValueError(f"{name!r} is not a signal a process can catch")
        out.append(signal.Signals[full])
    return out


class StopOnSignal:
    """Notes the first of ``signals`` this process receives (``received``), between ``install``
    and ``restore``, which puts back the handlers it replaced."""

    def __init__(self, signals):
        self.signals, self.received, self.previous = list(signals), None, {}

    def install(self):
        if self.signals and threading.current_thread() is not threading.main_thread():
            logging.getLogger("alip.train").warning(
                "--stop-signals: not the main thread, so %s keep their default action (no save on "
                "a signal)", ",".join(s.name for s in self.signals))
            return self
        for s in self.signals:
            self.previous[s] = signal.signal(s, self._note)
        return self

    def restore(self):
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        self.previous.clear()

    def _note(self, signum, frame):
        if self.received is not None:  # the second: no more waiting
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)
        self.received = signal.Signals(signum)

    def agreed(self, info):
        """The signal some rank received (the highest number if several), the same on every
        rank, or None. A collective: every rank calls it at the same step."""
        if not info.distributed:
            return self.received
        t = torch.tensor([int(self.received or 0)], device=info.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        got = int(t.item())
        return signal.Signals(got) if got else None
