"""Tiny random-init captioners saved like real ones (tests, benchmark, CPU smoke runs; no download).

``save_tiny_coca(d)`` -> ``"local-dir:d"`` for ``--model`` (open_clip backend);
``save_tiny_blip(d)`` -> ``d`` for ``--backend hf --model``. Their captions are gibberish.
"""
import json
import os

import torch

TINY_COCA = {"embed_dim": 32, "custom_text": True,
             "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16,
                            "attentional_pool": True, "attn_pooler_heads": 2, "output_tokens": True},
             "text_cfg": {"context_length": 76, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1,
                          "embed_cls": True, "output_tokens": True},
             "multimodal_cfg": {"context_length": 76, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1,
                                "attn_pooler_heads": 2}}
BLIP_WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"] + \
    "a an the cat dog red blue picture of photo on with small big tree sky".split()


def save_tiny_coca(d, seed=0, cfg=TINY_COCA):
    """A random-init CoCa as an open_clip ``local-dir:`` model (open_clip_config.json + weights)."""
    import open_clip

    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "open_clip_config.json"), "w") as f:
        json.dump({"model_cfg": cfg, "preprocess_cfg": {}}, f)
    torch.manual_seed(seed)
    model = open_clip.create_model(f"local-dir:{d}")  # the config alone: random init
    # open_clip leaves the decoder's output projection uninitialised (torch.empty): every logit
    # would be equal (0 here) and greedy decoding would sample among ties
    torch.nn.init.normal_(model.text_decoder.text_projection, std=cfg["multimodal_cfg"]["width"] ** -0.5)
    torch.save(model.state_dict(), os.path.join(d, "open_clip_pytorch_model.bin"))
    return f"local-dir:{d}"


def save_tiny_blip(d, seed=0):
    """A random-init BLIP captioner with a WordPiece tokenizer built in code, saved with its processor."""
    from transformers import (BertTokenizerFast, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor,
                              BlipProcessor)

    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "vocab.txt"), "w") as f:
        f.write("\n".join(BLIP_WORDS) + "\n")
    tok = BertTokenizerFast(vocab_file=os.path.join(d, "vocab.txt"), bos_token="[DEC]")
    images = BlipImageProcessor(size={"height": 32, "width": 32})
    BlipProcessor(image_processor=images, tokenizer=tok).save_pretrained(d)
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    cfg = BlipConfig(text_config=dict(small, vocab_size=len(BLIP_WORDS), encoder_hidden_size=32, bos_token_id=5,
                                      sep_token_id=3, pad_token_id=0, max_position_embeddings=64),
                     vision_config=dict(small, image_size=32, patch_size=8))
    torch.manual_seed(seed)
    BlipForConditionalGeneration(cfg).save_pretrained(d)
    return d
