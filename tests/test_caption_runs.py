"""caption.py runs: which process captions which chunk (--part with a multi-node torchrun),
weights required for CoCa, output dir and plan checked before the model loads."""
import itertools
import json
import os

import pytest

import caption
from alip.caption.run import my_chunks, process_slot
from test_caption import clean, coca_args, coca_dir, manifest, one_thread, outputs  # noqa: F401  (fixtures)


def launches(parts, nodes_per_part, local):
    """The env of every process: N parts (machines groups) of nodes_per_part nodes x local processes.
    One torchrun spans all nodes of all parts (global RANK), each node given its part's --part I/N."""
    world = parts * nodes_per_part * local
    for p in range(parts):
        for node in range(nodes_per_part):
            for lr in range(local):
                rank = (p * nodes_per_part + node) * local + lr
                yield (p, parts), {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(lr),
                                   "LOCAL_WORLD_SIZE": str(local)}


@pytest.mark.parametrize("num_chunks", [1, 2, 7, 24])
def test_every_chunk_is_captioned_exactly_once_over_parts_and_ranks(num_chunks):
    """Each machine its own --part (one node of a multi-node torchrun, or a launch per machine),
    or one torchrun over every node without --part: the union over all (part, rank) pairs is every
    chunk, once. (With global RANK inside a part, a multi-node torchrun left chunks uncaptioned.)"""
    for parts, local in itertools.product((1, 2, 3), (1, 2, 4)):
        layouts = [list(launches(parts, 1, local))]  # a multi-node torchrun, a part per node
        layouts.append([((p, parts), dict(env, RANK=env["LOCAL_RANK"], WORLD_SIZE=str(local)))  # a launch per machine
                        for (p, _), env in launches(parts, 1, local)])
        if parts == 1:
            layouts.append(list(launches(1, 3, local)))  # one torchrun over 3 nodes, no --part
        for layout in layouts:
            got = sorted(c for part, env in layout for c in my_chunks(num_chunks, part, *process_slot(part, env)[:2]))
            assert got == list(range(num_chunks)), (parts, local, layout)


def test_part_with_several_processes_needs_the_local_rank():
    with pytest.raises(ValueError, match="LOCAL_RANK and LOCAL_WORLD_SIZE"):
        process_slot((0, 2), {"RANK": "1", "WORLD_SIZE": "2"})
    assert process_slot((1, 2), {})[:2] == (0, 1)
    assert process_slot((0, 1), {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4"})[:2] \
        == (5, 8)


def test_two_nodes_each_its_own_part_give_the_same_bytes(manifest, coca_dir, clean, tmp_path,  # noqa: F811
                                                         monkeypatch, capsys):
    """The reviewer's case: a 2-node torchrun, 2 processes per node, node k with --part k/2 (3 chunks)."""
    root, path = manifest
    out = str(tmp_path / "caps")
    args = ["--manifest", path, "--image-root", root, "--output-dir", out] + coca_args(coca_dir)
    said = []
    for (i, n), env in launches(2, 1, 2):  # part 0: chunks 0 (local rank 0), 2 (1); part 1: chunk 1 (0)
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        assert caption.main(args + ["--part", f"{i}/{n}"]) == 0
        said.append(capsys.readouterr().out)
    assert "part 0/2 local rank 0/2 done; other processes" in said[0]
    assert "part 0/2 local rank 1/2 done; other processes" in said[1]
    assert "rows in 12 = captioned" in said[2]
    assert outputs(out) == outputs(clean) and len(outputs(out)) == 3


def _no_model_load(monkeypatch):
    import open_clip

    def loaded(*a, **k):
        raise AssertionError("the model was loaded")
    monkeypatch.setattr(open_clip, "create_model_and_transforms", loaded)


def _no_image_read(monkeypatch):
    from alip.caption import sources

    def read(*a, **k):
        raise AssertionError("an image was read")
    monkeypatch.setattr(sources, "read_source", read)


def test_a_coca_without_weights_is_refused_before_any_image_is_read(manifest, coca_dir, tmp_path,  # noqa: F811
                                                                    monkeypatch, capsys):
    """The default --model coca_ViT-L-14 without --pretrained was a random-init CoCa: junk captions,
    exit 0. Now one line, before any image is read or model loaded; a local-dir: model with
    weights (the tests' tiny CoCa) still runs."""
    root, path = manifest
    out = tmp_path / "caps"
    base = ["--manifest", path, "--image-root", root, "--output-dir", str(out), "--workers", "0", "--no-progress"]
    _no_model_load(monkeypatch)
    _no_image_read(monkeypatch)
    bare = tmp_path / "bare"  # a local-dir CoCa with its config but no weights file
    bare.mkdir()
    (bare / "open_clip_config.json").write_bytes(open(os.path.join(coca_dir[len("local-dir:"):],
                                                                   "open_clip_config.json"), "rb").read())
    cases = (([], ["--model coca_ViT-L-14 needs --pretrained", "laion2b_s13b_b90k", "random-init"]),
             (["--model", "coca_ViT-B-32", "--decoding", "greedy"], ["--model coca_ViT-B-32 needs --pretrained"]),
             (["--model", f"local-dir:{bare}"], [f"no weights file (*.safetensors, *.bin, *.pth) in {bare}"]),
             (["--model", coca_dir, "--pretrained", "w.pt"], ["--pretrained w.pt: open_clip ignores it"]))
    for argv, names in cases:
        assert caption.main(base + argv) == 1
        err = capsys.readouterr().err
        assert err.startswith("caption: error: ") and len(err.splitlines()) == 1
        assert all(n in err for n in names), err
    assert not out.exists()
    from alip.caption.backends import GenSettings, build_captioner
    with pytest.raises(ValueError, match="needs --pretrained"):  # the library refuses too
        build_captioner("open_clip", "coca_ViT-B-32", "", GenSettings(decoding="greedy"))


def test_output_dir_and_plan_are_checked_before_the_model_is_loaded(manifest, coca_dir, clean, tmp_path,  # noqa: F811
                                                                     monkeypatch, capsys):
    """An --output-dir that is a file, or one holding other settings' captions, fails in seconds
    (the model was loaded first: minutes for a vLLM model); a model that fails to load leaves no
    plan.json behind, so a corrected --model reruns into the same dir."""
    import shutil
    root, path = manifest
    base = ["--manifest", path, "--image-root", root]
    afile = tmp_path / "afile"
    afile.write_text("")
    other = str(tmp_path / "other")
    shutil.copytree(clean, other)
    _no_model_load(monkeypatch)
    for out, names in ((str(afile), [f"--output-dir {afile}: cannot write there"]),
                       (str(afile / "sub"), [f"--output-dir {afile / 'sub'}: cannot write there"]),
                       (other, [other, "generation.max_new_tokens: 8 there, 9 now"])):
        assert caption.main(base + ["--output-dir", out] + coca_args(coca_dir, "--max-new-tokens", "9")) == 1
        err = capsys.readouterr().err
        assert err.startswith("caption: error: ") and len(err.splitlines()) == 1
        assert all(n in err for n in names), err
    monkeypatch.undo()
    fresh = str(tmp_path / "fresh")
    assert caption.main(base + ["--output-dir", fresh] + coca_args(f"local-dir:{tmp_path}/nope")) == 1
    assert "nope" in capsys.readouterr().err and not os.path.exists(os.path.join(fresh, "plan.json"))
    assert caption.main(base + ["--output-dir", fresh] + coca_args(coca_dir)) == 0
    assert outputs(fresh) == outputs(clean)


def test_a_chunk_of_other_settings_is_never_reused(manifest, coca_dir, clean, tmp_path, capsys):  # noqa: F811
    """The reviewer's case: plan.json deleted after a greedy run, then a beam rerun exited 0 at once,
    reusing the greedy chunk files while captions.json claimed beam. Chunk files carry the plan's
    fingerprint: the beam run captions anew and gives what a fresh beam run gives."""
    import shutil
    root, path = manifest
    base = ["--manifest", path, "--image-root", root]
    beam = coca_args(coca_dir) + ["--decoding", "beam", "--num-beams", "2"]
    fresh = str(tmp_path / "fresh")
    assert caption.main(base + ["--output-dir", fresh] + beam) == 0
    out = str(tmp_path / "caps")
    shutil.copytree(clean, out)
    assert caption.main(base + ["--output-dir", out] + beam) == 1  # plan.json there: refused, naming it
    err = capsys.readouterr().err
    assert 'generation.decoding: "greedy" there, "beam" now' in err and "generation.num_beams: null there, 2" in err
    os.remove(os.path.join(out, "plan.json"))
    assert caption.main(base + ["--output-dir", out] + beam) == 0
    assert outputs(out) == outputs(fresh) != outputs(clean)
    side = json.load(open(os.path.join(out, "captions.json")))
    assert side["generation"]["decoding"] == "beam"


def test_settings_that_cannot_change_the_captions_do_not_lock_the_dir(manifest, coca_dir, clean, tmp_path,  # noqa: F811
                                                                      capsys):
    """Under --decoding greedy, --num-beams/--temperature/--top-p change nothing: the rerun finds its
    chunks (none redone, same bytes). The open_clip seed does count (its greedy is top-1 sampling,
    the seed picks among tied logits)."""
    import glob
    import shutil
    root, path = manifest
    base = ["--manifest", path, "--image-root", root]
    out = str(tmp_path / "caps")
    shutil.copytree(clean, out)
    chunks = {p: os.stat(p).st_mtime_ns for p in glob.glob(os.path.join(out, "chunks", "*.json"))}
    os.remove(os.path.join(out, "captions.json"))  # assembled again from the same chunks
    assert caption.main(base + ["--output-dir", out] + coca_args(coca_dir, "--num-beams", "7", "--temperature",
                                                                   "0.5", "--top-p", "0.3")) == 0
    assert {p: os.stat(p).st_mtime_ns for p in chunks} == chunks and outputs(out) == outputs(clean)
    side = json.load(open(os.path.join(out, "captions.json")))
    assert side["generation"]["num_beams"] == 7  # captions.json records the settings as given
    capsys.readouterr()
    assert caption.main(base + ["--output-dir", out] + coca_args(coca_dir, "--seed", "3")) == 1
    assert "generation.seed: 0 there, 3 now" in capsys.readouterr().err


def test_batches_are_made_as_the_loader_asks_for_them():
    """The batch plan was a list of every row of the process's chunks (~36 B/row: 4.5 GB for 125M
    rows); ChunkBatches makes each batch when the DataLoader asks, the same batches as before."""
    import tracemalloc

    from alip.caption.run import ChunkBatches
    n, chunk, batch = 23, 5, 2
    for todo in ([0, 1, 2, 3, 4], [1, 4], [4], []):
        want = [list(range(c * chunk, min(n, (c + 1) * chunk)))[b:b + batch]
                for c in todo for b in range(0, len(range(c * chunk, min(n, (c + 1) * chunk))), batch)]
        got = ChunkBatches(todo, n, chunk, batch)
        assert list(got) == want and len(got) == len(want) and got.rows == sum(map(len, want))
    tracemalloc.start()
    big = ChunkBatches(range(0, 10**6, 8), 10**9, 1000, 64)  # 125M rows of one process of 8
    first = list(itertools.islice(iter(big), 17))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert (big.rows, len(big)) == (125 * 10**6, 125_000 * 16)
    assert first[15] == list(range(960, 1000)) and first[16] == list(range(8000, 8064))
    assert peak < 1_000_000, peak


def test_a_benchmark_may_time_a_random_init_coca():
    """bench/caption_throughput.py times a random-init coca_ViT-B-32 on purpose: the library lets
    it through only when asked (random_init=True)."""
    from alip.caption.backends import GenSettings, build_captioner
    cap = build_captioner("open_clip", "coca_ViT-B-32", "", GenSettings(decoding="greedy"),
                          random_init=True)
    assert cap.model_name == "coca_ViT-B-32"
