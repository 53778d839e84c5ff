"""--raw-fields / --caption-fields: which shard fields feed a method's raw text and synthetic
caption (CLIP on the synthetic captions; ALIP on RWKV-CLIP's generated text; several fields: one
drawn per sample and epoch, the same field for a caption and its partial view), through both
readers and train.py."""
import random

import pytest
import torch

from alip.data import text_views
from alip.data.loader import build_train_loader
from alip.data.spec import ALIP_DATA, CLIP_DATA, DataSpec, TextView, with_sources
from alip.methods import get_method
from alip.methods.base import REDUCE, MethodConfigError
from alip.text_views import reduce_row
from alip.training.params import parse_args
from data_fixtures import cache_dir, caption_of, text_of, tokenize  # noqa: F401
from test_text_fields import BACKENDS, SIZE, N, epoch, generated_of, three  # noqa: F401
from test_train_helpers import read_results, run_single, tiny_argv


def test_with_sources_turns_fields_into_views():
    spec = with_sources(ALIP_DATA, {"raw": ("raw",), "caption": ("generated",)})
    assert spec.text_fields == ("raw",) and spec.text_views == (TextView("caption", "generated"),)
    assert spec.keys == ["image", "raw", "caption"] and spec.fields_read == ("raw", "generated")
    view = TextView("caption_view", "caption", REDUCE, (("strategy", "truncate"), ("k", 8)))
    spec = with_sources(DataSpec(text_views=(view,)), {"caption": ("caption", "generated")})
    assert spec.text_views == (TextView("caption", ("caption", "generated")),
                               TextView("caption_view", ("caption", "generated"), REDUCE, view.options))
    assert with_sources(ALIP_DATA, {"raw": ("raw",), "caption": ("caption",)}) is ALIP_DATA
    with pytest.raises(ValueError, match="reads no 'caption' text"):
        with_sources(CLIP_DATA, {"caption": ("generated",)})


def test_several_sources_draw_one_field_per_sample_shared_by_its_views():
    a = TextView("caption", ("caption", "generated"))
    b = TextView("caption_view", ("caption", "generated"), REDUCE, (("strategy", "truncate"), ("k", 4)))
    picks = [text_views.pick_source(a, 0, 0, i) for i in range(2000)]
    assert picks == [text_views.pick_source(b, 0, 0, i) for i in range(2000)]
    assert 900 < picks.count("generated") < 1100  # one of two, uniformly (binomial sd 22)
    later = [text_views.pick_source(a, 0, 1, i) for i in range(2000)]
    assert 900 < sum(x != y for x, y in zip(picks, later)) < 1100  # drawn anew each epoch


def caption_spec(args_extra):
    args = parse_args(["--method", "alip", *args_extra])
    return get_method("alip").loader_spec(args)


@pytest.mark.parametrize("backend", BACKENDS)
def test_readers_feed_the_chosen_fields(three, backend):  # noqa: F811
    _, _, out = three
    raw, cap, gen = (tokenize([f(i) for i in range(N)]) for f in (text_of, caption_of, generated_of))
    row_of = {tuple(raw[i]): i for i in range(N)}

    def load(spec):
        return epoch(build_train_loader(out, backend=backend, batch_size=4, image_size=SIZE, workers=1,
                                        drop_last=False, augment=False, spec=spec))

    for b in load(caption_spec(["--caption-fields", "generated"])):
        assert list(b) == ["image", "raw", "caption"]
        for r, c in zip(b["raw"], b["caption"]):
            assert (c.numpy() == gen[row_of[tuple(r.tolist())]]).all()

    spec = caption_spec(["--caption-fields", "caption,generated", "--caption-view", "truncate",
                         "--caption-tokens", "5"])
    seen = set()
    for b in load(spec):
        for r, c, v in zip(b["raw"], b["caption"], b["caption_view"]):
            i = row_of[tuple(r.tolist())]
            which = "caption" if (c.numpy() == cap[i]).all() else "generated"
            assert which == "caption" or (c.numpy() == gen[i]).all()
            seen.add(which)
            # the partial view is of the same field
            assert torch.equal(v, reduce_row(c, random.Random(0), strategy="truncate", k=5))
    assert seen == {"caption", "generated"}


def test_both_readers_draw_the_same_fields(three):  # noqa: F811
    _, _, out = three
    spec = caption_spec(["--caption-fields", "caption,generated"])
    got = {}
    for backend in BACKENDS:
        loader = build_train_loader(out, backend=backend, batch_size=4, image_size=SIZE, workers=1,
                                    drop_last=False, augment=False, spec=spec, seed=3)
        loader.set_epoch(1)
        got[backend] = {tuple(r.tolist()): tuple(c.tolist()) for b in loader
                        for r, c in zip(b["raw"], b["caption"])}
    assert got["torch"] == got["dali"]


def test_train_py_reads_the_chosen_fields_and_refuses_what_a_method_ignores(tmp_path):
    run_single(tiny_argv(tmp_path, "clip_on_captions", "--method", "clip", "--raw-fields", "caption",
                         "--max-steps", "2"))
    assert [r["step"] for r in read_results(tmp_path / "clip_on_captions")] == [1, 2]
    with pytest.raises(MethodConfigError, match=r"^--method clip reads no 'caption' text: "
                                                r"--caption-fields generated would be ignored$"):
        get_method("clip").check_args(parse_args(tiny_argv(tmp_path, "x", "--method", "clip",
                                                           "--caption-fields", "generated")))
    with pytest.raises(SystemExit, match="--caption-fields 'caption,caption': 'caption' is not a field "
                                         "name or is named twice"):
        parse_args(tiny_argv(tmp_path, "x", "--caption-fields", "caption,caption"))
