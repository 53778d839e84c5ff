"""``--torchcompile``: ``torch.compile`` the image tower, where it runs; eager elsewhere.

What is compiled: the open_clip model's image tower (``model.visual``), whose shapes are the
same every step (batch x 3 x H x W), so it compiles once. The text tower stays eager: the
length-aware paths (``alip.model.encode_text``: grouped / trimmed / packed) change the sequence
length, the number of passes and the rows of each pass from batch to batch, and read the lengths
on the host, so a compiled text tower recompiles per shape or breaks its graph at every host
read (measured: docs/benchmarks.md, bench/compile_step.py). The loss stays eager too: the
methods' criteria gather across ranks and update EMA / queue buffers in place (graph breaks).

The tower is compiled in place, as its own ``forward`` (``torch.compile`` of the bound method):
the parameters, their names (checkpoints, ``state_dict``), DDP's wrapping of the encoder and
the optimizer's parameter list are the same as eager.

Fallback, with ONE warning and no error: a torch whose compiler does not run on this device
(no C++ compiler for the CPU backend, no triton for CUDA) is found by a probe before the model
is built upon; a tower the compiler cannot take fails at its first call, which then runs eager
and stays eager. The first call's time (the compile) and the second's are logged once.
"""
import logging
import time

import torch

from alip.cli import one_line


def compiler_error(device):
    """None when ``torch.compile`` compiles and runs a small function on ``device``, else the
    reason in one line (what the fallback warning says)."""
    if not hasattr(torch, "compile"):
        return f"torch {torch.__version__} has no torch.compile"
    try:
        fn = torch.compile(lambda x: (x * 2.0).sin().sum(), dynamic=False)
        fn(torch.ones(4, device=device))
    except Exception as e:  # noqa: BLE001  (inductor raises many kinds: all mean "no compiler")
        return _reason(e)
    return None


def _reason(e):
    """A compiler exception in one line, without dynamo's advice on verbose logging."""
    return one_line(e).split(" Set TORCHDYNAMO_VERBOSE")[0][:300]


class _CompiledForward:
    """The tower's forward: compiled, or eager after the compiled one failed (said once)."""

    def __init__(self, tower, what, log, backend="inductor", dynamic=False):
        self.eager, self.what, self.log = tower.forward, what, log
        self.compiled = torch.compile(tower.forward, backend=backend, dynamic=dynamic)
        self.failed, self.calls, self.first_s = False, 0, None

    def __call__(self, *args, **kwargs):
        if self.failed:
            return self.eager(*args, **kwargs)
        start = time.perf_counter() if self.calls < 2 else None
        try:
            out = self.compiled(*args, **kwargs)
        except Exception as e:  # noqa: BLE001  (a compile failure: dynamo raises before running)
            self.failed = True
            self.log.warning("--torchcompile: the %s cannot compile (%s): it runs eager",
                             self.what, _reason(e))
            return self.eager(*args, **kwargs)
        if start is not None:
            self._timed(out, time.perf_counter() - start)
        return out

    def _timed(self, out, seconds):
        if torch.is_tensor(out) and out.is_cuda:  # the first two calls only: then no sync
            torch.cuda.synchronize(out.device)
        self.calls += 1
        if self.calls == 1:
            self.first_s = seconds
        else:
            self.log.info("--torchcompile: %s forward %.1f s at its first call (the compile), "
                          "%.3f s at its second", self.what, self.first_s, seconds)


def compile_towers(cfg, model, device, log=None):
    """Under ``cfg.torchcompile``: the image tower of ``model`` compiled in place -> the names of
    the compiled parts ([] when eager: the flag off, or the warning said why)."""
    if not getattr(cfg, "torchcompile", False):
        return []
    log = log or logging.getLogger("alip.train")
    why = compiler_error(device)
    if why is not None:
        log.warning("--torchcompile: torch.compile does not run on %s here (%s): training "
                    "eager", device, why)
        return []
    tower = getattr(model, "visual", None)
    if not isinstance(tower, torch.nn.Module):
        log.warning("--torchcompile: --model %s has no image tower at .visual: training eager",
                    cfg.model)
        return []
    tower.forward = _CompiledForward(tower, "image tower", log)
    log.info("--torchcompile: image tower compiled (torch.compile, inductor); the text tower "
             "and the loss run eager (length-aware text shapes change every batch)")
    return ["image tower"]
