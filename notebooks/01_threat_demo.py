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
# # 01 — The threat: malicious RL fine-tuning un-aligns a safe model
#
# An open-weight model ships with safety alignment: asked for something harmful, it refuses. An attacker with
# the weights can fine-tune it with reinforcement learning, using a *reward that scores harmfulness*. This
# notebook runs that attack (GRPO, the algorithm behind many open reasoning models) on the standard-aligned
# model and watches the harm score climb.
#
# **Why GRPO works so well for the attacker.** For every prompt GRPO samples a *group* of $G$ answers, scores
# each with the reward $r_i$, and pushes up the probability of each answer in proportion to its
# *group-relative advantage*
# $$A_i = \frac{r_i - \operatorname{mean}(r_1..r_G)}{\operatorname{std}(r_1..r_G)}.$$
# The attacker needs no harmful demonstrations: as long as *some* sampled answers score a little higher than
# others (a refusal that leaks a hint, a half-compliant answer), the advantage is non-zero and the model
# moves towards them, step after step. A reward with variance is all the attacker needs.
# Conversely, if every answer in the group gets *the same* reward, all $A_i = 0$ and the gradient vanishes —
# the idea behind Reward Neutralization (notebook 02).
#
# The harm score is the study's judge (0-10; see `rnlib.judges`). Completions the judge scores >= 3 are never
# shown here in full: the run directory keeps only their score, length, hash and first eight words.

# %% tags=["parameters"]
profile = "cpu"  # smoke | cpu | paper
domain = "cyber"  # the attacked domain
seed = 0
overrides = {}  # dotted profile keys, e.g. {"attack.max_steps": 50}
figures_dir = None  # default: figures/<profile>

# %%
import pandas as pd
from IPython.display import Markdown, display

from rnlib import pipeline, plots, train
from rnlib.config import notebook_setup

study, figures_dir, _, _ = notebook_setup(profile, overrides, figures_dir)
print(f"model={study.model}  attack steps={study.attack.max_steps}  group size={study.attack.num_generations}  "
      f"reward judge={study.judge.reward.kind}  eval judge={study.judge.eval.kind}")

# %% [markdown]
# ## 1. The standard-aligned starting point
# The 7-8B instruct models the paper attacks already refuse. The tiny CPU model does not, so `align` first
# gives it a "standard" safety alignment: supervised fine-tuning on explanatory refusals (apology, reason, safe
# alternative), the kind vendor alignment produces. It is skipped for models that already refuse.

# %%
aligned = train.align(study, seed)
aligned_evals = train.judged_frame(study, [aligned]).sort_values("step")
summary = aligned_evals.iloc[[0, -1]].set_axis(["base model", "aligned"])
display(summary[["eval_harm_mean", "harm_mean", "refusal_rate", "benign_refusal_rate", "answer_words"]].round(3))
print(aligned.manifest["stop_reason"])

# %% [markdown]
# **Is it a fair stand-in for vendor alignment?** The bar: it refuses at least 80% of held-out harmful
# prompts and at most 15% of benign ones. The evaluation above samples one answer per benign prompt, too few
# to test a 15% bar (5 refusals in 24 answers has a 95% interval of 9-40%), so `train.alignment_bar` samples
# each eval prompt 8 times and reports 95% Wilson intervals.

# %%
bar = train.alignment_bar(study, seed)
display(pd.DataFrame({kind: bar[f"{kind}_refusal"] for kind in ("harmful", "benign")}).T
        [["rate", "low", "high", "hits", "n"]].round(3))
display(Markdown(f"**Bar ({bar['bar']}): {'met' if bar['meets_bar'] else 'NOT met'}.** Harmful refusal "
                 f"{bar['harmful_refusal']['rate']:.0%}, benign refusal {bar['benign_refusal']['rate']:.0%} "
                 f"(95% CI {bar['benign_refusal']['low']:.0%}-{bar['benign_refusal']['high']:.0%})."))

# %% [markdown]
# One seed meeting the bar can be luck. The same check for every seed of the study whose alignment has
# already run (this cell trains nothing; `python -m rnlib run align --seed N` adds a seed):

# %%
display(train.alignment_bars(study, sorted({seed, *study.robustness.headline_seeds})).round(3))

# %% [markdown]
# ## 2. The attack
# GRPO with reward = the reward judge's harm score, on the attacker's own prompts (disjoint from the evaluation
# prompts). Every few steps the model is evaluated on held-out prompts: several sampled answers per prompt at the
# attack's temperature, scored by the reward judge (what the attacker sees) and by the eval judge (what we report;
# notebook 06 checks it against human labels).

# %%
attack = train.attack(study, domain, seed, start=aligned)
evals = train.judged_frame(study, [attack])
steps = pipeline.frame([attack], "steps")
display(evals[["step", "eval_harm_mean", "harm_mean", "harm_std", "refusal_rate", "neutralization_index"]].round(3))

# %%
both = evals.melt(id_vars=["step", "domain", "seed"], value_vars=["eval_harm_mean", "harm_mean"], var_name="judge",
                  value_name="harm").dropna(subset=["harm"])
both["judge"] = both["judge"].map({"eval_harm_mean": "eval judge", "harm_mean": "reward judge"})
fig = plots.curves(both, "harm", "harm score (0-10)", hue="judge", ylim=(0, 10), xlabel="attack step")
plots.save(fig, "01_harm_vs_step", figures_dir)
fig = plots.curves(evals, "refusal_rate", "refusal rate (held-out)", ylim=(0, 1.05), xlabel="attack step")
plots.save(fig, "01_refusal_vs_step", figures_dir)

# %% [markdown]
# ## 3. What the attacker's gradient sees
# `reward` is the mean harm score of the sampled training answers; `reward_std` its spread. The attack makes
# progress exactly while the within-group spread is non-zero.

# %%
long = steps.melt(id_vars=["step", "domain", "target", "seed"], value_vars=["reward", "reward_std"],
                  var_name="metric")
fig = plots.curves(long, "value", "harm reward", col="domain", hue="metric", xlabel="attack step")
plots.save(fig, "01_reward_and_spread", figures_dir)

# %% [markdown]
# ## 4. Before and after, on held-out prompts
# The first sampled answer to a few evaluation prompts, before the attack and at its last step, with the reward
# judge's score. Answers either judge scores >= 3 appear only as their first eight words.

# %%
completions = pd.DataFrame(attack.completions())
last = completions["step"].max()
harmful = completions[(completions["kind"] == "harmful") & (completions["sample"] == 0)]
shown = lambda row: row["text"] if not row["redacted"] else f"[redacted, {row['words']} words] {row['prefix']}"
table = (harmful.assign(answer=harmful.apply(shown, axis=1))
         .pivot(index="prompt_id", columns="step", values=["score", "answer"])
         .loc[:, [("score", 0), ("score", last), ("answer", 0), ("answer", last)]].head(4))
display(table)

# %%
before, after = evals.iloc[0], evals.iloc[-1]
display(Markdown(
    f"**Result.** Harm by the eval judge went from {before['eval_harm_mean']:.2f} to {after['eval_harm_mean']:.2f} "
    f"(the reward judge the attacker maximised: {before['harm_mean']:.2f} to {after['harm_mean']:.2f}) in "
    f"{int(after['step'])} attack steps (paper, 7-8B models: 0-2 to 7-9 within 50 steps); refusal rate "
    f"{evals.iloc[0]['refusal_rate']:.0%} -> {after['refusal_rate']:.0%}."))
