"""Method flags: a flag given to a method that does not read it is refused, naming the flag, the
method and the method that reads it (train.py takes every method's flags whatever --method);
each method's declaration of the flags it reads (``Method.flags_read``) is what it reads; the
help's groups name the methods that read them; and head shapes that cannot be built (CLIPS'
decoder heads, FILIP's k, BatchNorm heads on one sample) are refused before the model is built.
Parse-level: no model is built except in the declaration test (tiny models)."""
import argparse
import re

import open_clip
import pytest
import yaml

from alip.methods import METHODS, MethodConfigError, get_method, method_flags
from alip.methods.base import ModelDims
from alip.methods.clips import CLIPS
from alip.training.loop import main
from alip.training.params import build_parser, parse_args
from test_train_helpers import tiny_argv

from test_methods import MODELS


def check(argv):
    """parse_args + the method's check_args: what train.py runs before building anything."""
    args = parse_args(argv)
    get_method(args.method).check_args(args)
    return args


# ---------------------------------------------------------------------------------------------
# flags of another method

IGNORED = [
    (["--method", "clip", "--alip-gamma", "3"],
     "--method clip does not read --alip-gamma (--method alip does): it would be ignored"),
    (["--method", "clip", "--alip-gamma", "2.0"],  # at its default: still given, still ignored
     "--method clip does not read --alip-gamma (--method alip does): it would be ignored"),
    (["--method", "clip", "--alip-gam", "3"],  # an abbreviation argparse accepts
     "--method clip does not read --alip-gamma (--method alip does): it would be ignored"),
    (["--method", "defilip", "--filip-padding", "reference", "--filip-k-image", "4"],
     "--method defilip does not read --filip-k-image (--method filip does; defilip reads "
     "--defilip-k-image), --filip-padding (--method filip does; defilip reads "
     "--defilip-padding): they would be ignored"),
    (["--method", "defilip", "--filip-augment", "reference"],
     "--method defilip does not read --filip-augment (--method filip does): it would be ignored"),
    (["--method", "alip", "--declip-bank-size", "64"],
     "--method alip does not read --declip-bank-size (--method declip and --method defilip do): "
     "it would be ignored"),
    (["--method", "filip", "--declip-augment", "reference"],
     "--method filip does not read --declip-augment (--method declip and --method defilip do; "
     "filip reads --filip-augment): it would be ignored"),
    (["--method", "clips", "--text-mode", "joint"],
     "--method clips does not read --text-mode (--method alip does): it would be ignored"),
    (["--method", "filip", "--defilip-k-text", "8"],
     "--method filip does not read --defilip-k-text (--method defilip does; filip reads "
     "--filip-k-text): it would be ignored"),
]


@pytest.mark.parametrize("argv,message", IGNORED, ids=[" ".join(a) for a, _ in IGNORED])
def test_another_methods_flag_is_refused_naming_the_method_that_reads_it(argv, message):
    with pytest.raises(MethodConfigError) as e:
        check(argv)
    assert str(e.value) == message


def test_another_methods_flag_in_a_config_is_refused_even_at_its_default(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"method": "filip", "slip_views": "declip"}))
    with pytest.raises(MethodConfigError, match=r"^--method filip does not read --slip-views "
                                                r"\(--method slip does\): it would be ignored$"):
        check(["--config", str(cfg)])
    # the method named on the command line over the config's: the config's flags then ignored
    cfg.write_text(yaml.safe_dump({"method": "slip", "slip-ssl-scale": 0.5}))
    with pytest.raises(MethodConfigError, match="^--method clip does not read --slip-ssl-scale"):
        check(["--config", str(cfg), "--method", "clip"])
    assert check(["--config", str(cfg)]).slip_ssl_scale == 0.5


@pytest.mark.parametrize("argv", [
    ["--method", "defilip", "--declip-bank-size", "64", "--defilip-padding", "reference"],
    ["--method", "defilip", "--declip-augment", "reference"],
    ["--method", "declip", "--declip-bank-size", "64"],
    ["--method", "filip", "--filip-padding", "reference", "--filip-augment", "simclr"],
    ["--method", "alip", "--alip-gamma", "3", "--text-mode", "separate"],
    ["--method", "clips", "--clips-w-cap", "1", "--caption-view", "truncate"],
    ["--method", "clip", "--lr", "1e-4", "--batch-size", "8"],  # training-wide flags: any method
], ids=lambda a: " ".join(a))
def test_a_methods_own_and_shared_flags_are_accepted(argv):
    check(argv)


def test_an_ignored_flag_through_train_py_is_one_line(tmp_path):
    with pytest.raises(SystemExit) as e:
        main(tiny_argv(tmp_path, "r", "--method", "clip", "--alip-gamma", "3"))
    assert str(e.value) == ("train.py: error: --method clip does not read --alip-gamma "
                            "(--method alip does): it would be ignored")
    assert not (tmp_path / "r").exists()  # refused before the run directory was made


class Recording(argparse.Namespace):
    """A Namespace that records every attribute read."""

    def __getattribute__(self, name):
        if not name.startswith("_"):
            object.__getattribute__(self, "__dict__").setdefault("_read", set()).add(name)
        return object.__getattribute__(self, name)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_flags_read_declares_exactly_the_method_flags_the_method_reads(name):
    """What ``flags_read`` declares (and the refusal trusts) against what checking and building
    the method reads from its args: a flag read but not declared would be refused though used;
    one declared but not read would be accepted and ignored."""
    small_bank = ["--declip-bank-size", "32"] if name in ("declip", "defilip") else []
    args = Recording(**vars(parse_args(["--method", name, "--model", MODELS[name], *small_bank])))
    cls = get_method(name)
    method = cls(args)
    method.attach(open_clip.create_model(MODELS[name], **method.model_kwargs()))
    read = vars(args)["_read"] & set(method_flags())
    assert read == set(cls.flags_read())


def test_the_help_groups_name_the_methods_that_read_their_flags():
    readers = {flag: set(r) for flag, r in method_flags().values()}
    groups = [g for g in build_parser()._action_groups
              if any(a.option_strings and a.option_strings[0] in readers for a in g._group_actions)]
    assert len(groups) == sum(bool(get_method(m).own_flags()) for m in METHODS)  # CLIP: none
    for g in groups:
        flags = [a.option_strings[0] for a in g._group_actions]
        named = set(re.findall(r"--method (\w+)", g.title))
        assert all(readers[f] == named for f in flags), (g.title, flags)


# ---------------------------------------------------------------------------------------------
# head shapes, before the model is built

SHAPES = [
    (["--method", "clips", "--clips-decoder-heads", "5"],
     "the decoder width 64 (--model ALIP-tiny's text tower's; set --clips-decoder-width) is not "
     "a multiple of --clips-decoder-heads 5: attention splits the width evenly across heads"),
    (["--method", "clips", "--clips-decoder-width", "65"],
     "--clips-decoder-width 65 is not a multiple of the decoder's 2 heads (--model ALIP-tiny's "
     "text tower's; set --clips-decoder-heads): attention splits the width evenly across heads"),
    (["--method", "clips", "--clips-decoder-width", "96", "--clips-decoder-heads", "5"],
     "--clips-decoder-width 96 is not a multiple of --clips-decoder-heads 5: attention splits "
     "the width evenly across heads"),
    (["--method", "filip", "--filip-k-image", "17"],
     "--filip-k-image 17: --model ALIP-tiny has 16 patch tokens per sample; give at most 16 "
     "(all of them)"),
    (["--method", "filip", "--filip-k-text", "78"],
     "--filip-k-text 78: --model ALIP-tiny has 77 text positions per sample; give at most 77 "
     "(all of them)"),
    (["--method", "defilip", "--model", "DeCLIP-tiny", "--defilip-k-image", "20"],
     "--defilip-k-image 20: --model DeCLIP-tiny has 16 patch tokens per sample; give at most 16 "
     "(all of them)"),
    (["--method", "slip", "--batch-size", "1"],
     "--batch-size 1: --method slip's heads use BatchNorm, which needs at least 2 samples per "
     "process in a training batch"),
    (["--method", "declip", "--model", "DeCLIP-tiny", "--batch-size", "1"],
     "--batch-size 1: --method declip's heads use BatchNorm, which needs at least 2 samples per "
     "process in a training batch"),
]


@pytest.mark.parametrize("argv,message", SHAPES, ids=[" ".join(a) for a, _ in SHAPES])
def test_head_shapes_that_cannot_be_built_are_refused_naming_the_flags(argv, message):
    argv = (["--model", "ALIP-tiny"] if "--model" not in argv else []) + argv
    with pytest.raises(MethodConfigError) as e:
        check(argv)
    assert str(e.value) == message


def test_head_shapes_are_refused_before_the_model_is_built(tmp_path, monkeypatch):
    def build(*a, **k):
        pytest.fail("the model was built before the bad head shape was reported")
    monkeypatch.setattr(open_clip, "create_model_and_transforms", build)
    with pytest.raises(SystemExit) as e:
        main(tiny_argv(tmp_path, "r", "--method", "clips", "--clips-decoder-heads", "3"))
    assert str(e.value).startswith("train.py: error: the decoder width 64 (--model ALIP-tiny's")
    assert "\n" not in str(e.value)


def test_head_shapes_that_fit_are_accepted():
    for argv in (["--method", "clips", "--clips-decoder-heads", "4"],
                 ["--method", "clips", "--clips-decoder-width", "96", "--clips-decoder-heads", "3"],
                 ["--method", "filip", "--filip-k-image", "16", "--filip-k-text", "77"],
                 ["--method", "slip", "--batch-size", "2"]):
        check(["--model", "ALIP-tiny", *argv])


def test_clips_queries_must_fit_the_models_caption_length():
    args = parse_args(["--method", "clips", "--clips-queries", "40"])
    with pytest.raises(MethodConfigError, match=r"^--clips-queries 40: --model ALIP-ViT-B-32's "
                                                r"captions hold at most 30 tokens \(context "
                                                r"length 32\); give at most 30$"):
        CLIPS.check_shapes(args, ModelDims(512, 8, 12, 32, 49))
    CLIPS.check_shapes(args, ModelDims())  # sizes not known (an hf-hub: model): left to __init__


def test_clips_decoder_shape_of_a_model_known_only_once_built_is_checked_in_init(monkeypatch):
    # an hf-hub:/local-dir: model has no local config (no sizes before it is built): the built
    # model's sizes are checked when the method is attached to it
    from alip.methods import base
    monkeypatch.setattr(base, "model_dims", lambda name: base.ModelDims())
    args = parse_args(["--method", "clips", "--model", "ALIP-tiny", "--clips-decoder-heads", "3"])
    method = CLIPS(args)  # nothing known yet: accepted
    with pytest.raises(MethodConfigError, match=r"^the decoder width 64 .* not a multiple of "
                                                r"--clips-decoder-heads 3"):
        method.attach(open_clip.create_model("ALIP-tiny"))
