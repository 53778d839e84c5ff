"""The method plug-ins: registry, contract, and each method's loss = its terms as specified
(the terms themselves are checked against hand computations in test_{slip,declip}_terms.py)."""
import collections
import math

import open_clip
import pytest
import torch
import torch.nn.functional as F

import alip  # noqa: F401
from alip.methods import METHODS, MethodConfigError, get_method
from alip.methods.base import toolbox_vit, weights_given
from alip.methods.declip import (capped_scale, clip_info_nce, declip_total, mlm_loss, nn_loss,
                                 simsiam_loss)
from alip.methods.slip import simclr_loss
from alip.training.distributed import DistInfo
from alip.training.params import parse_args
from alip.training.step import StepContext, train_step

# The tiny model each registered method trains in these tests: ALIP-tiny unless the method needs
# the mask token of the DeCLIP vocabulary. Tests run over the registry (METHODS), so a method is
# tested by being registered.
MODELS = collections.defaultdict(lambda: "ALIP-tiny", declip="DeCLIP-tiny", defilip="DeCLIP-tiny")


def small_flags(name):
    """A memory bank of 32 for the methods that read --declip-bank-size (4096 by default)."""
    return ["--declip-bank-size", "32"] if "declip_bank_size" in get_method(name).flags_read() \
        else []
TEXTS = ["a red circle on a white background", "two blue squares", "a star", "three green crosses",
         "a small yellow diamond at the top", "a cat", "circle", "a large black triangle"]


def build(name, *flags):
    args = parse_args(["--method", name, "--model", MODELS[name], *small_flags(name), *flags])
    method = get_method(name)(args)
    torch.manual_seed(0)
    return method.attach(open_clip.create_model(MODELS[name], **method.model_kwargs())), args


def model_kwargs_of(name):
    """The model arguments the method asks for with its default flags (SigLIP's bias)."""
    args = parse_args(["--method", name, "--model", MODELS[name], *small_flags(name)])
    return get_method(name)(args).model_kwargs()


def batch_for(spec, n=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    tokens = open_clip.get_tokenizer("ALIP-tiny")(TEXTS[:n])
    b = {v.name: torch.randn(n, 3, 32, 32, generator=gen) for v in spec.image_views}
    b.update({f: tokens.clone() for f in spec.text_fields})
    b.update({v.name: tokens.flip(0) for v in spec.text_views})  # another text view
    return b


def test_registry_and_flags():
    for name in METHODS:
        cls = get_method(name)
        assert cls.name == name
        assert parse_args(["--method", name]).method == name
    with pytest.raises(MethodConfigError, match="unknown method 'nope'"):
        get_method("nope")


@pytest.mark.parametrize("name", sorted(METHODS))
def test_contract_one_step_trains_every_trainable_parameter(name):
    method, args = build(name)
    spec = method.data
    opt = torch.optim.SGD(method.encoder.parameters(), lr=0.1)
    ctx = StepContext(model=method.encoder, criterion=method.criterion, optimizer=opt,
                      info=DistInfo(0, 0, 1, False, torch.device("cpu")), accum_mode="micro",
                      after_step=method.after_step)
    before = {k: v.clone() for k, v in method.encoder.state_dict().items()}
    metrics = train_step(ctx, [batch_for(spec)]).metrics()
    assert metrics is not None and "loss" in metrics and "grad_norm" in metrics
    moved = {k for k, p in method.encoder.named_parameters() if not torch.equal(p, before[k])}
    # every trainable parameter takes part (a bias right before a BatchNorm gets an exactly zero
    # gradient, so "has a gradient" rather than "moved")
    outside = ({"model.visual.ln_post", "model.visual.proj", "model.text_projection",
                "model.logit_scale"} if name == "filip" else
               {"model.visual.ln_post", "model.visual.proj"} if name == "defilip" else
               {"model.text_projection"} if name == "clips" else set())
    for k, p in method.encoder.named_parameters():  # FILIP's dense loss leaves the global heads
        assert (p.grad is not None) or any(k.startswith(o) for o in outside) \
            or not p.requires_grad, k
    # the DeCLIP toolbox's methods keep the ViT patch embedding frozen (test below)
    frozen = {"model.visual.conv1.weight"} if name in TOOLBOX_VIT else set()
    assert {k for k, p in method.encoder.named_parameters() if not p.requires_grad} == frozen
    assert ({"model.visual.conv1.weight", "model.transformer.resblocks.0.attn.in_proj_weight",
             } - frozen) <= moved
    assert not frozen & moved
    heads = {k for k in dict(method.encoder.named_parameters()) if not k.startswith("model.")}
    assert {k for k in heads if "bias" not in k} <= moved
    # the heads' state travels with the training state, and loads back
    state = method.heads_state_dict()
    assert all(not k.startswith("model.") for k in state)
    method.load_heads_state_dict(state)


TOOLBOX_VIT = ("slip", "declip", "filip", "defilip")  # trained by the DeCLIP toolbox's ViT


@pytest.mark.parametrize("name", sorted(METHODS))
def test_toolbox_methods_freeze_the_vit_patch_embedding(name):
    """Sense-GVT/DeCLIP's VisualTransformer sets ``freeze_conv1 = True`` and its ``train()``
    turns off conv1's gradient (visual_transformer.py:12-52), for every method it trains: SLIP
    (as the toolbox ran it), FILIP, DeCLIP, DeFILIP keep the patch projection at its random
    init. Official SLIP (timm ViT), CLIP, ALIP and CLIPS train it."""
    method, _ = build(name)
    conv1 = method.model.visual.conv1.weight
    assert conv1.requires_grad == (name not in TOOLBOX_VIT)
    if name == "slip":
        official, _ = build(name, "--slip-views", "official")
        assert official.model.visual.conv1.weight.requires_grad
    # a frozen conv1 is outside the optimizer the training builds, and stays put
    from alip.training.optim import build_optimizer
    opt = build_optimizer(method.encoder, 0.1, 0.1, fused=False)
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert (id(conv1) in in_opt) == (name not in TOOLBOX_VIT)


def toolbox_init_stds(cfg):
    """What Sense-GVT/DeCLIP's VisualTransformer.initialize_parameters() draws
    (visual_transformer.py:28-38), by open_clip state_dict key, for a ViT of this config."""
    w, L = cfg["vision_cfg"]["width"], cfg["vision_cfg"]["layers"]
    proj, attn, fc = w ** -0.5 * (2 * L) ** -0.5, w ** -0.5, (2 * w) ** -0.5
    stds = {"visual.positional_embedding": 0.01}
    for i in range(L):
        b = f"visual.transformer.resblocks.{i}."
        stds.update({b + "attn.in_proj_weight": attn, b + "attn.out_proj.weight": proj,
                     b + "mlp.c_fc.weight": fc, b + "mlp.c_proj.weight": proj})
    return stds


def assert_normal(t, std, key):
    """``t`` looks like n draws of N(0, std): the sample std within 6 sigma of std (its relative
    sd is about 1/sqrt(2n)) and the mean within 6 sigma of 0 (sd std/sqrt(n))."""
    n, t = t.numel(), t.detach().double()
    assert abs(t.std().item() / std - 1) < 6 / math.sqrt(2 * n), (key, t.std().item(), std)
    assert abs(t.mean().item()) < 6 * std / math.sqrt(n), (key, t.mean().item(), std)


def random_model(name, seed=0):
    torch.manual_seed(seed)
    return open_clip.create_model(MODELS[name], **model_kwargs_of(name))


@pytest.mark.parametrize("name", TOOLBOX_VIT)
def test_toolbox_methods_start_from_the_toolbox_vit_init(name):
    """Sense-GVT/DeCLIP's VisualTransformer re-draws the positional embedding ~ N(0, 0.01) and
    each block's in_proj ~ N(0, w^-0.5), out_proj and c_proj ~ N(0, w^-0.5 (2L)^-0.5), c_fc ~
    N(0, (2w)^-0.5) (visual_transformer.py:28-38); open_clip's ViT leaves them at scale*randn and
    PyTorch's defaults. Everything else (conv1, class embedding, proj, biases, LayerNorms, the
    text tower) is the model open_clip built under the same seed, bit for bit; the draw is the
    training seed's."""
    method, _ = build(name)
    stds = toolbox_init_stds(open_clip.get_model_config(MODELS[name]))
    got, plain = method.model.state_dict(), random_model(name).state_dict()
    assert got.keys() == plain.keys()
    assert {k for k in got if not torch.equal(got[k], plain[k])} == set(stds)
    for k, std in stds.items():
        assert_normal(got[k], std, k)
    again, args = build(name)  # same seed, same weights; another seed, other weights
    assert all(torch.equal(v, again.model.state_dict()[k]) for k, v in got.items())
    other = get_method(name)(args).attach(random_model(name, seed=1))
    key = "visual.transformer.resblocks.0.attn.in_proj_weight"
    assert not torch.equal(other.model.state_dict()[key], got[key])


@pytest.mark.parametrize("name, flags", [("clip", ()), ("alip", ()), ("clips", ()),
                                         ("slip", ("--slip-views", "official"))])
def test_other_methods_keep_open_clip_init(name, flags):
    """CLIP, ALIP, CLIPS and official SLIP train open_clip's ViT as open_clip initialises it."""
    method, _ = build(name, *flags)
    got, plain = method.model.state_dict(), random_model(name).state_dict()
    assert got.keys() == plain.keys()
    assert all(torch.equal(v, plain[k]) for k, v in got.items())


@pytest.mark.parametrize("name", TOOLBOX_VIT)
def test_toolbox_vit_init_leaves_pretrained_weights_alone(tmp_path, name):
    """With ``--pretrained`` (a tag or a checkpoint path: train.py builds the model with
    ``create_model_and_transforms(args.model, pretrained=args.pretrained)``) the weights are the
    loaded ones; conv1 is still frozen, as the toolbox's train() does whatever it loaded."""
    path = tmp_path / "weights.pt"
    torch.save(random_model(name, seed=3).state_dict(), path)
    torch.manual_seed(0)
    model = open_clip.create_model(MODELS[name], pretrained=str(path), **model_kwargs_of(name))
    loaded = {k: v.clone() for k, v in model.state_dict().items()}
    args = parse_args(["--method", name, "--model", MODELS[name], *small_flags(name),
                       "--pretrained", str(path)])
    method = get_method(name)(args).attach(model)
    assert all(torch.equal(v, loaded[k]) for k, v in method.model.state_dict().items())
    assert not method.model.visual.conv1.weight.requires_grad
    # open_clip model names that bring their own weights count as pretrained too
    assert weights_given(parse_args(["--model", "hf-hub:org/repo"]))
    assert weights_given(parse_args(["--model", "local-dir:/some/dir"]))
    assert not weights_given(parse_args(["--model", MODELS[name]]))


@pytest.mark.parametrize("name", ["declip", "filip"])
def test_vit_style_open_clip_gives_a_toolbox_method_open_clips_tower(name):
    """--vit-style open_clip: the tower open_clip built under the seed, conv1 trained."""
    method, _ = build(name, "--vit-style", "open_clip")
    assert method.vit == "open_clip" and method.model.visual.conv1.weight.requires_grad
    plain = random_model(name).state_dict()
    assert all(torch.equal(v, plain[k]) for k, v in method.model.state_dict().items())


@pytest.mark.parametrize("name", ["clip", "alip"])
def test_vit_style_toolbox_gives_any_method_the_toolbox_tower(name):
    """--vit-style toolbox: the same re-draw and frozen conv1 as the toolbox's methods get."""
    method, _ = build(name, "--vit-style", "toolbox")
    assert method.vit == "toolbox" and not method.model.visual.conv1.weight.requires_grad
    stds = toolbox_init_stds(open_clip.get_model_config(MODELS[name]))
    got, plain = method.model.state_dict(), random_model(name).state_dict()
    assert {k for k in got if not torch.equal(got[k], plain[k])} == set(stds)
    for k, std in stds.items():
        assert_normal(got[k], std, k)


def test_vit_style_toolbox_on_a_resnet_is_an_error():
    torch.manual_seed(0)
    args = parse_args(["--method", "clip", "--model", "ALIP-RN50", "--vit-style", "toolbox"])
    with pytest.raises(MethodConfigError, match=r"^--vit-style toolbox: the image tower of --model "
                                                r"ALIP-RN50 \(ModifiedResNet\) is not an open_clip ViT"):
        get_method("clip")(args).attach(open_clip.create_model("ALIP-RN50"))


def test_toolbox_vit_leaves_a_resnet_tower_alone():
    """The toolbox's ModifiedResNet has neither the frozen conv1 nor the ViT init."""
    torch.manual_seed(0)
    model = open_clip.create_model("ALIP-RN50")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert toolbox_vit(model, parse_args(["--model", "ALIP-RN50"])) == (False, False)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())


def test_slip_loss_is_clip_plus_scaled_simclr():
    method, _ = build("slip", "--slip-ssl-scale", "0.5")
    feats = method.encoder(batch_for(method.data))
    out = method.criterion(feats)
    clip = open_clip.loss.ClipLoss()(feats["image"], feats["raw"], feats["logit_scale"])
    ssl = simclr_loss(feats["ssl_a"], feats["ssl_b"], 0.1)
    torch.testing.assert_close(out["loss"], clip + 0.5 * ssl)
    assert feats["ssl_a"].shape == (8, 256)
    # the head reads the pooled ViT feature before proj: head(pooled) for the aug views
    assert method.data.keys == ["image", "image_aug1", "image_aug2", "raw"]
    assert [v.recipe for v in method.data.image_views] == ["slip_base", "mocov2", "mocov2"]


def test_slip_official_views_and_logit_clamps():
    method, args = build("slip", "--slip-views", "official")
    assert [v.recipe for v in method.data.image_views] == ["slip_base", "simclr", "simclr"]
    with torch.no_grad():
        method.model.logit_scale.fill_(9.0)
    method.after_step()
    assert method.model.logit_scale.item() == pytest.approx(4.6052, abs=1e-4)
    declip_view, _ = build("slip")
    with torch.no_grad():
        declip_view.model.logit_scale.fill_(2.0)
    declip_view.after_step()
    assert declip_view.model.logit_scale.item() == 3.0  # the DeCLIP benchmark's [3, 6]


def test_declip_loss_is_the_weighted_sum_of_its_terms_and_the_bank_moves_in_train_mode():
    method, _ = build("declip")
    crit = method.criterion
    feats = method.encoder(batch_for(method.data))
    bank_before = crit.bank.bank.clone()
    s = feats["logit_scale"]
    clip = sum(clip_info_nce(i, t, s) for i in (feats["img1"], feats["img2"])
               for t in (feats["text"], feats["text_aug"])) / 4

    def nn_of(x):  # top-1 by cosine in the bank as it is now, renormalised as the reference
        row = bank_before[(F.normalize(x, dim=1) @ F.normalize(bank_before, dim=1).T).argmax(1)]
        return row / (row.norm(dim=1, keepdim=True) + 1e-10)

    expected = declip_total(clip, nn_loss(feats["img1"], feats["img2"], nn_of(feats["text"]),
                                          nn_of(feats["text_aug"]), s),
                            simsiam_loss(feats["p1"], feats["p2"], feats["z1"], feats["z2"]),
                            mlm_loss(feats["mlm_logits"], feats["mlm_labels"]))
    crit.eval()
    out = crit(feats)
    assert torch.equal(crit.bank.bank, bank_before) and int(crit.bank.ptr) == 0
    torch.testing.assert_close(out["loss"], expected)
    crit.train()
    crit(feats)  # enqueue order: t_aug first (query with update), then t: 2B rows
    torch.testing.assert_close(crit.bank.bank[:8], feats["text_aug"].detach())
    torch.testing.assert_close(crit.bank.bank[8:16], feats["text"].detach())
    assert int(crit.bank.ptr) == 16


def test_declip_masks_the_text_it_embeds_and_masks_replay_after_a_restore():
    method, _ = build("declip")
    b = batch_for(method.data)
    enc = method.encoder
    saved = method.heads_state_dict()
    first = enc(b)
    assert enc.mlm_draws == int(saved["_extra_state"]) + 1
    assert first["mlm_labels"].numel() > 0  # something was masked (15% of ~50 tokens)
    method.load_heads_state_dict(saved)  # what a resume restores
    again = enc(b)
    assert torch.equal(first["mlm_labels"], again["mlm_labels"])
    torch.testing.assert_close(first["text"], again["text"])
    # training state from before the counter moved to the host (a long buffer) loads too
    legacy = {k: v for k, v in saved.items() if k != "_extra_state"}
    method.load_heads_state_dict({**legacy, "mlm_draws": torch.tensor(0)})
    assert enc.mlm_draws == 0 and torch.equal(enc(b)["mlm_labels"], first["mlm_labels"])


def test_declip_logit_scale_cap_is_forward_only():
    p = torch.tensor(5.0, requires_grad=True)
    s = capped_scale(p)
    assert s.item() == 100.0
    s.backward()
    assert p.grad.item() == pytest.approx(torch.tensor(5.0).exp().item())


def test_declip_needs_the_mask_token():
    model = open_clip.create_model("ALIP-tiny")
    args = parse_args(["--method", "declip", "--model", "ALIP-tiny"])
    with pytest.raises(MethodConfigError, match="mask token 49408.*DeCLIP-tiny"):
        get_method("declip")(args).attach(model)


@pytest.mark.parametrize("name", ["slip", "declip"])
def test_batch_accumulation_is_refused_for_batchnorm_heads(tmp_path, name):
    from alip.training.loop import TrainConfigError, run
    args = parse_args(["--method", name, "--model", MODELS[name], "--dataset-type", "synthetic",
                       "--train-num-samples", "32", "--batch-size", "4", "--accum-freq", "2",
                       "--accum-mode", "batch", "--device", "cpu", "--logs", str(tmp_path)])
    with pytest.raises(TrainConfigError, match=f"--method {name} does not support --accum-mode batch"):
        run(args)


def test_filip_and_defilip_losses_are_their_terms():
    from alip.methods.filip import filip_loss
    method, _ = build("filip", "--filip-k-text", "4")
    f = method.encoder(batch_for(method.data))
    assert f["image_tokens"].shape == (8, 16, 256) and f["text_tokens"].shape == (8, 77, 256)
    expected = filip_loss(f["image_tokens"], f["text_tokens"], f["text_mask"],
                          f["logit_scale_dense"], k_image=16, k_text=4)["loss"]
    torch.testing.assert_close(method.criterion(f)["loss"], expected)
    ref, _ = build("filip", "--filip-padding", "reference")
    assert ref.criterion.kw["mask_padding"] is False
    # one image view, MoCo-v2 as the DeCLIP toolbox's FILIP (docs/methods.md §5); --filip-augment
    assert method.data.keys == ["image", "raw"]
    assert [v.recipe for v in method.data.image_views] == ["mocov2"]
    alip_aug, args = build("filip", "--filip-augment", "reference")
    assert [v.recipe for v in alip_aug.data.image_views] == ["reference"]
    assert get_method("filip").data_spec(args) == alip_aug.data  # what the loader is built from

    # DeCLIP's two views (DeFILIP's too): MoCo-v2 as the reference, or --declip-augment's recipe
    for name in ("declip", "defilip"):
        ref_views, _ = build(name)
        assert [v.recipe for v in ref_views.data.image_views] == ["mocov2", "mocov2"]
        same, args = build(name, "--declip-augment", "reference")
        assert [(v.name, v.recipe) for v in same.data.image_views] == [
            ("image", "reference"), ("image_aug", "reference")]
        assert get_method(name).data_spec(args) == same.data

    method, _ = build("defilip")
    f = method.encoder(batch_for(method.data))
    method.criterion.eval()  # the bank stays put, so the DeCLIP part can be recomputed
    out = method.criterion(f)
    declip = method.criterion.declip(f)["loss"]
    dense = filip_loss(f["image_tokens"], f["text_tokens"], f["text_mask"],
                       f["logit_scale_dense"])["loss"]
    torch.testing.assert_close(out["loss"], declip + 0.2 * dense)
    with torch.no_grad():
        method.encoder.dense.logit_scale.fill_(7.0)
    method.after_step()
    assert method.encoder.dense.logit_scale.item() == 6.0



def test_clips_loss_is_the_weighted_terms_and_it_captions():
    from alip.methods.clips import caption_loss
    method, _ = build("clips", "--clips-w-cap", "3", "--caption-tokens", "3")
    assert method.data.keys == ["image", "raw", "caption", "caption_view"]
    b = batch_for(method.data)
    b["caption_view"] = b["caption"][:, :5].clone()
    f = method.encoder(b)
    clip = open_clip.loss.ClipLoss()
    web = clip(f["image"], f["raw"], f["logit_scale"])
    partial = clip(f["image"], f["caption_partial"], f["logit_scale"])
    cap = caption_loss(f["caption_logits"], f["caption_targets"])
    out = method.criterion(f)
    torch.testing.assert_close(out["loss"], (web + partial) / 2 + 3 * cap)
    # the partial caption is what the text tower embedded, the full caption what is predicted
    full = method.encoder.model.encode_text(b["caption"], normalize=True)
    assert not torch.allclose(f["caption_partial"], full, atol=1e-3)
    from alip.methods.clips import caption_targets
    full_targets = caption_targets(b["caption"], method.encoder.decoder.num_queries)
    assert torch.equal(f["caption_targets"][0], full_targets[full_targets != 0])
    assert full_targets[0, 0] == b["caption"][0, 1]
    # the projection on the target positions only == the full logits there
    logits = method.encoder.decoder(*_prefix(method, b))
    torch.testing.assert_close(f["caption_logits"][0], logits[full_targets != 0])
    rows = method.encoder.caption(b["image"][:2], b["raw"][:2], num_beams=2)
    texts = [open_clip.decode(r) for r in rows]
    assert all(t.startswith("<start_of_text>") and "<end_of_text>" in t for t in texts)


def _prefix(method, b):
    from alip.methods.filip import dense_image_tokens, dense_text_tokens
    image_tokens, _ = dense_image_tokens(method.model, b["image"], ln_post=True)
    return image_tokens, dense_text_tokens(method.model, b["raw"])[0][:, :-1]


def test_alip_with_subcaptions_encodes_the_caption_view():
    method, _ = build("alip", "--caption-view", "subcaption", "--caption-tokens", "4")
    view = [v for v in method.data.text_views if v.name == "caption_view"][0]
    assert dict(view.options) == {"strategy": "subcaption", "k": 4}
    b = batch_for(method.data)
    b["caption_view"] = b["caption"].clone()
    b["caption_view"][:, 3:] = 0
    b["caption_view"][:, 2] = 49407  # a one-word view: SOT, word, EOT
    f = method.encoder(b)
    torch.testing.assert_close(f["caption"], method.encoder.model.encode_text(b["caption_view"],
                                                                              normalize=True))


# ---------------------------------------------------------------------------------------------
# the method object's contract, for every registered method


@pytest.mark.parametrize("name", sorted(METHODS))
def test_a_method_is_built_from_its_configuration_before_the_model(name):
    """Before ``attach`` the method has its data spec and model arguments but no modules; after,
    its encoder holds the model and its criterion has no parameters; one ``state_dict`` carries
    what it checkpoints and loads back into a fresh method of the same configuration."""
    args = parse_args(["--method", name, "--model", MODELS[name], *small_flags(name)])
    method = get_method(name)(args)
    assert method.encoder is None and method.criterion is None and method.model is None
    assert method.data == get_method(name).loader_spec(args)  # the spec the loader gets
    assert isinstance(method.model_kwargs(), dict)
    torch.manual_seed(0)
    model = open_clip.create_model(MODELS[name], **method.model_kwargs())
    assert method.attach(model) is method and method.encoder.model is model
    assert not list(method.criterion.parameters())
    assert isinstance(method.eval_heads(), dict) and all(isinstance(n, str) for n in method.notes())
    state = method.state_dict()
    assert set(state) == {"loss", "heads"}
    other = get_method(name)(args).attach(random_model(name, seed=1))
    other.load_state_dict(state)
    for k, v in other.state_dict()["heads"].items():
        assert torch.equal(v, state["heads"][k]), k
    method.after_step()


def test_importing_the_methods_registers_nothing():
    """Loading the training code imports no method (the registry is lazy), and methods name
    their text transforms by import path (``alip.data.text_views.transform_fn``): importing
    every method leaves the data layer's built-ins as they are. In a fresh process, where no
    test has imported anything yet."""
    import subprocess
    import sys
    code = ("from alip.data import text_views; before = dict(text_views.TRANSFORMS); "
            "import alip.training.loop, sys; from alip.methods import METHODS, get_method; "
            "loaded = [n for n, v in METHODS.items() if v.split(':')[0] in sys.modules]; "
            "assert not loaded, f'loading train.py imported {loaded}'; "
            "[get_method(n) for n in METHODS]; "
            "assert text_views.TRANSFORMS == before, text_views.TRANSFORMS")
    subprocess.run([sys.executable, "-c", code], check=True)
