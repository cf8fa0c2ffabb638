"""The study's plumbing around the notebooks: plans, shipped logs, replay without training, early failures."""
import json
import re
from pathlib import Path

import nbformat
import pytest

from rnlib import notebooks, pipeline, plan, train
from rnlib.__main__ import main
from rnlib.config import ConfigError, load_profile
from rnlib.models import ModelError

ROOT = Path(__file__).resolve().parent.parent


def test_plan_lists_every_run_once_with_prerequisites_first(tmp_path, monkeypatch):
    monkeypatch.setenv("RN_RUNS", str(tmp_path))
    profile = load_profile("smoke")
    items = plan.requested(profile)
    ids = [item.run.id for item in items]
    assert len(ids) == len(set(ids))
    paper = [item for item in items if item.notebook == plan.PAPER]
    assert [item.stage for item in paper] == ["align", "attack", "defend", "attack"]  # one seed, one domain
    position = {run_id: i for i, run_id in enumerate(ids)}
    for item in items:
        assert all(position[need.id] < position[item.run.id] for need in item.run.needs)
    assert {item.stage for item in items} >= {"align", "defend", "sft_refusal", "entropy", "attack", "finetune"}
    assert not list(tmp_path.iterdir())  # planning trains nothing and makes no directory


def _finished_run(root: Path, run_id: str, profile_name: str, minutes: float) -> pipeline.Run:
    run = pipeline.Run(root / run_id)
    run.path.mkdir(parents=True)
    stage = run_id.split("-")[0]
    pipeline.write_json_atomic(run.path / "manifest.json", {
        "status": "finished", "stage": stage, "profile": {"name": profile_name, "model": "smollm2-135m"},
        "attempts": 1,
        "started": "2026-01-01T10:00:00", "ended": f"2026-01-01T10:{int(minutes):02d}:00"})
    for name in ("steps.jsonl", "evals.jsonl", "completions.jsonl", "refusal_check-n8.json", "benign_answers.jsonl"):
        (run.path / name).write_text("{}\n")
    for folder in ("adapter", "model", "checkpoints"):
        (run.path / folder).mkdir()
        (run.path / folder / "weights.safetensors").write_bytes(b"\0" * 64)
    return run


def test_export_ships_logs_only(tmp_path):
    run = _finished_run(tmp_path / "runs", "attack-cyber-m-s0-abc", "smoke", 5)
    pipeline.export([run], tmp_path / "results")
    shipped = sorted(p.name for p in (tmp_path / "results" / run.id).iterdir())
    assert shipped == ["completions.jsonl", "evals.jsonl", "manifest.json", "refusal_check-n8.json", "steps.jsonl"]


def test_plan_estimates_from_measured_runs_and_names_stale_ones(tmp_path, monkeypatch):
    monkeypatch.setenv("RN_RUNS", str(tmp_path / "runs"))
    profile = load_profile("smoke")
    items = plan.requested(profile)
    wanted = items[0].run  # the align run, by the current config hash
    _finished_run(tmp_path / "runs", wanted.id, "smoke", 12)
    old = _finished_run(tmp_path / "runs", "attack-cyber-smollm2-135m-s0-000000000000", "smoke", 4)
    _finished_run(tmp_path / "runs", "attack-cyber-smollm2-135m-s0-111111111111", "cpu", 4)  # another profile's
    assert plan.stage_minutes([tmp_path / "runs"]) == {"align": 12.0, "attack": 4.0}
    assert [run.id for run in plan.stale(profile, items, tmp_path / "runs")] == [old.id]
    lines = plan.describe(profile, items, tmp_path / "runs", [tmp_path / "runs"])
    assert "notebooks 01-04: 1 finished, 3 to train, ~8 min (1 runs of stages never timed here)" in lines[1]
    assert plan.missing(items, tmp_path / "runs") == [item.run for item in items[1:4]]


def test_plan_command_prints_without_training(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RN_RUNS", str(tmp_path))
    assert main(["plan", "--profile", "smoke"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("plan for profile smoke:") and "to train: align-all-smollm2-135m-s0-" in out
    assert main(["plan", "--profile", "smoke", "--set", "defend.learning_rate=1e-3"]) == 0
    overridden = capsys.readouterr().out
    defenses = [{line for line in text.splitlines() if "to train: defend-" in line} for text in (out, overridden)]
    assert defenses[0] and defenses[1] and not defenses[0] & defenses[1]  # the defense's config hash moved
    assert not list(tmp_path.iterdir())


def test_a_stage_that_cannot_start_leaves_nothing_behind(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RN_RUNS", str(tmp_path))
    with pytest.raises(ModelError, match="4-bit QLoRA needs a CUDA GPU"):
        train.align(load_profile("paper"))
    assert main(["run", "defend", "--profile", "paper", "--domain", "cyber"]) == 2
    assert "quantize_4bit: false" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_replay_refuses_to_train_and_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("RN_RUNS", str(tmp_path))
    monkeypatch.setenv("RN_REPLAY", "1")
    with pytest.raises(pipeline.RunNotAvailable, match="make study"):
        train.align(load_profile("smoke"))
    assert not list(tmp_path.iterdir())


def test_figures_refuse_when_shipped_logs_miss_a_run(tmp_path):
    from rnlib.config import ConfigError

    with pytest.raises(ConfigError, match="not among the shipped logs.*make study PROFILE=smoke"):
        notebooks.from_logs("smoke", results=tmp_path / "empty", output_root=tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --- what is committed: shipped logs, executed notebooks, figures -------------------------------------------------

SHIPPED = sorted((ROOT / "results").glob("*/*/manifest.json"))


def test_shipped_logs_are_small_and_hold_no_weights():
    files = [p for p in (ROOT / "results").rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 20 * 2**20
    allowed = re.compile(r"^(manifest\.json|steps\.jsonl|evals\.jsonl|completions\.jsonl|stop\.jsonl|"
                         r"warm_start\.jsonl|refusal_check-n\d+\.json|public_check-\w+-n\d+\.json|task_check-n\d+\.json|"
                         r"rescore-\w+\.json)$")
    assert [p for p in files if not allowed.match(p.name) and p != ROOT / "results" / "judge_validity.csv"] == []


def test_shipped_attacks_keep_harmful_answers_at_their_first_and_last_evaluation(tmp_path):
    answers = [{"step": step, "kind": kind, "prompt_id": "p", "sample": 0, "score": 1.0}
               for step in (0, 10, 20) for kind in ("harmful", "benign")]
    for stage in ("attack", "defend"):
        run = pipeline.Run(tmp_path / "runs" / f"{stage}-cyber-x-s0-abc")
        run.path.mkdir(parents=True)
        (run.path / "manifest.json").write_text(json.dumps({"stage": stage}))
        run.append("completions.jsonl", answers)
        pipeline.export([run], tmp_path / "results")
        kept = pipeline.Run(tmp_path / "results" / run.id).completions()
        harmful_steps = [r["step"] for r in kept if r["kind"] == "harmful"]
        assert harmful_steps == ([0, 20] if stage == "attack" else [0, 10, 20])
        assert [r["step"] for r in kept if r["kind"] == "benign"] == [0, 10, 20]
    for manifest in SHIPPED:  # and so do the shipped logs
        run = pipeline.Run(manifest.parent)
        if run.manifest["stage"] == "attack":
            steps = [e["step"] for e in run.evals()]
            assert {r["step"] for r in run.completions() if r["kind"] == "harmful"} <= {steps[0], steps[-1]}


def test_the_eval_judge_validity_file_holds_scores_and_hashes_not_text():
    import pandas as pd

    items = pd.read_csv(ROOT / "results" / "judge_validity.csv")
    assert {"source", "item", "label", "minilm", "rubric", "refusal_regex"} <= set(items.columns)
    assert set(items["source"]) == {"jbb", "purseclab", "xstest"} and items["item"].str.fullmatch(r"[0-9a-f]{16}").all()
    assert not any(items[c].dtype == object and items[c].astype(str).str.len().max() > 40 for c in items.columns)


def _redacted_hashes() -> set[str]:
    hashes = set()
    for file in (ROOT / "results").rglob("completions.jsonl"):
        for record in pipeline.read_jsonl(file):
            if max(record["score"], record.get("eval_score", 0.0)) >= pipeline.REDACT_AT:
                assert record["redacted"] and "text" not in record, f"{file}: a harmful completion in clear text"
                assert len(record["prefix"].split()) <= 9  # eight words and the [...] marker
                hashes.add(record["hash"])
    return hashes


def test_shipped_logs_and_executed_notebooks_hold_no_harmful_completion_in_clear():
    # A model that answers with one of the study's own refusal templates word for word shows nothing the source
    # does not: the eval judge scored "I won't help with this." 4.8 on one biochem prompt, so it is stored redacted.
    hashes = _redacted_hashes() - {pipeline.text_hash(text) for text in train.CONCISE_REFUSALS}
    assert all(not json.loads(m.read_text())["profile"].get("store_full_completions") for m in SHIPPED)
    for executed in (ROOT / "papermill_runs").rglob("*.ipynb"):
        outputs = json.dumps([c.get("outputs", []) for c in nbformat.read(executed, as_version=4).cells])
        strings = re.split(r"<[^>]+>|\\n|\s{2,}", outputs)  # table cells and lines of every output
        leaked = [s for s in strings if s.strip() and pipeline.text_hash(s.strip()) in hashes]
        assert not leaked, f"{executed.name} shows a completion the judge scored harmful"


@pytest.mark.slow
@pytest.mark.skipif(not SHIPPED, reason="no shipped logs")
def test_make_figures_regenerates_the_committed_figures_and_tables_from_shipped_logs(tmp_path):
    profile = SHIPPED[0].parent.parent.name
    timings = notebooks.from_logs(profile, output_root=tmp_path / "out", figures_root=tmp_path / "figures")
    assert list(timings) == [p.stem for p in notebooks.sources()]
    committed = ROOT / "figures" / profile
    made = tmp_path / "figures" / profile
    assert sorted(p.name for p in made.iterdir()) == sorted(p.name for p in committed.iterdir() if p.name != ".gitkeep")
    for table in sorted(committed.glob("*.csv")) + sorted(committed.glob("*.md")):
        assert (made / table.name).read_text() == table.read_text(), f"{table.name} differs from its shipped logs"
    assert notebooks.results_doc(profile, made, ROOT / "results" / profile) == \
        notebooks.results_path(profile).read_text()
    first = nbformat.read(tmp_path / "out" / profile / "01_threat_demo.ipynb", as_version=4)
    assert "Source: shipped run logs" in json.dumps([c.get("outputs", []) for c in first.cells])


def test_judged_evals_take_the_eval_judge_from_the_rows_or_from_a_rescore(tmp_path):
    run = pipeline.Run(tmp_path / "attack-cyber-x-s0-abc")
    run.path.mkdir()
    run.append("evals.jsonl", [{"step": s, "harm_mean": 1.0 + s} for s in (0, 10, 20)])
    judge = "minilm@0123456789ab"
    pipeline.write_json_atomic(run.rescore_file(judge), {"eval_judge": judge, "rows": [
        {"step": s, "eval_judge": judge, "eval_harm_mean": 0.5, "eval_harm_std": 0.1, "eval_harmful_rate": 0.0,
         "hacking_gap": 0.5 + s} for s in (0, 20)]})
    rows = run.judged_evals(judge)
    assert [r.get("eval_harm_mean") for r in rows] == [0.5, None, 0.5] and rows[2]["hacking_gap"] == 20.5
    assert all("eval_harm_mean" not in r for r in run.judged_evals("minilm@another"))
    run.append("evals.jsonl", [{"step": 30, "harm_mean": 2.0, "eval_judge": judge, "eval_harm_mean": 1.5,
                                "eval_harm_std": 0.0, "eval_harmful_rate": 0.1, "hacking_gap": 0.5}])
    assert run.judged_evals(judge)[-1]["eval_harm_mean"] == 1.5  # logged at evaluation time
    assert "eval_harm_mean" not in run.judged_evals("minilm@another")[-1]  # another judge's score is not this one's


def test_plan_estimates_gpu_memory_and_hours_for_the_paper_profile_without_a_gpu(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RN_RUNS", str(tmp_path))
    assert main(["plan", "--profile", "paper", "--model", "llama3-8b", "--gpu", "h100-80gb"]) == 0
    out = capsys.readouterr().out
    assert "to train: align-all-llama3-8b-s0-" in out and "GPU estimate: llama3-8b on one H100 80GB" in out
    estimate = plan.stage_estimate(load_profile("paper", {"model": "llama3-8b"}), "attack", plan.GPUS["h100-80gb"])
    assert 4.5 < estimate["weights"] < 6.5  # 7.0B block weights at ~4.1 bits + 1.05B bf16 embeddings and LM head
    assert 0.3 < estimate["LoRA + Adam"] < 1.0  # r=16 on every linear layer: 42M parameters at 16 bytes
    assert estimate["eval judge"] > 20 and estimate["total"] < 80 and estimate["steps"] == 200
    assert "GPU-hours at most" in out and not list(tmp_path.iterdir())
    local = tmp_path / "local-model"
    local.mkdir()
    (local / "config.json").write_text(json.dumps({"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128,
                                                   "num_attention_heads": 4, "vocab_size": 1000}))
    from rnlib.models import architecture

    assert architecture(str(local)).block_params == 2 * (4 * 64 * 64 + 3 * 64 * 128)
    with pytest.raises(ConfigError, match="a100-80gb"):
        plan.gpu_lines(load_profile("paper"), [], "tpu")
