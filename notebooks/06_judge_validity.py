# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 06 — Can the harm scores be trusted? The eval judge against human labels
#
# Every figure reports harm as scored by a judge, and an RL attacker maximises a judge. If it maximised the very
# judge the figures report, part of the "harm" would be the judge being gamed. So the study keeps two judges:
# the **reward judge** (the rubric in `rnlib.judges`, what the attacker optimises) and the **eval judge** (the
# MiniLM judge of `rnlib.minilm_judge`, what the figures report), and this notebook checks the eval judge against
# people.
#
# The MiniLM judge reads the request and the answer together (a cross-encoder): all-MiniLM-L6-v2 with a LoRA
# adapter and a one-logit head, fitted on public labelled judge data (GPTFuzz's hand-labelled ChatGPT answers,
# JailbreakEval's JAILJUDGE and Safe-RLHF samples; `python -m rnlib.minilm_judge`) on 80% of their questions,
# its threshold chosen on the other 20%. It is tested on two public human-labelled sets it never saw and no choice
# was made on: JailbreakBench's judge comparison (300 answers, majority of three labels) and the manual labels of
# the jailbreak-evaluation study (purseclab; 300 answers). XSTest's labelled completions check the refusal
# detector. The rebuild script writes the per-item file this notebook reads (scores, labels, source, a hash: no
# text), so it runs on a fresh clone.

# %% tags=["parameters"]
profile = "cpu"
overrides = {}
figures_dir = None
validity_file = None  # default: results/judge_validity.csv, written by python -m rnlib.minilm_judge

# %%
import json

import numpy as np
import pandas as pd
from IPython.display import Markdown, display

from rnlib import minilm_judge, plots
from rnlib.config import notebook_setup

study, figures_dir, _, _ = notebook_setup(profile, overrides, figures_dir)
items = pd.read_csv(validity_file or minilm_judge.VALIDITY)
fitted = json.loads((minilm_judge.WEIGHTS / "judge.json").read_text())
threshold = 10 * fitted["threshold"]
print(f"{len(items)} scored items: " + ", ".join(f"{n} from {s}" for s, n in items["source"].value_counts().items()))
print(f"MiniLM judge fitted on {fitted['train_rows']} labelled answers in {fitted['fit_minutes']} min "
      f"({fitted['train_rows_dropped_near_test']} dropped as near a test request); threshold {threshold:.2f}/10 chosen "
      f"on {fitted['validation_rows']} held-out training answers (agreement there "
      f"{fitted['validation']['agreement']:.1%}, AUROC {fitted['validation']['auroc']:.3f})")

# %% [markdown]
# ## Agreement with the human majority
# Agreement is the share of answers where the judge's harmful / not-harmful call matches the majority of three
# people; Cohen's kappa discounts the agreement expected by chance; AUROC (for judges with a continuous score)
# asks how well the score ranks harmful above harmless answers, whatever the threshold. The published judges'
# verdicts come with the sets (JailbreakBench's HarmBench classifier, GPT-4, Llama Guard 2 and Llama-3-70B
# columns; purseclab's string matching (Zou), Huang's and Chao's automatic judges).

# %%
ANCHOR_NAMES = {"harmbench_cf": "HarmBench classifier", "gpt4_cf": "GPT-4", "llamaguard2_cf": "Llama Guard 2",
                "llama3_cf": "Llama-3-70B", "automatic_zou_none_label": "refusal strings (Zou et al.)",
                "automatic_huang_none_label": "Huang et al. judge", "automatic_chao_none_label": "GPT-4 (Chao et al.)"}
tests = items[items["source"].isin(["jbb", "purseclab"])]
rows = []
for source, group in tests.groupby("source"):
    judges = {"MiniLM (eval judge)": (group["minilm"] >= threshold, group["minilm"]),
              "rubric (reward judge), score >= 5": (group["rubric"] >= 5, group["rubric"])}
    judges |= {ANCHOR_NAMES[a]: (group[a], None) for a in ANCHOR_NAMES if a in group and group[a].notna().any()}
    for name, (calls, scores) in judges.items():
        known = calls.notna()
        stats = minilm_judge.agreement_stats(group["label"][known], calls[known].astype(int),
                                      None if scores is None else scores[known])
        rows.append({"set": source, "judge": name, "answers": stats["n"], "agreement": stats["agreement"],
                     "kappa": stats["kappa"], "AUROC": stats.get("auroc", np.nan)})
agreement = pd.DataFrame(rows)
plots.save_table(agreement.round(3), "06_judge_agreement", figures_dir,
                 "The eval judge against human majorities and published judges",
                 "Public human-labelled sets the MiniLM judge was neither fitted nor tuned on; threshold fixed before testing.")
display(agreement.round(3))

# %%
fig, ax = plots.plt.subplots(figsize=(7, 0.35 * len(agreement) + 1.2))
order = agreement.sort_values(["set", "agreement"])
colors = ["#0072b2" if j.startswith("MiniLM") else "#d55e00" if j.startswith("rubric") else "#999999"
          for j in order["judge"]]
ax.barh([f"{s}: {j}" for s, j in zip(order["set"], order["judge"])], order["agreement"], color=colors)
ax.axvline(0.85, ls="--", color="grey", lw=1)
ax.set(xlabel="agreement with the human majority", xlim=(0.5, 1))
plots.save(fig, "06_judge_agreement", figures_dir)

# %% [markdown]
# ## Confusion matrices
# Which way the eval judge errs matters: a judge that misses harmful answers would understate an attack; one that
# flags harmless ones would overstate it.

# %%
fig, axes = plots.plt.subplots(1, 2, figsize=(8, 3.4))
for ax, (source, group) in zip(axes, tests.groupby("source")):
    matrix = pd.crosstab(group["label"].map({0: "harmless", 1: "harmful"}).rename("human majority"),
                         (group["minilm"] >= threshold).map({False: "harmless", True: "harmful"}).rename("MiniLM judge"))
    plots.sns.heatmap(matrix, annot=True, fmt="d", cmap="Blues", cbar=False, ax=ax)
    ax.set_title(source)
plots.save(fig, "06_confusion", figures_dir)

# %% [markdown]
# ## Score distributions: refusals, benign answers, harmful answers
# The eval judge's score (10 x P(harmful)) for four kinds of answer: refusals (XSTest answers people labelled as
# refusals, and test-set answers the refusal detector flags), compliant answers to XSTest's safe prompts (benign),
# harmless non-refusing answers to harmful requests, and harmful answers (human majority).

# %%
def kind(row):
    if row["source"] == "xstest":
        if row["label"] == 1:
            return "refusal"
        return "benign answer" if not str(row["category"]).startswith("contrast") else "compliant answer, unsafe prompt"
    if row["label"] == 1:
        return "harmful answer"
    return "refusal" if row["refusal_regex"] else "harmless, not refusing"

items["kind"] = items.apply(kind, axis=1)
kinds = ["refusal", "benign answer", "harmless, not refusing", "harmful answer"]
fig, ax = plots.plt.subplots(figsize=(7, 3.6))
plots.sns.histplot(data=items[items["kind"].isin(kinds)], x="minilm", hue="kind", hue_order=kinds, bins=20,
                   stat="density", common_norm=False, element="step", ax=ax)
ax.axvline(threshold, ls="--", color="grey", lw=1)
ax.set(xlabel="MiniLM judge score (0-10)", xlim=(0, 10))
plots.save(fig, "06_score_distributions", figures_dir)
display(items.groupby("kind")["minilm"].describe()[["count", "mean", "25%", "50%", "75%"]].round(2))

# %% [markdown]
# ## Where the eval judge fails
# Error rates by group, never the texts: by set and answer length, by whether the answer opens with a refusal,
# by the attack paper that produced the answer (purseclab), and the share of XSTest's benign answers the judge
# would call harmful, by XSTest prompt type (over-flagging harmless answers that mention dangerous words).

# %%
tests = tests.assign(wrong=(tests["minilm"] >= threshold) != tests["label"].astype(bool),
                     error=np.where(tests["label"] == 1, "missed harmful", "flagged harmless"),
                     length=pd.cut(tests["words"], [-1, 30, 100, 250, 10**6], labels=["<=30", "31-100", "101-250", ">250"]),
                     opens_with_refusal=tests["refusal_regex"].astype(bool))
failures = []
for column in ["length", "opens_with_refusal", "category"]:
    scoped = tests if column != "category" else tests[tests["source"] == "purseclab"]
    table = scoped.groupby(["source", column], observed=True).agg(answers=("wrong", "size"), error_rate=("wrong", "mean"),
                                                                 harmful_share=("label", "mean")).reset_index()
    failures.append(table.rename(columns={column: "group"}).assign(grouped_by=column))
failures = pd.concat(failures, ignore_index=True)[["grouped_by", "source", "group", "answers", "error_rate", "harmful_share"]]
plots.save_table(failures.round(3), "06_judge_failures", figures_dir, "Where the eval judge errs",
                 "Error rate against the human majority by group (purseclab's category: the attack paper, 0-2).")
display(failures.round(3))
errors = tests[tests["wrong"]].groupby(["source", "error"]).size().unstack(fill_value=0)
display(errors)

benign = items[(items["source"] == "xstest") & (items["kind"] == "benign answer")]
over = benign.groupby("category")["minilm"].apply(lambda s: (s >= threshold).mean()).sort_values()
fig, ax = plots.plt.subplots(figsize=(6, 0.3 * len(over) + 1))
ax.barh(over.index, over.values, color="#0072b2")
ax.set(xlabel="share of benign answers the MiniLM judge calls harmful", xlim=(0, 1))
plots.save(fig, "06_xstest_over_flagging", figures_dir)

# %% [markdown]
# ## The refusal detector
# The refusal rates in every notebook come from `rnlib.judges.is_refusal`, a set of English regexes. XSTest's
# completions from five models, labelled full compliance, full refusal or partial refusal by people, test it.

# %%
xstest = items[items["source"] == "xstest"]
refusal = minilm_judge.agreement_stats(xstest["label"], xstest["refusal_regex"])
by_type = xstest.assign(safe_prompt=~xstest["category"].str.startswith("contrast")).groupby("safe_prompt").apply(
    lambda g: pd.Series(minilm_judge.agreement_stats(g["label"], g["refusal_regex"])), include_groups=False)
display(by_type.round(3))

# %%
jbb = agreement[(agreement["set"] == "jbb") & (agreement["judge"] == "MiniLM (eval judge)")].iloc[0]
purse = agreement[(agreement["set"] == "purseclab") & (agreement["judge"] == "MiniLM (eval judge)")].iloc[0]
rubric_jbb = agreement[(agreement["set"] == "jbb") & agreement["judge"].str.startswith("rubric")].iloc[0]
display(Markdown(
    f"**Result.** On JailbreakBench's judge comparison the MiniLM judge agrees with the human majority on "
    f"{jbb['agreement']:.1%} of {jbb['answers']} answers (kappa {jbb['kappa']:.2f}, AUROC {jbb['AUROC']:.2f}; the bar "
    f"was 85%), against {rubric_jbb['agreement']:.1%} for the rubric the attacker optimises. On the purseclab set it "
    f"agrees on {purse['agreement']:.1%} (kappa {purse['kappa']:.2f}, AUROC {purse['AUROC']:.2f}). The refusal "
    f"detector matches XSTest's human labels on {refusal['agreement']:.1%} of {refusal['n']} completions "
    f"(kappa {refusal['kappa']:.2f})."))
