"""A train.py checkpoint is an open_clip checkpoint: open_clip.create_model(name,
pretrained=path) loads it and gives the trained model's embeddings exactly."""
import open_clip
import pytest
import torch

import alip  # noqa: F401
from alip.training import checkpoint as ckpt
from alip.training.synthetic import synthetic_sample
from test_train_helpers import run_single, tiny_argv


def test_checkpoint_loads_through_open_clip_with_identical_embeddings(tmp_path):
    torch.manual_seed(1)
    model = open_clip.create_model("ALIP-tiny")
    with torch.no_grad():  # weights no fresh model has
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    path = ckpt.save_checkpoint(tmp_path, "epoch_1", "ALIP-tiny", model, {"x": 1}, 1, 10)
    raw = torch.load(path, weights_only=True)
    assert set(raw) == {"state_dict", "model", "epoch", "step"}
    assert raw["model"] == "ALIP-tiny" and raw["epoch"] == 1 and raw["step"] == 10
    assert not any(k.startswith("module.") for k in raw["state_dict"])

    loaded = open_clip.create_model("ALIP-tiny", pretrained=str(path))
    model.eval(), loaded.eval()
    image, text, caption = (x[None] for x in synthetic_sample(0, 0, 32))
    with torch.no_grad():
        assert torch.equal(model.encode_image(image), loaded.encode_image(image))
        assert torch.equal(model.encode_text(text), loaded.encode_text(text))
        assert torch.equal(model.logit_scale, loaded.logit_scale)


def test_run_checkpoint_loads_and_has_full_training_state(tmp_path):
    run_single(tiny_argv(tmp_path, "r", samples=32, batch=8))
    path = tmp_path / "r" / "checkpoints" / "epoch_1.pt"
    loaded = open_clip.create_model("ALIP-tiny", pretrained=str(path))
    sd = torch.load(path, weights_only=True)["state_dict"]
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, sd[k]), k
    _, state = ckpt.load_checkpoint(path)
    assert {"optimizer", "scheduler", "scaler", "loss", "epoch", "batch_in_epoch", "step",
            "rng", "config", "nonfinite_total"} <= set(state)
    assert set(state["loss"]) == {"ema_tc", "ema_it", "ema_ic"}
    assert state["config"]["model"] == "ALIP-tiny" and len(state["rng"]) == 1
    assert (state["epoch"], state["batch_in_epoch"], state["step"]) == (1, 0, 4)


def test_latest_skips_incomplete_checkpoints(tmp_path):
    model = open_clip.create_model("ALIP-tiny")
    ckpt.save_checkpoint(tmp_path, "step_2", "ALIP-tiny", model, {}, 0, 2, keep_last=5)
    ckpt.save_checkpoint(tmp_path, "step_4", "ALIP-tiny", model, {}, 0, 4, keep_last=5)
    assert ckpt.find_latest(tmp_path).name == "step_4.pt"
    (tmp_path / "step_4.state.pt").unlink()  # e.g. removed by hand
    assert ckpt.find_latest(tmp_path).name == "step_2.pt"
    with pytest.raises(FileNotFoundError, match="step_4.state.pt"):
        ckpt.load_checkpoint(tmp_path / "step_4.pt")
