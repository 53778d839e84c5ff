"""open_clip_train's tower locks in train.py (--lock-image, --lock-image-unlocked-groups,
--lock-image-freeze-bn-stats, --lock-text, --lock-text-unlocked-layers,
--lock-text-freeze-layer-norm): what stays trainable is exactly what the open_clip model's own
lock_image_tower / lock_text_tower leave trainable, locked parameters keep their values and are
in neither the optimizer nor DDP, the flags are checked early, recorded, and fixed on resume."""
import argparse
import logging
import re

import open_clip
import pytest
import torch
import torch.multiprocessing as mp
import yaml

from alip.training import loop
from alip.training.config import TrainConfigError
from alip.training.locks import lock_towers
from alip.training.params import parse_args, resume_conflicts
from test_train_helpers import free_port, gloo_worker, read_results, run_single, tiny_argv

FREEZE_LN = "--lock-text-freeze-layer-norm"


def _spy_optimizer(monkeypatch):
    """Records the encoder, its parameters as they were when the optimizer was built (after
    the lock and the method's own init), and the optimizer."""
    seen = {}
    build = loop.build_optimizer

    def spy(encoder, *a, **kw):
        seen["encoder"] = encoder
        seen["init"] = {id(p): p.detach().clone() for p in encoder.parameters()}
        seen["optimizer"] = build(encoder, *a, **kw)
        return seen["optimizer"]

    monkeypatch.setattr(loop, "build_optimizer", spy)
    return seen


def _clip_of(encoder):
    return next(m for m in encoder.modules() if isinstance(m, (open_clip.CLIP,
                                                                open_clip.CustomTextCLIP)))


def _open_clips_own_lock(model_name, image=None, text=None):
    """Names of the parameters open_clip's own locks freeze on a fresh model."""
    model = open_clip.create_model(model_name)
    if image is not None:
        model.lock_image_tower(unlocked_groups=image, freeze_bn_stats=False)
    if text is not None:
        model.lock_text_tower(unlocked_layers=text, freeze_layer_norm=True)
    return {n for n, p in model.named_parameters() if not p.requires_grad}


CASES = [  # method, model, lock flags, (image unlocked groups, text unlocked layers) or None
    ("clip", "ALIP-tiny", ["--lock-image"], (0, None)),
    ("alip", "ALIP-tiny", ["--lock-text", FREEZE_LN], (None, 0)),
    ("clip", "ALIP-tiny", ["--lock-image", "--lock-image-unlocked-groups", "2", "--lock-text",
                           FREEZE_LN, "--lock-text-unlocked-layers", "1", "--grad-checkpointing"],
     (2, 1)),
    ("declip", "DeCLIP-tiny", ["--lock-text", FREEZE_LN], (None, 0)),
    ("filip", "DeCLIP-tiny", ["--lock-image", "--lock-image-unlocked-groups", "1"], (1, None)),
]


@pytest.mark.parametrize("method,model,flags,unlocked", CASES,
                         ids=[f"{c[0]} {' '.join(c[2])}" for c in CASES])
def test_locked_parameters_keep_their_values_and_stay_out_of_the_optimizer(
        tmp_path, monkeypatch, method, model, flags, unlocked):
    seen = _spy_optimizer(monkeypatch)
    out = run_single(tiny_argv(tmp_path, "r", "--method", method, "--model", model,
                               "--lr", "5e-3", "--max-steps", "3", *flags))
    assert out["step"] == 3 and out["nonfinite_total"] == 0
    encoder, clip = seen["encoder"], _clip_of(seen["encoder"])
    locked = {n for n, p in clip.named_parameters() if not p.requires_grad}
    expected = _open_clips_own_lock(model, *unlocked)
    if method in ("declip", "filip"):  # the toolbox ViT's own frozen patch embedding
        expected.add("visual.conv1.weight")
    assert locked == expected and len(locked) > 1
    prefix = next(k for k, m in encoder.named_modules() if m is clip) + "."
    assert all(p.requires_grad for n, p in encoder.named_parameters() if not n.startswith(prefix))
    in_optimizer = {id(p) for g in seen["optimizer"].param_groups for p in g["params"]}
    assert in_optimizer == {id(p) for p in encoder.parameters() if p.requires_grad}
    for name, p in clip.named_parameters():
        before = seen["init"][id(p)]
        if name in locked:
            assert torch.equal(p.detach(), before) and p.grad is None, f"locked {name} changed"
        elif p.grad is not None:  # FILIP's loss leaves logit_scale, ln_post, proj unused
            assert not torch.equal(p.detach(), before), f"trainable {name} did not change"
    config = yaml.safe_load((tmp_path / "r" / "config.yaml").read_text())
    args = parse_args(tiny_argv(tmp_path, "r", *flags))
    for key in ("lock_image", "lock_image_unlocked_groups", "lock_image_freeze_bn_stats",
                "lock_text", "lock_text_unlocked_layers", "lock_text_freeze_layer_norm"):
        assert config[key] == getattr(args, key), key


def test_locked_towers_train_under_two_gloo_processes(tmp_path):
    # DDP without find_unused_parameters (CLIP, ALIP) fails at the second step if a parameter
    # it registered gets no gradient: locked parameters must not be registered
    argvs = [tiny_argv(tmp_path, name, "--method", method, "--model", model, "--max-steps", "3",
                       *flags, samples=64, batch=4)
             for name, method, model, flags in [
                 ("alip", "alip", "ALIP-tiny", ["--lock-text", FREEZE_LN]),
                 ("clip", "clip", "ALIP-tiny", ["--lock-image", "--lock-image-unlocked-groups",
                                                "2"]),
                 ("declip", "declip", "DeCLIP-tiny", ["--lock-text", FREEZE_LN])]]
    mp.spawn(gloo_worker, nprocs=2, join=True, args=(2, free_port(3), argvs))
    for name in ("alip", "clip", "declip"):
        rows = read_results(tmp_path / name)
        assert [r["step"] for r in rows] == [1, 2, 3] and not any(r["skipped"] for r in rows)


# ---------------------------------------------------------------------------------------------
# early errors


QUALIFIERS_ALONE = [
    (["--lock-image-unlocked-groups", "2"],
     "--lock-image-unlocked-groups 2 has no effect without --lock-image; add --lock-image or "
     "drop it"),
    (["--lock-image-freeze-bn-stats"],
     "--lock-image-freeze-bn-stats has no effect without --lock-image; add --lock-image or drop "
     "it"),
    (["--lock-text-unlocked-layers", "1", "--lock-image"],
     "--lock-text-unlocked-layers 1 has no effect without --lock-text; add --lock-text or drop it"),
    ([FREEZE_LN],
     "--lock-text-freeze-layer-norm has no effect without --lock-text; add --lock-text or drop it"),
    (["--lock-image", "--lock-image-unlocked-groups", "-1"],
     "--lock-image-unlocked-groups must be >= 0, got -1"),
    (["--lock-text", "--lock-text-unlocked-layers", "-2"],
     "--lock-text-unlocked-layers must be >= 0, got -2"),
]


@pytest.mark.parametrize("extra,message", QUALIFIERS_ALONE,
                         ids=[" ".join(a) for a, _ in QUALIFIERS_ALONE])
def test_a_lock_qualifier_without_its_lock_or_out_of_range_is_one_line(tmp_path, extra, message):
    # open_clip_train ignores a qualifier without its lock silently
    with pytest.raises(SystemExit) as e:
        parse_args(tiny_argv(tmp_path, "r") + extra)
    assert str(e.value) == f"train.py: error: {message}"


def test_a_lock_qualifier_without_its_lock_in_the_config_file_is_refused(tmp_path):
    (tmp_path / "c.yaml").write_text("lock-text-unlocked-layers: 1\n")
    with pytest.raises(SystemExit, match=r"^train.py: error: --lock-text-unlocked-layers 1 has "
                                         r"no effect without --lock-text"):
        parse_args(tiny_argv(tmp_path, "r") + ["--config", str(tmp_path / "c.yaml")])
    (tmp_path / "c.yaml").write_text("lock-text: true\nlock_text_unlocked_layers: 1\n")
    args = parse_args(tiny_argv(tmp_path, "r") + ["--config", str(tmp_path / "c.yaml")])
    assert args.lock_text and args.lock_text_unlocked_layers == 1


def test_lock_text_on_open_clips_own_text_tower_needs_freeze_layer_norm(tmp_path):
    # open_clip_train: AssertionError 'Unfreezing LayerNorm is not supported' from the model
    with pytest.raises(TrainConfigError, match=r"^--lock-text: --model ALIP-tiny's text tower "
                                               r"\(Transformer\) locks its LayerNorms with the "
                                               r"other weights .*; add --lock-text-freeze-layer-"
                                               r"norm$"):
        run_single(tiny_argv(tmp_path, "r", "--lock-text"))


def test_unlocked_groups_that_lock_nothing_are_refused(tmp_path):
    # ALIP-tiny's ViT has 4 groups (embeddings, block 0, block 1 + ln_post, proj)
    with pytest.raises(TrainConfigError, match=r"^--lock-image --lock-image-unlocked-groups 4: "
                                               r"locks nothing"):
        run_single(tiny_argv(tmp_path, "r", "--lock-image", "--lock-image-unlocked-groups", "4"))
    with pytest.raises(TrainConfigError, match=r"^--lock-text --lock-text-unlocked-layers 9: "
                                               r"locks nothing"):
        run_single(tiny_argv(tmp_path, "s", "--lock-text", FREEZE_LN,
                             "--lock-text-unlocked-layers", "9"))


def test_a_tower_without_a_lock_method_is_one_line(tmp_path, monkeypatch):
    monkeypatch.delattr(open_clip.transformer.VisionTransformer, "lock")
    with pytest.raises(TrainConfigError, match=r"^--lock-image: --model ALIP-tiny's image tower "
                                               r"\(VisionTransformer\) has no lock method"):
        run_single(tiny_argv(tmp_path, "r", "--lock-image"))


def _lock_args(**kw):
    args = dict(model="tiny", pretrained=None, lock_image=False, lock_image_unlocked_groups=0,
                lock_image_freeze_bn_stats=False, lock_text=False, lock_text_unlocked_layers=0,
                lock_text_freeze_layer_norm=False)
    return argparse.Namespace(**{**args, **kw})


TINY_TEXT = dict(context_length=16, vocab_size=100, width=32, heads=2, layers=2)


def test_a_resnet_image_tower_locks_whole_with_frozen_bn_stats_but_refuses_partial_locks():
    from torchvision.ops.misc import FrozenBatchNorm2d
    rn = dict(image_size=32, layers=[1, 1, 1, 1], width=8)
    log = logging.getLogger("test")
    model = open_clip.CLIP(32, rn, TINY_TEXT)
    with pytest.raises(TrainConfigError, match=r"^--lock-image --lock-image-unlocked-groups 1: "
                                               r"--model tiny's image tower \(ModifiedResNet\) "
                                               r"refuses: partial locking not currently supported"):
        lock_towers(model, _lock_args(lock_image=True, lock_image_unlocked_groups=1), log)
    lock_towers(model, _lock_args(lock_image=True, lock_image_freeze_bn_stats=True), log)
    assert not any(p.requires_grad for p in model.visual.parameters())
    assert any(isinstance(m, FrozenBatchNorm2d) for m in model.visual.modules())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.visual.modules())


def test_an_hf_text_tower_locks_and_may_keep_its_layer_norms_trainable():
    transformers = pytest.importorskip("transformers")
    from open_clip.hf_model import HFTextEncoder

    def model(arch="roberta"):  # a tiny HF text tower built from its config: no download
        m = open_clip.CustomTextCLIP(32, dict(image_size=32, layers=1, width=32, patch_size=8,
                                              head_width=16), TINY_TEXT)
        config = getattr(transformers, f"{arch.capitalize()}Config")(
            vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=64, max_position_embeddings=20)
        m.text = HFTextEncoder(arch, 32, config=config, pooler_type="mean_pooler",
                               proj_type="linear")
        return m

    log = logging.getLogger("test")
    for freeze in (False, True):
        m = model()
        lock_towers(m, _lock_args(lock_text=True, lock_text_freeze_layer_norm=freeze), log)
        trainable = {n for n, p in m.text.transformer.named_parameters() if p.requires_grad}
        norms = {n for n, _ in m.text.transformer.named_parameters() if ".LayerNorm." in n}
        assert trainable == (set() if freeze else norms) and norms
        assert m.text.proj.weight.requires_grad  # open_clip's HF lock leaves the projection
    m = model()
    lock_towers(m, _lock_args(lock_text=True, lock_text_unlocked_layers=1,
                              lock_text_freeze_layer_norm=True), log)
    trainable = {n for n, p in m.text.transformer.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("encoder.layer.1.", "pooler.")) for n in trainable)
    # open_clip's arch table has no layer names for BERT: its partial lock raises KeyError
    with pytest.raises(TrainConfigError, match=r"^--lock-text --lock-text-unlocked-layers 1: "
                                               r"--model tiny's text tower \(HFTextEncoder\) "
                                               r"refuses: KeyError 'layer_attr'$"):
        lock_towers(model("bert"), _lock_args(lock_text=True, lock_text_unlocked_layers=1,
                                              lock_text_freeze_layer_norm=True), log)


# ---------------------------------------------------------------------------------------------
# resume


@pytest.mark.parametrize("first,then,key", [
    ([], ["--lock-image"], "lock_image (checkpoint False, now True)"),
    (["--lock-text", FREEZE_LN], [], "lock_text (checkpoint True, now False)"),
    (["--lock-image"], ["--lock-image", "--lock-image-unlocked-groups", "1"],
     "lock_image_unlocked_groups (checkpoint 0, now 1)"),
])
def test_resume_refuses_a_changed_lock_flag(tmp_path, first, then, key):
    argv = lambda *x: tiny_argv(tmp_path, "r", *x, samples=32, batch=8, epochs=2)  # noqa: E731
    run_single(argv("--max-steps", "2", *first))
    config = (tmp_path / "r" / "config.yaml").read_text()
    with pytest.raises(TrainConfigError, match=f"depend on {re.escape(key)}"):
        run_single(argv("--resume", "latest", *then))
    assert (tmp_path / "r" / "config.yaml").read_text() == config
    out = run_single(argv("--resume", "latest", "--max-steps", "3", *first))  # same flags: fine
    assert out["step"] == 3


def test_a_checkpoint_from_before_the_lock_flags_resumes_only_unlocked(tmp_path):
    old = {"lr": 1e-3}  # a config without any lock_* key
    assert resume_conflicts(old, parse_args(tiny_argv(tmp_path, "r"))) == []
    assert resume_conflicts(old, parse_args(tiny_argv(tmp_path, "r", "--lock-image"))) == \
        ["lock_image (checkpoint False, now True)"]
