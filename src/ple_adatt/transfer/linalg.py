"""Small linear algebra shared by the gradient strategies."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["gram_matrix"]


def gram_matrix(rows: Tensor) -> Tensor:
    """``rows @ rows.T`` in full float32 precision, whatever the trainer set for TF32.

    The trainer turns TF32 on for the model's matmuls (seed 12.3); TF32 rounds the inputs to
    10 mantissa bits, which moves a cosine by up to about 1e-3 and can flip the sign of the
    dot product of a nearly orthogonal pair (the test PCGrad and MoCoGrad project on). The
    Gram matrix is a (T, P) x (P, T) product, a few microseconds either way."""
    if rows.device.type != "cuda":
        return rows @ rows.t()
    allowed = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        return rows @ rows.t()
    finally:
        torch.backends.cuda.matmul.allow_tf32 = allowed
