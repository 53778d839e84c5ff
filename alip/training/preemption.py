"""Save and stop on a signal: the advance warning of a preemption or a time limit.

SLURM sends SIGTERM (or the signal of ``--signal=SIG@SECONDS``) before it kills a job; torchrun
forwards a SIGTERM it receives to its workers and kills them TORCH_ELASTIC_SHUTDOWN_TIMEOUT
(default 30) seconds later. The handler only notes
the signal. The loop asks ``agreed`` at its read-backs (every --log-every-n-steps steps, where it
already waits for the device), so every rank learns, at the same step, that some rank got one:
they save that step's checkpoint together and stop. A second signal to a process ends it at
once, with the signal's default action, unless it is the same signal within ``REPEAT_WINDOW``
seconds of the first: under ``srun torchrun`` SLURM signals every process of the step and
torchrun forwards its own copy to each rank milliseconds later, one notice delivered twice
(taken for the impatient second one, it killed a rank before it saved). Handlers can only be set from the main thread: a run
started from another thread keeps the signals' defaults (said in a warning).

SLURM signals every process of the job step, and torchrun the whole process group of each rank:
the torch reader's DataLoader workers get the signal too, and torch's worker handler dies of a
SIGTERM that its parent did not send, so the rank failed with "DataLoader worker ... is killed
by signal" and saved nothing. The handler here is marked ``spares_data_workers``; the torch
reader looks for the mark when it starts its workers, and they then ignore these signals unless
their parent sends them (alip.data.torch_reader.OutliveStopSignals): the rank saves, then ends
its workers as usual. (DALI reads with threads of the rank: no process to spare.)
Only signals that ask a process to stop are accepted: a fault (SEGV, BUS, FPE, ...) returns to
the faulting instruction, CHLD comes with every child's exit, KILL and STOP cannot be caught.
"""
import logging
import signal
import threading
import time

import torch
import torch.distributed as dist


# requests to stop that a scheduler, a launcher or a user sends (SLURM's --signal takes any name;
# XCPU is LSF's and SGE's warning), in signal-number order
ACCEPTED = tuple(getattr(signal, n) for n in ("SIGHUP", "SIGINT", "SIGQUIT", "SIGUSR1", "SIGUSR2",
                                              "SIGALRM", "SIGTERM", "SIGXCPU") if hasattr(signal, n))


def parse_signals(text):
    """``--stop-signals`` ('TERM,USR1', 'SIGTERM', '' for none) -> [signal.Signals]; ValueError
    naming the refused name and listing the accepted ones (``ACCEPTED``)."""
    out = []
    for name in (n.strip().upper() for n in str(text or "").split(",")):
        if not name:
            continue
        full = name if name.startswith("SIG") else "SIG" + name
        if full not in {s.name for s in ACCEPTED}:
            raise ValueError(f"{name!r} is not {_why_refused(full)}; accepted: "
                             + ", ".join(s.name[3:] for s in ACCEPTED))
        out.append(signal.Signals[full])
    return out


def _why_refused(full):
    """What a refused signal name is not, in the words of its case."""
    if full in ("SIGKILL", "SIGSTOP"):
        return "a signal a process can catch"
    if full.startswith("SIG_") or not isinstance(getattr(signal, full, None), signal.Signals):
        return "a signal name"
    return "a request to stop that a handler can serve"


REPEAT_WINDOW = 2.0  # seconds: the same signal again within this is the same notice


class StopOnSignal:
    """Notes the first of ``signals`` this process receives (``received``), between ``install``
    and ``restore``, which puts back the handlers it replaced."""

    def __init__(self, signals):
        self.signals, self.received, self.previous = list(signals), None, {}
        self.received_at = None

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
        now = time.monotonic()
        if self.received is not None:
            if signum == self.received and now - self.received_at < REPEAT_WINDOW:
                return  # the same notice twice (SLURM's and torchrun's forwarded copy)
            signal.signal(signum, signal.SIG_DFL)  # a second request: no more waiting
            signal.raise_signal(signum)
        self.received, self.received_at = signal.Signals(signum), now

    # the torch reader's DataLoader workers, started while this is a handler, ignore its signals
    # from anyone but their parent: this process saves, then ends them (alip.data.torch_reader)
    _note.spares_data_workers = True

    def agreed(self, info):
        """The signal some rank received (the highest number if several), the same on every
        rank, or None. A collective: every rank calls it at the same step."""
        if not info.distributed:
            return self.received
        t = torch.tensor([int(self.received or 0)], device=info.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        got = int(t.item())
        return signal.Signals(got) if got else None
