"""scripts/run_retrieval.sh and scripts/run_zeroshot.sh on a tiny checkpoint and generated data."""
import json
import os
import subprocess
import sys

import pytest
import torch

from alip.eval.load import load_model
from eval_fakes import write_id_image, write_karpathy

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_checkpoint_and_coco(tmp_path):
    """An ALIP-tiny train.py-style checkpoint and a 3-image COCO Karpathy set under data/."""
    model, _, _ = load_model("ALIP-tiny")
    torch.save({"state_dict": model.state_dict(), "model": "ALIP-tiny", "epoch": 1, "step": 1}, tmp_path / "e1.pt")
    data = tmp_path / "data"
    for i in range(3):
        write_id_image(str(data / "coco" / "val2014" / f"{i}.png"), i, size=32)
    write_karpathy(str(data / "coco" / "dataset_coco.json"), [("val2014", f"{i}.png", "test", caps(i)) for i in range(3)])
    return data


def caps(i):
    return [f"image {i} caption {j}" for j in range(5)]


@pytest.mark.slow  # three fresh Python processes: ~30 s of CPU
def test_run_scripts(tmp_path):
    data = tiny_checkpoint_and_coco(tmp_path)
    for i in range(3):
        write_id_image(str(data / "flickr30k" / "flickr30k-images" / f"{i}.png"), i, size=32)
        write_id_image(str(data / "imagefolder" / "val" / f"k{i}" / "a.png"), i, size=32)
    write_karpathy(str(data / "flickr30k" / "dataset_flickr30k.json"), [("", f"{i}.png", "test", caps(i)) for i in range(3)])
    env = {**os.environ, "OUT": str(tmp_path / "out"), "PYTHON": sys.executable}
    for script, extra in (("run_retrieval.sh", {}), ("run_zeroshot.sh", {"DATASETS": "imagefolder"})):
        r = subprocess.run(["bash", os.path.join(REPO, "scripts", script), str(tmp_path / "e1.pt"), str(data),
                            "--device", "cpu", "--workers", "0"], env={**env, **extra}, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
    for name in ("retrieval_coco.json", "retrieval_flickr30k.json"):
        metrics = json.loads((tmp_path / "out" / name).read_text())["metrics"]
        assert metrics["t2i_R@5"] == 100.0  # 3 images: every true image is in the top 5
        assert set(metrics) == {"i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10", "rsum"}
    zs = json.loads((tmp_path / "out" / "zeroshot.json").read_text())
    assert set(zs["metrics"]) == {"imagefolder"} and zs["metrics"]["imagefolder"]["num_images"] == 3


@pytest.mark.slow  # two fresh Python processes: ~15 s of CPU
def test_run_retrieval_checks_every_dataset_before_evaluating_any(tmp_path):
    """Flickr30k is not there: the script stops before COCO is evaluated, naming Flickr's file."""
    data = tiny_checkpoint_and_coco(tmp_path)
    env = {**os.environ, "OUT": str(tmp_path / "out"), "PYTHON": sys.executable}
    r = subprocess.run(["bash", os.path.join(REPO, "scripts", "run_retrieval.sh"), str(tmp_path / "e1.pt"),
                        str(data), "--device", "cpu", "--workers", "0"], env=env, capture_output=True, text=True)
    assert r.returncode == 1
    assert r.stderr == (f"eval_retrieval.py: error: retrieval annotation {data / 'flickr30k' / 'dataset_flickr30k.json'}"
                        f" does not exist; expected a Karpathy split json (dataset_coco.json / "
                        f"dataset_flickr30k.json layout)\n")
    assert not (tmp_path / "out" / "retrieval_coco.json").exists() and "R@1" not in r.stdout
