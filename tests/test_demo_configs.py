"""scripts/demo.sh trains every method with one recipe: a config per method, and the keys that
make the comparison fair (data reading, model family and its ViT style, batch, epochs, optimiser,
schedule, seed)
are the same in all of them."""
from pathlib import Path

import open_clip
import yaml

import alip  # noqa: F401  (registers the model configs)
from alip.methods import method_names

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
RECIPE = ("data-backend", "batch-size", "epochs", "lr", "wd", "schedule", "pct-start",
          "grad-clip-norm", "precision", "seed", "vit-style")


def _configs():
    return {m: yaml.safe_load((CONFIGS / f"demo_{m}.yaml").read_text()) for m in method_names()}


def test_every_method_has_a_demo_config_naming_itself():
    for method, cfg in _configs().items():
        assert cfg["method"] == method and cfg["name"] == f"demo-{method}"


def test_demo_configs_share_one_recipe_and_one_vision_tower():
    cfgs = _configs()
    for key in RECIPE:
        values = {m: c.get(key) for m, c in cfgs.items()}
        assert len(set(map(repr, values.values()))) == 1, (key, values)
    # the methods' references build their ViTs differently (--vit-style reference): the demo
    # names one tower for all of them
    assert cfgs["clip"].get("vit-style") in ("open_clip", "toolbox")
    towers = {m: open_clip.get_model_config(c["model"])["vision_cfg"] for m, c in cfgs.items()}
    assert len({repr(sorted(t.items())) for t in towers.values()}) == 1, towers


def test_the_caption_mixing_demo_is_demo_clip_with_mixed_raw_text():
    mix = yaml.safe_load((CONFIGS / "demo_clip_mix.yaml").read_text())
    clip = _configs()["clip"]
    mixing = {"raw-fields": "raw,caption", "raw-field-probs": "0.2,0.8", "name": "demo-clip-mix"}
    assert {k: mix[k] for k in mixing} == mixing
    assert {k: v for k, v in mix.items() if k not in mixing} == {
        k: v for k, v in clip.items() if k != "name"}


def test_a_longer_budget_row_is_its_methods_config_with_more_epochs():
    """demo_<method>_<N>ep.yaml: the method's demo config at N epochs, nothing else changed (the
    report's row says so; the same-budget row stays beside it)."""
    rows = sorted(CONFIGS.glob("demo_*_*ep.yaml"))
    assert [p.stem for p in rows] == ["demo_clip_3ep", "demo_siglip_4ep"]
    for path in rows:
        method, epochs = path.stem[len("demo_"):].rsplit("_", 1)
        longer = yaml.safe_load(path.read_text())
        same = _configs()[method]
        assert longer["epochs"] == int(epochs[:-2]) > same["epochs"]
        assert longer["name"] == f"demo-{method}_{epochs}"
        assert {k: v for k, v in longer.items() if k not in ("epochs", "name")} == {
            k: v for k, v in same.items() if k not in ("epochs", "name")}


def test_the_long_caption_rows_are_demo_alip_reading_the_detailed_captions():
    """demo_alip_long: the detailed captions whole (256-token tower); demo_alip_long77: the same
    captions cut to a 77-token row, the tower at 77. Nothing else differs from demo_alip."""
    alip_cfg = _configs()["alip"]
    differ = {"alip_long": {"caption-fields": "detailed", "text-context": 256,
                            "name": "demo-alip-long"},
              "alip_long77": {"caption-fields": "detailed77", "name": "demo-alip-long77"}}
    for row, keys in differ.items():
        cfg = yaml.safe_load((CONFIGS / f"demo_{row}.yaml").read_text())
        assert {k: cfg[k] for k in keys} == keys
        assert {k: v for k, v in cfg.items() if k not in keys} == {
            k: v for k, v in alip_cfg.items() if k != "name"}
