"""The benchmark runs end to end on the smoke profile and reports the split of a GRPO step."""
import pytest

from rnlib import bench

pytestmark = pytest.mark.slow


def test_bench_reports_step_split(capsys):
    assert bench.main(["--profile", "smoke", "--steps", "2", "--variants", "profile", "batched-generation",
                       "bf16-weights"]) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("| variant"))
    for column in ("step_s", "generation_s", "judging_s", "forward_backward_s", "peak_RSS_GiB"):
        assert column in header
    row = next(line for line in out.splitlines() if line.startswith("| profile"))
    step, generation, judging, forward_backward = (float(x) for x in row.split("|")[3:7])
    assert step > 0 and generation > 0 and forward_backward > 0
    assert generation + judging <= step
    # the warm-up round is dropped: the second round is 1 step, or 4 steps fed by one generation call
    step_table = out.split("## Wall time")[0].splitlines()
    measured = {line.split("|")[1].strip(): int(line.split("|")[-2]) for line in step_table
                if line.startswith(("| profile ", "| batched-generation"))}
    assert measured == {"profile": 1, "batched-generation": 4}
    weights = {line.split("|")[1].strip(): line.split("|")[2].strip() for line in step_table
               if line.startswith(("| profile ", "| bf16-weights"))}
    assert weights == {"profile": "float32", "bf16-weights": "bfloat16"}
