"""What train.py, the eval CLIs and caption.py share, with one wording everywhere: flag checks
made before anything is loaded (numeric ranges in interval notation, ``"[1, inf)"``,
``"(0, 1)"``, and ``--device``) and errors as one line."""
import math
import re

import torch


def interval_error(interval, value):
    """Why ``value`` is not in ``interval`` (``"[lo, hi)"``: ``[``/``]`` include the bound,
    ``(``/``)`` exclude it; NaN never passes), as ``"must be ..., got V"``, or None."""
    lo_b, lo, hi, hi_b = re.fullmatch(r"([\[(])(\S+), (\S+)([\])])", interval).groups()
    lo, hi, v = float(lo), float(hi), float(value)
    if (v > lo or (lo_b == "[" and v == lo)) and (v < hi or (hi_b == "]" and v == hi)):
        return None
    want = f"{'>=' if lo_b == '[' else '>'} {lo:g}" if hi == math.inf else f"in {interval}"
    return f"must be {'a finite number ' if not math.isfinite(v) else ''}{want}, got {value}"


def parse_part(text):
    """``--part I/N`` -> (I, N) with 0 <= I < N; ValueError naming the flag otherwise."""
    try:
        i, n = (int(x) for x in str(text).split("/"))
        if 0 <= i < n:
            return i, n
    except ValueError:
        pass
    raise ValueError(f"--part {text!r}: expected I/N with 0 <= I < N")


def resolve_device(device, local_rank=None):
    """``device`` as a torch device string. ``auto``: cuda (``cuda:local_rank`` when given) if a
    GPU is visible, else cpu. A value that names no device, or a GPU that is not there, is a
    ValueError naming ``--device``."""
    dev = str(device)
    if dev == "auto":
        if not torch.cuda.is_available():
            return "cpu"
        return "cuda" if local_rank is None else f"cuda:{local_rank}"
    if dev != "cpu" and not re.fullmatch(r"cuda(:\d+)?", dev):
        raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {dev!r}")
    if dev.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"--device {dev}: no CUDA GPU is visible (--device auto falls back to "
                             f"the CPU)")
        if ":" in dev and int(dev.split(":")[1]) >= torch.cuda.device_count():
            raise ValueError(f"--device {dev}: only {torch.cuda.device_count()} CUDA GPU(s) are "
                             f"visible (cuda:0 .. cuda:{torch.cuda.device_count() - 1})")
    return dev


def one_line(error):
    """The message of ``error`` as one line. An error re-raised from a DataLoader worker carries
    the worker's traceback; its last line holds the original message."""
    text = str(error).strip()
    if "Original Traceback" in text:
        text = re.sub(r"^[\w.]+: ", "", text.splitlines()[-1].strip())
    return " ".join(text.split()) or type(error).__name__


def without_addresses(text):
    """``text`` without object reprs such as ``<_io.BytesIO object at 0x7f..>`` (PIL puts them in
    its messages): the same bytes every run."""
    return re.sub(r" ?<[^<>]* at 0x[0-9a-fA-F]+>", "", text)
