"""Per-sample gradients of an output function, averaged over timesteps, with ``torch.func``.

For a batch of clean inputs x0 (B, *input_shape) of a diffusion task this computes, for every sample b and every
selected parameter tensor,

    g_b = (1/K) sum_{t in T_K} grad_theta f(eps_theta(x_t, t, c_b), eps_{b,t}, t),
    x_t = sqrt(abar_t) x0_b + sqrt(1 - abar_t) eps_{b,t},

with eps_theta the task's prediction in epsilon space and c_b the sample's condition (if any),
as ``vmap(grad(per_sample_objective))`` over the batch, where the per-sample objective runs
the denoiser once on the sample's K noised copies (a batch of K inside the vmap). Long timestep
lists are processed ``timestep_chunk`` at a time and summed, so memory grows with
B * timestep_chunk, not B * K.

Attention: diffusers' default processor calls the fused ``scaled_dot_product_attention``, which
has no vmap rule on some builds. :func:`make_vmap_friendly` sets every attention module of
*this model instance* to the plain ``AttnProcessor`` (softmax(QK^T/sqrt d) V with baddbmm), so
nothing global is patched. UNet2DModel has no ``set_attn_processor``, hence the module walk.
"""

from __future__ import annotations

import re
from contextlib import nullcontext
from typing import Callable, Mapping, Sequence

import torch
from torch.func import grad, vmap

from dtrak_core.attribution.output_functions import OutputFunction
from dtrak_core.tasks import DiffusionInputs, DiffusionTask

#: A parameter selection: "all", "lora" (names containing "lora"), "re:<regex>", or a substring.
ParamSpec = str


def make_vmap_friendly(model: torch.nn.Module) -> int:
    """Use the non-fused attention processor in every diffusers ``Attention`` of ``model``.

    Returns the number of attention modules changed. Numerically the same attention up to
    float rounding; only this instance is modified.
    """
    from diffusers.models.attention_processor import Attention, AttnProcessor

    changed = 0
    for module in model.modules():
        if isinstance(module, Attention):
            module.set_processor(AttnProcessor())
            changed += 1
    return changed


def select_parameters(model: torch.nn.Module, spec: ParamSpec = "all") -> list[str]:
    """Names of the parameters selected by ``spec``, in ``named_parameters`` order.

    ``"all"``: every parameter; ``"lora"``: names containing "lora" (case-insensitive, the
    peft/diffusers adapter convention); ``"re:<regex>"``: names matching ``re.search``;
    anything else: names containing that substring. Selecting nothing is an error.
    """
    names = [name for name, _ in model.named_parameters()]
    if spec == "all":
        chosen = names
    elif spec == "lora":
        chosen = [n for n in names if "lora" in n.lower()]
    elif spec.startswith("re:"):
        try:
            pattern = re.compile(spec[3:])
        except re.error as error:
            raise ValueError(f"parameter filter {spec!r} is not a valid regular expression: {error}") from None
        chosen = [n for n in names if pattern.search(n)]
    else:
        chosen = [n for n in names if spec in n]
    if not chosen:
        raise ValueError(f"parameter filter {spec!r} selects none of the model's {len(names)} "
                         f"parameters; expected 'all', 'lora', 're:<regex>' or a name substring "
                         f"(e.g. {names[0]!r})")
    return chosen


def per_sample_gradients(
    task: DiffusionTask,
    param_names: Sequence[str],
    inputs: DiffusionInputs,
    noise: torch.Tensor,
    timesteps: Sequence[int],
    output_fn: OutputFunction,
    timestep_chunk: int = 10,
    autocast_dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """Timestep-averaged per-sample gradients of ``output_fn``.

    Args:
        task: the model family; its denoiser in eval mode, already made vmap-friendly, and on
            the inputs' device. ``task.predict_epsilon`` gives the epsilon-space prediction f sees.
        param_names: the parameters to differentiate; the others are held fixed.
        inputs: x0 (B, *input_shape) on the model's device, condition (B, ...) or None, ids.
        noise: (B, K, *input_shape), noise[b, i] is eps for sample b at timesteps[i].
        timesteps: the K timesteps.
        output_fn: f(eps_pred, eps, t, schedule) -> scalar, see ``output_functions``.
        timestep_chunk: timesteps evaluated together per sample (memory ~ B * chunk).
        autocast_dtype: run the forward pass under ``torch.autocast`` with this dtype.

    Returns:
        name -> (B, *param.shape) float32 gradients, (1/K) sum_t grad f.
    """
    x0 = inputs.x0
    if x0.dim() < 2 or noise.shape[:1] != x0.shape[:1] or noise.shape[2:] != x0.shape[1:]:
        raise ValueError(f"noise of shape {tuple(noise.shape)} does not fit inputs of shape "
                         f"{tuple(x0.shape)}; expected (B, K, *input_shape)")
    if noise.shape[1] != len(timesteps):
        raise ValueError(f"noise has {noise.shape[1]} timesteps but {len(timesteps)} were given")
    device = x0.device
    model = task.denoiser
    selected = set(param_names)
    params = {n: p.detach() for n, p in model.named_parameters() if n in selected}
    frozen = {n: p.detach() for n, p in model.named_parameters() if n not in selected}
    frozen.update({n: b.detach() for n, b in model.named_buffers()})
    schedule = task.schedule.to(device)
    autocast = (torch.autocast(device_type=device.type, dtype=autocast_dtype)
                if autocast_dtype is not None else nullcontext())
    conditioned = inputs.condition is not None

    def make_objective(steps: torch.Tensor) -> Callable:
        apply_f = vmap(lambda e, n, t: output_fn(e, n, t, schedule))

        def objective(p: Mapping[str, torch.Tensor], x: torch.Tensor, eps: torch.Tensor,
                      condition: torch.Tensor | None) -> torch.Tensor:
            # x: (*input_shape), eps: (k, *input_shape) -> sum over the k timesteps of f.
            x_t = schedule.add_noise(x.expand_as(eps), eps, steps)
            if condition is not None:
                condition = condition.expand(len(steps), *condition.shape)
            with autocast:
                raw = task.denoise(x_t, steps, condition, {**frozen, **p})
            eps_pred = task.prediction.to_epsilon(raw.float(), x_t, steps, schedule)
            return apply_f(eps_pred, eps, steps).sum()

        return vmap(grad(objective), in_dims=(None, 0, 0, 0 if conditioned else None))

    total: dict[str, torch.Tensor] | None = None
    all_steps = torch.as_tensor(list(timesteps), dtype=torch.long, device=device)
    for start in range(0, len(timesteps), max(1, timestep_chunk)):
        stop = min(start + max(1, timestep_chunk), len(timesteps))
        grads = make_objective(all_steps[start:stop])(params, x0, noise[:, start:stop], inputs.condition)
        if total is None:
            total = {n: g.float() for n, g in grads.items()}
        else:
            for n, g in grads.items():
                total[n] += g.float()
    assert total is not None
    scale = 1.0 / len(timesteps)
    return {n: total[n].mul_(scale) for n in param_names}


def flatten_gradients(grads: Mapping[str, torch.Tensor], param_names: Sequence[str]) -> torch.Tensor:
    """Concatenate per-sample gradients into (B, p) in ``param_names`` order."""
    first = grads[param_names[0]]
    return torch.cat([grads[n].reshape(first.shape[0], -1) for n in param_names], dim=1)
