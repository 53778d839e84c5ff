"""Faults and bad input for data2rec, data2rec.py verify and the readers (issue #10, data side).

Each test drives the real CLI where practical and asserts the README's promise: a clear one-line
error or a counted reject, never a hang, a crash, a traceback or a silently lost row."""
import fcntl
import glob
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

import data2rec
from alip.data.loader import build_train_loader
from alip.data.recordio import IR_SIZE, LABEL_LEN, RecordIOError, RecordReader
from data_fixtures import (cache_dir, caption_of, image, make_manifest_dataset,  # noqa: F401
                           text_of, write_manifest)  # cache_dir: autouse

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable


def cli(*args, timeout=120):
    return subprocess.run([PY, os.path.join(REPO, "data2rec.py"), *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


def shard_bytes(out):
    return {os.path.basename(p): open(p, "rb").read()
            for p in sorted(glob.glob(os.path.join(out, "train-*.rec")) + glob.glob(os.path.join(out, "train-*.idx")))}


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("in"))
    return root, make_manifest_dataset(root, 12)


@pytest.fixture(scope="module")
def shards(ds, tmp_path_factory):
    root, manifest = ds
    out = str(tmp_path_factory.mktemp("rec"))
    assert data2rec.main(["--manifest", manifest, "--image-root", root, "--output-dir", out,
                          "--shard-size", "6", "--no-progress"]) == 0
    return out


# ---------------------------------------------------------------------------------------------
# data2rec: a worker killed by the OOM killer

def _children(pid):
    kids = []
    for task in glob.glob(f"/proc/{pid}/task/*/children"):
        kids += [int(x) for x in open(task).read().split()]
    return kids


def _fifo_dataset(tmp_path):
    """16 manifest rows whose image 9 is a fifo: the worker that opens it blocks there, so a kill
    lands mid-task every time. Returns (root, data2rec args without --output-dir, fifo path)."""
    root = str(tmp_path / "in")
    manifest = make_manifest_dataset(root, 16)
    fifo = os.path.join(root, "images", "0009.jpg")
    os.remove(fifo)
    os.mkfifo(fifo)
    return root, ["--manifest", manifest, "--image-root", root, "--shard-size", "4", "--no-progress"], fifo


def _unblock_fifo(fifo):
    os.remove(fifo)
    image(9).save(fifo, quality=95)  # the file make_manifest_dataset writes


def _worker_on_fifo(proc, fifo, timeout=90):
    """(write end of the fifo, pid of the worker of ``proc`` blocked reading it)."""
    deadline, stuck, writer = time.time() + timeout, None, None
    while writer is None and time.time() < deadline and proc.poll() is None:
        try:  # succeeds once a worker is opening the fifo; it then blocks reading it
            writer = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError:
            time.sleep(0.02)
    while writer is not None and stuck is None and time.time() < deadline:
        for pid in _children(proc.pid):
            try:
                fds = [os.readlink(p) for p in glob.glob(f"/proc/{pid}/fd/*")]
            except OSError:
                continue
            if fifo in fds:
                stuck = pid
        time.sleep(0.02)
    assert stuck is not None, "no worker blocked on the fifo"
    return writer, stuck


def _running(pid):
    """pid is a live process (a zombie waiting for its reaper is not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_killed_worker_stops_the_run_with_an_error_and_a_rerun_is_byte_identical(tmp_path):
    root, args, fifo = _fifo_dataset(tmp_path)
    killed = str(tmp_path / "killed")
    proc = subprocess.Popen([PY, os.path.join(REPO, "data2rec.py"), *args, "--output-dir", killed, "--workers", "2"],
                            cwd=REPO, stderr=subprocess.PIPE, text=True)
    writer, stuck = _worker_on_fifo(proc, fifo)
    os.kill(stuck, signal.SIGKILL)  # what the OOM killer does
    os.close(writer)
    try:
        _, err = proc.communicate(timeout=60)  # multiprocessing.Pool: waits forever
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.fail("data2rec hung after a worker was killed")
    assert proc.returncode == 1
    assert "a worker process died" in err and "rerun the same command" in err and "Traceback" not in err
    assert not os.path.exists(os.path.join(killed, "manifest.json"))
    _unblock_fifo(fifo)
    assert data2rec.main(args + ["--output-dir", killed, "--workers", "2"]) == 0
    clean = str(tmp_path / "clean")
    assert data2rec.main(args + ["--output-dir", clean]) == 0
    assert shard_bytes(killed) == shard_bytes(clean) and len(shard_bytes(clean)) == 8


def test_a_killed_run_leaves_no_workers_and_rerunning_it_completes_the_output(tmp_path):
    """data2rec itself SIGKILLed (the OOM killer, a job's hard kill) with --workers 2: its workers
    die with it instead of blocking for ever as orphans that hold the output dir's lock, and the
    documented recovery, the same command again, completes the output byte for byte as an
    uninterrupted run makes it (it used to be refused: "another data2rec run (pid <dead>) is writing")."""
    root, args, fifo = _fifo_dataset(tmp_path)
    killed = str(tmp_path / "killed")
    proc = subprocess.Popen([PY, os.path.join(REPO, "data2rec.py"), *args, "--output-dir", killed, "--workers", "2"],
                            cwd=REPO, stderr=subprocess.DEVNULL)
    workers = []
    try:
        writer, _ = _worker_on_fifo(proc, fifo)
        workers = _children(proc.pid)
        assert len(workers) == 2
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        os.close(writer)  # a worker that survived would finish its task, then wait for the next
        deadline = time.time() + 5
        while any(map(_running, workers)) and time.time() < deadline:
            time.sleep(0.05)
        assert not [p for p in workers if _running(p)], "workers outlived their killed parent"
    finally:
        for pid in workers:  # this test's own processes, if the assertion above failed
            if _running(pid):
                os.kill(pid, signal.SIGKILL)
    _unblock_fifo(fifo)
    assert data2rec.main(args + ["--output-dir", killed, "--workers", "2"]) == 0
    clean = str(tmp_path / "clean")
    assert data2rec.main(args + ["--output-dir", clean]) == 0
    assert shard_bytes(killed) == shard_bytes(clean) and len(shard_bytes(clean)) == 8


@pytest.mark.slow
def test_a_killed_caption_run_leaves_no_dataloader_workers(tmp_path):
    """caption.py SIGKILLed with --workers 2 while a DataLoader worker is stuck reading an image
    (a fifo here; a hung network mount in life): its workers end with it at once (torch's own
    check of the parent runs between tasks only), and the rerun of the same command completes."""
    from alip.caption.tiny import save_tiny_coca
    root, _, fifo = _fifo_dataset(tmp_path)
    coca = save_tiny_coca(str(tmp_path / "coca"))
    cmd = [PY, os.path.join(REPO, "caption.py"), "--manifest", os.path.join(root, "manifest.jsonl"),
           "--image-root", root, "--model", coca, "--decoding", "greedy", "--max-new-tokens", "4",
           "--min-new-tokens", "2", "--batch-size", "2", "--chunk-size", "4", "--workers", "2", "--no-progress",
           "--output-dir", str(tmp_path / "caps")]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stderr=subprocess.DEVNULL)
    workers = []
    try:
        writer, _ = _worker_on_fifo(proc, fifo)
        workers = _children(proc.pid)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        deadline = time.time() + 3
        while any(map(_running, workers)) and time.time() < deadline:
            time.sleep(0.05)
        assert not [p for p in workers if _running(p)], "DataLoader workers outlived caption.py"
        os.close(writer)
    finally:
        for pid in workers:
            if _running(pid):
                os.kill(pid, signal.SIGKILL)
    _unblock_fifo(fifo)
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "rows in 16 = captioned 16 + failed 0" in r.stdout, r.stderr[-2000:]


def _hold_lock(path):
    """A process that flocks ``path`` and keeps it (an orphan that inherited a dead run's lock)."""
    code = ("import fcntl, sys, time; f = open(sys.argv[1], 'a+'); fcntl.flock(f, fcntl.LOCK_EX); "
            "print('held', flush=True); time.sleep(120)")
    proc = subprocess.Popen([PY, "-c", code, path], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "held\n"
    return proc


def _dead_pid():
    proc = subprocess.Popen([PY, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.mark.parametrize("record", ["legacy", "host"])
def test_a_lock_still_held_for_a_dead_run_does_not_block_the_rerun(ds, tmp_path, capsys, record):
    """The lock file names a run that is gone (bare pid: an older data2rec; host pid start: this
    one) but another process still holds its flock: the rerun takes it over, saying so."""
    import socket
    root, manifest = ds
    out = tmp_path / "out"
    out.mkdir()
    lock = str(out / ".data2rec.lock")
    dead = _dead_pid()
    with open(lock, "w") as f:
        f.write(f"{dead}\n" if record == "legacy" else f"{socket.gethostname()} {dead} 12345\n")
    holder = _hold_lock(lock)
    try:
        code = data2rec.main(["--manifest", manifest, "--image-root", root, "--output-dir", str(out),
                              "--no-progress"])
        err = capsys.readouterr().err
        assert code == 0, err
        assert f"the process that held it (pid {dead}) is gone" in err and "taking it over" in err
        # a live holder still refuses, naming it
        with open(lock, "w") as f:
            f.write(f"{socket.gethostname()} {holder.pid}\n")
        other = _hold_lock(lock)
        try:
            code = data2rec.main(["--manifest", manifest, "--image-root", root, "--output-dir", str(out),
                                  "--no-progress"])
            assert code == 1
            assert f"another data2rec run (pid {holder.pid}) is writing into {out}" in capsys.readouterr().err
        finally:
            other.kill()
            other.wait()
    finally:
        holder.kill()
        holder.wait()


def test_a_second_run_into_the_same_dir_is_refused(ds, tmp_path):
    root, manifest = ds
    out = tmp_path / "out"
    out.mkdir()
    with open(out / ".data2rec.lock", "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a run in progress
        r = cli("--manifest", manifest, "--image-root", root, "--output-dir", str(out), "--no-progress")
        assert r.returncode == 1 and "another data2rec run" in r.stderr and "Traceback" not in r.stderr
        assert not glob.glob(str(out / "train-*"))
    r = cli("--manifest", manifest, "--image-root", root, "--output-dir", str(out), "--no-progress")
    assert r.returncode == 0, r.stderr  # released: the next run goes through


def test_output_dir_errors_are_one_line(ds, tmp_path, monkeypatch, capsys):
    root, manifest = ds
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    r = cli("--manifest", manifest, "--image-root", root, "--output-dir", str(blocker / "out"), "--no-progress")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.startswith("data2rec: error: ") and "a_file" in r.stderr and len(r.stderr.splitlines()) == 1
    # a full disk while a shard is written (ENOSPC carries no file name)
    from alip.data import recordio

    def full(self, key, payload):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(recordio.RecordWriter, "write_payload", full)
    assert data2rec.main(["--manifest", manifest, "--image-root", root, "--output-dir", str(tmp_path / "o"),
                          "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "train-00000.rec.partial: cannot write shard train-00000 (No space left on device)" in err


# ---------------------------------------------------------------------------------------------
# data2rec: bad rows

def test_unbalanced_csv_quote_costs_one_row(ds, tmp_path):
    root, _ = ds
    lines = ["image,text,caption"]
    for i in range(22):
        text = text_of(i)
        if i == 4:
            text = '"an unbalanced quote'  # opens a quoted field that never closes
        elif i == 9:
            text = '"a real caption,\nwith a newline"'  # a legal multi-line field: kept
        lines.append(f"images/{i % 12:04d}.jpg,{text},{caption_of(i)}")
    path = os.path.join(root, "quote.csv")
    open(path, "w").write("\n".join(lines) + "\n")
    out = str(tmp_path / "out")
    r = cli("--manifest", path, "--image-root", root, "--output-dir", out, "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "rows in 22 = written 21 + rejected 1" in r.stdout  # before: "rows in 2"
    (rej,) = map(json.loads, open(os.path.join(out, "rejects.jsonl")))
    assert rej["row"] == 4 and rej["reason"].startswith("line 6: unbalanced quote")
    keys = {r.key: r for p in sorted(glob.glob(os.path.join(out, "*.rec"))) for r in RecordReader(p)}
    assert sorted(keys) == [k for k in range(22) if k != 4]


def test_runaway_quote_in_a_large_csv_is_a_reject_not_a_csv_error(ds, tmp_path):
    root, _ = ds
    long = "x" * 30000
    lines = ["image,text,caption", f'images/0000.jpg,"stray {long},c']
    lines += [f"images/{i:04d}.jpg,{long},{caption_of(i)}" for i in range(1, 8)]  # > field limit in 5 lines
    path = os.path.join(root, "big.csv")
    open(path, "w").write("\n".join(lines) + "\n")
    r = cli("--manifest", path, "--image-root", root, "--output-dir", str(tmp_path / "o"), "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "rows in 8 = written 7 + rejected 1" in r.stdout
    (rej,) = map(json.loads, open(tmp_path / "o" / "rejects.jsonl"))
    assert rej["row"] == 0 and rej["reason"].startswith("line 2: unparseable CSV (field larger than field limit")


def test_wrong_types_blank_text_nul_path_and_deep_json_are_rejects(ds, tmp_path):
    root, _ = ds
    good = {"image": "images/0000.jpg", "text": "t", "caption": "c"}
    rows = [json.dumps(good),
            json.dumps({**good, "text": ["a", "list"]}),
            json.dumps({**good, "text": {"a": "dict"}}),
            json.dumps({**good, "caption": False}),
            json.dumps({**good, "text": "\u200b\u200b \u200b"}),
            json.dumps({**good, "image": "images/0000.jpg\u0000x"}),
            "[" * 100000 + "]" * 100000,
            json.dumps({**good, "caption": "\ufeff\u200d"}),
            json.dumps(good)]
    path = os.path.join(root, "types.jsonl")
    open(path, "w").write("\n".join(rows) + "\n")
    out = str(tmp_path / "out")
    r = cli("--manifest", path, "--image-root", root, "--output-dir", out, "--no-progress", "--workers", "2")
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert "rows in 9 = written 2 + rejected 7" in r.stdout
    rej = {x["row"]: x["reason"] for x in map(json.loads, open(os.path.join(out, "rejects.jsonl")))}
    assert rej == {1: "column 'text' is a JSON list, not a string",
                   2: "column 'text' is a JSON object, not a string",
                   3: "column 'caption' is a JSON boolean, not a string",
                   4: "empty text",
                   5: "image path contains a NUL byte",
                   6: "malformed JSON line: nested too deeply",
                   7: "empty caption"}


def test_a_manifest_naming_a_column_twice_is_never_read_as_one_of_them(ds, tmp_path, capsys):
    """A JSONL row naming "caption" twice is rejected with that reason (json.loads kept the last
    value silently); a CSV header naming a column data2rec reads twice stops the run."""
    root, _ = ds
    good = json.dumps({"image": "images/0000.jpg", "text": "t", "caption": "c"})
    path = os.path.join(root, "twice.jsonl")
    open(path, "w").write("\n".join([good, good[:-1] + ', "caption": "other"}', good]) + "\n")
    out = str(tmp_path / "out")
    assert data2rec.main(["--manifest", path, "--image-root", root, "--output-dir", out, "--no-progress"]) == 0
    assert "rows in 3 = written 2 + rejected 1" in capsys.readouterr().out
    rej = [json.loads(line) for line in open(os.path.join(out, "rejects.jsonl"))]
    assert [(r["row"], r["reason"]) for r in rej] == [
        (1, "malformed JSON line: member 'caption' twice in one JSON object")]
    path = os.path.join(root, "twice.csv")
    open(path, "w").write("image,text,caption,caption,note,note\nimages/0000.jpg,t,c,d,x,y\n")
    assert data2rec.main(["--manifest", path, "--image-root", root, "--output-dir", str(tmp_path / "csv"),
                          "--no-progress"]) == 1
    assert capsys.readouterr().err == (f"data2rec: error: {path}: the header names column 'caption' twice; "
                                       "name each column once\n")


def test_rejects_are_byte_identical_between_runs(ds, tmp_path):
    root, _ = ds
    open(os.path.join(root, "junk.jpg"), "wb").write(b"not an image")
    path = write_manifest(root, [{"image": "junk.jpg", "text": "t", "caption": "c"},
                                 {"image": "images/0001.jpg", "text": "t", "caption": "c"}], name="junk")
    outs = [str(tmp_path / f"o{i}") for i in range(2)]
    for o in outs:
        assert cli("--manifest", path, "--image-root", root, "--output-dir", o, "--no-progress").returncode == 0
    a, b = (open(os.path.join(o, "rejects.jsonl"), "rb").read() for o in outs)
    assert a == b and b"0x" not in a
    assert json.loads(a)["reason"] == "undecodable image: not an image format Pillow knows"


def test_16_bit_grayscale_png_keeps_its_levels(tmp_path):
    root = str(tmp_path)
    ramp = np.tile(np.linspace(0, 65535, 256), (64, 1)).round().astype(np.uint16)  # mean 32767.5
    Image.fromarray(ramp).save(os.path.join(root, "g16.png"))
    assert Image.open(os.path.join(root, "g16.png")).mode == "I;16"
    path = write_manifest(root, [{"image": "g16.png", "text": "t", "caption": "c"}])
    out = str(tmp_path / "out")
    assert cli("--manifest", path, "--image-root", root, "--output-dir", out, "--no-progress").returncode == 0
    (rec,) = RecordReader(os.path.join(out, "train-00000.rec"))
    px = np.asarray(Image.open(io.BytesIO(rec.jpeg)), np.float64)
    assert px.shape == (64, 256, 3)
    assert abs(px.mean() - 127.5) < 3  # before: 254 (clipped at 255)
    assert abs(px[:, 128].mean() - 128) < 4 and px[:, 0].mean() < 4 and px[:, -1].mean() > 251


# ---------------------------------------------------------------------------------------------
# verify and the readers

def _zero_jpeg_header(rec_path, i):
    """Zero the first 64 bytes of record i's JPEG (its SOI and headers)."""
    r = RecordReader(rec_path)
    start = int(r.offsets[i]) + 8 + IR_SIZE + 4 * LABEL_LEN
    data = bytearray(open(rec_path, "rb").read())
    data[start:start + 64] = bytes(64)
    open(rec_path, "wb").write(bytes(data))
    return int(r.keys[i])


def test_verify_names_every_bad_record_and_dali_never_decodes_it(shards, tmp_path, cache_dir):
    r = cli("verify", shards, "--no-progress")
    assert r.returncode == 0 and "2 shards, 12 records: all good" in r.stdout, r.stderr
    bad = str(tmp_path / "bad")
    shutil.copytree(shards, bad)
    rec = os.path.join(bad, "train-00001.rec")
    key = _zero_jpeg_header(rec, 2)
    r = cli("verify", bad, "--no-progress")
    assert r.returncode == 1
    assert r.stdout.splitlines() == [f"{rec}: record key {key}: undecodable JPEG (UnidentifiedImageError: "
                                     "cannot identify image file)"]
    assert "1 problems in 1 shards" in r.stderr
    # training on DALI checks before the first epoch: one error naming shard and key
    with pytest.raises(RecordIOError, match=rf"train-00001\.rec: record key {key}: undecodable JPEG"):
        build_train_loader(bad, backend="dali", batch_size=4, image_size=16, workers=1)
    # cached: the 2 shards of the first verify and the good shard of the copy, not the bad one
    assert len(glob.glob(str(cache_dir / "verified" / "*.json"))) == 3
    # without the check, DALI's own error is re-raised naming the files and the record range
    loader = build_train_loader(bad, backend="dali", batch_size=4, image_size=16, workers=1, drop_last=False,
                                verify_shards=False)
    with pytest.raises(RecordIOError, match=r"DALI failed reading records 0\..11 .*train-00000\.rec \.\. .*"
                                            r"train-00001\.rec \(2 files\)"):
        list(loader)


def test_verify_is_cached_per_file_version(shards, cache_dir):
    from alip.data.verify import verify_shards
    paths = sorted(glob.glob(os.path.join(shards, "*.rec")))
    first = verify_shards(paths)
    assert {p: n for p, (n, q) in first.items()} == {paths[0]: 6, paths[1]: 6}
    assert verify_shards(paths) == {}  # nothing to do: both cached
    os.utime(paths[1])  # a new mtime is a new version of the file
    assert list(verify_shards(paths)) == [paths[1]]


def test_verify_finds_framing_and_index_faults(shards, tmp_path):
    from alip.data.verify import check_shard
    bad = str(tmp_path / "bad")
    shutil.copytree(shards, bad)
    os.remove(os.path.join(bad, "manifest.json"))  # verify must find these without the counts
    rec, idx = os.path.join(bad, "train-00000.rec"), os.path.join(bad, "train-00000.idx")
    lines = open(idx).read().splitlines()
    open(idx, "w").write("\n".join(lines[:3] + lines[4:]) + "\n")  # a lost .idx line
    lost_offset = int(lines[3].split()[1])
    n, problems = check_shard(rec)
    assert n == 5 and problems == [f"{rec}: the record at offset {lost_offset} is not in {idx} (lost .idx line)"]
    key, off = lines[3].split()
    open(idx, "w").write("\n".join(lines[:3] + [f"{key}\t{int(off) + 4}"] + lines[4:]) + "\n")
    problems = check_shard(rec)[1]
    assert f"{idx}: record key {key}: offset {int(off) + 4} is not the start of a record in {rec}" in problems
    open(idx, "w").write("\n".join(lines) + "\n")
    data = bytearray(open(rec, "rb").read())
    data[lost_offset:lost_offset + 4] = b"\0\0\0\0"  # a broken magic word
    open(rec, "wb").write(bytes(data))
    assert check_shard(rec)[1] == [f"{rec}: record key {key}: bad magic 0x00000000 at offset {lost_offset} "
                                   "(not a record start)"]


@pytest.mark.parametrize("fault", ["lost", "duplicated"])
def test_idx_that_lost_or_repeats_lines_is_an_error(shards, tmp_path, fault):
    bad = str(tmp_path / "bad")
    shutil.copytree(shards, bad)
    idx = os.path.join(bad, "train-00001.idx")
    lines = open(idx).read().splitlines()
    lines = lines[:-2] if fault == "lost" else lines + lines[1:3]
    open(idx, "w").write("\n".join(lines) + "\n")
    want = (r"train-00001\.idx: 4 index lines but .*manifest\.json lists 6 records" if fault == "lost"
            else r"train-00001\.idx:7: key \d+ is already on line 2 \(duplicated \.idx line")
    for backend in ("torch", "dali"):
        with pytest.raises(RecordIOError, match=want):
            build_train_loader(bad, backend=backend, batch_size=2, image_size=16, workers=0)
    if fault == "duplicated":  # duplicates are caught without manifest.json too
        os.remove(os.path.join(bad, "manifest.json"))
        with pytest.raises(RecordIOError, match=want):
            build_train_loader(bad, backend="torch", batch_size=2, image_size=16, workers=0)


@pytest.mark.parametrize("workers", [0, 1])
def test_training_on_an_undecodable_record_stops_with_one_line(shards, tmp_path, cache_dir, workers):
    from alip.training.loop import main
    bad = str(tmp_path / "bad")
    shutil.copytree(shards, bad)
    rec = os.path.join(bad, "train-00000.rec")
    key = _zero_jpeg_header(rec, 1)
    with pytest.raises(SystemExit) as e:  # the PyTorch reader meets it while reading
        main(["--model", "ALIP-tiny", "--train-data", bad, "--data-backend", "torch",
              "--batch-size", "4", "--epochs", "1", "--workers", str(workers), "--device", "cpu",
              "--precision", "fp32", "--report-to", "", "--logs", str(tmp_path / "runs")])
    assert str(e.value) == (f"train.py: error: {rec}: record key {key}: undecodable image "
                            f"(UnidentifiedImageError: cannot identify image file); `data2rec.py "
                            f"verify` checks every record of the shards")
