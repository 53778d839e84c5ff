"""Length-aware text encoding: length groups, the grouped and the packed paths against the
padded 77-token pass (features and gradients), batch order, autocast, checkpointing."""
import itertools

import open_clip
import pytest
import torch

import alip  # noqa: F401
from alip.model import (encode_text, length_groups, packed_supported, reference_varlen_attn,
                        text_lengths)

SOT, EOT = 49406, 49407


def tokens(lengths, seed=0):
    gen = torch.Generator().manual_seed(seed)
    rows = torch.zeros(len(lengths), 77, dtype=torch.long)
    for i, n in enumerate(lengths):
        rows[i, 0], rows[i, n - 1] = SOT, EOT
        rows[i, 1:n - 1] = torch.randint(1, 49000, (n - 2,), generator=gen)
    return rows


MIXED = [77, 5, 12, 3, 40, 12, 77, 7, 25, 60, 2, 16]  # 2 = SOT+EOT only; 77 = EOT at the end


def tiny_model(dtype=torch.float64, ckpt=False):
    torch.manual_seed(0)
    model = open_clip.create_model("ALIP-tiny").to(dtype)
    model.set_grad_checkpointing(ckpt)
    return model


def features_and_grads(model, text, **kw):
    """Features and d(sum of features x fixed weights)/d(text-tower params)."""
    model.zero_grad(set_to_none=True)
    f = encode_text(model, text, **kw) if kw.get("trim", True) else model.encode_text(text, normalize=True)
    w = torch.linspace(-1, 1, f.numel(), dtype=f.dtype).view_as(f)
    (f * w).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()
             if p.grad is not None and not n.startswith("visual")}
    return f.detach(), grads


def brute_force_cost(lengths, max_groups, pass_tokens):
    s = sorted(lengths)
    best = float("inf")
    for g in range(1, max_groups + 1):
        for cuts in itertools.combinations(range(1, len(s)), g - 1):
            bounds = (0, *cuts, len(s))
            best = min(best, sum(pass_tokens + (b - a) * s[b - 1] for a, b in zip(bounds, bounds[1:])))
    return best


@pytest.mark.parametrize("max_groups,pass_tokens", [(1, 0), (2, 0), (3, 0), (4, 0), (3, 20), (4, 1000)])
def test_length_groups_partition_the_batch_at_minimum_cost(max_groups, pass_tokens):
    lengths = [9, 3, 77, 3, 14, 30, 9, 2, 51, 14]
    groups = length_groups(lengths, max_groups, pass_tokens)
    rows = torch.cat([r for r, _ in groups])
    assert sorted(rows.tolist()) == list(range(len(lengths)))  # every row exactly once
    assert 1 <= len(groups) <= max_groups
    for r, n in groups:
        assert n == max(lengths[i] for i in r)
    assert [n for _, n in groups] == sorted(n for _, n in groups)
    cost = sum(pass_tokens + len(r) * n for r, n in groups)
    assert cost == brute_force_cost(lengths, max_groups, pass_tokens)


def test_length_groups_big_pass_cost_means_one_pass_and_ties_keep_fewer():
    assert len(length_groups([3, 77, 5, 60], 4, pass_tokens=10_000)) == 1
    assert len(length_groups([7, 7, 7, 7], 4)) == 1  # splitting equal lengths saves nothing


@pytest.mark.parametrize("path", ["grouped", "packed", "trim"])
@pytest.mark.parametrize("ckpt", [False, True])
def test_length_aware_paths_equal_the_padded_pass_with_gradients(path, ckpt):
    model = tiny_model(ckpt=ckpt)  # float64: differences are summation order only (~1e-15)
    text = tokens(MIXED)
    ref_f, ref_g = features_and_grads(model, text, trim=False)
    f, g = features_and_grads(model, text, path=path, max_groups=4, attn_fn=reference_varlen_attn)
    torch.testing.assert_close(f, ref_f, atol=1e-12, rtol=1e-10)
    assert g.keys() == ref_g.keys() and len(g) > 10
    for name in g:
        torch.testing.assert_close(g[name], ref_g[name], atol=1e-12, rtol=1e-10, msg=name)


def test_grouped_path_runs_each_group_to_its_own_longest_text(monkeypatch):
    model = tiny_model()
    text = tokens(MIXED)
    seen = []
    orig = model.transformer.forward
    monkeypatch.setattr(model.transformer, "forward",
                        lambda x, attn_mask=None: seen.append(tuple(x.shape[:2])) or orig(x, attn_mask))
    encode_text(model, text, path="grouped", max_groups=3)
    expected = [(len(r), n) for r, n in length_groups(text_lengths(text), 3)]
    assert seen == expected and len(seen) == 3
    assert sum(b * n for b, n in seen) < len(MIXED) * 77 / 2


def test_packed_path_computes_no_padding():
    model = tiny_model()
    text = tokens(MIXED)
    calls = []

    def attn(q, k, v, cu_q, cu_k, max_q, max_k, **kw):
        calls.append((q.shape[0], cu_q.tolist(), max_q, kw["window_size"]))
        return reference_varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, **kw)

    encode_text(model, text, path="packed", attn_fn=attn)
    ends = torch.tensor(MIXED).cumsum(0).tolist()
    assert calls == [(sum(MIXED), [0] + ends, 77, (-1, 0))] * 2  # 2 layers, causal


@pytest.mark.parametrize("path", ["grouped", "packed"])
def test_batch_order_and_composition_are_kept(path):
    model = tiny_model()
    text = tokens(MIXED)
    perm = torch.randperm(len(MIXED), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        f = encode_text(model, text, path=path, attn_fn=reference_varlen_attn)
        f_perm = encode_text(model, text[perm], path=path, attn_fn=reference_varlen_attn)
        alone = torch.cat([encode_text(model, text[i:i + 1], path="trim") for i in range(len(MIXED))])
    torch.testing.assert_close(f_perm, f[perm], atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(f, alone, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("path", ["grouped", "packed"])
def test_paths_run_under_bf16_autocast(path):
    model = tiny_model(torch.float32)
    text = tokens(MIXED)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = model.encode_text(text, normalize=True)
        f = encode_text(model, text, path=path, attn_fn=reference_varlen_attn)
    assert f.dtype == ref.dtype
    # both run the same bf16 ops on each row (rounding 2^-9 relative, a few dozen roundings
    # through 2 layers); unit vectors of width 64 agree to a few bf16 ulps
    torch.testing.assert_close(f.float(), ref.float(), atol=3e-2, rtol=0)
    f.float().sum().backward()
    assert model.transformer.resblocks[0].attn.in_proj_weight.grad is not None


def test_auto_path_is_grouped_on_cpu(monkeypatch):
    model = tiny_model()
    text = tokens(MIXED)
    from alip.model import _text_tower
    assert not packed_supported(_text_tower(model), text)
    seen = []
    orig = model.transformer.forward
    monkeypatch.setattr(model.transformer, "forward",
                        lambda x, attn_mask=None: seen.append(x.shape[1]) or orig(x, attn_mask))
    encode_text(model, text)
    assert len(seen) > 1 and max(seen) == 77 and min(seen) < 77


@pytest.mark.parametrize("change", ["pool_first", "no_causal_mask"])
def test_towers_where_skipping_padding_is_not_exact_keep_the_full_pass(change, monkeypatch):
    model = tiny_model()
    if change == "pool_first":
        model.text_pool_type = "first"
    else:
        model.attn_mask = None
    text = tokens(MIXED[:4])
    called = []
    monkeypatch.setattr(model, "encode_text", lambda t, normalize=False: called.append(t.shape) or
                        torch.zeros(len(t), 64, dtype=torch.float64))
    encode_text(model, text)
    assert called == [text.shape]


def test_unknown_path_is_an_error():
    with pytest.raises(ValueError, match="path"):
        encode_text(tiny_model(), tokens([3]), path="fast")


def test_a_torch_whose_varlen_attn_takes_is_causal_gets_an_adapter(monkeypatch):
    # torch 2.9's varlen_attn(..., is_causal=False); 2.10+ has window_size=(-1, 0) for causal
    import torch.nn.attention.varlen as varlen
    from alip import model as alip_model

    def old_varlen_attn(q, k, v, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
        window = (-1, 0) if is_causal else (-1, -1)
        return reference_varlen_attn(q, k, v, cu_seq_q, cu_seq_k, max_q, max_k, window_size=window)

    monkeypatch.setattr(varlen, "varlen_attn", old_varlen_attn)
    alip_model._varlen_attn_fn.cache_clear()
    try:
        fn = alip_model._varlen_attn_fn()
        q, k, v = torch.randn(3, 7, 2, 4, dtype=torch.float64).unbind(0)
        cu = torch.tensor([0, 3, 7], dtype=torch.int32)
        for window in ((-1, 0), (-1, -1)):
            torch.testing.assert_close(
                fn(q, k, v, cu, cu, 4, 4, window_size=window),
                reference_varlen_attn(q, k, v, cu, cu, 4, 4, window_size=window))
        with pytest.raises(ValueError, match="sliding window"):
            fn(q, k, v, cu, cu, 4, 4, window_size=(2, 0))
    finally:
        alip_model._varlen_attn_fn.cache_clear()
