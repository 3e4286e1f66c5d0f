"""The per-model default lambda: self-retrieval against a brute-force solve, the choice rule,
the cache's checksum, and the LDS build lookup."""

import json
from pathlib import Path

import numpy as np
import pytest

from dtrak_core.attribution.feature_store import FeatureSet
from dtrak_core.attribution.scorers import KernelScorer
from dtrak_core.evaluation import calibration as cal
from dtrak_core.io import write_json_atomic


def features(n=30, k=12, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    # Anisotropic like real gradient features: a few strong directions, many weak ones.
    return (rng.normal(size=(n, k)) * np.geomspace(30, 0.1, k)).astype(np.float32)


def brute_force_share(phi: np.ndarray, rows: np.ndarray, lam: float) -> float:
    phi = phi.astype(np.float64)
    inverse = np.linalg.solve(phi.T @ phi + lam * np.eye(phi.shape[1]), phi.T)  # (k, n)
    scores = phi[rows] @ inverse
    return float(np.mean(scores.argmax(1) == rows))


def test_self_retrieval_curve_equals_a_brute_force_solve_at_every_lambda():
    phi = features()
    rows = np.array([0, 3, 7, 11, 29])
    curve = cal.self_retrieval_curve(KernelScorer(phi), phi, rows)
    assert list(curve) == list(cal.CALIBRATION_LAMBDAS)
    for lam, share in curve.items():
        assert share == brute_force_share(phi, rows, lam), lam
    assert curve[cal.CALIBRATION_LAMBDAS[0]] > curve[cal.CALIBRATION_LAMBDAS[-1]]  # regularisation costs retrieval


def test_choose_lambda_takes_the_largest_meeting_the_goal_else_the_best():
    assert cal.choose_lambda({0.1: 1.0, 1.0: 0.995, 10.0: 0.9, 100.0: 0.991}, goal=0.99) == 100.0
    assert cal.choose_lambda({0.1: 0.7, 1.0: 0.8, 10.0: 0.8, 100.0: 0.5}, goal=0.99) == 1.0


def test_sample_rows_is_seeded_distinct_and_all_rows_when_few():
    assert np.array_equal(cal.sample_rows(7), np.arange(7))
    a, b = cal.sample_rows(500, 100, seed=3), cal.sample_rows(500, 100, seed=3)
    assert np.array_equal(a, b) and len(set(a)) == 100 and np.all(np.diff(a) > 0)


def feature_set(phi: np.ndarray, key: str = "k1", **settings) -> FeatureSet:
    manifest = {"settings": {"num_timesteps": 10, "output_fn": "square", **settings}}
    return FeatureSet(Path("unused"), key, phi, manifest)


def test_the_self_retrieval_calibration_is_cached_and_a_tampered_cache_is_recomputed(tmp_path):
    phi = features()
    first = cal.calibrate_by_self_retrieval(feature_set(phi), "dtrak", cache_root=tmp_path)
    assert first.source == "self-retrieval" and first.lam in cal.CALIBRATION_LAMBDAS
    expected = cal.choose_lambda(cal.self_retrieval_curve(KernelScorer(phi), phi, np.arange(30)))
    assert first.lam == expected
    path = tmp_path / "calibration" / "k1-dtrak.json"
    record = json.loads(path.read_text())
    record["calibration"]["lam"] = 12345.0  # edited without updating the checksum
    path.write_text(json.dumps(record))
    again = cal.calibrate_by_self_retrieval(feature_set(phi), "dtrak", cache_root=tmp_path)
    assert again == first and json.loads(path.read_text())["calibration"]["lam"] == first.lam


def write_build(root: Path, model_hash: str, entries: dict) -> None:
    build = root / "lds" / "m"
    (build / "results").mkdir(parents=True)
    # Written as the build writes its records (canonical JSON): read back verified.
    write_json_atomic(build / "lds.json", {"model_hash": model_hash})
    write_json_atomic(build / "results" / "lds.json", {"entries": entries})
    np.savez(build / "results" / "predictions.npz")  # a build from before checksums: its files must exist


def test_an_lds_build_of_the_same_model_wins_and_other_models_or_settings_fall_back(tmp_path):
    phi = features()
    write_build(tmp_path, "abc", {"dtrak-K10": {"kinds": {"validation": {"lambda": 3.1622776601683795},
                                                          "generated": {"lambda": 316.0}}}})
    builds = tmp_path / "lds"
    tuned = cal.calibrate(feature_set(phi), "dtrak", "abc", True, cache_root=tmp_path, builds_root=builds)
    assert tuned.source == "lds" and tuned.lam == pytest.approx(3.1622776601683795)
    for files_hash, defaults, fs in (("other", True, feature_set(phi)), ("abc", False, feature_set(phi)),
                                     ("abc", True, feature_set(phi, num_timesteps=100))):
        fallback = cal.calibrate(fs, "dtrak", files_hash, defaults, cache_root=tmp_path, builds_root=builds)
        assert fallback.source == "self-retrieval"
    assert cal.lds_entry_name("trak", 10, "square") is None and cal.lds_entry_name("trak", 100, "loss") == "trak-K100"
