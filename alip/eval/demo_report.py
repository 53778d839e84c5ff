"""The demo's report: every method's held-out numbers in the ALIP README's table shape, and the
plots a researcher would put in a paper (training loss per method, R@1 per method, and ALIP's
gate weights over training split by the demo world's noise labels).

``build_report(out_dir, methods, world_dir)`` reads what scripts/demo.sh leaves in ``out_dir``
(``runs/demo-<method>/results.jsonl`` and ``checkpoints/``, ``retrieval_<method>.json``,
``zeroshot_<method>.json``, ``timings.tsv`` if present) and writes ``report.md`` plus
``loss.png``, ``recall.png`` and ``gates.png`` beside it. Plots are drawn with matplotlib's Agg
backend (no display).
"""
import json
from pathlib import Path

import torch

NOISE_ORDER = ("clean", "partial", "wrong", "mismatched")


def _json(path):
    return json.loads(Path(path).read_text())


def _metrics(path, saved=None):
    """An eval JSON's metrics (``saved``: that JSON, already read)."""
    m = (saved or _json(path))["metrics"]
    return m if "top1" in m or "i2t_R@1" in m else next(iter(m.values()))


def _train_rows(run_dir):
    rows = [json.loads(line) for line in (Path(run_dir) / "results.jsonl").read_text().splitlines()]
    return [r for r in rows if r.get("kind") == "train"]


def collect(out_dir, methods):
    """-> {method: {"train": rows, "retrieval": metrics, "zeroshot": metrics}}."""
    out = Path(out_dir)
    return {m: {"train": _train_rows(out / "runs" / f"demo-{m}"),
                "retrieval": _metrics(out / f"retrieval_{m}.json"),
                "zeroshot": _metrics(out / f"zeroshot_{m}.json")} for m in methods}


# config.yaml keys that name a run rather than how it trains, or follow from other keys
NOT_RECIPE = ("config", "name", "method", "logs", "train_data", "flags_given", "total_steps")


def is_long_row(row):
    """A long-caption row (``alip_long``, ``alip_long77``): trained on the detailed captions."""
    return "_long" in row


def demo_rows(config_dir):
    """The rows ``scripts/demo.sh`` trains by default: one per method (``configs/demo_<method>.yaml``,
    in the registry's order), then every other ``demo_<row>.yaml`` (a method with another budget
    or data, e.g. ``clip_mix``), sorted, the long-caption rows (``is_long_row``) last."""
    from ..methods import method_names
    methods = list(method_names())
    extra = sorted((p.stem[len("demo_"):] for p in Path(config_dir).glob("demo_*.yaml")),
                   key=lambda r: (is_long_row(r), r))
    return methods + [r for r in extra if r not in methods]


def recipes(out_dir, rows, base="clip"):
    """How each row trained beyond the ``base`` row's recipe: {row: "78 steps; key value, ..."},
    from the runs' config.yaml (every flag, resolved) and results.jsonl (the last step); the
    keys that differ from ``base``'s run, its method's own defaults included. {} when ``base``
    was not trained."""
    out = Path(out_dir)
    runs = {r: out / "runs" / f"demo-{r}" for r in rows}
    if base not in rows or not (runs[base] / "config.yaml").is_file():
        return {}
    import yaml
    ref = yaml.safe_load((runs[base] / "config.yaml").read_text())
    notes = {}
    for r, run in runs.items():
        cfg = yaml.safe_load((run / "config.yaml").read_text()) if (run / "config.yaml").is_file() else {}
        steps = max((row["step"] for row in _train_rows(run)), default=0)
        moot = {"accum_mode"} if cfg.get("accum_freq", 1) == ref.get("accum_freq", 1) == 1 else set()
        diff = [f"{k.replace('_', '-')} {cfg[k]}" for k in cfg
                if k not in NOT_RECIPE and k not in moot and ref.get(k) != cfg[k]]
        notes[r] = "; ".join([f"{steps} steps"] + ([", ".join(diff)] if diff else []))
    return notes


def timings(out_dir):
    """``timings.tsv`` (scripts/demo.sh: method, train seconds, eval seconds per line) ->
    {method: (train_s, eval_s)}; {} when the file is absent."""
    path = Path(out_dir) / "timings.tsv"
    if not path.is_file():
        return {}
    out = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        parts = line.split("\t")
        if len(parts) != 3:
            raise ValueError(f"{path}:{n}: expected 'method<TAB>train_s<TAB>eval_s', got {line!r}")
        out[parts[0]] = (float(parts[1]), float(parts[2]))
    return out


def timing_table(times):
    """Wall seconds per method: training (world read, steps, checkpoints) and evaluation."""
    lines = ["| method | train (s) | eval (s) |", "|---|---:|---:|"]
    return "\n".join(lines + [f"| {m} | {t:.0f} | {e:.0f} |" for m, (t, e) in times.items()])


def chance(world_dir):
    """Chance levels of the held-out splits: R@K of a random ranking, 1/classes."""
    world = Path(world_dir)
    ann = _json(world / "retrieval" / "dataset_demo.json")
    test = [im for im in ann["images"] if im["split"] == "test"]
    n_img, n_txt = len(test), sum(len(im["sentences"]) for im in test)
    per_image = n_txt / n_img
    classes = [c for c in (world / "classify" / "classnames.txt").read_text().splitlines() if c]
    out = {"n_img": n_img, "n_txt": n_txt, "classes": len(classes), "top1": 100 / len(classes)}
    for k in (1, 5, 10):
        out[f"i2t_R@{k}"] = 100 * min(1.0, k * per_image / n_txt)
        out[f"t2i_R@{k}"] = 100 * min(1.0, k / n_img)
    return out


def table(results, ref, notes=None):
    """The ALIP README's retrieval table shape (I->T and T->I R@1/5/10) plus zero-shot top-1,
    and with ``notes`` ({row: text}, ``recipes``) a last column saying how each row trained."""
    cols = [f"i2t_R@{k}" for k in (1, 5, 10)] + [f"t2i_R@{k}" for k in (1, 5, 10)]
    head = "| method | I->T R@1 | R@5 | R@10 | T->I R@1 | R@5 | R@10 | zero-shot top-1 |"
    rule = "|---|---:|---:|---:|---:|---:|---:|---:|"
    if notes:
        head, rule = head + " trained (beyond clip's recipe) |", rule + "---|"
    row = lambda name, r, z, extra=(): "| " + " | ".join(  # noqa: E731
        [name] + [f"{r[c]:.1f}" for c in cols] + [f"{z:.1f}"] + list(extra)) + " |"
    lines = [head, rule, row("chance", ref, ref["top1"], [""] if notes else [])]
    lines += [row(m, v["retrieval"], v["zeroshot"]["top1"], [notes[m]] if notes else [])
              for m, v in results.items()]
    return "\n".join(lines)


def _caption_setting(run_dir):
    """How a run read its captions, from its config.yaml: field, tower context, view."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        return ""
    import yaml
    cfg = yaml.safe_load(path.read_text())
    fields = cfg.get("caption_fields") or "caption"
    fields = ",".join(fields) if isinstance(fields, list) else fields
    view = cfg.get("caption_view")
    cut = f", {view} to {cfg.get('caption_tokens')} tokens" if view not in (None, "full") else ""
    return f"{fields}{cut}; tower {cfg.get('text_context') or 77}"


def _cut(truncation):
    """eval_retrieval's truncation report as 'T of N (L tokens lost)', or 'none'."""
    if not truncation or not truncation.get("truncated_texts"):
        return "none"
    return (f"{truncation['truncated_texts']:,} of {truncation['texts']:,} "
            f"({truncation['tokens_lost']:,} tokens lost)")


def long_table(out_dir, rows, ref):
    """The long-caption rows (and ALIP's usual row) on the usual split and the long-text one
    (``retrieval_long_<row>.json``): R@1 and R@5 both ways, and how many long texts each
    model's context cut. "" when no row of ``rows`` was evaluated on the long split."""
    out = Path(out_dir)
    picked = [r for r in rows if (r == "alip" or is_long_row(r))
              and (out / f"retrieval_long_{r}.json").is_file()]
    if not picked:
        return ""
    cols = ("i2t_R@1", "t2i_R@1", "i2t_R@5", "t2i_R@5")
    head = ("| row | captions read | usual I->T R@1 | T->I R@1 | long I->T R@1 | T->I R@1 | "
            "long I->T R@5 | T->I R@5 | long texts cut by the model's context |")
    lines = [head, "|---|---|---:|---:|---:|---:|---:|---:|---|",
             "| chance | | " + " | ".join(f"{ref[c]:.1f}" for c in cols[:2] + cols) + " | |"]
    for r in picked:
        usual, long = _metrics(out / f"retrieval_{r}.json"), _json(out / f"retrieval_long_{r}.json")
        nums = [usual[c] for c in cols[:2]] + [_metrics(None, long)[c] for c in cols]
        lines.append(f"| {r} | {_caption_setting(out / 'runs' / f'demo-{r}')} | "
                     + " | ".join(f"{v:.1f}" for v in nums) + f" | {_cut(long.get('truncation'))} |")
    return "\n".join(lines)


def _long_intro(world_dir, ref):
    """The sentence above the long-caption table (token counts from demo_world.json)."""
    path = Path(world_dir) / "demo_world.json"
    world = _json(path) if path.is_file() else {}
    d, split = world.get("detailed", {}), world.get("retrieval_long", {})
    t = d.get("tokens")
    about = (f" ({t['min']}-{t['max']} tokens, median {t['median']:.0f} in training; the details "
             f"that tell scenes apart lie past token 77 in {100 * d['late_share']:.0f}% of them)"
             if t and "late_share" in d else "")
    count = (f"{split['captions']:,} detailed captions" if "captions" in split
             else "detailed captions")
    return (f"Long-text retrieval: the same {ref['n_img']} held-out images with {count}{about}, "
            "beside the usual short captions (docs/demo.md#long-captions).")


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_loss(results, path):
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for m, v in results.items():
        rows = [r for r in v["train"] if not r.get("skipped")]
        ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label=m)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (each method's own)")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_recall(results, ref, path):
    plt = _plt()
    names = list(results)
    fig, ax = plt.subplots(figsize=(6, 3.4))
    x = torch.arange(len(names)).float()
    for i, (key, label) in enumerate((("i2t_R@1", "I->T R@1"), ("t2i_R@1", "T->I R@1"))):
        ax.bar((x + 0.4 * i - 0.2).tolist(), [results[m]["retrieval"][key] for m in names],
               width=0.4, label=label)
    ax.axhline(ref["t2i_R@1"], color="gray", linestyle=":", label="chance (T->I)")
    ax.set_xticks(x.tolist())
    ax.set_xticklabels(names)
    ax.set_ylabel("held-out R@1 (%)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


@torch.no_grad()
def gates_by_noise(world_dir, run_dir, max_rows=512, batch_size=128):
    """ALIP's gate weights on training rows split by their noise label, at every epoch checkpoint.

    Each epoch's model file is encoded on the first ``max_rows`` training rows (image, web text,
    synthetic caption, read from the world's raw/ files) and the gates are evaluated with the EMAs
    of that step (from results.jsonl) and the run's gamma (config.yaml); nothing is updated.
    -> {"epochs": [e...], "weights": {label: {"w_sample"|"w_text"|"w_caption": [mean per epoch]}},
    "counts": {label: n}}.
    """
    import open_clip
    import yaml
    from PIL import Image

    from ..loss import ALIPLoss
    world, run = Path(world_dir), Path(run_dir)
    rows = [json.loads(line) for line in (world / "raw" / "train.jsonl").read_text().splitlines()]
    rows = rows[:max_rows]
    config = yaml.safe_load((run / "config.yaml").read_text())
    train = {r["step"]: r for r in _train_rows(run)}
    index = _json(run / "checkpoints" / "index.json")
    epochs = sorted((e for e in index if e["model"].startswith("epoch_")), key=lambda e: e["epoch"])
    out = {"epochs": [], "weights": {n: {w: [] for w in ("w_sample", "w_text", "w_caption")}
                                     for n in NOISE_ORDER},
           "counts": {n: sum(r["noise"] == n for r in rows) for n in NOISE_ORDER}}
    for entry in epochs:
        model, _, preprocess = open_clip.create_model_and_transforms(
            config["model"], pretrained=str(run / "checkpoints" / entry["model"]))
        model.eval()
        tok = open_clip.get_tokenizer(config["model"])
        feats = {"img": [], "raw": [], "cap": []}
        for i in range(0, len(rows), batch_size):
            part = rows[i:i + batch_size]
            images = torch.stack([preprocess(Image.open(world / "raw" / r["image"]).convert("RGB"))
                                  for r in part])
            feats["img"].append(model.encode_image(images, normalize=True))
            feats["raw"].append(model.encode_text(tok([r["text"] for r in part]), normalize=True))
            feats["cap"].append(model.encode_text(tok([r["caption"] for r in part]), normalize=True))
        img, raw, cap = (torch.cat(feats[k]) for k in ("img", "raw", "cap"))
        logged = train.get(entry["step"]) or train[max(s for s in train if s <= entry["step"])]
        loss = ALIPLoss(gamma=config.get("alip_gamma", 2.0)).eval()
        for name in ("tc", "it", "ic"):
            getattr(loss, f"ema_{name}").fill_(logged[f"ema_{name}"])
        _, w_s, w_t, w_c = loss.gates(img, raw, cap)
        out["epochs"].append(entry["epoch"])
        labels = [r["noise"] for r in rows]
        for n in NOISE_ORDER:
            sel = torch.tensor([lab == n for lab in labels])
            for key, w in (("w_sample", w_s), ("w_text", w_t), ("w_caption", w_c)):
                out["weights"][n][key].append(float(w[sel].mean()) if sel.any() else float("nan"))
    return out


def plot_gates(gates, path):
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(10, 3.2), sharey=True)
    for ax, key in zip(axes, ("w_sample", "w_text", "w_caption")):
        for n in NOISE_ORDER:
            ax.plot(gates["epochs"], gates["weights"][n][key], marker="o",
                    label=f"{n} ({gates['counts'][n]})")
        ax.set_title(key)
        ax.set_xlabel("epoch")
    axes[0].set_ylabel("mean gate weight")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def check_inputs(out_dir, methods, world_dir, gates_run="alip"):
    """Every file ``build_report`` reads is there; else a FileNotFoundError naming the directory
    and the first missing file (before any plot is drawn or model encoded)."""
    out, world = Path(out_dir), Path(world_dir)
    if not out.is_dir():
        raise FileNotFoundError(f"--out {out} does not exist (expected scripts/demo.sh's output folder)")
    runs = [m for m in methods if (out / "runs" / f"demo-{m}" / "results.jsonl").is_file()]
    if not runs:
        raise FileNotFoundError(f"--out {out} holds no demo run of {', '.join(methods)} (no "
                                f"runs/demo-<method>/results.jsonl); run scripts/demo.sh first")
    need = [world / "retrieval" / "dataset_demo.json", world / "classify" / "classnames.txt"]
    for m in methods:
        need += [out / "runs" / f"demo-{m}" / "results.jsonl", out / f"retrieval_{m}.json",
                 out / f"zeroshot_{m}.json"]
    if gates_run in methods:
        run = out / "runs" / f"demo-{gates_run}"
        need += [run / "config.yaml", run / "checkpoints" / "index.json",
                 world / "raw" / "train.jsonl"]
    for path in need:
        if not path.is_file():
            raise FileNotFoundError(f"{out}: {path} is missing (scripts/demo.sh writes it)")


def build_report(out_dir, methods, world_dir, gates_run="alip", seconds=None, machine=None):
    """Write report.md, loss.png, recall.png (and gates.png when ``gates_run`` was trained)."""
    check_inputs(out_dir, methods, world_dir, gates_run)
    out = Path(out_dir)
    results = collect(out, methods)
    ref = chance(world_dir)
    plot_loss(results, out / "loss.png")
    plot_recall(results, ref, out / "recall.png")
    lines = [f"# Demo results on held-out data ({ref['n_img']} images, {ref['n_txt']} captions, "
             f"{ref['classes']} classes)", "", table(results, ref, recipes(out, methods)), ""]
    if seconds is not None:
        lines += [f"Trained and evaluated in {seconds / 60:.1f} minutes"
                  + (f" on {machine}." if machine else "."), ""]
    times = {m: t for m, t in timings(out).items() if m in methods}
    if times:
        lines += [timing_table(times), ""]
    long = long_table(out, methods, ref)
    if long:
        lines += ["## Long captions", "", _long_intro(world_dir, ref), "", long, ""]
    lines += ["![training loss](loss.png)", "", "![held-out R@1](recall.png)", ""]
    if gates_run in methods:
        gates = gates_by_noise(world_dir, out / "runs" / f"demo-{gates_run}")
        plot_gates(gates, out / "gates.png")
        (out / "gates.json").write_text(json.dumps(gates, indent=1))
        lines += ["ALIP's gates on training rows by their noise label (each epoch's checkpoint, "
                  "the EMAs of that step):", "", "![gate weights by noise label](gates.png)", ""]
    (out / "report.md").write_text("\n".join(lines))
    return out / "report.md"


def main(argv=None):
    import argparse
    p = argparse.ArgumentParser(description="Write demo_output/report.md and its plots.")
    p.add_argument("--out", default="demo_output")
    p.add_argument("--world", default=None, help="default: OUT/world")
    p.add_argument("--methods", nargs="+", required=True)
    p.add_argument("--seconds", type=float, default=None)
    p.add_argument("--machine", default=None)
    a = p.parse_args(argv)
    print(Path(build_report(a.out, a.methods, a.world or Path(a.out) / "world",
                            seconds=a.seconds, machine=a.machine)).read_text())
    return 0


if __name__ == "__main__":
    import sys

    from .cli import run_cli
    sys.exit(run_cli(main, "demo_report.py"))
