"""Work beside the training step on a second CUDA stream (``transfer.measure_stream``).

adaTT's per-task gradient measurement feeds only the affinity EMA, which the *next* step's
transfer weights read. Once the training backward has reached the CGC outputs, nothing else
in the step waits for it: the rest of the backward (the CGC mixture, the experts, the
embeddings), the clipping and the optimizer step do not read its result. On one stream it
still runs in series with them. :class:`SideStream` forks it onto a second stream at that
point and joins it back before anything reads the affinity again.

The rules that keep this correct (and replayable inside a whole-step CUDA graph, where a
forked stream must join the capturing stream before the capture ends):

* **Fork** from the stream the work's inputs were made on: the side stream waits for it, so
  it sees them finished.
* **Inputs the main stream may free** are held here until the join: the caching allocator
  cannot hand their memory to the main stream's next allocation while the side stream still
  reads it, and once they are dropped the main stream has already waited for the side
  stream. (PyTorch's docs prefer this to ``record_stream``, whose reuse depends on timing.)
* **Inputs the main stream will overwrite** (the parameters, which the optimizer updates in
  place) are copied on the main stream *before* the fork, by the caller.
* **Join** (:meth:`join`) before anything reads what the side stream writes, and at the end
  of every step: the main stream waits for the side stream on the device, the host never does.

**Priority.** The side stream runs at a higher priority than the training's stream: its work
(about 2.3 ms at the seed's shape on an H100) is the longer of the two branches after the fork
(the rest of the step: about 1.8 ms), and a scheduler that prefers the longer branch finishes
both sooner; the rest of the step's kernels fill the SMs it leaves (reasoned, not yet measured:
bench run (k) is the A/B). PyTorch instantiates CUDA
graphs with ``cudaGraphInstantiateFlagUseNodePriority``, so captured kernels keep the priority
of the stream they were captured on. :data:`PRIORITY` is the switch (run (k) sets 0, the
training stream's own).

Off CUDA there is one stream: :meth:`launch` runs the work at once, in order, and :meth:`join`
does nothing. The numbers are the same either way; only the overlap differs.

Only torch is needed here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor

__all__ = ["SideStream", "PRIORITY"]

#: the side stream's CUDA priority: lower is higher, 0 is the default streams' (the lowest)
PRIORITY = -1


class SideStream:
    """One second stream for ``device`` (none off CUDA) and whether work on it is unjoined."""

    def __init__(self, device: torch.device, priority: int | None = None):
        self.device = device
        # created up front: a stream made during a graph capture would be a capture-time call
        self.stream = (torch.cuda.Stream(device=device, priority=PRIORITY if priority is None else priority)
                       if device.type == "cuda" else None)
        self.pending = False
        self.launches = 0  # forks so far (for logs and tests)
        self._held: list[Tensor] = []  # the unjoined work's inputs, alive until the join

    def launch(self, work: Callable[[], None], inputs: Iterable[Tensor]) -> None:
        """Run ``work`` on the side stream after what the current stream has queued so far.

        ``inputs`` are the tensors ``work`` reads that the current stream may free meanwhile
        (held until :meth:`join`); tensors it would *overwrite* must be copied by the caller
        before this call."""
        self.launches += 1
        if self.stream is None:
            work()
            return
        main = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(main)
        self._held.extend(inputs)
        self.pending = True  # set before work(): a failure in it still leaves a join to make
        with torch.cuda.stream(self.stream):
            work()

    def join(self) -> None:
        """Make the current stream wait (on the device) for everything launched so far."""
        if self.pending and self.stream is not None:
            torch.cuda.current_stream(self.device).wait_stream(self.stream)
        self.pending = False
        self._held.clear()  # freed after the wait: the main stream reuses them after the side stream's reads
