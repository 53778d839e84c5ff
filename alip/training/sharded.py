"""Sharded checkpoints of ``--fsdp`` runs, with torch.distributed.checkpoint (DCP).

Layout beside the index (``alip.training.checkpoint``)::

    step_4.dcp/model/     DCP: the method's encoder (open_clip model under "model.", heads),
                          one ``__<rank>_0.distcp`` shard file per rank and ``.metadata``
    step_4.dcp/optim/     DCP: the optimizer state (get_state_dict: keyed by parameter name)
    step_4.dcp/meta.pt    model name, epoch, step, method, eval heads, model arguments: what
                          consolidate puts in the model file
    step_4.state.pt       scheduler, scaler, criterion buffers, position, RNG and reader states
                          (rank 0's pickle, as a DDP run's)

Save (every rank): the shards go to ``step_4.dcp.tmp/``; when every rank has written its own
(DCP's save ends in a collective; rank 0 writes ``.metadata`` last), rank 0 renames the
directory to ``step_4.dcp``, writes the state file and then the index: a kill at any moment
leaves the index naming only complete checkpoints. Resume (every rank): DCP reads each rank's
slices whatever number of ranks wrote them, so a checkpoint of W ranks resumes on W' ranks as
long as the global batch (--batch-size x processes x --accum-freq) is the same.
"""
import os
import shutil
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from . import checkpoint as ckpt
from .config import TrainConfigError
from .distributed import all_gather_object, barrier
from .fsdp import full, local
from .params import resume_conflicts


def nonfinite(encoder, info):
    """Names of the encoder's weights holding a NaN or inf on any rank (every rank calls it)."""
    mine = ckpt.nonfinite_weights({k: local(v) for k, v in encoder.state_dict().items()})
    return sorted({k for names in all_gather_object(mine, info) for k in names})


def full_tree(obj):
    """``obj`` (dicts of tensors: the eval heads) with every DTensor gathered whole."""
    if isinstance(obj, dict):
        return {k: full_tree(v) for k, v in obj.items()}
    return full(obj) if torch.is_tensor(obj) else obj


def save(run, tag, state, epoch, step, extra):
    """The sharded checkpoint ``tag`` of the run (every rank calls it) -> its directory."""
    ckpt_dir, info = Path(run.ckpt_dir), run.info
    final, tmp = ckpt_dir / f"{tag}.dcp", ckpt_dir / f"{tag}.dcp.tmp"
    if info.is_master:
        shutil.rmtree(tmp, ignore_errors=True)  # debris of a save that was killed
        ckpt.read_index(ckpt_dir)  # a damaged index stops the save before anything is written
    barrier(info)
    model_sd, optim_sd = get_state_dict(run.method.encoder, run.optimizer)
    dcp.save({"model": model_sd}, checkpoint_id=str(tmp / "model"))
    dcp.save({"optim": optim_sd}, checkpoint_id=str(tmp / "optim"))
    extra = full_tree(extra)  # the eval heads, whole (a collective)
    if info.is_master:
        ckpt._atomic_save({"model": run.cfg.model, "epoch": int(epoch), "step": int(step),
                           **extra}, tmp / "meta.pt")
        _replace_dir(tmp, final)
        state_file = ckpt_dir / f"{tag}.state.pt"
        ckpt._atomic_save(state, state_file)
        ckpt.add_to_index(ckpt_dir, {"model": final.name, "state": state_file.name,
                                     "epoch": int(epoch), "step": int(step), "sharded": True,
                                     "sha256": {"state": ckpt.sha256_of(state_file)}},
                          run.cfg.keep_last)
    barrier(info)
    return final


def _replace_dir(tmp, final):
    """``tmp`` renamed to ``final``; an older ``final`` (not in the index: a save of the same
    tag whose index write was cut off) moved aside first, then removed."""
    if final.exists():
        old = final.with_name(final.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        shutil.rmtree(old, ignore_errors=True)
    os.replace(tmp, final)
    fd = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(fd)  # the rename itself on disk before the index names it
    finally:
        os.close(fd)


def load_state(path):
    """(meta, training state) of the sharded checkpoint directory ``path``, after checking that
    every rank's shard is there; a CheckpointError names what is missing and where."""
    path = Path(path)
    why = ckpt.sharded_problem(path)
    if why:
        raise ckpt.CheckpointError(f"--resume {path}: {why}")
    state_path = ckpt.state_path_for(path)
    if not state_path.is_file():
        raise ckpt.CheckpointMissing(f"--resume: checkpoint file missing: {state_path}")
    entry = next((e for e in ckpt.read_index(path.parent) if e["model"] == path.name), None)
    why = entry and ckpt.verify_entry(path.parent, entry)
    if why:
        raise ckpt.CheckpointError(f"--resume: {why}")
    return ckpt._load(path / "meta.pt", weights_only=False), ckpt._load(state_path, False)


def check_config(path, saved, cfg, world_size):
    """The flags a resume must keep (``resume_conflicts``), but for the number of processes
    and --batch-size: DCP reshards, so those may change together when the global batch stays."""
    changed = resume_conflicts(saved, cfg)
    old_global = saved.get("batch_size", cfg.batch_size) * saved.get("world_size", world_size)
    now_global = cfg.batch_size * world_size
    if old_global == now_global:
        changed = [c for c in changed if not c.startswith(("batch_size ", "world_size "))]
    else:
        changed = [c for c in changed if not c.startswith(("batch_size ", "world_size "))] + [
            f"the global batch (checkpoint {old_global * cfg.accum_freq} = --batch-size "
            f"{saved.get('batch_size')} x {saved.get('world_size')} processes x --accum-freq, "
            f"now {now_global * cfg.accum_freq})"]
    if changed:
        raise TrainConfigError(
            f"--resume {path}: the data position, schedule and optimizer state depend on "
            + ", ".join(changed) + "; resume with the same values")


def restore(run, path):
    """The encoder's and optimizer's shards of this rank from the checkpoint at ``path`` (every
    rank) -> the training state (scheduler, method state, position: restored by the caller)."""
    meta, state = load_state(path)
    if meta.get("model") not in (None, run.cfg.model):
        raise TrainConfigError(f"--resume {path}: checkpoint is a {meta['model']!r}, but "
                               f"--model is {run.cfg.model!r}")
    check_config(path, state.get("config", {}), run.cfg, run.info.world_size)
    model_sd, optim_sd = get_state_dict(run.method.encoder, run.optimizer)
    try:
        dcp.load({"model": model_sd}, checkpoint_id=str(Path(path) / "model"))
        dcp.load({"optim": optim_sd}, checkpoint_id=str(Path(path) / "optim"))
    except Exception as e:  # noqa: BLE001  (DCP's errors name keys, not the flag)
        raise TrainConfigError(f"--resume {path}: cannot load its shards into this run's model "
                               f"and optimizer ({type(e).__name__}: "
                               f"{str(e).splitlines()[0] if str(e) else ''})") from e
    set_state_dict(run.method.encoder, run.optimizer, model_state_dict=model_sd,
                   optim_state_dict=optim_sd)
    return state
