"""Per-rank bytes of parameters, gradients and optimizer state under ``train.py --fsdp`` on W
ranks against DDP (every rank holds all of them), for CLIP on a ViT model; CPU/gloo processes.

    python bench/fsdp_memory.py [--model ALIP-ViT-B-32] [--worlds 2 4]

Each rank builds the CLIP method's encoder, shards it as train.py does (``alip.training.fsdp``),
builds train.py's AdamW and runs one real step (forward, backward, optimizer) on a batch of 2;
then it counts the bytes of its local shards (parameters, their gradients, AdamW's exp_avg /
exp_avg_sq / step). DDP's per-rank figure is the same count on the unsharded encoder. Printed:
per rank the FSDP bytes, DDP's, the ratio and ratio x W (1.0: a perfect 1/W; goal <= 1.1).
Nothing is timed. The 0-dim parameters (logit_scale) stay whole on every rank.
"""
import argparse
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import open_clip  # noqa: E402

import alip  # noqa: E402,F401
from alip.methods import get_method  # noqa: E402
from alip.training.distributed import DistInfo  # noqa: E402
from alip.training.fsdp import local, shard  # noqa: E402
from alip.training.optim import build_optimizer  # noqa: E402
from alip.training.params import parse_args  # noqa: E402


def nbytes(t):
    t = local(t)
    return t.numel() * t.element_size()


def counts(encoder, optimizer):
    params = [p for p in encoder.parameters() if p.requires_grad]
    state = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    return {"params": sum(nbytes(p) for p in encoder.parameters()),
            "grads": sum(nbytes(p.grad) for p in params if p.grad is not None),
            "optimizer": sum(nbytes(v) for v in state)}


def one_step(model_name, rank, world, fsdp):
    args = parse_args(["--method", "clip", "--model", model_name, "--precision", "fp32",
                       "--device", "cpu", *(["--fsdp"] if fsdp else [])])
    args.world_size = world
    torch.manual_seed(0)
    method = get_method("clip")(args, rank=rank, world_size=world)
    method.attach(open_clip.create_model(model_name, **method.model_kwargs()))
    encoder = method.encoder
    if fsdp:
        shard(encoder, args, DistInfo(rank, rank, world, world > 1, torch.device("cpu")))
    optimizer = build_optimizer(encoder, 1e-4, 0.1, (0.9, 0.98), 1e-6)
    size = encoder.model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    batch = {"image": torch.randn(2, 3, size, size),
             "raw": open_clip.get_tokenizer(model_name)(["a photo", "a cat on a mat"])}
    feats = encoder(batch)
    loss = (feats["image"] @ feats["raw"].T * feats["logit_scale"]).logsumexp(1).mean()
    loss.backward()
    optimizer.step()
    return counts(encoder, optimizer)


def worker(rank, world, port, model_name, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        got = one_step(model_name, rank, world, fsdp=True)
        gathered = [None] * world
        dist.all_gather_object(gathered, got)
        if rank == 0:
            torch.save(gathered, out)
    finally:
        dist.destroy_process_group()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="ALIP-ViT-B-32")
    p.add_argument("--worlds", type=int, nargs="+", default=[2, 4])
    p.add_argument("--out", default="/tmp/fsdp_memory.pt")
    a = p.parse_args()
    ddp = one_step(a.model, 0, 1, fsdp=False)
    total = sum(ddp.values())
    print(f"{a.model}: DDP per rank: " + ", ".join(f"{k} {v / 2**20:.1f} MiB"
                                                    for k, v in ddp.items())
          + f", total {total / 2**20:.1f} MiB")
    for world in a.worlds:
        import socket
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        mp.spawn(worker, nprocs=world, join=True, args=(world, port, a.model, a.out))
        for rank, got in enumerate(torch.load(a.out)):
            mine = sum(got.values())
            parts = ", ".join(f"{k} {v / 2**20:.1f} MiB ({v / ddp[k] * world:.3f})"
                              for k, v in got.items())
            print(f"W={world} rank {rank}: {parts}; total {mine / 2**20:.1f} MiB = "
                  f"{mine / total:.4f} of DDP, x W = {mine / total * world:.3f}")


if __name__ == "__main__":
    main()
