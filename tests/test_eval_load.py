"""Model loading: train.py checkpoints, the ALIP authors' DDP state_dict layout, open_clip files."""
from collections import OrderedDict

import pytest
import torch

from alip.eval.load import checkpoint_model_name, load_model
from alip.eval.retrieval import evaluate_retrieval
from eval_fakes import write_karpathy


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model with non-default weights, a retrieval set, and the weights in three layouts."""
    import numpy as np
    from PIL import Image
    root = tmp_path_factory.mktemp("load")
    torch.manual_seed(1)
    model, _, _ = load_model("ALIP-tiny")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    sd = model.state_dict()
    # written by train.py's own writer: {"state_dict", "model", "epoch", "step"} (+ a .state.pt)
    from alip.training.checkpoint import save_checkpoint
    written = save_checkpoint(root, "epoch_3", "ALIP-tiny", model, {"optimizer": {}}, epoch=3, step=30)
    assert written == root / "epoch_3.pt"
    # open_clip: a bare state_dict file
    torch.save(sd, root / "open_clip.pt")
    # ALIP authors: torch.save(ddp_model.state_dict(), f"model_{epoch}.pt") -> "module." keys, the
    # legacy open_clip CLIP layout (text tower at top level: transformer.*, token_embedding, ...)
    torch.save(OrderedDict(("module." + k, v) for k, v in sd.items()), root / "model_31.pt")
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / f"{i}.jpg")
    write_karpathy(str(root / "ann.json"), [("", f"{i}.jpg", "test", [f"picture {i} of {w}" for w in
                                                                     ("a dog", "a cat", "rain")])
                                           for i in range(6)])
    return root, model


def retrieval(model, preprocess, tokenizer, root):
    return evaluate_retrieval(model, preprocess, tokenizer, str(root / "ann.json"), str(root))


def test_train_checkpoint_equals_open_clip_load(trained):
    root, model = trained
    assert checkpoint_model_name(str(root / "epoch_3.pt")) == "ALIP-tiny"
    ours, preprocess, tokenizer = load_model(checkpoint=str(root / "epoch_3.pt"))  # name read from file
    theirs, _, _ = load_model("ALIP-tiny", pretrained=str(root / "open_clip.pt"))
    for k, v in model.state_dict().items():
        assert torch.equal(ours.state_dict()[k], v) and torch.equal(theirs.state_dict()[k], v)
    assert not ours.training
    a = retrieval(ours, preprocess, tokenizer, root)
    assert a == retrieval(theirs, preprocess, tokenizer, root) == retrieval(model, preprocess, tokenizer, root)
    assert a["rsum"] > 0


def reference_keys(vision_layers, text_layers):
    """The state_dict keys of deepglint/ALIP's model (src/open_alip/model.py: legacy open_clip CLIP
    with VisualTransformer, nn.MultiheadAttention blocks, Identity ln_attn / mlp.ln)."""
    block = ["ln_1.weight", "ln_1.bias", "attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight",
             "attn.out_proj.bias", "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias",
             "mlp.c_proj.weight", "mlp.c_proj.bias"]
    keys = {f"visual.transformer.resblocks.{i}.{b}" for i in range(vision_layers) for b in block}
    keys |= {f"transformer.resblocks.{i}.{b}" for i in range(text_layers) for b in block}
    keys |= {"visual." + k for k in ("conv1.weight", "class_embedding", "positional_embedding", "ln_pre.weight",
                                     "ln_pre.bias", "ln_post.weight", "ln_post.bias", "proj")}
    return keys | {"token_embedding.weight", "positional_embedding", "ln_final.weight", "ln_final.bias",
                   "text_projection", "logit_scale"}


def test_alip_released_layout_loads(trained):
    root, model = trained
    assert set(model.state_dict()) == reference_keys(2, 2)  # our ALIP-* configs keep that layout
    keys = torch.load(root / "model_31.pt").keys()
    assert all(k.startswith("module.") for k in keys) and "module.transformer.resblocks.0.attn.in_proj_weight" in keys
    with pytest.raises(ValueError, match=r"model_31.pt does not record its model name .*--model"):
        load_model(checkpoint=str(root / "model_31.pt"))
    loaded, _, _ = load_model("ALIP-tiny", checkpoint=str(root / "model_31.pt"))
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


def test_load_errors(trained):
    root, _ = trained
    with pytest.raises(FileNotFoundError, match="missing.pt does not exist"):
        load_model(checkpoint=str(root / "missing.pt"))
    with pytest.raises(ValueError, match=r"epoch_3.pt do not fit model ALIP-demo"):
        load_model("ALIP-demo", checkpoint=str(root / "epoch_3.pt"))
    (root / "garbage.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="garbage.pt: cannot be read as a torch checkpoint"):
        load_model(checkpoint=str(root / "garbage.pt"))
    with pytest.raises(ValueError, match="unknown model 'ViT-Q-99'"):
        load_model("ViT-Q-99")
    with pytest.raises(ValueError, match="not both"):
        load_model("ALIP-tiny", pretrained="x.pt", checkpoint=str(root / "epoch_3.pt"))


def test_precision_bf16_runs(trained):
    root, _ = trained
    m, preprocess, tokenizer = load_model(checkpoint=str(root / "epoch_3.pt"), precision="amp_bf16")
    out = retrieval(m, preprocess, tokenizer, root)
    assert set(out) == {"i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10", "rsum"}


def test_alip_vit_b32_matches_the_released_model_layout():
    """ALIP-ViT-B-32 has exactly the reference ViT-B/32's keys and shapes (GELU, 12 heads), so the
    authors' weights load with strict=True (built on the meta device: no memory, no init time)."""
    import open_clip
    from open_clip.model import CLIP
    with torch.device("meta"):
        m = CLIP(**open_clip.get_model_config("ALIP-ViT-B-32"))
    sd = m.state_dict()
    assert set(sd) == reference_keys(12, 12)
    shapes = {"visual.conv1.weight": (768, 3, 32, 32), "visual.positional_embedding": (50, 768),
              "visual.transformer.resblocks.0.attn.in_proj_weight": (2304, 768), "visual.proj": (768, 512),
              "token_embedding.weight": (49408, 512), "positional_embedding": (77, 512),
              "transformer.resblocks.11.mlp.c_fc.weight": (2048, 512), "text_projection": (512, 512),
              "logit_scale": ()}
    assert {k: tuple(sd[k].shape) for k in shapes} == shapes
    assert m.visual.transformer.resblocks[0].attn.num_heads == 12
    assert isinstance(m.visual.transformer.resblocks[0].mlp.gelu, torch.nn.GELU)  # not QuickGELU
