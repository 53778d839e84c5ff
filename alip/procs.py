"""A run's processes: the exclusive lock on its output directory, and pool workers that die with it.

Why this exists: a data2rec run with ``--workers N`` forks its pool after it has taken the flock
on its output dir. A forked child shares the locked open file, and an flock is released only when
every process sharing it has closed it; the workers themselves block forever on their task queue
once the parent is gone. So a parent killed by the OOM killer or a job's hard kill used to leave
orphan workers that held the lock for ever, and the documented recovery (rerun the same command)
was refused with "another data2rec run (pid <the dead pid>) is writing". Here:

* ``acquire`` takes the lock and records ``host pid start-time``; a forked child closes its copy
  of every lock this process holds (``os.register_at_fork``), so no worker ever holds one;
* a lock still held although its recorded process is gone (orphans of an older version, or any
  other process that inherited it) is stale: ``acquire`` replaces the lock file and goes on;
* ``die_with_parent`` (a pool's worker initializer calls it) makes a worker end when its parent
  ends: PR_SET_PDEATHSIG on Linux, and a thread that watches the parent pid everywhere.
"""
import errno
import os
import socket
import sys
import threading
import time

_HELD = {}  # id -> lock file object held by this process (closed in forked children)


class Held(Exception):
    """The lock is held by a live process; ``holder`` says which ("pid 123 on host h")."""

    def __init__(self, holder):
        super().__init__(holder)
        self.holder = holder


class NoLocking(Exception):
    """The file system does not lock files (``reason``: its strerror); the caller decides."""

    def __init__(self, reason):
        super().__init__(reason)
        self.reason = reason


def _close_inherited_locks():
    """In a forked child: close this child's copies of the parent's lock files. Closing a copy
    never unlocks the parent (flock is released when the last copy closes, and close is not
    LOCK_UN), and it keeps the child from holding the lock after the parent is gone."""
    for f in list(_HELD.values()):
        try:
            f.close()
        except OSError:
            pass
    _HELD.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_inherited_locks)


def _stat(pid):
    """(state, start time in clock ticks since boot) of a process from Linux /proc, or (None,
    None): the start time with the pid names one process, not whichever later reuses the pid;
    state Z is a run that has ended but was not yet reaped by its parent."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return fields[0].decode(), fields[19].decode()
    except (OSError, IndexError):
        return None, None


def _record():
    start = _stat(os.getpid())[1]
    return f"{socket.gethostname()} {os.getpid()}" + (f" {start}" if start else "")


def _parse(text):
    """(host or None, pid or None, start or None) of a lock file's record; an older data2rec
    wrote the bare pid (host None: it is taken as this host's, where that version ran)."""
    parts = text.split()
    if len(parts) == 1 and parts[0].isdigit():
        return None, int(parts[0]), None
    if len(parts) in (2, 3) and parts[1].isdigit():
        return parts[0], int(parts[1]), parts[2] if len(parts) == 3 else None
    return None, None, None


def describe(text):
    """A lock record as an error message names it."""
    host, pid, _ = _parse(text)
    if pid is None:
        return "pid ?"
    return f"pid {pid}" + (f" on {host}" if host and host != socket.gethostname() else "")


def is_stale(text):
    """True when the record names a process of this host that is gone (or a reused pid)."""
    host, pid, start = _parse(text)
    if pid is None or (host is not None and host != socket.gethostname()):
        return False  # unknown, or another machine's: only its own host can tell
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # alive, another user's
    state, started = _stat(pid)
    return state == "Z" or (start is not None and started not in (None, start))


def _same_file(f, path):
    try:
        a, b = os.fstat(f.fileno()), os.stat(path)
    except FileNotFoundError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _replace_stale(f, path):
    """Unlink ``path`` if it is still the stale file ``f``, under an flock on its directory so
    two runs recovering at once cannot both replace it (each would then lock its own file)."""
    import fcntl

    guard = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
    try:
        try:
            fcntl.flock(guard, fcntl.LOCK_EX)
        except OSError:
            pass  # no directory locks here: the inode check below still narrows the race
        if _same_file(f, path):
            os.unlink(path)
    finally:
        os.close(guard)


def acquire(path, tool):
    """The open file ``path``, exclusively flock'd and holding this process's record, kept open
    (closed by ``release``, or by the process's death). Raises Held when a live process holds it,
    NoLocking when the file system has no locks; a lock whose recorded process is gone is stale:
    the file is replaced (a note on stderr, from ``tool``, names the dead process) and taken."""
    import fcntl

    for _ in range(5):
        f = open(path, "a+", errors="replace")  # the record is ASCII; anything else reads as "pid ?"
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            f.seek(0)
            text = f.read().strip()
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                f.close()
                raise NoLocking(e.strerror) from None
            if not is_stale(text):
                f.close()
                raise Held(describe(text)) from None
            print(f"{tool}: note: {path}: the process that held it ({describe(text)}) is gone, but its lock "
                  "was still held (orphaned worker processes?); taking it over", file=sys.stderr)
            _replace_stale(f, path)
            f.close()
            continue
        if not _same_file(f, path):  # replaced as stale between our open and our lock
            f.close()
            continue
        f.seek(0)
        f.truncate()
        f.write(_record() + "\n")
        f.flush()
        _HELD[id(f)] = f
        return f
    raise Held(f"{path} kept changing while it was being locked")


def release(f):
    """Close a lock file from ``acquire`` (which releases the flock)."""
    _HELD.pop(id(f), None)
    f.close()


def die_with_parent(parent_pid, interval=0.5):
    """Make this (worker) process end when the process ``parent_pid`` ends: a pool worker
    otherwise blocks on its task queue for ever, an orphan. On Linux the kernel sends SIGKILL
    (PR_SET_PDEATHSIG); everywhere a daemon thread checks the parent pid every ``interval``
    seconds and exits the process (also when a task is stuck in a blocking call)."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes
            import signal
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG = 1
        except (OSError, AttributeError):
            pass  # the watchdog below still ends it
    if os.getppid() != parent_pid:  # the parent died before the line above took effect
        os._exit(1)

    def watch():
        while os.getppid() == parent_pid:
            time.sleep(interval)
        os._exit(1)

    threading.Thread(target=watch, name="die-with-parent", daemon=True).start()
