"""The YFCC15M launchers (scripts/train_yfcc15m_B32_*.sh): paths are the caller's, and a
multi-node launch without its node's rank or node 0's address stops at once instead of waiting."""
import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LAUNCHER = REPO / "scripts" / "train_yfcc15m_B32_SLIP.sh"


def launch(cwd, timeout=300, **env):
    full = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "NODE_RANK")}
    full.update(env)
    return subprocess.run([str(LAUNCHER), "--device", "cpu"], cwd=cwd, env=full,
                          capture_output=True, text=True, timeout=timeout)


def test_multi_node_launch_needs_its_rank_and_the_master_address(tmp_path):
    r = launch(tmp_path, timeout=60, TRAIN_DATA="d", NNODES="4", NODE_RANK="1")
    assert r.returncode == 1 and "NNODES=4: set MASTER_ADDR to the address of node 0" in r.stderr
    r = launch(tmp_path, timeout=60, TRAIN_DATA="d", NNODES="4", MASTER_ADDR="node0")
    assert r.returncode == 1 and "NNODES=4: set NODE_RANK (0 to NNODES-1) on every node" in r.stderr


def test_relative_paths_are_the_callers(tmp_path):
    """TRAIN_DATA=shards from the caller's directory reaches train.py as that directory (it
    used to be looked up in the repository, which the launcher cd'ed to)."""
    (tmp_path / "shards").mkdir()
    r = launch(tmp_path, TRAIN_DATA="shards", NPROC_PER_NODE="1", LOGS="logs")
    assert r.returncode != 0
    assert "train.py: error: --train-data: no train-*.rec shards in shards" in r.stderr, r.stderr
