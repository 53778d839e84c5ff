"""caption.py faults (issue 30): each stops with one line naming the file, flag or column, before
anything is written, or survives; never a traceback, never a silent change of data.

A caption column the run reads as input; weights replaced between a killed run and its rerun; a
--max-new-tokens past the model's limit; a training state, an empty or a corrupt weights file;
temporary files left by a kill during the assembly; caption.py's and data2rec's reasons for the
same undecodable image."""
import glob
import io
import json
import os
import shutil
import socket
import subprocess

import pytest

import caption
from alip.caption import weights, writer
from alip.caption.backends import GenSettings, VLLMCaptioner, plan_description
from alip.caption.run import decode_image
from alip.caption.tiny import save_tiny_coca
from alip.data.pack import DataError, Reject, encode_image
from data_fixtures import image, jpeg_bytes, make_manifest_dataset
from test_caption import (blip_dir, clean, coca_args, coca_dir, manifest, one_thread, outputs,  # noqa: F401
                          read_jsonl, save_tiny_clip)
from test_caption_runs import _no_model_load


def refused(rc, capsys, *names):
    """caption.py said one line naming every one of ``names`` and exited 1."""
    err = capsys.readouterr().err
    assert rc == 1, err
    assert err.startswith("caption: error: ") and len(err.splitlines()) == 1, err
    assert all(n in err for n in names), err
    return err


def cc3m_manifest(root, n=3, fmt="jsonl"):
    """An img2dataset/CC3M-style manifest: the web alt-text column is named ``caption``."""
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    rows = []
    for i in range(n):
        image(i).save(os.path.join(root, f"images/{i}.jpg"), quality=95)
        rows.append({"image": f"images/{i}.jpg", "caption": f"web alt text {i}"})
    path = os.path.join(root, f"cc3m.{fmt}")
    with open(path, "w") as f:
        if fmt == "jsonl":
            f.writelines(json.dumps(r) + "\n" for r in rows)
        else:
            f.write("image\tcaption\n" + "".join(f"{r['image']}\t{r['caption']}\n" for r in rows))
    return rows, path


@pytest.mark.parametrize("fmt", ["jsonl", "tsv"])
def test_a_caption_column_the_run_reads_is_refused(coca_dir, tmp_path, monkeypatch, capsys, fmt):  # noqa: F811
    """--text-col caption with the default --caption-col caption wrote each generated caption over
    the row's web text (exit 0; data2rec then packed raw = caption). Any column the run reads
    (the raw text, the image path) is refused as --caption-col, in one line, before the model
    loads; and an output that would replace the input manifest is refused too."""
    rows, path = cc3m_manifest(str(tmp_path), fmt=fmt)
    before = open(path, "rb").read()
    out = tmp_path / "caps"
    base = ["--manifest", path, "--image-root", str(tmp_path), "--output-dir", str(out)] + coca_args(coca_dir)
    with monkeypatch.context() as m:
        _no_model_load(m)
        refused(caption.main(base + ["--text-col", "caption"]), capsys,
                "--caption-col 'caption' is also --text-col", "raw text", "--caption-col synthetic_caption")
        refused(caption.main(base + ["--text-col", "caption", "--caption-col", "image"]), capsys,
                "--caption-col 'image' is also --image-col", "image path")
        assert not out.exists()
        # the input manifest named like an output, in the output dir: the assembly renamed over it
        inside = tmp_path / "inside"
        inside.mkdir()
        copy = str(inside / f"captioned.{fmt}")
        shutil.copy(path, copy)
        refused(caption.main(["--manifest", copy, "--image-root", str(tmp_path), "--output-dir", str(inside),
                              "--text-col", "caption", "--caption-col", "synth"] + coca_args(coca_dir)), capsys,
                f"--output-dir {inside}: its captioned.{fmt} would replace the input manifest {copy}")
        assert sorted(os.listdir(inside)) == [f"captioned.{fmt}"] and open(copy, "rb").read() == before
    assert caption.main(base + ["--text-col", "caption", "--caption-col", "synthetic_caption"]) == 0
    copied = open(out / f"captioned.{fmt}", encoding="utf-8").read().splitlines()
    if fmt == "jsonl":
        got = [json.loads(line) for line in copied]
    else:
        header, *cells = [line.split("\t") for line in copied]
        got = [dict(zip(header, c)) for c in cells]
    assert [(g["image"], g["caption"]) for g in got] == [(r["image"], r["caption"]) for r in rows]  # web text kept
    caps = {c["key"]: c["caption"] for c in read_jsonl(out / "captions.jsonl")}
    assert [g["synthetic_caption"] for g in got] == [caps[i] for i in range(len(rows))]
    assert open(path, "rb").read() == before


def test_weights_replaced_between_a_killed_run_and_its_rerun_are_refused(tmp_path, capsys):
    """The run stopped midway (one part of two written), the weights replaced at the same path,
    the same command rerun: the old chunks were reused, the output mixed two models' captions and
    named one. plan.json records each weights file's size and mtime: the rerun is refused naming
    the file; a fresh --output-dir (or the old dir deleted) captions with the new weights, and
    chunks of the old weights are never reused even without plan.json (their fingerprint differs)."""
    d = str(tmp_path / "model")
    model = save_tiny_coca(d, seed=0)
    root = str(tmp_path / "data")
    path = make_manifest_dataset(root, 4)
    out = str(tmp_path / "caps")
    args = ["--manifest", path, "--image-root", root] + coca_args(model, "--chunk-size", "2")
    assert caption.main(args + ["--output-dir", out, "--part", "0/2"]) == 0  # chunk 0 of 2: "killed midway"
    chunks = sorted(glob.glob(os.path.join(out, "chunks", "*.json")))
    assert len(chunks) == 1
    save_tiny_coca(d, seed=1)  # other weights, the same path
    weights_file = os.path.join(d, "open_clip_pytorch_model.bin")
    refused(caption.main(args + ["--output-dir", out]), capsys, f"{out} holds captions made with other weights: ",
            f"{weights_file} changed (modified ", "Put those weights back to finish that run",
            f"delete the whole directory {out}")
    assert sorted(glob.glob(os.path.join(out, "chunks", "*.json"))) == chunks and not outputs(out)
    fresh = str(tmp_path / "fresh")
    assert caption.main(args + ["--output-dir", fresh]) == 0
    os.remove(os.path.join(out, "plan.json"))  # by hand: the old chunk must still not count
    assert caption.main(args + ["--output-dir", out]) == 0
    assert outputs(out) == outputs(fresh)
    side = json.load(open(os.path.join(out, "captions.json")))
    assert side["captioner"]["weights"]["files"][weights_file] == [os.stat(weights_file).st_size,
                                                                   os.stat(weights_file).st_mtime_ns]


def test_a_replaced_weights_file_or_hub_revision_is_named(tmp_path):
    """The single-file (--pretrained FILE, --backend clips FILE), directory (hf, vllm) and hub
    (cached revision) records: a change is named with the file, its size and mtime, or the
    revisions."""
    f = tmp_path / "w.pt"
    f.write_bytes(b"x" * 10)
    out = str(tmp_path / "out")
    plan = {"settings": {"captioner": plan_description("clips", str(f))}}
    writer.check_plan(out, plan)
    f.write_bytes(b"y" * 12)
    with pytest.raises(DataError, match=rf"other weights: {f} changed \(size 10 -> 12 bytes, modified "):
        writer.check_plan(out, {"settings": {"captioner": plan_description("clips", str(f))}})
    hf = tmp_path / "hf"  # a transformers model directory: every file but hidden ones (.git, .cache)
    (hf / ".git").mkdir(parents=True)
    for name in ("config.json", "model.safetensors", ".git/HEAD", ".gitattributes"):
        (hf / name).write_text(name)
    assert sorted(plan_description("hf", str(hf))["weights"]["files"]) == [str(hf / "config.json"),
                                                                           str(hf / "model.safetensors")]
    snap = tmp_path / "hub/models--org--cap/snapshots"
    for rev in ("aaa111", "bbb222"):
        (snap / rev).mkdir(parents=True)
        (snap / rev / "config.json").write_text("{}")
    refs = tmp_path / "hub/models--org--cap/refs"
    refs.mkdir()
    revisions = []
    for rev in ("aaa111", "bbb222"):
        (refs / "main").write_text(rev)
        revisions.append({"hub": "org/cap", "revision": weights.hub_revision("org/cap", cache_dir=tmp_path / "hub")})
    assert [r["revision"] for r in revisions] == ["aaa111", "bbb222"]
    assert weights.change(*revisions) == "hub model org/cap: revision aaa111 then, bbb222 now"
    assert weights.hub_revision("org/not-cached", cache_dir=tmp_path / "hub") is None


@pytest.fixture(scope="module")
def clips_run(tmp_path_factory):
    """A --method clips model file (12 decoder queries) and its training state, from a tiny run."""
    from test_train_helpers import run_single, tiny_argv
    logs = tmp_path_factory.mktemp("clips")
    run_single(tiny_argv(logs, "clips", "--method", "clips", "--clips-queries", "12", samples=16, batch=8))
    return str(logs / "clips/checkpoints/epoch_1.pt"), str(logs / "clips/checkpoints/epoch_1.state.pt")


def test_max_new_tokens_past_the_backend_limit_is_refused_before_anything_is_written(
        coca_dir, blip_dir, clips_run, tmp_path, capsys):  # noqa: F811
    """--max-new-tokens 77 with a CoCa passed the checks, wrote plan.json and died at the first
    batch with a tensor-size RuntimeError, the output dir then locked to it. Each backend's limit
    is checked once the model is loaded, before any output exists: CoCa 76 (its text context),
    BLIP its text positions less the prompt, CLIPS its queries (it silently cut the captions
    short, the plan recording the longer setting), vLLM its max_model_len."""
    root = str(tmp_path / "data")
    path = make_manifest_dataset(root, 2)
    out = tmp_path / "caps"
    base = ["--manifest", path, "--image-root", root, "--output-dir", str(out), "--workers", "0", "--no-progress",
            "--decoding", "greedy", "--min-new-tokens", "0"]
    cases = ((["--model", coca_dir, "--max-new-tokens", "77"], ["--max-new-tokens 77", "at most 76 tokens"]),
             (["--backend", "hf", "--model", blip_dir, "--max-new-tokens", "65"],
              ["--max-new-tokens 65", blip_dir, "at most 64 tokens"]),
             (["--backend", "hf", "--model", blip_dir, "--max-new-tokens", "61", "--prompt", "a picture of"],
              ["at most 60 tokens"]),
             (["--backend", "clips", "--model", clips_run[0], "--max-new-tokens", "13"],
              ["--max-new-tokens 13", "12 queries", "at most 12 tokens"]))
    for argv, names in cases:
        refused(caption.main(base + argv), capsys, *names)
        assert not out.exists()
    assert caption.main(base + ["--model", coca_dir, "--max-new-tokens", "76", "--batch-size", "2"]) == 0
    assert len(read_jsonl(out / "captions.jsonl")) + len(read_jsonl(out / "failed.jsonl")) == 2
    with pytest.raises(ValueError, match="--max-new-tokens 4096: vLLM with max_model_len 4096"):
        VLLMCaptioner("any", GenSettings(decoding="greedy", max_new_tokens=4096))  # before vLLM is imported


def test_bad_weights_files_are_one_line_for_every_backend(coca_dir, blip_dir, clips_run, tmp_path,  # noqa: F811
                                                          capsys):
    """--backend clips --model epoch_N.state.pt (or an empty file) was an unpickling traceback; the
    eval CLIs said "a training state: give epoch_N.pt" (alip.eval.load's check, reused). Every
    backend given a bad weights file now says one line naming it, and writes nothing."""
    model, state = clips_run
    root = str(tmp_path / "data")
    path = make_manifest_dataset(root, 2)
    out = tmp_path / "caps"
    base = ["--manifest", path, "--image-root", root, "--output-dir", str(out), "--workers", "0", "--no-progress",
            "--decoding", "greedy", "--max-new-tokens", "4", "--min-new-tokens", "0"]
    empty, garbage = tmp_path / "empty.pt", tmp_path / "garbage.pt"
    empty.write_bytes(b"")
    garbage.write_bytes(b"not a checkpoint at all")
    corrupt_coca = tmp_path / "coca"  # the tiny CoCa with its weights file cut short
    shutil.copytree(coca_dir[len("local-dir:"):], corrupt_coca)
    w = corrupt_coca / "open_clip_pytorch_model.bin"
    w.write_bytes(w.read_bytes()[:1000])
    other_coca = tmp_path / "other"  # a CLIP's weights in the CoCa's directory: they do not fit
    save_tiny_clip(str(other_coca))
    shutil.copy(corrupt_coca / "open_clip_config.json", other_coca / "open_clip_config.json")
    corrupt_blip = tmp_path / "blip"
    shutil.copytree(blip_dir, corrupt_blip)
    (corrupt_blip / "model.safetensors").write_bytes(b"\x00" * 100)
    give = state[:-len(".state.pt")] + ".pt"
    cases = (
        (["--backend", "clips", "--model", state], [f"--model {state} is a train.py training state", f"give {give}"]),
        (["--backend", "clips", "--model", str(empty)], [f"--model {empty}: an empty file (0 bytes)"]),
        (["--backend", "clips", "--model", str(garbage)],
         [f"--model {garbage}: cannot be read as a torch checkpoint (UnpicklingError"]),
        (["--backend", "clips", "--model", str(tmp_path / "no.pt")], [f"--model {tmp_path / 'no.pt'}: no such file"]),
        (["--model", "coca_ViT-B-32", "--pretrained", state], [f"--pretrained {state} is a train.py training state"]),
        (["--model", "coca_ViT-B-32", "--pretrained", str(empty)], [f"--pretrained {empty}: an empty file"]),
        (["--model", f"local-dir:{corrupt_coca}"], [f"--model local-dir:{corrupt_coca}: the open_clip captioner "
                                                    "does not load ("]),
        (["--model", f"local-dir:{other_coca}"], [f"--model local-dir:{other_coca}: the open_clip captioner "
                                                  "does not load (RuntimeError: Error(s) in loading state_dict"]),
        (["--backend", "hf", "--model", str(corrupt_blip)],
         [f"--model {corrupt_blip}: the hf captioner does not load (SafetensorError"]),
        (["--backend", "hf", "--model", state], [f"--model {state} is a train.py training state"]),
        (["--backend", "hf", "--model", model], [f"--model {model}: a file; --backend hf takes a model directory"]),
    )
    for argv, names in cases:
        refused(caption.main(base + argv), capsys, *names)
        assert not out.exists()


def test_leftovers_of_a_killed_assembly_are_removed_by_the_rerun(manifest, coca_dir, clean, tmp_path):  # noqa: F811
    """A kill during the assembly left captions.json.HOST.PID.tmp (and the other outputs') behind
    for good. The rerun's assembly removes every temporary file of a process that is gone (this
    host's dead PIDs, other hosts'), keeps a live process's and files not ours, and writes the
    same bytes."""
    root, path = manifest
    out = str(tmp_path / "caps")
    shutil.copytree(clean, out)
    for name in ("captions.json", "captioned.jsonl"):  # the kill came before these were renamed in
        os.remove(os.path.join(out, name))
    host, dead = socket.gethostname(), 2 ** 22 + 12345  # above any pid_max: no such process
    chunk = os.path.basename(glob.glob(os.path.join(out, "chunks", "chunk-000001.*.json"))[0])
    live = subprocess.Popen(["sleep", "60"])
    try:
        gone = [f"captions.json.{host}.{dead}.tmp", f"captioned.jsonl.{host}.{dead}.tmp",
                f"failed.jsonl.node7.cluster.local.{os.getpid()}.tmp", f"chunks/{chunk}.{host}.{dead}.tmp",
                f"plan.json.{host}.{dead}.tmp"]
        kept = [f"captions.jsonl.{host}.{live.pid}.tmp", "notes.tmp", f"chunks/.probe.{dead}.tmp"]
        for name in gone + kept:
            open(os.path.join(out, name), "w").write("half")
        assert caption.main(["--manifest", path, "--image-root", root, "--output-dir", out] + coca_args(coca_dir)) == 0
        assert [n for n in gone if os.path.exists(os.path.join(out, n))] == []
        assert all(os.path.exists(os.path.join(out, n)) for n in kept)
    finally:
        live.kill()
        live.wait()
    assert outputs(out) == outputs(clean)


def bad_images():
    good = jpeg_bytes(image(1))
    zeroed = bytearray(good)
    zeroed[:64] = bytes(64)
    png = io.BytesIO()
    image(2).save(png, format="PNG")
    return {"not an image": b"hello, not an image", "zeroed header": bytes(zeroed), "empty": b"",
            "truncated JPEG": good[:len(good) // 2], "truncated PNG": png.getvalue()[:60]}


def test_caption_and_data2rec_give_the_same_reason_for_an_undecodable_image():
    """failed.jsonl said "UnidentifiedImageError: cannot identify image file" where data2rec's
    rejects.jsonl said "not an image format Pillow knows": both now word it with one function
    (alip.data.pack.undecodable)."""
    for what, data in bad_images().items():
        reasons = set()
        for decode in (decode_image, encode_image, lambda d: encode_image(d, copy_jpeg=True),
                       lambda d: encode_image(d, max_size=16)):
            with pytest.raises(Reject) as e:
                decode(data)
            reasons.add(str(e.value))
        assert len(reasons) == 1 and next(iter(reasons)).startswith("undecodable image: "), (what, reasons)


def test_a_model_that_does_not_load_leaves_no_output_dir(tmp_path, capsys):
    """A model that failed to load left OUT/chunks/ behind, empty: the output dir is now only
    checked (writable) before the load and created by the plan, after it."""
    root = str(tmp_path / "data")
    path = make_manifest_dataset(root, 2)
    out = tmp_path / "a" / "caps"
    (tmp_path / "a").mkdir()
    refused(caption.main(["--manifest", path, "--image-root", root, "--output-dir", str(out), "--model",
                          f"local-dir:{tmp_path}/nope", "--decoding", "greedy", "--workers", "0", "--no-progress"]),
            capsys, "nope")
    assert os.listdir(tmp_path / "a") == []
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        if not os.access(ro, os.W_OK):  # root writes anywhere
            refused(caption.main(["--manifest", path, "--image-root", root, "--output-dir", str(ro / "caps"),
                                  "--model", "x", "--pretrained", "y"]), capsys,
                    f"--output-dir {ro / 'caps'}: cannot write there (no permission to create it in {ro})")
    finally:
        ro.chmod(0o755)
