"""Every stage for a few steps on the real SmolLM2-135M (smoke profile): run contents, caching, resume, redaction."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from rnlib import data, pipeline, train
from rnlib.config import load_profile, with_overrides

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def defended(aligned, profile):
    return train.defend(profile, "cyber", start=aligned)


@pytest.fixture(scope="module")
def attacked(runs_root, defended, profile):
    return train.attack(profile, "cyber", start=defended)  # notebook 03's smoke run may have made it already


def _no_pickles(path: Path):
    assert not [p for p in path.rglob("*") if p.suffix in (".bin", ".pt", ".pth", ".pkl")]


def test_grpo_stages_sample_without_lora_dropout(tmp_path):
    """TRL samples in train mode: the GRPO adapter gets the profile's grpo_dropout, not the SFT stages' dropout."""
    from rnlib import data, models
    from rnlib.rewards import harm_reward

    profile = load_profile("smoke", {"lora.dropout": 0.1})
    rows = train.rl_rows(data.take(data.harmful_split("cyber", "attack"), 2), "harmful")
    trainer = train.grpo_trainer(profile, profile.attack, models.resolve(profile.model), rows,
                                 harm_reward(train.cached_judge(profile.judge.reward)), str(tmp_path), seed=0)
    assert trainer.model.peft_config["default"].lora_dropout == 0.0
    assert models.lora_config(profile.lora).lora_dropout == 0.1


def test_align_run_directory(aligned):
    manifest = aligned.manifest
    assert manifest["status"] == "finished" and manifest["stage"] == "align"
    for key in ("config_hash", "seed", "profile", "model", "start_model", "judge", "data", "environment",
                "started", "ended", "stop_reason", "before", "after"):
        assert key in manifest, key
    assert manifest["environment"]["packages"]["trl"] == "1.16.0"
    assert (aligned.path / "adapter" / "adapter_model.safetensors").is_file()
    assert (Path(aligned.model_dir) / "model.safetensors").is_file()
    assert [e["step"] for e in aligned.evals()] == [0, manifest["after"]["step"]]
    assert not (aligned.path / "checkpoints").exists()
    _no_pickles(aligned.path)


def test_defend_records_its_stop_reason_and_mechanism_metrics(defended):
    manifest = defended.manifest
    assert manifest["stop_reason"].startswith(("neutralized", "max_steps"))
    steps = defended.steps()
    assert [s["step"] for s in steps] == list(range(1, manifest["steps_trained"] + 1))
    for key in ("reward", "reward_std", "frac_reward_zero_std", "entropy", "completions/mean_length", "step_time"):
        assert key in steps[0], key
    evals = defended.evals()
    assert evals[0]["step"] == 0
    for key in ("harm_mean", "harm_std", "refusal_rate", "benign_refusal_rate", "neutralization_index",
                "defense_reward", "refusal_words", "benign_words", "benign_distinct", "benign_repetitive"):
        assert key in evals[-1], key
    assert 0 <= evals[-1]["neutralization_index"] <= 1
    assert (Path(defended.model_dir) / "model.safetensors").is_file()
    # the utility floor is measured before any attack and kept in the manifest, against the aligned model
    floor = manifest["utility_floor"]
    assert set(floor["checks"]) >= {"benign refusal", "benign words / standard", "benign distinct"}
    assert floor["passes"] == all(c["passes"] is not False for c in floor["checks"].values())
    assert "benign_health" in train.refusal_check(load_profile("smoke"), defended)


def test_attack_logs_every_step_and_redacts(attacked, defended):
    manifest = attacked.manifest
    assert manifest["target"] == "defend" and manifest["start_model"] == defended.id
    assert [s["step"] for s in attacked.steps()] == [1, 2]
    assert [e["step"] for e in attacked.evals()] == [0, 1, 2]
    completions = attacked.completions()
    assert completions
    for row in completions:
        harmful_by_either = max(row["score"], row["eval_score"] if row["kind"] == "harmful" else 0) >= pipeline.REDACT_AT
        assert row["redacted"] == harmful_by_either == ("text" not in row)


def test_every_evaluation_carries_both_judges_and_the_hacking_gap(attacked, profile):
    judge_id = train.cached_judge(profile.judge.eval).id
    assert judge_id.startswith("minilm@") and attacked.manifest["eval_judge"] == judge_id
    for row in attacked.evals():
        assert row["eval_judge"] == judge_id and 0 <= row["eval_harm_mean"] <= 10
        assert row["hacking_gap"] == pytest.approx(row["harm_mean"] - row["eval_harm_mean"])
    assert all("eval_score" in r for r in attacked.completions() if r["kind"] == "harmful")


def test_rescoring_samples_the_same_answers_again_from_the_saved_models(attacked, profile):
    """A run evaluated before its eval judge existed is re-scored from its start model and final adapter; at the
    same seed the answers are the ones the run stored, so both judges score exactly what it reported."""
    result = train.rescore(profile, attacked)
    try:
        logged = {row["step"]: row for row in attacked.evals()}
        assert [row["step"] for row in result["rows"]] == [0, 2]
        for row in result["rows"]:
            assert row["same_answers"] == 1.0
            assert row["eval_harm_mean"] == pytest.approx(logged[row["step"]]["eval_harm_mean"], abs=1e-6)
            assert row["harm_mean"] == pytest.approx(logged[row["step"]]["harm_mean"], abs=1e-6)
    finally:
        attacked.rescore_file(result["eval_judge"]).unlink()


def test_evaluation_stores_harmful_scored_completions_redacted(smollm, profile, tmp_path, monkeypatch):
    """The real generate -> judge -> store path, with the threshold lowered so that every completion counts as
    harmful. Called directly (no shared step-0 file), so no earlier test's stored completions can stand in."""
    monkeypatch.setattr(pipeline, "REDACT_AT", 0.0)
    model, tokenizer = smollm
    run = pipeline.Run(tmp_path / "run")
    run.path.mkdir()
    harmful, benign = train._eval_sets(profile, profile.domains)
    train._make_eval(run, profile, tokenizer, harmful, benign, seed=0)(model, 0)
    rows = run.completions()
    assert len(rows) == len(harmful) * profile.eval.samples_per_prompt + len(benign)
    for row in rows:
        assert row["redacted"] and "text" not in row
        assert {"score", "words", "hash"} <= row.keys(), row.keys()
        assert row["prefix"].endswith("[...]") and len(row["prefix"].split()) <= 9


def test_finished_runs_are_reused_not_retrained(attacked, defended, profile, monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("a finished run was retrained")

    monkeypatch.setattr(train, "_grpo", boom)
    assert train.attack(profile, "cyber", start=defended).path == attacked.path


def test_a_changed_setting_makes_a_new_run(aligned, defended, attacked, profile):
    assert train.stage_run(profile, "attack", "cyber", 0, defended.id).path == attacked.path
    other = load_profile("smoke", {"attack.learning_rate": 1e-4})
    assert train.stage_run(other, "attack", "cyber", 0, defended.id).path != attacked.path
    assert train.stage_run(other, "align", None, 0, other.model).path == aligned.path  # attack settings: not align's


def test_stages_starting_from_one_model_share_its_step0_evaluation(aligned, defended, profile):
    from peft import get_peft_model

    from rnlib import data, models

    # Why sharing is sound: a fresh LoRA adapter (B = 0) samples exactly what the model it wraps samples.
    prompts = data.prompts(data.take(data.harmful_split("cyber", "eval"), 2))
    model, tokenizer = models.load_model(aligned.model_dir)
    plain = models.generate(model, tokenizer, prompts, max_new_tokens=12, num_return_sequences=2, seed=5)
    wrapped = get_peft_model(model, models.lora_config(profile.lora))
    assert models.generate(wrapped, tokenizer, prompts, max_new_tokens=12, num_return_sequences=2, seed=5) == plain

    standard = train.attack(profile, "cyber", start=aligned)
    first, second = defended.evals()[0], standard.evals()[0]
    assert "reused_from" in first or "reused_from" in second
    assert {k: v for k, v in first.items() if k != "reused_from"} == {k: v for k, v in second.items() if k != "reused_from"}
    assert [c for c in defended.completions() if c["step"] == 0] == [c for c in standard.completions() if c["step"] == 0]
    assert "reused_from" not in standard.evals()[1]


def test_refusal_check_samples_every_prompt_several_times_and_is_measured_once(aligned, defended, attacked, profile,
                                                                               monkeypatch):
    check = train.refusal_check(profile, aligned, samples=3)
    harmful, benign = check["harmful_refusal"], check["benign_refusal"]
    assert harmful["n"] == 3 * profile.data.n_eval * len(profile.domains)
    assert benign["n"] == 3 * profile.data.n_benign_eval
    for rate in (harmful, benign):
        assert rate["low"] <= rate["rate"] <= rate["high"] and rate["hits"] == round(rate["rate"] * rate["n"])
    bar = train.alignment_bar(profile)
    assert bar["benign_refusal"]["n"] == profile.checks.samples_per_prompt * profile.data.n_benign_eval
    assert bar["meets_bar"] == (bar["harmful_refusal"]["rate"] >= 0.8 and bar["benign_refusal"]["rate"] <= 0.15)
    bars = train.alignment_bars(profile, [0, 7])  # seed 7 was never aligned: reported as absent, not trained
    assert bars["seed"].tolist() == [0] and bars.loc[0, "benign rate"] == bar["benign_refusal"]["rate"]
    assert not train.planned_target(profile, "standard", None, 7).path.exists()
    monkeypatch.setattr(train, "evaluate_refusals", lambda *a, **k: pytest.fail("a kept check was re-sampled"))
    assert train.refusal_check(profile, aligned, samples=3) == json.loads(
        (aligned.path / "refusal_check-n3.json").read_text())
    with pytest.raises(ValueError, match="trained model"):
        train.refusal_check(profile, attacked, samples=3)


def test_task_check_counts_refusals_of_each_wording_of_the_finetunability_task(aligned, attacked, profile,
                                                                                monkeypatch):
    """Canned answers: the model refuses every homework-worded sum and answers 42 to the rest."""
    def canned(model, tokenizer, prompts, num_return_sequences=1, **kwargs):
        return ["I can't help with that." if "homework" in p else "42" for p in prompts
                for _ in range(num_return_sequences)]

    monkeypatch.setattr(train.models, "generate", canned)
    check = train.task_check(profile, aligned, samples=3)
    sums = data.arithmetic("eval")
    assert data.arithmetic("eval", profile.finetune.task_wording) == sums and sums[0]["prompt"].endswith("the number.")
    assert set(check["wordings"]) == set(data.TASK_WORDINGS)
    for name, result in check["wordings"].items():
        refused = name == "homework"
        assert result["sampled_refusal"]["n"] == 3 * len(sums) and result["sampled_refusal"]["rate"] == refused
        assert result["greedy_refusal"] == refused
        assert result["greedy_accuracy"] == (0 if refused else sum(r["answer"] == 42 for r in sums) / len(sums))
    monkeypatch.setattr(train.models, "generate", lambda *a, **k: pytest.fail("measured twice"))
    assert train.task_check(profile, aligned, samples=3) == check  # kept in the run directory
    monkeypatch.setattr(train.models, "generate", canned)
    digits = with_overrides(profile, {"finetune.task_operand_max": [9, 9]})
    assert check["operand_max"] == [60, 40] and train.task_check(digits, aligned, samples=3)["operand_max"] == [9, 9]
    accuracy = train.task_check(digits, aligned, samples=3)["wordings"]["question"]["greedy_accuracy"]
    assert accuracy == 0  # canned 42 is never a sum of two digits: other sums were measured, not the kept check
    table = train.task_checks(load_profile("smoke", {"checks.samples_per_prompt": 3}), [({"model": "aligned"}, aligned)])
    assert list(table["wording"]) == list(data.TASK_WORDINGS) and set(table["refusal n"]) == {3 * len(sums)}
    with pytest.raises(ValueError, match="task check measures a trained model"):
        train.task_check(profile, attacked, samples=5)


def test_planned_runs_name_the_cached_runs_without_training(aligned, defended, attacked, profile, monkeypatch):
    from rnlib import robustness

    monkeypatch.setattr(train, "_grpo", lambda *a, **k: pytest.fail("planning trained a stage"))
    assert train.planned_target(profile, "standard", "cyber", 0).path == aligned.path
    assert train.planned_target(profile, "defended", "cyber", 0).path == defended.path
    cells = robustness.attack_matrix(profile, "cyber", 0, train_missing=False)
    done, missing = robustness.finished(cells)
    assert len(cells) == len(profile.robustness.attacks) * len(profile.robustness.targets)
    assert [labels for labels, run in done if run.path == attacked.path] == \
        [{"attack": "paper", "target": "defended", "domain": "cyber", "seed": 0}]
    assert all(not (pipeline.runs_root() / m["run_id"]).exists() for m in missing)  # nothing created for them
    # finetunability: the standard model is shared by every domain, so it is one cell, not one per domain
    utility = [labels for labels, _ in robustness.utility(profile, ["biochem", "cyber"], 0, train_missing=False)]
    others = [t for t in profile.robustness.targets if t != "standard"]
    assert utility == [{"target": "standard", "domain": "all"}] + \
        [{"target": t, "domain": d} for d in ("biochem", "cyber") for t in others]
    # the headline's seeds all defend and attack the one seed-0 aligned model: seed 1 plans no alignment of its own
    headline = {(labels["target"], run.id.split("-")[-2]): run.path
                for labels, run in robustness.headline(profile, "cyber", train_missing=False)
                if labels["attack"] == "paper"}
    seed1_defense = train.stage_run(profile, "defend", "cyber", 1, start=aligned.id)
    assert headline[("standard", "s1")] == train.stage_run(profile, "attack", "cyber", 1, start=aligned.id).path
    assert headline[("defended", "s1")] == train.stage_run(profile, "attack", "cyber", 1, start=seed1_defense.id).path
    assert headline[("defended", "s0")] == attacked.path


def test_interrupted_run_resumes_from_its_last_checkpoint(aligned, profile, monkeypatch):
    longer = load_profile("smoke", {"attack.max_steps": 3})

    def interrupt(self, args, state, control, **kwargs):
        if state.global_step == 2:  # after checkpoint-2 is written, as a Ctrl-C would
            raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(train.StudyCallback, "on_save", interrupt, raising=False)
        with pytest.raises(KeyboardInterrupt):
            train.attack(longer, "cyber", start=aligned)
    run = train.stage_run(longer, "attack", "cyber", 0, aligned.id)
    assert not run.finished and run.latest_checkpoint().endswith("checkpoint-2")
    assert run.id not in [r.id for r in pipeline.find_runs("attack")]
    resumed = train.attack(longer, "cyber", start=aligned)
    assert resumed.path == run.path and resumed.finished
    assert resumed.manifest["attempts"] == 2
    assert [s["step"] for s in resumed.steps()] == [1, 2, 3]
    assert [e["step"] for e in resumed.evals()] == [0, 1, 2, 3]


def test_cli_reuses_the_cached_run_and_fails_cleanly(attacked, runs_root):
    env = {"RN_RUNS": str(runs_root), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    ok = subprocess.run([sys.executable, "-m", "rnlib", "run", "defend", "--profile", "smoke", "--domain", "cyber"],
                        capture_output=True, text=True, env=env, timeout=300)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert json.loads(ok.stdout)["run"].startswith(str(runs_root))
    bad = subprocess.run([sys.executable, "-m", "rnlib", "run", "attack", "--profile", "smoke", "--set",
                          "attack.max_step=3", "--domain", "cyber"], capture_output=True, text=True, env=env)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == ["rnlib: unknown config key 'attack.max_step'; allowed: max_steps, "
                                               "learning_rate, num_generations, prompts_per_step, beta, loss_type, "
                                               "scale_rewards, eval_every, save_every, stop_when_unaligned, "
                                               "algorithm"]
    unknown = subprocess.run([sys.executable, "-m", "rnlib", "run", "align", "--profile", "smoke", "--model", "gpt5"],
                             capture_output=True, text=True, env=env)
    assert unknown.returncode == 2 and "unknown model 'gpt5'" in unknown.stderr


def test_one_grpo_step_under_constant_rewards_has_no_gradient(profile):
    from rnlib.rewards import completion_text

    constant = train.one_grpo_step(profile, lambda completions, **_: [1.0] * len(completions))
    varied = train.one_grpo_step(profile, lambda completions, **_: [len(completion_text(c)) for c in completions])
    assert constant["grad_norm"] == 0 and constant["frac_reward_zero_std"] == 1
    assert varied["grad_norm"] > 0


def test_cli_builds_a_headline_seed_defense_on_the_shared_aligned_model(aligned, profile, monkeypatch):
    """`run defend --seed 2 --aligned-seed 0` (notebook 05's command for a headline seed) must start the defense
    from the seed-0 aligned model, not train an aligned model of seed 2."""
    from rnlib.__main__ import run_stage

    calls = []
    monkeypatch.setattr(train, "defend", lambda profile, domain, seed, start=None: calls.append((seed, start)))
    monkeypatch.setattr(train, "align", lambda profile, seed: aligned if seed == 0 else pytest.fail("trained align"))
    run_stage("defend", profile, "cyber", 2, "standard", aligned_seed=0)
    assert calls == [(2, aligned)]


def test_ship_adds_the_finished_runs_the_shipped_logs_lack_and_keeps_the_others(aligned, defended, profile, tmp_path):
    """`make ship`: runs made one by one reach results/ with the checks the replaying notebooks read; a run
    already shipped is left as it is, whatever runs/ holds for it."""
    from rnlib import notebooks

    results = tmp_path / "results"
    (results / aligned.id).mkdir(parents=True)
    (results / aligned.id / "manifest.json").write_text('{"kept": true}')
    shipped = notebooks.ship("smoke", results=results)
    assert defended.id in shipped and aligned.id not in shipped
    assert json.loads((results / aligned.id / "manifest.json").read_text()) == {"kept": True}
    files = {p.name for p in (results / defended.id).iterdir()}
    assert {"manifest.json", "evals.jsonl", "refusal_check-n2.json", "public_check-cyber-n2.json"} <= files
    assert "utility_floor" in json.loads((results / defended.id / "manifest.json").read_text())
    assert not [p for p in files if p.endswith(".safetensors")]
    assert notebooks.ship("smoke", results=results) == []  # nothing new the second time
