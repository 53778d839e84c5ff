"""caption.py for long captions: the count of captions a data2rec field of --caption-context N
would cut (captions.json), --detailed (a prompt for detailed descriptions, more new tokens)."""
import json
import os
import shutil

import caption
from alip.caption import writer
from data_fixtures import make_wds_dataset
from test_caption import blip_dir, clean, coca_args, coca_dir, manifest, one_thread  # noqa: F401  (fixtures)


def bpe_len(text):
    from open_clip.tokenizer import SimpleTokenizer
    return len(SimpleTokenizer().encode(text))


def test_captions_json_counts_the_captions_a_field_would_cut(clean, tmp_path):  # noqa: F811
    side = json.load(open(os.path.join(clean, "captions.json")))
    caps = [json.loads(line)["caption"] for line in open(os.path.join(clean, "captions.jsonl"))]
    longest = max(bpe_len(c) + 2 for c in caps)
    assert side["tokenizer"] == "ALIP-ViT-B-32" and side["caption_context"] == 77
    assert side["captions_cut"] == 0 and side["caption_tokens_max"] == longest
    # at a context shorter than some captions: exactly those longer than it, counted by hand
    out = str(tmp_path / "copy")
    shutil.copytree(clean, out)
    width = longest - 1
    got = writer.note_lengths(out, side, "ALIP-ViT-B-32", width)
    want = sum(bpe_len(c) + 2 > width for c in caps)
    assert 0 < want and got["captions_cut"] == want and got["caption_tokens_max"] == width + 1
    assert json.load(open(os.path.join(out, "captions.json")))["captions_cut"] == want


def test_bad_flags_are_one_line_errors(manifest, coca_dir, tmp_path, capsys):  # noqa: F811
    root, path = manifest
    base = ["--manifest", path, "--image-root", root, "--output-dir", str(tmp_path / "o")]
    assert caption.main(base + coca_args(coca_dir, "--detailed")) == 2
    assert "--detailed: the open_clip backend captions without a prompt" in capsys.readouterr().err
    assert caption.main(base + coca_args(coca_dir, "--caption-context", "-1")) == 2
    assert "--caption-context -1" in capsys.readouterr().err
    assert caption.main(base + coca_args(coca_dir, "--tokenizer", "nope-model")) == 2
    assert "--tokenizer 'nope-model'" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "o")


def test_detailed_sets_the_prompt_and_the_new_tokens_unless_given():
    base = ["--manifest", "m.jsonl", "--output-dir", "o", "--backend", "vllm"]
    a = caption.parse_args(base + ["--detailed"])
    assert (a.prompt, a.max_new_tokens) == (caption.DETAILED_PROMPT, caption.DETAILED_MAX_NEW_TOKENS)
    a = caption.parse_args(base + ["--detailed", "--max-new-tokens", "90", "--prompt", "Describe every object."])
    assert (a.prompt, a.max_new_tokens) == ("Describe every object.", 90)
    a = caption.parse_args(base)
    assert (a.prompt, a.max_new_tokens) == ("", 30)


def test_a_detailed_hf_run_records_its_prompt(blip_dir, tmp_path, capsys):  # noqa: F811
    pattern, _ = make_wds_dataset(str(tmp_path), 3, per_tar=3)
    out = str(tmp_path / "caps")
    assert caption.main(["--wds", pattern, "--output-dir", out, "--backend", "hf", "--model", blip_dir,
                         "--decoding", "greedy", "--detailed", "--max-new-tokens", "12", "--min-new-tokens", "2",
                         "--caption-context", "10", "--batch-size", "3", "--workers", "0", "--no-progress"]) == 0
    said = capsys.readouterr().out
    side = json.load(open(os.path.join(out, "captions.json")))
    assert side["generation"]["prompt"] == caption.DETAILED_PROMPT and side["generation"]["max_new_tokens"] == 12
    caps = [json.loads(line)["caption"] for line in open(os.path.join(out, "captions.jsonl"))]
    want = sum(bpe_len(c) + 2 > 10 for c in caps)
    assert side["caption_context"] == 10 and side["captions_cut"] == want
    assert f"{want} captions longer than 10 tokens" in said
