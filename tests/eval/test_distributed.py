import json
import os
import shutil
import subprocess
import sys

import pytest

from hf_flexoffload.eval import Ranks
from tests.eval.conftest import POLICY


@pytest.mark.parametrize("world", [1, 2, 3], ids=["one", "two", "three"])
def test_shards_are_disjoint_and_complete(world):
    items = list(range(10))
    shards = [Ranks(rank=r, world_size=world).shard(items) for r in range(world)]
    assert sorted(i for s in shards for i in s) == items


def test_two_processes_with_accelerate_launch(eval_checkpoint, tmp_path):
    """Each rank loads its own offloaded model and takes a shard; rank 0 merges."""
    path, _, _ = eval_checkpoint
    policy = tmp_path / "policy.json"
    POLICY.save(str(policy))
    launcher = shutil.which("accelerate", path=os.path.dirname(sys.executable))
    assert launcher, "accelerate is a dependency: its launcher should be installed"
    cmd = [
        # --multi_gpu is accelerate's torch.distributed launcher; it works on CPU (gloo) too.
        launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no",
        "-m", "hf_flexoffload.cli", "eval", "--model", path,
        "--scenario", "synthetic_reasoning:variable_substitution", "--num-shots", "0",
        "--max-instances", "7", "--max-new-tokens", "3", "--offload-policy", str(policy),
        "--offload-dir", str(tmp_path / "offload"), "--output", str(tmp_path / "runs"),
        "--no-progress",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    run = tmp_path / "runs" / "synthetic_reasoning-variable_substitution"
    records = [json.loads(line) for line in (run / "instances.jsonl").read_text().splitlines()]
    assert [r["id"] for r in records] == [f"test-{i}" for i in range(7)]  # all, once, in order
    assert not list(run.glob("instances.rank-*"))
    stats = json.loads((run / "stats.json").read_text())
    assert stats["processes"] == 2 and stats["num_instances"] == 7
    assert sorted(os.listdir(tmp_path / "offload")) == ["rank-0", "rank-1"]
