"""A tiny model with a small stored LDS build and stored counterfactual results, for the
Benchmark and Counterfactual pages (pointed at them with environment variables)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from dtrak_core.evaluation.counterfactual import CounterfactualConfig, run_counterfactual
from dtrak_core.evaluation.lds.build import build_lds
from dtrak_core.evaluation.lds.config import LdsBuildConfig
from dtrak_core.evaluation.lds.scores import compute_scores, evaluate, get_entry
from tests.conftest import write_image_folder

PAGES = Path(__file__).resolve().parents[2] / "pages"
torch.set_num_threads(1)


@dataclass(frozen=True)
class EvalEnv:
    model_dir: Path
    cache: Path
    lds_dir: Path
    cf_dir: Path

    def variables(self) -> dict[str, str]:
        return {"DTRAK_MODEL_DIR": str(self.model_dir), "DTRAK_MODEL_NAME": "tiny", "DTRAK_HIDE_DEMO": "1",
                "DTRAK_CACHE": str(self.cache), "DTRAK_DATA_DIR": "", "DTRAK_LDS_DIR": str(self.lds_dir),
                "DTRAK_COUNTERFACTUAL_DIR": str(self.cf_dir), "DTRAK_TOKEN": ""}


@pytest.fixture(scope="session")
def eval_env(tmp_path_factory) -> EvalEnv:
    from dtrak_core.training import TrainConfig, train

    root = tmp_path_factory.mktemp("app_eval")
    data = write_image_folder(root / "data", n=24)
    model = train(TrainConfig(data_dir=str(data), out_dir=str(root / "model"), preset="tiny", image_size=16,
                              steps=4, batch_size=4, warmup_steps=2, checkpoint_every=2), progress=False)
    lds_dir = root / "lds"
    build_lds(LdsBuildConfig(model_dir=str(model), out_dir=str(lds_dir), num_subsets=4, num_tuning_subsets=2,
                             seeds=[0], measure_timesteps=2, generated_seeds=[0, 1, 2], sampler_steps=2),
              progress=False)
    grid = [get_entry("pixel"), get_entry("random")]
    compute_scores(lds_dir, grid, progress=False)
    evaluate(lds_dir, grid, num_bootstrap=20)
    cf_dir = root / "counterfactual"
    for method in ("dtrak", "random"):
        run_counterfactual(CounterfactualConfig(str(model), 1, method, k=4, results_dir=str(cf_dir),
                                                models_dir=str(root / "cf-models"),
                                                feature_root=str(root / "cache" / "features")), progress=False)
    return EvalEnv(Path(model), root / "cache", lds_dir, cf_dir)


@pytest.fixture
def eval_vars(eval_env, monkeypatch) -> EvalEnv:
    for name, value in eval_env.variables().items():
        monkeypatch.setenv(name, value)
    return eval_env
