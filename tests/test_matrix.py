"""The sharded matrix: `python -m rnlib matrix --shard i/n` splits the study's cells so that n processes (or SLURM
array tasks) cover them exactly once, and a run that two of them need is trained by one while the other waits."""
import json
import os
import subprocess
import sys

import pytest

from rnlib import pipeline, plan, train
from rnlib.config import ConfigError, load_profile

TINY = ["--set", "robustness.targets=[standard]", "--set", "robustness.attacks=[paper]",
        "--set", "robustness.headline_seeds=[0]", "--set", "robustness.headline_attacks=[paper]",
        "--set", "robustness.cross_domain=false"]


def test_shards_partition_the_cells_in_a_fixed_order():
    cells = plan.cells(plan.requested(load_profile("smoke")))
    assert [c.id for c in cells] == [c.id for c in plan.cells(plan.requested(load_profile("smoke")))]
    assert len({c.id for c in cells}) == len(cells) and all(c.make for c in cells)
    paper = plan.cells(plan.requested(load_profile("smoke")), (plan.PAPER,))
    assert paper and set(c.id for c in paper) < set(c.id for c in cells)
    shards = [plan.shard(cells, f"{i}/3") for i in range(3)]
    assert sorted(c.id for s in shards for c in s) == sorted(c.id for c in cells)
    for bad in ("3/3", "1", "a/b", "-1/2"):
        with pytest.raises(ConfigError, match="--shard 0/4"):
            plan.shard(cells, bad)


def test_a_run_in_training_is_claimed_and_a_second_process_waits_then_reuses_it(tmp_path, monkeypatch):
    monkeypatch.setenv("RN_RUNS", str(tmp_path))
    profile = load_profile("smoke")
    run = train.stage_run(profile, "finetune", None, 0, start="some-model")
    assert not train._reused(run, profile)  # this process now trains it
    waiter = subprocess.Popen(
        [sys.executable, "-c", "from rnlib import train; from rnlib.config import load_profile; p = load_profile('smoke'); "
         "print('REUSED' if train._reused(train.stage_run(p, 'finetune', None, 0, start='some-model'), p) else 'TRAINS')"],
        env=os.environ | {"RN_RUNS": str(tmp_path)}, stdout=subprocess.PIPE, text=True)
    line = ""
    while "waiting: another process is training" not in line:
        line = waiter.stdout.readline()
        assert line, "the second process went on without waiting for the run in training"
    run.start({"stage": "finetune"})
    run.finish()
    assert waiter.communicate(timeout=120)[0].strip().endswith("REUSED")
    assert run.manifest["attempts"] == 1


def test_two_shards_of_a_tiny_smoke_matrix_cover_it_exactly_once(runs_root, aligned):
    profile = load_profile("smoke", {"robustness.targets": ["standard"], "robustness.attacks": ["paper"],
                                     "robustness.headline_seeds": [0], "robustness.headline_attacks": ["paper"],
                                     "robustness.cross_domain": False})
    cells = plan.cells(plan.requested(profile))
    assert len(cells) >= 3  # the paper's attack on the standard and the RN model, and finetuning
    # one thread each: two shards of two threads on two cores slow each other several-fold
    shards = [subprocess.Popen([sys.executable, "-m", "rnlib", "matrix", "--profile", "smoke", "--shard", f"{i}/2",
                                *TINY], env=os.environ | {"RN_RUNS": str(runs_root), "OMP_NUM_THREADS": "1"},
                               stdout=subprocess.PIPE, text=True) for i in range(2)]
    reports = [json.loads(shard.communicate(timeout=1200)[0]) for shard in shards]
    assert [shard.returncode for shard in shards] == [0, 0]
    ran = [set(report["ran"]) for report in reports]
    assert not ran[0] & ran[1] and ran[0] | ran[1] == {c.id for c in cells}
    for cell in cells:
        trained = pipeline.Run(runs_root / cell.id)
        assert trained.finished and trained.manifest["attempts"] == 1
