"""Faults and bad input in train.py (README "Faults and bad input (training and evaluation)"):
non-finite streaks and the checkpoint named after them, flag ranges, --config values, changed
flags on resume, damaged checkpoints, --model hf-hub:, --device cuda without a GPU."""
import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

from alip.training import checkpoint as ckpt
from alip.training.config import TrainConfigError, check_global_batch
from alip.training.loop import NonFiniteLossError, main
from alip.training.resume import load_optimizer_state
from alip.training.params import build_parser, flag_ranges, parse_args
from test_train_helpers import read_results, run_single, tiny_argv

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def saved_steps(ckpt_dir):
    return [e["step"] for e in ckpt.read_index(ckpt_dir)]


# ---------------------------------------------------------------------------------------------
# non-finite streaks


def test_nonfinite_streak_names_a_good_checkpoint_and_keeps_it(tmp_path):
    # batches 3.. are NaN: steps 1-3 are good, 4-7 skipped, the 4th in a row stops the run;
    # a checkpoint every step and --keep-last 1 must not rotate the good one out
    argv = tiny_argv(tmp_path, "r", "--save-every-n-steps", "1", "--keep-last", "1",
                     "--max-nonfinite", "3", samples=128, batch=8)
    with pytest.raises(NonFiniteLossError) as err:
        run_single(argv, bad=[(0, i) for i in range(3, 16)])
    d = tmp_path / "r" / "checkpoints"
    assert str(err.value).endswith(f"last good checkpoint: {d / 'step_3.pt'}")
    assert saved_steps(d) == [3]  # nothing saved during the streak
    model_ckpt, state = ckpt.load_checkpoint(d / "step_3.pt")
    assert state["step"] == 3 and state["nonfinite_total"] == 0
    assert all(torch.isfinite(v).all() for v in model_ckpt["state_dict"].values())
    assert "not saving step_4: step 4 is in a streak of 1" in (tmp_path / "r/out.log").read_text()


def test_nonfinite_weights_are_never_saved_nor_named_good(tmp_path):
    import open_clip
    model = open_clip.create_model("ALIP-tiny")
    ckpt.save_checkpoint(tmp_path, "step_2", "ALIP-tiny", model, {"optimizer": {}}, 0, 2)
    with torch.no_grad():
        model.token_embedding.weight[3, 5] = float("nan")
    with pytest.raises(ckpt.CheckpointError, match=r"not saving .*step_4.pt: non-finite weights "
                                                   r"in token_embedding.weight"):
        ckpt.save_checkpoint(tmp_path, "step_4", "ALIP-tiny", model, {"optimizer": {}}, 0, 4)
    assert not (tmp_path / "step_4.pt").exists() and saved_steps(tmp_path) == [2]
    # a non-finite model file that got into the index another way (no checksum recorded)
    torch.save({"state_dict": model.state_dict(), "model": "ALIP-tiny", "epoch": 0, "step": 6},
               tmp_path / "step_6.pt")
    torch.save({"optimizer": {}}, tmp_path / "step_6.state.pt")
    index = ckpt.read_index(tmp_path) + [{"model": "step_6.pt", "state": "step_6.state.pt"}]
    (tmp_path / "index.json").write_text(json.dumps(index))
    assert ckpt.find_latest(tmp_path).name == "step_6.pt"
    assert ckpt.find_good(tmp_path).name == "step_2.pt"
    with pytest.raises(ckpt.CheckpointError, match=r"step_6.pt has non-finite weights "
                                                   r"\(token_embedding.weight"):
        ckpt.load_checkpoint(tmp_path / "step_6.pt")


# ---------------------------------------------------------------------------------------------
# flag ranges and --config values, checked before anything is built

BAD_FLAGS = [
    (["--grad-clip-norm", "-1"], "--grad-clip-norm must be >= 0, got -1.0"),
    (["--wd", "-1"], "--wd must be >= 0, got -1.0"),
    (["--lr", "0"], "--lr must be > 0, got 0.0"),
    (["--lr", "nan"], "--lr must be a finite number > 0, got nan"),
    (["--lr", "inf"], "--lr must be a finite number > 0, got inf"),
    (["--eps", "0"], "--eps must be > 0"),
    (["--beta1", "1"], "--beta1 must be in [0, 1), got 1.0"),
    (["--beta2", "1.5"], "--beta2 must be in [0, 1), got 1.5"),
    (["--pct-start", "1.5"], "--pct-start must be in (0, 1), got 1.5"),
    (["--pct-start", "0"], "--pct-start must be in (0, 1), got 0.0"),
    (["--alip-momentum", "2"], "--alip-momentum must be in [0, 1], got 2.0"),
    (["--alip-gamma", "-1"], "--alip-gamma must be >= 0"),
    (["--log-every-n-steps", "0"], "--log-every-n-steps must be >= 1, got 0"),
    (["--save-every-n-steps", "-1"], "--save-every-n-steps must be >= 0, got -1"),
    (["--save-frequency", "-1"], "--save-frequency must be >= 0"),
    (["--keep-last", "0"], "--keep-last must be >= 1, got 0"),
    (["--workers", "-1"], "--workers must be >= 0, got -1"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--global-batch-size", "0"], "--global-batch-size must be >= 1, got 0"),
    (["--max-steps", "0"], "--max-steps must be >= 1"),
    (["--seed", "-1"], "--seed must be in [0, 4294967295], got -1"),
    (["--eval-batch-size", "0"], "--eval-batch-size must be >= 1"),
    (["--device", "gpu"], "--device must be auto, cpu, cuda or cuda:N, got 'gpu'"),
    (["--report-to", "tensorboard,wandbb"], "--report-to 'tensorboard,wandbb': 'wandbb' is not "
                                            "supported; use tensorboard, wandb, all, a comma list "
                                            "of them, or '' (results.jsonl is always written)"),
    (["--report-to", "all,tb"], "--report-to 'all,tb': 'tb' is not supported"),
    (["--stop-signals", "TERM,KILL"], "--stop-signals 'TERM,KILL': 'KILL' is not a signal a "
                                      "process can catch"),
]


@pytest.mark.parametrize("extra,message", BAD_FLAGS, ids=[" ".join(a) for a, _ in BAD_FLAGS])
def test_bad_flag_is_one_line_naming_it(tmp_path, extra, message):
    with pytest.raises(SystemExit) as e:
        parse_args(tiny_argv(tmp_path, "r") + extra)
    assert str(e.value) == f"train.py: error: {message}" or \
        str(e.value).startswith(f"train.py: error: {message}")
    assert "\n" not in str(e.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_device_cuda_without_a_gpu_is_an_error(tmp_path):
    with pytest.raises(SystemExit, match="--device cuda: no CUDA GPU is visible"):
        parse_args(tiny_argv(tmp_path, "r") + ["--device", "cuda"])


def test_every_numeric_flag_has_a_range():
    numeric = {a.dest for a in build_parser()._actions if a.type in (int, float)}
    assert numeric == set(flag_ranges())


BAD_YAML = [
    ({"lr": "abc"}, "lr: expected a number, got 'abc'"),
    ({"batch_size": 1.5}, "batch_size: expected an integer, got 1.5"),
    ({"epochs": True}, "epochs: expected an integer, got True"),
    ({"grad-checkpointing": "yes"}, "grad-checkpointing: expected true or false, got 'yes'"),
    ({"wd": -1}, "wd: must be >= 0, got -1.0"),
    ({"name": ["a", "b"]}, "name: expected a single value"),
    ({"precision": "fp8"}, "precision: 'fp8' is not one of"),
]


@pytest.mark.parametrize("content,message", BAD_YAML, ids=[str(c) for c, _ in BAD_YAML])
def test_bad_config_value_names_file_and_key(tmp_path, content, message):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(content))
    with pytest.raises(SystemExit) as e:
        parse_args(["--config", str(cfg)])
    assert str(e.value).startswith(f"train.py: error: --config {cfg}: {message}")


@pytest.mark.parametrize("text,message", [
    ("epochs: 1\nepochs: 2\n", "not valid YAML: key 'epochs' is given twice (line 2, column 1)"),
    ("batch_size: 8\nbatch-size: 16\n", "'batch-size' and 'batch_size' set the same flag"),
    ("lr: [1\n", "not valid YAML: expected ',' or ']', but got '<stream end>' (line 2, column 1)"),
    ("batch_sise: 8\n", "unknown key 'batch_sise' (keys are train.py's flag names, as in --help)"),
])
def test_config_file_problems_are_one_line(tmp_path, text, message):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    with pytest.raises(SystemExit) as e:
        parse_args(["--config", str(cfg)])
    assert str(e.value) == f"train.py: error: --config {cfg}: {message}"


def test_config_keys_take_every_spelling_of_a_flag(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("logs-dir: /somewhere\nno-cycle-momentum: true\nno_verify_shards: false\n")
    args = parse_args(["--config", str(cfg)])
    assert (args.logs, args.cycle_momentum, args.verify_shards) == ("/somewhere", False, True)


def test_config_values_convert_like_flags(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("lr: 1e-3\nbatch_size: 16\nname: 7\ntrain_data: [a.rec, b.rec]\n")
    args = parse_args(["--config", str(cfg)])
    assert (args.lr, args.batch_size, args.name, args.train_data) == (1e-3, 16, "7", "a.rec,b.rec")


def test_bad_flag_through_train_py_exits_with_one_line(tmp_path):
    # the gradient-ascent case: before the fix it trained (loss up) and exited 0
    r = subprocess.run([sys.executable, os.path.join(REPO, "train.py"),
                        *tiny_argv(tmp_path, "r"), "--grad-clip-norm", "-1"],
                       capture_output=True, text=True, cwd=REPO, timeout=300)
    assert r.returncode == 1
    assert r.stderr.strip() == "train.py: error: --grad-clip-norm must be >= 0, got -1.0"
    assert not (tmp_path / "r").exists()  # nothing was built or written


@pytest.mark.parametrize("extra,message", [
    (["--retrieval-frequency", "1", "--retrieval-data", "/nope.json",
      "--retrieval-image-root", "."], "--retrieval-data: file not found: /nope.json"),
    (["--zeroshot-frequency", "1", "--zeroshot-root", "/nope"],
     "--zeroshot-root: directory not found: /nope"),
    (["--zeroshot-frequency", "1", "--zeroshot-root", ".", "--zeroshot-dataset", "cifar10"],
     "--zeroshot-dataset/--zeroshot-root: cifar10: ./cifar-10-batches-py/data_batch_1 is missing"),
])
def test_eval_inputs_are_checked_at_start_up(tmp_path, extra, message):
    with pytest.raises(TrainConfigError) as e:
        run_single(tiny_argv(tmp_path, "r", *extra))
    assert str(e.value).startswith(message)
    assert not (tmp_path / "r").exists()  # failed before the run directory, the model, a step


def test_a_launch_off_the_recipes_global_batch_is_refused(tmp_path):
    """--global-batch-size (the YFCC recipes set it): batch x processes x accum-freq must match,
    checked before the run directory or the model."""
    with pytest.raises(TrainConfigError) as e:
        run_single(tiny_argv(tmp_path, "r", "--global-batch-size", "32", "--accum-freq", "2"))
    assert str(e.value) == ("--global-batch-size 32, but --batch-size 8 x 1 process(es) x "
                            "--accum-freq 2 = 16: launch 2 processes, or change --batch-size / "
                            "--accum-freq (the learning rate and schedule of the recipe assume 32)")
    assert not (tmp_path / "r").exists()
    args = parse_args(tiny_argv(tmp_path, "r", "--global-batch-size", "4096", "--batch-size", "128"))
    check_global_batch(args, 32)  # the DeCLIP-toolbox recipes: 128 x 32 GPUs
    with pytest.raises(TrainConfigError, match=r"x 8 process\(es\) x --accum-freq 1 = 1024: launch "
                                               r"32 processes"):
        check_global_batch(args, 8)  # one node of 8 where the recipe wants four
    args.batch_size = 100
    with pytest.raises(TrainConfigError, match="no whole number of processes gives 4096 at "
                                               "--batch-size 100"):
        check_global_batch(args, 32)
    run_single(tiny_argv(tmp_path, "ok", "--global-batch-size", "16", "--accum-freq", "2",
                         "--max-steps", "1"))


def test_retrieval_annotation_is_read_at_start_up(tmp_path):
    (tmp_path / "ann.json").write_text("{not json")
    with pytest.raises(TrainConfigError, match=r"--retrieval-data: retrieval annotation .*ann.json "
                                               r"is not valid json"):
        run_single(tiny_argv(tmp_path, "r", "--retrieval-frequency", "1", "--retrieval-data",
                             str(tmp_path / "ann.json"), "--retrieval-image-root", str(tmp_path)))


def test_hf_hub_model_is_accepted_and_its_failure_names_the_flag(tmp_path, monkeypatch):
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # nothing downloaded
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(TrainConfigError, match=r"^--model hf-hub:nobody/none --pretrained None: "):
        run_single(tiny_argv(tmp_path, "r") + ["--model", "hf-hub:nobody/none"])


def test_default_run_name_of_an_hf_hub_model_is_one_directory(tmp_path):
    from alip.training.config import run_dir_of
    argv = [a for a in tiny_argv(tmp_path, "x") if a not in ("--name", "x")]
    args = parse_args(argv + ["--model", "hf-hub:org/Some-Model"])
    run_dir = run_dir_of(args)
    assert run_dir.parent == tmp_path and run_dir.name.endswith("-hf-hub-org-Some-Model-alip-b8")


# ---------------------------------------------------------------------------------------------
# resume


@pytest.mark.parametrize("flag,value", [("--lr", "5e-3"), ("--wd", "0.1"), ("--beta2", "0.95"),
                                        ("--seed", "9"), ("--vit-style", "toolbox"),
                                        ("--caption-fields", "raw")])  # seed: the order
def test_resume_refuses_a_changed_fixed_flag_and_records_nothing(tmp_path, flag, value):
    argv = lambda *x: tiny_argv(tmp_path, "r", *x, samples=32, batch=8, epochs=2)  # noqa: E731
    run_single(argv("--max-steps", "2"))
    config = (tmp_path / "r" / "config.yaml").read_text()
    key = flag[2:].replace("-", "_")
    with pytest.raises(TrainConfigError, match=rf"depend on {key} \(checkpoint "):
        run_single(argv("--resume", "latest", flag, value))
    assert (tmp_path / "r" / "config.yaml").read_text() == config
    assert saved_steps(tmp_path / "r" / "checkpoints") == [2]


def test_resume_names_an_optimizer_state_of_other_parameters():
    # a checkpoint written before a method froze a parameter (conv1 of the toolbox methods)
    layer = torch.nn.Linear(2, 2)
    both = torch.optim.AdamW([layer.weight, layer.bias])
    layer(torch.ones(1, 2)).sum().backward()
    both.step()
    fewer = torch.optim.AdamW([layer.bias])
    with pytest.raises(TrainConfigError, match=r"^--resume ck\.pt: its optimizer state holds \[2\] "
                                               r"parameters per group, this run trains \[1\]: "):
        load_optimizer_state(fewer, both.state_dict(), "ck.pt")
    again = torch.optim.AdamW([layer.weight, layer.bias])
    load_optimizer_state(again, both.state_dict(), "ck.pt")
    assert again.state_dict()["state"][0]["step"] == 1


# ---------------------------------------------------------------------------------------------
# damaged checkpoints


def two_epochs(tmp_path):
    argv = lambda *x: tiny_argv(tmp_path, "r", *x, samples=32, batch=8, epochs=3)  # noqa: E731
    run_single(argv("--max-steps", "8"))  # epoch_1 and epoch_2 complete, 4 steps per epoch
    return argv, tmp_path / "r" / "checkpoints"


def flip_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x40
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["flip model", "truncate state"])
def test_resume_latest_falls_back_past_a_damaged_checkpoint(tmp_path, damage):
    argv, d = two_epochs(tmp_path)
    assert saved_steps(d) == [4, 8]
    if damage == "flip model":
        flip_byte(d / "epoch_2.pt")
        bad = d / "epoch_2.pt"
    else:
        (d / "epoch_2.state.pt").write_bytes((d / "epoch_2.state.pt").read_bytes()[:1000])
        bad = d / "epoch_2.state.pt"
    # given explicitly, the damaged checkpoint is an error naming the file
    with pytest.raises(ckpt.CheckpointError, match=f"{bad} does not match its sha256"):
        ckpt.load_checkpoint(d / "epoch_2.pt")
    out = run_single(argv("--resume", "latest", "--max-steps", "9"))
    assert out["step"] == 9  # resumed from epoch_1 (step 4), not from the damaged step 8
    log = (tmp_path / "r" / "out.log").read_text()
    assert f"passing over checkpoint epoch_2.pt: {bad} does not match its sha256" in log
    assert f"resumed from {d / 'epoch_1.pt'}" in log
    assert [r["step"] for r in read_results(tmp_path / "r")][-5:] == [5, 6, 7, 8, 9]
    entry = next(e for e in ckpt.read_index(d) if e["model"] == "epoch_2.pt")
    assert ckpt.verify_entry(d, entry) is None  # the resumed run wrote a sound epoch_2 again


def test_unreadable_checkpoint_files_are_named(tmp_path):
    argv, d = two_epochs(tmp_path)
    (d / "epoch_1.state.pt").write_bytes(b"garbage")  # no index entry checks it: copy it away
    lone = tmp_path / "lone"
    lone.mkdir()
    for name in ("epoch_1.pt", "epoch_1.state.pt"):
        (lone / name).write_bytes((d / name).read_bytes())
    with pytest.raises(ckpt.CheckpointError, match=r"cannot read checkpoint file .*lone/"
                                                   r"epoch_1.state.pt \("):
        ckpt.load_checkpoint(lone / "epoch_1.pt")
    # a garbage index: train.py's one-line error names it
    (d / "index.json").write_text("[{oops")
    with pytest.raises(SystemExit) as e:
        main(argv("--resume", "latest"))
    assert str(e.value).startswith(f"train.py: error: checkpoint index {d / 'index.json'} is not "
                                   f"valid JSON")


def test_checkpoints_without_an_index_are_never_trained_over(tmp_path):
    argv, d = two_epochs(tmp_path)
    (d / "index.json").unlink()  # a directory copied by hand, or its index lost
    before = {p.name: p.read_bytes() for p in d.glob("*.pt")}
    with pytest.raises(SystemExit) as e:
        main(argv("--max-steps", "9"))
    assert str(e.value).startswith(f"train.py: error: run directory {tmp_path / 'r'} already has "
                                   f"checkpoints")
    with pytest.raises(SystemExit) as e:
        main(argv("--resume", "latest", "--max-steps", "9"))
    assert str(e.value) == (f"train.py: error: {d} has 4 checkpoint file(s) (epoch_1.pt, "
                            f"epoch_1.state.pt, epoch_2.pt, ...) but no index.json: resume one "
                            f"with --resume PATH, or move them away to start over")
    assert {p.name: p.read_bytes() for p in d.glob("*.pt")} == before
    # the way out it names works: an explicit resume writes a new index beside them
    out = run_single(argv("--resume", str(d / "epoch_2.pt"), "--max-steps", "9"))
    assert out["step"] == 9 and (d / "index.json").exists()


@pytest.mark.parametrize("method,model,message", [
    ("declip", "ALIP-tiny", "--method declip needs a text vocabulary with the mask token"),
    ("defilip", "ALIP-tiny", "--method defilip needs a text vocabulary with the mask token"),
    ("filip", "ALIP-RN50", "--method filip reads patch and text token features: it needs a ViT "
                           "image tower and open_clip's text transformer; --model ALIP-RN50 has a "
                           "ModifiedResNet image tower"),
    ("clips", "ALIP-RN50", "--method clips reads patch and text token features"),
])
def test_a_method_the_model_cannot_serve_is_one_line(tmp_path, method, model, message):
    with pytest.raises(SystemExit) as e:
        main(tiny_argv(tmp_path, "r", "--method", method, "--model", model))
    assert str(e.value).startswith(f"train.py: error: {message}") and "\n" not in str(e.value)


@pytest.mark.parametrize("extra,message", [
    (["--caption-tokens", "8"], "--caption-tokens 8 takes effect with --caption-view truncate, "
                                "random, block or subcaption; --caption-view is full"),
    (["--method", "clip", "--caption-view", "truncate"], "--method clip reads no caption view: "
                                                          "--caption-view truncate --caption-tokens "
                                                          "32 would be ignored"),
])
def test_a_caption_view_flag_that_would_be_ignored_is_refused(tmp_path, extra, message):
    with pytest.raises(SystemExit) as e:
        main(tiny_argv(tmp_path, "r", *extra))
    assert str(e.value) == f"train.py: error: {message}"


def test_caption_view_flags_that_take_effect_are_accepted(tmp_path):
    # CLIPS reads sub-captions by default, so K alone is meant; ALIP with a view uses K
    for name, extra in (("clips", ["--method", "clips", "--caption-tokens", "8"]),
                        ("alip", ["--caption-view", "block", "--caption-tokens", "8"])):
        out = run_single(tiny_argv(tmp_path, name, "--max-steps", "1", *extra))
        assert out["step"] == 1
        config = yaml.safe_load((tmp_path / name / "config.yaml").read_text())
        assert config["caption_tokens"] == 8 and config["caption_view"] != "full"
