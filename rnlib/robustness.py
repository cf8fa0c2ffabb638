"""Beyond the paper (notebook 05): defenses x attacks, transfer, utility, and the headline over seeds.

Every cell of the matrix is an ordinary `train.attack` run on an ordinary defense run, so it is cached,
resumable and labelled like the rest of the study; this module only decides which runs make up a table.
"""
from __future__ import annotations

import pandas as pd
from scipy import stats

from rnlib import pipeline, train
from rnlib.config import ATTACK_VARIANTS, Profile, with_overrides
from rnlib.pipeline import Run


def _labelled(runs: list[tuple[dict, Run]], table: str) -> pd.DataFrame:
    return pd.concat([pipeline.frame([run], table).assign(**labels) for labels, run in runs], ignore_index=True)


def last_evals(runs: list[tuple[dict, Run]]) -> pd.DataFrame:
    """Each labelled run's final held-out evaluation."""
    return _labelled(runs, "evals").sort_values("step").groupby("run_id").last().reset_index()


def attack_matrix(profile: Profile, domain: str, seed: int) -> list[tuple[dict, Run]]:
    """Every named attack (profile.robustness.attacks) against every target (profile.robustness.targets)."""
    runs = []
    for name in profile.robustness.attacks:
        attacker = with_overrides(profile, ATTACK_VARIANTS[name])
        for target in profile.robustness.targets:
            start = train.target_model(profile, target, domain, seed)
            runs.append(({"attack": name, "target": target}, train.attack(attacker, domain, seed, start=start)))
    return runs


def cross_domain(profile: Profile, seed: int) -> list[tuple[dict, Run]]:
    """The paper's attack on each domain against RN trained on each domain and on all of them (joint)."""
    runs = []
    for attacked in profile.domains:
        for defended_on in (*profile.domains, train.JOINT):
            start = train.defend(profile, defended_on, seed)
            runs.append(({"defended_on": defended_on}, train.attack(profile, attacked, seed, start=start)))
    return runs


def utility(profile: Profile, domain: str, seed: int) -> list[tuple[dict, Run]]:
    """The finetunability task (same GRPO budget as the attack) on every target model."""
    return [({"target": target}, train.finetune(profile, train.target_model(profile, target, domain, seed), seed))
            for target in profile.robustness.targets]


def headline(profile: Profile, domain: str) -> list[tuple[dict, Run]]:
    """The paper's attack on the standard and the RN model for each headline seed."""
    return [({"target": target}, train.attack(profile, domain, seed, start=train.target_model(profile, target, domain, seed)))
            for seed in profile.robustness.headline_seeds for target in ("standard", "defended")]


def mean_and_interval(values: pd.Series, confidence: float = 0.95) -> dict:
    """Mean and two-sided t-interval over seeds (no interval from a single seed)."""
    n, mean = len(values), float(values.mean())
    if n < 2:
        return {"n": n, "mean": mean, "low": None, "high": None}
    half = float(stats.t.ppf((1 + confidence) / 2, n - 1) * values.std(ddof=1) / n ** 0.5)
    return {"n": n, "mean": mean, "low": mean - half, "high": mean + half}
