"""Which .rec files a data argument names: one place the loader, verify and train.py's checks
share (it depends on nothing else in alip.data, so they import it without a circle)."""
import glob
import os


def rec_paths(data):
    """The .rec files of a data2rec output dir (train-*.rec, sorted) or an explicit list."""
    if isinstance(data, (str, os.PathLike)):
        data = str(data)
        if os.path.isdir(data):
            paths = sorted(glob.glob(os.path.join(data, "train-*.rec")))
            if not paths:
                raise FileNotFoundError(f"{data}: no train-*.rec shards (is it a data2rec output dir?)")
            return paths
        data = [data]
    paths = [str(p) for p in data]
    for p in paths:
        if not p.endswith(".rec") or not os.path.exists(p):
            raise FileNotFoundError(f"{p}: not an existing .rec file")
    if not paths:
        raise ValueError("no .rec files given")
    seen = {}
    for p in paths:  # the same shard twice would be read twice every epoch
        first = seen.setdefault(os.path.realpath(p), p)
        if first is not p:
            raise ValueError(f"{p}: the same shard as {first}, listed twice")
    return paths
