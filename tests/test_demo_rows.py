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


TINY_ROW = """method: {method}
model: ALIP-tiny
data-backend: torch
workers: 0
batch-size: 32
epochs: 1
lr: 1.0e-3
precision: fp32
seed: 0
name: demo-{row}
save-frequency: 1
report-to: ''
"""


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory):
    from alip.data import demo_world
    out = tmp_path_factory.mktemp("world")
    demo_world.generate(out, num_train=96, num_test=5, classify_train_per_class=0,
                        classify_val_per_class=1, image_size=32, progress=False)
    return out


def tiny_configs(path, rows):
    path.mkdir()
    for row, method in rows.items():
        (path / f"demo_{row}.yaml").write_text(TINY_ROW.format(method=method, row=row))
    return path


def run_rows(tmp_path, world, configs, rows, jobs, out="out"):
    return subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path / out), "--world",
                           str(world), "--configs", str(configs), "--jobs", str(jobs), *rows],
                          capture_output=True, text=True, timeout=300)


def test_a_failed_row_stops_the_rows_not_started_and_names_its_log(tmp_path, tiny_world):
    configs = tiny_configs(tmp_path / "configs", {"a": "clip", "bad": "clip", "c": "clip"})
    (configs / "demo_bad.yaml").write_text(TINY_ROW.format(method="clip", row="bad").replace(
        "lr: 1.0e-3", "lr: -1"))
    r = run_rows(tmp_path, tiny_world, configs, ["bad", "a", "c"], jobs=2)
    out = tmp_path / "out"
    assert r.returncode == 1, r.stderr
    log = out / "logs" / "bad.log"
    assert r.stderr.splitlines()[-1] == f"demo_rows.py: row bad failed (exit 1); its output: {log}"
    assert log.read_text().splitlines()[-1].endswith("demo_bad.yaml: lr: must be > 0, got -1.0")
    # 'a' was running beside 'bad' and finished; 'c' was never started
    assert (out / "timings.tsv").read_text().split("\t")[0] == "a"
    assert (out / "retrieval_a.json").is_file() and not (out / "logs" / "c.log").exists()


@pytest.mark.slow
def test_rows_side_by_side_give_the_numbers_of_rows_one_after_another(tmp_path, tiny_world):
    import json
    configs = tiny_configs(tmp_path / "configs", {"a": "clip", "b": "alip"})
    for jobs, out in ((1, "serial"), (2, "parallel")):
        r = run_rows(tmp_path, tiny_world, configs, ["a", "b"], jobs=jobs, out=out)
        assert r.returncode == 0, r.stderr
    for name in ("retrieval_a.json", "retrieval_b.json", "zeroshot_a.json", "zeroshot_b.json"):
        serial, parallel = (json.loads((tmp_path / d / name).read_text()) for d in ("serial", "parallel"))
        assert serial["metrics"] == parallel["metrics"], name
    assert [line.split("\t")[0] for line in (tmp_path / "parallel" / "timings.tsv").read_text().splitlines()] == ["a", "b"]


def test_jobs_must_be_positive(tmp_path):
    r = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path), "--world",
                        str(tmp_path), "--jobs", "0", "clip"], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.splitlines()[-1].endswith(
        "error: --jobs must be a positive integer, got 0")


@pytest.mark.parametrize("has_long", [True, False])
def test_each_row_is_evaluated_on_the_long_text_split_when_the_world_has_one(tmp_path, monkeypatch, has_long):
    """run_row: retrieval on the usual split, then on retrieval/dataset_demo_long.json (when the
    world has it: version 4 on) into OUT/retrieval_long_R.json, then zero-shot."""
    demo_rows = load()
    world, out = tmp_path / "world", tmp_path / "out"
    (world / "retrieval").mkdir(parents=True)
    (world / "retrieval" / "dataset_demo.json").write_text("{}")
    if has_long:
        (world / "retrieval" / "dataset_demo_long.json").write_text("{}")

    def train(argv):
        (out / "runs" / "demo-alip_long" / "checkpoints").mkdir(parents=True)
        (out / "runs" / "demo-alip_long" / "checkpoints" / "epoch_2.pt").write_bytes(b"")
        return 0

    calls = []
    monkeypatch.setattr(demo_rows, "train", train)
    monkeypatch.setattr(demo_rows, "run_cli", lambda main, prog, argv: calls.append((prog, argv)) or 0)
    assert isinstance(demo_rows.run_row("alip_long", out, world), tuple)
    got = [(prog, argv[argv.index("--annotation") + 1] if "--annotation" in argv else None,
            argv[argv.index("--output") + 1]) for prog, argv in calls]
    ckpt = str(out / "runs" / "demo-alip_long" / "checkpoints" / "epoch_2.pt")
    assert all(argv[argv.index("--checkpoint") + 1] == ckpt for _, argv in calls)
    want = [("eval_retrieval.py", str(world / "retrieval" / "dataset_demo.json"),
             str(out / "retrieval_alip_long.json"))]
    if has_long:
        want.append(("eval_retrieval.py", str(world / "retrieval" / "dataset_demo_long.json"),
                      str(out / "retrieval_long_alip_long.json")))
    assert got == want + [("eval_zeroshot.py", None, str(out / "zeroshot_alip_long.json"))]
    # a failing evaluation stops the row with its exit code
    calls.clear()
    monkeypatch.setattr(demo_rows, "run_cli", lambda main, prog, argv: calls.append(prog) or 3)
    import shutil
    shutil.rmtree(out / "runs")
    assert demo_rows.run_row("alip_long", out, world) == 3 and calls == ["eval_retrieval.py"]
