"""The eval CLIs' top level: an expected failure (a missing or unreadable dataset, image,
annotation or checkpoint, a flag out of range) ends the program with one line naming the file or
flag, not a traceback; what can be checked before the model is loaded is (``check_args``)."""
import os
import sys

from alip.cli import interval_error, one_line, resolve_device

# Valid range of the eval CLIs' numeric flags (train.py's notation: "[" / "]" include the bound,
# "(" / ")" exclude it); a flag a CLI does not have is skipped.
RANGES = {"batch_size": "[1, inf)", "workers": "[0, inf)", "val_fraction": "(0, 1)",
          "max_iter": "[1, inf)", "seed": "[0, 4294967295]"}  # sklearn's random_state range


def check_output(path):
    """Make ``--output``'s folder (as scripts/run_*.sh do) and check a file can be written there,
    so a bad path fails before the evaluation, not after it; raises OSError naming the flag."""
    if path is None:
        return
    if os.path.isdir(path):
        raise IsADirectoryError(f"--output {path} is a directory; give a file name (e.g. "
                                f"{os.path.join(path, 'results.json')})")
    parent = os.path.dirname(os.path.abspath(path))
    above = parent
    while not os.path.exists(above):
        above = os.path.dirname(above)
    if not os.path.isdir(above):
        raise NotADirectoryError(f"--output {path}: {above} is a file, not a folder")
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as e:
        raise OSError(f"--output {path}: cannot make its folder {parent} "
                      f"({e.strerror or type(e).__name__})") from e
    if not os.access(parent, os.W_OK | os.X_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise PermissionError(f"--output {path}: not writable")


def check_args(args):
    """The checks of every eval CLI that need no model and no data: numeric flags in range,
    ``--device`` (resolved in place: ``auto`` -> cuda or cpu), that ``--checkpoint`` exists, and
    ``--output``. Raises ValueError / OSError (one line each, naming the flag or file)."""
    for dest in RANGES:
        value = getattr(args, dest, None)
        why = None if value is None else interval_error(RANGES[dest], value)
        if why:
            raise ValueError(f"--{dest.replace('_', '-')} {why}")
    args.device = resolve_device(args.device)
    checkpoint = getattr(args, "checkpoint", None)
    if checkpoint is not None:
        from .load import checkpoint_path_error  # imports open_clip: only when one is given
        why = checkpoint_path_error(checkpoint)
        if why is not None:
            raise why
    check_output(getattr(args, "output", None))


def run_cli(main, prog, argv=None):
    """``main(argv)``'s return code; ValueError / OSError (FileNotFoundError, PIL's errors)
    become ``PROG: error: MESSAGE`` on stderr and exit status 1."""
    try:
        return main(argv)
    except (ValueError, OSError) as e:
        print(f"{prog}: error: {one_line(e)}", file=sys.stderr)
        return 1
