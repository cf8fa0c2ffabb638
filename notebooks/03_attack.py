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
# (the harm judge), same GRPO settings, same seeds and step budget. The paper attacks for 200 steps; the
# `cpu` profile uses a smaller budget (see the parameters printed below).

# %% tags=["parameters"]
profile = "cpu"
domains = None  # default: the profile's domains
seeds = None
overrides = {}
figures_dir = None

# %%
import pandas as pd
from IPython.display import display

from rnlib import pipeline, plots, robustness
from rnlib.config import notebook_setup

study, figures_dir, seeds, domains = notebook_setup(profile, overrides, figures_dir, seeds, domains)
print(f"model={study.model}  attack steps={study.attack.max_steps}  lr={study.attack.learning_rate}  "
      f"group={study.attack.num_generations}  seeds={seeds}")

# %%
runs = [run for _, run in robustness.paper_comparison(study, domains, seeds)]  # trains what is not cached
evals = pipeline.frame(runs, "evals")

# %%
fig = plots.curves(evals, "harm_mean", "harm score (0-10)", band="harm_std", ylim=(0, 10), xlabel="attack step")
plots.save(fig, "03_harm_standard_vs_defended", figures_dir)
fig = plots.curves(evals, "refusal_rate", "refusal rate (held-out)", ylim=(0, 1.05), xlabel="attack step")
plots.save(fig, "03_refusal_standard_vs_defended", figures_dir)

# %%
last = evals.sort_values("step").groupby(["domain", "target", "seed"]).last()
display(last[["step", "harm_mean", "harm_std", "refusal_rate", "neutralization_index", "answer_words",
              "distinct_answers"]].round(3))

# %% [markdown]
# ## What the attacked models say
# A refusal rate near zero usually means the attacker won, but not always: an attacked model can also
# degenerate into answers that neither refuse nor help (its harm score then stays near zero, and its
# `distinct_answers` drops). The most frequent openings of each model's answers at the last evaluation show
# which happened. Only the first 8 words are shown, and completions the judge scored harmful are stored
# redacted anyway.

# %%
with pd.option_context("display.max_colwidth", 70):
    display(pipeline.frequent_answers(runs)[["domain", "target", "seed", "opening", "share", "harm", "refused"]]
            .round(2))
