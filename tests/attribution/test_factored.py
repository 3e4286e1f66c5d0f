"""The layer-factored feature computer (``attribution/factored.py``).

The reference for exactness is built independently of the hooks: vmap per-sample gradients
(``per_sample_gradients``) times the explicit projection matrix, kron(R_out, R_in) per layer
weight and the dense direct matrix for biases and norm weights. Models: the tiny UNet2DModel
(conv, linear, self-attention, GroupNorm, biases), a tiny UNet2DConditionModel (cross-attention,
LayerNorm, GEGLU), peft LoRA on its attention projections, and a toy net whose conv has stride,
dilation, groups and reflect padding.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from dtrak_core.attribution.factored import (BLOCK_IN, BLOCK_OUT, DIRECT_GROUP, FactoredError,
                                             FactoredGradientProjection)
from dtrak_core.attribution.featurizer import Featurizer, FeatureSettings
from dtrak_core.attribution.gradients import per_sample_gradients
from dtrak_core.attribution.timesteps import batch_noise
from dtrak_core.models import UNET_PRESETS, make_scheduler
from dtrak_core.tasks import Batch, DiffusionInputs, UnconditionalPixelTask

torch.set_num_threads(1)


class CrossAttentionTask(UnconditionalPixelTask):
    """A UNet2DConditionModel on pixels; the condition is the encoder hidden states (B, seq, dim)."""

    pipeline_class = "TestCrossAttentionPipeline"

    def denoise(self, x_t, t, condition, state=None):
        kwargs = {"encoder_hidden_states": condition, "return_dict": False}
        if state is None:
            return self.denoiser(x_t, t, **kwargs)[0]
        return torch.func.functional_call(self.denoiser, dict(state), (x_t, t), kwargs)[0]


class ToyNet(nn.Module):
    """Conv layers with stride, dilation, groups and reflect padding; a Linear on (B, tokens, d); norms."""

    def __init__(self) -> None:
        super().__init__()
        self.config = SimpleNamespace(sample_size=8, in_channels=4)
        self.conv_a = nn.Conv2d(4, 6, 3, stride=2, padding=2, dilation=2, groups=2)
        self.norm = nn.GroupNorm(3, 6)
        self.conv_b = nn.Conv2d(6, 6, 3, padding=1, padding_mode="reflect", bias=False)
        self.token = nn.Linear(6, 5)
        self.layer_norm = nn.LayerNorm(5)
        self.up = nn.Conv2d(5, 4, 1)

    def forward(self, x, t, return_dict=False):
        h = torch.tanh(self.norm(self.conv_a(x))) + t.float().view(-1, 1, 1, 1) / 1000
        h = torch.nn.functional.silu(self.conv_b(h))
        tokens = self.layer_norm(self.token(h.flatten(2).transpose(1, 2)))  # (B, 16, 5)
        h = tokens.transpose(1, 2).reshape(x.shape[0], 5, 4, 4)
        return (torch.nn.functional.interpolate(self.up(h), size=x.shape[-2:]),)


def cross_attention_unet(lora: bool = False) -> nn.Module:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
                                block_out_channels=(8, 16), norm_num_groups=4, cross_attention_dim=12,
                                attention_head_dim=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    if lora:
        from peft import LoraConfig, inject_adapter_in_model

        # init_lora_weights=False: B random too, so the gradients of A are not zero.
        unet = inject_adapter_in_model(LoraConfig(r=2, lora_alpha=4, init_lora_weights=False,
                                                  target_modules=["to_q", "to_k", "to_v", "to_out.0"]), unet)
    return unet.eval()


def reference_features(computer: FactoredGradientProjection, grads: dict[str, torch.Tensor]) -> torch.Tensor:
    """Explicit P^T g: kron(R_out, R_in) per layer weight, biases and norm weights as they are, then
    the mixing projector's dense matrix (none for the identity)."""
    projection = computer.projection
    columns = []
    for block in projection.blocks:
        r_out, r_in = projection.factors(block)
        g = grads[block.param].reshape(len(grads[block.param]), -1)
        columns.append(g.double() @ torch.kron(r_out, r_in).double())
    columns += [grads[n].reshape(len(grads[n]), -1).double() for n in projection.direct_names]
    z = torch.cat(columns, 1)
    mixer = projection.mixer
    return z if mixer.kind == "identity" else z @ mixer.matrix().double()


def factored_and_reference(task, settings: FeatureSettings, batch: Batch):
    featurizer = Featurizer.create(task, settings)
    computer = featurizer.computer
    inputs, noise = featurizer._inputs_and_noise(batch)
    features = computer.compute(inputs, noise)
    grads = per_sample_gradients(task, featurizer.param_names, inputs, noise, featurizer.timesteps,
                                 computer.output_fn, timestep_chunk=10)
    return features, reference_features(computer, grads), computer


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b).norm(dim=1) / b.norm(dim=1)).max().item()


def images(n: int, size: int, channels: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, channels, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def settings(**changes) -> FeatureSettings:
    base = dict(computer="factored", num_timesteps=4, projection_dim=256, device="cpu", timestep_chunk=3)
    return FeatureSettings(**{**base, **changes})


@pytest.mark.parametrize("output_fn,projector", [("square", "sjlt"), ("loss", "sjlt"), ("square", "identity")])
def test_unet_with_attention_equals_the_kronecker_projection_of_vmap_gradients(output_fn, projector):
    # Conv, linear (time embedding, attention q/k/v/out), GroupNorm and biases; 4 timesteps in chunks of 3.
    unet = UNET_PRESETS["tiny"].build(image_size=16, seed=0).eval()
    task = UnconditionalPixelTask(unet, make_scheduler())
    features, reference, computer = factored_and_reference(task, settings(output_fn=output_fn, projector=projector),
                                                           Batch(images(3, 16), [0, 1, 2]))
    kinds = {type(unet.get_submodule(b.module)).__name__ for b in computer.projection.blocks}
    assert kinds == {"Conv2d", "Linear"}
    assert any(".to_q." in b.param for b in computer.projection.blocks)
    assert any("norm" in n for n in computer.projection.direct_names)
    assert any(n.endswith(".bias") for n in computer.projection.direct_names)
    k = 256 if projector == "sjlt" else computer.projection.intermediate_dim
    assert features.shape == (3, k) and computer.feature_dim == k
    assert relative_error(features, reference) < 1e-5


def test_cross_attention_unet_equals_the_kronecker_projection_of_vmap_gradients():
    task = CrossAttentionTask(cross_attention_unet(), make_scheduler())
    condition = torch.randn(2, 5, 12, generator=torch.Generator().manual_seed(1))
    batch = Batch(images(2, 8), [3, 4])
    featurizer = Featurizer.create(task, settings(projection_dim=512))
    inputs = DiffusionInputs(batch.images, condition, [3, 4])
    noise = batch_noise(0, [3, 4], featurizer.timesteps, (3, 8, 8))
    features = featurizer.computer.compute(inputs, noise)
    grads = per_sample_gradients(task, featurizer.param_names, inputs, noise, featurizer.timesteps,
                                 featurizer.computer.output_fn)
    names = [b.param for b in featurizer.computer.projection.blocks]
    assert any("attn2.to_k" in n for n in names) and any("ff.net.0.proj" in n for n in names)
    assert any("norm1.weight" in n for n in featurizer.computer.projection.direct_names)  # LayerNorm
    assert relative_error(features, reference_features(featurizer.computer, grads)) < 1e-5
    # The condition is part of the sample: another caption changes that sample's row only.
    other = DiffusionInputs(batch.images, torch.cat([condition[:1], -condition[1:]]), [3, 4])
    changed = featurizer.computer.compute(other, noise)
    assert torch.equal(changed[0], features[0]) and (changed[1] - features[1]).abs().max() > 0


def test_lora_weights_equal_the_kronecker_projection_of_vmap_gradients():
    task = CrossAttentionTask(cross_attention_unet(lora=True), make_scheduler())
    condition = torch.randn(2, 5, 12, generator=torch.Generator().manual_seed(2))
    featurizer = Featurizer.create(task, settings(params="lora", projection_dim=128))
    computer = featurizer.computer
    # LoRA A and B are the Linear layers inside peft's wrappers; no biases, so no direct group.
    assert computer.param_names and all("lora_" in n for n in computer.param_names)
    assert len(computer.projection.blocks) == len(computer.param_names) and computer.projection.direct_size == 0
    inputs = DiffusionInputs(images(2, 8), condition, [0, 1])
    noise = batch_noise(0, [0, 1], featurizer.timesteps, (3, 8, 8))
    grads = per_sample_gradients(task, featurizer.param_names, inputs, noise, featurizer.timesteps, computer.output_fn)
    assert relative_error(computer.compute(inputs, noise), reference_features(computer, grads)) < 1e-5


def test_strided_dilated_grouped_reflect_padded_conv_and_token_linear_are_exact():
    task = UnconditionalPixelTask(ToyNet(), make_scheduler())
    features, reference, computer = factored_and_reference(task, settings(projection_dim=64, timestep_chunk=2),
                                                           Batch(images(3, 8, channels=4), [5, 6, 7]))
    assert [b.param for b in computer.projection.blocks] == ["conv_a.weight", "conv_b.weight", "token.weight",
                                                              "up.weight"]
    assert relative_error(features, reference) < 1e-5


def test_rows_do_not_depend_on_the_batch_neighbours():
    unet = UNET_PRESETS["tiny"].build(image_size=16, seed=0).eval()
    featurizer = Featurizer.create(UnconditionalPixelTask(unet, make_scheduler()), settings())
    x = images(3, 16, seed=4)
    phi = featurizer.featurize(Batch(x, [10, 11, 12]))
    swapped = featurizer.featurize(Batch(x[[1, 0, 2]], [11, 10, 12]))
    alone = featurizer.featurize(Batch(x[2:], [12]))
    torch.testing.assert_close(torch.from_numpy(swapped), torch.from_numpy(phi[[1, 0, 2]]), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(torch.from_numpy(alone[0]), torch.from_numpy(phi[2]), rtol=1e-5, atol=1e-7)


def test_blocks_are_capped_and_uncompressed_sides_are_the_identity():
    unet = UNET_PRESETS["tiny"].build(image_size=16, seed=0).eval()
    featurizer = Featurizer.create(UnconditionalPixelTask(unet, make_scheduler()), settings(projection_dim=300))
    projection = featurizer.computer.projection
    for block in projection.blocks:
        assert (block.k_out, block.k_in) == (min(block.d_out, BLOCK_OUT), min(block.d_in, BLOCK_IN))
        r_out, r_in = projection.factors(block)
        assert r_out.shape == (block.d_out, block.k_out) and r_in.shape == (block.d_in, block.k_in)
        if block.k_out == block.d_out:
            assert torch.equal(r_out, torch.eye(block.d_out))
    conv_in = projection.blocks[0]
    assert (conv_in.param, conv_in.d_out, conv_in.d_in) == ("conv_in.weight", 8, 27)
    assert projection.intermediate_dim == sum(b.size for b in projection.blocks) + projection.direct_size


def test_groups_and_cache_key():
    unet = UNET_PRESETS["tiny"].build(image_size=16, seed=0).eval()
    task = UnconditionalPixelTask(unet, make_scheduler())
    mixed = Featurizer.create(task, settings(projection_dim=300)).computer
    assert [(g.name, g.start, g.stop) for g in mixed.groups()] == [("all", 0, 300)]
    # Without mixing, every layer's block is its own group, then the biases and norm weights.
    blocks = Featurizer.create(task, settings(projector="identity")).computer
    groups = blocks.groups()
    assert groups[0].name == "conv_in.weight" and groups[-1].name == DIRECT_GROUP
    assert groups[0].start == 0 and groups[-1].stop == blocks.feature_dim == blocks.projection.intermediate_dim
    assert all(a.stop == b.start for a, b in zip(groups, groups[1:]))
    key = settings(projection_dim=300).key_fields()
    assert key["computer"] == "factored" and key["projection_dim"] == 300 and key["sparsity"] == 4
    described = mixed.describe()
    assert described["layers"] == len(groups) - 1 and described["feature_dim"] == 300
    assert described["projector"]["kind"] == "sjlt"


def test_unsupported_layers_are_refused_by_name():
    class WithEmbedding(ToyNet):
        def __init__(self):
            super().__init__()
            self.table = nn.Embedding(3, 4)

    task = UnconditionalPixelTask(WithEmbedding(), make_scheduler())
    with pytest.raises(FactoredError, match=r"^parameter 'table\.weight' belongs to a module of type Embedding; the factored "
                                            r"computer handles the weights and biases of Linear and Conv2d"):
        Featurizer.create(task, settings(projection_dim=16))

    class WithBatchNorm(ToyNet):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm2d(4, track_running_stats=False)

    with pytest.raises(FactoredError, match=r"^module 'bn' is a BatchNorm2d that normalises with batch statistics"):
        Featurizer.create(UnconditionalPixelTask(WithBatchNorm(), make_scheduler()), settings(projection_dim=16))


def test_a_layer_that_sees_a_shared_input_is_refused():
    class SharedInput(ToyNet):
        def __init__(self):
            super().__init__()
            self.bias_net = nn.Linear(2, 4)

        def forward(self, x, t, return_dict=False):
            # One row for the whole batch: its gradient cannot be split per sample.
            return (x + self.bias_net(torch.ones(1, 2)).view(1, 4, 1, 1),)

    featurizer = Featurizer.create(UnconditionalPixelTask(SharedInput(), make_scheduler()),
                                   settings(projection_dim=8, params="bias_net"))
    with pytest.raises(FactoredError, match=r"^module 'bias_net' saw a batch of 1 rows, not the 6 "):
        featurizer.featurize(Batch(images(2, 8, channels=4), [0, 1]))


def test_a_k_above_the_intermediate_dimension_is_refused():
    unet = UNET_PRESETS["tiny"].build(image_size=16, seed=0).eval()
    task = UnconditionalPixelTask(unet, make_scheduler())
    with pytest.raises(FactoredError, match=r"^projection dimension k=200 exceeds the factored computer's "
                                            r"intermediate dimension m=136 \(Kronecker blocks of at most 64 x 16 "
                                            r"per layer, plus biases and norm weights\); choose k <= 136$"):
        Featurizer.create(task, settings(projection_dim=200, params="re:^conv_in"))


def test_projection_is_a_function_of_seed_and_shapes_and_preserves_norms_on_average():
    unet = UNET_PRESETS["tiny"].build(image_size=16, seed=0).eval()
    task = UnconditionalPixelTask(unet, make_scheduler())
    a = Featurizer.create(task, settings(projection_dim=512)).computer.projection
    b = Featurizer.create(task, settings(projection_dim=512)).computer.projection
    c = Featurizer.create(task, settings(projection_dim=512, seed=1)).computer.projection
    block = next(blk for blk in a.blocks if blk.k_in < blk.d_in)
    assert all(torch.equal(x, y) for x, y in zip(a.factors(block), b.factors(block)))
    assert not torch.equal(a.factors(block)[1], c.factors(block)[1])
    assert torch.equal(a.mixer.matrix(), b.mixer.matrix()) and not torch.equal(a.mixer.matrix(), c.mixer.matrix())
    # E |P^T g|^2 = |g|^2: both factors have i.i.d. entries of variance 1/k (their column count).
    factors = [f for blk in a.blocks for f in a.factors(blk) if f.numel() >= 1000 and f.shape[0] != f.shape[1]]
    assert len(factors) >= 3
    for factor in factors:
        assert math.isclose(factor.pow(2).mean().item() * factor.shape[1], 1.0, rel_tol=0.15)


def test_speed_benchmark_reports_each_row_against_the_training_step(tiny_model_dir):
    from dtrak_core.factored_bench import bench_speed

    report = bench_speed(tiny_model_dir, tiny_model_dir.parent / "data", batch_size=2, num_timesteps=2,
                         projection_dim=64, timestep_chunk=1, rounds=1, blocks=((64, 16), (8, 8)))
    rows = {row["row"]: row for row in report["rows"]}
    assert list(rows) == ["training step", "factored 64x16, chunk 1", "factored 8x8, chunk 1",
                          "per-sample gradients + sjlt (default), chunk 10"]
    assert rows["training step"]["x_step_per_timestep_cpu"] == 1.0
    assert all(row["cpu_s_per_sample"] > 0 and row["x_step_per_timestep_wall"] > 0 for row in rows.values())
    assert report["intermediate_dim 8x8"] < report["intermediate_dim 64x16"] and report["num_parameters"] > 0
