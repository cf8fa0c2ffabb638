"""Notebooks: percent .py sources are the truth; executed copies must match them; smoke executes end to end."""
import json
import shutil
import subprocess
from pathlib import Path

import jupytext
import nbformat
import pandas as pd
import pytest
from PIL import Image

from rnlib import notebooks

ROOT = Path(__file__).resolve().parent.parent
EXPECTED_FIGURES = [
    "00_advantage", "00_variance_back",
    "01_harm_vs_step", "01_refusal_vs_step", "01_reward_and_spread",
    "02_defense_reward_vs_step", "02_refusal_length_vs_step", "02_entropy_vs_step", "02_neutralization_vs_step",
    "02_benign_refusal", "02_public_requests",
    "03_harm_standard_vs_defended", "03_refusal_standard_vs_defended",
    "04_paper_comparison", "04_survival", "04_mechanism_reward_std", "04_mechanism_zero_variance",
    "04_harm_vs_neutralization",
    "05_robustness_matrix", "05_over_refusal", "05_finetunability", "05_headline_seeds",
    "05_survival", "05_entropy_bonus_survival",  # smoke has one domain: no 05_cross_domain
]


def _code_cells(notebook) -> list[str]:
    return [c.source.strip() for c in notebook.cells
            if c.cell_type == "code" and "injected-parameters" not in c.metadata.get("tags", [])]


def test_numbered_percent_sources_with_a_parameters_cell():
    assert [p.stem for p in notebooks.sources()] == ["00_concept", "01_threat_demo", "02_defense_training", "03_attack",
                                                     "04_analysis", "05_robustness", "06_judge_validity"]
    for source in notebooks.sources():
        assert source.read_text().count("# %%") >= 5
        cells = jupytext.read(source).cells
        tagged = [c for c in cells if "parameters" in c.metadata.get("tags", [])]
        assert len(tagged) == 1 and "profile = " in tagged[0].source, source.name


def test_no_notebook_json_is_tracked_next_to_the_sources():
    assert not [f for f in _tracked("notebooks") if f.suffix == ".ipynb"]


def _tracked(pattern: str) -> list[Path]:
    listed = subprocess.run(["git", "ls-files", pattern], cwd=ROOT, capture_output=True, text=True).stdout.split()
    return [ROOT / f for f in listed]


@pytest.mark.parametrize("executed", _tracked("papermill_runs/*.ipynb"), ids=lambda p: p.name)
def test_committed_executed_notebooks_match_their_sources(executed):
    source = ROOT / "notebooks" / f"{executed.stem}.py"
    assert _code_cells(nbformat.read(executed, as_version=4)) == _code_cells(jupytext.read(source)), \
        f"{executed} is stale: re-run make figures"


def test_notebook_kernels_talk_over_sockets_of_their_own():
    """Over TCP, two notebooks started side by side can be handed one free port and a kernel never answers."""
    import asyncio

    first, second = (notebooks._kernel_manager_class()(kernel_name="python3") for _ in range(2))
    assert first.transport == second.transport == "ipc"
    assert Path(first.ip).parent.is_dir() and Path(first.ip).parent != Path(second.ip).parent
    for manager in (first, second):
        asyncio.run(manager._async_cleanup_resources())
        assert not Path(manager.ip).parent.exists()


@pytest.mark.slow
def test_robustness_notebook_can_report_finished_runs_only(tmp_path, monkeypatch):
    empty = tmp_path / "runs"
    monkeypatch.setenv("RN_RUNS", str(empty))
    notebooks.execute("smoke", only=["05"], output_root=tmp_path / "out", figures_root=tmp_path / "figures")
    assert not empty.exists() or not any(empty.iterdir())  # nothing trained, not even a directory made
    executed = nbformat.read(tmp_path / "out" / "smoke" / "05_robustness.ipynb", as_version=4)
    text = json.dumps([c.get("outputs", []) for c in executed.cells])
    assert "Robustness matrix: 0 of 8 runs finished" in text and "train_missing=False" in text


@pytest.mark.slow
def test_smoke_study_executes_all_notebooks_and_figures_replay_from_its_shipped_logs(runs_root, tmp_path):
    results = tmp_path / "results"
    timings = notebooks.study("smoke", results=results, output_root=tmp_path / "papermill_runs", train_robustness=True,
                              figures_root=tmp_path / "figures")
    assert list(timings) == [p.stem for p in notebooks.sources()]
    figures = tmp_path / "figures" / "smoke"
    for name in EXPECTED_FIGURES:
        png, pdf = figures / f"{name}.png", figures / f"{name}.pdf"
        with Image.open(png) as image:
            image.verify()
            assert image.format == "PNG" and image.size[0] > 200
        assert pdf.read_bytes().startswith(b"%PDF")
    summary = (figures / "04_summary.csv").read_text().splitlines()
    assert summary[0].startswith("domain,model,seeds") and len(summary) == 3  # standard + defended for cyber
    public = (figures / "02_public_requests.csv").read_text()
    assert "StrongREJECT" in public and "AdvBench" in public and "own eval split" in public
    floor = (figures / "02_utility_floor.csv").read_text()
    assert "benign refusal" in floor and "finetunability / standard" in floor
    task = pd.read_csv(figures / "05_task_refusal.csv")  # the aligned model on each wording of the finetunability task
    assert len(task) == 5 and task["refusal rate"].between(0, 1).all() and task["prompt"].str.contains("{a}").all()
    matrix = (figures / "05_robustness_matrix.csv").read_text()
    assert "entropy_bonus" in matrix and "sft_refusal" in matrix
    seeds = (figures / "05_headline_seeds.csv").read_text().splitlines()
    assert seeds[0] == "domain,target,quantity,seeds,value,low,high,interval" and all(",2," in row for row in seeds[1:])
    survival = pd.read_csv(figures / "05_survival_cells.csv")  # the headline's cells per defense: 2 seeds each
    assert survival.groupby("target")["seed"].nunique().to_dict() == {"defended": 2, "standard": 2}
    paired = pd.read_csv(figures / "05_headline_attacks_paired.csv")  # smoke's headline attacks, per model and seed
    assert {"steps: paper", "steps: entropy_bonus"} <= set(paired.columns) and len(paired) == 4
    worst = pd.read_csv(figures / "05_worst_case.csv").set_index("target")
    assert worst.loc["standard", "seeds"] == 2 and worst.loc["standard", "attacks"] == 2
    executed = tmp_path / "papermill_runs" / "smoke"
    robustness_outputs = json.dumps([c.get("outputs", []) for c in
                                     nbformat.read(executed / "05_robustness.ipynb", as_version=4).cells])
    assert "zero-variance steps" in robustness_outputs and "opening" in robustness_outputs  # RN's mechanism, its answers
    concept = json.dumps([c.get("outputs", []) for c in nbformat.read(executed / "00_concept.ipynb", as_version=4).cells])
    assert "With a constant reward the LoRA gradient norm is **0**" in concept
    for source in notebooks.sources():
        assert _code_cells(nbformat.read(executed / f"{source.stem}.ipynb", as_version=4)) == \
            _code_cells(jupytext.read(source))
    assert json.loads((executed / "timings.json").read_text()) == timings

    # make figures on a fresh copy of the shipped logs: the same tables, without any model or runs/ directory
    # (notebook 05's: it ran last, so the study's execution of it saw every run; 01-04 ran before 05 trained)
    fresh = tmp_path / "fresh_copy"
    shutil.copytree(results, fresh)
    assert not list(fresh.rglob("*.safetensors"))
    notebooks.from_logs("smoke", results=fresh, output_root=tmp_path / "replayed", figures_root=tmp_path / "replayed")
    replayed = tmp_path / "replayed" / "smoke"
    assert sorted(p.name for p in replayed.glob("*.png")) == sorted(p.name for p in figures.glob("*.png"))
    for table in ("05_robustness_matrix.csv", "05_over_refusal.md", "05_headline_seeds.csv", "05_survival_cells.csv"):
        assert (replayed / table).read_text() == (figures / table).read_text()
    first = json.dumps([c.get("outputs", []) for c in nbformat.read(replayed / "01_threat_demo.ipynb", as_version=4).cells])
    assert "Source: shipped run logs" in first and "[rnlib] reused align-all-smollm2-135m-s0-" in first
