"""Process-group setup (torchrun / SLURM / one plain process) on top of open_clip_train's helper.

Backend: nccl on CUDA, gloo on CPU, chosen by ``open_clip_train.distributed`` from the device;
``--dist-backend`` overrides it. ``python train.py`` without torchrun is one process.
"""
from dataclasses import dataclass

import torch
import torch.distributed as dist
from open_clip_train.distributed import init_distributed_device_so

from alip.cli import resolve_device


@dataclass
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    distributed: bool
    device: torch.device

    @property
    def is_master(self):
        return self.rank == 0


def init_distributed(device="auto", dist_backend=None, dist_url=None):
    try:  # open_clip_train's helper would quietly run on the CPU without a GPU
        device = resolve_device(device)
    except ValueError as e:
        raise RuntimeError(str(e)) from None
    r = init_distributed_device_so(device=device, dist_backend=dist_backend, dist_url=dist_url)
    dev = torch.device(r["device"])
    if dev.type == "cuda" and dev.index is None:  # a plain "cuda": name the GPU (DALI, DDP)
        dev = torch.device("cuda", torch.cuda.current_device())
    return DistInfo(rank=r["global_rank"], local_rank=r["local_rank"], world_size=r["world_size"],
                    distributed=r["distributed"], device=dev)


def all_ranks_true(flag, info):
    """``flag`` (a 0-dim bool tensor) AND-ed over ranks, on the device: no host sync."""
    if not info.distributed:
        return flag
    t = flag.to(torch.int32).reshape(1)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return t[0].bool()


def mean_over_ranks(values, info):
    """The mean over ranks of a float tensor, on the device (one small all_reduce)."""
    if not info.distributed or values.numel() == 0:
        return values
    t = values.clone()
    dist.all_reduce(t)
    return t / info.world_size


def all_gather_object(obj, info):
    if not info.distributed:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(info):
    if info.distributed:
        dist.barrier()


def cleanup(info):
    if info.distributed and dist.is_initialized():
        dist.destroy_process_group()
