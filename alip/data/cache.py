"""Where the data tools cache what they learned about a shard (its index, verification, text
lengths), and the one way arrays go through that cache."""
import hashlib
import os

import numpy as np

from ..atomic import replacing


def cache_path(kind, files, ident, suffix):
    """``$ALIP_CACHE_DIR`` (default ``~/.cache/alip``) ``/KIND/<sha1>SUFFIX``, the hash over
    ``ident`` (a list) and the absolute paths, sizes and mtimes of ``files``: any change to one
    of them is a new entry. Raises OSError if a file is missing."""
    key = list(ident) + [(os.path.abspath(p), os.stat(p).st_size, os.stat(p).st_mtime_ns)
                         for p in files]
    root = os.environ.get("ALIP_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "alip")
    return os.path.join(root, kind, hashlib.sha1(repr(key).encode()).hexdigest() + suffix)


def cached_array(kind, files, ident, build, valid, mmap=False):
    """``build()`` through the cache: the .npy at ``cache_path(kind, files, ident)`` when it
    loads and ``valid(array)`` holds, else ``build()``'s array, saved there for the next time
    (atomically: concurrent ranks each write their own temporary file). An unreadable or
    unwritable cache only costs a rebuild. ``mmap``: the array comes back memory-mapped,
    read-only, so the processes of a machine share one copy through the page cache.
    Returns (array, path of the cached file or None)."""
    try:
        path = cache_path(kind, files, ident, ".npy")
    except OSError:
        return build(), None
    try:
        got = np.load(path, mmap_mode="r" if mmap else None)
        if valid(got):
            return got, path
    except (OSError, ValueError):
        pass
    array = build()
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with replacing(path, "wb") as f:
            np.save(f, array)
        return (np.load(path, mmap_mode="r") if mmap else array), path
    except (OSError, ValueError):
        return array, None
