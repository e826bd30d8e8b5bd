"""Data: COCO-format data set (:mod:`.coco`), transforms (:mod:`.transforms`), loaders (:mod:`.loaders`), the
synthetic data set (:mod:`.synthetic`), the DAIR-V2X converter (:mod:`.dair_v2x`) and their error type
(:mod:`.errors`). Import a name from the module that defines it; this package imports nothing, so
``python -m dset.data.synthetic`` and ``python -m dset.data.dair_v2x`` do not import torch.
"""
