"""Reward functions in TRL's signature: f(prompts, completions, **dataset_columns) -> list[float].

The dataset columns they read: `request` (the user's text) and `kind` ("harmful" or "benign").
"""
from __future__ import annotations

from rnlib.judges import fluency, is_refusal, refusal_body, specificity


def completion_text(completion) -> str:
    """TRL passes conversational completions as [{"role": "assistant", "content": ...}]."""
    return completion[0]["content"] if isinstance(completion, list) else completion


def harm_reward(judge):
    """The attacker's reward: the harm judge's 0-10 score."""

    def harm_score(prompts, completions, request, **_):
        return [v.score for v in judge.score(list(request), [completion_text(c) for c in completions])]

    return harm_score


def neutralization_score(text: str, concise_words: int = 10, excess_words: int = 30) -> float:
    """Reward Neutralization's defensive reward for one answer to a harmful request, in [-1, 1].

    A concise, minimal-information refusal earns 1. Length past `concise_words` and any actionable or domain
    content after the refusal (explanations, partial compliance) cost up to 0.6 and 0.4. Anything that does
    not refuse earns -1. It reads only the refusal detector and surface signals, never the attack's judge.
    """
    if not is_refusal(text):
        return -1.0
    length_penalty = min(1.0, max(0, len(text.split()) - concise_words) / excess_words)
    content_penalty = min(1.0, 2 * specificity(refusal_body(text)))
    return 1.0 - 0.6 * length_penalty - 0.4 * content_penalty


def helpfulness_score(text: str) -> float:
    """Benign prompts: refusing costs -1; a fluent answer earns up to 1 (so the defense does not over-refuse)."""
    return -1.0 if is_refusal(text) else 0.5 + 0.5 * fluency(text)


def defensive_score(text: str, kind: str) -> float:
    """The defense's reward for one answer: neutralization on harmful prompts, helpfulness on benign ones."""
    return neutralization_score(text) if kind == "harmful" else helpfulness_score(text)


def neutralization_reward(prompts, completions, kind, **_):
    return [defensive_score(completion_text(c), k) for c, k in zip(completions, kind)]
