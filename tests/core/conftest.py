"""Small in-memory fixtures for the training core: task specs, configs and tensors."""

from __future__ import annotations

import pytest

from ple_adatt.config import ModelConfig, TaskLossConfig, TaskSpec

SPECS = [
    TaskSpec("ctr", "y_ctr", "binary"),
    TaskSpec("cvr", "y_cvr", "binary"),
    TaskSpec("kind", "y_kind", "multiclass", num_classes=3),
    TaskSpec("ltv", "y_ltv", "regression"),
    TaskSpec("brand", "y_brand", "retrieval", vocab_size=20),
]


@pytest.fixture
def specs() -> list[TaskSpec]:
    return list(SPECS)


@pytest.fixture
def model_cfg() -> ModelConfig:
    return ModelConfig(embedding_dim=3, num_shared_experts=3, shared_hidden=16, expert_dim=8, task_experts_per_task=1,
                       task_hidden=8, tower_hidden=8, retrieval_dim=4, logit_transfer_edges=(("ctr", "cvr"), ("cvr", "ltv")))


@pytest.fixture
def loss_cfgs() -> list[TaskLossConfig]:
    return [TaskLossConfig(loss="focal", weight=1.0, alpha=0.25, gamma=2.0), TaskLossConfig(loss="bce", weight=1.5),
            TaskLossConfig(loss="ce"), TaskLossConfig(loss="huber", delta=1.0), TaskLossConfig(loss="infonce")]


@pytest.fixture
def interpreter():
    """Skip unless the Triton kernels run interpreted: a machine without CUDA, where
    tests/conftest.py switched the interpreter on before triton's import (on a GPU,
    tests/core/test_gpu.py runs the compiled kernels)."""
    import torch

    from ple_adatt import kernels

    if torch.cuda.is_available() or not kernels.interpreted():
        pytest.skip("interpreter test (CPU only); tests/core/test_gpu.py runs the compiled kernels")
