"""Benchmarks of the layer-factored feature computer (``attribution/factored.py``).

Three measurements, each printed as one JSON object (``docs/benchmarks/factored.md`` quotes them):

- ``speed``: a batched training step, the factored computer and the default computer
  (per-sample gradients + sparse JL) on the same batch, interleaved round by round so that load
  from other jobs hits all alike; per row the median over rounds of seconds per sample and of
  the ratio to the training step per sample-timestep (featurization / (K * step)), by the wall
  clock and by the process's CPU clock (the CPU clock ignores time spent waiting for a core on
  a shared machine; one torch thread).
- ``memory``: the peak resident memory of a fresh process that loads the model and featurizes
  one batch (one child process per configuration, so peaks do not mix); rows with different
  parameter selections show whether it grows with p.
- ``lds``: D-TRAK's LDS on an LDS build with each computer at equal k, end to end (features
  through the store into ``--feature-root``, scores over the build's lambda sweep, lambda
  chosen on the tuning subsets), with the paired difference and its CI; and ``seeds``: the
  spread over projection seeds from the same exact gradients (the per-sample gradients are
  computed once, unprojected, into ``--work-dir``; each seed's projections are applied to
  them), for the default projector and for Kronecker block caps.

This module builds on ``attribution`` and ``evaluation`` (it is not imported by either).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from dtrak_core.attribution.factored import BLOCK_IN, BLOCK_OUT, FactoredProjection
from dtrak_core.attribution.featurizer import Featurizer, FeatureSettings
from dtrak_core.attribution.loading import load_dataset_for, load_model, load_training_set
from dtrak_core.attribution.methods import get_method, score_targets
from dtrak_core.attribution.projectors import make_projector
from dtrak_core.attribution.scorers import KernelScorer
from dtrak_core.bench import _train_step_fn, machine_info
from dtrak_core.conventions import target_ids, uint8_to_model_range
from dtrak_core.evaluation.lds.config import TARGETS_DIR, read_build
from dtrak_core.evaluation.lds.outputs import load_outputs
from dtrak_core.evaluation.lds.scores import DEFAULT_LAMBDAS, evaluate_matrix
from dtrak_core.evaluation.lds.targets import Targets
from dtrak_core.evaluation.metrics import paired_lds_difference

CPU = torch.device("cpu")


def _clocks(fn: Callable[[], object]) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def bench_speed(model_dir: str | Path, data_dir: str | Path, batch_size: int = 16, num_timesteps: int = 10,
                projection_dim: int = 2048, timestep_chunk: int = 2, rounds: int = 5, default: bool = True,
                blocks: Sequence[tuple[int, int]] = ((BLOCK_OUT, BLOCK_IN),)) -> dict:
    """Seconds per sample and ratio to a training step per sample-timestep, median over ``rounds``.

    One round: three training steps (their median is the round's step time), then one batch of
    each featurizer. ``blocks``: Kronecker block caps of the factored rows (the first is the
    computer's own default when it equals (BLOCK_OUT, BLOCK_IN)).
    """
    model = load_model(model_dir)
    dataset = load_dataset_for(model, data_dir)
    images, ids = dataset.to_tensor(range(batch_size)), list(range(batch_size))
    report = {"model_dir": str(model_dir), "batch_size": batch_size, "num_timesteps": num_timesteps,
              "projection_dim": projection_dim, "timestep_chunk": timestep_chunk, "rounds": rounds,
              "machine": machine_info(CPU), "uptime": _uptime()}
    step = _train_step_fn(model.task, images, CPU)
    featurizers: dict[str, Featurizer] = {}
    for cap in blocks:
        settings = FeatureSettings(computer="factored", num_timesteps=num_timesteps, projection_dim=projection_dim,
                                   batch_size=batch_size, timestep_chunk=timestep_chunk, device="cpu")
        featurizer = Featurizer.create(model.task.with_denoiser(copy.deepcopy(model.unet)), settings)
        featurizer.computer.projection = FactoredProjection(featurizer.model, featurizer.param_names, projection_dim,
                                                            settings.seed, block=tuple(cap))
        featurizers[f"factored {cap[0]}x{cap[1]}, chunk {timestep_chunk}"] = featurizer
        report["intermediate_dim " + f"{cap[0]}x{cap[1]}"] = featurizer.computer.projection.intermediate_dim
    if default:
        settings = FeatureSettings(num_timesteps=num_timesteps, projection_dim=projection_dim, batch_size=batch_size,
                                   device="cpu")
        featurizers["per-sample gradients + sjlt (default), chunk 10"] = Featurizer.create(
            model.task.with_denoiser(copy.deepcopy(model.unet)), settings)
    report["num_parameters"] = next(iter(featurizers.values())).num_parameters
    step()
    for featurizer in featurizers.values():
        featurizer.featurize_batch(images, ids)
    times: dict[str, list[tuple[float, float]]] = {"training step": [], **{name: [] for name in featurizers}}
    for _ in range(rounds):
        steps = [_clocks(step) for _ in range(3)]
        times["training step"].append((statistics.median(w for w, _ in steps), statistics.median(c for _, c in steps)))
        for name, featurizer in featurizers.items():
            times[name].append(_clocks(lambda: featurizer.featurize_batch(images, ids)))
    rows = []
    for name, pairs in times.items():
        per_pass = 1 if name == "training step" else num_timesteps
        ratios = [[pair[i] / per_pass / times["training step"][r][i] for r, pair in enumerate(pairs)] for i in (0, 1)]
        rows.append({"row": name, "wall_s_per_sample": statistics.median(w for w, _ in pairs) / batch_size,
                     "cpu_s_per_sample": statistics.median(c for _, c in pairs) / batch_size,
                     "x_step_per_timestep_wall": statistics.median(ratios[0]),
                     "x_step_per_timestep_cpu": statistics.median(ratios[1]),
                     "x_step_per_timestep_cpu_all_rounds": [round(x, 3) for x in ratios[1]]})
    report["rows"] = rows
    report["uptime_after"] = _uptime()
    return report


def _uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        return f"load average {os.getloadavg()}"


def _peak_child(args: argparse.Namespace) -> dict:
    """In a fresh process: load, build the featurizer, featurize one batch; peak RSS before and after."""
    torch.set_num_threads(1)
    model = load_model(args.model)
    images = load_dataset_for(model, args.data).to_tensor(range(args.batch_size))
    settings = FeatureSettings(computer=args.computer, num_timesteps=args.num_timesteps, device="cpu",
                               projection_dim=args.projection_dim, batch_size=args.batch_size,
                               timestep_chunk=args.timestep_chunk, params=args.params)
    featurizer = Featurizer.create(model.task, settings)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    featurizer.featurize_batch(images, list(range(args.batch_size)))
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"computer": args.computer, "params": args.params, "num_parameters": featurizer.num_parameters,
            "timestep_chunk": args.timestep_chunk, "batch_size": args.batch_size,
            "peak_rss_mb_before_featurizing": round(before, 1), "peak_rss_mb": round(after, 1)}


def bench_memory(model_dir: str | Path, data_dir: str | Path, configs: Sequence[tuple[str, str, int]],
                 batch_size: int = 16, num_timesteps: int = 10, projection_dim: int = 2048) -> dict:
    """Peak RSS per (computer, params, timestep_chunk), each in its own child process."""
    rows = []
    for computer, params, chunk in configs:
        command = [sys.executable, "-m", "dtrak_core.factored_bench", "_peak", "--model", str(model_dir),
                   "--data", str(data_dir), "--computer", computer, "--params", params, "--timestep-chunk",
                   str(chunk), "--batch-size", str(batch_size), "-K", str(num_timesteps), "-k", str(projection_dim)]
        done = subprocess.run(command, capture_output=True, text=True, check=False,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
        if done.returncode != 0:
            raise RuntimeError(f"memory child {computer} {params} failed: {done.stderr.strip().splitlines()[-1:]}")
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return {"model_dir": str(model_dir), "num_timesteps": num_timesteps, "projection_dim": projection_dim,
            "machine": machine_info(CPU), "rows": rows}


def _lds(build_dir: Path, scores: np.ndarray) -> tuple[dict, dict]:
    results, predictions = evaluate_matrix(build_dir, np.array(DEFAULT_LAMBDAS), scores)
    summary = {kind: {"lds": r.get("mean"), "ci_low": r.get("ci_low"), "ci_high": r.get("ci_high"),
                      "lambda": r.get("lambda")} for kind, r in results.items()}
    return summary, predictions


def _paired(build_dir: Path, a: dict, b: dict) -> dict:
    """LDS(a) - LDS(b) per target kind with the paired bootstrap CI over the reported subsets."""
    report, targets = load_outputs(build_dir, "report"), Targets.load(build_dir / TARGETS_DIR)
    out = {}
    for kind in a:
        difference, low, high = paired_lds_difference(a[kind], b[kind], report.losses[:, targets.indices(kind)])
        out[kind] = {"difference": difference, "ci_low": low, "ci_high": high}
    return out


def bench_lds(build_dir: str | Path, feature_root: str | Path, projection_dim: int = 2048, num_timesteps: int = 10,
              timestep_chunk: int = 2) -> dict:
    """D-TRAK's LDS with the default and the factored computer at equal k, end to end."""
    build_dir = Path(build_dir)
    build = read_build(build_dir)
    model = load_model(build["model_dir"])
    train = load_training_set(model)
    targets = Targets.load(build_dir / TARGETS_DIR)
    method = get_method("dtrak")
    report: dict = {"build": str(build_dir), "projection_dim": projection_dim, "num_timesteps": num_timesteps,
                    "machine": machine_info(CPU), "uptime": _uptime(), "rows": {}}
    predictions = {}
    for computer in ("per-sample-gradients", "factored"):
        settings = method.feature_settings(FeatureSettings(num_timesteps=num_timesteps, projection_dim=projection_dim,
                                                           computer=computer, timestep_chunk=timestep_chunk,
                                                           device="cpu"))
        seconds = {}

        def run() -> None:
            seconds["matrices"] = score_targets(method, [model], train, targets.images, settings, DEFAULT_LAMBDAS,
                                                feature_root)

        wall, cpu = _clocks(run)
        scores = np.stack([seconds["matrices"][lam] for lam in DEFAULT_LAMBDAS])
        summary, predictions[computer] = _lds(build_dir, scores)
        report["rows"][computer] = {"lds": summary, "featurize_and_score_wall_s": wall, "cpu_s": cpu,
                                    "key_fields": settings.key_fields()}
    report["factored_minus_default"] = _paired(build_dir, predictions["factored"], predictions["per-sample-gradients"])
    return report


def exact_gradients(build_dir: Path, work_dir: Path, num_timesteps: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Unprojected timestep-averaged per-sample gradients (float32 .npy memory maps in ``work_dir``) of the
    build's training set and targets, with the noise the default features use (seed 0); computed once."""
    build = read_build(build_dir)
    model = load_model(build["model_dir"])
    featurizer = Featurizer.create(model.task, FeatureSettings(num_timesteps=num_timesteps, projector="identity",
                                                               device="cpu"))
    targets = Targets.load(build_dir / TARGETS_DIR)
    train = load_training_set(model)
    parts = {"train": (uint8_to_model_range(train.images), list(range(len(train)))),
             "targets": (uint8_to_model_range(targets.images), target_ids(len(targets)))}
    work_dir.mkdir(parents=True, exist_ok=True)
    arrays = []
    for part, (images, ids) in parts.items():
        path = work_dir / f"exact-K{num_timesteps}-{part}.npy"
        done = path.with_suffix(".done")
        if not done.exists():
            array = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32,
                                              shape=(len(images), featurizer.num_parameters))
            for lo in range(0, len(images), 16):
                grads = featurizer.gradients(images[lo:lo + 16], ids[lo:lo + 16])
                array[lo:lo + 16] = torch.cat([grads[n].reshape(len(grads[n]), -1)
                                               for n in featurizer.param_names], 1).numpy()
            array.flush()
            del array
            done.write_text("complete\n")
        arrays.append(np.load(path, mmap_mode="r"))
    return arrays[0], arrays[1], featurizer.param_names


def bench_projection_seeds(build_dir: str | Path, work_dir: str | Path, projection_dim: int = 2048,
                           num_timesteps: int = 10, seeds: Sequence[int] = range(5),
                           blocks: Sequence[tuple[int, int]] = ((BLOCK_OUT, BLOCK_IN), (32, 32), (64, 64))) -> dict:
    """LDS over projection seeds from the same exact gradients: sjlt and the factored projection per block cap."""
    build_dir = Path(build_dir)
    train, targets, names = exact_gradients(build_dir, Path(work_dir), num_timesteps)
    model = load_model(read_build(build_dir)["model_dir"]).task.denoiser
    shapes = {n: p.shape for n, p in model.named_parameters()}

    def as_dict(rows: np.ndarray) -> dict[str, torch.Tensor]:
        flat, out, start = torch.from_numpy(np.array(rows)), {}, 0
        for n in names:
            out[n] = flat[:, start:start + shapes[n].numel()].reshape(-1, *shapes[n])
            start += shapes[n].numel()
        return out

    def features(project: Callable[[dict], torch.Tensor], array: np.ndarray) -> np.ndarray:
        return np.concatenate([project(as_dict(array[a:a + 32])).numpy() for a in range(0, len(array), 32)])

    rows: dict[str, dict] = {}
    predictions: dict[str, dict] = {}
    p = train.shape[1]
    for seed in seeds:
        variants = {"sjlt": make_projector("sjlt", p, projection_dim, seed, names, 4).project}
        for cap in blocks:
            variants[f"factored {cap[0]}x{cap[1]}"] = FactoredProjection(model, names, projection_dim, seed,
                                                                         block=tuple(cap)).project_gradients
        for name, project in variants.items():
            kernel = KernelScorer(features(project, train))
            target_features = features(project, targets)
            scores = np.stack([kernel.scores(target_features, lam) for lam in DEFAULT_LAMBDAS])
            summary, predictions[f"{name}/{seed}"] = _lds(build_dir, scores)
            rows.setdefault(name, {})[str(seed)] = summary
    report: dict = {"build": str(build_dir), "projection_dim": projection_dim, "num_timesteps": num_timesteps,
                    "seeds": list(seeds), "machine": machine_info(CPU), "rows": rows, "summary": {}}
    for name, by_seed in rows.items():
        for kind in next(iter(by_seed.values())):
            values = [100 * s[kind]["lds"] for s in by_seed.values()]
            paired = [_paired(build_dir, predictions[f"{name}/{seed}"], predictions[f"sjlt/{seed}"])[kind]["difference"]
                      for seed in seeds] if name != "sjlt" else []
            report["summary"].setdefault(name, {})[kind] = {
                "mean": float(np.mean(values)), "sd": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
                "min": min(values), "max": max(values),
                "mean_paired_difference_vs_sjlt": float(100 * np.mean(paired)) if paired else None}
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dtrak_core.factored_bench", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("speed", "memory", "_peak"):
        p = sub.add_parser(name)
        p.add_argument("--model", required=True, type=Path)
        p.add_argument("--data", required=True, type=Path)
        p.add_argument("--batch-size", type=int, default=16)
        p.add_argument("-K", "--num-timesteps", type=int, default=10)
        p.add_argument("-k", "--projection-dim", type=int, default=2048)
        p.add_argument("--timestep-chunk", type=int, default=2)
        p.add_argument("--rounds", type=int, default=5)
        p.add_argument("--no-default", action="store_true", help="speed: skip the default computer's row")
        p.add_argument("--blocks", nargs="+", default=[f"{BLOCK_OUT}x{BLOCK_IN}"], help="speed: block caps, e.g. 64x16")
        p.add_argument("--computer", default="factored")
        p.add_argument("--params", default="all")
        p.add_argument("--configs", nargs="+", default=None,
                       help="memory: computer:params:chunk triples (default: factored at chunks 1, 2, 10 with all "
                            "parameters and with the up blocks only, and per-sample-gradients at chunk 10)")
    for name in ("lds", "seeds"):
        p = sub.add_parser(name)
        p.add_argument("--build", required=True, type=Path)
        p.add_argument("-k", "--projection-dim", type=int, default=2048)
        p.add_argument("-K", "--num-timesteps", type=int, default=10)
        p.add_argument("--feature-root", type=Path, help="lds: the feature store root (use a scratch folder)")
        p.add_argument("--timestep-chunk", type=int, default=2)
        p.add_argument("--work-dir", type=Path, help="seeds: where the exact gradients are kept")
        p.add_argument("--seeds", type=int, default=5)
        p.add_argument("--blocks", nargs="+", default=[f"{BLOCK_OUT}x{BLOCK_IN}", "32x32", "64x64"])
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    blocks = [tuple(int(v) for v in b.split("x")) for b in getattr(args, "blocks", [])]
    if args.command == "_peak":
        report = _peak_child(args)
    elif args.command == "speed":
        report = bench_speed(args.model, args.data, args.batch_size, args.num_timesteps, args.projection_dim,
                             args.timestep_chunk, args.rounds, not args.no_default, blocks)
    elif args.command == "memory":
        # computer:params:chunk; the params may hold colons themselves ("re:...").
        configs = [(x.split(":")[0], x.split(":", 1)[1].rsplit(":", 1)[0], int(x.rsplit(":", 1)[1]))
                   for x in args.configs] if args.configs else [
            ("factored", "all", 1), ("factored", "all", 2), ("factored", "all", 10),
            ("factored", "re:^up_blocks", 2), ("per-sample-gradients", "all", 10)]
        report = bench_memory(args.model, args.data, configs, args.batch_size, args.num_timesteps, args.projection_dim)
    elif args.command == "lds":
        if args.feature_root is None:
            parser.error("lds needs --feature-root (a scratch folder: the features are written there)")
        report = bench_lds(args.build, args.feature_root, args.projection_dim, args.num_timesteps, args.timestep_chunk)
    else:
        if args.work_dir is None:
            parser.error("seeds needs --work-dir (a scratch folder for the exact gradients)")
        report = bench_projection_seeds(args.build, args.work_dir, args.projection_dim, args.num_timesteps,
                                        range(args.seeds), blocks)
    print(json.dumps(report, default=str))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
