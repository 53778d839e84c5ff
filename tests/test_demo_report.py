"""The demo report: the table carries the right numbers, the plots are valid PNGs, and the
noise-split gate weights read each training row's own noise label (a hand-built case)."""
import json
import os
import subprocess
import sys

import numpy as np
import open_clip
import pytest
import torch
import yaml
from PIL import Image

import alip  # noqa: F401
from alip.eval import demo_report
from alip.loss import ALIPLoss


def _write_world(world, rows):
    (world / "retrieval").mkdir(parents=True)
    (world / "classify").mkdir()
    (world / "raw" / "images").mkdir(parents=True)
    ann = {"images": [{"filename": f"{i}.jpg", "split": "test",
                       "sentences": [{"raw": f"c{i}{j}"} for j in range(5)]} for i in range(10)]}
    (world / "retrieval" / "dataset_demo.json").write_text(json.dumps(ann))
    (world / "classify" / "classnames.txt").write_text("circle\nsquare\nstar\nstar2\n")
    rng = np.random.default_rng(0)
    with open(world / "raw" / "train.jsonl", "w") as f:
        for i, (noise, text, cap) in enumerate(rows):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
                world / "raw" / "images" / f"{i}.jpg")
            f.write(json.dumps({"image": f"images/{i}.jpg", "text": text, "caption": cap,
                                "noise": noise}) + "\n")


def _write_run(out, method, losses, r1, top1):
    run = out / "runs" / f"demo-{method}"
    run.mkdir(parents=True)
    (run / "results.jsonl").write_text("".join(
        json.dumps({"kind": "train", "step": s + 1, "loss": v, "ema_tc": 0.5, "ema_it": 0.2,
                    "ema_ic": 0.3}) + "\n" for s, v in enumerate(losses)))
    metrics = {f"{d}_R@{k}": r1 * k for d in ("i2t", "t2i") for k in (1, 5, 10)}
    (out / f"retrieval_{method}.json").write_text(json.dumps({"metrics": metrics}))
    (out / f"zeroshot_{method}.json").write_text(
        json.dumps({"metrics": {"imagefolder": {"top1": top1}}}))
    return run


ROWS = [("clean", "a red circle", "a red circle"), ("mismatched", "buy cheap shoes", "a blue star"),
        ("partial", "red", "a small red square"), ("clean", "two stars", "two green stars"),
        ("wrong", "a blue circle", "a yellow circle")]


def test_report_table_plots_and_gates(tmp_path):
    out, world = tmp_path / "demo", tmp_path / "demo" / "world"
    _write_world(world, ROWS)
    _write_run(out, "clip", [3.0, 2.0, 1.5], 4.0, 30.0)
    run = _write_run(out, "alip", [2.0, 1.0, 0.5], 9.0, 40.0)
    # the ALIP run's checkpoint: a tiny model, its config, and the index the report reads
    torch.manual_seed(0)
    model = open_clip.create_model("ALIP-tiny")
    (run / "checkpoints").mkdir()
    torch.save({"state_dict": model.state_dict(), "model": "ALIP-tiny", "epoch": 1, "step": 3},
               run / "checkpoints" / "epoch_1.pt")
    (run / "checkpoints" / "index.json").write_text(json.dumps(
        [{"model": "epoch_1.pt", "state": "epoch_1.state.pt", "epoch": 1, "step": 3}]))
    (run / "config.yaml").write_text(yaml.safe_dump({"model": "ALIP-tiny", "alip_gamma": 2.0}))

    (out / "timings.tsv").write_text("clip\t61.4\t9.6\nalip\t80.5\t10.2\nslip\t1\t1\n")
    report = demo_report.build_report(out, ["clip", "alip"], world, seconds=90, machine="2 cores")
    text = report.read_text()
    assert "| clip | 61 | 10 |\n| alip | 80 | 10 |\n" in text  # methods not run are left out
    assert "| slip |" not in text
    assert "| chance | 10.0 | 50.0 | 100.0 | 10.0 | 50.0 | 100.0 | 25.0 |" in text
    assert "| alip | 9.0 | 45.0 | 90.0 | 9.0 | 45.0 | 90.0 | 40.0 |" in text
    assert "| clip | 4.0 | 20.0 | 40.0 | 4.0 | 20.0 | 40.0 | 30.0 |" in text
    assert "1.5 minutes on 2 cores" in text
    for name in ("loss.png", "recall.png", "gates.png"):
        with Image.open(out / name) as im:
            assert im.format == "PNG" and im.size[0] > 100
    # the gates by hand: the same model, the logged EMAs, each row's own label
    gates = json.loads((out / "gates.json").read_text())
    _, preprocess = open_clip.create_model_and_transforms("ALIP-tiny")[1:]
    tok = open_clip.get_tokenizer("ALIP-tiny")
    with torch.no_grad():
        img = model.encode_image(torch.stack([preprocess(Image.open(world / "raw" / "images" /
                                                                    f"{i}.jpg").convert("RGB"))
                                              for i in range(5)]), normalize=True)
        raw = model.encode_text(tok([r[1] for r in ROWS]), normalize=True)
        cap = model.encode_text(tok([r[2] for r in ROWS]), normalize=True)
    loss = ALIPLoss().eval()
    loss.ema_tc.fill_(0.5), loss.ema_it.fill_(0.2), loss.ema_ic.fill_(0.3)
    _, w_s, w_t, _ = loss.gates(img, raw, cap)
    assert gates["counts"] == {"clean": 2, "partial": 1, "wrong": 1, "mismatched": 1}
    assert gates["weights"]["clean"]["w_sample"][0] == pytest.approx(float(w_s[[0, 3]].mean()), rel=1e-5)
    assert gates["weights"]["mismatched"]["w_text"][0] == pytest.approx(float(w_t[1]), rel=1e-5)
    assert gates["weights"]["wrong"]["w_sample"][0] == pytest.approx(float(w_s[4]), rel=1e-5)


def test_timings_file_with_a_bad_line_names_file_and_line(tmp_path):
    (tmp_path / "timings.tsv").write_text("clip\t61.4\t9.6\nalip 80.5 10.2\n")
    with pytest.raises(ValueError, match=r"timings.tsv:2: expected"):
        demo_report.timings(tmp_path)
    assert demo_report.timings(tmp_path / "absent") == {}


def test_report_of_a_folder_without_runs_is_one_line(tmp_path):
    """``python -m alip.eval.demo_report`` (scripts/demo.sh's last step) on a folder that holds no
    runs, or none of a method: one line naming the folder or the missing file, no traceback."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    report = lambda *a: subprocess.run(  # noqa: E731
        [sys.executable, "-m", "alip.eval.demo_report", "--out", str(tmp_path), *a],
        capture_output=True, text=True, cwd=repo, timeout=300)
    r = report("--methods", "clip", "alip")
    assert r.returncode == 1
    assert r.stderr == (f"demo_report.py: error: --out {tmp_path} holds no demo run of clip, alip (no "
                        f"runs/demo-<method>/results.jsonl); run scripts/demo.sh first\n")
    _write_world(tmp_path / "world", ROWS)
    _write_run(tmp_path, "clip", [3.0, 2.0], 4.0, 30.0)
    (tmp_path / "zeroshot_clip.json").unlink()
    r = report("--methods", "clip")
    assert r.returncode == 1
    assert r.stderr == (f"demo_report.py: error: {tmp_path}: {tmp_path / 'zeroshot_clip.json'} is "
                        f"missing (scripts/demo.sh writes it)\n")
    assert not (tmp_path / "loss.png").exists()


def test_each_row_says_how_it_trained_beyond_clips_recipe(tmp_path):
    out = tmp_path / "demo"
    for name, cfg in (("clip", {"method": "clip", "name": "demo-clip", "epochs": 2, "lr": 0.002,
                                "filip_augment": "mocov2"}),
                      ("filip", {"method": "filip", "name": "demo-filip", "epochs": 2, "lr": 0.002,
                                 "filip_augment": "reference"}),
                      ("clip_e4", {"method": "clip", "name": "demo-clip_e4", "epochs": 4,
                                   "lr": 0.002, "filip_augment": "mocov2", "total_steps": 4,
                                   "accum_mode": "micro"})):  # both follow from others here
        run = _write_run(out, name, [3.0, 2.0, 1.5, 1.0][:cfg["epochs"]], 4.0, 30.0)
        (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    notes = demo_report.recipes(out, ["clip", "filip", "clip_e4"])
    assert notes == {"clip": "2 steps", "filip": "2 steps; filip-augment reference",
                     "clip_e4": "4 steps; epochs 4"}
    assert demo_report.recipes(out, ["filip", "clip_e4"]) == {}  # no clip row: nothing to say
    text = demo_report.table(demo_report.collect(out, ["clip", "filip"]),
                             {**{f"{d}_R@{k}": 0.1 for d in ("i2t", "t2i") for k in (1, 5, 10)},
                              "top1": 25.0}, notes)
    assert "| filip | 4.0 | 20.0 | 40.0 | 4.0 | 20.0 | 40.0 | 30.0 | 2 steps; filip-augment reference |" in text


def test_demo_rows_are_the_methods_then_the_other_demo_configs(tmp_path):
    from alip.methods import method_names
    for stem in ("clip", "zz_budget", "alip_long77", "clip_mix", "alip", "alip_long"):
        (tmp_path / f"demo_{stem}.yaml").write_text("method: clip\n")
    assert demo_report.demo_rows(tmp_path) == [*method_names(), "clip_mix", "zz_budget",
                                               "alip_long", "alip_long77"]  # long rows last


def test_long_caption_table_compares_the_long_rows_and_alip_on_both_splits(tmp_path):
    out, world = tmp_path / "demo", tmp_path / "demo" / "world"
    _write_world(world, ROWS)
    (world / "demo_world.json").write_text(json.dumps({"detailed": {
        "tokens": {"min": 80, "median": 108.0, "max": 135}, "late_share": 0.75},
        "retrieval_long": {"captions": 10}}))
    cfgs = {"clip": {"method": "clip"}, "alip": {"method": "alip", "caption_view": "full"},
            "alip_long": {"method": "alip", "caption_fields": ["detailed"], "text_context": 256},
            "alip_long77": {"method": "alip", "caption_fields": ["detailed77"]}}
    for i, (row, cfg) in enumerate(cfgs.items()):
        run = _write_run(out, row, [1.0], 1.0 + i, 50.0)
        (run / "config.yaml").write_text(yaml.safe_dump(cfg))
        if row == "clip":
            continue  # not a long-caption row: left out even with a long-split result
        metrics = {f"{d}_R@{k}": 10.0 * i + k + (d == "t2i") for d in ("i2t", "t2i") for k in (1, 5, 10)}
        cut = {"context": 77, "texts": 60, "truncated_texts": 45, "tokens_lost": 1234, "longest": 135}
        (out / f"retrieval_long_{row}.json").write_text(json.dumps(
            {"metrics": metrics, "truncation": cut if row != "alip_long" else dict(
                cut, context=256, truncated_texts=0, tokens_lost=0)}))
    ref = demo_report.chance(world)
    text = demo_report.long_table(out, list(cfgs), ref)
    lines = text.splitlines()
    assert lines[2] == "| chance | | 10.0 | 10.0 | 10.0 | 10.0 | 50.0 | 50.0 | |"
    assert lines[3:] == [
        "| alip | caption; tower 77 | 2.0 | 2.0 | 11.0 | 12.0 | 15.0 | 16.0 | 45 of 60 (1,234 tokens lost) |",
        "| alip_long | detailed; tower 256 | 3.0 | 3.0 | 21.0 | 22.0 | 25.0 | 26.0 | none |",
        "| alip_long77 | detailed77; tower 77 | 4.0 | 4.0 | 31.0 | 32.0 | 35.0 | 36.0 | 45 of 60 (1,234 tokens lost) |"]
    assert demo_report.long_table(out, ["clip", "slip"], ref) == ""  # no long row: no section
    report = demo_report.build_report(out, list(cfgs), world, gates_run=None).read_text()
    assert "## Long captions\n\nLong-text retrieval: the same 10 held-out images with 10 " \
           "detailed captions (80-135 tokens, median 108 in training; the details that tell " \
           "scenes apart lie past token 77 in 75% of them)" in report
    assert text in report and "| alip_long77 | 4.0 | 20.0 | 40.0 |" in report  # the main table too
