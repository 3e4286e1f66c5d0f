"""Linear Datamodeling Score (LDS) benchmark: subset retrains, measured outputs, scores, LDS.

One module per stage; import each name from its stage (this package re-exports nothing):

- :mod:`.config`: :class:`~.config.LdsBuildConfig`, the build folder's layout and its build file
  ``lds.json`` (what a resumed build must keep, what may grow);
- :mod:`.targets`: the targets (held-out images of the model's selection, images the full model
  generates from fixed seeds, held-out images of other selections), appended only;
- :mod:`.measure`: the model output on each target, the diffusion loss over
  ``measure_timesteps`` uniform timesteps of the model's T (offset by half a stride, so not the
  attribution's T_K) and ``measure_noise`` draws, the same (t, eps) for every model;
- :mod:`.build`: the work queue (every subset x training seed, then ensemble seeds) and
  :func:`~.build.build_lds`, which retrains each model with the full model's recipe on its
  subset (:mod:`dtrak_core.evaluation.retrain`, same-epochs rule), measures it and deletes its
  weights; resumable, and several workers may share one build;
- :mod:`.outputs`: ``outputs/<model>.json`` (the per-model done marker) and reading them back,
  averaged over seeds, for the LDS;
- :mod:`.scores`: score matrices of every method of the grid for the targets, and the LDS
  (lambda chosen on the tuning subsets, reported on the others, 95% bootstrap CI);
- :mod:`.report`: the markdown table ``docs/benchmarks/lds.md``.

Targets may be added to a finished build (``extra_validation``): they are appended after the old
ones (a target's index fixes its noise, so old targets keep theirs), and each model whose output
file lacks them is retrained and measured on the new targets only. Training is deterministic on
CPU, so the retrain reproduces the original weights; the output file records whether its model
hash matched, and when it does not, every target is measured again on the new model so that one
file never mixes two models.
"""
