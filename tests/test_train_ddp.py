"""2 gloo processes x batch B == 1 process x batch 2B, for ALIP and CLIP.

Semantics (open_clip's): every rank computes the loss over the all-gathered global batch with
gradient through its local rows only, and DDP averages, so a rank's parameter gradient is 1/W
of the single-process one. AdamW is invariant to that scale (up to eps), so the runs match with
gradient clipping off; with clipping the threshold acts on the 1/W-scaled norm, as in the
reference. A non-finite batch on ONE rank makes every rank skip that step.
"""
import pytest
import torch
import torch.multiprocessing as mp

from test_train_helpers import (assert_weights_close, final_state, free_port, gloo_worker, read_results, run_single,
                                tiny_argv)


@pytest.mark.parametrize("method", ["alip", "clip"])
def test_two_processes_equal_one_with_global_batch(tmp_path, method):
    # eps 1e-12: takes AdamW's eps out of the 1/W gradient-scale comparison
    common = ["--method", method, "--grad-clip-norm", "0", "--lr", "5e-3", "--eps", "1e-12"]
    # a NaN image batch on rank 1 at epoch 0 batch 2 == NaN in the global batch's second half
    bad = [(0, 2)]
    mp.spawn(gloo_worker, nprocs=2, join=True,
             args=(2, free_port(), tiny_argv(tmp_path, "ddp", *common, batch=8, epochs=2),
                   bad, [1]))
    run_single(tiny_argv(tmp_path, "one", *common, batch=16, epochs=2), bad=bad)

    ddp, one = read_results(tmp_path / "ddp"), read_results(tmp_path / "one")
    assert [r["step"] for r in ddp] == [r["step"] for r in one] == list(range(1, 9))
    assert [r["skipped"] for r in ddp] == [r["skipped"] for r in one] == [False, False, True] + [False] * 5
    keys = ["loss"] + (["loss_raw", "loss_caption", "ema_tc", "ema_it", "ema_ic",
                        "w_sample_mean", "w_text_mean", "w_caption_mean"] if method == "alip" else [])
    for a, b in zip(ddp, one):
        for k in keys:
            if not a["skipped"]:
                assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-6), (a["step"], k)
        assert a["lr"] == b["lr"]
    sd_ddp, sd_one = final_state(tmp_path / "ddp", "epoch_2"), final_state(tmp_path / "one", "epoch_2")
    assert not any(k.startswith("module.") for k in sd_ddp)
    assert_weights_close(sd_ddp, sd_one, rtol=1e-3, atol=1e-4)
    # the training moved the weights (so equality above is not trivial)
    init = final_state(tmp_path / "one", "epoch_1")
    assert any(not torch.equal(init[k], sd_one[k]) for k in sd_one)
