"""Training on demo data learns; a non-finite loss is skipped and counted; bad input fails
clearly before any training step; --config YAML defaults, CLI override, resolved config."""
import math
import os

import open_clip
import pytest
import torch
import yaml

import alip  # noqa: F401
from alip.data.loader import build_train_loader
from alip.training.loop import NonFiniteLossError, TrainConfigError, main, run
from alip.training.params import parse_args
from test_train_helpers import read_results, run_single, tiny_argv


@pytest.fixture(scope="module")
def demo_shards(tmp_path_factory):
    from alip.data import demo_world
    out = tmp_path_factory.mktemp("demo")
    demo_world.generate(out, num_train=128, num_test=5, classify_train_per_class=0,
                        classify_val_per_class=1, shard_size=64, progress=False)
    return out / "shards"


def _clip_loss(model, batch):
    images, raw = batch["image"], batch["raw"]
    model.eval()
    with torch.no_grad():
        img = model.encode_image(images, normalize=True)
        txt = model.encode_text(raw, normalize=True)
        return float(open_clip.loss.ClipLoss()(img, txt, model.logit_scale.exp()))


def test_few_steps_on_demo_data_lower_the_loss(tmp_path, demo_shards):
    argv = ["--model", "ALIP-tiny", "--train-data", str(demo_shards), "--data-backend", "torch",
            "--batch-size", "32", "--epochs", "10", "--lr", "2e-3", "--precision", "fp32",
            "--workers", "0", "--logs", str(tmp_path), "--name", "demo", "--report-to", "",
            "--log-every-n-steps", "1", "--retrieval-frequency", "100",
            "--retrieval-data", str(demo_shards.parent / "retrieval/dataset_demo.json"),
            "--retrieval-image-root", str(demo_shards.parent / "retrieval")]
    run_single(argv)
    records = read_results(tmp_path / "demo")
    # evaluation during training: after the last epoch (frequency 100 > epochs), via alip.eval
    evals = read_results(tmp_path / "demo", kind="eval")
    assert [e["epoch"] for e in evals] == [10]
    assert 0 <= evals[0]["retrieval/i2t_R@1"] <= 100 and "retrieval/rsum" in evals[0]
    assert len(records) == 40 and all(math.isfinite(r["loss"]) for r in records)
    # the ALIP loss itself rises while the gate EMAs leave their cold start of 1.0 (the weights
    # grow), so judge learning by the plain contrastive loss on a fixed demo batch
    loader = build_train_loader(demo_shards, batch_size=64, image_size=32, workers=0,
                                augment=False)
    loader.set_epoch(0)
    batch = next(iter(loader))
    torch.manual_seed(0)
    init = open_clip.create_model("ALIP-tiny")
    trained = open_clip.create_model(
        "ALIP-tiny", pretrained=str(tmp_path / "demo/checkpoints/epoch_10.pt"))
    before, after = _clip_loss(init, batch), _clip_loss(trained, batch)
    assert before > math.log(64)  # chance level for 64 pairs or worse
    assert after < min(before, math.log(64)) - 1.0, (before, after)


def test_nonfinite_loss_is_skipped_and_counted(tmp_path):
    out = run_single(tiny_argv(tmp_path, "nan", samples=48, batch=8), bad=[(0, 2)])
    records = read_results(tmp_path / "nan")
    assert [r["skipped"] for r in records] == [False, False, True, False, False, False]
    assert [r["nonfinite_total"] for r in records] == [0, 0, 1, 1, 1, 1]
    assert "loss" not in records[2] and math.isfinite(records[3]["loss"])
    # the skipped step moved neither the weights' logit scale nor the gate EMAs
    assert records[2]["logit_scale"] == records[1]["logit_scale"]
    assert out["nonfinite_total"] == 1 and out["step"] == 6


def test_steps_are_read_back_when_logged_and_skips_are_still_counted(tmp_path, monkeypatch):
    """A step never waits for the device; the loop reads the pending steps back every
    --log-every-n-steps (and before a checkpoint): a skipped step between two reads is still
    counted and named, and a streak is stopped at the step where it passed --max-nonfinite."""
    from alip.training.loop import StepBook
    reads, read = [], StepBook.read
    monkeypatch.setattr(StepBook, "read", lambda self: reads.append(len(self.pending))
                        or read(self))
    out = run_single(tiny_argv(tmp_path, "lazy", "--log-every-n-steps", "3", samples=48,
                               batch=8), bad=[(0, 1)])
    assert [n for n in reads if n] == [3, 3]  # 6 steps, read back twice
    records = read_results(tmp_path / "lazy")
    assert [(r["step"], r["nonfinite_total"], r["skipped"]) for r in records] == [
        (3, 1, False), (6, 1, False)]
    assert out["nonfinite_total"] == 1
    assert "step 2: non-finite loss, step skipped (1 in a row, 1 in total)" in (
        tmp_path / "lazy/out.log").read_text()
    # a streak is noticed within --max-nonfinite + 1 steps however rare the log lines are
    reads.clear()
    with pytest.raises(NonFiniteLossError, match=r"2 steps in a row .*stopping at step 3"):
        run_single(tiny_argv(tmp_path, "streak", "--log-every-n-steps", "100", "--max-nonfinite",
                             "1", samples=64, batch=8), bad=[(0, i) for i in range(1, 8)])
    assert reads == [2, 2] and read_results(tmp_path / "streak") == []  # stopped at step 4


def test_the_last_step_of_a_run_is_logged(tmp_path):
    # --max-steps off the log cadence: step 5 is the run's last and is logged too
    run_single(tiny_argv(tmp_path, "r", "--log-every-n-steps", "2", "--max-steps", "5",
                         samples=64, batch=8))
    assert [r["step"] for r in read_results(tmp_path / "r")] == [2, 4, 5]


def test_too_many_nonfinite_in_a_row_stop_the_run(tmp_path, capsys):
    bad = [(0, i) for i in range(2, 8)]
    with pytest.raises(NonFiniteLossError, match=r"3 steps in a row .*--max-nonfinite 2"):
        run_single(tiny_argv(tmp_path, "stop", "--max-nonfinite", "2", "--save-every-n-steps",
                             "2", samples=64, batch=8), bad=bad)
    assert [r["step"] for r in read_results(tmp_path / "stop")] == [1, 2, 3, 4]
    assert (tmp_path / "stop/checkpoints/step_2.pt").exists()  # last good checkpoint kept


@pytest.mark.parametrize("extra, message", [
    (["--model", "ViT-Nope"], "--model: unknown model 'ViT-Nope'"),
    (["--dataset-type", "rec", "--train-data", "/nonexistent/shards"], "--train-data: not found"),
    (["--dataset-type", "rec"], "--train-data is required"),
    (["--dataset-type", "rec", "--train-data", "conftest.py"], "--train-data: conftest.py: not an "
                                                               "existing .rec file"),
    (["--dataset-type", "rec", "--train-data", "s.rec,./s.rec"], "--train-data: ./s.rec: the same "
                                                                 "shard as s.rec, listed twice"),
    (["--batch-size", "40"], "--batch-size 40 x 1 processes x --accum-freq 1 needs more samples"),
    (["--accum-freq", "5"], "--accum-freq 5 needs more samples"),
])  # flag ranges (--batch-size 0, ...) stop parse_args itself: tests/test_train_faults.py
def test_bad_input_fails_before_training(tmp_path, extra, message, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "conftest.py").write_text("")
    (tmp_path / "s.rec").write_bytes(b"")
    with pytest.raises(TrainConfigError, match=message.replace("(", r"\(")):
        run_single(tiny_argv(tmp_path, "bad", samples=32, batch=8) + extra)
    assert not (tmp_path / "bad" / "results.jsonl").exists()


def test_empty_data_dir_and_unwritable_logs(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(TrainConfigError, match="no train-\\*.rec shards in"):
        run_single(tiny_argv(tmp_path, "e") + ["--dataset-type", "rec", "--train-data",
                                               str(tmp_path / "empty")])
    (tmp_path / "afile").write_text("x")
    with pytest.raises(TrainConfigError, match="--logs: cannot write the run directory"):
        run_single(tiny_argv(tmp_path / "afile", "e"))
    with pytest.raises(SystemExit, match="train.py: error: --model: unknown model"):
        main(tiny_argv(tmp_path, "m") + ["--model", "nope"])


def test_config_yaml_defaults_cli_override_and_resolved_config(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: ALIP-tiny\nbatch-size: 4\nlr: 0.002\nalip_gamma: 3\nepochs: 1\n")
    args = parse_args(tiny_argv(tmp_path, "cfg", samples=16, batch=8)[:-2]  # drop --device cpu
                      + ["--config", str(cfg)])
    assert args.batch_size == 8 and args.lr == 0.002 and args.alip_gamma == 3.0
    run(args)
    written = yaml.safe_load((tmp_path / "cfg" / "config.yaml").read_text())
    assert written["batch_size"] == 8 and written["lr"] == 0.002 and written["alip_gamma"] == 3.0
    assert written["total_steps"] == 2 and written["world_size"] == 1
    (tmp_path / "bad.yaml").write_text("batch_sise: 4\n")
    with pytest.raises(SystemExit, match="bad.yaml: unknown key 'batch_sise'"):
        parse_args(["--config", str(tmp_path / "bad.yaml")])
    (tmp_path / "bad2.yaml").write_text("method: sigmoid\n")
    with pytest.raises(SystemExit, match="method: 'sigmoid' is not one of"):
        parse_args(["--config", str(tmp_path / "bad2.yaml")])


def test_amp_on_cpu_trains_in_bf16(tmp_path):
    argv = tiny_argv(tmp_path, "bf16", samples=16, batch=8)
    argv[argv.index("--precision") + 1] = "amp"
    run_single(argv)
    written = yaml.safe_load((tmp_path / "bf16" / "config.yaml").read_text())
    assert written["precision"] == "amp_bf16"  # fp16 + GradScaler is for CUDA
    records = read_results(tmp_path / "bf16")
    assert len(records) == 2 and all(math.isfinite(r["loss"]) for r in records)
    # master weights stay fp32 under autocast
    sd = torch.load(tmp_path / "bf16/checkpoints/epoch_1.pt", weights_only=True)["state_dict"]
    assert all(v.dtype == torch.float32 for v in sd.values() if v.is_floating_point())


def test_logged_lr_is_the_one_the_step_used(tmp_path):
    """results.jsonl's lr/beta1 at step s are the values step s ran with: OneCycle's schedule
    read before each scheduler.step() (step 1 at lr/25 and beta1 0.95, the peak where the
    warm-up ends), not the next step's values."""
    run_single(tiny_argv(tmp_path, "lr", "--lr", "1e-3", "--pct-start", "0.3", samples=80,
                         batch=8, epochs=1))
    rows = read_results(tmp_path / "lr")
    opt = torch.optim.AdamW([torch.zeros(1, requires_grad=True)], lr=1e-3, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=10, pct_start=0.3)
    used = []
    for _ in range(10):
        used.append((opt.param_groups[0]["lr"], opt.param_groups[0]["betas"][0]))
        opt.step()
        sched.step()
    assert [(r["lr"], r["beta1"]) for r in rows] == used
    assert used[0] == (pytest.approx(1e-3 / 25), pytest.approx(0.95))


def test_data_backend_auto_reads_with_torch_where_dali_is_missing(monkeypatch, caplog):
    import importlib.util

    from alip.training.config import resolve_data_backend
    assert resolve_data_backend("auto", "cpu") == "torch"
    assert resolve_data_backend("dali", "cpu") == "dali"  # asked for: kept (its own error if absent)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: real(n, *a) if n != "nvidia.dali" else None)
    with caplog.at_level("WARNING"):
        assert resolve_data_backend("auto", "cuda") == "torch"
    assert "nvidia-dali is not installed" in caplog.text
    monkeypatch.setattr(importlib.util, "find_spec", real)
    if real("nvidia") is not None and real("nvidia.dali") is not None:
        assert resolve_data_backend("auto", "cuda:0") == "dali"


def test_every_batch_tensor_reaches_the_training_device():
    # the PyTorch reader yields (pinned) CPU tensors; the loop moves them, as it would to CUDA
    from alip.data.spec import ALIP_DATA as spec
    from alip.model import host_tokens
    from alip.training.loop import TrainConfigError, as_batch_dicts
    views = {"image": torch.zeros(2, 3, 4, 4), "image_2": torch.zeros(2, 3, 4, 4),
             "raw": torch.zeros(2, 77, dtype=torch.long), "n": 3}
    (batch,) = as_batch_dicts([views], spec, torch.device("meta"))
    assert batch["n"] == 3 and all(batch[k].is_meta for k in ("image", "image_2", "raw"))
    # token tensors keep their host copy (the text tower plans from it); images do not
    assert host_tokens(batch["raw"]) is views["raw"] and host_tokens(batch["image"]) is None
    # a custom loader yielding (image, raw, caption) tuples, not dicts built for the DataSpec
    legacy = (torch.zeros(2, 3, 4, 4), torch.zeros(2, 77, dtype=torch.long))
    with pytest.raises(TrainConfigError, match=r"yields tuple batches; a loader must yield dicts "
                                               r"keyed \['image', 'raw', 'caption'\]"):
        next(as_batch_dicts([legacy], spec, torch.device("meta")))


def test_samples_per_s_is_measured_between_two_reads(monkeypatch, tmp_path):
    """Steps do not wait for the device, so a step's own wall time says nothing; the rate
    logged is the samples of the steps since the previous read over the time between reads."""
    from alip.training import logger as logger_module
    clock = iter([0.0, 10.0, 14.0, 15.0])  # init, read, read, read
    monkeypatch.setattr(logger_module.time, "perf_counter", lambda: next(clock))
    log = logger_module.RunLogger(tmp_path, False, "", 10, 0, samples_per_step=8, world_size=1)
    for _ in range(5):
        log.step()
    assert log.after_read({"loss": 1.0}) == 5 * 8 / 10.0
    log.step()
    assert log.after_read(None) == 8 / 4.0 and log.loss is None
    assert log.after_read(None) == 8 / 4.0  # no step since: the last rate stands
    log.close()


def test_cpu_threads_leave_the_cores_to_the_data_workers(monkeypatch):
    """On a CPU the step's threads and the data workers fit the cores: a thread more stalls
    every op at its barrier when the machine is busy (bench/cpu_share.py)."""
    from types import SimpleNamespace

    from alip.training.config import resolve_cpu_threads
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    cpu = torch.device("cpu")
    got = {w: resolve_cpu_threads(SimpleNamespace(cpu_threads=0, workers=w), cpu) for w in (0, 1, 4)}
    assert got == {0: 2, 1: 1, 4: 1}
    assert resolve_cpu_threads(SimpleNamespace(cpu_threads=3, workers=1), cpu) == 3  # asked for
    assert resolve_cpu_threads(SimpleNamespace(cpu_threads=0, workers=1), torch.device("meta")) \
        == torch.get_num_threads()  # a GPU run keeps torch's count
    monkeypatch.setenv("OMP_NUM_THREADS", "5")  # torchrun's (1 for several processes) or the user's
    assert resolve_cpu_threads(SimpleNamespace(cpu_threads=0, workers=1), cpu) == 5


def test_a_run_uses_and_records_its_cpu_threads(tmp_path):
    before = torch.get_num_threads()
    try:
        run_single(tiny_argv(tmp_path, "t", "--cpu-threads", "2", samples=16, batch=8))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert yaml.safe_load((tmp_path / "t" / "config.yaml").read_text())["cpu_threads"] == 2


def test_the_configuration_is_resolved_once_and_then_frozen(tmp_path):
    """resolve_config completes a copy (run name, world size, the reader, CLIPS' sub-caption
    default) and leaves the parsed flags alone; after it nothing can change the configuration,
    so config.yaml records what the run used."""
    from alip.training.config import resolve_config
    from alip.training.distributed import DistInfo
    args = parse_args([a for a in tiny_argv(tmp_path, "x", "--method", "clips") if a != "x"
                       and a != "--name"])
    before = dict(vars(args))
    cfg = resolve_config(args, DistInfo(0, 0, 1, False, torch.device("cpu")))
    assert vars(args) == before  # the parsed flags untouched
    assert cfg.caption_view == "subcaption" and cfg.data_reader == "synthetic"
    assert cfg.world_size == 1 and cfg.name.endswith("-ALIP-tiny-clips-b8")
    with pytest.raises(AttributeError, match="frozen; lr cannot change"):
        cfg.lr = 1.0
