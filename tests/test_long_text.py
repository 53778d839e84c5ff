"""Text fields wider than 77 tokens (issue #26, data half): data2rec --text-fields F:N, the
manifest's text_context / text_cut, both readers (torch and DALI on CPU) yielding each field at
its own width, the length index and verify, and text views drawing from a caption's full row."""
import glob
import json
import os
import struct

import numpy as np
import pytest
import torch

from alip.data import text_views
from alip.data.lengths import length_index
from alip.data.loader import build_train_loader
from alip.data.pack import DataError, check_widths
from alip.data.recordio import IR_FORMAT, RecordReader
from alip.data.spec import DataSpec, TextView
from alip.data.verify import check_shard
from alip.methods.base import CAPTION_VIEW_WIDTH, REDUCE
from data_fixtures import make_manifest_dataset, text_of, write_manifest, run_data2rec as run, shard_files

N = 10
SIZE = 16
WIDE = 256
BACKENDS = ["torch", "dali"]
LAST = "finally a purple zebra sleeps under the moon."


def long_caption(i):
    """A caption of about 200 tokens whose last sentence (LAST) is past token 77."""
    body = " ".join(f"sentence {j} of picture {i} shows a red dog running on green grass near a tall tree."
                    for j in range(11))
    return f"{body} {LAST}"


def tokenize(texts, width=77, name="ALIP-ViT-B-32"):
    import open_clip

    import alip  # noqa: F401
    return open_clip.get_tokenizer(name)(texts, context_length=width).numpy()


def bpe_len(text):
    from open_clip.tokenizer import SimpleTokenizer
    return len(SimpleTokenizer().encode(text))


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("in"))
    make_manifest_dataset(root, N)
    rows = [{"image": f"images/{i:04d}.jpg", "text": text_of(i), "caption": long_caption(i)} for i in range(N)]
    return root, write_manifest(root, rows, "jsonl", name="long")


@pytest.fixture(scope="module")
def wide(src, tmp_path_factory):
    root, manifest = src
    out = str(tmp_path_factory.mktemp("wide"))
    assert run("--manifest", manifest, "--image-root", root, "--output-dir", out, "--shard-size", "4",
               "--text-fields", f"raw,caption:{WIDE}") == 0
    return out


def test_the_captions_are_long():
    n = bpe_len(long_caption(0))
    assert 190 <= n <= 250 and bpe_len(long_caption(0)[:-len(LAST)]) + 2 > 77


def test_all_77_is_byte_identical_to_the_default(src, tmp_path):
    root, manifest = src
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    assert run("--manifest", manifest, "--image-root", root, "--output-dir", a, "--shard-size", "4") == 0
    assert run("--manifest", manifest, "--image-root", root, "--output-dir", b, "--shard-size", "4",
               "--text-fields", "raw:77,caption:77") == 0
    assert [open(p, "rb").read() for p in shard_files(a)] == [open(p, "rb").read() for p in shard_files(b)]
    assert open(os.path.join(a, "plan.json")).read() == open(os.path.join(b, "plan.json")).read()
    m = json.load(open(os.path.join(b, "manifest.json")))
    assert m["text_context"] == {"raw": 77, "caption": 77} and m["context_length"] == 77
    assert m["text_cut"] == {"raw": 0, "caption": N}  # every long caption cut at 77


def test_wide_field_is_stored_at_its_width(wide):
    m = json.load(open(os.path.join(wide, "manifest.json")))
    assert m["text_fields"] == ["raw", "caption"] and m["text_context"] == {"raw": 77, "caption": WIDE}
    assert m["text_cut"] == {"raw": 0, "caption": 0} and "context_length" not in m
    assert m["flags"]["text_context"] == {"raw": 77, "caption": WIDE}
    assert m["label_layout"].startswith(f"IRHeader flag={77 + WIDE}") and f"caption tokens [77:{77 + WIDE}]" in m["label_layout"]
    rec = sorted(glob.glob(os.path.join(wide, "train-*.rec")))[0]
    r = RecordReader(rec, widths=(77, WIDE))
    assert struct.unpack_from(IR_FORMAT, r.read_payload(0))[0] == 77 + WIDE
    x = r[0]
    assert (x.tokens[0] == tokenize([text_of(x.key)])[0]).all()
    assert (x.tokens[1] == tokenize([long_caption(x.key)], WIDE)[0]).all()
    assert x.tokens[1].argmax() + 1 == bpe_len(long_caption(x.key)) + 2  # nothing cut: EOT after the last word


@pytest.mark.parametrize("backend", BACKENDS)
def test_wide_round_trip_through_both_readers(wide, backend):
    loader = build_train_loader(wide, backend=backend, batch_size=4, image_size=SIZE, workers=1,
                                drop_last=False, augment=False, spec=DataSpec(text_fields=("raw", "caption")))
    loader.set_epoch(0)
    batches = list(loader)
    raw = {tuple(r): i for i, r in enumerate(tokenize([text_of(i) for i in range(N)]).tolist())}
    want = tokenize([long_caption(i) for i in range(N)], WIDE)
    seen = []
    assert loader.text_widths == {"raw": 77, "caption": WIDE}  # what train.py checks the tower against
    for b in batches:
        assert b["raw"].shape[1] == 77 and b["caption"].shape[1] == WIDE  # a 256-wide batch comes out
        assert b["caption"].dtype == torch.int64 and b["caption"].is_contiguous()
        for r, c in zip(b["raw"].tolist(), b["caption"]):
            i = raw[tuple(r)]
            assert (c.numpy() == want[i]).all()
            seen.append(i)
    assert sorted(seen) == list(range(N))


def test_cut_count_is_the_captions_longer_than_the_context(src, tmp_path):
    root, manifest = src
    rows = [{"image": f"images/{i:04d}.jpg", "text": text_of(i),
             "caption": long_caption(i) if i % 3 == 0 else f"a short caption {i}."} for i in range(N)]
    path = write_manifest(root, rows, "jsonl", name="mixed")
    out = str(tmp_path / "o")
    assert run("--manifest", path, "--image-root", root, "--output-dir", out, "--text-fields", "raw,caption:120") == 0
    want = sum(bpe_len(r["caption"]) + 2 > 120 for r in rows)
    assert want == 4
    assert json.load(open(os.path.join(out, "manifest.json")))["text_cut"] == {"raw": 0, "caption": want}


def test_length_index_and_verify_read_per_field_widths(wide, tmp_path):
    recs = sorted(glob.glob(os.path.join(wide, "train-*.rec")))
    readers = [RecordReader(p, widths=(77, WIDE)) for p in recs]
    got = length_index(readers, (77, WIDE), use_cache=False)
    assert got.dtype == np.uint16 and got.shape == (N, 2)
    keys = np.concatenate([r.keys for r in readers])
    assert got[:, 1].tolist() == [bpe_len(long_caption(int(k))) + 2 for k in keys]
    assert (got[:, 1] > 77).all()
    assert all(check_shard(p) == (len(r), []) for p, r in zip(recs, readers))
    # the same records under a manifest that says 77 each: every record is the wrong length
    d = str(tmp_path)
    for p in shard_files(wide):
        open(os.path.join(d, os.path.basename(p)), "wb").write(open(p, "rb").read())
    m = json.load(open(os.path.join(wide, "manifest.json")))
    m["text_context"]["caption"] = 77
    json.dump(m, open(os.path.join(d, "manifest.json"), "w"))
    n, problems = check_shard(os.path.join(d, os.path.basename(recs[0])))
    assert len(problems) == n and f"IRHeader flag is {77 + WIDE}, expected 154" in problems[0]


def clips_view(width=CAPTION_VIEW_WIDTH, strategy="subcaption", k=32):
    return TextView("caption_view", "caption", REDUCE, (("strategy", strategy), ("k", k)), width=width)


def holds(row, sentence):
    ids = tokenize([sentence])[0]
    body = ids[1:int(np.argmax(ids))].tolist()
    row = [int(t) for t in row]
    return any(row[i:i + len(body)] == body for i in range(len(row) - len(body) + 1))


@pytest.mark.parametrize("strategy", ["subcaption", "block", "random"])
def test_clips_views_draw_from_the_full_caption(strategy):
    """A view of the 256-wide row can hold the caption's last sentence; of the 77-wide row
    (today's shards) it never can: the tail was cut before the draw."""
    full = torch.from_numpy(tokenize([long_caption(0)], WIDE)[0])
    cut = torch.from_numpy(tokenize([long_caption(0)], 77)[0])
    view = clips_view(strategy=strategy)
    wide_views = [text_views.apply(view, {"caption": full}, 0, 0, i) for i in range(200)]
    narrow_views = [text_views.apply(view, {"caption": cut}, 0, 0, i) for i in range(200)]
    assert all(v.shape == (77,) and v.dtype == torch.int64 for v in wide_views + narrow_views)
    last = LAST.split()[-1]  # "moon." : in every strategy a token of the last sentence
    tail = tokenize([last])[0][1]  # 'moon</w>'
    assert any((v == tail).any() for v in wide_views)
    assert not any((v == tail).any() for v in narrow_views)
    if strategy == "subcaption":
        assert any(holds(v, LAST) for v in wide_views)
    for v in wide_views:  # SOT, at most k caption tokens, EOT, zero padding
        n = int(v.argmax())
        assert v[0] == 49406 and n <= 33 and (v[n + 1:] == 0).all()


def test_clips_view_of_a_77_row_is_todays(wide):
    """width 77 over a 77-wide caption: what reduce_row gave before widths existed."""
    from alip.text_views import reduce_tokens
    row = torch.from_numpy(tokenize([long_caption(3)])[0])
    for i in range(20):
        got = text_views.apply(clips_view(), {"caption": row}, 5, 2, i)
        seed = text_views.text_rng(5, 2, i, "caption_view").getrandbits(63)
        assert torch.equal(got, reduce_tokens(row[None], "subcaption", 32, [seed])[0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_clips_view_through_the_readers_reaches_the_tail(wide, backend):
    spec = DataSpec(text_fields=("raw",), text_views=(clips_view(strategy="block"),))
    loader = build_train_loader(wide, backend=backend, batch_size=5, image_size=SIZE, workers=1,
                                drop_last=False, augment=False, spec=spec)
    assert loader.text_widths == {"raw": 77, "caption_view": 77}  # the view's width, not the field's
    tail = tokenize(["moon"])[0][1]
    found = 0
    for e in range(4):
        loader.set_epoch(e)
        for b in loader:
            assert b["caption_view"].shape[1] == 77 and b["raw"].shape[1] == 77
            found += int((b["caption_view"] == tail).any(dim=1).sum())
    assert found > 0


def test_multi_source_view_pads_to_the_widest():
    raw = torch.from_numpy(tokenize(["a dog"])[0])
    cap = torch.from_numpy(tokenize([long_caption(1)], WIDE)[0])
    view = TextView("either", ("raw", "caption"))
    got = {}
    for i in range(40):
        src = text_views.pick_source(view, 0, 0, i)
        v = text_views.apply(view, {"raw": raw, "caption": cap}, 0, 0, i)
        assert v.shape == (WIDE,)
        want = cap if src == "caption" else torch.cat([raw, torch.zeros(WIDE - 77, dtype=torch.int64)])
        assert torch.equal(v, want)
        got[src] = True
    assert set(got) == {"raw", "caption"}
    batch = text_views.apply_batch([view], {"raw": raw[None].repeat(3, 1), "caption": cap[None].repeat(3, 1)},
                                   0, 0, [0, 1, 2])
    assert batch["either"].shape == (3, WIDE)
    assert text_views.apply_batch([view], {"raw": raw[:0][None][:0], "caption": cap[None][:0]}, 0, 0,
                                  [])["either"].shape == (0, WIDE)


def test_a_declared_width_caps_at_the_source():
    cap = torch.from_numpy(tokenize([long_caption(1)], 64)[0])
    assert text_views.apply(clips_view(), {"caption": cap}, 0, 0, 0).shape == (64,)
    with pytest.raises(ValueError, match="width 20 cannot hold k=32"):
        text_views.apply(clips_view(width=20), {"caption": cap}, 0, 0, 0)


def test_repack_long_captions_into_existing_shards(src, tmp_path, capsys):
    root, manifest = src
    short = str(tmp_path / "short")
    assert run("--manifest", manifest, "--image-root", root, "--output-dir", short, "--shard-size", "4") == 0
    caps = os.path.join(str(tmp_path), "long.jsonl")
    with open(caps, "w") as f:
        for i in range(N):
            f.write(json.dumps({"key": i, "caption": long_caption(i)}) + "\n")
    out = str(tmp_path / "re")
    assert run("--rec", short, "--captions", caps, "--output-dir", out, "--text-fields", f"raw,caption:{WIDE}") == 0
    m = json.load(open(os.path.join(out, "manifest.json")))
    assert m["text_context"] == {"raw": 77, "caption": WIDE} and m["text_cut"]["caption"] == 0
    for p in sorted(glob.glob(os.path.join(out, "train-*.rec"))):
        for x in RecordReader(p, widths=(77, WIDE)):
            assert (x.tokens[0] == tokenize([text_of(x.key)])[0]).all()
            assert (x.tokens[1] == tokenize([long_caption(x.key)], WIDE)[0]).all()
    # the copied raw tokens cannot be made wider: their text is not in the shards
    assert run("--rec", short, "--captions", caps, "--output-dir", str(tmp_path / "x"),
               "--text-fields", "raw:128,caption") == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("data2rec: error: --text-fields raw:128: raw is copied")
    assert not glob.glob(os.path.join(str(tmp_path / "x"), "train-*"))


def test_a_tokenizer_of_another_context_is_accepted(src, tmp_path):
    """SigLIP's tokenizers have context 64; a local open_clip config of context 64 stands in
    for them (the HF tokenizer needs the network): every field defaults to it."""
    import open_clip

    import alip  # noqa: F401
    cfg = open_clip.get_model_config("ALIP-ViT-B-32")
    cfg["text_cfg"]["context_length"] = 64
    d = tmp_path / "tok64"
    d.mkdir()
    (d / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg}))
    root, manifest = src
    out = str(tmp_path / "o")
    assert run("--manifest", manifest, "--image-root", root, "--output-dir", out, "--tokenizer", f"local-dir:{d}",
               "--text-fields", "raw,caption:200") == 0
    m = json.load(open(os.path.join(out, "manifest.json")))
    assert m["text_context"] == {"raw": 64, "caption": 200} and m["text_cut"] == {"raw": 0, "caption": N}
    x = RecordReader(glob.glob(os.path.join(out, "train-*.rec"))[0], widths=(64, 200))[0]
    assert (x.tokens[0] == tokenize([text_of(x.key)], 64)[0]).all()


@pytest.mark.parametrize("spec, why", [("raw,caption:0", "caption:0"), ("raw,caption:abc", "caption:abc"),
                                       ("raw,caption:-3", "caption:-3"), ("raw,caption:", "caption:")])
def test_bad_contexts_are_refused_naming_the_flag(src, tmp_path, capsys, spec, why):
    root, manifest = src
    assert run("--manifest", manifest, "--image-root", root, "--output-dir", str(tmp_path / "o"),
               "--text-fields", spec) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--text-fields" in err and why in err and "whole number of tokens >= 1" in err
    assert not os.path.exists(tmp_path / "o")


def test_a_context_above_the_tokenizers_positions_is_refused():
    class HF:
        class tokenizer:
            model_max_length = 64
    check_widths(HF(), {"raw": 64})
    with pytest.raises(DataError, match=r"^--text-fields caption:65: above the tokenizer's 64 positions"):
        check_widths(HF(), {"raw": 64, "caption": 65})


def test_tokenize_at_is_the_tokenizer_at_that_width_and_says_which_were_cut():
    """data2rec tokenizes one token wider and re-tokenizes only the texts that did not fit."""
    import open_clip

    import alip  # noqa: F401
    from alip.data.pack import tokenize_at
    tok = open_clip.get_tokenizer("ALIP-ViT-B-32")
    texts = [" ".join(f"word{j}" for j in range(i)) for i in range(0, 130, 7)] + [long_caption(2)]
    for width in (5, 20, 77, 256):
        rows, cut = tokenize_at(tok, texts, width)
        assert (rows == tok(texts, context_length=width).numpy()).all()
        assert cut.tolist() == [bpe_len(t) + 2 > width for t in texts]


@pytest.mark.parametrize("width", [-1, 7.5, "77", True])
def test_a_view_width_that_is_not_a_token_count_is_refused(width):
    with pytest.raises(ValueError, match=f"text view 'v': width {width!r} is not a number of tokens"):
        DataSpec(text_views=(TextView("v", "caption", width=width),))


def test_length_bucketing_over_wide_fields_sorts_by_their_full_lengths(wide):
    """Bucketing reads the 256-wide caption's true length (uint16 above 255): with the caption
    as the loader's first field, each pool's batches are sorted by it."""
    loader = build_train_loader(wide, backend="torch", batch_size=2, image_size=SIZE, workers=0, drop_last=False,
                                augment=False, spec=DataSpec(text_fields=("caption", "raw")), length_bucketing=5)
    loader.set_epoch(0)
    batches = list(loader)
    lengths = [sorted(int(c.argmax()) + 1 for c in b["caption"]) for b in batches]
    assert sorted(x for b in lengths for x in b) == sorted(bpe_len(long_caption(i)) + 2 for i in range(N))
    # one pool of 5 batches: sorted by length, batch k holds the 2k-th and 2k+1-th shortest
    flat = sorted(x for b in lengths for x in b)
    assert sorted(lengths) == [flat[i:i + 2] for i in range(0, N, 2)]
