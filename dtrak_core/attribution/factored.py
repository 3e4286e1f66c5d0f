"""A layer-factored feature computer: Kronecker-projected per-sample gradients from hooks.

For a linear or convolutional layer Y = W X (+ b), a sample's gradient of its output function is
a sum over positions (tokens, pixels, timesteps) of outer products,

    G_b = sum_pos dY[b, pos] X[b, pos]^T          (d_out, d_in; conv: X = the im2col patch),

so its Kronecker-structured projection needs no per-sample gradient at all:

    phi_layer[b] = vec( R_out^T G_b R_in ) = sum_pos (R_out^T dY[b, pos]) (X[b, pos]^T R_in)   (k_out, k_in),

with R_in (d_in, k_in) and R_out (d_out, k_out) i.i.d. N(0, 1/k) matrices drawn on the CPU from
(seed, layer name, side) (``seeds.feature_seed``), so E |phi_layer|^2 = |G_b|^2 as for every
projector. In row-major order vec(R_out^T G R_in) = kron(R_out, R_in)^T vec(G): the layer's block of
the projection matrix P is ``torch.kron(R_out, R_in)`` (:meth:`FactoredProjection.project_gradients`
applies it to ready gradients; the tests hold the hooks to it).

How it is computed (:meth:`FactoredGradientProjection.compute`): one batched forward of the
B * c noised copies of a timestep chunk (c = ``timestep_chunk``), forward hooks on the layers
project each input at once (X R_in: a matmul; for a conv, a convolution of the input with R_in
reshaped as a (k_in, C_in/groups, kh, kw) kernel: the im2col formulation, with the layer's own
stride, padding, dilation, groups and padding mode, without forming the patches), then ONE
backward of sum_{b, t} f_b(t), in which a tensor hook on every layer output receives dY, projects
it (dY R_out) and contracts the two over positions and the chunk's timesteps per sample. No
parameter requires a gradient (weight gradients are never formed), so the backward costs less
than a training step's. Summed over the chunks and divided by K, as the per-sample-gradient
computer does: phi = P^T (1/K) sum_t grad f.

Exactness needs the batched backward to give per-sample gradients: f_b depends on sample b's row
only. GroupNorm and LayerNorm normalise within a sample (fine); BatchNorm with batch statistics
couples the rows and is refused, as is any hooked layer that sees a batch other than the B * c
rows (an input shared across samples).

Parameters that are not a matrix (biases, GroupNorm / LayerNorm affine weights) have cheap exact
per-sample gradients: a bias's is sum_pos dY, a norm weight's sum_pos dY * x_hat (x_hat the
normalised input, recomputed from the input in the hook). They are accumulated exactly and
projected directly, all together, by one dense Gaussian matrix (the "direct" group); when that
group's share of k is at least its size it is kept unprojected. Any other selected parameter
(an embedding table, a bare ``nn.Parameter``, a layer whose ``forward`` is overridden) is refused
with a one-line error naming it: never silently dropped.

Share of k (:func:`allocate`): every group g (each layer's weight; the direct group) gets
k_g proportional to sqrt(p_g), p_g its number of coordinates, capped at p_g (water-filling: a
group that needs fewer columns than its share keeps all its coordinates and leaves the rest to
the others). Why sqrt: a random sketch's error on a group's inner products falls as 1/sqrt(k_g)
while the group's share of the inner product grows with its size only as far as its gradient
norm does, which across UNet layers varies far less than p_g (p_g: 864 .. 73,728 in the demo
UNet); proportional shares would leave small layers with one or two columns and sketch them
with O(1) relative error, equal shares would starve the large ones. A layer's block is
k_out x k_in with k_out / k_in ~ d_out / d_in (each side compressed by the same factor), at most
d_out x d_in. Measured on the mini UNet in ``docs/benchmarks/factored.md``.
"""

from __future__ import annotations

import math
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
from torch import nn
from torch.func import vmap
from torch.nn import functional as F

from dtrak_core.attribution.feature_computers import DTYPES, FEATURE_COMPUTERS, FeatureComputer, FeatureGroup
from dtrak_core.attribution.output_functions import get_output_function
from dtrak_core.attribution.projectors import PROJECTORS, GaussianProjector
from dtrak_core.seeds import feature_seed
from dtrak_core.tasks import DiffusionInputs, DiffusionTask

#: The name of the column group of the directly projected vectors (biases, norm weights).
DIRECT_GROUP = "direct"
#: Layer types whose weight is a matrix the hooks factor, and norm layers handled directly.
MATRIX_LAYERS = (nn.Linear, nn.Conv2d)
NORM_LAYERS = (nn.GroupNorm, nn.LayerNorm)


class FactoredError(ValueError):
    """The model or the settings do not fit the factored computer; the message says which part."""


@dataclass(frozen=True)
class LayerBlock:
    """The Kronecker block of one layer's weight: columns [start, start + k_out * k_in).

    ``d_in`` is the weight's input side as a matrix: in_features, or C_in / groups * kh * kw.
    """

    module: str
    param: str
    d_out: int
    d_in: int
    k_out: int
    k_in: int
    start: int = 0

    @property
    def size(self) -> int:
        return self.k_out * self.k_in


def _kronecker_factor(seed: int, module: str, side: str, rows: int, cols: int) -> torch.Tensor:
    """An i.i.d. N(0, 1/cols) matrix (rows, cols), float32 CPU, from (seed, module, side, rows, cols)."""
    generator = torch.Generator(device="cpu").manual_seed(feature_seed("factored", seed, module, side, rows, cols))
    return torch.randn((rows, cols), generator=generator).mul_(1.0 / math.sqrt(cols))


#: Shares of k grow as p_g ** SHARE_POWER (see the module docstring; 0.5 = sqrt).
SHARE_POWER = 0.5


def allocate(sizes: Sequence[int], k: int, power: float = SHARE_POWER) -> list[int]:
    """Integer shares k_g of k proportional to p_g ** power, each in [1, p_g], summing to min(k, sum p_g).

    Water-filling: groups whose share would exceed p_g get p_g and leave the rest to the others;
    the remaining fractional parts go to the largest remainders (ties: the earlier group).
    """
    if any(p < 1 for p in sizes):
        raise ValueError(f"group sizes must be positive, got {list(sizes)}")
    if k < len(sizes):
        raise FactoredError(f"projection dimension k={k} is smaller than the {len(sizes)} parameter groups of the "
                            f"factored computer (one per layer plus biases and norms); choose k >= {len(sizes)}")
    shares = [0.0] * len(sizes)
    open_groups = list(range(len(sizes)))
    budget = float(min(k, sum(sizes)))
    while open_groups:
        weight = sum(sizes[g] ** power for g in open_groups)
        capped = [g for g in open_groups if budget * sizes[g] ** power / weight >= sizes[g]]
        if not capped:
            for g in open_groups:
                shares[g] = budget * sizes[g] ** power / weight
            break
        for g in capped:
            shares[g] = float(sizes[g])
            budget -= sizes[g]
            open_groups.remove(g)
    whole = [max(1, min(sizes[g], int(math.floor(s)))) for g, s in enumerate(shares)]
    left = int(min(k, sum(sizes))) - sum(whole)
    order = sorted(range(len(sizes)), key=lambda g: (-(shares[g] - math.floor(shares[g])), g))
    while left > 0:
        moved = False
        for g in order:
            if left > 0 and whole[g] < sizes[g]:
                whole[g] += 1
                left -= 1
                moved = True
        if not moved:
            break
    while left < 0:  # the at-least-one floor overshot: take from the largest shares
        g = max(range(len(sizes)), key=lambda i: (whole[i], -i))
        whole[g] -= 1
        left += 1
    return whole


def block_shape(d_out: int, d_in: int, budget: int) -> tuple[int, int]:
    """(k_out, k_in) with k_out * k_in <= budget, k_out / k_in ~ d_out / d_in, k_out <= d_out, k_in <= d_in."""
    k_out = min(d_out, max(1, round(math.sqrt(budget * d_out / d_in))))
    k_in = min(d_in, max(1, budget // k_out))
    k_out = min(d_out, max(1, budget // k_in))
    return k_out, k_in


def fill_blocks(dims: Sequence[tuple[int, int]], budgets: Sequence[int]) -> list[tuple[int, int]]:
    """Block shapes for layers of (d_out, d_in) with the given column budgets, then the columns the
    shapes leave unused handed out greedily (one more row or column of the layer furthest below its
    budget, where it fits), so that the blocks use as much of the total as whole rows allow."""
    shapes = [block_shape(d_out, d_in, b) for (d_out, d_in), b in zip(dims, budgets)]
    slack = sum(budgets) - sum(a * b for a, b in shapes)
    while slack > 0:
        best = None
        for i, ((d_out, d_in), (k_out, k_in)) in enumerate(zip(dims, shapes)):
            deficit = (budgets[i] - k_out * k_in) / budgets[i]
            for grown in ((k_out + 1, k_in), (k_out, k_in + 1)):
                cost = grown[0] * grown[1] - k_out * k_in
                if grown[0] <= d_out and grown[1] <= d_in and cost <= slack:
                    if best is None or (deficit, -cost) > best[0]:
                        best = ((deficit, -cost), i, grown, cost)
        if best is None:
            break
        _, i, grown, cost = best
        shapes[i] = grown
        slack -= cost
    return shapes


@dataclass
class _Slot:
    """How one module's selected parameters enter the features."""

    module_name: str
    module: nn.Module
    weight: str | None = None  # a matrix layer's weight param name, when selected
    bias: str | None = None  # a bias (or norm bias) param name, projected directly
    norm_weight: str | None = None  # a norm layer's weight param name, projected directly


def _owner(name: str) -> tuple[str, str]:
    module, _, leaf = name.rpartition(".")
    return module, leaf


def plan_slots(model: nn.Module, param_names: Sequence[str]) -> list[_Slot]:
    """Group the selected parameters by the module that owns them, refusing what cannot be hooked.

    Returns the slots in the order of the modules' first selected parameter.
    """
    modules = dict(model.named_modules())
    for name, module in modules.items():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and (module.training or not module.track_running_stats):
            raise FactoredError(f"module {name!r} is a {type(module).__name__} that normalises with batch statistics, "
                                "which couples the samples of a batch; the factored computer needs per-sample "
                                "outputs (use --computer per-sample-gradients)")
    slots: dict[str, _Slot] = {}
    for name in param_names:
        module_name, leaf = _owner(name)
        module = modules.get(module_name)
        refuse = None
        if module is None or leaf not in dict(module.named_parameters(recurse=False)):
            refuse = "is not a parameter of a module"
        elif isinstance(module, MATRIX_LAYERS):
            base = nn.Linear if isinstance(module, nn.Linear) else nn.Conv2d
            if type(module).forward is not base.forward or (base is nn.Conv2d and
                                                          type(module)._conv_forward is not nn.Conv2d._conv_forward):
                refuse = f"belongs to a {type(module).__name__} whose forward is not {base.__name__}'s"
            elif leaf not in ("weight", "bias"):
                refuse = f"is not the weight or bias of its {base.__name__}"
        elif isinstance(module, NORM_LAYERS):
            base = nn.GroupNorm if isinstance(module, nn.GroupNorm) else nn.LayerNorm
            if type(module).forward is not base.forward:
                refuse = f"belongs to a {type(module).__name__} whose forward is not {base.__name__}'s"
            elif leaf not in ("weight", "bias"):
                refuse = f"is not the weight or bias of its {base.__name__}"
        else:
            refuse = f"belongs to a module of type {type(module).__name__}"
        if refuse:
            raise FactoredError(f"parameter {name!r} {refuse}; the factored computer handles the weights and biases "
                                "of Linear and Conv2d layers and the affine weights of GroupNorm and LayerNorm "
                                "(select others with --params, or use --computer per-sample-gradients)")
        slot = slots.setdefault(module_name, _Slot(module_name, module))
        if leaf == "bias":
            slot.bias = name
        elif isinstance(module, NORM_LAYERS):
            slot.norm_weight = name
        else:
            slot.weight = name
    return list(slots.values())


def matrix_dims(module: nn.Module) -> tuple[int, int]:
    """(d_out, d_in) of a Linear or Conv2d weight as a matrix (conv: C_out x C_in / groups * kh * kw)."""
    weight = module.weight
    return int(weight.shape[0]), int(weight[0].numel())


class FactoredProjection:
    """The projection matrix of the factored computer, as per-layer Kronecker factors and a direct part.

    Built from the selected parameters' shapes, k and the seed only. Columns: the layer blocks in
    the order of their weights in ``param_names``, then the direct group (biases and norm weights
    in ``param_names`` order) when there is one.
    """

    def __init__(self, model: nn.Module, param_names: Sequence[str], k: int, seed: int,
                 power: float = SHARE_POWER) -> None:
        self.slots = plan_slots(model, param_names)
        self.seed = int(seed)
        layers = [s for s in self.slots if s.weight is not None]
        sizes = {n: p.numel() for n, p in model.named_parameters()}
        self.direct_names = [n for n in param_names if not any(s.weight == n for s in layers)]
        direct_size = sum(sizes[n] for n in self.direct_names)
        dims = [matrix_dims(s.module) for s in layers]
        group_sizes = [a * b for a, b in dims] + ([direct_size] if direct_size else [])
        shares = allocate(group_sizes, k, power)
        direct_k = shares[-1] if direct_size else 0
        shapes = fill_blocks(dims, shares[:len(dims)])
        # Columns the block shapes leave over go to the direct group while it has room.
        direct_k = min(direct_size, direct_k + sum(shares[:len(dims)]) - sum(a * b for a, b in shapes))
        self.blocks: list[LayerBlock] = []
        start = 0
        for slot, (d_out, d_in), (k_out, k_in) in zip(layers, dims, shapes):
            self.blocks.append(LayerBlock(slot.module_name, slot.weight, d_out, d_in, k_out, k_in, start))
            start += k_out * k_in
        self.direct_start, self.direct_size = start, direct_size
        self.direct: GaussianProjector | None = None
        self.direct_dim = 0
        if direct_size:
            self.direct_dim = direct_k
            if direct_k < direct_size:
                self.direct = GaussianProjector(direct_size, direct_k, feature_seed("factored", self.seed, DIRECT_GROUP),
                                                self.direct_names)
        self.output_dim = start + self.direct_dim
        self._factors: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]] = {}

    def factors(self, block: LayerBlock, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """(R_out (d_out, k_out), R_in (d_in, k_in)) of a layer, float32 on ``device`` (cached)."""
        key = (block.module, str(device))
        if key not in self._factors:
            self._factors[key] = (_kronecker_factor(self.seed, block.module, "out", block.d_out, block.k_out).to(device),
                                  _kronecker_factor(self.seed, block.module, "in", block.d_in, block.k_in).to(device))
        return self._factors[key]

    def groups(self) -> list[FeatureGroup]:
        groups = [FeatureGroup(b.param, b.start, b.start + b.size) for b in self.blocks]
        if self.direct_dim:
            groups.append(FeatureGroup(DIRECT_GROUP, self.direct_start, self.direct_start + self.direct_dim))
        return groups

    def project_direct(self, flat: torch.Tensor) -> torch.Tensor:
        """The direct group's columns from its exact per-sample gradients (B, direct_size)."""
        return flat if self.direct is None else self.direct.project(flat)

    def project_gradients(self, grads: dict[str, torch.Tensor]) -> torch.Tensor:
        """The same projection applied to ready per-sample gradients {name: (B, *shape)} -> (B, k).

        Each block as R_out^T G R_in (a check of the hooks, and a projector for gradients
        computed elsewhere); memory ~ B * p.
        """
        columns = []
        for block in self.blocks:
            g = grads[block.param].float()
            r_out, r_in = self.factors(block, g.device)
            g = g.reshape(g.shape[0], block.d_out, block.d_in)
            columns.append(torch.einsum("bod,ok,dj->bkj", g, r_out, r_in).reshape(g.shape[0], -1))
        if self.direct_dim:
            batch = grads[self.direct_names[0]].shape[0]
            flat = torch.cat([grads[n].float().reshape(batch, -1) for n in self.direct_names], dim=1)
            columns.append(self.project_direct(flat))
        return torch.cat(columns, dim=1)


class _Accumulator:
    """Per-sample sums of one ``compute`` call: layer blocks (B, k_out, k_in) and direct vectors (B, n)."""

    def __init__(self, projection: FactoredProjection, batch: int, device: torch.device) -> None:
        self.blocks = {b.module: torch.zeros(batch, b.k_out, b.k_in, device=device) for b in projection.blocks}
        self.direct: dict[str, torch.Tensor] = {}
        self.batch = batch

    def add_direct(self, name: str, per_row: torch.Tensor) -> None:
        """per_row: (N, *shape) per (sample, timestep) row; summed over the chunk's timesteps."""
        summed = per_row.reshape(self.batch, -1, per_row[0].numel()).sum(1)
        if name in self.direct:
            self.direct[name] += summed
        else:
            self.direct[name] = summed


@contextmanager
def _no_parameter_gradients(model: nn.Module) -> Iterator[None]:
    """No parameter requires a gradient inside (so no weight gradient is formed); flags restored after."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


class _Hooks:
    """Forward hooks on the planned modules for one chunk: they project inputs and attach the
    backward side (a tensor hook, or a list of leaves whose gradients the caller hands back)."""

    def __init__(self, projection: FactoredProjection, acc: _Accumulator, rows: int) -> None:
        self.projection, self.acc, self.rows = projection, acc, rows
        self.blocks = {b.module: b for b in projection.blocks}
        self.leaves: list[tuple[torch.Tensor, Callable[[torch.Tensor], None]]] = []
        self.handles: list = []

    def attach(self) -> None:
        for slot in self.projection.slots:
            self.handles.append(slot.module.register_forward_hook(self._hook(slot)))

    def detach(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def _hook(self, slot: _Slot) -> Callable:
        def forward_hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
            if not args:
                raise FactoredError(f"module {slot.module_name!r} was called without a positional input; the "
                                    "factored computer reads a layer's input from its first positional argument")
            x = args[0]
            if x.shape[0] != self.rows or output.shape[0] != self.rows:
                raise FactoredError(f"module {slot.module_name!r} saw a batch of {x.shape[0]} rows, not the "
                                    f"{self.rows} (sample, timestep) rows of the forward: its input is shared "
                                    "across samples, so the factored computer cannot split its gradient "
                                    "(use --computer per-sample-gradients)")
            backward = self._backward(slot, module, x)
            if output.requires_grad:
                output.register_hook(backward)
                return None
            # Nothing upstream needs a gradient: start the graph here, with a leaf.
            leaf = output.detach().requires_grad_(True)
            self.leaves.append((leaf, backward))
            return leaf

        return forward_hook

    def _backward(self, slot: _Slot, module: nn.Module, x: torch.Tensor) -> Callable[[torch.Tensor], None]:
        acc = self.acc
        if isinstance(module, NORM_LAYERS):
            def norm_backward(grad: torch.Tensor) -> None:
                grad = grad.float()
                if slot.norm_weight is not None:
                    if isinstance(module, nn.GroupNorm):
                        x_hat = F.group_norm(x.float(), module.num_groups, eps=module.eps)
                        per_row = (grad * x_hat).flatten(2).sum(2)
                    else:
                        x_hat = F.layer_norm(x.float(), module.normalized_shape, eps=module.eps)
                        per_row = (grad * x_hat).reshape(grad.shape[0], -1, *module.normalized_shape).sum(1)
                    acc.add_direct(slot.norm_weight, per_row)
                if slot.bias is not None:
                    acc.add_direct(slot.bias, _bias_rows(module, grad))
            return norm_backward

        block = self.blocks.get(slot.module_name)
        projected_input = None
        if block is not None:
            r_out, r_in = self.projection.factors(block, x.device)
            projected_input = (_conv_input(module, x.float(), r_in, block) if isinstance(module, nn.Conv2d)
                               else (x.float() @ r_in).reshape(x.shape[0], -1, block.k_in))

        def matrix_backward(grad: torch.Tensor) -> None:
            grad = grad.float()
            if block is not None:
                if isinstance(module, nn.Conv2d) and module.groups > 1:
                    groups = module.groups
                    dy = grad.reshape(grad.shape[0], groups, block.d_out // groups, -1)
                    dr = torch.einsum("ngol,gok->ngkl", dy, r_out.reshape(groups, block.d_out // groups, block.k_out))
                    # (B, c, g, k, L) x (B, c, g, j, L) -> (B, k, j): sum over timesteps, groups, positions.
                    dr = dr.reshape(acc.batch, -1, groups, block.k_out, dr.shape[-1])
                    xr = projected_input.reshape(acc.batch, -1, groups, block.k_in, dr.shape[-1])
                    acc.blocks[slot.module_name] += torch.einsum("bcgkl,bcgjl->bkj", dr, xr)
                elif isinstance(module, nn.Conv2d):
                    # R_out^T dY: (k_out, C_out) @ (N, C_out, L) -> (N, k_out, L), no copy of dY.
                    dr = torch.matmul(r_out.t(), grad.reshape(grad.shape[0], block.d_out, -1))
                    acc.blocks[slot.module_name].baddbmm_(_per_sample(dr, acc.batch),
                                                          _per_sample(projected_input, acc.batch).transpose(1, 2))
                else:
                    dr = (grad @ r_out).reshape(acc.batch, -1, block.k_out)
                    xr = projected_input.reshape(acc.batch, -1, block.k_in)
                    acc.blocks[slot.module_name].baddbmm_(dr.transpose(1, 2), xr)
            if slot.bias is not None:
                acc.add_direct(slot.bias, _bias_rows(module, grad))
        return matrix_backward


def _per_sample(rows: torch.Tensor, batch: int) -> torch.Tensor:
    """(B * c, k, L) rows of (sample, timestep) -> (B, k, c * L): the chunk's timesteps side by side."""
    count = rows.shape[0] // batch
    if count == 1:
        return rows
    return rows.reshape(batch, count, *rows.shape[1:]).transpose(1, 2).reshape(batch, rows.shape[1], -1)


def _bias_rows(module: nn.Module, grad: torch.Tensor) -> torch.Tensor:
    """A bias's gradient per row: dY summed over positions. Channels last for Linear / LayerNorm,
    dim 1 for Conv2d / GroupNorm."""
    if isinstance(module, (nn.Conv2d, nn.GroupNorm)):
        return grad.flatten(2).sum(2)
    if isinstance(module, nn.LayerNorm):
        return grad.reshape(grad.shape[0], -1, *module.normalized_shape).sum(1)
    return grad.reshape(grad.shape[0], -1, grad.shape[-1]).sum(1)


def _conv_input(module: nn.Conv2d, x: torch.Tensor, r_in: torch.Tensor, block: LayerBlock) -> torch.Tensor:
    """X^T R_in at every output position of a conv: (N, groups * k_in, L), the im2col patches of
    each group times R_in, computed as a convolution with R_in as kernel (no patches formed)."""
    c_per_group = module.in_channels // module.groups
    kernel = r_in.t().reshape(block.k_in, c_per_group, *module.kernel_size).repeat(module.groups, 1, 1, 1)
    padding = module.padding
    if module.padding_mode != "zeros":
        x = F.pad(x, module._reversed_padding_repeated_twice, mode=module.padding_mode)
        padding = 0
    out = F.conv2d(x, kernel, None, module.stride, padding, module.dilation, module.groups)
    return out.flatten(2)


@FEATURE_COMPUTERS.register("factored")
class FactoredGradientProjection(FeatureComputer):
    """phi = P^T (1/K) sum_t grad f with P block-diagonal in per-layer Kronecker factors (see the
    module docstring): one batched forward/backward per timestep chunk, no per-sample gradients.

    Memory ~ B * timestep_chunk activations, independent of p. Column groups: one per layer
    weight (named by the weight), then "direct" (biases and norm weights).
    """

    #: k changes the matrices (the featurizer keeps k in the cache key only when the projector
    #: setting asks for it: see ``__init__``).
    key_settings = ("projection_dim",)

    def __init__(self, task: DiffusionTask, settings, param_names: Sequence[str], timesteps: Sequence[int]) -> None:
        super().__init__(task, settings, param_names, timesteps)
        if "projection_dim" not in PROJECTORS.get(settings.projector).key_settings:
            # The cache key keeps k only for projectors that depend on it; this computer always does.
            raise FactoredError(f"the factored computer draws its own projections, so k must stay in the feature "
                                f"cache key; projector {settings.projector!r} drops it: leave --projector at its "
                                "default (sjlt)")
        k, p = settings.projection_dim, self.num_parameters
        if k > p:
            raise FactoredError(f"projection dimension k={k} exceeds the number of selected gradient coordinates "
                                f"p={p}; choose k <= {p}")
        self.projection = FactoredProjection(task.denoiser, self.param_names, k, settings.seed)
        self.output_fn = get_output_function(settings.output_fn)

    @property
    def feature_dim(self) -> int:
        return self.projection.output_dim

    def groups(self) -> list[FeatureGroup]:
        return self.projection.groups()

    def describe(self) -> dict:
        return {**super().describe(), "layers": len(self.projection.blocks),
                "direct_size": self.projection.direct_size, "direct_dim": self.projection.direct_dim,
                "blocks": {b.param: [b.k_out, b.k_in] for b in self.projection.blocks}}

    def compute(self, inputs: DiffusionInputs, noise: torch.Tensor) -> torch.Tensor:
        x0 = inputs.x0
        batch = x0.shape[0]
        if x0.dim() < 2 or noise.shape[:1] != x0.shape[:1] or noise.shape[2:] != x0.shape[1:]:
            raise ValueError(f"noise of shape {tuple(noise.shape)} does not fit inputs of shape "
                             f"{tuple(x0.shape)}; expected (B, K, *input_shape)")
        if noise.shape[1] != len(self.timesteps):
            raise ValueError(f"noise has {noise.shape[1]} timesteps but {len(self.timesteps)} were given")
        device = x0.device
        noise = noise.to(device)
        acc = _Accumulator(self.projection, batch, device)
        chunk = max(1, self.settings.timestep_chunk)
        all_steps = torch.as_tensor(self.timesteps, dtype=torch.long, device=device)
        with _no_parameter_gradients(self.task.denoiser):
            for start in range(0, len(self.timesteps), chunk):
                self._chunk(inputs, noise[:, start:start + chunk], all_steps[start:start + chunk], acc)
        scale = 1.0 / len(self.timesteps)
        columns = [acc.blocks[b.module].reshape(batch, -1) * scale for b in self.projection.blocks]
        if self.projection.direct_dim:
            flat = torch.cat([acc.direct[n].reshape(batch, -1) if n in acc.direct
                              else torch.zeros(batch, self.task.denoiser.get_parameter(n).numel(), device=device)
                              for n in self.projection.direct_names], dim=1)
            columns.append(self.projection.project_direct(flat * scale))
        return torch.cat(columns, dim=1)

    def _chunk(self, inputs: DiffusionInputs, eps: torch.Tensor, steps: torch.Tensor, acc: _Accumulator) -> None:
        """One batched forward/backward of the B x c (sample, timestep) rows, row b * c + i."""
        batch, count = eps.shape[:2]
        rows = batch * count
        schedule = self.task.schedule.to(eps.device)
        # Detached: the graph must start at the hooked layers (see _Hooks), nowhere else.
        x0 = inputs.x0.detach().unsqueeze(1).expand(eps.shape).reshape(rows, *eps.shape[2:])
        eps = eps.detach().reshape(rows, *eps.shape[2:])
        t = steps.repeat(batch)
        condition = (inputs.condition.detach().repeat_interleave(count, dim=0) if inputs.condition is not None
                     else None)
        x_t = schedule.add_noise(x0, eps, t)
        dtype = DTYPES[self.settings.dtype]
        autocast = torch.autocast(device_type=eps.device.type, dtype=dtype) if dtype is not None else nullcontext()
        hooks = _Hooks(self.projection, acc, rows)
        hooks.attach()
        try:
            with torch.enable_grad():
                with autocast:
                    raw = self.task.denoise(x_t, t, condition)
                eps_pred = self.task.prediction.to_epsilon(raw.float(), x_t, t, schedule)
                total = vmap(lambda e, n, s: self.output_fn(e, n, s, schedule))(eps_pred, eps, t).sum()
        finally:
            hooks.detach()
        if not hooks.leaves or not total.requires_grad:
            return  # no selected layer ran: the features of this chunk are zero
        leaves = [leaf for leaf, _ in hooks.leaves]
        for (_, backward), grad in zip(hooks.leaves, torch.autograd.grad(total, leaves, allow_unused=True)):
            if grad is not None:
                backward(grad)
