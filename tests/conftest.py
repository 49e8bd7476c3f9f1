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


@pytest.fixture
def make_spec(make_cfg):
    """``make_cfg``'s config as the typed run spec the runtime takes (``RunSpec.from_config``)."""
    from octomil_sim.spec import RunSpec

    return lambda *overrides: RunSpec.from_config(make_cfg(*overrides))


@pytest.fixture
def task_identity():
    """Messages built outside a running ServerApp need Flower's process identity set."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved
