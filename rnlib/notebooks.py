"""Execute the numbered notebooks headlessly with papermill: `python -m rnlib.notebooks --profile cpu`.

Sources are jupytext percent files (notebooks/NN_name.py). Each is converted in memory, executed with
papermill (kernel python3, parameters injected into its `parameters` cell) from the repository root, and
written to papermill_runs/<profile>/NN_name.ipynb; figures go to figures/<profile>/. Stages are cached in
runs/, so a second invocation only re-executes the notebooks. The first failing notebook stops the pipeline
with its failing cell's error.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK_DIR = ROOT / "notebooks"


def sources() -> list[Path]:
    return sorted(NOTEBOOK_DIR.glob("[0-9][0-9]_*.py"))


def _declared_parameters(notebook) -> str:
    return next(c.source for c in notebook.cells if "parameters" in c.metadata.get("tags", []))


def execute(profile: str, only: list[str] | None = None, domains: list[str] | None = None,
            output_root: Path | None = None, figures_root: Path | None = None,
            finished_only: bool = False) -> dict[str, float]:
    """Run the notebooks in order; return {notebook: wall seconds}. `domains` narrows the profile's domains;
    `finished_only` has notebooks that can (05) report the finished runs and train nothing."""
    import jupytext
    import papermill

    output_dir = (output_root or ROOT / "papermill_runs") / profile
    figures_dir = (figures_root or ROOT / "figures") / profile
    output_dir.mkdir(parents=True, exist_ok=True)
    recorded = output_dir / "timings.json"  # a partial or interrupted run keeps the other notebooks' times
    previous = json.loads(recorded.read_text()) if recorded.is_file() else {}
    timings = {}
    for source in sources():
        if only and not any(source.stem.startswith(prefix) for prefix in only):
            continue
        started = time.perf_counter()
        print(f"[rnlib.notebooks] {source.stem} (profile {profile}) ...", flush=True)
        notebook = jupytext.read(source)
        parameters = {"profile": profile, "figures_dir": str(figures_dir)}
        if domains and "domains = " in _declared_parameters(notebook):
            parameters["domains"] = domains
        if finished_only and "train_missing = " in _declared_parameters(notebook):
            parameters["train_missing"] = False
        papermill.execute_notebook(notebook, str(output_dir / f"{source.stem}.ipynb"), parameters=parameters,
                                   kernel_name="python3", cwd=str(ROOT), progress_bar=False)
        timings[source.stem] = round(time.perf_counter() - started, 1)
        print(f"[rnlib.notebooks] {source.stem} done in {timings[source.stem]:.0f} s", flush=True)
        recorded.write_text(json.dumps(dict(sorted((previous | timings).items())), indent=2) + "\n")
    return timings


def main(argv: list[str] | None = None) -> int:
    from papermill.exceptions import PapermillExecutionError

    parser = argparse.ArgumentParser(prog="python -m rnlib.notebooks", description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="cpu")
    parser.add_argument("--only", nargs="*", help="notebook prefixes to run, e.g. 04")
    parser.add_argument("--domains", nargs="*", help="a subset of the profile's domains (default: all)")
    parser.add_argument("--finished-only", action="store_true",
                        help="notebook 05: report the runs that have finished, train none of the missing ones")
    args = parser.parse_args(argv)
    from rnlib.config import ConfigError, load_profile

    try:
        load_profile(args.profile)
        timings = execute(args.profile, args.only, args.domains, finished_only=args.finished_only)
    except ConfigError as err:
        print(f"rnlib.notebooks: {err}", file=sys.stderr)
        return 2
    except PapermillExecutionError as err:
        print(f"rnlib.notebooks: cell {err.exec_count} failed: {err.ename}: {err.evalue}", file=sys.stderr)
        return 1
    print(f"[rnlib.notebooks] all done: {json.dumps(timings)} (total {sum(timings.values()):.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
