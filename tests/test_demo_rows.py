"""scripts/demo_rows.py, demo.sh's loop in one process: a row without a config is refused before
anything trains, and each row is evaluated on its newest epoch model file."""
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "demo_rows.py"


def load():
    spec = importlib.util.spec_from_file_location("demo_rows", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_row_without_a_config_is_refused_before_training(tmp_path):
    r = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path), "--world",
                        str(tmp_path / "world"), "clip", "cilp"], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.splitlines()[-1].endswith(
        "error: no configs/demo_cilp.yaml for demo row 'cilp'")
    assert not (tmp_path / "runs").exists() and not (tmp_path / "timings.tsv").exists()


def test_the_newest_epoch_model_is_evaluated(tmp_path):
    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    for name in ("epoch_2.pt", "epoch_10.pt", "epoch_10.state.pt", "epoch_9.pt", "step_12.pt"):
        (ckpts / name).write_bytes(b"")
    demo_rows = load()
    assert demo_rows.last_epoch_model(tmp_path).name == "epoch_10.pt"  # by number, not by name
    (ckpts / "epoch_10.pt").unlink(), (ckpts / "epoch_9.pt").unlink(), (ckpts / "epoch_2.pt").unlink()
    with pytest.raises(FileNotFoundError, match="holds no epoch_N.pt"):
        demo_rows.last_epoch_model(tmp_path)
