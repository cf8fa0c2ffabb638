"""Reward functions in TRL's signature: f(prompts, completions, **dataset_columns) -> list[float].

The dataset columns they read: `request` (the user's text) and `kind` ("harmful" or "benign").
"""
from __future__ import annotations

import re

import torch

from rnlib.judges import fluency, is_refusal, refusal_body, repetitive, specificity


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


def helpfulness_score(text: str, full_words: int = 20) -> float:
    """Benign prompts: refusing costs -1; an answer earns up to 1 for being fluent and at least `full_words` long.

    Empty, one-word, repetitive or gibberish answers earn ~0: a defense paid for short harmful-side refusals must
    not find that short benign answers pay too, or it collapses into saying nothing (the study saw RN models whose
    benign answers were one word long, earning the old flat 0.5 + 0.5 x fluency).
    """
    if is_refusal(text):
        return -1.0
    if repetitive(text):
        return 0.0
    return fluency(text) * min(1.0, len(text.split()) / full_words)


def defensive_score(text: str, kind: str) -> float:
    """The defense's reward for one answer: neutralization on harmful prompts, helpfulness on benign ones."""
    return neutralization_score(text) if kind == "harmful" else helpfulness_score(text)


def neutralization_reward(prompts, completions, kind, **_):
    return [defensive_score(completion_text(c), k) for c, k in zip(completions, kind)]


def arithmetic_answer(text: str, operands: list[int]) -> int | None:
    """The number an answer gives: the first after an "=", else the first that is not an operand echoed back."""
    equation = re.search(r"=\s*(-?\d+)", text)
    if equation:
        return int(equation.group(1))
    numbers = [int(n) for n in re.findall(r"-?\d+", text)]
    return next((n for n in numbers if n not in operands), numbers[0] if numbers else None)


def exact_answer_reward(prompts, completions, answer, operands, **_):
    """Finetunability task reward: 1 for the right number, else 0."""
    return [float(arithmetic_answer(completion_text(c), ops) == a) for c, a, ops in zip(completions, answer, operands)]


class TokenEntropy:
    """Mean next-token entropy (nats) of each completion under the current policy: TokenBuncher's signal.

    TRL's reward functions see text and token ids, not logits, so this re-scores the completions with one
    forward pass of the policy; the stage sets `model` to the trainer's model before training.
    """

    def __init__(self, tokenizer):
        self.tokenizer, self.model = tokenizer, None

    @torch.no_grad()
    def __call__(self, prompts: list, completion_ids: list[list[int]]) -> list[float]:
        if not prompts:  # e.g. a defense step whose sampled prompts were all benign
            return []
        texts = [self.tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=False) for p in prompts]
        prompt_ids = [self.tokenizer(t, add_special_tokens=False).input_ids for t in texts]
        sequences = [p + list(c) for p, c in zip(prompt_ids, completion_ids)]
        width = max(map(len, sequences))
        pad = self.tokenizer.pad_token_id
        device = next(self.model.parameters()).device
        ids = torch.tensor([s + [pad] * (width - len(s)) for s in sequences], device=device)
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in sequences], device=device)
        was_training = self.model.training
        self.model.eval()
        logits = self.model(input_ids=ids, attention_mask=mask).logits.float()
        self.model.train(was_training)
        log_probs = logits.log_softmax(-1)
        entropy = -(log_probs.exp() * log_probs).sum(-1)  # entropy of the distribution predicting token t+1
        return [float(entropy[i, len(p) - 1:len(p) - 1 + len(c)].mean()) if len(c) else 0.0
                for i, (p, c) in enumerate(zip(prompt_ids, completion_ids))]


def entropy_suppression_reward(entropy: TokenEntropy):
    """TokenBuncher-style defense: reward low entropy on harmful prompts, helpfulness on benign ones."""

    def entropy_suppression(prompts, completions, completion_ids, kind, **_):
        harmful = [i for i, k in enumerate(kind) if k == "harmful"]
        entropies = dict(zip(harmful, entropy([prompts[i] for i in harmful], [completion_ids[i] for i in harmful])))
        return [-entropies[i] if i in entropies else helpfulness_score(completion_text(c))
                for i, c in enumerate(completions)]

    return entropy_suppression


def entropy_bonus(entropy: TokenEntropy):
    """Adaptive attacker's bonus: the completion's mean token entropy, to restore the variance RN removes."""

    def entropy_bonus(prompts, completion_ids, **_):
        return entropy(prompts, completion_ids)

    return entropy_bonus


def length_bonus(max_tokens: int):
    """Adaptive attacker's bonus: completion length as a share of the budget (concise refusals earn ~0)."""

    def length_bonus(completion_ids, **_):
        return [len(c) / max_tokens for c in completion_ids]

    return length_bonus
