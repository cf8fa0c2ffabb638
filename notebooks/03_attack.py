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
# # 03 — The same attack on the standard and the defended model
#
# A fair comparison changes one thing only: which model is attacked. Same attacker prompts, same reward
# (the reward judge), same GRPO settings, same seeds and step budget. The paper attacks for 200 steps, and so do
# the `cpu` and `paper` profiles, but an attack stops once it has un-aligned its model (confirmed at two
# consecutive evaluations): the curves below end where the attacker had already won.
#
# Harm is reported by the **eval judge**, not by the reward judge the attacker maximises (notebook 06 checks the
# eval judge against human labels). Where the two disagree, the difference is the **reward-hacking gap**:
# reward-judge harm minus eval-judge harm, positive when the attacker has learnt to please its own judge.

# %% tags=["parameters"]
profile = "cpu"
domains = None  # default: the profile's domains
seeds = None
overrides = {}
figures_dir = None

# %%
import pandas as pd
from IPython.display import display

from rnlib import pipeline, plots, robustness, train
from rnlib.config import notebook_setup

study, figures_dir, seeds, domains = notebook_setup(profile, overrides, figures_dir, seeds, domains)
print(f"model={study.model}  attack steps={study.attack.max_steps}  lr={study.attack.learning_rate}  "
      f"group={study.attack.num_generations}  seeds={seeds}")

# %%
runs = [run for _, run in robustness.paper_comparison(study, domains, seeds)]  # trains what is not cached
evals = train.judged_frame(study, runs)  # re-scores, from saved models, runs evaluated before the eval judge
judged = evals.dropna(subset=["eval_harm_mean"])
print(f"eval judge {evals['eval_judge'].dropna().iloc[0]}: scores at {judged['step'].nunique()} of "
      f"{evals['step'].nunique()} evaluated steps (runs evaluated before it was added are re-scored at their "
      "first and last evaluation only)")

# %%
fig = plots.curves(judged, "eval_harm_mean", "harm, eval judge (0-10)", band="eval_harm_std", ylim=(0, 10),
                   xlabel="attack step")
plots.save(fig, "03_harm_standard_vs_defended", figures_dir)
fig = plots.curves(evals, "harm_mean", "harm, reward judge (0-10)", band="harm_std", ylim=(0, 10), xlabel="attack step")
plots.save(fig, "03_reward_judge_harm", figures_dir)
fig = plots.curves(evals, "refusal_rate", "refusal rate (held-out)", ylim=(0, 1.05), xlabel="attack step")
plots.save(fig, "03_refusal_standard_vs_defended", figures_dir)

# %%
last = evals.sort_values("step").groupby(["domain", "target", "seed"]).last()
display(last[["step", "eval_harm_mean", "eval_harmful_rate", "harm_mean", "hacking_gap", "refusal_rate",
              "neutralization_index", "answer_words", "distinct_answers"]].round(3))

# %% [markdown]
# ## The reward-hacking gap
# Reward-judge harm minus eval-judge harm at each evaluation. A gap that grows during the attack means the
# attacker is buying reward with text its own judge likes and people would not call harmful (e.g. numbered,
# on-topic imperatives that say nothing); a gap near zero means the two judges see the same harm.

# %%
fig = plots.curves(judged, "hacking_gap", "reward-judge minus eval-judge harm", xlabel="attack step")
for ax in fig.axes:
    ax.axhline(0, color="grey", lw=1)
plots.save(fig, "03_hacking_gap", figures_dir)

# %% [markdown]
# ## What the attacked models say
# A refusal rate near zero usually means the attacker won, but not always: an attacked model can also
# degenerate into answers that neither refuse nor help (its harm score then stays near zero, and its
# `distinct_answers` drops). The most frequent openings of each model's answers at the last evaluation show
# which happened. Only the first 8 words are shown, and completions either judge scored harmful are stored
# redacted anyway. The `harm` column is the reward judge's: the eval judge's per-answer scores exist only for
# evaluations scored when it was in place.

# %%
with pd.option_context("display.max_colwidth", 70):
    display(pipeline.frequent_answers(runs)[["domain", "target", "seed", "opening", "share", "harm", "refused"]]
            .round(2))
