"""Attribution core: features (per-sample gradients, projected) -> scores -> tables.

One small module per stage: ``output_functions`` (what f to differentiate), ``timesteps``
(which t, which noise), ``gradients`` (per-sample grads with torch.func), ``projectors``
(random projections), ``featurizer`` (phi), ``feature_store`` (cached, resumable features),
``scorers`` (TRAK/D-TRAK kernel and relatives), ``results`` (tidy tables), ``pipeline``
(folder-level entry points) and ``cli`` (featurize / score subcommands).
"""

from dtrak_core.attribution.feature_store import FeatureSet, StaleFeaturesError, compute_features, load_features
from dtrak_core.hashing import state_dict_hash
from dtrak_core.attribution.featurizer import Featurizer, FeatureSettings
from dtrak_core.attribution.output_functions import OUTPUT_FUNCTIONS, NoiseSchedule
from dtrak_core.attribution.projectors import DenseProjector, SparseProjector, make_projector
from dtrak_core.attribution.scorers import KernelScorer
from dtrak_core.attribution import factored  # noqa: F401  (registers the "factored" feature computer)

__all__ = ["FeatureSet", "FeatureSettings", "Featurizer", "KernelScorer", "NoiseSchedule",
           "OUTPUT_FUNCTIONS", "DenseProjector", "SparseProjector", "StaleFeaturesError",
           "compute_features", "load_features", "make_projector", "state_dict_hash"]
