"""Checkpoints: an open_clip-loadable model file and the full training state beside it.

Layout of RUN_DIR/checkpoints/::

    epoch_3.pt         {"state_dict": <open_clip model state_dict, no "module.">,
                        "model": name, "epoch": completed epochs, "step": optimizer steps}
    epoch_3.state.pt   optimizer, scheduler, scaler, loss buffers (ALIP gate EMAs), epoch and
                       batch position, non-finite counters, RNG states of every rank, config
    step_1200.pt / step_1200.state.pt      the same, for --save-every-n-steps
    index.json         the complete checkpoints, oldest first

Every file is written to a temporary name and renamed, the index last, so a kill at any moment
leaves the previous complete checkpoint intact; ``--resume latest`` takes the newest entry of
the index whose files both exist. Only the newest ``keep_last`` training states are kept (and
the model files of step checkpoints); the model files of epoch checkpoints are always kept.
``open_clip.create_model(name, pretrained="…/epoch_3.pt")`` loads the model file.
"""
import json
import os
import random
from pathlib import Path

import numpy as np
import torch

INDEX = "index.json"


def _atomic_save(obj, path):
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _atomic_write_text(text, path):
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
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
    return json.loads(path.read_text())


def save_checkpoint(ckpt_dir, tag, model_name, model, train_state, epoch, step, keep_last=2):
    """Write ``{tag}.pt`` (model) and ``{tag}.state.pt`` (training state); rank 0 only.

    ``model`` is the bare open_clip model (not the DDP wrapper). Returns the model file path.
    """
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    model_file, state_file = f"{tag}.pt", f"{tag}.state.pt"
    _atomic_save({"state_dict": model.state_dict(), "model": model_name, "epoch": int(epoch),
                  "step": int(step)}, ckpt_dir / model_file)
    _atomic_save(train_state, ckpt_dir / state_file)
    index = [e for e in read_index(ckpt_dir) if e["model"] != model_file]
    index.append({"model": model_file, "state": state_file, "epoch": int(epoch), "step": int(step)})
    # prune: keep the newest keep_last training states; step model files go with their state
    keep = max(int(keep_last), 1)
    for entry in index[:-keep]:
        for name in ([entry["state"]] + ([entry["model"]] if entry["model"].startswith("step_")
                                          else [])):
            (ckpt_dir / name).unlink(missing_ok=True)
    index = [e for e in index if (ckpt_dir / e["model"]).exists()]
    _atomic_write_text(json.dumps(index, indent=1), ckpt_dir / INDEX)
    return ckpt_dir / model_file


def find_latest(ckpt_dir):
    """The model file of the newest complete checkpoint (model and state present), or None."""
    ckpt_dir = Path(ckpt_dir)
    for entry in reversed(read_index(ckpt_dir)):
        if (ckpt_dir / entry["model"]).is_file() and (ckpt_dir / entry["state"]).is_file():
            return ckpt_dir / entry["model"]
    return None


def state_path_for(model_path):
    model_path = Path(model_path)
    if model_path.name.endswith(".state.pt"):
        return model_path
    return model_path.with_name(model_path.name[:-len(".pt")] + ".state.pt")


def load_checkpoint(path):
    """(model checkpoint dict, training state dict) of a model file or its state file."""
    state_path = state_path_for(path)
    model_path = state_path.with_name(state_path.name[:-len(".state.pt")] + ".pt")
    for p in (model_path, state_path):
        if not p.is_file():
            raise FileNotFoundError(f"--resume: checkpoint file missing: {p}")
    model_ckpt = torch.load(model_path, map_location="cpu", weights_only=True)
    # our own file: python/numpy RNG states are not plain tensors
    state = torch.load(state_path, map_location="cpu", weights_only=False)
    return model_ckpt, state
