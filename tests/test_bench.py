"""The benchmark runs end to end on the smoke profile and reports the split of a GRPO step."""
import pytest

from rnlib import bench

pytestmark = pytest.mark.slow


def test_bench_reports_step_split(capsys):
    assert bench.main(["--profile", "smoke", "--steps", "2", "--variants", "profile", "batched-generation",
                       "bf16-weights"]) == 0
    out = capsys.readouterr().out
    # the step table, one dict per variant keyed by column name (the wall-time tables follow it)
    step_table = [line for line in out.split("## Wall time")[0].splitlines() if line.startswith("|")]
    columns = [cell.strip() for cell in step_table[0].strip("|").split("|")]
    rows = {row["variant"]: row for row in
            (dict(zip(columns, (cell.strip() for cell in line.strip("|").split("|")))) for line in step_table[2:])}
    for column in ("step_s", "generation_s", "judging_s", "forward_backward_s", "peak_RSS_GiB"):
        assert column in columns
    step, generation, judging, forward_backward = (float(rows["profile"][column]) for column in
                                                   ("step_s", "generation_s", "judging_s", "forward_backward_s"))
    assert step > 0 and generation > 0 and forward_backward > 0
    assert generation + judging <= step
    # the warm-up round is dropped: the second round is 1 step, or 4 steps fed by one generation call
    assert {name: int(rows[name]["steps_measured"]) for name in ("profile", "batched-generation")} == \
        {"profile": 1, "batched-generation": 4}
    assert {name: rows[name]["weights"] for name in ("profile", "bf16-weights")} == \
        {"profile": "float32", "bf16-weights": "bfloat16"}
