import os

import pytest
from hydra import compose, initialize_config_module

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")


@pytest.fixture
def make_cfg():
    """Compose ``conf/config.yaml`` with overrides, exactly as ``python -m octomil_sim`` does."""

    def _make(*overrides: str):
        with initialize_config_module(config_module="octomil_sim.conf", version_base="1.3"):
            return compose("config", overrides=list(overrides))

    return _make
