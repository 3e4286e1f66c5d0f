"""Evaluation of attributions: LDS (subset retrains) and the counterfactual check.

- :mod:`~dtrak_core.evaluation.metrics`: Spearman, LDS with bootstrap CI, pixel L2, SSIM;
- :mod:`~dtrak_core.evaluation.subsets`: stratified, seeded tuning / reported subsets;
- :mod:`~dtrak_core.evaluation.lds`: the resumable build (retrain, measure);
- :mod:`~dtrak_core.evaluation.lds_scores`: method grid -> score matrices -> LDS -> table;
- :mod:`~dtrak_core.evaluation.counterfactual`: remove, retrain, regenerate, compare.
"""
