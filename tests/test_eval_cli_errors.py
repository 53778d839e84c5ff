"""The eval CLIs' expected failures end with one line naming the file or flag at fault: a corrupt
image in an ImageFolder (also from a DataLoader worker), a training state given as --checkpoint, a
missing dataset or annotation; and what can be checked before the model is loaded and anything is
evaluated (flags out of range, a --device that is not there, --output, every dataset asked for)
is."""
import json
import os
import subprocess
import sys

import pytest
import torch
from torch.utils.data import DataLoader

import eval_linear_probe
import eval_retrieval
import eval_zeroshot
from alip.eval.cli import one_line, run_cli
from alip.eval.datasets import build_dataset
from alip.eval.load import load_model
from alip.eval.report import write_json
from eval_fakes import write_id_image, write_karpathy

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def folder_with_corrupt_image(root):
    for i in range(3):
        write_id_image(str(root / "val" / f"k{i}" / "a.png"), i)
    bad = root / "val" / "k1" / "b.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return bad


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    model, _, _ = load_model("ALIP-tiny")
    path = tmp_path_factory.mktemp("ckpt") / "epoch_1.pt"
    torch.save({"state_dict": model.state_dict(), "model": "ALIP-tiny", "epoch": 1, "step": 1}, path)
    return path


def test_corrupt_image_is_named(tmp_path):
    bad = folder_with_corrupt_image(tmp_path)
    ds = build_dataset("imagefolder", str(tmp_path)).dataset
    assert len(ds) == 4 and ds.classes == ["k0", "k1", "k2"]  # attributes pass through
    with pytest.raises(ValueError, match=f"imagefolder: image {bad} cannot be read "
                                         r"\(UnidentifiedImageError"):
        ds[2]
    # from a DataLoader worker, the CLI's line is still the original message
    with pytest.raises(ValueError) as e:
        list(DataLoader(ds, batch_size=None, num_workers=1))
    assert one_line(e.value).startswith(f"imagefolder: image {bad} cannot be read")


def test_zeroshot_cli_corrupt_image_is_one_line(tmp_path, tiny_checkpoint, capsys):
    bad = folder_with_corrupt_image(tmp_path / "data")
    rc = run_cli(eval_zeroshot.main, "eval_zeroshot.py",
                 ["--checkpoint", str(tiny_checkpoint), "--dataset", "imagefolder", "--root",
                  str(tmp_path / "data"), "--workers", "0", "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 1
    assert err.startswith(f"eval_zeroshot.py: error: imagefolder: image {bad} cannot be read")
    assert err.count("\n") == 1


def test_training_state_as_checkpoint_is_named(tmp_path, tiny_checkpoint, capsys):
    state = tmp_path / "epoch_1.state.pt"
    torch.save({"optimizer": {}, "rng": [{"numpy": ("MT19937",)}]}, state)
    with pytest.raises(ValueError, match=rf"checkpoint {state} is a train.py training state .*"
                                         rf"give {tmp_path / 'epoch_1.pt'}"):
        load_model(checkpoint=str(state))
    rc = run_cli(eval_retrieval.main, "eval_retrieval.py",
                 ["--checkpoint", str(tiny_checkpoint), "--annotation", str(tmp_path / "no.json"),
                  "--image-root", str(tmp_path), "--device", "cpu"])
    assert rc == 1
    assert capsys.readouterr().err == (f"eval_retrieval.py: error: retrieval annotation "
                                       f"{tmp_path / 'no.json'} does not exist; expected a "
                                       f"Karpathy split json (dataset_coco.json / "
                                       f"dataset_flickr30k.json layout)\n")


@pytest.mark.slow  # a fresh Python process importing torchvision, clip_benchmark: ~20 s on 2 busy cores
def test_eval_script_missing_dataset_exits_with_one_line(tmp_path, tiny_checkpoint):
    r = subprocess.run([sys.executable, os.path.join(REPO, "eval_zeroshot.py"), "--checkpoint",
                        str(tiny_checkpoint), "--dataset", "cifar10", "--root", str(tmp_path / "no"),
                        "--device", "cpu", "--workers", "0"],
                       capture_output=True, text=True, cwd=REPO, timeout=300)
    assert r.returncode == 1
    assert r.stderr.startswith(f"eval_zeroshot.py: error: cifar10: dataset root {tmp_path / 'no'} "
                               f"does not exist")
    assert "Traceback" not in r.stderr and r.stderr.count("\n") == 1


# --- checked before the model is loaded and before anything is evaluated -----------------------

CLIS = {"eval_retrieval.py": eval_retrieval, "eval_zeroshot.py": eval_zeroshot,
        "eval_linear_probe.py": eval_linear_probe}


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    """ImageFolder train/ and val/ (3 classes, 3 images each) and a 3-image Karpathy json."""
    root = tmp_path_factory.mktemp("data")
    for c in range(3):
        for split in ("train", "val"):
            for j in range(3):
                write_id_image(str(root / "imagefolder" / split / f"k{c}" / f"{j}.png"), 3 * c + j)
        write_id_image(str(root / "coco" / "val2014" / f"{c}.png"), c)
    write_karpathy(str(root / "coco" / "dataset_coco.json"),
                   [("val2014", f"{i}.png", "test", [f"image {i} caption {j}" for j in range(5)])
                    for i in range(3)])
    return root


def cli_args(prog, ckpt, data):
    if prog == "eval_retrieval.py":
        return ["--checkpoint", str(ckpt), "--annotation", str(data / "coco" / "dataset_coco.json"),
                "--image-root", str(data / "coco"), "--workers", "0"]
    extra = ["--val-fraction", "0.4", "--max-iter", "50"] if prog == "eval_linear_probe.py" else []
    return ["--checkpoint", str(ckpt), "--dataset", "imagefolder", "--root",
            str(data / "{dataset}"), "--workers", "0"] + extra


@pytest.fixture
def nothing_heavy(monkeypatch):
    """Loading the model or evaluating a dataset fails the test: the error must come first."""
    def heavy(*a, **k):
        pytest.fail("the model was loaded or a dataset evaluated before the bad input was reported")
    for module in CLIS.values():
        monkeypatch.setattr(module, "load_model_from_args", heavy)
    monkeypatch.setattr(eval_zeroshot, "evaluate_zeroshot", heavy)
    monkeypatch.setattr(eval_linear_probe, "evaluate_linear_probe", heavy)


def run_one_line(prog, argv, capsys):
    rc = run_cli(CLIS[prog].main, prog, argv)
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("prog", list(CLIS))
def test_device_without_gpu_is_named_not_blamed_on_the_checkpoint(prog, tiny_checkpoint, small_data,
                                                                  monkeypatch, nothing_heavy, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    args = cli_args(prog, tiny_checkpoint, small_data)
    err = run_one_line(prog, args + ["--device", "cuda"], capsys)
    assert err == (f"{prog}: error: --device cuda: no CUDA GPU is visible (--device auto falls back "
                   f"to the CPU)\n")  # train.py's words
    err = run_one_line(prog, args + ["--device", "gpu"], capsys)
    assert err == f"{prog}: error: --device must be auto, cpu, cuda or cuda:N, got 'gpu'\n"


@pytest.mark.parametrize("prog, flags, message", [
    ("eval_retrieval.py", ["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    ("eval_zeroshot.py", ["--batch-size", "-3"], "--batch-size must be >= 1, got -3"),
    ("eval_zeroshot.py", ["--workers", "-1"], "--workers must be >= 0, got -1"),
    ("eval_linear_probe.py", ["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    ("eval_linear_probe.py", ["--val-fraction", "1.5"], "--val-fraction must be in (0, 1), got 1.5"),
    ("eval_linear_probe.py", ["--val-fraction", "0"], "--val-fraction must be in (0, 1), got 0.0"),
    ("eval_linear_probe.py", ["--max-iter", "0"], "--max-iter must be >= 1, got 0"),
    ("eval_linear_probe.py", ["--seed", "-1"], "--seed must be in [0, 4294967295], got -1"),
])
def test_numeric_flag_out_of_range_is_named_first(prog, flags, message, tiny_checkpoint, small_data,
                                                  nothing_heavy, capsys):
    err = run_one_line(prog, cli_args(prog, tiny_checkpoint, small_data) + ["--device", "cpu"] + flags,
                       capsys)
    assert err == f"{prog}: error: {message}\n"


@pytest.mark.parametrize("prog", list(CLIS))
def test_output_folder_is_made_and_a_bad_output_is_refused_first(prog, tiny_checkpoint, small_data,
                                                                 tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # --device auto: the CPU
    out = tmp_path / "not" / "yet" / "r.json"
    assert run_cli(CLIS[prog].main, prog, cli_args(prog, tiny_checkpoint, small_data)
                   + ["--output", str(out)]) == 0, capsys.readouterr().err
    saved = json.loads(out.read_text())
    assert saved["metrics"] and saved["settings"]["device"] == "cpu" and saved["complete"] is True
    assert os.listdir(out.parent) == ["r.json"]  # written through a temporary file, renamed
    # a file where a folder should be, or a folder given as the file: refused before loading
    (tmp_path / "f").write_text("")
    monkeypatch.setattr(CLIS[prog], "load_model_from_args", lambda a: pytest.fail("model loaded"))
    err = run_one_line(prog, cli_args(prog, tiny_checkpoint, small_data)
                       + ["--output", str(tmp_path / "f" / "r.json")], capsys)
    assert err == (f"{prog}: error: --output {tmp_path / 'f' / 'r.json'}: {tmp_path / 'f'} is a "
                   f"file, not a folder\n")
    err = run_one_line(prog, cli_args(prog, tiny_checkpoint, small_data)
                       + ["--output", str(tmp_path)], capsys)
    assert err.startswith(f"{prog}: error: --output {tmp_path} is a directory")


@pytest.mark.parametrize("prog", ["eval_zeroshot.py", "eval_linear_probe.py"])
def test_every_dataset_is_checked_before_any_is_evaluated(prog, tiny_checkpoint, small_data,
                                                          nothing_heavy, capsys):
    args = [a.replace("imagefolder", "imagefolder,cifar10") for a in
            cli_args(prog, tiny_checkpoint, small_data)] + ["--device", "cpu"]
    err = run_one_line(prog, args, capsys)
    assert err.startswith(f"{prog}: error: cifar10: dataset root {small_data / 'cifar10'} does not "
                          f"exist")


def test_linear_probe_checks_the_train_split_first(tiny_checkpoint, tmp_path, nothing_heavy, capsys):
    write_id_image(str(tmp_path / "imagefolder" / "val" / "k0" / "a.png"), 0)
    err = run_one_line("eval_linear_probe.py", ["--checkpoint", str(tiny_checkpoint), "--dataset",
                                                "imagefolder", "--root", str(tmp_path / "imagefolder"),
                                                "--device", "cpu"], capsys)
    assert err.startswith(f"eval_linear_probe.py: error: imagefolder: "
                          f"{tmp_path / 'imagefolder' / 'train'} is missing")


def test_skip_missing_with_every_dataset_missing_is_an_error(tiny_checkpoint, tmp_path,
                                                             nothing_heavy, capsys):
    out = tmp_path / "o.json"
    err = run_one_line("eval_zeroshot.py", ["--checkpoint", str(tiny_checkpoint), "--dataset",
                                            "cifar10,dtd", "--root", str(tmp_path / "{dataset}"),
                                            "--device", "cpu", "--skip-missing", "--output", str(out)],
                       capsys)
    assert err.startswith("eval_zeroshot.py: error: nothing to evaluate: every dataset asked for is "
                          f"missing (cifar10, dtd); first: cifar10: dataset root {tmp_path / 'cifar10'}")
    assert not out.exists()


@pytest.mark.parametrize("prog", ["eval_zeroshot.py", "eval_linear_probe.py"])
def test_a_late_failure_keeps_the_datasets_done(prog, tiny_checkpoint, small_data, tmp_path, capsys):
    """imagefolder is evaluated, then cifar10 (present on disk, checked, but its batches are not
    pickles) fails: --output holds imagefolder's metrics, marked incomplete."""
    root = tmp_path / "data"
    root.mkdir()
    os.symlink(small_data / "imagefolder", root / "imagefolder")
    batches = root / "cifar10" / "cifar-10-batches-py"
    batches.mkdir(parents=True)
    for f in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]:
        (batches / f).write_bytes(b"not a pickle")
    out = tmp_path / "r.json"
    args = [a.replace("imagefolder", "imagefolder,cifar10").replace(str(small_data), str(root))
            for a in cli_args(prog, tiny_checkpoint, small_data)]
    err = run_one_line(prog, args + ["--device", "cpu", "--output", str(out)], capsys)
    assert err.startswith(f"{prog}: error: cifar10: cannot read the dataset under {root / 'cifar10'}")
    saved = json.loads(out.read_text())
    assert list(saved["metrics"]) == ["imagefolder"] and saved["complete"] is False
    assert saved["metrics"]["imagefolder"]["top1"] >= 0


def test_output_json_is_replaced_whole_or_not_at_all(tmp_path):
    out = tmp_path / "r.json"
    write_json(str(out), metrics={"a": float("nan")}, complete=True)
    before = out.read_text()
    assert json.loads(before) == {"metrics": {"a": None}, "complete": True}
    with pytest.raises(TypeError):  # fails half-way through json.dump
        write_json(str(out), metrics={"a": 1.0, "b": object()}, complete=True)
    assert out.read_text() == before and os.listdir(tmp_path) == ["r.json"]


@pytest.mark.parametrize("prog", list(CLIS))
def test_a_directory_as_checkpoint_is_named_with_the_model_file_to_give(prog, tiny_checkpoint,
                                                                         small_data, tmp_path,
                                                                         nothing_heavy, capsys):
    # before: "checkpoint RUN does not exist", of a directory that does
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    argv = lambda given: [str(given) if a == str(tiny_checkpoint) else a  # noqa: E731
                          for a in cli_args(prog, tiny_checkpoint, small_data)] + ["--device", "cpu"]
    err = run_one_line(prog, argv(run), capsys)
    assert err == (f"{prog}: error: checkpoint {run} is a directory; give a model file, none is "
                   f"in it: a train.py run's RUN/checkpoints/epoch_N.pt, or the ALIP authors' "
                   f"model_{{epoch}}.pt\n")
    for name, age in (("epoch_1.pt", 2), ("epoch_1.state.pt", 0), ("epoch_2.pt", 1)):
        (run / "checkpoints" / name).write_bytes(b"")
        os.utime(run / "checkpoints" / name, (1e9 - age, 1e9 - age))
    for given in (run, run / "checkpoints"):  # the run directory or its checkpoints/
        err = run_one_line(prog, argv(given), capsys)
        assert err == (f"{prog}: error: checkpoint {given} is a directory; give a model file, "
                       f"e.g. {run / 'checkpoints' / 'epoch_2.pt'} (the newest there)\n")
    with pytest.raises(IsADirectoryError, match=r"is a directory; give a model file, e.g. "):
        load_model(checkpoint=str(run))


def test_dense_scoring_of_a_filip_file_given_as_pretrained_names_the_cause(tmp_path,
                                                                          tiny_checkpoint):
    # before: "carries no dense head (only FILIP/DeFILIP checkpoints ...)" about a FILIP file
    import argparse

    from alip.eval.load import add_model_args, dense_head_from_args
    from alip.methods.filip import FILIPHead
    filip = tmp_path / "filip.pt"
    saved = torch.load(tiny_checkpoint, weights_only=True)
    torch.save({**saved, "method": "filip",
                "eval_heads": {"dense": FILIPHead(64, 64).state_dict()}}, filip)
    parse = lambda *a: add_model_args(argparse.ArgumentParser()).parse_args(  # noqa: E731
        ["--device", "cpu", "--model", "ALIP-tiny", "--scoring", "dense", *a])
    with pytest.raises(ValueError) as e:
        dense_head_from_args(parse("--pretrained", str(filip)))
    assert str(e.value) == (f"--scoring dense: --pretrained loads only the open_clip weights of "
                            f"{filip}, not its dense head; give it as --checkpoint {filip}")
    assert isinstance(dense_head_from_args(parse("--checkpoint", str(filip))), FILIPHead)
    with pytest.raises(ValueError, match=rf"^--scoring dense: {tiny_checkpoint} carries no dense "
                                         r"head \(only FILIP/DeFILIP train.py checkpoints do, "
                                         r"given as --checkpoint\)$"):
        dense_head_from_args(parse("--pretrained", str(tiny_checkpoint)))
