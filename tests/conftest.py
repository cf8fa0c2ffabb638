import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the tests never reach a hub: everything is local or packaged
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def smollm():
    """The real default model, converted from the packaged GGUF (cached across sessions)."""
    from rnlib.models import load_model

    return load_model("smollm2-135m")


@pytest.fixture(scope="session")
def rubric():
    from rnlib.judges import RubricJudge

    return RubricJudge()


@pytest.fixture(scope="session")
def runs_root(tmp_path_factory):
    """One runs/ directory for the whole session, so the notebooks reuse the stages the engine tests trained."""
    root = tmp_path_factory.mktemp("runs")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RN_RUNS", str(root))
        yield root


@pytest.fixture(scope="session")
def profile():
    """The smoke profile: every stage for a few steps on the real model."""
    from rnlib.config import load_profile

    return load_profile("smoke")


@pytest.fixture(scope="session")
def aligned(runs_root, profile):
    """The smoke profile's standard-aligned model, shared by the engine and robustness tests."""
    from rnlib import train

    return train.align(profile)
