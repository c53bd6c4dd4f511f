"""A CPU stand-in for CUDA graphs (tests only: this machine has no GPU).

Capture runs the step once under a dispatch mode that records every aten op -- forward,
autograd's backward, the optimizer -- with the very tensors it read and wrote. Replay runs
the recorded ops again on those tensors and copies each result into the tensor the op
produced at capture. Like a CUDA graph replay, no Python of the step runs again: host values
are baked in, and state that the step *rebinds* (``self.x = new``) instead of updating in
place is never seen again, so a replayed step that diverges from eager training points at
exactly the bugs a CUDA graph would have. A host read during capture raises, as it does
under ``torch.cuda.graph``. What the CPU cannot show: host-to-device copies (a CUDA graph
replays the copy from the same host address), so the step must make none.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

HOST_READS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default}


class _Recorder(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple[Any, tuple, dict, Any]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in HOST_READS:
            raise RuntimeError(f"{func} reads a tensor back to the host during graph capture")
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.ops.append((func, args, kwargs, out))
        return out


def _replay(ops: list[tuple[Any, tuple, dict, Any]]) -> None:
    with torch.no_grad():
        for func, args, kwargs, out in ops:
            new = func(*args, **kwargs)
            for old, fresh in zip(tree_leaves(out), tree_leaves(new)):
                if not isinstance(old, torch.Tensor) or fresh is old:
                    continue
                if fresh.data_ptr() == old.data_ptr() and fresh.stride() == old.stride():
                    continue  # a view of the same memory (detach, expand, t, ...)
                if fresh.shape != old.shape:  # the step reshaped the output in place later
                    # (matmul's squeeze_): write the memory in the layout the op produced
                    old = old.as_strided(fresh.shape, fresh.stride(), old.storage_offset())
                old.copy_(fresh)


class EmulatedCudaGraphs:
    """A :class:`ple_adatt.step_graphs.GraphBackend` that replays recorded aten ops."""

    executes_on_capture = True  # recording ran the step once

    def __init__(self) -> None:
        self.captured: list[int] = []  # ops per captured graph

    def warmup(self, fn: Callable[[], None]) -> None:
        fn()

    def capture(self, fn: Callable[[], None]) -> Callable[[], None]:
        rec = _Recorder()
        with rec:
            fn()
        self.captured.append(len(rec.ops))
        ops = rec.ops
        return lambda: _replay(ops)
