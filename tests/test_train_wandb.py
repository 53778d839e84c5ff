"""--report-to wandb: a real W&B run written offline (WANDB_MODE=offline), read back from its
.wandb file, holds the run's config and the same numbers as results.jsonl; a resumed run does not
send W&B the steps it already has; a missing wandb is one line naming the flag."""
import glob
import importlib.machinery
import json
import struct
import sys
import time
import types

import pytest

from alip.training.loop import default_make_loader, run
from alip.training.logger import RunLogger, wandb_run_id
from alip.training.params import parse_args
from test_train_helpers import read_results, tiny_argv



def wandb_records(path):
    """The protobuf records of a .wandb file (leveldb log framing: 32 KiB blocks of chunks with a
    7-byte header crc32/length/type; type 1 = a whole record, 2/3/4 = its first/middle/last)."""
    from wandb.proto import wandb_internal_pb2 as pb
    data = open(path, "rb").read()
    assert data[:4] == b":W&B", path
    pos, block, chunks = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pos += 7
        chunks += data[pos:pos + n]
        pos += n
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(chunks)
            chunks = b""
            yield record


def wandb_history(path):
    """{step: {key: value}} of a .wandb file's history records, and its config."""
    history, config = {}, {}
    for r in wandb_records(path):
        kind = r.WhichOneof("record_type")
        if kind == "history":
            row = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
            history.setdefault(row.pop("_step"), {}).update(row)
        elif kind == "run":
            config.update({i.key: json.loads(i.value_json) for i in r.run.config.update})
        elif kind == "config":
            config.update({i.key: json.loads(i.value_json) for i in r.config.update})
    return history, config


def test_offline_run_holds_config_and_the_logged_numbers(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    args = parse_args(tiny_argv(tmp_path, "wb:run/1", "--method", "alip", "--max-steps", "3")
                      + ["--report-to", "wandb", "--wandb-project-name", "proj"])
    out = run(args)
    files = glob.glob(f"{out['run_dir']}/wandb/offline-run-*/run-*.wandb")
    assert len(files) == 1 and files[0].endswith(f"run-{wandb_run_id('wb:run/1')}.wandb")
    assert wandb_run_id("wb:run/1") == "wb-run-1"
    history, config = wandb_history(files[0])
    assert config["method"] == "alip" and config["max_steps"] == 3
    train = read_results(out["run_dir"])
    assert [r["step"] for r in train] == [1, 2, 3]
    for r in train:
        row = history[r["step"]]
        assert row["train/loss"] == r["loss"] and row["train/lr"] == r["lr"]
        assert row["train/epoch"] == r["epoch"]
        assert "train/skipped" not in row  # booleans are not scalars

    # resumed: the same W&B run id, in a second offline run directory, with the new steps
    time.sleep(1.05)  # W&B names offline run directories by the second
    run(parse_args(tiny_argv(tmp_path, "wb:run/1", "--method", "alip", "--max-steps", "5")
                   + ["--report-to", "wandb", "--resume", "latest"]))
    resumed = set(glob.glob(f"{out['run_dir']}/wandb/offline-run-*/run-wb-run-1.wandb")) - set(files)
    assert len(resumed) == 1
    train = read_results(out["run_dir"])
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5]
    assert {s: row["train/loss"] for s, row in wandb_history(resumed.pop())[0].items()} == \
        {r["step"]: r["loss"] for r in train[3:]}


class FakeWandb(types.ModuleType):
    """Stands in for wandb: a run that W&B already has up to step ``have`` (an online resume)."""

    def __init__(self, have):
        super().__init__("wandb")
        self.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
        self.have, self.logged, self.inits, self.finished = have, [], [], []

    def init(self, **kwargs):
        self.inits.append(kwargs)
        return types.SimpleNamespace(step=self.have, id=kwargs["id"])

    def log(self, values, step):
        self.logged.append((step, values))

    def finish(self, exit_code=0):
        self.finished.append(exit_code)


def test_resumed_run_does_not_resend_steps_wandb_has(tmp_path, monkeypatch):
    fake = FakeWandb(have=5)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    logger = RunLogger(tmp_path, True, "wandb", 10, 3, 8, 1,
                       wandb={"name": "r", "project": "p", "notes": "", "config": {"a": 1},
                              "resumed": True})
    for step in (4, 5, 6):
        logger.write({"kind": "train", "step": step, "loss": float(step), "skipped": False})
    logger.write({"kind": "eval", "step": 6, "zeroshot_top1": 0.5})
    logger.close()
    assert fake.inits == [{"project": "p", "name": "r", "id": "r", "notes": None, "dir": str(tmp_path),
                           "config": {"a": 1}, "resume": "allow"}]
    assert fake.logged == [(5, {"train/loss": 5.0}), (6, {"train/loss": 6.0}),
                           (6, {"eval/zeroshot_top1": 0.5})]
    assert fake.finished == [0]


class DyingLoader:
    """A loader whose reader dies after its first batch."""

    def __init__(self, loader):
        self.loader = loader
        self.batches_per_epoch, self.num_samples = loader.batches_per_epoch, loader.num_samples

    def set_epoch(self, epoch, start_batch=0):
        self.loader.set_epoch(epoch, start_batch)

    def __iter__(self):
        yield next(iter(self.loader))
        raise RuntimeError("reader died")


def test_failed_run_finishes_its_wandb_run_as_failed(tmp_path, monkeypatch):
    fake = FakeWandb(have=0)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    with pytest.raises(RuntimeError, match="reader died"):
        run(parse_args(tiny_argv(tmp_path, "f") + ["--report-to", "wandb"]),
            make_loader=lambda *a: DyingLoader(default_make_loader(*a)))
    assert fake.finished == [1] and fake.inits[0]["resume"] is None


def test_missing_wandb_is_one_line_naming_the_flag(tmp_path, monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(SystemExit) as e:
        parse_args(tiny_argv(tmp_path, "r") + ["--report-to", "tensorboard,wandb"])
    assert str(e.value) == ("train.py: error: --report-to 'tensorboard,wandb': wandb is not "
                            "installed (pip install wandb)")
