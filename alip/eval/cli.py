"""The eval CLIs' top level: an expected failure (a missing or unreadable dataset, image,
annotation or checkpoint) ends the program with one line naming the file, not a traceback."""
import re
import sys


def one_line(error):
    """The message of ``error`` as one line. An error re-raised from a DataLoader worker carries
    the worker's traceback; its last line holds the original message."""
    text = str(error).strip()
    if "Original Traceback" in text:
        text = re.sub(r"^[\w.]+: ", "", text.splitlines()[-1].strip())
    return " ".join(text.split()) or type(error).__name__


def run_cli(main, prog, argv=None):
    """``main(argv)``'s return code; ValueError / OSError (FileNotFoundError, PIL's errors)
    become ``PROG: error: MESSAGE`` on stderr and exit status 1."""
    try:
        return main(argv)
    except (ValueError, OSError) as e:
        print(f"{prog}: error: {one_line(e)}", file=sys.stderr)
        return 1
