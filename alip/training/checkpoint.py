"""Checkpoints: an open_clip-loadable model file and the full training state beside it.

Layout of RUN_DIR/checkpoints/::

    epoch_3.pt         {"state_dict": <open_clip model state_dict, no "module.">,
                        "model": name, "epoch": completed epochs, "step": optimizer steps}
    epoch_3.state.pt   optimizer, scheduler, scaler, loss buffers (ALIP gate EMAs), epoch and
                       batch position, non-finite counters, RNG states of every rank, config
    step_1200.pt / step_1200.state.pt      the same, for --save-every-n-steps
    index.json         the complete checkpoints, oldest first, with the sha256 of each file

Every file is written to a temporary name and renamed, the index last, so a kill at any moment
leaves the previous complete checkpoint intact. ``find_latest(verify=True)`` (``--resume
latest``) takes the newest entry of the index whose two files exist and match their sha256,
saying why it passed over newer ones. Weights that are not finite are never saved. Only the
newest ``keep_last`` training states are kept (and the model files of step checkpoints); the
model files of epoch checkpoints are always kept.
``open_clip.create_model(name, pretrained="…/epoch_3.pt")`` loads the model file.

A ``--fsdp`` run writes sharded checkpoints instead (``alip.training.sharded``): ``epoch_3.dcp/``
(``model/`` and ``optim/``, torch.distributed.checkpoint directories with one shard file per rank,
and ``meta.pt``) beside ``epoch_3.state.pt``; its index entry says ``"sharded": true``. A
sharded checkpoint is complete when every shard file its metadata names is there, whole
(``sharded_problem``). ``python -m alip.training.consolidate`` turns one into the model file.
Every error is a ``CheckpointError`` naming the file at fault.
"""
import hashlib
import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from alip.atomic import write_text

INDEX = "index.json"


class CheckpointError(ValueError):
    """A checkpoint file or index that cannot be used; the message names the file."""


class CheckpointMissing(CheckpointError, FileNotFoundError):
    """A checkpoint file that is not there."""


def sha256_of(path, chunk=1 << 22):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def nonfinite_weights(state_dict):
    """Names of the floating-point tensors of ``state_dict`` holding a NaN or inf."""
    return [k for k, v in state_dict.items()
            if torch.is_tensor(v) and v.is_floating_point() and not bool(torch.isfinite(v).all())]


def _atomic_save(obj, path):
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def rng_state():
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def read_index(ckpt_dir):
    path = Path(ckpt_dir) / INDEX
    if not path.exists():
        return []
    try:
        index = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"checkpoint index {path} is not valid JSON ({e}); move it away "
                              f"to start over, or restore it") from e
    if not isinstance(index, list) or not all(
            isinstance(e, dict) and isinstance(e.get("model"), str)
            and isinstance(e.get("state"), str) for e in index):
        raise CheckpointError(f"checkpoint index {path} is not a list of "
                              f'{{"model": FILE, "state": FILE, ...}} entries')
    return index


def unindexed_checkpoints(ckpt_dir):
    """The ``*.pt`` files of ``ckpt_dir`` when it has no index (copied or restored by hand, or
    the index lost): training there must not start over on top of them."""
    ckpt_dir = Path(ckpt_dir)
    if (ckpt_dir / INDEX).exists() or not ckpt_dir.is_dir():
        return []
    return sorted(p.name for p in ckpt_dir.glob("*.pt"))


def has_checkpoints(ckpt_dir):
    """Whether ``ckpt_dir`` holds a checkpoint index (a damaged one counts) or checkpoint files
    without one."""
    if unindexed_checkpoints(ckpt_dir):
        return True
    try:
        return bool(read_index(ckpt_dir))
    except CheckpointError:
        return True


def is_sharded(path):
    """Whether ``path`` names a sharded checkpoint (a ``*.dcp`` directory)."""
    path = Path(path)
    return path.name.endswith(".dcp") and path.is_dir()


def sharded_problem(path, parts=("model", "optim")):
    """None when the sharded checkpoint directory ``path`` is complete: ``meta.pt``, and under
    each of ``parts`` the metadata and every shard file it names, at least as long as
    the data it places there; else what is missing or short, naming the file."""
    from torch.distributed.checkpoint import FileSystemReader
    path = Path(path)
    if not (path / "meta.pt").is_file():
        return f"{path / 'meta.pt'} is missing"
    for part in parts:
        where = path / part
        if not (where / ".metadata").is_file():
            return f"{where / '.metadata'} is missing"
        try:
            storage = FileSystemReader(str(where)).read_metadata().storage_data
        except Exception as e:  # noqa: BLE001  (a torn metadata file: said, not raised)
            return f"{where / '.metadata'} cannot be read ({type(e).__name__})"
        ends = {}
        for info in storage.values():
            ends[info.relative_path] = max(ends.get(info.relative_path, 0),
                                           info.offset + info.length)
        for name, end in sorted(ends.items()):
            shard = where / name
            if not shard.is_file():
                return f"shard file {shard} is missing (a rank's shard)"
            if shard.stat().st_size < end:
                return f"shard file {shard} is truncated ({shard.stat().st_size} < {end} bytes)"
    return None


def verify_entry(ckpt_dir, entry):
    """None when both files of index ``entry`` exist and match their recorded sha256 (a
    sharded checkpoint's directory: is complete), else why not (naming the file)."""
    for role in ("model", "state"):
        path = Path(ckpt_dir) / entry[role]
        if role == "model" and entry.get("sharded"):
            why = sharded_problem(path) if path.is_dir() else f"{path} is missing"
            if why:
                return why
            continue
        if not path.is_file():
            return f"{path} is missing"
        want = (entry.get("sha256") or {}).get(role)
        if want is not None and sha256_of(path) != want:
            return f"{path} does not match its sha256 in {INDEX} (damaged or truncated)"
    return None


def save_checkpoint(ckpt_dir, tag, model_name, model, train_state, epoch, step, keep_last=2,
                    extra=None):
    """Write ``{tag}.pt`` (model) and ``{tag}.state.pt`` (training state); rank 0 only.

    ``model`` is the bare open_clip model (not the DDP wrapper); ``extra`` adds keys to the model
    file (the method's name and what its evaluation needs, e.g. FILIP's dense head), which
    open_clip's loader ignores. Returns the model file path.
    """
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    model_file, state_file = f"{tag}.pt", f"{tag}.state.pt"
    state_dict = model.state_dict()
    bad = nonfinite_weights(state_dict)
    if bad:
        raise CheckpointError(f"not saving {ckpt_dir / model_file}: non-finite weights in "
                              f"{', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}")
    read_index(ckpt_dir)  # a damaged index stops the save before any file is written
    _atomic_save({"state_dict": state_dict, "model": model_name, "epoch": int(epoch),
                  "step": int(step), **(extra or {})}, ckpt_dir / model_file)
    _atomic_save(train_state, ckpt_dir / state_file)
    add_to_index(ckpt_dir, {"model": model_file, "state": state_file, "epoch": int(epoch),
                            "step": int(step),
                            "sha256": {"model": sha256_of(ckpt_dir / model_file),
                                       "state": sha256_of(ckpt_dir / state_file)}}, keep_last)
    return ckpt_dir / model_file


def _remove(path):
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def add_to_index(ckpt_dir, entry, keep_last):
    """``entry`` (its files written) appended to the index, replacing one of the same model
    file, and the index pruned: the newest ``keep_last`` training states are kept; step model
    files go with their state; an epoch's sharded checkpoint keeps its ``model/`` shards (what
    consolidate reads) and loses its optimizer state. The index is written last."""
    ckpt_dir = Path(ckpt_dir)
    index = [e for e in read_index(ckpt_dir) if e["model"] != entry["model"]] + [entry]
    keep = max(int(keep_last), 1)
    for old in index[:-keep]:
        _remove(ckpt_dir / old["state"])
        if old["model"].startswith("step_"):
            _remove(ckpt_dir / old["model"])
        elif old.get("sharded"):
            _remove(ckpt_dir / old["model"] / "optim")
    index = [e for e in index if (ckpt_dir / e["model"]).exists()]
    write_text(ckpt_dir / INDEX, json.dumps(index, indent=1))


def find_latest(ckpt_dir, verify=False, warn=None):
    """The model file of the newest complete checkpoint (model and state present; with
    ``verify`` also matching their sha256), or None. ``warn(msg)`` hears of each newer
    checkpoint passed over, and why. Checkpoint files without an index raise CheckpointError
    (which of them is newest and complete is not known)."""
    ckpt_dir = Path(ckpt_dir)
    stray = unindexed_checkpoints(ckpt_dir)
    if stray:
        raise CheckpointError(
            f"{ckpt_dir} has {len(stray)} checkpoint file(s) ({', '.join(stray[:3])}"
            f"{', ...' if len(stray) > 3 else ''}) but no {INDEX}: resume one with --resume "
            f"PATH, or move them away to start over")
    for entry in reversed(read_index(ckpt_dir)):
        if verify:
            why = verify_entry(ckpt_dir, entry)
        else:
            why = next((f"{ckpt_dir / entry[r]} is missing" for r in ("model", "state")
                        if not (ckpt_dir / entry[r]).exists()), None)
        if why is None:
            return ckpt_dir / entry["model"]
        if warn is not None:
            warn(f"passing over checkpoint {entry['model']}: {why}")
    return None


def find_good(ckpt_dir):
    """The newest checkpoint that verifies and whose weights are all finite, or None: what a
    run stopped by non-finite losses names as its last good checkpoint."""
    ckpt_dir = Path(ckpt_dir)
    for entry in reversed(read_index(ckpt_dir)):
        if verify_entry(ckpt_dir, entry) is not None:
            continue
        if entry.get("sharded"):  # its weights were checked finite on every rank before saving
            return ckpt_dir / entry["model"]
        try:
            saved = torch.load(ckpt_dir / entry["model"], map_location="cpu", weights_only=True)
        except Exception:
            continue
        if not nonfinite_weights(saved.get("state_dict", {})):
            return ckpt_dir / entry["model"]
    return None


def state_path_for(model_path):
    model_path = Path(model_path)
    if model_path.name.endswith(".state.pt"):
        return model_path
    if model_path.name.endswith(".dcp"):
        return model_path.with_name(model_path.name[:-len(".dcp")] + ".state.pt")
    return model_path.with_name(model_path.name[:-len(".pt")] + ".state.pt")


def _load(path, weights_only):
    try:
        return torch.load(path, map_location="cpu", weights_only=weights_only)
    except Exception as e:
        raise CheckpointError(f"--resume: cannot read checkpoint file {path} "
                              f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
                              ) from e


def load_checkpoint(path):
    """(model checkpoint dict, training state dict) of a model file or its state file.

    The files are checked against the sha256 their index records (when it lists them) and the
    weights must be finite; every failure is a ``CheckpointError`` naming the file."""
    state_path = state_path_for(path)
    model_path = state_path.with_name(state_path.name[:-len(".state.pt")] + ".pt")
    for p in (model_path, state_path):
        if not p.is_file():
            raise CheckpointMissing(f"--resume: checkpoint file missing: {p}")
    entry = next((e for e in read_index(model_path.parent) if e["model"] == model_path.name), None)
    why = entry and verify_entry(model_path.parent, entry)
    if why:
        raise CheckpointError(f"--resume: {why}")
    model_ckpt = _load(model_path, weights_only=True)
    # our own file: python/numpy RNG states are not plain tensors
    state = _load(state_path, weights_only=False)
    if not isinstance(model_ckpt, dict) or not isinstance(model_ckpt.get("state_dict"), dict):
        raise CheckpointError(f"--resume: {model_path} is not a train.py model file "
                              f'(no "state_dict")')
    if not isinstance(state, dict) or "optimizer" not in state:
        raise CheckpointError(f"--resume: {state_path} is not a train.py training state "
                              f'(no "optimizer")')
    bad = nonfinite_weights(model_ckpt["state_dict"])
    if bad:
        raise CheckpointError(f"--resume: {model_path} has non-finite weights ({bad[0]} ...)")
    return model_ckpt, state
