"""Beyond the paper (notebook 05): defenses x attacks, transfer, utility, and the headline over seeds.

Every cell of the matrix is an ordinary `train.attack` run on an ordinary defense run, so it is cached,
resumable and labelled like the rest of the study; this module only decides which runs make up a table.

Notebook 05's cells take `train_missing`: True trains whatever is not cached (hours on a CPU); False only
collects the runs that have finished, so the notebook can report a partly run study and say what is missing.
"""
from __future__ import annotations

from dataclasses import replace

import pandas as pd
from scipy import stats

from rnlib import metrics, pipeline, train
from rnlib.config import ATTACK_VARIANTS, Profile, with_overrides
from rnlib.pipeline import Run


def _labelled(runs: list[tuple[dict, Run]], profile: Profile | None = None) -> pd.DataFrame:
    """The runs' evaluations, with the eval judge's harm when a profile is given (`train.judged_frame`)."""
    if not runs:
        return pd.DataFrame(columns=["run_id", "domain", "seed", "step", "target"])
    return pd.concat([(train.judged_frame(profile, [run]) if profile else pipeline.frame([run])).assign(**labels)
                      for labels, run in runs], ignore_index=True)


def last_evals(runs: list[tuple[dict, Run]], profile: Profile | None = None) -> pd.DataFrame:
    """Each labelled run's final held-out evaluation; given the profile, with its eval judge's harm."""
    return _labelled(runs, profile).sort_values("step").groupby("run_id").last().reset_index()


def outcomes(profile: Profile, runs: list[tuple[dict, Run]]) -> pd.DataFrame:
    """Each labelled attack run: harm (eval judge) and refusal before -> after, its share of zero-variance steps
    (every GRPO group's rewards equal: no gradient), and `metrics.attack_outcome`, so every defense is judged by
    one rule."""
    rows = []
    for labels, run in runs:
        evals = train.judged_frame(profile, [run]).sort_values("step")
        first, last = evals.iloc[0], evals.iloc[-1]
        steps = pipeline.frame([run], "steps")
        rows.append(labels | {
            "harm before": first["eval_harm_mean"], "harm after": last["eval_harm_mean"],
            "reward-judge harm after": last["harm_mean"],
            "refusal before": first["refusal_rate"], "refusal after": last["refusal_rate"],
            "distinct benign answers before": first["benign_distinct"],
            "zero-variance steps": float((steps["frac_reward_zero_std"] == 1).mean()),
            "outcome": metrics.attack_outcome(first["refusal_rate"], last["refusal_rate"], last["eval_harm_mean"],
                                              benign_distinct_before=first["benign_distinct"],
                                              harm_before=first["eval_harm_mean"])})
    return pd.DataFrame(rows)


def finished(runs: list[tuple[dict, Run]]) -> tuple[list[tuple[dict, Run]], list[dict]]:
    """(finished labelled runs, labels of the cells still to run)."""
    return [(labels, run) for labels, run in runs if run.finished], \
        [labels | {"run_id": run.id} for labels, run in runs if not run.finished]


def _target(profile: Profile, target: str, domain: str, seed: int, train_missing: bool,
            aligned_seed: int | None = None) -> Run:
    """The model a cell starts from: trained if missing, or (without `train_missing`) only named by its hash."""
    return (train.target_model if train_missing else train.planned_target)(profile, target, domain, seed, aligned_seed)


def targets(profile: Profile, domains: list[str], seed: int, train_missing: bool = True) -> list[tuple[dict, Run]]:
    """Every attacked model (profile.robustness.targets) on each domain, before any attack."""
    return [({"target": target, "domain": domain}, _target(profile, target, domain, seed, train_missing))
            for domain in domains for target in profile.robustness.targets]


def _attack(profile: Profile, attacker: Profile, target: str, attacked: str, defended_on: str, seed: int,
            train_missing: bool, aligned_seed: int | None = None) -> Run:
    """One attack cell; without `train_missing`, the run it would be (finished or not), nothing trained."""
    start = _target(profile, target, defended_on, seed, train_missing, aligned_seed)
    if train_missing:
        return train.attack(attacker, attacked, seed, start=start)
    return replace(train.stage_run(attacker, "attack", attacked, seed, start=start.id), needs=(start,))


def paper_comparison(profile: Profile, domains: list[str], seeds: list[int],
                     train_missing: bool = True) -> list[tuple[dict, Run]]:
    """Notebooks 01-04: the paper's attack on the standard and the RN model, per seed and domain (each seed with
    its own aligned model)."""
    return [({"target": target, "domain": domain, "seed": seed},
             _attack(profile, profile, target, domain, domain, seed, train_missing))
            for seed in seeds for domain in domains for target in ("standard", "defended")]


def attack_matrix(profile: Profile, domain: str, seed: int, train_missing: bool = True) -> list[tuple[dict, Run]]:
    """Every named attack (profile.robustness.attacks) against every target (profile.robustness.targets)."""
    return [({"attack": name, "target": target, "domain": domain},
             _attack(profile, with_overrides(profile, ATTACK_VARIANTS[name]), target, domain, domain, seed, train_missing))
            for name in profile.robustness.attacks for target in profile.robustness.targets]


def cross_domain(profile: Profile, seed: int, train_missing: bool = True) -> list[tuple[dict, Run]]:
    """The paper's attack on each domain against RN trained on each domain and on all of them (joint)."""
    return [({"defended_on": defended_on, "domain": attacked},
             _attack(profile, profile, "defended", attacked, defended_on, seed, train_missing))
            for attacked in profile.domains for defended_on in (*profile.domains, train.JOINT)]


def utility(profile: Profile, domains: list[str], seed: int, train_missing: bool = True) -> list[tuple[dict, Run]]:
    """The finetunability task (same GRPO budget as the attack) on every target model of each domain.

    The standard model is aligned on every domain at once, so it appears once, labelled domain 'all'.
    """
    def finetuned(target: str, domain: str) -> Run:
        start = _target(profile, target, domain, seed, train_missing)
        if train_missing:
            return train.finetune(profile, start, seed)
        return replace(train.stage_run(profile, "finetune", None, seed, start=start.id), needs=(start,))

    cells = [({"target": "standard", "domain": "all"}, finetuned("standard", domains[0]))] \
        if "standard" in profile.robustness.targets else []
    return cells + [({"target": target, "domain": domain}, finetuned(target, domain))
                    for domain in domains for target in profile.robustness.targets if target != "standard"]


def headline(profile: Profile, domain: str, train_missing: bool = True) -> list[tuple[dict, Run]]:
    """The paper's attack on the standard and the RN model for each headline seed.

    Every seed starts from one aligned model (seed `robustness.headline_align_seed`), as the paper attacks one
    vendor checkpoint per model: the seeds vary the defense's and the attack's initialisation and sampling.
    """
    return [({"target": target, "domain": domain},
             _attack(profile, profile, target, domain, domain, seed, train_missing, profile.robustness.headline_align_seed))
            for seed in profile.robustness.headline_seeds for target in ("standard", "defended")]


def mean_and_interval(values: pd.Series, confidence: float = 0.95) -> dict:
    """Mean and two-sided t-interval over seeds (no interval from a single seed)."""
    n, mean = len(values), float(values.mean())
    if n < 2:
        return {"n": n, "mean": mean, "low": None, "high": None}
    half = float(stats.t.ppf((1 + confidence) / 2, n - 1) * values.std(ddof=1) / n ** 0.5)
    return {"n": n, "mean": mean, "low": mean - half, "high": mean + half}
