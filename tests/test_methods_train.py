"""Every method through train.py end to end (synthetic data in its DataSpec's views), its model
file loads in plain open_clip, and a SIGKILLed DeCLIP run resumes bit-identically (memory bank,
BatchNorm statistics, MLM mask draws and EDA views included)."""
import multiprocessing as mp
import signal

import open_clip
import pytest
import torch

from alip.methods import METHODS
from test_train_helpers import final_state, killed_worker, read_results, run_single, tiny_argv

MODELS = {"declip": "DeCLIP-tiny", "defilip": "DeCLIP-tiny"}


def argv(tmp_path, name, method, *extra, epochs=1):
    bank = ["--declip-bank-size", "64"] if method in ("declip", "defilip") else []  # theirs only
    return tiny_argv(tmp_path, name, "--method", method, "--model", MODELS.get(method, "ALIP-tiny"),
                     *bank, "--lr", "5e-3", *extra, samples=48, batch=8, epochs=epochs)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_trains_and_saves_an_open_clip_checkpoint(tmp_path, method):
    run_single(argv(tmp_path, method, method))
    rows = read_results(tmp_path / method)
    assert [r["step"] for r in rows] == list(range(1, 7))
    assert all(r["loss"] == r["loss"] and not r["skipped"] for r in rows)  # finite, none skipped
    path = tmp_path / method / "checkpoints/epoch_1.pt"
    kwargs = torch.load(path, weights_only=True)["model_kwargs"]  # what the method asked for
    model = open_clip.create_model(MODELS.get(method, "ALIP-tiny"), pretrained=str(path), **kwargs)
    assert isinstance(model, torch.nn.Module)
    state = torch.load(tmp_path / method / "checkpoints/epoch_1.state.pt", weights_only=False)
    heads = state["heads"]
    assert bool(heads) == (method not in ("clip", "alip", "siglip"))  # heads travel with it


def test_declip_sigkill_and_resume_is_bit_identical(tmp_path):
    run = lambda name, *x: argv(tmp_path, name, "declip", "--save-every-n-steps", "4", *x,
                                epochs=2)
    run_single(run("full"))
    proc = mp.get_context("spawn").Process(target=killed_worker, args=(run("cut"), 6))
    proc.start()
    proc.join(300)
    assert proc.exitcode == -signal.SIGKILL
    run_single(run("cut", "--resume", "latest"))
    full = {r["step"]: r for r in read_results(tmp_path / "full")}
    cut = read_results(tmp_path / "cut")
    assert [r["step"] for r in cut] == list(range(1, 13))
    for r in cut:
        for k in ("loss", "loss_clip", "loss_nn", "loss_simsiam", "loss_mlm", "grad_norm", "lr"):
            assert r[k] == full[r["step"]][k], (r["step"], k)
    a, b = final_state(tmp_path / "full", "epoch_2"), final_state(tmp_path / "cut", "epoch_2")
    assert all(torch.equal(a[k], b[k]) for k in a)
    sa = torch.load(tmp_path / "full/checkpoints/epoch_2.state.pt", weights_only=False)
    sb = torch.load(tmp_path / "cut/checkpoints/epoch_2.state.pt", weights_only=False)
    for part in ("heads", "loss"):  # BN statistics, mask draws; the memory bank and its pointer
        assert sa[part].keys() == sb[part].keys()
        for k in sa[part]:
            assert torch.equal(sa[part][k], sb[part][k]), (part, k)
    assert int(sb["loss"]["bank.ptr"]) == (12 * 16) % 64
