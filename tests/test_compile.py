"""--torchcompile (alip/training/compile.py): the compiled image tower trains like eager within
fp32 rounding (ALIP and CLIP, CPU, a few steps); no working compiler, or a tower the compiler
refuses, is one warning and eager training."""
import logging

import pytest
import torch

from alip.training import compile as tc
from alip.training.loop import main
from test_train_helpers import assert_weights_close, final_state, read_results, tiny_argv


# a C++ compiler that fails, as on a machine without g++ (and no cached kernels to fall back on)
NO_CXX = {"cpp.cxx": (None, "/bin/false"), "force_disable_caches": True}


def losses(tmp_path, name, method, *extra):
    assert main(tiny_argv(tmp_path, name, "--method", method, "--lr", "5e-3", *extra,
                          samples=32, batch=8)) == 0
    return [r["loss"] for r in read_results(tmp_path / name)]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["alip", "clip"])
def test_compiled_trains_like_eager(tmp_path, method, capfd):
    """4 steps: the losses agree to 1e-5 (relative) and the final weights to 1e-5 but for
    Adam's outliers. Inductor
    fuses and re-associates the tower's fp32 sums (each ~1e-7 relative); 4 Adam steps at lr
    5e-3 carry that to ~1e-6 (measured: 1.4e-6 on CLIP's loss of 2.5), 10x inside."""
    eager = losses(tmp_path, "eager", method)
    capfd.readouterr()
    compiled = losses(tmp_path, "compiled", method, "--torchcompile")
    err = capfd.readouterr().err  # the run's log (alip.train does not propagate)
    assert "--torchcompile: image tower compiled" in err
    assert "at its first call (the compile)" in err
    assert "cannot compile" not in err and "does not run" not in err
    assert compiled == pytest.approx(eager, rel=1e-5)
    a, b = final_state(tmp_path / "eager", "epoch_1"), final_state(tmp_path / "compiled", "epoch_1")
    assert a.keys() == b.keys()  # the compiled tower keeps its parameter names
    # where a gradient is ~0 Adam turns its float noise into +-lr steps: a few outliers
    # (measured: 1 of 4096 in one ALIP tensor, 1.4e-5 apart)
    assert_weights_close(a, b, rtol=1e-5, atol=1e-5, max_outliers=1e-4)


@pytest.mark.slow
def test_without_a_working_compiler_one_warning_and_eager(tmp_path, capfd):
    """A C++ compiler that fails (as on a machine without g++): the probe finds it before the
    model is trained, one warning says so, and the run is the eager run bit for bit."""
    import torch._dynamo
    import torch._inductor.config as inductor_config
    eager = losses(tmp_path, "eager", "clip")
    torch._dynamo.reset()
    capfd.readouterr()
    with inductor_config.patch(NO_CXX):
        fallback = losses(tmp_path, "fallback", "clip", "--torchcompile")
    said = [ln for ln in capfd.readouterr().err.splitlines() if "--torchcompile" in ln]
    assert len(said) == 1 and "| WARNING | --torchcompile: torch.compile does not run on cpu " \
        "here (InvalidCxxCompiler: No working C++ compiler found" in said[0], said
    assert fallback == eager
    torch._dynamo.reset()


@pytest.fixture
def no_cxx():
    import torch._dynamo
    import torch._inductor.config as inductor_config
    torch._dynamo.reset()
    with inductor_config.patch(NO_CXX):  # torch's own config patch: restored however it ends
        yield
    torch._dynamo.reset()


def test_the_probe_names_a_missing_compiler(no_cxx):
    why = tc.compiler_error("cpu")
    assert why.startswith("InvalidCxxCompiler: No working C++ compiler found") and "\n" not in why
    assert "TORCHDYNAMO_VERBOSE" not in why


def test_a_tower_that_does_not_compile_runs_eager_after_one_warning(caplog):
    def refuse(gm, example_inputs):
        raise RuntimeError("this backend takes nothing")

    tower = torch.nn.Linear(3, 2)
    x = torch.randn(4, 3)
    want = tower(x)
    fwd = tc._CompiledForward(tower, "image tower", logging.getLogger("t"), backend=refuse)
    tower.forward = fwd
    with caplog.at_level(logging.INFO, logger="t"):
        got = [tower(x) for _ in range(3)]
    assert all(torch.equal(g, want) for g in got) and fwd.failed
    assert len(caplog.records) == 1 and "the image tower cannot compile" in caplog.text
    assert "this backend takes nothing" in caplog.text
    assert [n for n, _ in tower.named_parameters()] == ["weight", "bias"]


def test_the_flag_off_compiles_nothing():
    class Cfg:
        torchcompile = False
    model = torch.nn.Module()
    model.visual = torch.nn.Linear(2, 2)
    assert tc.compile_towers(Cfg, model, "cpu") == [] and "forward" not in vars(model.visual)
