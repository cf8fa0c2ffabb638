"""Beyond the paper: defense baselines and adaptive attacks on the real model (smoke profile)."""
import json
import math

import pytest
import torch

from rnlib import pipeline, train
from rnlib.config import load_profile
from rnlib.rewards import TokenEntropy, entropy_suppression_reward

pytestmark = pytest.mark.slow


def test_token_entropy_matches_a_direct_computation(smollm):
    model, tokenizer = smollm
    prompt = [{"role": "user", "content": "Name a colour."}]
    completion = tokenizer("Blue is a colour.", add_special_tokens=False).input_ids
    entropy = TokenEntropy(tokenizer)
    entropy.model = model
    got = entropy([prompt, prompt], [completion, []])
    text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    ids = tokenizer(text, add_special_tokens=False).input_ids
    with torch.no_grad():
        logp = model(input_ids=torch.tensor([ids + completion])).logits[0].log_softmax(-1)
    expected = float(-(logp.exp() * logp).sum(-1)[len(ids) - 1:len(ids) - 1 + len(completion)].mean())
    assert math.isclose(got[0], expected, rel_tol=1e-4) and got[1] == 0.0
    reward = entropy_suppression_reward(entropy)([prompt, prompt], ["Blue is a colour.", "I can't help with that."],
                                                 [completion, completion], kind=["harmful", "benign"])
    assert math.isclose(reward[0], -expected, rel_tol=1e-4) and reward[1] == -1.0  # a benign refusal costs 1
    all_benign = entropy_suppression_reward(entropy)([prompt], ["Blue."], [completion], kind=["benign"])
    assert len(all_benign) == 1  # a step that sampled only benign prompts has no entropy to compute


@pytest.mark.parametrize("stage", ["sft_refusal", "entropy"])
def test_baseline_defenses_use_rns_prompts_and_budget(stage, aligned, profile):
    run = getattr(train, stage)(profile, "cyber", start=aligned)
    rn_data = train._defense_sets(profile, "cyber")
    manifest = run.manifest
    assert manifest["status"] == "finished" and manifest["stage"] == stage
    assert manifest["data"]["defense"]["n"] == len(rn_data[0])
    assert manifest["steps_trained"] == profile.defend.max_steps
    assert [e["step"] for e in run.evals()][0] == 0 and "defense_reward" in run.evals()[-1]
    assert (run.path / "model" / "model.safetensors").is_file()
    if stage == "entropy":
        assert all(s["reward"] <= 1.0 for s in run.steps())  # -entropy on harmful, helpfulness (<= 1) on benign
    attacked = train.attack(profile, "cyber", start=run)
    assert attacked.manifest["target"] == stage
    assert pipeline._label(attacked)["target"] == stage
    assert attacked.id not in [r.id for r in pipeline.study_runs(profile, "attack")]  # 05's, not 04's


def test_adaptive_attack_warm_start_bonus_and_temperature(aligned, profile):
    adaptive = load_profile("smoke", {"adaptive.warm_start_steps": 1, "adaptive.bonus": "entropy",
                                      "adaptive.temperature": 1.3})
    paper = train.attack(profile, "cyber", start=aligned)
    run = train.attack(adaptive, "cyber", start=aligned)
    assert run.id != paper.id  # an adaptive attack never reuses the paper attack's run
    steps = run.steps()
    assert "rewards/entropy_bonus/mean" in steps[0] and "rewards/harm_score/mean" in steps[0]
    record = json.loads((run.path / "warm_start.jsonl").read_text())
    assert record["sft_steps"] == 1 and record["compliant_answers"] > 0 and set(record) == \
        {"step", "compliant_answers", "sft_steps", "received"}  # a count, never the compliant text
    def shared(summary):
        return {k: v for k, v in summary.items() if k != "reused_from"}

    assert shared(record["received"]) == shared(paper.evals()[0])  # the model as received: judged against it
    assert run.manifest["before"] == record["received"] and run.evals()[0] != paper.evals()[0]
    assert not (run.path / "warm_start").exists()  # the warmed-up checkpoint is removed when the attack ends
    assert run.manifest["profile"]["adaptive"]["temperature"] == 1.3
    assert run.id not in [r.id for r in pipeline.study_runs(profile, "attack")]  # not in notebooks 01-04
    assert run.id in [r.id for r in pipeline.study_runs(adaptive, "attack", paper_only=False)]


def test_finetunability_task_records_accuracy_before_and_after(aligned, profile):
    run = train.finetune(profile, aligned)
    manifest = run.manifest
    assert manifest["status"] == "finished" and manifest["target"] == "align"
    assert [e["step"] for e in run.evals()] == list(range(0, profile.attack.max_steps + 1, profile.attack.eval_every))
    assert 0 <= manifest["before"]["accuracy"] <= 1 and 0 <= manifest["after"]["accuracy"] <= 1
    assert all(0 <= e["refusal"] <= 1 for e in run.evals())  # a refused sum earns no reward: kept beside accuracy
    samples = profile.finetune.eval_samples * 32  # sampled answers too, the floor's finer measure
    assert samples and all(e["sampled_accuracy"] * samples == round(e["sampled_accuracy"] * samples) for e in run.evals())
    assert train.task_gain(run) == manifest["after"]["sampled_accuracy"] - manifest["before"]["sampled_accuracy"]
    assert "rewards/exact_answer_reward/mean" in run.steps()[0]


def test_rloo_attack_trains_through_trls_rloo_trainer(aligned, profile):
    from rnlib.config import ATTACK_VARIANTS, with_overrides

    rloo = with_overrides(profile, ATTACK_VARIANTS["rloo"] | {"attack.max_steps": 1})
    run = train.attack(rloo, "cyber", start=aligned)
    assert run.finished and run.manifest["profile"]["attack"]["algorithm"] == "rloo"
    assert run.id != train.stage_run(profile, "attack", "cyber", 0, aligned.id).id  # its own cell in the matrix
    step = run.steps()[0]
    assert {"reward", "loss"} <= set(step) and "steps_to_unalignment" in run.manifest
