"""Exact resume: a run SIGKILLed between checkpoints and resumed with --resume latest gives
per-step losses, gate EMAs and final weights bit-identical to the uninterrupted run (CPU,
fp32, fixed seed)."""
import multiprocessing as mp
import signal

import pytest
import torch

from alip.training import checkpoint as ckpt
from alip.training.loop import TrainConfigError
from test_train_helpers import assert_same_run, killed_worker, run_single, tiny_argv

EXACT_KEYS = ("loss", "loss_raw", "loss_caption", "ema_tc", "ema_it", "ema_ic", "s_tc",
              "w_sample_mean", "w_text_mean", "w_caption_mean", "grad_norm", "lr", "beta1",
              "logit_scale", "epoch", "samples")


@pytest.mark.parametrize("data", ["synthetic", "rec", "rec-bucketed", "dali"])
def test_sigkill_and_resume_is_bit_identical(tmp_path, data, monkeypatch):
    # 6 steps per epoch, 2 epochs; step checkpoints every 4 steps (step 4 is mid-epoch 0;
    # rec-bucketed: --length-bucketing 3, so mid-way through the epoch's second pool)
    source = []
    if data != "synthetic":  # real shards through a reader (augmentation included); DALI
        # resumes from its pipeline checkpoint saved in the training state
        from alip.data import demo_world
        monkeypatch.setenv("ALIP_CACHE_DIR", str(tmp_path / "cache"))
        demo_world.generate(tmp_path / "world", num_train=48, num_test=1,
                            classify_train_per_class=0, classify_val_per_class=1,
                            shard_size=20, progress=False)
        source = ["--dataset-type", "rec", "--train-data", str(tmp_path / "world/shards"),
                  "--data-backend", "dali" if data == "dali" else "torch"]
        if data == "rec-bucketed":
            source += ["--length-bucketing", "3"]
    argv = lambda name, *x: tiny_argv(tmp_path, name, "--save-every-n-steps", "4", "--lr",
                                      "5e-3", *source, *x, samples=48, batch=8, epochs=2)
    run_single(argv("full"))

    proc = mp.get_context("spawn").Process(target=killed_worker, args=(argv("cut"), 6))
    proc.start()
    proc.join(300)
    assert proc.exitcode == -signal.SIGKILL
    cut_dir = tmp_path / "cut" / "checkpoints"
    assert ckpt.find_latest(cut_dir).name == "step_4.pt"
    saved = torch.load(cut_dir / "step_4.state.pt", weights_only=False)["loader"]
    if data == "dali":  # the reader's own checkpoint travels with the training state
        assert saved[0]["batch"] == 4 and saved[0]["dali_checkpoint"] is not None
        with pytest.raises(TrainConfigError, match=r"the reader --data-backend resolved to "
                                                   r"\(checkpoint dali, now torch\)"):
            run_single(argv("cut", "--resume", "latest", "--data-backend", "torch"))
    if data == "rec-bucketed":
        assert saved == [{"epoch": 0, "batch": 4, "length_bucketing": 3}]
        with pytest.raises(TrainConfigError, match=r"length_bucketing \(checkpoint 3, now 2\)"):
            run_single(argv("cut", "--resume", "latest", "--length-bucketing", "2"))
    # debris of a kill during a later save must not be taken for a checkpoint
    (cut_dir / "step_8.pt.tmp").write_bytes(b"torn")
    (cut_dir / "step_8.state.pt.tmp").write_bytes(b"torn")

    run_single(argv("cut", "--resume", "latest"))

    # steps 5 and 6 ran before the kill and again after resuming from step 4: the resume
    # drops the first copies, so the file reads as one clean run
    assert_same_run(tmp_path / "full", tmp_path / "cut", range(1, 13), EXACT_KEYS)
    sa = torch.load(tmp_path / "full/checkpoints/epoch_2.state.pt", weights_only=False)
    sb = torch.load(tmp_path / "cut/checkpoints/epoch_2.state.pt", weights_only=False)
    for k, v in sa["loss"].items():  # the gate EMA buffers
        assert torch.equal(v, sb["loss"][k]), k
    assert sb["step"] == 12 and sb["epoch"] == 2 and sb["batch_in_epoch"] == 0


def test_resume_of_a_finished_run_from_an_explicit_path(tmp_path):
    argv = lambda name, *x: tiny_argv(tmp_path, name, *x, samples=32, batch=8, epochs=2)
    run_single(argv("r", "--keep-last", "1"))
    d = tmp_path / "r" / "checkpoints"
    # keep-last 1: only the newest training state survives; epoch model files all stay
    assert sorted(p.name for p in d.iterdir()) == ["epoch_1.pt", "epoch_2.pt",
                                                   "epoch_2.state.pt", "index.json"]
    with pytest.raises(FileNotFoundError, match="epoch_1.state.pt"):
        ckpt.load_checkpoint(d / "epoch_1.pt")
    out = run_single(argv("r", "--resume", str(d / "epoch_2.pt")))
    assert out["step"] == 8 and out["epoch"] == 2  # nothing left to do
    with pytest.raises(TrainConfigError, match=r"batch_size \(checkpoint 8, now 4\)"):
        run_single(argv("r", "--resume", "latest", "--batch-size", "4"))
