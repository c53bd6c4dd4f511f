"""Tensors for the training-core tests."""

from __future__ import annotations

import torch

from ple_adatt.config import TaskSpec
from ple_adatt.data.dataset import TensorData

# the tasks of make_batch's five target columns
BATCH_SPECS = [TaskSpec("ctr", "a", "binary"), TaskSpec("cvr", "b", "binary"), TaskSpec("kind", "c", "multiclass", 3),
               TaskSpec("ltv", "d", "regression"), TaskSpec("brand", "e", "retrieval", vocab_size=20)]


def make_batch(n: int = 64, seed: int = 0, clusters: int = 3) -> TensorData:
    g = torch.Generator().manual_seed(seed)
    x_num = torch.randn(n, 5, generator=g)
    x_cat = torch.randint(0, 4, (n, 2), generator=g)
    y = torch.stack([
        (x_num[:, 0] > 0).float(),
        (x_num[:, 1] > 0).float(),
        torch.randint(0, 3, (n,), generator=g).float(),
        x_num[:, 2] * 3 + 10,
        torch.randint(0, 20, (n,), generator=g).float(),
    ], dim=1)
    y[::4, 1] = float("nan")  # cvr missing on a quarter of the rows
    cluster = torch.randint(0, clusters + 1, (n,), generator=g)  # value `clusters` = unknown
    return TensorData(x_num, x_cat, y, cluster)
