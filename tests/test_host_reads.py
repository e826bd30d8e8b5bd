"""Host reads in a training step (a sync on CUDA each): only where the step cannot do without one. Counted on CPU
by intercepting the tensor methods that read values back (``item``, ``tolist``, ``bool``, ``cpu``, ``nonzero``...),
by where in ``dset`` they are called; ``python -m dset.bench train`` counts the syncs themselves on a GPU."""

from __future__ import annotations

import collections
import tempfile
import traceback
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode

from dset.config import resolve_config
from dset.engine.distributed import DistInfo
from dset.engine.epoch_stats import EpochStats
from dset.engine.loop import TrainingRun
from dset.models.box_ops import box_cxcywh_to_xyxy, box_xyxy_to_cxcywh
from dset.models.decoder import contrastive_denoising_group

READS = {"item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "nonzero", "unique",
         "masked_select", "bincount"}


class CountReads(TorchFunctionMode):
    """``(method, file in dset)`` -> calls of a value-reading tensor method."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter = collections.Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in READS:
            frames = [f for f in traceback.extract_stack() if "/dset/" in f.filename]
            self.counts[(name, Path(frames[-1].filename).name if frames else "?")] += 1
        return func(*args, **(kwargs or {}))


TINY = ["data.image_size=128", "data.batch_size=2", "model.decoder.num_queries=50", "model.decoder.num_denoising=20",
        "model.eval_spatial_size=[128,128]", "data.synthetic.num_train=4", "data.synthetic.num_val=2",
        "data.synthetic.image_size=128", "run.device=cpu", "run.progress=false", "data.multi_scale=false",
        "model.token_pruning.warmup_epochs=0", "model.token_pruning.ramp_epochs=0",
        "model.memory_pruning.warmup_epochs=0"]


@pytest.mark.parametrize("preset,moe_layers", [("rtdetr_r18", 0), ("dset_r18", 4)])
def test_a_training_step_reads_the_host_only_where_it_must(preset, moe_layers):
    cfg = resolve_config(preset, budget="none", overrides=TINY)
    run = TrainingRun(cfg, Path(tempfile.mkdtemp()), hooks=[], resume=False, dinfo=DistInfo())
    run.model.train()
    run.criterion.train()
    images, targets = next(iter(run.train_loader))
    run.train_step(images, targets, EpochStats(), None, "warm-up")
    with CountReads() as reads:
        run.train_step(images, targets, EpochStats(), None, "counted")
    expected = {
        ("cpu", "matcher.py"): 4,       # the Hungarian matcher's cost matrix (scipy): encoder + 3 decoder layers
        ("__bool__", "criterion.py"): 1,   # the target labels' range check, once per step
    }
    if moe_layers:
        expected[("tolist", "moe.py")] = moe_layers   # the sparse dispatch sizes its buffers: one per MoE layer
    assert dict(reads.counts) == expected   # no loss read (every train.loss_check_every steps), no box check


def test_the_denoising_positive_queries_carry_their_objects_in_order():
    """The positive denoising queries' columns (computed from the per-image counts, no nonzero) hold each image's
    objects in order, in every group: without noise, exactly their labels' embeddings and their boxes."""
    torch.manual_seed(0)
    embed = torch.nn.Embedding(6, 8)
    boxes = [torch.tensor([[10.0, 10, 30, 40], [50, 20, 60, 90], [0, 0, 5, 5]]) / 100, torch.zeros(0, 4),
             torch.tensor([[20.0, 30, 80, 60]]) / 100]
    targets = [{"labels": torch.tensor(labels, dtype=torch.int64), "boxes": box_xyxy_to_cxcywh(b)}
               for labels, b in zip(([1, 4, 2], [], [3]), boxes)]
    dn_class, dn_bbox, _, meta = contrastive_denoising_group(targets, 5, 10, embed, num_denoising=9,
                                                             label_noise_ratio=0.0, box_noise_scale=0.0)
    groups = meta["dn_num_group"]
    assert groups == 3 and [len(i) for i in meta["dn_positive_idx"]] == [9, 0, 3]
    for b, t in enumerate(targets):
        idx = meta["dn_positive_idx"][b]
        assert idx.dtype == torch.int64
        labels = t["labels"].repeat(groups)
        torch.testing.assert_close(dn_class[b, idx], embed(labels))
        got = box_cxcywh_to_xyxy(dn_bbox[b, idx].sigmoid())
        torch.testing.assert_close(got, box_cxcywh_to_xyxy(t["boxes"]).repeat(groups, 1), atol=1e-4, rtol=0)
