"""Small linear algebra shared by the gradient strategies."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["gram_matrix", "sliced_gram"]


#: columns per slice of gram_matrix's split product on CUDA
GRAM_SLICE = 4096


def gram_matrix(rows: Tensor) -> Tensor:
    """``rows @ rows.T`` in full float32 precision, whatever the trainer set for TF32.

    The trainer turns TF32 on for the model's matmuls (seed 12.3); TF32 rounds the inputs to
    10 mantissa bits, which moves a cosine by up to about 1e-3 and can flip the sign of the
    dot product of a nearly orthogonal pair (the test PCGrad and MoCoGrad project on).

    On CUDA the (T, P) x (P, T) product is one batched GEMM over column slices of
    ``GRAM_SLICE``, then a sum: a single GEMM with 16 rows and a million-long inner dimension
    kept a few thread blocks busy. Measured on an H100 at T = 16, P = 938,496 (60 MB read;
    ``bench/train_throughput.py --grads``): whole 205 us, slices of 16384 142 us, 4096 98 us,
    2048 103 us, 1024 135 us."""
    if rows.device.type != "cuda":
        return rows @ rows.t()
    allowed = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        return sliced_gram(rows)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = allowed


def sliced_gram(rows: Tensor, width: int = GRAM_SLICE) -> Tensor:
    """``rows @ rows.T`` as one batched product over column slices of ``width``, summed, plus
    the remaining columns (a single product when there are fewer than two slices)."""
    n = rows.shape[1] // width
    if n < 2:
        return rows @ rows.t()
    head = rows[:, :n * width].unflatten(1, (n, width)).transpose(0, 1)  # (n, T, width), a view
    gram = torch.bmm(head, head.transpose(1, 2)).sum(0)
    tail = rows[:, n * width:]
    return gram.addmm_(tail, tail.t()) if tail.shape[1] else gram
