"""Fixtures of the data tests (the session's `tiny` dataset fixture lives in tests/conftest.py)."""

import numpy as np
import pytest


@pytest.fixture
def rng():
    return np.random.default_rng(0)
