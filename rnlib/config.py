"""Study profiles: YAML files in rnlib/profiles/, validated into frozen dataclasses.

A profile holds every knob of the study (model, data sizes, LoRA, GRPO, generation, judge, seeds), so a
run is fully described by its profile plus the stage inputs. Loading is strict: an unknown key or a value
of the wrong kind fails with one line naming the key and what is allowed.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

PROFILE_DIR = Path(__file__).parent / "profiles"
DOMAINS = ("biochem", "cyber")
JUDGE_KINDS = ("rubric", "minilm", "classifier", "guard", "llm")


class ConfigError(ValueError):
    """A profile or override that cannot be used; the message names the key and the fix."""


@dataclass(frozen=True)
class LoraSettings:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05  # supervised stages (align, sft_refusal, the warm start)
    # GRPO stages: TRL samples each group with the model in train mode, so LoRA dropout there would draw the
    # completions from a perturbed copy of the policy it updates; off, a cpu step was ~23% faster (python -m rnlib.bench).
    grpo_dropout: float = 0.0
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class GenerationSettings:
    """Sampling used by the attacker and by every evaluation (the attack's temperature)."""

    max_new_tokens: int = 48
    temperature: float = 1.0
    top_p: float = 1.0


@dataclass(frozen=True)
class JudgeSettings:
    kind: str = "rubric"
    model: str | None = None  # classifier / llm: hub id or local path
    endpoint: str | None = None  # llm: OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1
    harmful_label: str | None = None  # classifier: label name that means harmful


@dataclass(frozen=True)
class JudgeRoles:
    """The attacker's reward and the study's metric are different judges unless a profile names the same one twice:
    an RL attacker optimises its reward judge, so a figure that reported it would partly report the judge gamed."""

    reward: JudgeSettings = field(default_factory=JudgeSettings)  # what the attacker maximises
    eval: JudgeSettings = field(default_factory=lambda: JudgeSettings(kind="minilm"))  # what figures report


@dataclass(frozen=True)
class DataSettings:
    """How many prompts of each fixed split a profile uses (the splits themselves live in rnlib.data)."""

    n_defense: int = 72
    n_attack: int = 28
    n_eval: int = 16
    n_benign_train: int = 60
    n_benign_eval: int = 16


@dataclass(frozen=True)
class EvalSettings:
    samples_per_prompt: int = 4  # n answers per eval prompt: the neutralization index needs n >= 2
    batch_size: int = 64


@dataclass(frozen=True)
class CheckSettings:
    """The checks measured once a model is trained (refusal, public requests, utility floor). They only read a
    model, so they sit outside every run's hash; their files name the answers per prompt they drew."""

    samples_per_prompt: int = 8  # 24 benign eval prompts give 192 answers, not 24: a rate with a usable interval


@dataclass(frozen=True)
class AlignSettings:
    """Stand-in for vendor safety alignment (SFT); skipped for models that already refuse."""

    skip_if_refusal_at_least: float = 0.8
    refusals_per_domain: int = 36  # harmful prompts (from the defense split) taught an explanatory refusal
    benign_repeats: int = 1  # times each benign answer is shown: weighs helpfulness against refusing
    epochs: float = 3.0
    learning_rate: float = 5e-4
    batch_size: int = 8
    max_length: int = 128


@dataclass(frozen=True)
class GRPOSettings:
    """One GRPO stage (defend or attack). Steps are optimizer steps."""

    max_steps: int = 50
    learning_rate: float = 2e-4
    num_generations: int = 4
    prompts_per_step: int = 2
    beta: float = 0.0
    loss_type: str = "dapo"
    scale_rewards: str = "group"
    eval_every: int = 10
    save_every: int = 10


# How the finetunability task asks each sum (`rnlib.data.arithmetic` fills in {a}, {op} and {b}).
TASK_WORDING = "What is {a} {op} {b}? Reply with just the number."
TASK_OPERAND_MAX = (60, 40)


@dataclass(frozen=True)
class FinetuneSettings(GRPOSettings):
    """The finetunability task: a benign GRPO run on short sums with exact answers. Its wording is a setting because
    an aligned model may refuse one wording of the same sums and not another (`train.task_check`); the operands'
    largest values (a, b) because a small model learns nothing in a short budget from sums it almost never gets
    right."""

    task_wording: str = TASK_WORDING
    task_operand_max: tuple[int, ...] = TASK_OPERAND_MAX
    # Sampled answers per held-out sum at each evaluation, beside the greedy one (0: greedy only). Sampled accuracy
    # moves in steps of 1/(32 x eval_samples), greedy accuracy in steps of 1/32: the floor judges the finer one.
    eval_samples: int = 0


@dataclass(frozen=True)
class AttackSettings(GRPOSettings):
    """The malicious fine-tuning. It stops early once `metrics.steps_to_unalignment` has confirmed un-alignment:
    the budget matters only for models that hold."""

    stop_when_unaligned: bool = True
    algorithm: str = "grpo"  # or "rloo": TRL's RLOOTrainer (TokenBuncher also attacks with RLOO)


@dataclass(frozen=True)
class DefendSettings(GRPOSettings):
    """Reward Neutralization: train until neutralized, within [min_steps, max_steps]."""

    max_steps: int = 150
    min_steps: int = 20
    benign_fraction: float = 0.25  # share of training prompts that are benign (0 disables the mix)
    target_neutralization: float = 0.9  # share of held-out prompts whose sampled answers all earn one reward
    # Which answers TRL's KL term (beta) holds to the start model: "all" (TRL's own), or "benign" only, so that the
    # anchor keeps benign behaviour without slowing the harmful side's move to concise refusals.
    kl_anchor: str = "all"


@dataclass(frozen=True)
class BaselineSettings:
    """Defense baselines, given the defense's prompts, benign mix, optimizer steps and batch size."""

    sft_learning_rate: float = 2e-4  # sft_refusal: SFT on concise refusals (the SFT-era defense)
    entropy_learning_rate: float = 2e-4  # entropy: GRPO with reward = -mean token entropy (TokenBuncher-style)


@dataclass(frozen=True)
class AdaptiveSettings:
    """Attacks beyond the paper's, aimed at the neutralization mechanism. The defaults are the paper's attack."""

    temperature: float | None = None  # the attacker's sampling temperature (evaluation keeps generation's)
    bonus: str = "none"  # added to the harm score: "entropy" (TokenBuncher's adaptive attack) or "length"
    bonus_weight: float = 1.0  # the bonus is in [0, 1] before this weight; the harm score is 0-10
    warm_start_steps: int = 0  # SFT steps on the un-aligned model's compliant answers before the RL attack


# Named attacks for the robustness matrix (notebook 05): each is a set of profile overrides on the paper's attack.
ATTACK_VARIANTS = {
    "paper": {},
    "grpo_loss": {"attack.loss_type": "grpo"},
    "dr_grpo": {"attack.loss_type": "dr_grpo"},
    "rloo": {"attack.algorithm": "rloo"},
    "unscaled": {"attack.scale_rewards": "none"},
    "hot_sampling": {"adaptive.temperature": 1.4},
    "16_generations": {"attack.num_generations": 16, "attack.prompts_per_step": 1},
    "entropy_bonus": {"adaptive.bonus": "entropy"},
    "length_bonus": {"adaptive.bonus": "length"},
    "sft_warm_start": {"adaptive.warm_start_steps": 10},
}
TARGETS = ("standard", "defended", "sft_refusal", "entropy")


@dataclass(frozen=True)
class RobustnessSettings:
    """What notebook 05 runs: targets x attacks on each domain, and the seeds and models of the headline comparison."""

    targets: tuple[str, ...] = TARGETS
    attacks: tuple[str, ...] = tuple(ATTACK_VARIANTS)
    headline_seeds: tuple[int, ...] = (0, 1, 2)
    headline_targets: tuple[str, ...] = TARGETS  # the models the paper's attack meets on every headline seed
    headline_align_seed: int = 0  # the one aligned model every headline seed defends and attacks
    headline_attacks: tuple[str, ...] = ("paper",)  # named attacks (ATTACK_VARIANTS) every headline model meets
    cross_domain: bool = True  # defend on one domain, attack the other; and a joint defense


@dataclass(frozen=True)
class Profile:
    name: str
    model: str = "smollm2-135m"
    quantize_4bit: bool = False
    bf16: bool = False
    use_vllm: bool = False  # GPU only: TRL's vLLM generation (colocate) for the GRPO stages
    vllm_server: str | None = None  # with use_vllm: URL of a running `trl vllm-serve` (server mode, docs/cluster.md)
    domains: tuple[str, ...] = DOMAINS
    seeds: tuple[int, ...] = (0,)
    store_full_completions: bool = False
    data: DataSettings = field(default_factory=DataSettings)
    lora: LoraSettings = field(default_factory=LoraSettings)
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    judge: JudgeRoles = field(default_factory=JudgeRoles)
    eval: EvalSettings = field(default_factory=EvalSettings)
    checks: CheckSettings = field(default_factory=CheckSettings)
    align: AlignSettings = field(default_factory=AlignSettings)
    defend: DefendSettings = field(default_factory=DefendSettings)
    attack: AttackSettings = field(default_factory=AttackSettings)
    finetune: FinetuneSettings = field(default_factory=FinetuneSettings)
    adaptive: AdaptiveSettings = field(default_factory=AdaptiveSettings)
    baselines: BaselineSettings = field(default_factory=BaselineSettings)
    robustness: RobustnessSettings = field(default_factory=RobustnessSettings)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def section_hash(self, *sections: str, extra: dict | None = None) -> str:
        """Hash of the named sections plus stage inputs: the cache key of a stage's run."""
        payload = {name: without_later_defaults(name, self.to_dict()[name]) for name in sections} | (extra or {})
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:12]


# Settings added after runs were made enter a run's hash only when set away from the behaviour those runs had, so
# adding one keeps every earlier run's cache key. "profile" holds the top-level settings (`pipeline.config_hash`).
LATER_DEFAULTS = {"defend": {"kl_anchor": "all"},
                  "finetune": {"task_wording": TASK_WORDING, "task_operand_max": TASK_OPERAND_MAX, "eval_samples": 0},
                  "profile": {"use_vllm": False}}


def without_later_defaults(section: str, values: dict) -> dict:
    later = LATER_DEFAULTS.get(section, {})
    return {k: v for k, v in values.items() if later.get(k, object()) != v} if later else values


_CHOICES = {
    "defend.kl_anchor": ("all", "benign"),
    "judge.reward.kind": JUDGE_KINDS,
    "judge.eval.kind": JUDGE_KINDS,
    "domains": DOMAINS,
    "defend.loss_type": ("grpo", "dapo", "dr_grpo", "bnpo"),
    "attack.loss_type": ("grpo", "dapo", "dr_grpo", "bnpo"),
    "attack.algorithm": ("grpo", "rloo"),
    "defend.scale_rewards": ("group", "batch", "none"),
    "attack.scale_rewards": ("group", "batch", "none"),
    "adaptive.bonus": ("none", "entropy", "length"),
    "robustness.targets": TARGETS,
    "robustness.headline_targets": TARGETS,
    "robustness.attacks": tuple(ATTACK_VARIANTS),
    "robustness.headline_attacks": tuple(ATTACK_VARIANTS),
}


def _coerce(value, annotation, key: str):
    """Check one value against its dataclass annotation; return it in canonical form."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(annotation) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, options[0], key)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}' must be a list, got {value!r}")
        item_type = typing.get_args(annotation)[0]
        return tuple(_coerce(v, item_type, f"{key}[]") for v in value)
    if dataclasses.is_dataclass(annotation):
        return _build(annotation, value, key)
    if annotation is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if annotation is float and isinstance(value, str):
        try:
            return float(value)  # YAML reads 2e-4 as a string
        except ValueError:
            pass
    if annotation is bool and not isinstance(value, bool):
        raise ConfigError(f"config key '{key}' must be true or false, got {value!r}")
    if annotation is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"config key '{key}' must be an integer, got {value!r}")
    if not isinstance(value, annotation):
        raise ConfigError(f"config key '{key}' must be {annotation.__name__}, got {value!r}")
    return value


def _build(cls, values: dict, prefix: str = ""):
    if not isinstance(values, dict):
        raise ConfigError(f"config key '{prefix}' must be a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    allowed = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        full = f"{prefix}.{key}" if prefix else key
        if key not in allowed:
            raise ConfigError(f"unknown config key '{full}'; allowed: {', '.join(allowed)}")
        value = _coerce(value, hints[key], full)
        choices = _CHOICES.get(full)
        if choices is not None:
            bad = [v for v in (value if isinstance(value, tuple) else (value,)) if v not in choices]
            if bad:
                raise ConfigError(f"config key '{full}' has {bad[0]!r}; allowed: {', '.join(choices)}")
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0:
            raise ConfigError(f"config key '{full}' must be >= 0, got {value!r}")
        kwargs[key] = value
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value) -> None:
    *parents, leaf = dotted.split(".")
    for part in parents:
        tree = tree.setdefault(part, {})
        if not isinstance(tree, dict):
            raise ConfigError(f"config key '{dotted}' does not name a section")
    tree[leaf] = value


def available_profiles() -> list[str]:
    return sorted(p.stem for p in PROFILE_DIR.glob("*.yaml"))


def load_profile(name_or_path: str | Path, overrides: dict | None = None) -> Profile:
    """Load a profile by name (smoke, cpu, paper) or YAML path; overrides use dotted keys ('attack.max_steps')."""
    path = Path(name_or_path)
    if not path.suffix:
        path = PROFILE_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        raise ConfigError(f"no profile '{name_or_path}'; choose one of {', '.join(available_profiles())} or a YAML path")
    raw = yaml.safe_load(path.read_text()) or {}
    raw.setdefault("name", path.stem)
    for dotted, value in (overrides or {}).items():
        _set_dotted(raw, dotted, value)
    return _checked(_build(Profile, raw))


def _checked(profile: Profile) -> Profile:
    if profile.eval.samples_per_prompt < 2:
        raise ConfigError("config key 'eval.samples_per_prompt' must be >= 2 (the neutralization index compares samples)")
    for stage in ("defend", "attack"):
        if getattr(profile, stage).num_generations < 2:
            raise ConfigError(f"config key '{stage}.num_generations' must be >= 2 (GRPO compares a group of answers)")
    return profile


def with_overrides(profile: Profile, overrides: dict) -> Profile:
    """The same profile with dotted-key overrides applied (validated like a loaded profile)."""
    raw = profile.to_dict()
    for dotted, value in overrides.items():
        _set_dotted(raw, dotted, value)
    return _checked(_build(Profile, raw))


def notebook_setup(profile: str, overrides: dict | None = None, figures_dir: str | None = None,
                   seeds: list[int] | None = None, domains: list[str] | None = None):
    """Resolve a notebook's parameters cell: (profile, figures folder, seeds, domains), defaults from the profile.

    Prints the notebook's first output: whether it shows shipped run logs or fresh runs, and their provenance."""
    from rnlib.pipeline import source_line

    study = load_profile(profile, overrides)
    figures_dir = figures_dir or f"figures/{study.name}"
    Path(figures_dir).mkdir(parents=True, exist_ok=True)  # tables are written before the first figure
    print(source_line(study))
    return study, figures_dir, list(seeds or study.seeds), list(domains or study.domains)
