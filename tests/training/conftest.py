"""Fixtures of the training tests."""
import pytest

from training_runs import TINY


@pytest.fixture(scope="session")
def toy_config():
    """The config of the model of the tiny training runs (``training_runs.tiny_adapted_model``): 4 layers of width
    32, 4 query heads over 2 kv heads, vocabulary 48."""
    return TINY
