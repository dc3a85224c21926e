"""Fixtures of the data tests: a seeded rng and (once per session) a `tiny` generated dataset."""

import numpy as np
import pytest


@pytest.fixture
def rng():
    return np.random.default_rng(0)
