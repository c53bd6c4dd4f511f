"""The PLE-Cluster model with tasks laid out along a batched task dimension.

Reads top to bottom: the head specification, then embeddings, shared experts, task
experts, CGC gates, task towers, global and per-cluster heads and the logit-transfer DAG.
Progressive Layered Extraction: Tang et al., "Progressive Layered Extraction (PLE)",
RecSys 2020; cluster heads and logit transfer follow the adaTT reference (seed sections
1.3, 8, 11).

Layout: every per-task module is one parameter tensor with a leading task dimension
``T``, so all task experts, gates, towers and heads run as a handful of batched matmuls
instead of a Python loop over small modules. Shared experts keep one parameter set per
expert (so each can get its own learning rate) and are stacked in the forward pass.

Per-task gradients on the shared-expert parameters (what adaTT measures) come from
:meth:`PLEClusterModel.shared_task_gradients`. It takes one backward from the losses to the
CGC outputs and then applies the closed-form backward of the shared-expert MLPs for all
tasks at once: in a fused Triton kernel on the GPU (:mod:`ple_adatt.kernels`), or as
PyTorch einsums (``einsum``). ``loop`` is the seed's per-task ``torch.autograd.grad``
reference. All give the same gradients (tested).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import kernels, mixture, relu_dgrad, towers
from .config import ModelConfig, TaskSpec, cycle_message, find_cycle

__all__ = ["GRAD_METHODS", "HeadSpec", "ModelOutput", "PLEClusterModel", "build_model"]

# batched: the fused Triton kernel where it can run (CUDA + triton), else einsum;
# fused: the kernel or an error; einsum: the PyTorch closed form; loop: the seed's reference
GRAD_METHODS = ("batched", "fused", "einsum", "loop")


@dataclass(frozen=True)
class HeadSpec:
    """What the model needs to know of one task: its type and output width."""

    name: str
    type: str  # binary | multiclass | regression | retrieval
    output_dim: int  # logits (binary 1, multiclass K), value (1) or query dim (retrieval)
    vocab_size: int = 0  # retrieval only

    @classmethod
    def from_task(cls, t: TaskSpec, retrieval_dim: int) -> HeadSpec:
        if t.type == "retrieval":
            return cls(t.name, t.type, retrieval_dim, int(t.vocab_size or 0))
        return cls(t.name, t.type, t.output_dim)


@dataclass
class ModelOutput:
    out: Tensor  # (T, B, O) raw task outputs, padded to the widest task
    gates: Tensor  # (T, B, K) CGC gate weights over [shared experts; own task experts]
    cgc_out: Tensor  # (T, B, d) gated expert mixture per task (input of the towers)
    # (x, pre-activation or the hidden layer itself, hidden) of the shared experts: the
    # per-task gradients read the sign of the second and relu() of it, the same for both
    shared_cache: tuple[Tensor, Tensor, Tensor]


#: rows per block of the einsum reference in the fused kernel's first-use check
CHECK_ROWS = 2048


# --------------------------------------------------------------------------- building blocks


def _init_batched(w: Tensor, fan_in: int) -> None:
    bound = 1.0 / fan_in**0.5
    nn.init.uniform_(w, -bound, bound)


#: the augmented input's width is a multiple of this: a bf16 row of 8 values is 16 bytes,
#: the alignment cuBLAS's Hopper kernels need of every row (100 columns took sm80 kernels)
ROW_ALIGN = 8


def augment_input(x: Tensor) -> Tensor:
    """``[x, 1, 0 ...]``: (B, i) -> (B, k), k the next multiple of ``ROW_ALIGN`` above i.

    :func:`shared_input_linear` then adds its bias inside the GEMM (the ones column times a
    bias row), so no pass copies the bias into the output first and the bias gradient comes
    out of the weight-gradient GEMM instead of a reduction over the batch; and every row
    starts 16-byte aligned. ``x`` itself is ``augmented[:, :i]``, a view."""
    b, i = x.shape
    k = -(-(i + 1) // ROW_ALIGN) * ROW_ALIGN
    return torch.cat([x, x.new_ones(b, 1), x.new_zeros(b, k - i - 1)], dim=1)


def shared_input_linear(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """``G`` linear maps of one input in one GEMM: x (B, i), weight (G, i, o), bias (G, 1, o)
    -> (B, G*o) viewed as (G, B, o). (A batched matmul over a broadcast input copies it per
    group and runs a slow kernel on the GPU.) ``x`` may be :func:`augment_input`'s (B, k),
    k > i: the bias is then a row of the GEMM's weight."""
    g, i, o = weight.shape
    if x.shape[1] == i:
        w = weight.permute(1, 0, 2).reshape(i, g * o)
        return torch.addmm(bias.reshape(g * o), x, w).view(-1, g, o).transpose(0, 1)
    return (x @ _augmented_weight(weight, bias, x.shape[1])).view(-1, g, o).transpose(0, 1)


def shared_input_relu_linear(x: Tensor, weight: Tensor, bias: Tensor, masked_downstream: bool = False) -> Tensor:
    """``relu(shared_input_linear(x, weight, bias))``; for :func:`augment_input`'s ``x`` the
    ReLU runs in the GEMM's epilogue (cuBLASLt, ``torch._addmm_activation``) instead of a
    pass of its own over the (B, G*o) output. ``masked_downstream``: the output's only
    differentiable use is a :func:`grouped_linear` with ``relu_input=True``, which hands back its
    gradient already masked by the ReLU, so the backward skips its own mask pass."""
    g, i, o = weight.shape
    if x.shape[1] == i:
        return F.relu(shared_input_linear(x, weight, bias))
    w = _augmented_weight(weight, bias, x.shape[1])
    return _ReluGemm.apply(x, w, masked_downstream).view(-1, g, o).transpose(0, 1)


def _augmented_weight(weight: Tensor, bias: Tensor, k: int) -> Tensor:
    """(k, G*o): the G maps side by side, then the bias row, then zero rows (see augment_input)."""
    g, i, o = weight.shape
    w = weight.permute(1, 0, 2).reshape(i, g * o)
    return torch.cat([w, bias.reshape(1, g * o), w.new_zeros(k - i - 1, g * o)])


def _compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype autocast would run a matmul of ``x`` in (``x``'s own without autocast)."""
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


class _ReluGemm(torch.autograd.Function):
    """``relu(x @ w)`` with the ReLU in the GEMM's epilogue; backward from the saved output
    (its sign is the ReLU's mask). Products in the autocast dtype, as autocast's mm."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, masked_downstream: bool = False) -> Tensor:
        dtype = _compute_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            xc, wc = x.to(dtype), w.to(dtype)
            out = torch._addmm_activation(xc.new_zeros(wc.shape[1]), xc, wc)  # the bias is a row of w
        ctx.save_for_backward(xc, wc, out)
        ctx.dtypes = (x.dtype, w.dtype)
        ctx.masked_downstream = masked_downstream
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        xc, wc, out = ctx.saved_tensors
        grad = grad.to(out.dtype)
        if not ctx.masked_downstream:  # else the grouped layer above applied the ReLU's mask
            grad = torch.ops.aten.threshold_backward(grad, out, 0)
        gx = (grad @ wc.t()).to(ctx.dtypes[0]) if ctx.needs_input_grad[0] else None
        gw = (xc.t() @ grad).to(ctx.dtypes[1]) if ctx.needs_input_grad[1] else None
        return gx, gw, None


class _GroupedLinear(torch.autograd.Function):
    """``baddbmm(bias, x, weight)`` whose input gradient keeps ``x``'s layout.

    ``x`` (G, B, i) is usually a transposed view of a (B, G*i) hidden layer
    (:func:`shared_input_linear`'s output after its ReLU). Autograd's bmm backward returns a
    contiguous (G, B, i) gradient, so the ReLU backward that follows ran on two layouts at
    once (measured 443 us instead of 269 on an H100 at 32 x 16384 x 256) and the layer
    below needed its gradient as (B, G*i) again. Here cuBLAS writes the gradient straight
    into ``x``'s layout. Products run in the autocast dtype, as autocast's own baddbmm does.

    ``relu_input``: ``x`` is a ReLU's output (of :func:`shared_input_relu_linear` with
    ``masked_downstream``), and the input gradient comes back masked by it, on the GPU in the
    GEMM's epilogue (:mod:`ple_adatt.relu_dgrad`, where ``fused_dgrad``)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, relu_input: bool = False,
                fused_dgrad: bool = True) -> Tensor:
        dtype = _compute_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            xc, wc = x.to(dtype), weight.to(dtype)
            out = torch.bmm(xc, wc) if bias is None else torch.baddbmm(bias.to(dtype), xc, wc)
        ctx.save_for_backward(xc, wc)
        ctx.dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.relu_input, ctx.fused_dgrad = relu_input, fused_dgrad
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        xc, wc = ctx.saved_tensors
        x_dtype, w_dtype, b_dtype = ctx.dtypes
        grad = grad.to(xc.dtype)
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            if ctx.relu_input:
                gx = relu_dgrad.masked_input_grad(grad, wc, xc, fused=ctx.fused_dgrad)
            else:
                gx = relu_dgrad.input_grad_in_layout(grad, wc, xc)
            gx = gx.to(x_dtype)
        if ctx.needs_input_grad[1]:
            gw = torch.bmm(xc.transpose(1, 2), grad).to(w_dtype)
        if ctx.needs_input_grad[2]:
            gb = grad.sum(1, keepdim=True, dtype=torch.float32).to(b_dtype)
        return gx, gw, gb, None, None


def grouped_linear(x: Tensor, weight: Tensor, bias: Tensor | None, relu_input: bool = False,
                   fused_dgrad: bool = True) -> Tensor:
    """``G`` linear maps of ``G`` inputs, x (G, B, i), weight (G, i, o), bias (G, 1, o) or None
    (no bias: a plain bmm), whose input gradient has ``x``'s layout (:class:`_GroupedLinear`);
    ``relu_input``: that gradient comes back masked by ``x > 0``."""
    return _GroupedLinear.apply(x, weight, bias, relu_input, fused_dgrad)


class BatchedLinear(nn.Module):
    """``G`` independent linear maps applied to ``G`` inputs: (G, B, i) -> (G, B, o)."""

    def __init__(self, groups: int, d_in: int, d_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(groups, d_in, d_out))
        self.bias = nn.Parameter(torch.empty(groups, 1, d_out))
        _init_batched(self.weight, d_in)
        _init_batched(self.bias, d_in)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 2:  # one input shared by every group (plain, or augment_input's)
            return shared_input_linear(x, self.weight, self.bias)
        return torch.baddbmm(self.bias, x, self.weight)  # (G, B, o); strided x is fine for bmm


class ExpertMLP(nn.Module):
    """One shared expert: Linear -> ReLU -> Linear. Kept separate for per-expert LR."""

    def __init__(self, d_in: int, hidden: int, d_out: int):
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(d_in, hidden))
        self.b1 = nn.Parameter(torch.empty(hidden))
        self.w2 = nn.Parameter(torch.empty(hidden, d_out))
        self.b2 = nn.Parameter(torch.empty(d_out))
        for w, fan in ((self.w1, d_in), (self.b1, d_in), (self.w2, hidden), (self.b2, hidden)):
            _init_batched(w, fan)


class SharedExperts(nn.Module):
    """``E`` shared experts, stacked into batched matmuls in the forward pass."""

    def __init__(self, names: list[str], d_in: int, hidden: int, d_out: int):
        super().__init__()
        self.names = list(names)
        self.experts = nn.ModuleDict({n: ExpertMLP(d_in, hidden, d_out) for n in names})

    def stacked(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        ex = list(self.experts.values())
        return (
            torch.stack([e.w1 for e in ex]),  # (E, i, h)
            torch.stack([e.b1 for e in ex]).unsqueeze(1),  # (E, 1, h)
            torch.stack([e.w2 for e in ex]),  # (E, h, d)
            torch.stack([e.b2 for e in ex]).unsqueeze(1),  # (E, 1, d)
        )

    def forward(self, x: Tensor, with_bias: bool = True,
                fused_dgrad: bool = True) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor]]:
        """``x`` (B, i), or :func:`augment_input`'s (B, k) for the GPU's layers; the cache
        holds the (B, i) part. ``with_bias=False`` leaves the second layers' bias out of the
        output, for the CGC mixture to add (:meth:`output_bias`); ``fused_dgrad``: the GPU's
        layers mask the hidden layer's gradient in a Triton kernel (:mod:`ple_adatt.relu_dgrad`)."""
        w1, b1, w2, b2 = self.stacked()
        augmented = x.shape[1] > w1.shape[1]
        # (E, B, h): every expert's first layer in one GEMM (on the GPU with its ReLU, whose
        # mask the second layer's backward applies). The cache's "pre-activation" is the hidden
        # layer: the per-task gradients read its sign (pre > 0 <=> hid > 0) and relu() of it
        hid = shared_input_relu_linear(x, w1, b1, masked_downstream=augmented)
        if augmented:
            s = grouped_linear(hid, w2, b2 if with_bias else None, relu_input=True, fused_dgrad=fused_dgrad)
        else:
            s = torch.baddbmm(b2, hid, w2) if with_bias else torch.bmm(hid, w2)
        # detached: the cache is read without autograd (the per-task gradients); the GPU's first
        # layer trusts the grouped layer to mask the hidden layer's gradient, so a differentiable
        # use of the hidden layer elsewhere would skip its ReLU's mask: refuse it instead
        hid_c = hid.detach()
        return s, (x[:, :w1.shape[1]].detach(), hid_c, hid_c)

    def output_bias(self) -> Tensor:
        """The second layers' biases, (E, 1, d)."""
        return torch.stack([e.b2 for e in self.experts.values()]).unsqueeze(1)

    def stacked_w2(self) -> Tensor:
        """The second layers' weights (E, h, d), a copy: what the per-task gradients read."""
        return torch.stack([e.w2 for e in self.experts.values()])

    def per_task_grads(self, cache: tuple[Tensor, Tensor, Tensor], d_s: Tensor, w2: Tensor | None = None) -> Tensor:
        """Closed-form gradients of every task on every shared parameter, all tasks at once.

        ``d_s`` (T, E, B, d) is dL_t/dS per task; ``w2`` the second layers' weights
        (:meth:`stacked_w2`, by default taken now). Returns (T, P) flattened in the order of
        ``self.parameters()`` (per expert: w1, b1, w2, b2).
        """
        x, pre, hid = cache
        w2 = self.stacked_w2() if w2 is None else w2
        d_s = d_s.to(hid.dtype)
        g_w2 = torch.einsum("ebh,tebd->tehd", hid, d_s)  # (T, E, h, d)
        g_b2 = d_s.sum(2)  # (T, E, d)
        d_hid = torch.einsum("tebd,ehd->tebh", d_s, w2.to(d_s.dtype)) * (pre > 0).to(d_s.dtype)  # (T,E,B,h)
        g_w1 = torch.einsum("bi,tebh->teih", x.to(d_hid.dtype), d_hid)  # (T, E, i, h)
        g_b1 = d_hid.sum(2)  # (T, E, h)
        t = d_s.shape[0]
        parts = []
        for e in range(len(self.names)):
            parts += [g_w1[:, e].reshape(t, -1), g_b1[:, e], g_w2[:, e].reshape(t, -1), g_b2[:, e]]
        return torch.cat([p.float() for p in parts], dim=1)


# ------------------------------------------------------------------------------------ model


class PLEClusterModel(nn.Module):
    """PLE with CGC gates, task experts, towers, per-cluster heads and logit transfer."""

    def __init__(
        self,
        cfg: ModelConfig,
        heads: list[HeadSpec],
        num_numeric: int,
        cardinalities: list[int],
        num_clusters: int,
    ):
        super().__init__()
        self.cfg = cfg
        self.heads = list(heads)
        self.task_names = [h.name for h in heads]
        T = len(heads)
        self.num_tasks = T
        self.num_clusters = num_clusters
        self.out_dim = max(h.output_dim for h in heads)  # O
        d = cfg.expert_dim
        # embeddings: one table for all categorical columns, offset per column
        self.num_numeric = num_numeric
        self.embedding = nn.Embedding(max(sum(cardinalities), 1), cfg.embedding_dim)
        offsets = torch.tensor([0] + list(cardinalities[:-1]), dtype=torch.long).cumsum(0)
        self.register_buffer("cat_offsets", offsets if cardinalities else torch.zeros(0, dtype=torch.long))
        d_in = num_numeric + len(cardinalities) * cfg.embedding_dim
        self.d_in = d_in
        # shared experts (E_s, B, d)
        names = list(cfg.shared_expert_names) or [f"expert_{i}" for i in range(cfg.num_shared_experts)]
        self.shared_experts = SharedExperts(names, d_in, cfg.shared_hidden, d)
        # task experts: T * E_t experts in one batched MLP (T*E_t, B, d)
        self.e_t = cfg.task_experts_per_task
        if self.e_t:
            self.task_expert_in = BatchedLinear(T * self.e_t, d_in, cfg.task_hidden)
            self.task_expert_out = BatchedLinear(T * self.e_t, cfg.task_hidden, d)
        # CGC gates: each task gates over the shared experts and its own (T, B, E_s + E_t)
        self.task_expert_attention = BatchedLinear(T, d_in, len(names) + self.e_t)
        self.register_buffer("_cgc_frozen", torch.tensor(False))
        # towers (T, B, h) and heads (T, B, O); cluster heads (C, T, h, O) for Phase 2
        self.tower = BatchedLinear(T, d, cfg.tower_hidden)
        self.tower_dropout = nn.Dropout(cfg.tower_dropout)
        self.head = BatchedLinear(T, cfg.tower_hidden, self.out_dim)
        # near-zero heads: a task's input gradient starts tiny and grows along the directions
        # that predict it, so related tasks' gradients on the shared experts align instead of
        # being scrambled by random readouts. (Not exactly zero: the very first affinity
        # observation would then be all zeros and drag the EMA diagonal below 1.) Retrieval
        # heads keep the default start: a near-zero query has no direction to normalise.
        with torch.no_grad():
            for i, h in enumerate(heads):
                if h.type != "retrieval":
                    self.head.weight[i].normal_(0.0, 1e-3)
                    self.head.bias[i].zero_()
        self.cluster_head_weight = nn.Parameter(torch.zeros(num_clusters, T, cfg.tower_hidden, self.out_dim))
        self.cluster_head_bias = nn.Parameter(torch.zeros(num_clusters, T, 1, self.out_dim))
        self.register_buffer("_cluster_heads_ready", torch.tensor(False))
        # retrieval tasks: item embedding tables
        self.item_embeddings = nn.ModuleDict(
            {h.name: nn.Embedding(h.vocab_size, h.output_dim) for h in heads if h.type == "retrieval"}
        )
        for emb in self.item_embeddings.values():
            nn.init.normal_(emb.weight, std=0.1)
        # regression targets are learned standardised; these buffers map back
        self.register_buffer("target_loc", torch.zeros(T))
        self.register_buffer("target_scale", torch.ones(T))
        # logit transfer DAG (src -> dst), topologically ordered, between present tasks
        self.transfer_edges = self._order_edges(cfg.logit_transfer_edges)
        self.logit_transfer = nn.ModuleList()
        for s, t in self.transfer_edges:
            o_s, o_t = heads[s].output_dim, heads[t].output_dim
            lin = nn.Linear(o_s, o_t)
            nn.init.constant_(lin.weight, 1.0 / o_s)
            nn.init.zeros_(lin.bias)
            self.logit_transfer.append(lin)

    def _order_edges(self, edges: tuple[tuple[str, str], ...]) -> list[tuple[int, int]]:
        idx = {n: i for i, n in enumerate(self.task_names)}
        kept = [(idx[a], idx[b]) for a, b in edges if a in idx and b in idx]
        cycle = find_cycle((self.task_names[a], self.task_names[b]) for a, b in kept)
        if cycle:
            raise ValueError(cycle_message(cycle))
        order, done = [], set()

        def visit(n: int) -> None:  # predecessors first (the edges are acyclic)
            if n in done:
                return
            done.add(n)
            for a, b in kept:
                if b == n:
                    visit(a)
            order.append(n)

        for n in range(len(self.task_names)):
            visit(n)
        rank = {n: i for i, n in enumerate(order)}
        return sorted(kept, key=lambda e: (rank[e[1]], rank[e[0]]))

    # ------------------------------------------------------------------------- forward

    def encode(self, x_num: Tensor, x_cat: Tensor) -> Tensor:
        parts = [x_num]
        if x_cat.shape[1]:
            parts.append(self.embedding(x_cat + self.cat_offsets).flatten(1))  # (B, n_cat * e)
        return torch.cat(parts, dim=1)  # (B, d_in)

    def forward(self, x_num: Tensor, x_cat: Tensor, cluster: Tensor | None = None,
                use_cluster_heads: bool = False) -> ModelOutput:
        gates, cgc, cache = self._trunk(x_num, x_cat)
        out = self._heads(cgc, cluster, use_cluster_heads)
        return ModelOutput(out, gates, cgc, cache)

    # The trunk (inputs -> CGC outputs) and the heads (CGC outputs -> task outputs) are two
    # functions so that each can be compiled on its own (``compile_parts``): the per-task
    # gradients take a backward from the losses to the CGC outputs, which must stay a tensor
    # between two autograd nodes, not an intermediate inside one compiled graph.
    _trunk_fn = None
    _heads_fn = None
    # the CGC mixture as fused Triton kernels on CUDA (ple_adatt.mixture), and with the GPU's
    # layers the towers' and the masked-gradient kernels (ple_adatt.towers, relu_dgrad);
    # training.fused_mixture
    fused_mixture = True
    # The layers that read the shared input, as the GPU runs them: augment_input (the bias a
    # GEMM row, aligned rows), the ReLU in the GEMM's epilogue, grouped second layers whose
    # input gradient keeps the input's layout. Measured on an H100: the plain step with CUDA
    # graphs 5.15 -> 4.09 ms. The CPU runs the plain layers about 10 % faster (no Python
    # backward). None: by the input's device; tests set True to run the GPU's layers on the CPU.
    gpu_layers: bool | None = None
    # With the GPU's layers and the fused mixture: the experts' second-layer biases are added in
    # the mixture's kernels (ple_adatt.mixture), not by baddbmm's broadcast copy into the experts'
    # outputs (134 us on an H100 at the seed's task experts, 32 x 16384 x 128) and a pass for
    # their gradients. Measured on an H100 with CUDA graphs: -0.20 ms a plain step (bench run (f)).
    mixture_biases: bool = True
    # With the GPU's layers: the towers' first layer as bmm and one Triton pass for its bias and
    # ReLU (ple_adatt.towers) instead of baddbmm's bias copy, a ReLU pass, and in the backward a
    # threshold pass and a bias-gradient pass. Measured: -0.22 ms a plain step (bench run (g)).
    fused_tower: bool = True
    # With the GPU's layers: the experts' hidden-layer gradient masked by their ReLU in the
    # second layers' input-gradient GEMM (ple_adatt.relu_dgrad, a Triton kernel) instead of a
    # cuBLAS GEMM and a threshold_backward pass. Measured: -0.24 ms a plain step (bench run (h)).
    fused_relu_dgrad: bool = True
    # With the towers' kernel: the heads (up to towers.MAX_FUSED_OUT outputs) summed in the same
    # kernel, and their backward in the towers' backward kernel, where dropout is off and Phase 2's
    # cluster heads are not in use: no GEMV over the hidden layer either way, no K = 1 GEMM writing
    # its gradient (about 100 us on an H100 at the seed's shape). Bench run (i) is the A/B.
    fused_head: bool = True

    def _gpu_layers(self, t: Tensor) -> bool:
        return t.is_cuda if self.gpu_layers is None else self.gpu_layers

    def _trunk(self, x_num: Tensor, x_cat: Tensor) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor, Tensor]]:
        return (self._trunk_fn or self.trunk)(x_num, x_cat)

    def _heads(self, cgc: Tensor, cluster: Tensor | None, use_cluster_heads: bool) -> Tensor:
        return (self._heads_fn or self.heads_forward)(cgc, cluster, use_cluster_heads)

    def compile_parts(self, **options) -> None:
        """torch.compile the trunk and the heads (separately; see above)."""
        # the per-task gradients back-propagate through the heads with retain_graph=True,
        # which compiled backwards with donated buffers refuse
        import torch._functorch.config as functorch_config

        functorch_config.donated_buffer = False
        # static shapes: an epoch's smaller last batch (and validation's) would otherwise make
        # dynamo recompile for dynamic shapes, and the full batches of every later epoch would
        # then run that slower dynamic graph; static, each batch size is one more compile
        options.setdefault("dynamic", False)
        # each batch size and grad mode (train, its last batch, evaluation, Phase 2 with the
        # shared experts frozen, predict) is one more graph: past dynamo's default of 8 a
        # compiled part would fall back to eager for every new shape
        import torch._dynamo.config as dynamo_config

        dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 64)
        self._trunk_fn = torch.compile(self.trunk, **options)
        self._heads_fn = torch.compile(self.heads_forward, **options)

    def trunk(self, x_num: Tensor, x_cat: Tensor) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor, Tensor]]:
        """Embeddings, shared and task experts, CGC gates: (gates, cgc, shared-expert cache)."""
        x = self.encode(x_num, x_cat)  # (B, d_in)
        gpu_layers = self._gpu_layers(x)
        if gpu_layers:
            x = augment_input(x)  # (B, d_in + 1 + padding)
        # with the fused mixture, the experts' second layers leave their bias to it
        # (mixture_biases): no broadcast copy of the bias into their outputs, no bias-gradient pass
        fold = gpu_layers and self.fused_mixture and self.mixture_biases
        fused_dgrad = self.fused_mixture and self.fused_relu_dgrad  # training.fused_mixture: all the kernels
        shared, cache = self.shared_experts(x, with_bias=not fold, fused_dgrad=fused_dgrad)  # (E_s, B, d)
        gates = torch.softmax(self.task_expert_attention(x), dim=-1)  # (T, B, E_s + E_t)
        te = biases = None
        if self.e_t:
            inner, outer = self.task_expert_in, self.task_expert_out
            hid = shared_input_relu_linear(x, inner.weight, inner.bias, masked_downstream=gpu_layers)  # (T*E_t, B, h)
            if gpu_layers:
                te = grouped_linear(hid, outer.weight, None if fold else outer.bias, relu_input=True,
                                    fused_dgrad=fused_dgrad)
            else:
                te = outer(hid)
            te = te.view(self.num_tasks, self.e_t, *te.shape[1:])  # (T, E_t, B, d)
        if fold:
            task_bias = None if te is None else self.task_expert_out.bias.view(self.num_tasks, self.e_t, 1, -1)
            biases = (self.shared_experts.output_bias(), task_bias)
        cgc = mixture.gated_mixture(gates, shared, te, self.fused_mixture, *(biases or ()))  # (T, B, d)
        return gates, cgc, cache

    def heads_forward(self, cgc: Tensor, cluster: Tensor | None, use_cluster_heads: bool) -> Tensor:
        """Towers, global or per-cluster heads and logit transfer: (T, B, O)."""
        # relu(baddbmm(b, cgc, W)), on the GPU as bmm and one bias+ReLU kernel (ple_adatt.towers)
        fused = self._gpu_layers(cgc) and self.fused_mixture and self.fused_tower  # training.fused_mixture
        cluster_heads = bool(use_cluster_heads and self.num_clusters and cluster is not None)
        if (fused and self.fused_head and not cluster_heads and self.out_dim <= towers.MAX_FUSED_OUT
                and not (self.training and self.tower_dropout.p > 0)):
            # the heads' few outputs summed in the towers' kernel: the hidden layer's gradient is
            # never written whole (ple_adatt.towers.tower_head)
            out = towers.tower_head(cgc, self.tower.weight, self.tower.bias, self.head.weight, self.head.bias)
            return self._apply_logit_transfer(out) if self.transfer_edges else out
        hid = towers.tower_layer(cgc, self.tower.weight, self.tower.bias, fused=fused)
        hid = self.tower_dropout(hid)  # (T, B, h)
        out = self.head(hid)  # (T, B, O)
        if cluster_heads:
            per = torch.einsum("tbh,ctho->ctbo", hid, self.cluster_head_weight) + self.cluster_head_bias
            per = torch.cat([per, out.unsqueeze(0)], dim=0)  # (C+1, T, B, O); index C = global
            idx = cluster.view(1, 1, -1, 1).expand(1, self.num_tasks, -1, self.out_dim)
            out = per.gather(0, idx).squeeze(0)  # (T, B, O)
        if self.transfer_edges:
            out = self._apply_logit_transfer(out)
        return out

    def _apply_logit_transfer(self, out: Tensor) -> Tensor:
        """Add ``transfer_strength * proj(src)`` to each destination's output along the DAG.

        The source output is detached: the destination reads it as an input, its loss does
        not train the source tower. That keeps each task's loss a function of its own CGC
        output only, which the batched per-task gradient relies on.
        """
        outs = list(out.unbind(0))
        for (s, t), lin in zip(self.transfer_edges, self.logit_transfer):
            o_s, o_t = self.heads[s].output_dim, self.heads[t].output_dim
            add = self.cfg.transfer_strength * lin(outs[s][:, :o_s].detach().to(lin.weight.dtype))
            outs[t] = outs[t] + F.pad(add.to(outs[t].dtype), (0, self.out_dim - o_t))
        return torch.stack(outs, dim=0)

    # ---------------------------------------------------------------- per-task gradients

    def shared_parameters(self) -> list[nn.Parameter]:
        return list(self.shared_experts.parameters())

    @torch.compiler.disable
    def shared_task_gradients(self, task_losses: Tensor, present: Tensor, output: ModelOutput,
                              method: str = "batched") -> Tensor:
        """Per-task gradients on the shared-expert parameters, (T, P); absent tasks are zero.

        ``task_losses`` (T,) are the weighted per-task losses of this batch; the autograd
        graph is retained for the training backward that follows.
        """
        if method == "loop":
            return self._task_gradients_loop(task_losses, present)
        if method not in GRAD_METHODS:
            raise ValueError(f"unknown gradient method {method!r}; valid: {', '.join(GRAD_METHODS)}")
        return self.task_gradients_from_cgc(self._cgc_grads(task_losses, present, output), output, method)

    def task_gradients_from_cgc(self, d_cgc: Tensor, output: ModelOutput, method: str = "batched",
                                w2: Tensor | None = None) -> Tensor:
        """Per-task gradients on the shared-expert parameters from dL_t/dcgc_t (T, B, d); a
        task's rows scale with its row of ``d_cgc`` (the affinity's cosines do not). ``w2``:
        the shared experts' second-layer weights as of the forward (a copy, for a measurement
        that runs while the optimizer updates them; by default taken now)."""
        fused = method == "fused" or (method == "batched" and kernels.preferred(d_cgc.device,
                                                                                 output.shared_cache[1].dtype))
        with torch.no_grad():  # a measurement: no graph through the experts' weights
            w2 = self.shared_experts.stacked_w2() if w2 is None else w2
            if fused:
                x, pre, hid = output.shared_cache
                if method == "fused":
                    return kernels.shared_task_grads(x, pre, w2, d_cgc, output.gates, hid=hid)
                grads = kernels.shared_task_grads_or_none(x, pre, w2, d_cgc, output.gates, hid=hid)
                rows = d_cgc.shape[1]
                if grads is not None and not kernels.checked(rows):
                    grads = kernels.check_once(grads, self._einsum_reference(d_cgc, output, w2), rows=rows)
                if grads is not None:
                    return grads
            return self._einsum_task_gradients(d_cgc, output, w2)

    def _einsum_task_gradients(self, d_cgc: Tensor, output: ModelOutput, w2: Tensor | None = None) -> Tensor:
        return self.shared_experts.per_task_grads(output.shared_cache, self._shared_output_grads(d_cgc, output), w2)

    def _einsum_reference(self, d_cgc: Tensor, output: ModelOutput, w2: Tensor | None = None,
                          rows: int = CHECK_ROWS) -> Tensor:
        """The einsum path's gradients summed over blocks of ``rows`` rows (they are sums over
        rows): the kernel's first-use check then holds (T, E, rows, h) temporaries, not the
        whole batch's (2 GiB in bf16 at batch 16384, several GiB with the products around it)."""
        x, pre, hid = output.shared_cache
        total = None
        for start in range(0, d_cgc.shape[1], rows):
            r = slice(start, start + rows)
            part = replace(output, gates=output.gates[:, r], shared_cache=(x[r], pre[:, r], hid[:, r]))
            g = self._einsum_task_gradients(d_cgc[:, r], part, w2)
            total = g if total is None else total.add_(g)
        return total

    @torch.compiler.disable
    def shared_task_and_representation_gradients(self, task_losses: Tensor, present: Tensor,
                                                 output: ModelOutput) -> tuple[Tensor, Tensor]:
        """Per-task gradients on the shared-expert parameters (T, P) and on the shared
        experts' outputs ``dL_t/dS`` flattened to (T, E_s * B * d) (for MGDA-UB), from one
        backward to the CGC outputs."""
        d_s = self._shared_output_grads(self._cgc_grads(task_losses, present, output), output)
        with torch.no_grad():
            return self.shared_experts.per_task_grads(output.shared_cache, d_s), d_s.flatten(1).float()

    @staticmethod
    def _cgc_grads(task_losses: Tensor, present: Tensor, output: ModelOutput) -> Tensor:
        """dL_t/dcgc_t for every task at once, (T, B, d): one backward from the summed losses
        to the CGC outputs (task t's loss reads only cgc_t)."""
        total = (task_losses * present.to(task_losses.dtype)).sum()
        (d_cgc,) = torch.autograd.grad(total, output.cgc_out, retain_graph=True)
        return d_cgc

    def _shared_output_grads(self, d_cgc: Tensor, output: ModelOutput) -> Tensor:
        """dL_t/dS for every task: task t reads the shared experts only through its own CGC
        output, so ``dL_t/dS_e = gate_{t,e} * dL/dcgc_t``: (T, E_s, B, d)."""
        e_s = len(self.shared_experts.names)
        g = output.gates[..., :e_s].permute(0, 2, 1).unsqueeze(-1)  # (T, E_s, B, 1)
        return g * d_cgc.unsqueeze(1)  # (T, E_s, B, d)

    def _task_gradients_loop(self, task_losses: Tensor, present: Tensor) -> Tensor:
        """The seed's reference: one ``autograd.grad`` per task with ``retain_graph``."""
        params = self.shared_parameters()
        rows = []
        for i in range(self.num_tasks):
            if not bool(present[i]):
                rows.append(torch.zeros(sum(p.numel() for p in params), device=task_losses.device))
                continue
            grads = torch.autograd.grad(task_losses[i], params, retain_graph=True, allow_unused=True)
            rows.append(torch.cat([(g if g is not None else torch.zeros_like(p)).flatten().float()
                                   for g, p in zip(grads, params)]))
        return torch.stack(rows)

    # ----------------------------------------------------------------- phase switches

    def set_cgc_frozen(self, frozen: bool = True) -> None:
        for p in self.task_expert_attention.parameters():
            p.requires_grad_(not frozen)
        self._cgc_frozen.fill_(frozen)

    def freeze_shared_experts(self, frozen: bool = True) -> None:
        """Freeze (or unfreeze) the shared representation: embeddings and shared experts."""
        for p in [*self.shared_experts.parameters(), *self.embedding.parameters()]:
            p.requires_grad_(not frozen)

    def init_cluster_heads(self) -> None:
        """Start every cluster head from the trained global head (once, at Phase 2 start)."""
        if bool(self._cluster_heads_ready):
            return
        with torch.no_grad():
            self.cluster_head_weight.copy_(self.head.weight.unsqueeze(0).expand_as(self.cluster_head_weight))
            self.cluster_head_bias.copy_(self.head.bias.unsqueeze(0).expand_as(self.cluster_head_bias))
        self._cluster_heads_ready.fill_(True)

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Parameters by role (used for Phase 2 trainability and per-expert LR)."""
        groups = {
            "shared": [*self.embedding.parameters(), *self.shared_experts.parameters()],
            "cgc": list(self.task_expert_attention.parameters()),
            "task_experts": (list(self.task_expert_in.parameters()) + list(self.task_expert_out.parameters()))
            if self.e_t else [],
            "towers": [*self.tower.parameters(), *self.head.parameters(), *self.logit_transfer.parameters(),
                       *self.item_embeddings.parameters()],
            "cluster_heads": [self.cluster_head_weight, self.cluster_head_bias],
        }
        return groups

    # ----------------------------------------------------------------------- inference

    @torch.no_grad()
    def predict(self, x_num: Tensor, x_cat: Tensor, cluster: Tensor | None = None,
                use_cluster_heads: bool | None = None) -> dict[str, Tensor]:
        """Task predictions in user units: probabilities, class probabilities, values, queries."""
        if use_cluster_heads is None:
            use_cluster_heads = bool(self._cluster_heads_ready)
        return self.predictions(self(x_num, x_cat, cluster, use_cluster_heads=use_cluster_heads).out)

    def predictions(self, out: Tensor) -> dict[str, Tensor]:
        """:meth:`predict` from the forward's stacked head outputs ``out`` (T, B, o)."""
        out = out.float()
        preds: dict[str, Tensor] = {}
        for i, h in enumerate(self.heads):
            o = out[i, :, : h.output_dim]
            if h.type == "binary":
                preds[h.name] = torch.sigmoid(o[:, 0])
            elif h.type == "multiclass":
                preds[h.name] = torch.softmax(o, dim=-1)
            elif h.type == "regression":
                preds[h.name] = o[:, 0] * self.target_scale[i] + self.target_loc[i]
            else:
                preds[h.name] = o
        return preds


def build_model(cfg: ModelConfig, tasks: list[TaskSpec], num_numeric: int, cardinalities: list[int],
                num_clusters: int) -> PLEClusterModel:
    heads = [HeadSpec.from_task(t, cfg.retrieval_dim) for t in tasks]
    return PLEClusterModel(cfg, heads, num_numeric, cardinalities, num_clusters)
