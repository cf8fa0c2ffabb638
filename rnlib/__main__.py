"""Command line: `python -m rnlib run attack --profile cpu --domain cyber --model smollm2-135m`; `python -m rnlib
matrix --profile cpu --shard 0/4` trains one shard of every cell the notebooks read (a SLURM array task each).

Errors a user can fix (bad profile, unknown model, missing package, unreachable judge) print one line naming
the fix and exit 2; finished stages stay cached and an interrupted one resumes on the next call.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys

import yaml

from rnlib import pipeline
from rnlib.config import TARGETS, ConfigError, available_profiles, load_profile
from rnlib.data import DataError
from rnlib.judges import JudgeError
from rnlib.models import ModelError

STAGES = ("align", "defend", "sft_refusal", "entropy", "attack")


def _overrides(pairs: list[str]) -> dict:
    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ConfigError(f"--set takes key=value, got '{pair}'")
        overrides[key] = yaml.safe_load(value)
    return overrides


def run_stage(stage: str, profile, domain: str | None, seed: int, target: str, defended_on: str | None = None,
              aligned_seed: int | None = None):
    from rnlib import train

    if stage == "align":
        return train.align(profile, seed)
    if domain is None:
        raise ConfigError(f"stage '{stage}' needs --domain ({', '.join(profile.domains)})")
    if stage != "attack":
        start = None if aligned_seed is None else train.align(profile, aligned_seed)
        return getattr(train, stage)(profile, domain, seed, start=start)
    if domain == train.JOINT:
        raise ConfigError("attack one domain at a time; to attack a joint defense use --defended-on joint")
    start = train.target_model(profile, target, defended_on or domain, seed, aligned_seed)
    return train.attack(profile, domain, seed, start=start)


def _matrix(profile, spec: str, scope: str, domains: list[str] | None) -> int:
    """Train one shard's cells in order (each with the models it starts from); print its cells as JSON."""
    from rnlib import plan

    items = plan.requested(profile, domains)
    cells = plan.cells(items, (plan.PAPER,) if scope == "paper" else (plan.PAPER, plan.BEYOND))
    mine = plan.shard(cells, spec)
    roots = [pipeline.runs_root(), pipeline.shipped_root(profile.name)]
    with contextlib.redirect_stdout(sys.stderr):
        for line in plan.describe(profile, items, roots[0], roots):
            pipeline.say(line)
        for number, cell in enumerate(mine, 1):
            pipeline.say(f"shard {spec}: cell {number}/{len(mine)} {cell.id}")
            cell.make()
    if pipeline.is_main_process():
        print(json.dumps({"shard": spec, "cells": len(cells), "ran": [cell.id for cell in mine]}, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rnlib", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run one stage (cached by config hash, resumable)")
    run.add_argument("stage", choices=STAGES)
    run.add_argument("--profile", default="cpu", help=f"one of {', '.join(available_profiles())} or a YAML path")
    run.add_argument("--domain", choices=("biochem", "cyber", "joint"), help="joint: a defense on every domain")
    run.add_argument("--model", help="registry key, hub id or local directory (overrides the profile)")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--target", choices=TARGETS, default="standard",
                     help="attack: the standard-aligned model, or one defended by RN, sft_refusal or entropy")
    run.add_argument("--defended-on", choices=("biochem", "cyber", "joint"),
                     help="attack: the domain the target was defended on (default: the attacked domain)")
    run.add_argument("--aligned-seed", type=int, help="the seed of the aligned model a defense (or an attack's "
                     "target) builds on (default --seed; the headline seeds all start from robustness.headline_align_seed)")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. attack.max_steps=20")
    show = commands.add_parser("profile", help="print a resolved profile")
    show.add_argument("name")
    matrix = commands.add_parser("matrix", help="train every n-th cell of the study's matrix (cached, idempotent)")
    matrix.add_argument("--profile", default="cpu")
    matrix.add_argument("--shard", default="0/1", help="i/n: cells i, i+n, i+2n, ... of the fixed cell order")
    matrix.add_argument("--scope", choices=("paper", "all"), default="all",
                        help="paper: notebooks 01-04's cells only; all: also notebook 05's (hours on a CPU)")
    matrix.add_argument("--domains", nargs="*", choices=("biochem", "cyber"))
    matrix.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    planned = commands.add_parser("plan", help="list the runs the notebooks need, what has finished, time estimates")
    planned.add_argument("--profile", default="cpu")
    planned.add_argument("--domains", nargs="*", choices=("biochem", "cyber"))
    planned.add_argument("--model", help="registry key or local directory (overrides the profile)")
    planned.add_argument("--gpu", help="also estimate memory per stage and GPU-hours on this GPU (default for "
                         "profiles that quantize: a100-80gb); one of a100-80gb, h100-80gb, h200, l40s")
    planned.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                         help="plan under overrides, as `matrix --set` trains them")
    args = parser.parse_args(argv)
    try:
        if args.command == "profile":
            print(yaml.safe_dump(load_profile(args.name).to_dict(), sort_keys=False))
            return 0
        if args.command == "plan":
            from rnlib import plan

            profile = load_profile(args.profile, _overrides(args.set) | ({"model": args.model} if args.model else {}))
            roots = [pipeline.runs_root(), pipeline.shipped_root(profile.name)]
            items = plan.requested(profile, args.domains)
            print("\n".join(plan.describe(profile, items, roots[0], roots)))
            gpu = args.gpu or ("a100-80gb" if profile.quantize_4bit else None)
            if gpu:
                print("\n".join(plan.gpu_lines(profile, items, gpu)))
            return 0
        if args.command == "matrix":
            return _matrix(load_profile(args.profile, _overrides(args.set)), args.shard, args.scope, args.domains)
        overrides = _overrides(args.set) | ({"model": args.model} if args.model else {})
        profile = load_profile(args.profile, overrides)
        with contextlib.redirect_stdout(sys.stderr):  # progress to stderr; stdout is the result, as JSON
            result = run_stage(args.stage, profile, args.domain, args.seed, args.target, args.defended_on,
                               args.aligned_seed)
        if pipeline.is_main_process():  # under `accelerate launch`, one answer
            print(json.dumps({"run": str(result.path), "stop_reason": result.manifest.get("stop_reason"),
                              "after": result.manifest.get("after")}, indent=2))
        return 0
    except (ConfigError, DataError, JudgeError, ModelError) as err:
        print(f"rnlib: {err}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as err:
        print(f"rnlib: missing package '{err.name}'; install the environment with: make setup", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("rnlib: interrupted; finished stages are kept and this one resumes from its last checkpoint "
              "when you run the same command again", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
