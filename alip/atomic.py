"""Files written whole or not at all: to a temporary name of this host and process beside the
target, fsynced, then renamed over it; a failure removes the temporary file. A reader, a crash or
another process writing the same file never leaves half a file."""
import contextlib
import os
import socket


def temp_name(path):
    """A temporary name beside ``path`` that no other process (on any machine sharing the
    directory) uses."""
    return f"{path}.{socket.gethostname()}.{os.getpid()}.tmp"


@contextlib.contextmanager
def replacing(path, mode="w", **open_kw):
    """``with replacing(path) as f:`` write ``f``; on leaving, it is fsynced and renamed over
    ``path``; on an error the temporary file is removed and ``path`` is left as it was."""
    tmp = temp_name(path)
    try:
        with open(tmp, mode, **open_kw) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text(path, text, errors="strict"):
    with replacing(path, "w", encoding="utf-8", errors=errors, newline="") as f:
        f.write(text)
