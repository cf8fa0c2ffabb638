"""Execute the numbered notebooks headlessly with papermill: `make figures` and `make study`.

Sources are jupytext percent files (notebooks/NN_name.py). Each is converted in memory, executed with
papermill (kernel python3, parameters injected into its `parameters` cell) from the repository root, and
written to papermill_runs/<profile>/NN_name.ipynb; figures go to figures/<profile>/.

Two modes, one set of notebooks:
- `--from-logs` (`make figures`): the notebooks read the shipped run logs in results/<profile>/ and train
  nothing. It first checks that the logs hold every run notebooks 01-04 need at the current config hashes, and
  names the missing and stale ones with the command that refreshes them.
- default (`make study`): prints the plan (runs to train, runs cached, a time estimate), trains what is missing
  in runs/, executes the notebooks, and copies the finished runs' logs into results/<profile>/.
- `--ship`: trains nothing and executes no notebook; adds the finished runs of runs/ that results/<profile>/ lacks
  (runs made one by one with `python -m rnlib run ...`), then `--from-logs` redraws the figures from them.
Progress lines that the notebooks print (`[rnlib] ...`) are forwarded to the terminal as they happen.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from rnlib import pipeline

ROOT = pipeline.ROOT
NOTEBOOK_DIR = ROOT / "notebooks"


def sources() -> list[Path]:
    return sorted(NOTEBOOK_DIR.glob("[0-9][0-9]_*.py"))


def _declared_parameters(notebook) -> str:
    return next(c.source for c in notebook.cells if "parameters" in c.metadata.get("tags", []))


class _ProgressLines:
    """papermill's stdout sink: passes the notebooks' `[rnlib]` progress lines to the terminal, nothing else."""

    def write(self, text: str) -> None:
        for line in text.splitlines():
            if line.startswith("[rnlib]"):
                print("   " + line, flush=True)

    def flush(self) -> None:
        sys.stdout.flush()


@contextlib.contextmanager
def _environment(**values: str):
    """Set variables for the notebook kernels (they inherit this process's environment), then restore them."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key)
            else:
                os.environ[key] = value


def _kernel_manager_class():
    """Where the OS has IPC sockets, each notebook's kernel talks to papermill over sockets in a directory of its own.
    Over TCP (jupyter_client's default) two notebooks started side by side can be handed the same free port, and
    one kernel then never answers ("Kernel didn't respond in 60 seconds")."""
    from jupyter_client import AsyncKernelManager
    from traitlets import CaselessStrEnum

    if os.name != "posix":
        return AsyncKernelManager

    class PrivateIPCKernelManager(AsyncKernelManager):
        transport = CaselessStrEnum(["tcp", "ipc"], default_value="ipc", config=True)

        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.socket_dir = tempfile.mkdtemp(prefix="rnlib-kernel-")
            self.ip = os.path.join(self.socket_dir, "ipc")

        async def _async_cleanup_resources(self, restart: bool = False) -> None:
            await super()._async_cleanup_resources(restart)
            if not restart:
                shutil.rmtree(self.socket_dir, ignore_errors=True)

    return PrivateIPCKernelManager


def _execute_one(source: Path, output: Path, parameters: dict) -> float:
    """Execute one notebook (in this process); return its wall seconds."""
    import jupytext
    import papermill

    started = time.perf_counter()
    print(f"[rnlib.notebooks] {source.stem} ...", flush=True)
    papermill.execute_notebook(jupytext.read(source), str(output), parameters=parameters, kernel_name="python3",
                               cwd=str(ROOT), progress_bar=False, stdout_file=_ProgressLines(),
                               kernel_manager_class=_kernel_manager_class())
    seconds = round(time.perf_counter() - started, 1)
    print(f"[rnlib.notebooks] {source.stem} done in {seconds:.0f} s", flush=True)
    return seconds


def execute(profile: str, only: list[str] | None = None, domains: list[str] | None = None,
            output_root: Path | None = None, figures_root: Path | None = None,
            train_robustness: bool = False, workers: int = 1) -> dict[str, float]:
    """Run the notebooks; return {notebook: wall seconds}. `domains` narrows the profile's domains; notebook 05
    trains its missing runs only with `train_robustness` (else it reports the finished ones). `workers` > 1 runs
    notebooks side by side, which is only safe when none trains (replaying shipped logs): else they run in order."""
    import jupytext

    output_dir = (output_root or ROOT / "papermill_runs") / profile
    figures_dir = (figures_root or ROOT / "figures") / profile
    output_dir.mkdir(parents=True, exist_ok=True)
    recorded = output_dir / "timings.json"  # a partial or interrupted run keeps the other notebooks' times
    previous = json.loads(recorded.read_text()) if recorded.is_file() else {}
    jobs = []
    for source in sources():
        if only and not any(source.stem.startswith(prefix) for prefix in only):
            continue
        parameters = {"profile": profile, "figures_dir": str(figures_dir)}
        declared = _declared_parameters(jupytext.read(source))
        if domains and "domains = " in declared:
            parameters["domains"] = domains
        if "train_missing = " in declared:
            parameters["train_missing"] = train_robustness
        jobs.append((source, output_dir / f"{source.stem}.ipynb", parameters))
    if workers > 1:
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            seconds = list(pool.map(_execute_one, *zip(*jobs)))
    else:
        seconds = [_execute_one(*job) for job in jobs]
    timings = {source.stem: s for (source, _, _), s in zip(jobs, seconds)}
    recorded.write_text(json.dumps(dict(sorted((previous | timings).items())), indent=2) + "\n")
    return timings


def results_path(profile_name: str) -> Path:
    """docs/results.md for the default profile (cpu), docs/results-<profile>.md for the others."""
    return ROOT / "docs" / ("results.md" if profile_name == "cpu" else f"results-{profile_name}.md")


def results_doc(profile_name: str, figures_dir: Path, results: Path) -> str:
    """docs/results.md: the tables the notebooks wrote (figures_dir/*.md), in notebook order, under a header that
    names the runs they come from."""
    runs = pipeline.find_runs(root=results)
    commits = pipeline.run_commits(runs)
    where = results.relative_to(ROOT) if results.is_relative_to(ROOT) else results
    header = (f"# Results: profile `{profile_name}`\n\n"
              f"Written by `make figures` from the logs of {len(runs)} runs shipped in `{where}/` (made at commit "
              f"{', '.join(commits)}); do not edit by hand. Each table is also a CSV in "
              f"`figures/{profile_name}/`, and the notebook that wrote it is executed in `papermill_runs/{profile_name}/` "
              "(the table's name starts with the notebook's number). Every run id names its stage, domain, model, "
              "seed and config hash; its manifest, step log and evaluations are in the shipped logs.\n")
    sections = [table.read_text() for table in sorted(figures_dir.glob("[0-9][0-9]_*.md"))]
    return "\n".join([header, *sections])


def from_logs(profile_name: str, results: Path | None = None, **options) -> dict[str, float]:
    """`make figures`: execute the notebooks on the shipped logs; refuse when notebooks 01-04 would miss a run.

    Run in full on the repository's own folders, it first empties figures/<profile>/ (so no figure of an older
    notebook survives) and rewrites docs/results.md."""
    from rnlib import plan
    from rnlib.config import ConfigError, load_profile

    profile = load_profile(profile_name)
    results = results or pipeline.shipped_root(profile.name)
    with _environment(RN_RUNS=str(results)):
        items = plan.requested(profile)
    stale = plan.stale(profile, items, results)
    for run in stale:
        print(f"[rnlib.notebooks] stale shipped log (the current code asks for another config hash): {run.id}")
    missing = plan.missing(items, results)
    if missing:
        raise ConfigError(f"{len(missing)} runs that notebooks 01-04 need are not among the shipped logs in {results} "
                          f"(first: {missing[0].id}); refresh them with: make study PROFILE={profile.name}")
    in_repository = options.get("figures_root") is None and not options.get("only")
    figures_dir = (options.get("figures_root") or ROOT / "figures") / profile.name
    if in_repository:
        shutil.rmtree(figures_dir, ignore_errors=True)
    # Two notebooks at a time, one thread each: replaying is mostly imports and plotting, not arithmetic.
    with _environment(RN_RUNS=str(results), RN_REPLAY="1", OMP_NUM_THREADS="1"):
        timings = execute(profile.name, workers=2, **options)
    if in_repository:
        results_path(profile.name).write_text(results_doc(profile.name, figures_dir, results))
    return timings


def study(profile_name: str, results: Path | None = None, **options) -> dict[str, float]:
    """`make study`: print the plan, train what is missing, execute the notebooks, ship the finished runs' logs."""
    from rnlib import plan
    from rnlib.config import load_profile

    profile = load_profile(profile_name)
    results = results or pipeline.shipped_root(profile.name)
    items = plan.requested(profile, options.get("domains"))
    for line in plan.describe(profile, items, pipeline.runs_root(), [pipeline.runs_root(), results]):
        print(f"[rnlib.notebooks] {line}", flush=True)
    timings = execute(profile.name, **options)
    everything = plan.requested(profile)
    _ship(profile, [item.run for item in everything if item.run.finished], results)
    for run in plan.stale(profile, everything, results):
        shutil.rmtree(run.path)
    return timings


def ship(profile_name: str, results: Path | None = None) -> list[str]:
    """`--ship`: add to results/<profile>/ the finished runs of runs/ that the plan asks for and the shipped logs
    lack, with the checks the replaying notebooks read; train nothing, and leave every shipped run as it is.

    The way to ship runs made one by one (`python -m rnlib run ...`) into a partial runs/ cache, where
    `make study` would first retrain every missing run the notebooks read."""
    from rnlib import plan
    from rnlib.config import load_profile

    profile = load_profile(profile_name)
    results = results or pipeline.shipped_root(profile.name)
    new = [item.run for item in plan.requested(profile)
           if item.run.finished and not (results / item.run.id / "manifest.json").is_file()]
    _ship(profile, new, results)
    return [run.id for run in new]


def _ship(profile, runs: list, results: Path) -> None:
    """Measure what replaying notebooks read of each run (refusal checks, public requests and utility floors of
    trained models, eval-judge scores), then copy the runs' logs into `results`."""
    from rnlib import train

    for run in runs:
        stage = run.manifest["stage"]
        if stage in ("align", *train.DEFENSE_STAGES):
            train.refusal_check(profile, run)
            for domain in (profile.domains if run.manifest["domain"] in (None, train.JOINT)
                           else [run.manifest["domain"]]):
                train.public_check(profile, run, domain)
        if stage == "align":
            train.task_check(profile, run)
        if stage in train.DEFENSE_STAGES:
            train.utility_floor(profile, run)  # with the finetune runs of the model and its start, where finished
        if stage != "finetune":
            train.judged_frame(profile, [run])
    written = pipeline.export(runs, results)
    size = sum(f.stat().st_size for f in written) / 2**20
    print(f"[rnlib.notebooks] shipped the logs of {len(runs)} finished runs to {results} ({size:.1f} MiB)")


def main(argv: list[str] | None = None) -> int:
    from papermill.exceptions import PapermillExecutionError

    parser = argparse.ArgumentParser(prog="python -m rnlib.notebooks", description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="cpu")
    parser.add_argument("--only", nargs="*", help="notebook prefixes to run, e.g. 04")
    parser.add_argument("--domains", nargs="*", help="a subset of the profile's domains (default: all)")
    parser.add_argument("--from-logs", action="store_true",
                        help="make figures: read the shipped logs in results/<profile>/, train nothing")
    parser.add_argument("--ship", action="store_true",
                        help="train nothing, run no notebook: add the finished runs of runs/ that the shipped logs lack")
    parser.add_argument("--train-robustness", action="store_true",
                        help="notebook 05 trains its missing runs too (hours on a CPU; make robustness)")
    args = parser.parse_args(argv)
    from rnlib.config import ConfigError

    options = {"only": args.only, "domains": args.domains, "train_robustness": args.train_robustness}
    started = time.perf_counter()
    if args.ship:
        shipped = ship(args.profile)
        print("\n".join(f"[rnlib.notebooks] shipped {run_id}" for run_id in shipped) or "[rnlib.notebooks] nothing new")
        return 0
    try:
        timings = (from_logs if args.from_logs else study)(args.profile, **options)
    except ConfigError as err:
        print(f"rnlib.notebooks: {err}", file=sys.stderr)
        return 2
    except PapermillExecutionError as err:
        print(f"rnlib.notebooks: cell {err.exec_count} failed: {err.ename}: {err.evalue}", file=sys.stderr)
        return 1
    print(f"[rnlib.notebooks] all done in {time.perf_counter() - started:.0f} s: {json.dumps(timings)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
