"""The recipes in configs/: every one parses, builds its method on its model (on the meta device,
so ViT-B/32 costs nothing), and the full-scale YFCC15M recipes of the DeCLIP toolbox's methods
carry the toolbox's optimisation and views (docs/methods.md §8.3), with a global batch that
start-up enforces and a launcher that runs them."""
import re
from pathlib import Path

import open_clip
import pytest

import alip  # noqa: F401  (registers the model configs)
from alip.methods import get_method
from alip.training.params import parse_args

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
YFCC = [p for p in CONFIGS if p.name.startswith("yfcc15m_")]

# docs/methods.md §8.3: peak lr ("warmup_lr"), start lr ("base_lr"), wd, per-GPU batch x 32
# GPUs, model (the toolbox's ViT-B/32: QuickGELU, text projection with bias), image views
TOOLBOX = {
    "slip": (5e-4, 1e-4, 0.5, "DeCLIP-ViT-B-32", ["slip_base", "mocov2", "mocov2"]),   # §3.2
    "declip": (1e-3, 1e-4, 0.1, "DeCLIP-ViT-B-32", ["mocov2", "mocov2"]),              # §4
    "filip": (5e-4, 1e-4, 0.5, "DeCLIP-ViT-B-32", ["mocov2"]),                          # §5
    "defilip": (1e-3, 1e-4, 0.1, "DeCLIP-ViT-B-32", ["mocov2", "mocov2"]),             # §6
}


def recipe(path):
    args = parse_args(["--config", str(path)])
    method = get_method(args.method)(args)
    model = open_clip.create_model(args.model, device="meta", **method.model_kwargs())
    return args, method.attach(model)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_recipe_builds_its_method_on_its_model(path):
    args, method = recipe(path)
    assert method.encoder is not None and method.criterion is not None


@pytest.mark.parametrize("path", YFCC, ids=[p.stem for p in YFCC])
def test_yfcc_recipes_enforce_their_global_batch_and_name_their_launcher(path):
    args, _ = recipe(path)
    gpus = args.global_batch_size // args.batch_size
    assert args.global_batch_size == 4096 and gpus * args.batch_size == 4096
    header = path.read_text().split("\nmethod:")[0]
    launch = re.search(r"Launch on (\d+) GPUs[^:]*: scripts/(\S+\.sh)", header)
    assert launch and int(launch.group(1)) == gpus, header
    launcher = launch.group(2)
    script = (REPO / "scripts" / launcher).read_text()
    assert f"configs/{path.name}" in script  # the launcher's default CONFIG is this recipe


@pytest.mark.parametrize("name", sorted(TOOLBOX))
def test_toolbox_recipes_carry_the_toolbox_settings(name):
    args, method = recipe(REPO / "configs" / f"yfcc15m_vit_b32_{name}.yaml")
    lr, start, wd, model, views = TOOLBOX[name]
    assert (args.lr, args.warmup_start_lr, args.wd, args.model) == (lr, start, wd, model)
    assert (args.warmup, args.schedule, args.batch_size, args.grad_clip_norm) == (2500, "cosine", 128, 0)
    assert [v.recipe for v in method.data.image_views] == views
    assert open_clip.get_model_config(model)["quick_gelu"] is True
