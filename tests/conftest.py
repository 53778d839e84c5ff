"""Suite-wide: the data tools' shard caches (index, verify results, text lengths) go to a
directory of this test session, removed at its end, never the user's ~/.cache/alip. Tests that
need their own (the ``cache_dir`` fixture of data_fixtures) set ALIP_CACHE_DIR themselves."""
import os
import shutil
import tempfile

_DIR = None


def pytest_configure(config):
    global _DIR
    _DIR = tempfile.mkdtemp(prefix="alip-test-cache-")
    os.environ["ALIP_CACHE_DIR"] = _DIR  # subprocesses (train.py, data2rec.py) inherit it


def pytest_unconfigure(config):
    if _DIR:
        shutil.rmtree(_DIR, ignore_errors=True)
