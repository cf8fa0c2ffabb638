"""Run directories: the DAG's cache. config -> stage -> runs/<run_id>/ -> figures.

A run's id is its stage, domain, model, seed and a hash of everything that determines its result (the
profile sections it reads and the id of the run it starts from), so a finished run is reused and a changed
setting makes a new one. `manifest.json` says `"status": "finished"` only after every artifact is written;
anything else is an unfinished run, resumed from its last trainer checkpoint.
"""
from __future__ import annotations

import dataclasses
import datetime
import fcntl
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Callable

from rnlib import data
from rnlib.config import DOMAINS, without_later_defaults

REDACT_AT = 3.0  # completions the judge scores at or above this are stored redacted
PACKAGES = ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "bitsandbytes", "sentence-transformers")
ROOT = Path(__file__).resolve().parent.parent
# What a shipped run keeps: its logs and the refusal checks made on its model. No adapter, model or checkpoint.
SHIPPED_FILES = ("manifest.json", "steps.jsonl", "evals.jsonl", "completions.jsonl", "stop.jsonl",
                 "warm_start.jsonl", "refusal_check-*.json", "public_check-*.json", "task_check-*.json",
                 "rescore-*.json")
EVAL_FIELDS = ("eval_judge", "eval_harm_mean", "eval_harm_std", "eval_harmful_rate", "hacking_gap")


class RunNotAvailable(RuntimeError):
    """A stage that would have to train (or load its model) while the notebooks replay shipped logs."""


def runs_root() -> Path:
    return Path(os.environ.get("RN_RUNS", "runs")).resolve()  # manifests record absolute model paths


def shipped_root(profile_name: str) -> Path:
    """Where the logs of the runs behind a profile's committed figures travel with the repository."""
    return ROOT / "results" / profile_name


def replaying() -> bool:
    """True while notebooks are executed from shipped logs (`make figures`): nothing may train or load a model."""
    return os.environ.get("RN_REPLAY") == "1"


def say(message: str) -> None:
    """A progress line. `python -m rnlib.notebooks` forwards exactly these lines from the notebooks to the terminal."""
    if is_main_process():
        print(f"[rnlib] {message}", flush=True)


# --- several processes (`accelerate launch`): every process runs the same stage, the main one alone writes --------

def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


COLLECTIVE_TIMEOUT_S = float(os.environ.get("RN_COLLECTIVE_TIMEOUT_S", 2 * 3600))


def _process_group():
    """Join the launch's process group (gloo on CPUs, NCCL on GPUs) before the trainer does, with a timeout that
    outlasts the work the main process does alone while the others wait for it (evaluation and the refusal checks
    with a 13B judge, merging an 8B model): torch's default is 10 min for NCCL. RN_COLLECTIVE_TIMEOUT_S sets it.
    Without a GPU accelerate needs `cpu=True` to see the launch at all (else it reports no distribution and every
    collective below does nothing), as transformers' TrainingArguments passes it."""
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available(), timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))


def agree(value):
    """The main process's `value` in every process: a decision only it may make (is the run finished? what does its
    log say?), so that no process takes a branch the others do not. Alone, `value` itself."""
    if world_size() == 1:
        return value
    from accelerate.utils import broadcast_object_list

    _process_group()
    box = [value]
    broadcast_object_list(box, from_process=0)
    return box[0]


def wait_for_main() -> None:
    """Hold every process here until all arrive, so files the main process wrote before it are complete."""
    if world_size() > 1:
        _process_group().wait_for_everyone()


def require_training(run: "Run", what: str | None = None) -> None:
    """Refuse work that needs a model (training, sampling) while replaying shipped logs."""
    if replaying():
        raise RunNotAvailable(f"{what or run.id} is not among the shipped logs in {runs_root()} (never run, or made stale "
                              "by a code change); train it and refresh the logs with: make study")


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def environment() -> dict:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {"python": sys.version.split()[0], "platform": platform.platform(), "packages": versions,
            "git_commit": _git_commit()}


def write_json_atomic(path: Path, payload: dict) -> None:
    if not is_main_process():
        return
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str))
    tmp.replace(path)


def write_jsonl_atomic(path: Path, rows: list[dict]) -> None:
    """Replace a jsonl log whole (`Run.append` writes rows as they come), so that no reader sees half of it."""
    if not is_main_process():
        return
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("".join(json.dumps(row, default=str) + "\n" for row in rows))
    tmp.replace(path)


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def text_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def redact(record: dict, full: bool = False) -> dict:
    """A completion either judge scores harmful keeps only its scores, length, hash and its first 8 words."""
    text = record["text"]
    if full or max(record["score"], record.get("eval_score", 0.0)) < REDACT_AT:
        return record | {"redacted": False}
    kept = {k: v for k, v in record.items() if k != "text"}
    return kept | {"redacted": True, "hash": text_hash(text), "prefix": " ".join(text.split()[:8]) + " [...]"}


@dataclass
class Run:
    """One stage's run directory. For a run only planned (found by its hash, nothing trained): `needs`, the runs it
    starts from, and `make`, which trains it (and its needs) or returns it once finished."""

    path: Path
    needs: tuple["Run", ...] = field(default=(), compare=False, repr=False)
    make: Callable[[], "Run"] | None = field(default=None, compare=False, repr=False)

    @property
    def id(self) -> str:
        return self.path.name

    @property
    def manifest(self) -> dict:
        file = self.path / "manifest.json"
        return json.loads(file.read_text()) if file.is_file() else {}

    @property
    def finished(self) -> bool:
        return self.manifest.get("status") == "finished"

    @property
    def model_dir(self) -> str:
        """The checkpoint later stages start from: a merged model, or the input model when nothing trained."""
        return self.manifest["model_dir"]

    def steps(self) -> list[dict]:
        return read_jsonl(self.path / "steps.jsonl")

    def evals(self) -> list[dict]:
        return read_jsonl(self.path / "evals.jsonl")

    def completions(self) -> list[dict]:
        return read_jsonl(self.path / "completions.jsonl")

    def rescore_file(self, judge_id: str) -> Path:
        return self.path / f"rescore-{re.sub(r'[^A-Za-z0-9]+', '_', judge_id)}.json"

    def judged_evals(self, judge_id: str) -> list[dict]:
        """Evaluation rows with `judge_id`'s scores (EVAL_FIELDS): logged at evaluation time or, for steps
        evaluated before that judge existed, taken from `train.rescore`; absent where neither has them."""
        file = self.rescore_file(judge_id)
        rescored = {r["step"]: r for r in json.loads(file.read_text())["rows"]} if file.is_file() else {}
        rows = []
        for row in self.evals():
            if row.get("eval_judge") != judge_id:
                row = {k: v for k, v in row.items() if k not in EVAL_FIELDS}
                row |= {k: rescored[row["step"]][k] for k in EVAL_FIELDS if row["step"] in rescored}
            rows.append(row)
        return rows

    def append(self, name: str, rows: list[dict]) -> None:
        if not is_main_process():  # one log per run, however many processes train it
            return
        with open(self.path / name, "a") as handle:
            for row in rows:
                handle.write(json.dumps(row, default=str) + "\n")

    def truncate_after(self, step: int) -> None:
        """On resume, forget logged rows from steps that the restored checkpoint has not seen."""
        if not is_main_process():
            return
        for name in ("steps.jsonl", "evals.jsonl", "completions.jsonl", "stop.jsonl"):
            write_jsonl_atomic(self.path / name, [r for r in read_jsonl(self.path / name) if r["step"] <= step])

    def latest_checkpoint(self) -> str | None:
        checkpoints = sorted((self.path / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
        return str(checkpoints[-1]) if checkpoints else None

    def start(self, manifest: dict) -> None:
        if not is_main_process():
            return
        self.path.mkdir(parents=True, exist_ok=True)
        previous = self.manifest
        write_json_atomic(self.path / "manifest.json", manifest | {
            "status": "running", "started": previous.get("started", time.strftime("%Y-%m-%dT%H:%M:%S")),
            "attempts": previous.get("attempts", 0) + 1})

    def annotate(self, **fields) -> None:
        """Add fields to the manifest of a run, finished or not (e.g. a check measured after it finished)."""
        write_json_atomic(self.path / "manifest.json", self.manifest | fields)

    def finish(self, **fields) -> None:
        """Mark the run finished (the main process; the others wait until it has, then every one may use it)."""
        if is_main_process():
            write_json_atomic(self.path / "manifest.json", self.manifest | fields | {
                "status": "finished", "ended": time.strftime("%Y-%m-%dT%H:%M:%S")})
        release(self)
        wait_for_main()


_CLAIMS: dict[str, tuple] = {}  # run id -> (the open lock file, the held file) while this process trains it;
# (None, None) in the other processes of a launch, which hold nothing but must skip `claim` when the main one does


def claim(run: Run) -> None:
    """Hold an exclusive lock on a run while this process trains it. Two processes that need the same run (two
    shards of the matrix needing one defended model, two terminals) never train it at once: the second waits, then
    finds it finished. Released by `Run.finish`, or by the operating system when the process ends.

    Under `accelerate launch` the main process claims for the launch. The others wait for it here, on a file it
    writes once it holds the lock, rather than in a collective operation, which would time out while another job
    trains the run for longer than the process group's timeout."""
    if run.id in _CLAIMS:  # in every process alike, so that all of them enter the broadcast below or none
        return
    held = runs_root() / ".locks" / f"{run.id}.held"
    token = agree(f"{platform.node()}:{os.getpid()}")  # the main process's, so a crashed launch's file is not its
    if not is_main_process():
        while not (run.finished or (held.is_file() and held.read_text() == token)):
            time.sleep(1)
        _CLAIMS[run.id] = (None, None)
        return
    held.parent.mkdir(parents=True, exist_ok=True)
    handle = open(held.parent / f"{run.id}.lock", "w")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        say(f"waiting: another process is training {run.id}")
        fcntl.flock(handle, fcntl.LOCK_EX)
    if world_size() > 1:
        held.write_text(token)
    _CLAIMS[run.id] = (handle, held)


def release(run: Run) -> None:
    handle, held = _CLAIMS.pop(run.id, (None, None))
    if handle is not None:
        held.unlink(missing_ok=True)
        handle.close()


def export(runs: list[Run], destination: Path) -> list[Path]:
    """Copy the shipped files of finished runs into `destination`/<run id>/ (replacing an older copy of each), an
    attack's completions as `shipped_completions` keeps them."""
    written = []
    for run in runs:
        target = destination / run.id
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir(parents=True)
        for pattern in SHIPPED_FILES:
            for file in run.path.glob(pattern):
                if file.name == "completions.jsonl":
                    write_jsonl_atomic(target / file.name, shipped_completions(run))
                else:
                    shutil.copy2(file, target / file.name)
                written.append(target / file.name)
    return written


def shipped_completions(run: Run) -> list[dict]:
    """What the shipped logs keep of a run's stored answers: all of them, except that an attack keeps its answers
    to harmful prompts at its first and last evaluation only. Those are the ones the notebooks show; the ones in
    between are redacted records (score, length, hash, prefix) that no figure reads, and they were most of the
    shipped logs' size. Benign answers stay at every step: their length and variety are read at each one."""
    records = run.completions()
    if run.manifest["stage"] != "attack":
        return records
    harmful_steps = {r["step"] for r in records if r.get("kind") == "harmful"}
    shown = {min(harmful_steps), max(harmful_steps)} if harmful_steps else set()
    return [r for r in records if r.get("kind") != "harmful" or r["step"] in shown]


def profile_runs(profile_name: str, root: Path) -> list[Run]:
    """Finished runs under `root` that a profile of this name made."""
    return [r for r in find_runs(root=root) if r.manifest.get("profile", {}).get("name") == profile_name]


def run_commits(runs: list[Run]) -> list[str]:
    """The git commits (first 10 characters) whose code made these runs."""
    return sorted({((r.manifest.get("environment") or {}).get("git_commit") or "unknown")[:10] for r in runs})


def source_line(profile) -> str:
    """Where a notebook's numbers come from: shipped logs or fresh runs, the commits that made them, the profile."""
    root = runs_root()
    runs = profile_runs(profile.name, root)
    commits = run_commits(runs)
    where = root.relative_to(ROOT) if root.is_relative_to(ROOT) else root
    kind = "shipped run logs (nothing is trained)" if replaying() else "fresh runs (missing ones are trained)"
    return (f"Source: {kind} in {where}: {len(runs)} finished runs of profile '{profile.name}', made at commit "
            f"{', '.join(commits) or '-'}; profile config hash "
            f"{profile.section_hash(*profile.to_dict())}. Each run id ends with its stage's config hash.")


def run_for(stage: str, domain: str | None, model_key: str, seed: int, config_hash: str) -> Run:
    safe_model = Path(model_key).name.replace("/", "_")
    return Run(runs_root() / f"{stage}-{domain or 'all'}-{safe_model}-s{seed}-{config_hash}")


def find_runs(stage: str | None = None, root: Path | None = None) -> list[Run]:
    """Finished runs under the runs root, for analysis notebooks that never retrain."""
    root = root or runs_root()
    found = [Run(p) for p in sorted(root.glob("*/")) if (p / "manifest.json").is_file()]
    return [r for r in found if r.finished and (stage is None or r.manifest.get("stage") == stage)]


def config_hash(profile, stage: str, domain: str | None, seed: int, start: str) -> str:
    """Hash of the profile sections a stage reads plus its inputs (`start`: the run it starts from)."""
    top = without_later_defaults("profile", {"model": profile.model, "quantize_4bit": profile.quantize_4bit,
                                             "bf16": profile.bf16, "use_vllm": profile.use_vllm})
    sections = {"align": ("align", "domains"), "sft_refusal": ("defend", "baselines"),
                "entropy": ("defend", "baselines"), "finetune": ("finetune",)}.get(stage, (stage,))
    if stage == "attack" and profile.adaptive != type(profile.adaptive)():
        sections += ("adaptive",)  # only a non-paper attack hashes it, so the paper's attack keeps its runs
    return profile.section_hash(*sections, "data", "lora", "generation", "eval",
                                extra=top | reward_judge(profile) | {"stage": stage, "domain": domain, "seed": seed,
                                                                     "start": start, "prompts": data.prompt_sets_hash()})


def reward_judge(profile) -> dict:
    """The judge a run's hash holds: the reward judge, the only one that changes what a stage trains. The eval judge
    tags each evaluation row instead (`eval_judge`), so swapping it re-scores (`train.rescore`) and never retrains."""
    return {"judge": dataclasses.asdict(profile.judge.reward)}


def _in_paper_comparison(run: Run) -> bool:
    """Attacks on the standard model or on RN trained on the attacked domain; single-domain align/defend runs.
    Baselines, adaptive attacks, transfer, joint defenses and finetuning belong to notebook 05."""
    manifest = run.manifest
    if manifest["stage"] == "attack":
        return manifest.get("target") in ("align", "defend") and \
            manifest.get("target_domain", manifest["domain"]) in (None, manifest["domain"])
    return manifest["stage"] == "align" or (manifest["stage"] == "defend" and manifest["domain"] in DOMAINS)


def study_runs(profile, stage: str | None = None, paper_only: bool = True) -> list[Run]:
    """Finished runs this profile would reuse as they are (runs left stale by an edited setting are left out);
    by default only those of the paper's comparison (notebooks 01-04)."""

    def current(run: Run) -> bool:
        manifest = run.manifest
        start = profile.model if manifest["stage"] == "align" else manifest["start_model"]
        return manifest["config_hash"] == config_hash(profile, manifest["stage"], manifest["domain"], manifest["seed"],
                                                      start)

    return [r for r in find_runs(stage) if current(r) and (not paper_only or _in_paper_comparison(r))]


def _label(run: Run) -> dict:
    manifest = run.manifest
    target = {"align": "standard", "defend": "defended"}.get(manifest.get("target"), manifest.get("target"))
    return {"run_id": run.id, "stage": manifest["stage"], "domain": manifest["domain"], "seed": manifest["seed"],
            "model": manifest["model"], "target": target,
            "defended_on": manifest.get("target_domain", manifest["domain"]) if target != "standard" else None}


def _benign_health(run: Run) -> dict[int, dict]:
    """metrics.benign_answer_health of each evaluation step's benign answers (stored in clear: never harmful)."""
    from rnlib.metrics import benign_answer_health

    answers: dict[int, list[str]] = {}
    for record in run.completions():
        if record["kind"] == "benign":
            answers.setdefault(record["step"], []).append(record["text"])
    return {step: benign_answer_health(texts) for step, texts in answers.items()}


def frame(runs: list[Run], table: str = "evals", eval_judge: str | None = None):
    """One long table (pandas) of the runs' `evals` or `steps` rows, labelled by stage, domain, seed and target.

    Evaluation rows also get the length and variety of that step's benign answers (`benign_words`,
    `benign_distinct`), which tell a neutralized model from a broken one, and, given the eval judge's id, its
    scores (`Run.judged_evals`): `harm_mean` is the reward judge's harm, `eval_harm_mean` the eval judge's.
    """
    import pandas as pd

    def rows(run: Run) -> list[dict]:
        if table != "evals":
            return run.steps()
        health = _benign_health(run)
        evals = run.judged_evals(eval_judge) if eval_judge else run.evals()
        return [row | health.get(row["step"], {}) for row in evals]

    return pd.DataFrame([_label(run) | row for run in runs for row in rows(run)])


def frequent_answers(runs: list[Run], top: int = 3, words: int = 8):
    """The most frequent openings of each run's answers to harmful eval prompts at its last evaluation.

    Shows what a model actually says when its numbers surprise (a refusal rate near zero with harm near zero
    means answers that neither refuse nor help). Only the first `words` words are shown, whatever the score.
    """
    import pandas as pd

    tables = []
    for run in runs:
        rows = [r for r in run.completions() if r["kind"] == "harmful"]
        if not rows:
            continue
        last = max(r["step"] for r in rows)
        answers = pd.DataFrame([r for r in rows if r["step"] == last])
        full = answers.get("text", pd.Series(index=answers.index, dtype=object))
        answers["opening"] = [" ".join(str(text).split()[:words]) if isinstance(text, str) else prefix
                              for text, prefix in zip(full, answers.get("prefix", full))]
        table = (answers.groupby("opening").agg(share=("score", lambda s: len(s) / len(answers)),
                                                 harm=("score", "mean"), refused=("refused", "mean"))
                 .sort_values("share", ascending=False).head(top).reset_index())
        tables.append(table.assign(**_label(run), step=last))
    return pd.concat(tables, ignore_index=True) if tables else pd.DataFrame()
