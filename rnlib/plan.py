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
from rnlib.config import ConfigError, Profile
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


def cells(items: list[Item], notebooks: tuple[str, ...] = (PAPER, BEYOND)) -> list[Run]:
    """The matrix of a plan (`requested`): every attack and finetune run the given notebooks read, each once, in the
    plan's fixed order. Each trains the models it starts from (align, a defense) when they are missing."""
    return [item.run for item in items if item.run.make and item.notebook in notebooks]


def shard(runs: list[Run], spec: str) -> list[Run]:
    """Shard `i/n` of a list: every n-th run starting at run i (0 <= i < n), so n shards cover it exactly once."""
    try:
        index, count = (int(part) for part in spec.split("/"))
    except ValueError:
        index = count = -1
    if not 0 <= index < count:
        raise ConfigError(f"shard '{spec}' is not i/n with 0 <= i < n; e.g. --shard 0/4 (a SLURM array task: "
                          "--shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT)")
    return runs[index::count]


def _duration(run: Run) -> float | None:
    manifest = run.manifest
    try:
        started, ended = (time.mktime(time.strptime(manifest[k], "%Y-%m-%dT%H:%M:%S")) for k in ("started", "ended"))
    except (KeyError, ValueError):
        return None
    return ended - started if manifest.get("attempts", 1) == 1 else None  # a resumed run's span includes the pause


def stage_minutes(roots: list[Path], profile: Profile | None = None) -> dict[str, float]:
    """Median wall minutes of finished, uninterrupted runs per stage, over the given run roots; given a profile,
    only its own runs on its model (a cpu run says nothing of an 8B model's time)."""
    spans: dict[str, list[float]] = {}
    for root in roots:
        for run in pipeline.find_runs(root=root):
            made_by = run.manifest.get("profile", {})
            if profile and (made_by.get("name"), made_by.get("model")) != (profile.name, profile.model):
                continue
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
    minutes = stage_minutes(estimate_from, profile)
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


# --- what the plan needs on a GPU, estimated before there is one ------------------------------------------------

@dataclass(frozen=True)
class GPU:
    name: str
    memory_gib: float
    bandwidth_gbs: float  # HBM
    bf16_tflops: float  # dense peak


GPUS = {"a100-80gb": GPU("A100 80GB SXM", 80, 2039, 312), "h100-80gb": GPU("H100 80GB SXM", 80, 3350, 989),
        "h200": GPU("H200 141GB", 141, 4800, 989), "l40s": GPU("L40S 48GB", 48, 864, 362)}
# Assumed, not measured: batched decoding through transformers with bitsandbytes nf4 reaches a small share of the
# bandwidth bound (dequantizing kernels, Python per token); vLLM a larger one; training a third of bf16 peak.
DECODE_EFFICIENCY = {"transformers": 0.08, "vllm": 0.5}
TRAIN_EFFICIENCY = 0.3
PROMPT_TOKENS = 96  # a chat-formatted request of the study, with the template's tokens
JUDGE_PARAMS = {"cais/HarmBench-Llama-2-13b-cls": 13.0e9, "meta-llama/Llama-Guard-3-8B": 8.0e9}
GIB = 2**30


def _stage_settings(profile: Profile, stage: str):
    return {"align": None, "sft_refusal": profile.defend, "entropy": profile.defend, "defend": profile.defend,
            "attack": profile.attack, "finetune": profile.finetune}[stage]


def stage_estimate(profile: Profile, stage: str, gpu: GPU) -> dict:
    """Peak memory (GiB, by part) and hours of one run of `stage` on `gpu` for the profile's model: a roofline
    model with the assumptions above. Attacks are counted at their full step budget (they may stop sooner)."""
    from rnlib.models import architecture

    arch = architecture(profile.model)
    params = arch.block_params + arch.embedding_params
    weights = arch.block_params * 4.127 / 8 + arch.embedding_params * 2 if profile.quantize_4bit else \
        params * (2 if profile.bf16 else 4)  # nf4 with double quantization; embeddings stay bf16
    lora = arch.layers * sum(profile.lora.r * (i + o) for name, (i, o) in arch.linear_shapes().items()
                             if name in profile.lora.target_modules)
    settings = _stage_settings(profile, stage)
    if settings is None:  # supervised: one batch of full-length examples
        sequences, length, completion = profile.align.batch_size, profile.align.max_length, profile.align.max_length
        examples = len(profile.domains) * profile.align.refusals_per_domain + profile.data.n_benign_train
        steps = int(profile.align.epochs) * -(-examples // profile.align.batch_size)
    else:
        sequences = settings.num_generations * settings.prompts_per_step
        completion = profile.generation.max_new_tokens
        length, steps = PROMPT_TOKENS + completion, settings.max_steps
    tokens = sequences * length
    kv_per_token = 2 * arch.layers * arch.kv_heads * arch.head_dim * 2
    memory = {"weights": weights, "LoRA + Adam": lora * 16,
              # gradient checkpointing: each block's input kept, one block recomputed, the logits and their gradient
              "activations": tokens * arch.hidden * 2 * arch.layers
              + tokens * (4 * arch.hidden + 3 * arch.intermediate) * 2 + sequences * completion * arch.vocab * 2 * 2,
              "KV cache": kv_per_token * max(sequences, profile.eval.batch_size) * length if settings else 0}
    judge = profile.judge.eval
    memory["eval judge"] = JUDGE_PARAMS.get(judge.model or "", 0) * 2 if not judge.endpoint else 0
    decode = DECODE_EFFICIENCY["vllm" if profile.use_vllm else "transformers"]
    token_time = weights / (gpu.bandwidth_gbs * 1e9 * decode)  # one decoding step of a whole batch
    passes = 6 + (2 if settings and settings.beta else 0)  # fwd, bwd, recompute (+ the KL reference's fwd)
    train_time = passes * params * tokens / (gpu.bf16_tflops * 1e12 * TRAIN_EFFICIENCY)
    step = train_time + (completion * token_time if stage not in ("align", "sft_refusal") else 0)  # SFT samples nothing
    evals = (steps // settings.eval_every + 1) if settings else 2
    eval_sequences = profile.eval.samples_per_prompt * profile.data.n_eval * len(profile.domains) \
        + profile.data.n_benign_eval
    eval_time = -(-eval_sequences // profile.eval.batch_size) * profile.generation.max_new_tokens * token_time
    return {"stage": stage, "steps": steps, **{k: v / GIB for k, v in memory.items()},
            "total": sum(memory.values()) / GIB, "step s": step, "hours": (steps * step + evals * eval_time) / 3600}


def gpu_lines(profile: Profile, items: list[Item], gpu_name: str) -> list[str]:
    """`plan --profile paper --model llama3-8b`: memory per stage and GPU-hours for the plan's runs, without a GPU."""
    if gpu_name not in GPUS:
        raise ConfigError(f"unknown GPU '{gpu_name}'; choose one of {', '.join(GPUS)}")
    gpu = GPUS[gpu_name]
    counts: dict[str, int] = {}
    for item in items:
        counts[item.stage] = counts.get(item.stage, 0) + 1
    rows = [stage_estimate(profile, stage, gpu) for stage in counts]
    parts = ("weights", "LoRA + Adam", "activations", "KV cache", "eval judge", "total")
    lines = [f"GPU estimate: {profile.model} on one {gpu.name}, {'4-bit QLoRA' if profile.quantize_4bit else 'LoRA'}"
             f" (a roofline model, not a measurement: decoding at {DECODE_EFFICIENCY['transformers']:.0%} of the "
             f"bandwidth bound, {DECODE_EFFICIENCY['vllm']:.0%} with vLLM; training at {TRAIN_EFFICIENCY:.0%} of bf16 "
             "peak; attacks at their full budget)",
             f"  {'':<23}{'peak memory, GiB':^72}",
             f"  {'stage':<12}{'runs':>5}{'steps':>6}" + "".join(f"{p:>12}" for p in parts) + f"{'s/step':>8}{'h/run':>7}"]
    for row in rows:
        lines.append(f"  {row['stage']:<12}{counts[row['stage']]:>5}{row['steps']:>6}"
                     + "".join(f"{row[p]:>12.1f}" for p in parts) + f"{row['step s']:>8.1f}{row['hours']:>7.2f}")
    hours = sum(counts[row["stage"]] * row["hours"] for row in rows)
    peak = max(row["total"] for row in rows)
    lines.append(f"  {len(items)} runs: ~{hours:.0f} GPU-hours at most; peak ~{peak:.0f} GiB of {gpu.memory_gib:.0f}"
                 + ("" if peak < gpu.memory_gib else " (does not fit: serve the judge elsewhere, judge.eval.endpoint)"))
    return lines
