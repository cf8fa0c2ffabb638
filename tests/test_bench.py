"""The benchmark runs end to end on the smoke profile and reports the split of a GRPO step."""
import pytest

from rnlib import bench

pytestmark = pytest.mark.slow


def test_bench_reports_step_split(capsys):
    assert bench.main(["--profile", "smoke", "--steps", "2", "--variants", "trl-trainer", "profile",
                       "batched-generation", "bf16-weights"]) == 0
    out = capsys.readouterr().out
    # the step table, one dict per variant keyed by column name (the wall-time tables follow it)
    step_table = [line for line in out.split("## Wall time")[0].splitlines() if line.startswith("|")]
    columns = [cell.strip() for cell in step_table[0].strip("|").split("|")]
    rows = {row["variant"]: row for row in
            (dict(zip(columns, (cell.strip() for cell in line.strip("|").split("|")))) for line in step_table[2:])}
    for column in ("step_s", "generation_s", "judging_s", "forward_backward_s", "peak_RSS_GiB", "decode_steps_per_s",
                   "decode_steps_per_s_bound", "train_GFLOP_per_s", "matmul_GFLOP_per_s"):
        assert column in columns
    step, generation, judging, forward_backward = (float(rows["profile"][column]) for column in
                                                   ("step_s", "generation_s", "judging_s", "forward_backward_s"))
    assert step > 0 and generation > 0 and forward_backward > 0
    assert generation + judging <= step
    # the warm-up round is dropped: the second round is 1 step, or 4 steps fed by one generation call
    assert {name: int(rows[name]["steps_measured"]) for name in ("profile", "batched-generation")} == \
        {"profile": 1, "batched-generation": 4}
    assert {name: rows[name]["weights"] for name in ("trl-trainer", "profile", "bf16-weights")} == \
        {"trl-trainer": "float32", "profile": "float32", "bf16-weights": "bfloat16"}
    # the before/after ratio and one roofline line per variant, each measured below its bound
    ratio = float(out.split("GRPO step, trl-trainer -> profile:")[1].split("s, ")[-1].split("x")[0])
    assert ratio == pytest.approx(float(rows["trl-trainer"]["step_s"]) / float(rows["profile"]["step_s"]), rel=0.02)
    roofline = [line for line in out.splitlines() if line.startswith("roofline, ")]
    assert len(roofline) == 4
    for row in rows.values():
        assert 0 < float(row["decode_steps_per_s"]) < float(row["decode_steps_per_s_bound"])
        assert 0 < float(row["train_GFLOP_per_s"]) < float(row["matmul_GFLOP_per_s"])
