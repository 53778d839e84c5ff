"""Which checkpoint a run resumes from (the same one on every rank, or an error on every rank),
and restoring the training state from it."""
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from alip.cli import one_line

from . import checkpoint as ckpt
from .config import TrainConfigError
from .distributed import all_gather_object
from .params import resume_conflicts


@dataclass
class Position:
    """Where a run is: the epoch and batch within it the next step reads, the optimizer steps
    done, the non-finite steps skipped so far, and this rank's reader state to continue from."""
    epoch: int = 0
    batch: int = 0
    step: int = 0
    nonfinite_total: int = 0
    loader_state: Optional[dict] = None
    field_counts: Optional[dict] = None  # this rank's drawn-field counts of the epoch so far

def find_resume(args, ckpt_dir, log):
    """The checkpoint this process would resume from (None: a fresh start)."""
    if args.resume == "latest":
        path = ckpt.find_latest(ckpt_dir, verify=True, warn=log.warning)
        if path is None:
            log.info("--resume latest: no complete checkpoint in %s, starting fresh", ckpt_dir)
        return path
    if args.resume:
        path = Path(args.resume)
        if not (path.is_file() or ckpt.is_sharded(path)):
            raise TrainConfigError(f"--resume: no such checkpoint: {path}")
        return path
    return None


def agree_on_resume(args, info, ckpt_dir, log):
    """``find_resume`` on every rank, and the same answer on every rank, or an error on every
    rank: with a --logs-dir that is not shared between nodes, rank 0 would resume while the
    others start fresh, and the job would hang at its first collective."""
    try:
        mine, failure = find_resume(args, ckpt_dir, log), None
    except Exception as e:  # noqa: BLE001  (told to every rank below, then raised here)
        mine, failure = None, e
    views = all_gather_object((None if mine is None else str(mine),
                               None if failure is None else one_line(failure)), info)
    if failure is not None:
        raise failure
    errors = [(rank, e) for rank, (_, e) in enumerate(views) if e]
    if errors:
        rank, e = errors[0]
        raise TrainConfigError(f"rank {rank}: {e}")
    ranks_of = {}
    for rank, (path, _) in enumerate(views):
        ranks_of.setdefault(path, []).append(rank)
    if len(ranks_of) > 1:
        seen = "; ".join(f"rank(s) {_span(ranks)}: {path or 'no checkpoint (a fresh start)'}"
                         for path, ranks in ranks_of.items())
        raise TrainConfigError(
            f"--resume {args.resume}: the processes do not see the same checkpoint ({seen}); "
            f"--logs-dir must be one directory every node shares")
    return mine


def _span(ranks):
    return f"{ranks[0]}-{ranks[-1]}" if len(ranks) > 2 and ranks == list(
        range(ranks[0], ranks[-1] + 1)) else ",".join(map(str, ranks))


def load_optimizer_state(optimizer, saved, resume_path):
    """optimizer.load_state_dict, with a checkpoint whose parameter groups hold other counts of
    parameters (the method's trainable set changed since it was written) named in one line."""
    have = [len(g["params"]) for g in optimizer.param_groups]
    got = [len(g["params"]) for g in saved.get("param_groups", [])]
    if have != got:
        raise TrainConfigError(
            f"--resume {resume_path}: its optimizer state holds {got} parameters per group, this "
            f"run trains {have}: the method's trainable parameters changed since the checkpoint was "
            f"written (SLIP with toolbox views, FILIP, DeCLIP and DeFILIP freeze the ViT's conv1 "
            f"since 2026-12-01); resume it with the alip that wrote it")
    optimizer.load_state_dict(saved)


def restore(run, path):
    """The run's model, method state, optimizer, scheduler and scaler from the checkpoint at
    ``path`` (a sharded one of an ``--fsdp`` run: ``alip.training.sharded``), this rank's RNG
    state set, -> the Position to continue from (its loader state for this rank, when the
    checkpoint has one per rank)."""
    cfg = run.cfg
    if ckpt.is_sharded(path) != bool(getattr(cfg, "fsdp", False)):
        raise TrainConfigError(
            f"--resume {path}: a {'sharded (--fsdp)' if ckpt.is_sharded(path) else 'DDP'} "
            f"checkpoint; resume it {'with' if ckpt.is_sharded(path) else 'without'} --fsdp"
            + (" (python -m alip.training.consolidate makes its model file, a --pretrained "
               "for a new run)" if ckpt.is_sharded(path) else ""))
    if ckpt.is_sharded(path):
        from . import sharded
        state = sharded.restore(run, path)
    else:
        state = _restore_model(run, path)
    run.scheduler.load_state_dict(state["scheduler"])
    if run.scaler is not None and state.get("scaler"):
        run.scaler.load_state_dict(state["scaler"])
    run.method.load_state_dict(state)
    return _position(run, state, path)


def _restore_model(run, path):
    """A DDP checkpoint's model and optimizer state -> its training state."""
    cfg = run.cfg
    model_ckpt, state = ckpt.load_checkpoint(path)
    if model_ckpt.get("model") not in (None, cfg.model):
        raise TrainConfigError(f"--resume {path}: checkpoint is a {model_ckpt['model']!r}, but "
                               f"--model is {cfg.model!r}")
    changed = resume_conflicts(state.get("config", {}), cfg)
    if changed:
        raise TrainConfigError(
            f"--resume {path}: the data position, schedule and optimizer state depend on "
            + ", ".join(changed) + "; resume with the same values")
    run.model.load_state_dict(model_ckpt["state_dict"])
    load_optimizer_state(run.optimizer, state["optimizer"], path)
    return state


def _field_counts(counts, info):
    """This rank's drawn-field counts of the epoch so far from the checkpoint's per-rank list. On
    another number of ranks (a resharded FSDP resume) rank 0 takes the saved ranks' sum and the
    others start at zero: the epoch's record sums over ranks, so it still covers the whole epoch."""
    if len(counts) == info.world_size:
        return counts[info.rank]
    if not counts or info.rank != 0:
        return None
    return {k: [sum(c[k][j] for c in counts) for j in range(len(counts[0][k]))] for k in counts[0]}


def _position(run, state, path):
    info = run.info
    rngs, loaders = state.get("rng") or [], state.get("loader") or []
    counts = state.get("field_counts") or []
    if len(rngs) == info.world_size:
        ckpt.set_rng_state(rngs[info.rank])
    position = Position(state["epoch"], state["batch_in_epoch"], state["step"],
                        state.get("nonfinite_total", 0),
                        loaders[info.rank] if len(loaders) == info.world_size else None,
                        _field_counts(counts, info))
    run.log.info("resumed from %s: epoch %d, batch %d, step %d", path, position.epoch,
                 position.batch, position.step)
    return position
