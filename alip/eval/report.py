"""Result tables and JSON output shared by the eval CLIs."""
import json
import math

from ..atomic import write_text
from .datasets import ALIP_TABLE, TITLES


def headline(metrics):
    """The number the protocol reports (mean-per-class accuracy where it uses it, else top-1)."""
    return metrics["mean_per_class"] if metrics.get("uses_mean_per_class") else metrics["top1"]


def table(results):
    """The ALIP README's zero-shot table (one row) for ``results`` {dataset: metrics}, with the mean
    over the datasets present: the README's "Average" when they are its 11, else "Mean of N"."""
    names = [n for n in ALIP_TABLE if n in results] + [n for n in results if n not in ALIP_TABLE]
    scores = [headline(results[n]) for n in names]
    label = "Average" if sorted(names) == sorted(ALIP_TABLE) else f"Mean of {len(names)}"
    header = [TITLES.get(n, n) for n in names] + [label]
    mean = sum(scores) / len(scores) if scores else math.nan
    values = [f"{s:.1f}" for s in scores] + [f"{mean:.1f}"]
    widths = [max(len(h), len(v)) for h, v in zip(header, values)]
    line = lambda cells: "| " + " | ".join(c.rjust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", line(values)]), mean


def json_safe(x):
    """NaN (top5 below 5 classes, an empty mean) -> null, so the file is strict JSON."""
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    return None if isinstance(x, float) and math.isnan(x) else x


def write_json(path, **content):
    """``content`` as strict JSON at ``path``, written whole or not at all (``alip.atomic``)."""
    write_text(path, json.dumps(json_safe(content), indent=2))
