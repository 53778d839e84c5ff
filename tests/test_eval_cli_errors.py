"""The eval CLIs' expected failures end with one line naming the file at fault: a corrupt image
in an ImageFolder (also from a DataLoader worker), a training state given as --checkpoint, a
missing dataset or annotation."""
import os
import subprocess
import sys

import pytest
import torch
from torch.utils.data import DataLoader

import eval_retrieval
import eval_zeroshot
from alip.eval.cli import one_line, run_cli
from alip.eval.datasets import build_dataset
from alip.eval.load import load_model
from eval_fakes import write_id_image

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
