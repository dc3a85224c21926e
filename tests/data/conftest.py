"""Fixtures of the data tests: a seeded rng and (once per session) a `tiny` generated dataset."""

import numpy as np
import pytest

from data_pipelines.generate import generate


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory):
    """`python -m data_pipelines.generate --preset=tiny --seed=0` into a session folder; its path."""
    out = tmp_path_factory.mktemp("tiny_data")
    generate("tiny", str(out), seed=0)
    return str(out)
