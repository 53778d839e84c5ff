"""Suite-wide:
- the data tools' shard caches (index, verify results, text lengths) go to a directory of this
  test session, never the user's ~/.cache/alip (tests that need their own, the ``cache_dir``
  fixture of data_fixtures, set ALIP_CACHE_DIR themselves);
- temporary files go to another directory of this session (``tempfile`` here, TMPDIR for the
  processes tests start): libraries leave some behind (DALI's autograph writes two .py files per
  run, wandb two directories), and these never reach the machine's /tmp.
Both are removed at the session's end. pytest's own tmp_path directories stay where pytest puts
them (PYTEST_DEBUG_TEMPROOT: the machine's temp dir), kept for failed tests as pytest.ini says."""
import os
import shutil
import tempfile

import pytest
import torch

_DIRS = []


def pytest_configure(config):
    os.environ.setdefault("PYTEST_DEBUG_TEMPROOT", tempfile.gettempdir())
    cache, tmp = tempfile.mkdtemp(prefix="alip-test-cache-"), tempfile.mkdtemp(prefix="alip-test-tmp-")
    _DIRS.extend((cache, tmp))
    os.environ["ALIP_CACHE_DIR"] = cache  # subprocesses (train.py, data2rec.py) inherit it
    os.environ["TMPDIR"] = tempfile.tempdir = tmp


def pytest_unconfigure(config):
    for d in _DIRS:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def float64():
    """Model and data in float64 for the test: computations compared across summation orders
    (accumulation vs one batch, ranks vs one process, the text encoder's length groups) agree to
    ~1e-14 there, where fp32 resolves them only to ~1e-6 of a gradient's scale."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)
