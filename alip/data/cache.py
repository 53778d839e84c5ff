"""Where the data tools cache what they learned about a shard (verification, text lengths)."""
import hashlib
import os


def cache_path(kind, files, ident, suffix):
    """``$ALIP_CACHE_DIR`` (default ``~/.cache/alip``) ``/KIND/<sha1>SUFFIX``, the hash over
    ``ident`` (a list) and the absolute paths, sizes and mtimes of ``files``: any change to one
    of them is a new entry. Raises OSError if a file is missing."""
    key = list(ident) + [(os.path.abspath(p), os.stat(p).st_size, os.stat(p).st_mtime_ns)
                         for p in files]
    root = os.environ.get("ALIP_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "alip")
    return os.path.join(root, kind, hashlib.sha1(repr(key).encode()).hexdigest() + suffix)
