"""Benchmark of the study's hot path: `python -m rnlib.bench --profile cpu`. Prints figures; asserts nothing.

1. A GRPO step of the attack with TRL's own GRPOTrainer (`trl-trainer`, the baseline) beside the study's trainer
   (`profile`: rnlib.train's completion-only LM head and merged-adapter sampling), each lever alone, and levers the
   study leaves off (bf16 sampling, TRL's default precision, batched generation, bf16 weights). Each variant runs
   in its own process (so peak memory is its own) for a few steps, the first a warm-up; `--repeats` interleaves
   the variants and shows medians, since a shared machine's speed drifts. A step splits into generation and
   judging (TRL's own profiling hooks time them) and forward/backward (the rest). Two roofline lines per variant:
   decoding steps/s against the memory-bandwidth bound (copy bandwidth / bytes of weights read per decoding
   step), and training FLOP/s against a large fp32 matmul's.
2. With --judges: answers per second of each offline judge (rubric, minilm) on answers of the study's length and
   on answers of 256 words, in this process's threads (the eval judge's target: >= 50 answers/s on 2 cores).
3. The wall time of each stage of the smoke and cpu profiles, read from the finished runs' manifests, and of
   each notebook, read from papermill_runs/<profile>/timings.json; and the evaluation time that shared step-0
   evaluations saved.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from datetime import datetime

import torch
from transformers import TrainerCallback

from rnlib import config, data, models, pipeline, train
from rnlib.notebooks import ROOT
from rnlib.rewards import harm_reward

# Each variant: profile overrides, GRPOConfig overrides, the study trainer's levers switched off or on (`levers`
# None: TRL's own GRPOTrainer) and environment variables (RN_SAMPLING_DTYPE, see rnlib.train.sampling_dtype).
VARIANTS = {
    # TRL's GRPOTrainer as the study ran it before its levers (rnlib.train._trainer_classes): the baseline.
    "trl-trainer": {"levers": None},
    "profile": {},
    # The levers one at a time, to attribute the difference.
    "completion-head-only": {"levers": {"merge_adapter_for_sampling": False}},
    "merged-sampling-only": {"levers": {"completion_only_head": False}},
    # The opt-in lever: bf16 sampling where the CPU has native bf16 (rnlib.train.sampling_dtype).
    "profile-bf16-sampling": {"env": {"RN_SAMPLING_DTYPE": "auto"}},
    # A KL anchor to the start model (TRL's beta; with PEFT the reference is the adapter-disabled model): the cost of
    # its extra forward pass per step.
    "kl-anchor": {"config": {"beta": 0.04}},
    "trl-defaults": {"config": {"bf16": True, "gradient_checkpointing": True}},
    # A lever the study does not pull: one generation call samples 4 steps' groups (decoding is memory-bound, so a
    # 4x batch costs far less than 4x), but steps 2-4 then learn from samples of an older policy.
    "batched-generation": {"config": {"steps_per_generation": 4}},
    # Another: all weights stored in bf16 with bf16 autocast (the paper profile's precision), training included:
    # it changes the loss's numerics, and without bf16 hardware the products run in software.
    "bf16-weights": {"profile": {"bf16": True}},
}
BEFORE_AFTER = ("trl-trainer", "profile")


def trainer_class(levers: dict | None):
    """The GRPO trainer class a variant runs: TRL's own, or the study's with some levers switched."""
    from trl import GRPOTrainer

    if levers is None:
        return GRPOTrainer
    study = train._trainer_classes()[0]
    return type("BenchGRPOTrainer", (study,), levers) if levers else study


def memory_bandwidth() -> float:
    """Bytes/s of a 256 MiB tensor copy (read + write), best of 5: the bound on decoding, which reads every weight."""
    source = torch.empty(2**26)
    target = torch.empty_like(source)
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        target.copy_(source)
        best = min(best, time.perf_counter() - started)
    return 2 * source.numel() * source.element_size() / best


def matmul_flops(dtype=torch.float32) -> float:
    """FLOP/s of a 2048 x 2048 matrix product in this process's threads, best of 5."""
    a, b = torch.randn(2048, 2048, dtype=dtype), torch.randn(2048, 2048, dtype=dtype)
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - started)
    return 2 * 2048**3 / best


def step_flops(model, tokens: float, completion_tokens: float) -> float:
    """Matmul FLOPs of one forward and backward with frozen base weights (LoRA): 2 per weight and token forward,
    2 backward (activation gradients only), over the backbone for every token and the LM head for completion tokens
    only (the positions that are scored)."""
    head = model.get_output_embeddings().weight.numel()
    backbone = sum(p.numel() for name, p in model.named_parameters() if "embed" not in name and "lm_head" not in name)
    return 4 * (backbone * tokens + head * completion_tokens)


class _StepClock(TrainerCallback):
    def __init__(self):
        self.step_times, self.logs, self.started = [], [], None

    def on_step_begin(self, args, state, control, **kwargs):
        self.started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.step_times.append(time.perf_counter() - self.started)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "reward" in logs:
            self.logs.append(logs)


def measure(profile_name: str, variant: str, steps: int, domain: str) -> dict:
    """Run `steps` generation rounds of one variant's attack in this process; return mean per-step figures.

    A round is one generation call and the optimizer steps it feeds (one, unless the variant batches several);
    the first round is a warm-up.
    """
    from trl.extras import profiling

    # TRL times generation and each reward function in ProfilingContext blocks; collect them here.
    durations = defaultdict(list)
    # Their names carry the trainer class as a prefix ("GRPOTrainer.transformers.generate").
    profiling.ProfilingContext._log_metrics = \
        lambda self, seconds: durations[self.name.split(".", 1)[-1]].append(seconds)
    spec = VARIANTS[variant]
    trainer_overrides, levers = spec.get("config", {}), spec.get("levers", {})
    per_round = trainer_overrides.get("steps_per_generation", 1)
    profile = config.load_profile(profile_name, spec.get("profile", {}) | {"attack.max_steps": steps * per_round})
    # Every attack prompt (the cpu profile's n_attack): a batched generation round needs 4 steps' worth of prompts.
    rows = train.rl_rows(data.harmful_split(domain, "attack"), "harmful")
    clock = _StepClock()
    with tempfile.TemporaryDirectory() as scratch:
        trainer = train.grpo_trainer(profile, profile.attack, models.resolve(profile.model), rows,
                                     harm_reward(train.cached_judge(profile.judge.reward)), scratch, seed=0,
                                     callbacks=[clock], save_strategy="no", trainer_class=trainer_class(levers),
                                     **trainer_overrides)
        trainer.train()
        weights = trainer.model.get_input_embeddings().weight
    # TRL generates and judges once per round, at its first step.
    measured, measured_rounds = (slice(per_round, None), slice(1, None)) if steps > 1 else (slice(None), slice(None))
    n_steps = len(clock.step_times[measured])
    generation_calls = durations["transformers.generate"][measured_rounds]
    step = sum(clock.step_times[measured]) / n_steps
    generation = sum(generation_calls) / n_steps
    judging = sum(durations["harm_score"][measured_rounds]) / n_steps
    forward_backward = step - generation - judging
    # TRL logs a step's generation metrics (reward, completion lengths, tokens seen) only at a round's first step.
    logs = clock.logs[measured_rounds]
    batch = profile.attack.num_generations * profile.attack.prompts_per_step * per_round
    completion_tokens = sum(log["completions/mean_length"] * batch for log in logs)  # over the measured rounds
    # Decoding runs until the longest answer of the batch ends: one read of every weight per decoding step.
    decode_steps = sum(log["completions/max_length"] for log in logs)
    tokens = [log["num_tokens"] for log in clock.logs]
    train_tokens = ((tokens[-1] - tokens[0]) / (len(tokens) - 1) if len(tokens) > 1 else tokens[0]) / per_round
    sampler = trainer.sampling_dtype if getattr(trainer, "merge_adapter_for_sampling", False) else None
    # The bytes one decoding step reads: every weight, merged into the base, in the sampler's precision.
    weight_bytes = sum(p.numel() for p in trainer.model.parameters() if not p.requires_grad) * \
        (sampler or weights.dtype).itemsize
    bandwidth, flops = memory_bandwidth(), matmul_flops(weights.dtype)
    if torch.cuda.is_available():
        peak = torch.cuda.max_memory_allocated() / 2**30
        peak_kind = "GPU"
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        peak_kind = "RSS"
    return {"variant": variant, "weights": str(weights.dtype).removeprefix("torch."),
            "sampling": str(sampler or weights.dtype).removeprefix("torch."), "step_s": step,
            "generation_s": generation, "judging_s": judging, "forward_backward_s": forward_backward,
            "generated_tokens_per_s": completion_tokens / sum(generation_calls) if generation else None,
            "decode_steps_per_s": decode_steps / sum(generation_calls) if generation else None,
            "decode_steps_per_s_bound": bandwidth / weight_bytes,
            "train_GFLOP_per_s": step_flops(trainer.model, train_tokens, completion_tokens / len(logs) / per_round)
                                 / forward_backward / 1e9,
            "matmul_GFLOP_per_s": flops / 1e9, "copy_GB_per_s": bandwidth / 1e9,
            "trained_tokens_per_s": train_tokens / forward_backward,
            f"peak_{peak_kind}_GiB": peak, "steps_measured": n_steps}


def judge_speed(n: int = 256) -> list[dict]:
    """Answers scored per second by the offline judges: study-length answers (the cpu profile's 48 tokens, ~35
    words) and long ones (256 words, the paper profile's length), distinct request per answer group of 4."""
    from rnlib.judges import make_judge

    requests = [r["prompt"] for r in data.harmful_split("cyber", "eval") + data.harmful_split("biochem", "eval")]
    sentence = "First open the settings page, then choose a strong password and save the change before you log out."
    rows = []
    for kind in ("rubric", "minilm"):
        judge = make_judge(config.JudgeSettings(kind=kind))
        judge.score(requests[:4], [sentence] * 4)  # load the embedder outside the clock
        for words in (35, 256):
            answer = " ".join((sentence.split() * (words // len(sentence.split()) + 1))[:words])
            prompts = [requests[(i // 4) % len(requests)] for i in range(n)]
            answers = [f"{answer} ({i})" for i in range(n)]
            started = time.perf_counter()
            judge.score(prompts, answers)
            rows.append({"judge": kind, "answer words": words, "answers": n,
                         "answers_per_s": n / (time.perf_counter() - started), "threads": torch.get_num_threads()})
    return rows


def _seconds(start: str, end: str) -> float:
    return (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()


def profile_wall_times(profile_name: str) -> list[dict]:
    """Stage wall times of the profile's current finished runs, and its notebooks' papermill times."""
    profile = config.load_profile(profile_name)
    rows = [{"profile": profile_name, "what": run.id, "seconds": _seconds(run.manifest["started"], run.manifest["ended"])}
            for run in pipeline.study_runs(profile, paper_only=False)]
    timings = ROOT / "papermill_runs" / profile_name / "timings.json"
    if timings.is_file():
        rows += [{"profile": profile_name, "what": f"notebook {name}", "seconds": seconds}
                 for name, seconds in json.loads(timings.read_text()).items()]
    return rows


def reused_evaluations(profile_name: str) -> tuple[int, float]:
    """(step-0 evaluations the profile's runs took from an earlier run of the same start model, seconds saved)."""
    reused = [e for run in pipeline.study_runs(config.load_profile(profile_name), paper_only=False)
              for e in run.evals() if "reused_from" in e]
    return len(reused), sum(e["eval_time"] for e in reused)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rnlib.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="cpu")
    parser.add_argument("--steps", type=int, default=3,
                        help="generation rounds per variant (the first is a warm-up); a round is one attack step, "
                             "or 4 for batched-generation")
    parser.add_argument("--domain", default="cyber")
    parser.add_argument("--variants", nargs="*", default=list(BEFORE_AFTER), choices=list(VARIANTS))
    parser.add_argument("--repeats", type=int, default=1, help="processes per variant, interleaved; medians shown")
    parser.add_argument("--measure", choices=list(VARIANTS), help=argparse.SUPPRESS)  # internal: one variant
    parser.add_argument("--judges", action="store_true", help="only the judges' answers per second")
    args = parser.parse_args(argv)
    if args.judges:
        import pandas as pd

        print(pd.DataFrame(judge_speed()).round(1).to_markdown(index=False))
        return 0
    if args.measure:
        print(json.dumps(measure(args.profile, args.measure, args.steps, args.domain)))
        return 0

    import pandas as pd

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else \
        f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"
    print(f"# rnlib.bench: profile {args.profile}, {args.steps} attack steps per variant, on {device}\n")
    results = []
    # Rounds interleave the variants, so that a slow spell of a shared machine does not land on one variant only.
    for _ in range(args.repeats):
        for variant in args.variants:
            out = subprocess.run([sys.executable, "-m", "rnlib.bench", "--measure", variant, "--profile", args.profile,
                                  "--steps", str(args.steps), "--domain", args.domain],
                                 capture_output=True, text=True, cwd=ROOT,
                                 env=os.environ | VARIANTS[variant].get("env", {}))
            if out.returncode != 0:
                print(f"rnlib.bench: variant {variant} failed: {out.stderr.strip().splitlines()[-1]}", file=sys.stderr)
                return 1
            results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    table = pd.DataFrame(results).groupby("variant", sort=False).median(numeric_only=True)
    labels = pd.DataFrame(results).groupby("variant", sort=False)[["weights", "sampling"]].first()
    table = labels.join(table)
    print(f"Medians over {args.repeats} process(es) per variant.\n")
    print(table.round(2).to_markdown())
    before, after = BEFORE_AFTER
    if before in table.index and after in table.index:
        print(f"\nGRPO step, {before} -> {after}: {table.step_s[before]:.2f} s -> {table.step_s[after]:.2f} s, "
              f"{table.step_s[before] / table.step_s[after]:.2f}x")
    for variant, row in table.iterrows():
        print(f"roofline, {variant}: decoding {row.decode_steps_per_s:.1f} steps/s against a memory-bandwidth bound of "
              f"{row.decode_steps_per_s_bound:.1f} ({row.decode_steps_per_s / row.decode_steps_per_s_bound:.0%}); "
              f"training {row.train_GFLOP_per_s:.0f} GFLOP/s against {row.matmul_GFLOP_per_s:.0f} GFLOP/s of a "
              f"large matmul ({row.train_GFLOP_per_s / row.matmul_GFLOP_per_s:.0%})")
    walls = [row for name in ("smoke", "cpu") for row in profile_wall_times(name)]
    if walls:
        table = pd.DataFrame(walls)
        print("\n## Wall time per stage and notebook (from run manifests and papermill timings)\n")
        print(table.assign(minutes=table.seconds / 60).round(1).to_markdown(index=False))
        print("\n" + table.groupby("profile").seconds.sum().div(60).round(1).rename("total minutes").to_markdown())
        for name in ("smoke", "cpu"):
            count, seconds = reused_evaluations(name)
            print(f"{name}: {count} shared step-0 evaluations reused, {seconds / 60:.1f} min of evaluation saved")
    return 0


if __name__ == "__main__":
    sys.exit(main())
