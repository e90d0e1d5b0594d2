"""Fixtures for every test: a seeded RNG. Shared helpers live in helpers.py."""

from __future__ import annotations

import numpy as np
import pytest


@pytest.fixture
def rng():
    return np.random.default_rng(1234)
