"""``--fsdp``: FSDP2 (``torch.distributed.fsdp.fully_shard``) instead of DDP.

Each residual block of the image and text towers is its own FSDP unit, and the method's encoder
(the module DDP wraps otherwise: the open_clip model with its embeddings, projections and
logit_scale, plus the method's heads) is the root unit, so every rank holds 1/W of every
parameter, gradient and optimizer state; a block's parameters are all-gathered for its forward
and backward only. Buffers (the criterion's gate EMAs and memory banks, BatchNorm statistics)
are not sharded. The mixed-precision policy follows ``--precision``: ``amp_bf16`` (and ``amp``
on the CPU, which autocasts to bf16) computes with bf16 parameters and reduces gradients in
fp32; ``fp32`` keeps everything fp32. ``amp`` on CUDA (fp16 with a GradScaler) is refused.

The wrapping happens before the optimizer is built (it replaces the parameters by sharded
DTensors). One process without torchrun gets a one-rank process group of its own (``ensure_group``),
so ``--fsdp`` runs, and resumes a sharded checkpoint, anywhere.
"""
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from .config import TrainConfigError

_OWN_GROUP = []  # the one-rank group ensure_group made (destroyed by release_group)


def ensure_group(info):
    """A process group for FSDP: torchrun's, or a one-rank group of this process."""
    if dist.is_initialized():
        return
    backend = "nccl" if info.device.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    _OWN_GROUP.append(True)


def release_group():
    if _OWN_GROUP and dist.is_initialized():
        dist.destroy_process_group()
    _OWN_GROUP.clear()


def policy(precision, device):
    """The MixedPrecisionPolicy of ``--precision`` on ``device``."""
    if precision == "amp" and device.type == "cuda":
        raise TrainConfigError("--fsdp --precision amp: fp16 with a GradScaler is not supported "
                               "under FSDP; use --precision amp_bf16 (or fp32)")
    if precision in ("amp_bf16", "amp"):
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def _blocks(tower, name, model_name):
    blocks = getattr(getattr(tower, "transformer", None), "resblocks", None)
    if not isinstance(blocks, torch.nn.ModuleList) or not len(blocks):
        raise TrainConfigError(
            f"--fsdp: --model {model_name}'s {name} tower ({type(tower).__name__}) has no "
            f"transformer.resblocks for FSDP to shard block by block; train it without --fsdp "
            f"or pick a ViT/transformer --model")
    return list(blocks)


def tower_blocks(model, model_name):
    """The residual blocks of the open_clip model's image and text towers (CLIP keeps its text
    transformer on the model, CustomTextCLIP in ``.text``); a tower without them is a
    TrainConfigError naming it."""
    text = model.text if hasattr(model, "text") else model
    return (_blocks(getattr(model, "visual", None), "image", model_name)
            + _blocks(text, "text", model_name))


def shard(encoder, cfg, info):
    """``fully_shard`` each tower block, then the encoder (the root), on one mesh of all ranks;
    in place (the encoder becomes an FSDPModule). Returns the encoder."""
    blocks = tower_blocks(encoder.model, cfg.model)  # before any collective: errors are local
    mp_policy = policy(cfg.precision, info.device)
    ensure_group(info)
    mesh = init_device_mesh(info.device.type, (dist.get_world_size(),))
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=mp_policy)
    fully_shard(encoder, mesh=mesh, mp_policy=mp_policy, ignored_params=set(scalars(encoder)))
    return encoder


def scalars(module):
    """The 0-dim parameters (logit_scale, SigLIP's logit_bias): FSDP2 cannot shard them, so
    every rank keeps them whole and ``average_scalar_grads`` averages their gradients."""
    return [p for p in module.parameters() if p.dim() == 0]


def average_scalar_grads(module, world_size):
    """The mean over ranks of the 0-dim parameters' gradients, in one all_reduce (DDP's
    sum-of-halves for W = 2, bit for bit: halving is exact)."""
    grads = [p.grad for p in scalars(module) if p.grad is not None]
    if not grads or world_size == 1:
        return
    flat = torch.stack(grads) / world_size
    dist.all_reduce(flat)
    for g, v in zip(grads, flat):
        g.copy_(v)


def is_fsdp(module):
    return isinstance(module, FSDPModule)


def full(tensor):
    """A DTensor's whole value on every rank (a collective: every rank calls it); other
    tensors as they are."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def local(tensor):
    """This rank's shard of a DTensor (no communication); other tensors as they are."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor
