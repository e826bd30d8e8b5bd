"""Training and evaluation, one concern per module.

- :mod:`~dset.engine.loop`: :func:`~dset.engine.loop.fit`, one run from data to summary (the epochs and the
  training steps)
- :mod:`~dset.engine.hooks`: what a run writes around its epochs, one hook per concern (metrics.jsonl, best.pt,
  last.pt, the log, the callbacks)
- :mod:`~dset.engine.initial_weights`: the model a run starts from, and which of its weights are pretrained
- :mod:`~dset.engine.optim` / :mod:`~dset.engine.schedule` / :mod:`~dset.engine.ema`: AdamW and its parameter
  groups, the warm-up + cosine schedule, the EMA of the weights
- :mod:`~dset.engine.callbacks`: the hooks a caller implements, early stopping
- :mod:`~dset.engine.coco_eval`: COCO metrics of a model's detections (pycocotools)
- :mod:`~dset.engine.checkpoint`: last.pt and best.pt, written atomically; reading the resume state back
- :mod:`~dset.engine.rng`: seeding, capturing and restoring the random state
- :mod:`~dset.engine.records`: the text files of a run (named by :mod:`dset.run_folder`) as strict JSON
- :mod:`~dset.engine.epoch_stats` / :mod:`~dset.engine.memory`: per-epoch means and throughput; peak memory
- :mod:`~dset.engine.run_metrics`: the final metrics of a run (summary.json's ``metrics`` block)
- :mod:`~dset.engine.reported_checkpoint`: the profile and pictures of a finished run's reported checkpoint
- :mod:`~dset.engine.distributed`: the process group under torchrun, the device, DDP and its collectives
- :mod:`~dset.engine.errors`: NaN losses, and one readable line per error

The command lines are :mod:`dset.train` and :mod:`dset.evaluate`.
"""
