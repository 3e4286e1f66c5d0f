"""Evaluation of attributions: LDS (subset retrains) and the counterfactual check.

- :mod:`~dtrak_core.evaluation.metrics`: Spearman, LDS with bootstrap CI, pixel L2, SSIM;
- :mod:`~dtrak_core.evaluation.subsets`: stratified, seeded tuning / reported subsets;
- :mod:`~dtrak_core.evaluation.retrain`: the full model's recipe on a subset (same-epochs rule)
  or with another seed, trained into a folder; shared by the LDS and the counterfactual check;
- :mod:`~dtrak_core.evaluation.lds`: the LDS benchmark, one module per stage (config, targets,
  measure, build, outputs, scores, report);
- :mod:`~dtrak_core.evaluation.counterfactual`: remove, retrain, regenerate, compare;
- :mod:`~dtrak_core.evaluation.embeddings`: the embedding cosine of a local image model;
- :mod:`~dtrak_core.evaluation.markdown`: what the two reports share (notes, atomic writing);
- :mod:`~dtrak_core.evaluation.units`: how every LDS and counterfactual unit is stored: atomic
  files with a fault point, checksummed records written last, verified on read;
- :mod:`~dtrak_core.evaluation.cli`: the ``lds`` and ``counterfactual`` subcommands.
"""
