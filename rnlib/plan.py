"""The study's plan: every run the notebooks read, whether it has finished, and how long the rest should take.

`make study` prints it before training anything; `make figures` uses it to check that the shipped logs hold
every run notebooks 01-04 need, at the config hashes the current code asks for, and to name the stale ones.
Estimates are the median wall time of finished runs of the same stage (in runs/ or among the shipped logs),
so they are measurements from some machine, not promises.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from rnlib import pipeline, robustness
from rnlib.config import Profile
from rnlib.pipeline import Run

PAPER, BEYOND = "01-04", "05"  # the paper's comparison (must exist), and notebook 05 (reported when missing)


@dataclass(frozen=True)
class Item:
    notebook: str
    run: Run

    @property
    def stage(self) -> str:
        return self.run.id.split("-")[0]


def requested(profile: Profile, domains: list[str] | None = None) -> list[Item]:
    """Every run the notebooks read, prerequisites before the runs that start from them, each run once."""
    domains = list(domains or profile.domains)
    seed = profile.seeds[0]
    paper = [run for _, run in robustness.paper_comparison(profile, domains, list(profile.seeds), train_missing=False)]
    beyond = [run for _, run in robustness.targets(profile, domains, seed, train_missing=False)]
    for domain in domains:
        beyond += [run for _, run in robustness.attack_matrix(profile, domain, seed, train_missing=False)]
    beyond += [run for _, run in robustness.utility(profile, domains, seed, train_missing=False)]
    if profile.robustness.cross_domain and len(domains) > 1:
        beyond += [run for _, run in robustness.cross_domain(profile, seed, train_missing=False)]
    for domain in domains:
        beyond += [run for _, run in robustness.headline(profile, domain, train_missing=False)]
    items: dict[str, Item] = {}

    def add(run: Run, notebook: str) -> None:
        for need in run.needs:
            add(need, notebook)
        items.setdefault(run.id, Item(notebook, run))

    for run in paper:
        add(run, PAPER)
    for run in beyond:
        add(run, BEYOND)
    return list(items.values())


def _duration(run: Run) -> float | None:
    manifest = run.manifest
    try:
        started, ended = (time.mktime(time.strptime(manifest[k], "%Y-%m-%dT%H:%M:%S")) for k in ("started", "ended"))
    except (KeyError, ValueError):
        return None
    return ended - started if manifest.get("attempts", 1) == 1 else None  # a resumed run's span includes the pause


def stage_minutes(roots: list[Path]) -> dict[str, float]:
    """Median wall minutes of finished, uninterrupted runs per stage, over the given run roots."""
    spans: dict[str, list[float]] = {}
    for root in roots:
        for run in pipeline.find_runs(root=root):
            span = _duration(run)
            if span is not None:
                spans.setdefault(run.manifest["stage"], []).append(span / 60)
    return {stage: statistics.median(values) for stage, values in spans.items()}


def stale(profile: Profile, items: list[Item], root: Path) -> list[Run]:
    """Finished runs of this profile under `root` that the current code no longer asks for (changed config hash)."""
    wanted = {item.run.id for item in items}
    return [run for run in pipeline.profile_runs(profile.name, root) if run.id not in wanted]


def describe(profile: Profile, items: list[Item], root: Path, estimate_from: list[Path]) -> list[str]:
    """Progress lines: per notebook group, what has finished under `root` and an estimate for the rest."""
    minutes = stage_minutes(estimate_from)
    lines = [f"plan for profile {profile.name}: {len(items)} runs ({root})"]
    for notebook in (PAPER, BEYOND):
        group = [item for item in items if item.notebook == notebook]
        todo = [item for item in group if not Run(root / item.run.id).finished]
        known = [minutes[item.stage] for item in todo if item.stage in minutes]
        unknown = len(todo) - len(known)
        estimate = (f"~{sum(known):.0f} min" if known else "no estimate yet") + \
            (f" ({unknown} runs of stages never timed here)" if unknown else "")
        verb = "to train" if notebook == PAPER else "not run (notebook 05 lists them; make robustness trains them)"
        lines.append(f"  notebooks {notebook}: {len(group) - len(todo)} finished, {len(todo)} {verb}"
                     + (f", {estimate}" if todo else ""))
        if notebook == PAPER:
            lines += [f"    cached: {item.run.id}" for item in group if item not in todo]
            lines += [f"    to train: {item.run.id}" + (f" (~{minutes[item.stage]:.0f} min)" if item.stage in minutes else "")
                      for item in todo]
    if minutes:
        lines.append("  estimates: median minutes per run, " + ", ".join(f"{k} {v:.1f}" for k, v in sorted(minutes.items())))
    return lines


def missing(items: list[Item], root: Path, notebook: str = PAPER) -> list[Run]:
    return [item.run for item in items if item.notebook == notebook and not Run(root / item.run.id).finished]
