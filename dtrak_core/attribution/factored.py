"""A layer-factored feature computer: Kronecker-projected per-sample gradients from hooks.

For a linear or convolutional layer Y = W X (+ b), a sample's gradient of its output function is
a sum over positions (tokens, pixels, timesteps) of outer products,

    G_b = sum_pos dY[b, pos] X[b, pos]^T          (d_out, d_in; conv: X = the im2col patch),

so its Kronecker-structured projection needs no per-sample gradient at all:

    z_layer[b] = vec( R_out^T G_b R_in ) = sum_pos (R_out^T dY[b, pos]) (X[b, pos]^T R_in)   (k_out, k_in),

with R_in (d_in, k_in) and R_out (d_out, k_out) i.i.d. N(0, 1/k_side) matrices drawn on the CPU from
(seed, layer name, side) (``seeds.feature_seed``), or the identity where the side is not
compressed (k_side = d_side), so E |z_layer|^2 = |G_b|^2. In row-major order
vec(R_out^T G R_in) = kron(R_out, R_in)^T vec(G).

Features, in two stages:

1. the intermediate z (B, m): every selected layer weight's Kronecker block, k_out = min(d_out, 64),
   k_in = min(d_in, 16) (:data:`BLOCK_OUT`, :data:`BLOCK_IN`), then the exact per-sample
   gradients of the parameters that are not a matrix (biases, GroupNorm / LayerNorm weights:
   a bias's is sum_pos dY, a norm weight's sum_pos dY * x_hat, cheap elementwise sums);
2. phi = S^T z with S the ``projector`` of the settings (m -> k; the sparse JL by default), so
   phi = P^T (1/K) sum_t grad f with P = blockdiag(kron(R_out, R_in), ..., I) S, one fixed matrix.

Why a global second stage rather than a share of k per layer: a layer's block is a JL sketch whose
error falls with its size, and a block-diagonal layout fixes each layer's share in advance, while
the gradient mass of a sample sits in a few layers. Mixing every block into all k columns spends
the columns where the mass is. Measured on the mini model's LDS build at k = 2048 (D-TRAK, K = 10,
validation LDS, projections of the same exact gradients; ``docs/benchmarks/factored.md``): a
single stage of per-layer Kronecker blocks sized to shares of k scored 29.8 (shares proportional
to sqrt(p_layer)), 36.4 (to p_layer) and 33.1 (equal), the two stages 41.5 +- 0.7 over five
projection seeds, the sparse JL of the whole gradient 43.4 +- 1.4. The block caps trade speed for
fidelity: the input side costs a convolution with k_in output channels per layer (on a CPU as
cheap at 16 as at 1, twice that at 32), the output side a small matmul of dY. 32 x 32 blocks
scored 42.9 +- 0.7 at 0.98-1.15x a training step per sample-timestep on the demo UNet (CPU time,
chunk 2), against 0.87-0.97x for 64 x 16; 64 x 64 scored 43.0 +- 0.7 and its input side is a
64-channel convolution per layer.

With ``projector="identity"`` the features are z itself (m columns; k is then ignored, as for
the per-sample-gradient computer) and :meth:`FactoredGradientProjection.groups` names every
layer's block and the "direct" group: block-wise use. With a mixing projector the columns mix
all layers: one group.

How it is computed (:meth:`FactoredGradientProjection.compute`): one batched forward of the
B * c noised copies of a timestep chunk (c = ``timestep_chunk``); forward hooks project each
layer input at once (X R_in: a matmul; for a conv, a convolution of the input with R_in
reshaped as a (k_in, C_in/groups, kh, kw) kernel: the im2col product with the layer's own
stride, padding, dilation, groups and padding mode, without forming the patches); then ONE
backward of sum_{b, t} f_b(t), in which a tensor hook on every layer output receives dY, projects
it and contracts the two over positions and the chunk's timesteps per sample. No parameter
requires a gradient (weight gradients are never formed), so the backward costs less than a
training step's. Summed over the chunks and divided by K, as the per-sample-gradient computer
does. Memory ~ B * c activations + B * m, independent of p beyond m.

Exactness needs the batched backward to give per-sample gradients: f_b depends on sample b's row
only. GroupNorm and LayerNorm normalise within a sample (fine); BatchNorm with batch statistics
couples the rows and is refused, as is a hooked layer that sees a batch other than the B * c rows
(an input shared across samples). Any other selected parameter (an embedding table, a bare
``nn.Parameter``, a layer whose ``forward`` is overridden) is refused with a one-line error
naming it: never silently dropped.
"""

from __future__ import annotations

import math
import threading
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
from torch import nn
from torch.func import vmap
from torch.nn import functional as F

from dtrak_core.attribution.feature_computers import DTYPES, FEATURE_COMPUTERS, FeatureComputer, FeatureGroup
from dtrak_core.attribution.output_functions import get_output_function
from dtrak_core.attribution.projectors import IdentityProjector, Projector, make_projector
from dtrak_core.seeds import feature_seed
from dtrak_core.tasks import DiffusionInputs, DiffusionTask

#: The largest output and input side of a layer's Kronecker block (see the module docstring).
BLOCK_OUT, BLOCK_IN = 64, 16
#: The name of the column group of the exact vectors (biases, norm weights) with ``projector="identity"``.
DIRECT_GROUP = "direct"
#: Layer types whose weight is a matrix the hooks factor, and norm layers handled directly.
MATRIX_LAYERS = (nn.Linear, nn.Conv2d)
NORM_LAYERS = (nn.GroupNorm, nn.LayerNorm)


class FactoredError(ValueError):
    """The model or the settings do not fit the factored computer; the message says which part."""


@dataclass(frozen=True)
class LayerBlock:
    """The Kronecker block of one layer's weight: intermediate columns [start, start + k_out * k_in).

    ``d_in`` is the weight's input side as a matrix: in_features, or C_in / groups * kh * kw.
    A side with k = d is not projected (identity).
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
    """The identity when cols == rows, else an i.i.d. N(0, 1/cols) matrix (rows, cols); float32
    CPU, a function of (seed, module, side, rows, cols) only."""
    if cols == rows:
        return torch.eye(rows)
    generator = torch.Generator(device="cpu").manual_seed(feature_seed("factored", seed, module, side, rows, cols))
    return torch.randn((rows, cols), generator=generator).mul_(1.0 / math.sqrt(cols))


@dataclass
class _Slot:
    """How one module's selected parameters enter the features."""

    module_name: str
    module: nn.Module
    weight: str | None = None  # a matrix layer's weight param name, when selected
    bias: str | None = None  # a bias (or norm bias) param name, kept exactly
    norm_weight: str | None = None  # a norm layer's weight param name, kept exactly


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
    """The factored computer's projection: per-layer Kronecker factors, then a projector m -> k.

    A function of the selected parameters' shapes, the projector settings and the seed only.
    Intermediate columns: the layer blocks in the order of their weights in ``param_names``, then
    the exact direct vectors (biases and norm weights in ``param_names`` order).
    """

    def __init__(self, model: nn.Module, param_names: Sequence[str], k: int, seed: int, projector: str = "sjlt",
                 sparsity: int = 4, block: tuple[int, int] = (BLOCK_OUT, BLOCK_IN)) -> None:
        self.slots = plan_slots(model, param_names)
        self.seed = int(seed)
        layers = [s for s in self.slots if s.weight is not None]
        sizes = {n: p.numel() for n, p in model.named_parameters()}
        weights = {s.weight for s in layers}
        self.direct_names = [n for n in param_names if n not in weights]
        self.blocks: list[LayerBlock] = []
        start = 0
        for slot in layers:
            d_out, d_in = matrix_dims(slot.module)
            layer = LayerBlock(slot.module_name, slot.weight, d_out, d_in, min(d_out, block[0]), min(d_in, block[1]),
                               start)
            self.blocks.append(layer)
            start += layer.size
        self.direct_start = start
        self.direct_size = sum(sizes[n] for n in self.direct_names)
        self.intermediate_dim = start + self.direct_size
        identity = projector == "identity"
        if not identity and k > self.intermediate_dim:
            raise FactoredError(f"projection dimension k={k} exceeds the factored computer's intermediate dimension "
                                f"m={self.intermediate_dim} (Kronecker blocks of at most {block[0]} x {block[1]} per "
                                f"layer, plus biases and norm weights); choose k <= {self.intermediate_dim}")
        # The mixing projector has its own seed, so it never repeats the per-sample-gradient projector's draws.
        self.mixer: Projector = make_projector(projector, self.intermediate_dim, k,
                                               feature_seed("factored", self.seed, "mix"), None, sparsity)
        self._factors: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def output_dim(self) -> int:
        return self.mixer.output_dim

    def factors(self, block: LayerBlock, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """(R_out (d_out, k_out), R_in (d_in, k_in)) of a layer, float32 on ``device`` (cached)."""
        key = (block.module, str(device))
        if key not in self._factors:
            self._factors[key] = (_kronecker_factor(self.seed, block.module, "out", block.d_out, block.k_out).to(device),
                                  _kronecker_factor(self.seed, block.module, "in", block.d_in, block.k_in).to(device))
        return self._factors[key]

    def groups(self) -> list[FeatureGroup]:
        """One group per layer block and "direct" when the features are the intermediate itself, else "all"."""
        if not isinstance(self.mixer, IdentityProjector):
            return [FeatureGroup("all", 0, self.output_dim)]
        groups = [FeatureGroup(b.param, b.start, b.start + b.size) for b in self.blocks]
        if self.direct_size:
            groups.append(FeatureGroup(DIRECT_GROUP, self.direct_start, self.intermediate_dim))
        return groups

    def intermediate(self, grads: dict[str, torch.Tensor]) -> torch.Tensor:
        """z (B, m) from ready per-sample gradients {name: (B, *shape)}: each block as R_out^T G R_in.

        A check of the hooks, and the first stage for gradients computed elsewhere; memory ~ B * p.
        """
        columns = []
        for block in self.blocks:
            g = grads[block.param].float()
            r_out, r_in = self.factors(block, g.device)
            g = g.reshape(g.shape[0], block.d_out, block.d_in)
            columns.append(torch.einsum("bod,ok,dj->bkj", g, r_out, r_in).reshape(g.shape[0], -1))
        for name in self.direct_names:
            columns.append(grads[name].float().reshape(grads[name].shape[0], -1))
        return torch.cat(columns, dim=1)

    def project_gradients(self, grads: dict[str, torch.Tensor]) -> torch.Tensor:
        """phi (B, k) = S^T z from ready per-sample gradients."""
        return self.mixer.project(self.intermediate(grads))


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
        # Hooks live on the model instance; a forward of the same instance in another thread
        # (another featurizer sharing the model) must pass through them untouched.
        self.thread = threading.get_ident()

    def attach(self) -> None:
        for slot in self.projection.slots:
            self.handles.append(slot.module.register_forward_hook(self._hook(slot)))

    def detach(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def _hook(self, slot: _Slot) -> Callable:
        def forward_hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
            if threading.get_ident() != self.thread:
                return None
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
            if isinstance(module, nn.Conv2d):
                projected_input = _conv_input(module, x.float(), r_in, block)
            else:
                x = x.float()
                projected_input = (x if block.k_in == block.d_in else x @ r_in).reshape(x.shape[0], -1, block.k_in)

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
                    dr = grad.reshape(grad.shape[0], block.d_out, -1)
                    if block.k_out != block.d_out:
                        dr = torch.matmul(r_out.t(), dr)
                    _contract(acc.blocks[slot.module_name], dr, projected_input)
                else:
                    dr = (grad if block.k_out == block.d_out else grad @ r_out).reshape(acc.batch, -1, block.k_out)
                    xr = projected_input.reshape(acc.batch, -1, block.k_in)
                    acc.blocks[slot.module_name].baddbmm_(dr.transpose(1, 2), xr)
            if slot.bias is not None:
                acc.add_direct(slot.bias, _bias_rows(module, grad))
        return matrix_backward


def _contract(block: torch.Tensor, dr: torch.Tensor, xr: torch.Tensor) -> None:
    """block (B, k_out, k_in) += sum over the chunk's timesteps and positions of dr xr^T.

    dr (B * c, k_out, L), xr (B * c, k_in, L), rows of (sample, timestep): one batched matmul per
    timestep of the chunk, on strided views (no copy of dY).
    """
    batch = block.shape[0]
    dr = dr.view(batch, -1, *dr.shape[1:])
    xr = xr.view(batch, -1, *xr.shape[1:])
    for i in range(dr.shape[1]):
        block.baddbmm_(dr[:, i], xr[:, i].transpose(1, 2))


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
    """phi = S^T z, z the per-layer Kronecker projections of the K-averaged gradients and the exact
    biases and norm weights (see the module docstring): one batched forward/backward per timestep
    chunk, no per-sample gradients. S is the settings' projector (m -> k).
    """

    key_settings = ()  # the projector declares its own key fields (k, s), as for the default computer

    def __init__(self, task: DiffusionTask, settings, param_names: Sequence[str], timesteps: Sequence[int]) -> None:
        super().__init__(task, settings, param_names, timesteps)
        self.projection = FactoredProjection(task.denoiser, self.param_names, settings.projection_dim, settings.seed,
                                             settings.projector, settings.sparsity)
        self.output_fn = get_output_function(settings.output_fn)

    @property
    def feature_dim(self) -> int:
        return self.projection.output_dim

    def groups(self) -> list[FeatureGroup]:
        return self.projection.groups()

    def describe(self) -> dict:
        return {**super().describe(), "layers": len(self.projection.blocks),
                "intermediate_dim": self.projection.intermediate_dim, "direct_size": self.projection.direct_size,
                "projector": self.projection.mixer.describe()}

    def intermediate(self, inputs: DiffusionInputs, noise: torch.Tensor) -> torch.Tensor:
        """z (B, m) = (1/K) sum over the timesteps of the per-layer blocks and the exact direct vectors."""
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
        columns = [acc.blocks[b.module].reshape(batch, -1) for b in self.projection.blocks]
        for name in self.projection.direct_names:
            # A parameter whose module never ran has a zero gradient.
            columns.append(acc.direct[name] if name in acc.direct else
                           torch.zeros(batch, self.task.denoiser.get_parameter(name).numel(), device=device))
        return torch.cat(columns, dim=1).mul_(1.0 / len(self.timesteps))

    def compute(self, inputs: DiffusionInputs, noise: torch.Tensor) -> torch.Tensor:
        return self.projection.mixer.project(self.intermediate(inputs, noise))

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
