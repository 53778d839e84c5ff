"""The ``--device`` flag of train.py, the eval CLIs and caption.py: ``auto``, ``cpu``, ``cuda``
or ``cuda:N``, checked before anything is loaded, with one wording everywhere."""
import re

import torch


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
