"""Model configs and the trimmed text encoding."""
import json

import open_clip
import pytest
import torch
import torch.nn as nn

import alip  # noqa: F401  (registers the configs)
from alip.methods.alip import ALIPEncoder
from alip.model import CONFIG_DIR, encode_text

TEXTS = ["a red circle",
         "a big blue square on the left of a small green triangle under a yellow star",
         "hi",
         "web text " * 40]  # longer than 77 tokens: cut, EOT at position 76


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return open_clip.create_model("ALIP-tiny").eval()


def test_reference_vit_b32_config_matches_the_reference():
    cfg = json.loads((CONFIG_DIR / "ALIP-ViT-B-32.json").read_text())
    assert cfg["embed_dim"] == 512
    assert cfg["vision_cfg"] == {"image_size": 224, "layers": 12, "width": 768, "patch_size": 32}
    assert cfg["text_cfg"] == {"context_length": 77, "vocab_size": 49408, "width": 512,
                               "heads": 8, "layers": 12}
    assert "quick_gelu" not in cfg  # nn.GELU, as the reference


def test_configs_are_registered_and_build_with_gelu():
    assert {"ALIP-ViT-B-32", "ALIP-ViT-B-16", "ALIP-ViT-L-14", "ALIP-RN50", "ALIP-tiny",
            "ALIP-demo"} <= set(open_clip.list_models())
    model = open_clip.create_model("ALIP-tiny")
    acts = {type(m) for m in model.modules() if "GELU" in type(m).__name__}
    assert acts == {nn.GELU}


@pytest.mark.parametrize("texts", [TEXTS, TEXTS[:3], ["x"] * 3])
def test_trimmed_text_encoding_equals_full_77_token_encoding(tiny, texts):
    tokens = open_clip.get_tokenizer("ALIP-tiny")(texts)
    with torch.no_grad():
        full = tiny.encode_text(tokens, normalize=True)
        trimmed = encode_text(tiny, tokens)
    torch.testing.assert_close(trimmed, full, atol=1e-5, rtol=1e-5)


def test_trimmed_encoding_really_trims(tiny, monkeypatch):
    tokens = open_clip.get_tokenizer("ALIP-tiny")(TEXTS[:3])
    seen = []
    orig = tiny.transformer.forward
    monkeypatch.setattr(tiny.transformer, "forward",
                        lambda x, attn_mask=None: seen.append(x.shape[1]) or orig(x, attn_mask))
    encode_text(tiny, tokens, path="trim")
    assert seen == [int(tokens.argmax(-1).max()) + 1] and seen[0] < 77


def test_alip_encoder_joint_equals_separate_and_full(tiny):
    tok = open_clip.get_tokenizer("ALIP-tiny")
    batch = {"image": torch.randn(2, 3, 32, 32), "raw": tok(TEXTS[:2]),
             "caption": tok(["a red circle in the middle", "two shapes"])}
    with torch.no_grad():
        full = {"image": tiny.encode_image(batch["image"], normalize=True),
                "raw": tiny.encode_text(batch["raw"], normalize=True),
                "caption": tiny.encode_text(batch["caption"], normalize=True),
                "logit_scale": tiny.logit_scale.exp()}
        for mode, trim in (("joint", True), ("separate", True), ("separate", False)):
            got = ALIPEncoder(tiny, text_mode=mode, trim_text=trim)(batch)
            assert sorted(got) == sorted(full)
            for k in full:
                torch.testing.assert_close(got[k], full[k], atol=1e-5, rtol=1e-5)


def test_grad_checkpointing_is_a_switch_and_changes_no_gradient():
    tok = open_clip.get_tokenizer("ALIP-tiny")
    raw, cap = tok(TEXTS[:2]), tok(["a red circle", "two shapes"])
    images = torch.randn(2, 3, 32, 32)
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = open_clip.create_model("ALIP-tiny")
        model.set_grad_checkpointing(ckpt)
        assert model.transformer.grad_checkpointing is ckpt
        f = ALIPEncoder(model)({"image": images, "raw": raw, "caption": cap})
        (f["logit_scale"] * (f["image"] @ f["raw"].T + f["image"] @ f["caption"].T)).sum().backward()
        grads.append(model.transformer.resblocks[0].attn.in_proj_weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


def test_alip_encoder_rejects_unknown_text_mode(tiny):
    with pytest.raises(ValueError, match="text_mode"):
        ALIPEncoder(tiny, text_mode="both")


@pytest.mark.parametrize("packed", [False, True])
def test_auto_text_mode_is_one_joint_call_on_the_packed_path_else_two(tiny, monkeypatch, packed):
    from alip import model as m
    tok = open_clip.get_tokenizer("ALIP-tiny")
    raw, cap = tok(TEXTS), tok(["a red circle in the middle", "two shapes", "a star", "x"])
    calls, real = [], m.encode_text

    def spy(model, text, *a, **kw):
        calls.append(len(text))
        return real(model, text, *a, path="grouped", **kw)

    monkeypatch.setattr(m, "packed_supported", lambda tower, text: packed)
    monkeypatch.setattr(m, "encode_text", spy)
    tiny64 = tiny.double()
    try:
        with torch.no_grad():
            got = m.encode_text_pair(tiny64, raw, cap, "auto")
            want = tiny64.encode_text(raw, normalize=True), tiny64.encode_text(cap, normalize=True)
    finally:
        tiny.float()
    assert calls == ([8] if packed else [4, 4])
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-12, rtol=0)
