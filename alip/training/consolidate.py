"""One open_clip model file from a sharded (``train.py --fsdp``) checkpoint.

    python -m alip.training.consolidate RUN/checkpoints/epoch_3.dcp OUT.pt

writes what a DDP run writes as ``epoch_3.pt``: ``{"state_dict": <open_clip model state_dict>,
"model", "epoch", "step", "method", "eval_heads", "model_kwargs"}``, which
``open_clip.create_model(name, pretrained=OUT.pt)`` and eval_*.py load. One process, no process
group: DCP reads every rank's shard of ``model/`` (the optimizer state is not read). The file
is written to a temporary name and renamed.
"""
import argparse
import sys
import tempfile
from pathlib import Path

import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from alip.cli import one_line

from . import checkpoint as ckpt


def consolidate(ckpt_path, out):
    """The sharded checkpoint directory ``ckpt_path`` as one model file ``out`` -> ``out``."""
    ckpt_path, out = Path(ckpt_path), Path(out)
    if not ckpt_path.is_dir():
        raise ckpt.CheckpointError(f"{ckpt_path} is not a sharded checkpoint directory "
                                   f"(RUN/checkpoints/TAG.dcp of a train.py --fsdp run)")
    why = ckpt.sharded_problem(ckpt_path, parts=("model",))  # an old epoch's: no optim/
    if why:
        raise ckpt.CheckpointError(f"{ckpt_path}: {why}")
    meta = torch.load(ckpt_path / "meta.pt", map_location="cpu", weights_only=False)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        dcp_to_torch_save(str(ckpt_path / "model"), str(Path(tmp) / "whole.pt"))
        encoder = torch.load(Path(tmp) / "whole.pt", map_location="cpu",
                             weights_only=True)["model"]
    state_dict = {k[len("model."):]: v for k, v in encoder.items() if k.startswith("model.")}
    bad = ckpt.nonfinite_weights(state_dict)
    if bad:
        raise ckpt.CheckpointError(f"{ckpt_path}: non-finite weights ({bad[0]} ...)")
    ckpt._atomic_save({"state_dict": state_dict, **meta}, out)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m alip.training.consolidate",
        description="Turn a sharded checkpoint of train.py --fsdp (RUN/checkpoints/TAG.dcp) "
                    "into the single model file a DDP run writes (open_clip-loadable).")
    p.add_argument("checkpoint", help="the TAG.dcp directory")
    p.add_argument("out", help="the model file to write (e.g. epoch_3.pt)")
    args = p.parse_args(argv)
    try:
        path = consolidate(args.checkpoint, args.out)
    except (ckpt.CheckpointError, OSError) as e:
        raise SystemExit(f"consolidate: error: {one_line(e)}")
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
