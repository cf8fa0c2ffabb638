import json
from pathlib import Path

import pytest

from rnlib import pipeline
from rnlib.config import ATTACK_VARIANTS, TARGETS, TASK_WORDING, ConfigError, available_profiles, load_profile


@pytest.mark.parametrize("name", ["smoke", "cpu", "paper"])
def test_every_profile_loads(name):
    profile = load_profile(name)
    assert profile.name == name
    assert set(profile.domains) <= {"biochem", "cyber"}
    assert profile.eval.samples_per_prompt >= 2


def test_profiles_on_disk_are_the_three_documented():
    assert available_profiles() == ["cpu", "paper", "smoke"]


def test_paper_profile_is_4bit_at_paper_step_counts():
    paper = load_profile("paper")
    assert paper.quantize_4bit and paper.bf16 and paper.attack.max_steps == 200
    assert 60 <= paper.data.n_defense <= 80


def test_cpu_matrix_is_every_named_attack_against_every_target():
    """Issue #5's matrix: TRL's loss variants, 16 generations and the adaptive attacks, each against all four models."""
    robustness = load_profile("cpu").robustness
    assert robustness.attacks == tuple(ATTACK_VARIANTS) and robustness.targets == TARGETS
    assert {"grpo_loss", "dr_grpo", "unscaled", "16_generations", "length_bonus"} <= set(robustness.attacks)


def test_unknown_key_names_key_and_allowed():
    with pytest.raises(ConfigError, match=r"unknown config key 'attack.max_step'; allowed: .*max_steps"):
        load_profile("smoke", {"attack.max_step": 3})


def test_bad_value_names_key_and_choices():
    with pytest.raises(ConfigError, match=r"'judge.eval.kind' has 'oracle'; allowed: rubric, minilm, classifier"):
        load_profile("smoke", {"judge.eval.kind": "oracle"})
    with pytest.raises(ConfigError, match=r"'attack.max_steps' must be an integer"):
        load_profile("smoke", {"attack.max_steps": "many"})
    with pytest.raises(ConfigError, match=r"'domains' has 'chem'"):
        load_profile("smoke", {"domains": ["chem"]})
    with pytest.raises(ConfigError, match=r"'attack.learning_rate' must be >= 0"):
        load_profile("smoke", {"attack.learning_rate": -1})


def test_group_of_one_is_rejected():
    with pytest.raises(ConfigError, match="num_generations"):
        load_profile("smoke", {"attack.num_generations": 1})


def test_unknown_profile_lists_choices():
    with pytest.raises(ConfigError, match="choose one of cpu, paper, smoke"):
        load_profile("laptop")


def test_overrides_change_only_their_section_hash():
    base, changed = load_profile("smoke"), load_profile("smoke", {"attack.max_steps": 7})
    assert changed.attack.max_steps == 7
    assert base.section_hash("align") == changed.section_hash("align")
    assert base.section_hash("attack") != changed.section_hash("attack")


def test_vllm_generation_gets_its_own_runs():
    from rnlib.pipeline import config_hash

    base, vllm = load_profile("smoke"), load_profile("smoke", {"use_vllm": True})
    assert config_hash(base, "attack", "cyber", 0, "x") != config_hash(vllm, "attack", "cyber", 0, "x")
    assert config_hash(base, "align", None, 0, "x") == config_hash(load_profile("smoke"), "align", None, 0, "x")


def test_edited_prompt_files_give_new_runs(tmp_path, monkeypatch):
    import shutil

    from rnlib import data
    from rnlib.pipeline import config_hash

    profile = load_profile("smoke")
    before = config_hash(profile, "align", None, 0, "x")
    shutil.copytree(data.PROMPT_DIR, tmp_path / "prompts")
    with open(tmp_path / "prompts" / "benign.jsonl", "a") as f:
        f.write('{"id": "benign-general-new", "domain": "benign", "topic": "general", "prompt": "Why do cats purr?"}\n')
    monkeypatch.setattr(data, "PROMPT_DIR", tmp_path / "prompts")
    assert config_hash(profile, "align", None, 0, "x") != before


def test_reward_and_eval_judges_are_two_roles_and_one_judge_fills_both_only_when_named_twice():
    study = load_profile("cpu")
    assert (study.judge.reward.kind, study.judge.eval.kind) == ("rubric", "minilm")
    both = load_profile("cpu", {"judge.eval.kind": "rubric"})
    assert both.judge.eval == both.judge.reward
    with pytest.raises(ConfigError, match=r"unknown config key 'judge.kind'; allowed: reward, eval"):
        load_profile("cpu", {"judge.kind": "rubric"})


def test_the_eval_judge_never_changes_what_a_stage_trains_but_the_reward_judge_does():
    from rnlib.pipeline import config_hash

    base = load_profile("smoke")
    other_eval = load_profile("smoke", {"judge.eval.kind": "rubric"})
    other_reward = load_profile("smoke", {"judge.reward.kind": "minilm"})
    assert config_hash(base, "attack", "cyber", 0, "x") == config_hash(other_eval, "attack", "cyber", 0, "x")
    assert config_hash(base, "attack", "cyber", 0, "x") != config_hash(other_reward, "attack", "cyber", 0, "x")


def test_a_setting_added_later_keeps_earlier_cache_keys_until_it_is_set():
    """`defend.kl_anchor` came after RN's shipped runs: at its default ("all", TRL's behaviour, what those runs did)
    it stays out of the hash, so their run ids still match; set to "benign" it makes new runs."""
    profile = load_profile("cpu")
    results = Path(__file__).resolve().parent.parent / "results" / "cpu"
    shipped = {run.name.rsplit("-", 1)[1] for domain in profile.domains for run in results.glob(f"defend-{domain}-*")}
    ids = {pipeline.config_hash(profile, "defend", domain, seed, "align-all-smollm2-135m-s0-c26b29897a8e")
           for domain in profile.domains for seed in (0, 1, 2)}
    assert profile.defend.kl_anchor == "all" and len(ids) == 6 and ids == shipped
    anchored = load_profile("cpu", {"defend.kl_anchor": "benign"})
    assert anchored.section_hash("defend") != profile.section_hash("defend")


def test_the_finetunability_task_wording_keeps_the_shipped_finetune_runs_until_it_is_set():
    """`finetune.task_wording` came after the shipped finetune runs: at its default their ids still match; another
    wording makes new finetune runs and leaves every other stage's runs as they are."""
    from rnlib import data

    profile, start = load_profile("cpu"), "align-all-smollm2-135m-s0-c26b29897a8e"
    results = Path(__file__).resolve().parent.parent / "results" / "cpu"
    shipped = {json.loads(path.read_text())["start_model"]: path.parent.name.rsplit("-", 1)[1]
               for path in results.glob("finetune-*/manifest.json")}
    assert shipped[start] == pipeline.config_hash(profile, "finetune", None, 0, start)
    reworded = load_profile("cpu", {"finetune.task_wording": "Calculate {a} {op} {b}."})
    assert pipeline.config_hash(reworded, "finetune", None, 0, start) != shipped[start]
    for stage, domain in (("align", None), ("defend", "cyber"), ("entropy", "biochem"), ("attack", "cyber")):
        assert pipeline.config_hash(reworded, stage, domain, 0, start) == \
            pipeline.config_hash(profile, stage, domain, 0, start)
    assert data.arithmetic("eval", reworded.finetune.task_wording)[0]["prompt"].startswith("Calculate ")
    with pytest.raises(data.DataError, match="finetune.task_wording"):
        data.arithmetic("eval", "Calculate {a} plus {b}.")
    digits = load_profile("cpu", {"finetune.task_operand_max": [9, 9]})
    assert profile.finetune.task_operand_max == (60, 40) and digits.finetune.task_operand_max == (9, 9)
    sampled = load_profile("cpu", {"finetune.eval_samples": 4})
    finetune_ids = {pipeline.config_hash(p, "finetune", None, 0, start) for p in (profile, reworded, digits, sampled)}
    assert len(finetune_ids) == 4 and shipped[start] in finetune_ids
    for finetune_only in (digits, sampled):
        assert pipeline.config_hash(finetune_only, "defend", "cyber", 0, start) == \
            pipeline.config_hash(profile, "defend", "cyber", 0, start)
    sums = data.arithmetic("train", "Calculate {a} {op} {b}.", digits.finetune.task_operand_max)
    assert {a for r in sums for a in r["operands"]} <= set(range(2, 10)) and len(sums) == 64
    assert max(a for r in data.arithmetic("train") for a in r["operands"]) > 9  # the default sums are larger
    with pytest.raises(data.DataError, match="finetune.task_operand_max"):
        data.arithmetic("eval", TASK_WORDING, (9,))
