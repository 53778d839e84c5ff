"""Text towers with a long context (``--text-context``): built at 256 by open_clip, the
length-aware paths exact at 256, Long-CLIP's stretch of a 77-position tower, the checkpoint's
context read back by eval and by plain open_clip, the truncation report, bad input."""
import json

import open_clip
import pytest
import torch

import alip  # noqa: F401
from alip.eval.truncation import truncation_report
from alip.long_context import (ContextError, create_model_and_transforms, file_context,
                               stretch_positions)
from alip.model import encode_text, encode_text_pair, reference_varlen_attn
from test_train_helpers import run_single, tiny_argv

SOT, EOT = 49406, 49407
LONG = [60, 200, 97, 143, 100, 61, 188, 99, 120, 75, 160, 101]  # 60-200, median ~100


def tokens(lengths, width, seed=0):
    gen = torch.Generator().manual_seed(seed)
    rows = torch.zeros(len(lengths), width, dtype=torch.long)
    for i, n in enumerate(lengths):
        rows[i, 0], rows[i, n - 1] = SOT, EOT
        rows[i, 1:n - 1] = torch.randint(1, 49000, (n - 2,), generator=gen)
    return rows


def tiny(context=256, dtype=torch.float64):
    torch.manual_seed(0)
    model, _, _ = create_model_and_transforms("ALIP-tiny", force_context_length=context)
    return model.to(dtype)


def features_and_grads(model, text, **kw):
    model.zero_grad(set_to_none=True)
    f = encode_text(model, text, **kw)
    w = torch.linspace(-1, 1, f.numel(), dtype=f.dtype).view_as(f)
    (f * w).sum().backward()
    return f.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                        if p.grad is not None and not n.startswith("visual")}


# ---- the tower at 256 ------------------------------------------------------------------------

def test_a_256_context_tower_is_built_by_open_clip():
    model = tiny()
    assert model.context_length == 256
    assert model.positional_embedding.shape == (256, 64)
    mask = model.attn_mask
    assert mask.shape == (256, 256)
    assert torch.equal(mask, torch.full((256, 256), float("-inf")).triu(1))  # causal
    assert model.text_pool_type == "argmax"


@pytest.mark.parametrize("path", ["grouped", "packed", "trim"])
def test_length_aware_paths_at_256_equal_the_padded_256_pass(path):
    model = tiny()  # float64: the paths differ from the padded pass in summation order only
    text = tokens(LONG, 256)
    ref_f, ref_g = features_and_grads(model, text, trim=False)
    f, g = features_and_grads(model, text, path=path, max_groups=4, attn_fn=reference_varlen_attn)
    torch.testing.assert_close(f, ref_f, atol=1e-12, rtol=1e-10)
    assert g.keys() == ref_g.keys() and "positional_embedding" in g and len(g) > 10
    for name in g:
        torch.testing.assert_close(g[name], ref_g[name], atol=1e-12, rtol=1e-10, msg=name)
    # the padded pass trains position 199 (the longest text's EOT) and nothing past it
    assert ref_g["positional_embedding"][199].abs().sum() > 0
    assert ref_g["positional_embedding"][200:].abs().sum() == 0


def test_packed_path_at_256_packs_by_length_with_positions_from_0():
    model = tiny()
    calls = []

    def attn(q, k, v, cu_q, cu_k, max_q, max_k, **kw):
        calls.append((q.shape[0], cu_q.tolist(), max_q))
        return reference_varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, **kw)

    with torch.no_grad():
        encode_text(model, tokens(LONG, 256), path="packed", attn_fn=attn)
    ends = torch.tensor(LONG).cumsum(0).tolist()
    assert calls == [(sum(LONG), [0] + ends, 200)] * 2


@pytest.mark.parametrize("path", ["grouped", "packed", "full"])
def test_rows_narrower_than_the_context_are_exact(path):
    """A [B, 77] raw-text batch in a 256-position tower == the same rows tokenized at 256."""
    model = tiny()
    short = tokens([5, 77, 12, 40], 77)
    wide = torch.nn.functional.pad(short, (0, 256 - 77))
    kw = {"trim": False} if path == "full" else {"path": path, "attn_fn": reference_varlen_attn}
    with torch.no_grad():
        ref = model.encode_text(wide, normalize=True)
        torch.testing.assert_close(encode_text(model, short, **kw), ref, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("mode", ["joint", "separate"])
def test_raw_text_at_77_and_captions_at_256_share_the_tower(mode):
    model = tiny()
    raw, cap = tokens([5, 77, 12, 30], 77, seed=1), tokens([60, 200, 100, 150], 256, seed=2)
    with torch.no_grad():
        r, c = encode_text_pair(model, raw, cap, text_mode=mode)
        torch.testing.assert_close(r, model.encode_text(torch.nn.functional.pad(raw, (0, 179)),
                                                        normalize=True), atol=1e-12, rtol=1e-10)
        torch.testing.assert_close(c, model.encode_text(cap, normalize=True), atol=1e-12, rtol=1e-10)


def test_rows_wider_than_the_context_are_refused():
    with pytest.raises(ValueError, match=r"^--text-context 77: .* 256 tokens wide"):
        encode_text(tiny(77), tokens([100], 256))


# ---- Long-CLIP's stretch ---------------------------------------------------------------------

def long_clip_replica(pre):
    """beichenzbc/Long-CLIP @ 3966af9a model/longclip.py:232-246, as written there."""
    length, dim = pre.shape
    keep_len = 20
    new = torch.zeros([4 * length - 3 * keep_len, dim], dtype=pre.dtype)
    for i in range(keep_len):
        new[i] = pre[i]
    for i in range(length - 1 - keep_len):
        new[4 * i + keep_len] = pre[i + keep_len]
        new[4 * i + 1 + keep_len] = 3 * pre[i + keep_len] / 4 + 1 * pre[i + 1 + keep_len] / 4
        new[4 * i + 2 + keep_len] = 2 * pre[i + keep_len] / 4 + 2 * pre[i + 1 + keep_len] / 4
        new[4 * i + 3 + keep_len] = 1 * pre[i + keep_len] / 4 + 3 * pre[i + 1 + keep_len] / 4
    for j in range(4):
        new[4 * length - 3 * keep_len - 4 + j] = pre[length - 1] + j * (pre[length - 1] - pre[length - 2]) / 4
    return new


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_stretch_to_248_is_long_clips_table_bit_for_bit(dtype):
    pre = torch.randn(77, 16, generator=torch.Generator().manual_seed(0)).to(dtype)
    out = stretch_positions(pre, 248)
    assert out.shape == (248, 16) and out.dtype == dtype
    assert torch.equal(out, long_clip_replica(pre))
    assert torch.equal(out[:20], pre[:20])


@pytest.mark.parametrize("context", [78, 96, 248, 256, 512])
def test_stretch_to_any_context_keeps_20_and_interpolates_linearly(context):
    """On a linear table (row i = i) every stretched row is its source position
    s = 20 + (p - 20)(77 - 20)/(context - 20), interpolated and past 76 extrapolated."""
    pre = torch.arange(77, dtype=torch.float64)[:, None] * torch.tensor([[1.0, -3.0]])
    out = stretch_positions(pre, context)
    p = torch.arange(context, dtype=torch.float64)
    s = torch.where(p < 20, p, 20 + (p - 20) * 57 / (context - 20))
    torch.testing.assert_close(out, s[:, None] * torch.tensor([[1.0, -3.0]]), atol=1e-12, rtol=0)
    pre = torch.randn(77, 4, dtype=torch.float64)
    assert torch.equal(stretch_positions(pre, context)[:20], pre[:20])


def test_stretching_pretrained_weights_and_refusing_to_shrink(tmp_path):
    src = tiny(77, torch.float32)
    path = tmp_path / "w77.pt"
    torch.save(src.state_dict(), path)
    model, _, _ = create_model_and_transforms("ALIP-tiny", pretrained=str(path),
                                              force_context_length=256)
    assert model.context_length == 256 and model.attn_mask.shape == (256, 256)
    assert torch.equal(model.positional_embedding,
                       stretch_positions(src.positional_embedding.detach(), 256))
    for k, v in src.state_dict().items():
        if k != "positional_embedding":
            assert torch.equal(model.state_dict()[k], v), k
    path256 = tmp_path / "w256.pt"
    torch.save({"state_dict": model.state_dict()}, path256)
    assert file_context(str(path256)) == 256 and file_context(str(path)) == 77
    again, _, _ = create_model_and_transforms("ALIP-tiny", pretrained=str(path256),
                                              force_context_length=256)  # not through 77
    assert torch.equal(again.positional_embedding, model.positional_embedding)
    with pytest.raises(ContextError, match=r"^--text-context 77: .*256-position.*shrinking"):
        create_model_and_transforms("ALIP-tiny", pretrained=str(path256), force_context_length=77)
    with pytest.raises(ContextError, match=r"^--text-context 100: "):
        stretch_positions(model.positional_embedding.detach(), 100)  # 256 -> 100


# ---- flags, checkpoints, evaluation --------------------------------------------------------

@pytest.mark.parametrize("value", ["0", "1", "-5"])
def test_text_context_below_two_is_refused_naming_the_flag(value, tmp_path):
    from alip.training.params import parse_args
    with pytest.raises(SystemExit, match=r"^train.py: error: --text-context "):
        parse_args(tiny_argv(tmp_path, "x", "--text-context", value))


def test_methods_ask_open_clip_for_the_context(tmp_path):
    from alip.methods import get_method
    from alip.training.params import parse_args
    args = parse_args(tiny_argv(tmp_path, "x", "--text-context", "256", "--method", "siglip"))
    kw = get_method("siglip")(args).model_kwargs()
    assert kw["force_context_length"] == 256 and kw["init_logit_bias"] == -10.0
    args = parse_args(tiny_argv(tmp_path, "y", "--method", "clip"))
    assert get_method("clip")(args).model_kwargs() == {}


def test_a_256_checkpoint_loads_in_eval_and_in_plain_open_clip(tmp_path):
    run_single(tiny_argv(tmp_path, "long", "--text-context", "256", "--method", "alip",
                         samples=16, batch=8))
    ckpt = tmp_path / "long" / "checkpoints" / "epoch_1.pt"
    saved = torch.load(ckpt, weights_only=True)
    assert saved["model_kwargs"] == {"force_context_length": 256}
    assert saved["state_dict"]["positional_embedding"].shape == (256, 64)
    from alip.eval.load import load_model
    model, _, tokenizer = load_model(checkpoint=str(ckpt))
    assert model.context_length == 256 and tokenizer("a cat").shape == (1, 256)
    plain = open_clip.create_model("ALIP-tiny", pretrained=str(ckpt), force_context_length=256)
    for k, v in plain.state_dict().items():
        assert torch.equal(v, model.state_dict()[k]), k
    assert open_clip.get_tokenizer("ALIP-tiny", context_length=256)("a cat").shape == (1, 256)


def test_truncation_report_counts_the_tokens_lost():
    tok = open_clip.get_tokenizer("ALIP-tiny", context_length=8)
    texts = ["a cat", "one two three four five six seven eight", "a b c d e f"]
    # rows [SOT, words..., EOT]: 4, 10 and 8 ids; only the second exceeds 8, by 2
    assert [len(tok.encode(t)) for t in texts] == [2, 8, 6]
    assert truncation_report(tok, texts, 8) == {"context": 8, "texts": 3, "truncated_texts": 1,
                                                "tokens_lost": 2, "longest": 10}
    row = tok([texts[1]])[0].tolist()
    assert row[-1] == EOT and row[1:7] == tok.encode(texts[1])[:6]  # 6 of 8 words kept


def test_retrieval_says_it_truncates(tmp_path, caplog):
    from PIL import Image
    from alip.eval.retrieval import evaluate_retrieval
    (tmp_path / "img").mkdir()
    for i in range(2):
        Image.new("RGB", (32, 32), (i * 100, 0, 0)).save(tmp_path / "img" / f"{i}.jpg")
    long_text = " ".join(["word"] * 100)  # 100 BPE tokens: 102 ids, 25 past 77
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps([{"image": "0.jpg", "caption": [long_text, "a cat"]},
                               {"image": "1.jpg", "caption": ["a dog"]}]))
    model = tiny(77, torch.float32).eval()
    _, _, preprocess = open_clip.create_model_and_transforms("ALIP-tiny")
    details = {}
    evaluate_retrieval(model, preprocess, open_clip.get_tokenizer("ALIP-tiny"), str(ann),
                       str(tmp_path / "img"), batch_size=2, details=details)
    assert details["truncation"] == {"context": 77, "texts": 3, "truncated_texts": 1,
                                     "tokens_lost": 25, "longest": 102}
    assert "1 of 3 captions are longer than the model's 77-token context" in caplog.text
    long_model = tiny(256, torch.float32).eval()
    evaluate_retrieval(long_model, preprocess, open_clip.get_tokenizer("ALIP-tiny", context_length=256),
                       str(ann), str(tmp_path / "img"), batch_size=2, details=details)
    assert details["truncation"]["truncated_texts"] == 0


def test_token_wise_methods_take_rows_narrower_than_the_context():
    """FILIP's / DeCLIP's all-position text pass on [B, 77] rows in a 256 tower: the tokens of
    the rows padded to 256, cut back to 77."""
    from alip.methods.declip import text_tokens_and_features
    from alip.methods.filip import dense_text_tokens
    model = tiny()
    short = tokens([5, 77, 12], 77)
    wide = torch.nn.functional.pad(short, (0, 179))
    with torch.no_grad():
        t, m, f = dense_text_tokens(model, short)
        tw, mw, fw = dense_text_tokens(model, wide)
        assert t.shape == (3, 77, 64) and torch.equal(m, mw[:, :77]) and not mw[:, 77:].any()
        torch.testing.assert_close(t, tw[:, :77], atol=1e-12, rtol=1e-10)
        torch.testing.assert_close(f, fw, atol=1e-12, rtol=1e-10)
        t, f = text_tokens_and_features(model, short)
        tw, fw = text_tokens_and_features(model, wide)
        torch.testing.assert_close(t, tw[:, :77], atol=1e-12, rtol=1e-10)
        torch.testing.assert_close(f, fw, atol=1e-12, rtol=1e-10)


def test_head_shapes_are_checked_against_the_built_context(tmp_path):
    from alip.methods import MethodConfigError, get_method
    from alip.training.params import parse_args
    args = parse_args(tiny_argv(tmp_path, "x", "--method", "filip", "--filip-k-text", "100"))
    with pytest.raises(MethodConfigError, match=r"^--filip-k-text 100: .* 77 text positions"):
        get_method("filip")(args)
    args = parse_args(tiny_argv(tmp_path, "y", "--method", "filip", "--filip-k-text", "100",
                                "--text-context", "256"))
    get_method("filip")(args)  # 100 of 256 positions


def test_data_fields_wider_than_the_context_are_refused(tmp_path):
    from alip.long_context import check_field_widths
    from alip.training.loop import TrainConfigError
    from alip.training.synthetic import SyntheticLoader
    check_field_widths({"raw": 77, "caption": 256}, 256)
    check_field_widths(None, 77)
    with pytest.raises(ContextError, match=r"^--text-context 77: the data's 'caption' field is "
                                           r"256 tokens wide; give --text-context >= 256$"):
        check_field_widths({"raw": 77, "caption": 256}, 77)

    def loader_with_widths(cfg, info, image_size, spec):
        loader = SyntheticLoader(cfg.train_num_samples, cfg.batch_size, image_size, spec=spec)
        loader.text_widths = {"raw": 77, "caption": 256}
        return loader

    from alip.training.loop import run
    from alip.training.params import parse_args
    with pytest.raises(TrainConfigError, match=r"^--text-context 77: .*'caption'"):
        run(parse_args(tiny_argv(tmp_path, "w", "--text-context", "77")),
            make_loader=loader_with_widths)


def test_text_context_is_a_yaml_key(tmp_path):
    from alip.training.params import parse_args
    cfg = tmp_path / "c.yaml"
    cfg.write_text("text-context: 256\n")
    assert parse_args(["--config", str(cfg), *tiny_argv(tmp_path, "x")]).text_context == 256
    cfg.write_text("text_context: 0\n")
    with pytest.raises(SystemExit, match=r"text_context"):
        parse_args(["--config", str(cfg), *tiny_argv(tmp_path, "x")])
