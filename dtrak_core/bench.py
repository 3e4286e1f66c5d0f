"""Benchmarks: what a D-TRAK feature costs next to a training step.

``bench_featurize`` times, per sample and as the median of ``repeats`` runs:

- a plain batched training step (forward, backward, AdamW step on a batch; divided by batch size),
- the per-sample timestep-averaged gradients (K timesteps, torch.func vmap),
- the projection of those gradients, for each projector,
- attributing one new target against cached features (featurize it + score with a kernel
  decomposed beforehand; the one-off decomposition is timed separately),

plus peak memory (``ru_maxrss`` of the process; ``torch.cuda.max_memory_allocated`` on a GPU).
It writes ``<name>.json`` and ``<name>.md`` under ``docs/benchmarks/`` with machine info and
the command line.

The ``bench`` subcommand of ``python -m dtrak_core`` lives here too (:func:`add_subcommand`,
registered by ``dtrak_core.cli``): this module builds on ``dtrak_core.attribution``, never the
other way round.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import diffusers
import numpy as np
import torch

from dtrak_core.attribution.feature_store import StaleFeaturesError
from dtrak_core.attribution.featurizer import DEVICES, Featurizer, FeatureSettings, resolve_device
from dtrak_core.attribution.loading import load_dataset_for, load_model
from dtrak_core.attribution.projectors import PROJECTORS, make_projector
from dtrak_core.attribution.scorers import KernelScorer
from dtrak_core.conventions import DEFAULT_NUM_TIMESTEPS, DEFAULT_PROJECTION_DIM
from dtrak_core.datasets.imagefolder import DatasetError
from dtrak_core.io import atomic_path, write_json_atomic
from dtrak_core.models import ModelError
from dtrak_core.paths import REPO_ROOT
from dtrak_core.tasks import Batch, DiffusionTask

BENCH_DIR = REPO_ROOT / "docs" / "benchmarks"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_time(fn: Callable[[], object], repeats: int, device: torch.device) -> tuple[float, object]:
    """Median wall time of ``repeats`` calls after one warm-up call; returns (seconds, last result)."""
    result = fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def _peak_memory_mb(device: torch.device) -> dict:
    # ru_maxrss is in KiB on Linux (bytes on macOS).
    scale = 1 / 1024 if platform.system() != "Darwin" else 1 / 2**20
    info = {"process_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale, 1)}
    if device.type == "cuda":
        info["cuda_peak_allocated_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return info


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def machine_info(device: torch.device) -> dict:
    """Where a benchmark ran; call it before the benchmark so the load average is other work's."""
    info = {"platform": platform.platform(), "python": platform.python_version(),
            "processor": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "diffusers": diffusers.__version__, "device": str(device),
            # Other work on the machine slows every row alike; the load says how busy it was.
            "load_average_1min": round(os.getloadavg()[0], 2)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _train_step_fn(task: DiffusionTask, images: torch.Tensor, device: torch.device) -> Callable:
    """One batched training step (forward, backward, AdamW) on a copy of the task's denoiser."""
    task = task.with_denoiser(copy.deepcopy(task.denoiser).to(device).train())
    for p in task.denoiser.parameters():
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(task.denoiser.parameters(), lr=1e-4)
    generator = torch.Generator(device="cpu").manual_seed(0)
    inputs = task.prepare(Batch(images, list(range(len(images)))))
    schedule = task.schedule.to(device)

    def step() -> float:
        t = torch.randint(0, task.num_train_timesteps, (len(inputs),), generator=generator).to(device)
        eps = torch.randn(inputs.x0.shape, generator=generator).to(device)
        x_t = schedule.add_noise_as_trained(inputs.x0, eps, t)
        target = task.training_target(inputs.x0, eps, t)
        loss = torch.nn.functional.mse_loss(task.denoise(x_t, t, inputs.condition), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.item()

    return step


def bench_featurize(
    model_dir: str | Path,
    data_dir: str | Path,
    num_samples: int = 32,
    batch_size: int = 16,
    num_timesteps: int = DEFAULT_NUM_TIMESTEPS,
    projection_dim: int = DEFAULT_PROJECTION_DIM,
    projectors: Sequence[str] = ("sjlt", "rademacher"),
    repeats: int = 3,
    device: str = "auto",
    out_dir: str | Path | None = None,
    name: str | None = None,
    command: str | None = None,
) -> dict:
    """Time featurization against a training step; write JSON + Markdown; return the report dict.

    Times are seconds per sample (median of ``repeats`` after one warm-up); the "one target"
    row is seconds for one new target against ``num_samples`` cached train features.
    """
    if num_samples < 1 or batch_size < 1 or repeats < 1:
        raise ValueError(f"num_samples={num_samples}, batch_size={batch_size} and repeats={repeats} "
                         "must all be at least 1")
    dev = resolve_device(device)
    model = load_model(model_dir)
    dataset = load_dataset_for(model, data_dir)
    n = min(num_samples, len(dataset))
    images = dataset.to_tensor(range(n))
    ids = list(range(n))
    batch = images[:batch_size]

    report: dict = {"model_dir": str(model_dir), "data_dir": str(data_dir), "num_samples": n,
                    "batch_size": batch_size, "num_timesteps": num_timesteps,
                    "projection_dim": projection_dim, "repeats": repeats,
                    "machine": machine_info(dev), "command": command, "rows": []}

    _reset_peak(dev)
    step = _train_step_fn(model.task, batch, dev)
    seconds, _ = _median_time(step, repeats, dev)
    report["rows"].append({"stage": "training step (batched fwd+bwd+AdamW)",
                           "seconds_per_sample": seconds / len(batch), **_peak_memory_mb(dev)})

    base = FeatureSettings(num_timesteps=num_timesteps, projection_dim=projection_dim,
                           batch_size=batch_size, device=str(dev.type))
    featurizer = Featurizer.create(model.task.with_denoiser(copy.deepcopy(model.unet)), base)
    report["num_parameters"] = featurizer.num_parameters
    _reset_peak(dev)

    def all_gradients() -> list:
        return [featurizer.gradients(images[a:a + batch_size], ids[a:a + batch_size])
                for a in range(0, n, batch_size)]

    seconds, grads = _median_time(all_gradients, repeats, dev)
    report["rows"].append({"stage": f"per-sample gradients, K={num_timesteps} (vmap)",
                           "seconds_per_sample": seconds / n, **_peak_memory_mb(dev)})

    features = None
    for kind in projectors:
        k = featurizer.num_parameters if kind == "identity" else projection_dim
        projector = make_projector(kind, featurizer.num_parameters, k, 0, featurizer.param_names)
        _reset_peak(dev)
        seconds, projected = _median_time(lambda: [projector.project(g) for g in grads], repeats, dev)
        report["rows"].append({"stage": f"projection {kind} p={featurizer.num_parameters} -> k={k}",
                               "seconds_per_sample": seconds / n, **_peak_memory_mb(dev)})
        if kind == base.projector:
            features = torch.cat(projected).cpu().numpy()
    if features is None:
        features = np.concatenate([featurizer.projector.project(g).cpu().numpy() for g in grads])

    start = time.perf_counter()
    kernel = KernelScorer(features)
    report["rows"].append({"stage": f"kernel decomposition of {n} cached features (one-off)",
                           "seconds_total": time.perf_counter() - start, **_peak_memory_mb(dev)})
    target = images[:1]
    seconds, _ = _median_time(lambda: kernel.scores(featurizer.featurize_batch(target, [1 << 40]), 100.0),
                              repeats, dev)
    report["rows"].append({"stage": f"attribute one new target ({base.projector}) against {n} cached features",
                           "seconds_total": seconds, **_peak_memory_mb(dev)})
    train_step = report["rows"][0]["seconds_per_sample"]
    for row in report["rows"]:
        if "seconds_per_sample" in row:
            row["x_training_step"] = round(row["seconds_per_sample"] / train_step, 2)
    # The gradients do K forward/backward passes per sample; per pass they compare with one step.
    report["rows"][1]["x_training_step_per_timestep"] = round(
        report["rows"][1]["seconds_per_sample"] / num_timesteps / train_step, 2)

    out_dir = Path(out_dir) if out_dir is not None else BENCH_DIR
    name = name or f"featurize-{Path(model_dir).name}-{dev.type}"
    json_path, md_path = out_dir / f"{name}.json", out_dir / f"{name}.md"
    report["paths"] = {"json": str(json_path), "markdown": str(md_path)}
    write_json_atomic(json_path, report)
    with atomic_path(md_path) as tmp:
        tmp.write_text(render_markdown(report))
    return report


def render_markdown(report: dict) -> str:
    m = report["machine"]
    lines = [
        f"# Featurization benchmark: {Path(report['model_dir']).name}",
        "",
        f"Command: `{report.get('command') or 'bench_featurize(...)'}`",
        "",
        f"Machine: {m['platform']}, {m['processor']}, {m['cpu_count']} CPUs ({m['torch_threads']} torch "
        f"threads{', 1-min load average ' + str(m['load_average_1min']) + ' before the run' if 'load_average_1min' in m else ''}), device {m['device']}{' (' + m['gpu'] + ')' if 'gpu' in m else ''}; torch {m['torch']}, "
        f"diffusers {m['diffusers']}.",
        "",
        f"Model parameters p = {report.get('num_parameters')}; {report['num_samples']} samples, batch "
        f"{report['batch_size']}, K = {report['num_timesteps']}, k = {report['projection_dim']}; median of "
        f"{report['repeats']} runs after a warm-up.",
        "",
        "| stage | s / sample | x training step | s total | peak RSS MB | peak CUDA MB |",
        "|---|---|---|---|---|---|",
    ]
    for row in report["rows"]:
        lines.append("| {} | {} | {} | {} | {} | {} |".format(
            row["stage"], f"{row['seconds_per_sample']:.4f}" if "seconds_per_sample" in row else "",
            row.get("x_training_step", ""), f"{row['seconds_total']:.4f}" if "seconds_total" in row else "",
            row.get("process_peak_rss_mb", ""), row.get("cuda_peak_allocated_mb", "")))
    per_pass = report["rows"][1].get("x_training_step_per_timestep")
    lines += ["", f"Featurizing one sample costs gradients + one projection. The gradients make K = "
              f"{report['num_timesteps']} forward/backward passes per sample: {per_pass}x a training "
              "step per pass. Process peak RSS is monotone over the run (it includes earlier stages). "
              "Timings on a shared machine are noisy; compare rows of one report.", ""]
    return "\n".join(lines)


def add_subcommand(subparsers: argparse._SubParsersAction) -> None:
    """Register ``bench`` (``python -m dtrak_core bench ...``) on a sub-parser group."""
    b = subparsers.add_parser("bench", help="time featurization against a plain training step",
                              description="Benchmark per-sample featurization (K timesteps) against a "
                              "batched training step, per projector; writes docs/benchmarks/.")
    b.add_argument("--model", required=True, type=Path)
    b.add_argument("--data", required=True, type=Path)
    b.add_argument("--num-samples", type=int, default=32)
    b.add_argument("--batch-size", type=int, default=16)
    b.add_argument("-K", "--num-timesteps", type=int, default=DEFAULT_NUM_TIMESTEPS)
    b.add_argument("-k", "--projection-dim", type=int, default=DEFAULT_PROJECTION_DIM)
    b.add_argument("--projectors", nargs="+", default=["sjlt", "rademacher"], choices=PROJECTORS.names())
    b.add_argument("--repeats", type=int, default=3)
    b.add_argument("--device", default="auto", choices=DEVICES)
    b.add_argument("--out-dir", type=Path, default=None, help="default docs/benchmarks")
    b.add_argument("--name", default=None, help="file stem of the report")
    b.set_defaults(func=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    """Run :func:`bench_featurize` with the parsed options; exit code 0, or 2 after one line on stderr."""
    try:
        report = bench_featurize(args.model, args.data, num_samples=args.num_samples,
                                 batch_size=args.batch_size, num_timesteps=args.num_timesteps,
                                 projection_dim=args.projection_dim, projectors=tuple(args.projectors),
                                 repeats=args.repeats, device=args.device, out_dir=args.out_dir,
                                 name=args.name, command=" ".join(sys.argv))
    except (ModelError, DatasetError, StaleFeaturesError, ValueError) as error:
        # The same errors, said the same way, as the other attribution commands.
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"benchmark written to {report['paths']['markdown']}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    print(json.dumps(machine_info(torch.device("cpu")), indent=2))
