"""Prompt data: this project's own request sets, fixed splits, and loaders for public benchmarks.

The repo holds harmful *requests* only, at the generality of public benchmarks (AdvBench, HarmBench):
no answer and no operational detail. Each harmful domain has 32 topics x 6 framings (direct ask,
step-by-step, role-play, code request, a benchmark-style task such as "Write a tutorial on ...", and a scenario: the
request inside a first-person story, asking for a short list). Splits are
made by *topic*, so the eval prompts ask about things neither the defender nor the attacker trained on, not merely
rephrasings of them. Biochem has 8 more topics (32-39), written after the splits were fixed and pinned to the
defense split (rnlib/prompts/public/README.md says why).
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
from functools import cache
from pathlib import Path

from rnlib.config import TASK_OPERAND_MAX, TASK_WORDING

PROMPT_DIR = Path(__file__).parent / "prompts"
HARMFUL_DOMAINS = ("biochem", "cyber")
# Topics per split (of 32 per domain, 6 prompts each): the defense split's 96 prompts hold the paper's 60-80.
TOPIC_SPLITS = {"defense": 16, "attack": 8, "eval": 8}
BENIGN_EVAL_SHARE = 1 / 3


class DataError(RuntimeError):
    """Data that cannot be had as asked; the message names the fix."""


def _stable_key(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def normalize(prompt: str) -> str:
    """Case- and whitespace-insensitive form, used to prove splits are disjoint."""
    return re.sub(r"\s+", " ", prompt).strip().lower()


@cache
def _read(name: str) -> tuple[dict, ...]:
    path = PROMPT_DIR / f"{name}.jsonl"
    if not path.is_file():
        raise DataError(f"no prompt set '{name}'; choose one of {', '.join(HARMFUL_DOMAINS)} or benign")
    return tuple(json.loads(line) for line in path.read_text().splitlines() if line.strip())


def harmful_split(domain: str, split: str) -> list[dict]:
    """All rows of one harmful domain's split, in a fixed shuffled order (so taking the first n mixes topics)."""
    if split not in TOPIC_SPLITS:
        raise DataError(f"unknown split '{split}'; choose one of {', '.join(TOPIC_SPLITS)}")
    rows = _read(domain)
    # Rows marked "split" (topics written after the splits were fixed) are pinned there, so the topics of the
    # attack and eval splits stay as they were; the rest are split by topic.
    topics = sorted({r["topic_id"] for r in rows if "split" not in r}, key=lambda t: _stable_key(f"{domain}:{t}"))
    bounds, start = {}, 0
    for name, count in TOPIC_SPLITS.items():
        bounds[name] = set(topics[start:start + count])
        start += count
    chosen = [r for r in rows if (r["split"] == split if "split" in r else r["topic_id"] in bounds[split])]
    return sorted(chosen, key=lambda r: _stable_key(r["id"]))


def benign_split(split: str) -> list[dict]:
    """Benign prompts: `train` (alignment and the defense's benign mix) or `eval` (over-refusal)."""
    if split not in ("train", "eval"):
        raise DataError(f"unknown benign split '{split}'; choose train or eval")
    rows = sorted(_read("benign"), key=lambda r: _stable_key(r["id"]))
    by_group: dict[str, list[dict]] = {}
    for row in rows:
        if "split" not in row:
            by_group.setdefault(row["topic"], []).append(row)
    # Rows marked "split": "train" were written after the eval set was fixed; pinning them keeps it unchanged.
    chosen = [row for row in rows if row.get("split") == split]
    for group in by_group.values():  # stratified: each group gives the same share to eval
        n_eval = round(len(group) * BENIGN_EVAL_SHARE)
        chosen += group[:n_eval] if split == "eval" else group[n_eval:]
    return sorted(chosen, key=lambda r: _stable_key(r["id"]))


# The finetunability task's default wording and others of the same sums: an aligned model may refuse a benign request
# only because its wording is unlike anything in its benign training set (`train.task_check` measures that).
TASK_WORDINGS = {"default": TASK_WORDING, "question": "What is {a} {op} {b}?", "imperative": "Calculate {a} {op} {b}.",
                 "equation": "{a} {op} {b} =", "homework": "Help me check my homework: what is {a} {op} {b}?"}


def arithmetic(split: str, wording: str = TASK_WORDING, operand_max: tuple[int, ...] = TASK_OPERAND_MAX) -> list[dict]:
    """Finetunability task: short sums and differences with exact answers, small enough for a 135M model.

    Generated from a fixed seed: 64 train questions (a small operand range repeats some), then 32 held-out ones,
    each asked once and none of them a train question, so the held-out accuracy measures what RL taught, not what it
    drilled. A defense that blocks benign RL learning shows there. Operands run from 2 to `operand_max` (a, b).
    """
    if split not in ("train", "eval"):
        raise DataError(f"unknown arithmetic split '{split}'; choose train or eval")
    if not all(f"{{{name}}}" in wording for name in ("a", "op", "b")):
        raise DataError(f"the task wording '{wording}' must hold {{a}}, {{op}} and {{b}}; fix finetune.task_wording")
    if len(operand_max) != 2 or min(operand_max) < 2:
        raise DataError(f"finetune.task_operand_max must be two numbers >= 2 (a, b), got {list(operand_max)}")
    rng = random.Random(2505)

    def draw() -> tuple[int, int, str]:
        return rng.randint(2, operand_max[0]), rng.randint(2, operand_max[1]), rng.choice("+-")

    train = [draw() for _ in range(64)]
    if 2 * (operand_max[0] - 1) * (operand_max[1] - 1) - len(set(train)) < 32:
        raise DataError(f"finetune.task_operand_max {list(operand_max)} leaves fewer than 32 sums outside the train "
                        "questions; raise it")
    held_out = []
    while split == "eval" and len(held_out) < 32:
        question = draw()
        if question not in train and question not in held_out:
            held_out.append(question)
    first, questions = (0, train) if split == "train" else (len(train), held_out)
    return [{"id": f"arith-{first + i:02d}", "prompt": wording.format(a=a, op=op, b=b),
             "answer": a + b if op == "+" else a - b, "operands": [a, b]} for i, (a, b, op) in enumerate(questions)]


def take(rows: list[dict], n: int) -> list[dict]:
    if n > len(rows):
        raise DataError(f"asked for {n} prompts but the split has {len(rows)}; lower the profile's data.n_* value")
    return rows[:n]


def prompts(rows: list[dict]) -> list[str]:
    return [r["prompt"] for r in rows]


def prompt_sets_hash() -> str:
    """Content hash of every prompt file: a cached run is stale once the prompts it was trained on change."""
    return _stable_key("".join(path.read_text() for path in sorted(PROMPT_DIR.glob("*.jsonl"))))[:12]


def split_hash(rows: list[dict]) -> str:
    """Content hash of a prompt list, recorded in run manifests."""
    return _stable_key("\n".join(r["prompt"] for r in rows))[:12]


# --- public benchmarks (online through `datasets`, or a local copy) -------------------------------------------

PUBLIC_EVAL = PROMPT_DIR / "public" / "public_eval.jsonl"  # outside the prompt hash: evaluation only, never trained on


def public_eval(domain: str) -> list[dict]:
    """Requests of one domain from public benchmarks the study did not write (AdvBench, StrongREJECT; provenance and
    selection in rnlib/prompts/public/README.md): does the alignment or a defense generalise beyond our own style?"""
    if domain not in HARMFUL_DOMAINS:
        raise DataError(f"unknown domain '{domain}'; choose one of {', '.join(HARMFUL_DOMAINS)}")
    return [r for r in map(json.loads, PUBLIC_EVAL.read_text().splitlines()) if r["domain"] == domain]


DOMAIN_KEYWORDS = {
    "biochem": ("chemical", "toxin", "toxic", "poison", "pathogen", "virus", "bacteri", "biolog", "nerve agent",
                "sarin", "anthrax", "ricin", "bioweapon", "gas", "germ", "disease", "infect", "lethal dose", "synthes"),
    "cyber": ("hack", "malware", "ransomware", "phishing", "password", "exploit", "ddos", "botnet", "keylogger",
              "sql injection", "network", "trojan", "spyware", "credential", "database", "computer", "cyber", "wifi",
              "software", "account", "encrypt", "antivirus"),
}

# name -> (hub id, config, split, prompt column, category column, {category: domain})
PUBLIC_BENCHMARKS = {
    "harmbench": ("walledai/HarmBench", "standard", "train", "prompt", "category",
                  {"chemical_biological": "biochem", "cybercrime_intrusion": "cyber"}),
    "strongreject": ("walledai/StrongREJECT", None, "train", "prompt", "category", {}),
    "beavertails": ("PKU-Alignment/BeaverTails", None, "30k_test", "prompt", None, {}),
    "advbench": ("walledai/AdvBench", None, "train", "prompt", None, {}),
}


def keyword_domain(prompt: str) -> str | None:
    """Map a free-form benchmark prompt onto a domain by keyword votes; None when neither or both tie."""
    text = prompt.lower()
    votes = {d: sum(k in text for k in words) for d, words in DOMAIN_KEYWORDS.items()}
    best = max(votes, key=votes.get)
    return best if votes[best] > 0 and list(votes.values()).count(votes[best]) == 1 else None


def load_public(name: str, domain: str, path: str | None = None) -> list[dict]:
    """Prompts of a public benchmark mapped onto `domain` (HarmBench by its categories, others by keywords).

    `path` loads a local copy (a JSON/JSONL/CSV/Parquet file or a saved dataset directory) instead of the hub.
    """
    import datasets

    if name not in PUBLIC_BENCHMARKS:
        raise DataError(f"unknown benchmark '{name}'; choose one of {', '.join(PUBLIC_BENCHMARKS)}")
    if domain not in HARMFUL_DOMAINS:
        raise DataError(f"unknown domain '{domain}'; choose one of {', '.join(HARMFUL_DOMAINS)}")
    hub_id, config, split, column, category_column, category_map = PUBLIC_BENCHMARKS[name]
    try:
        if path is not None:
            local = Path(path)
            if local.is_dir():
                table = datasets.load_from_disk(str(local))
                table = table[split] if isinstance(table, datasets.DatasetDict) else table
            else:
                kind = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}[local.suffix]
                table = datasets.load_dataset(kind, data_files=str(local), split="train")
        else:
            if os.environ.get("HF_HUB_OFFLINE") == "1":
                raise ConnectionError("HF_HUB_OFFLINE=1")
            table = datasets.load_dataset(hub_id, config, split=split)
    except (ConnectionError, OSError, ValueError) as err:
        raise DataError(f"cannot load {name} ({hub_id}) here: {err.__class__.__name__}; "
                        f"go online or pass path= to a local copy") from err
    rows, seen = [], set()
    for i, record in enumerate(table):
        text = record[column]
        if record.get("is_safe") is True:  # BeaverTails labels its safe pairs; keep only unsafe requests
            continue
        if category_column and category_map:
            mapped = category_map.get(record.get(category_column))
        else:
            mapped = keyword_domain(text)
        if mapped == domain and normalize(text) not in seen:
            seen.add(normalize(text))
            rows.append({"id": f"{name}-{i}", "domain": domain, "topic": name, "framing": "benchmark", "prompt": text})
    return rows
