"""SetCriterion: hand-checked values, key layout, denoising normalisation, empty images, gradients."""

import math

import pytest
import torch

from dset.models.criterion import (
    DEFAULT_EXTRA_LOSS_WEIGHTS,
    SetCriterion,
    UnknownLossError,
    total_loss,
)
from dset.models.matcher import HungarianMatcher

NUM_CLASSES = 3


class FixedMatcher:
    """Returns preset indices (isolates the losses from the matching)."""

    def __init__(self, indices):
        self.indices = [(torch.tensor(i, dtype=torch.int64), torch.tensor(j, dtype=torch.int64)) for i, j in indices]
        self.calls = 0

    def __call__(self, outputs, targets):
        self.calls += 1
        return self.indices


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def _vfl_reference(logits, matched, num_boxes, alpha=0.75, gamma=2.0):
    """Straightforward varifocal loss: matched = {(b, q): (class, iou)}; sum over all entries / num_boxes."""
    total = 0.0
    for b, per_image in enumerate(logits):
        for q, row in enumerate(per_image):
            for c, x in enumerate(row):
                p = _sigmoid(x)
                cls_iou = matched.get((b, q))
                t = cls_iou[1] if cls_iou is not None and cls_iou[0] == c else 0.0
                w = t if t > 0 or (cls_iou is not None and cls_iou[0] == c) else alpha * p**gamma
                bce = -(t * math.log(p) + (1 - t) * math.log(1 - p))
                total += w * bce
    return total / num_boxes


def _perfect_outputs(targets, q, matched_queries, num_classes=NUM_CLASSES, seed=0):
    gen = torch.Generator().manual_seed(seed)
    bs = len(targets)
    logits = torch.full((bs, q, num_classes), -12.0)
    boxes = torch.cat([torch.rand(bs, q, 2, generator=gen) * 0.2 + 0.05, torch.full((bs, q, 2), 0.05)], -1)
    for b, (t, qs) in enumerate(zip(targets, matched_queries)):
        for j, qi in enumerate(qs):
            logits[b, qi, t["labels"][j]] = 12.0
            boxes[b, qi] = t["boxes"][j]
    return logits.requires_grad_(), boxes.requires_grad_()


def _targets():
    return [
        {"labels": torch.tensor([0, 2]), "boxes": torch.tensor([[0.6, 0.6, 0.2, 0.3], [0.8, 0.3, 0.1, 0.1]])},
        {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.7, 0.4, 0.2]])},
    ]


def test_perfect_predictions_give_zero_box_losses():
    targets = _targets()
    logits, boxes = _perfect_outputs(targets, q=8, matched_queries=[[3, 6], [1]])
    crit = SetCriterion(NUM_CLASSES, HungarianMatcher())
    losses = crit({"pred_logits": logits, "pred_boxes": boxes}, targets)
    assert set(losses) == {"loss_vfl", "loss_bbox", "loss_giou"}
    assert losses["loss_bbox"].item() == pytest.approx(0.0, abs=1e-6)
    assert losses["loss_giou"].item() == pytest.approx(0.0, abs=1e-6)
    # IoU 1 targets and confident logits: the classification loss is tiny too
    assert 0 <= losses["loss_vfl"].item() < 1e-3


def test_shifted_box_hand_values():
    targets = [{"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}]
    logits = torch.tensor([[[0.3, -0.2, 1.0], [0.5, 1.5, -2.0], [-1.0, 0.0, 0.7]]], requires_grad=True)
    boxes = torch.tensor([[[0.2, 0.2, 0.1, 0.1], [0.6, 0.5, 0.2, 0.2], [0.8, 0.8, 0.1, 0.1]]], requires_grad=True)
    crit = SetCriterion(NUM_CLASSES, FixedMatcher([([1], [0])]))
    losses = crit({"pred_logits": logits, "pred_boxes": boxes}, targets)
    # L1: |0.6 - 0.5| = 0.1, weight 5, num_boxes 1
    assert losses["loss_bbox"].item() == pytest.approx(5 * 0.1, rel=1e-5)
    # xyxy [0.5,0.4,0.7,0.6] vs [0.4,0.4,0.6,0.6]: inter 0.02, union 0.06, enclosing 0.06 -> GIoU = IoU = 1/3
    assert losses["loss_giou"].item() == pytest.approx(2 * (1 - 1 / 3), rel=1e-5)
    expected_vfl = _vfl_reference(logits.tolist(), {(0, 1): (1, 1 / 3)}, num_boxes=1)
    assert losses["loss_vfl"].item() == pytest.approx(expected_vfl, rel=1e-5)


def test_vfl_against_reference_two_images_and_weights():
    targets = [
        {"labels": torch.tensor([2, 0]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4], [0.2, 0.3, 0.2, 0.2]])},
        {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.4, 0.6, 0.3, 0.2]])},
    ]
    gen = torch.Generator().manual_seed(11)
    logits = torch.randn(2, 4, NUM_CLASSES, generator=gen)
    boxes = torch.tensor(
        [
            [[0.1, 0.1, 0.1, 0.1], [0.55, 0.5, 0.4, 0.4], [0.2, 0.3, 0.2, 0.2], [0.9, 0.9, 0.1, 0.1]],
            [[0.4, 0.6, 0.3, 0.4], [0.1, 0.1, 0.1, 0.1], [0.5, 0.5, 0.1, 0.1], [0.7, 0.7, 0.1, 0.1]],
        ]
    )
    crit = SetCriterion(NUM_CLASSES, FixedMatcher([([1, 2], [0, 1]), ([0], [0])]), weight_dict={"loss_vfl": 3.0})
    losses = crit({"pred_logits": logits, "pred_boxes": boxes}, targets)
    # IoUs by hand: [0.35,0.3,0.75,0.7] vs [0.3,0.3,0.7,0.7]: inter 0.14, union 0.18 -> 7/9;
    # identical -> 1; height 0.4 vs 0.2 at the same centre: 0.06 / 0.12 -> 1/2
    matched = {(0, 1): (2, 7 / 9), (0, 2): (0, 1.0), (1, 0): (1, 0.5)}
    expected = 3.0 * _vfl_reference(logits.tolist(), matched, num_boxes=3)
    assert losses["loss_vfl"].item() == pytest.approx(expected, rel=1e-5)
    # weight_dict is merged over the defaults
    assert crit.weight_dict == {"loss_vfl": 3.0, "loss_bbox": 5.0, "loss_giou": 2.0}


def test_aux_and_dn_keys_and_dn_normalisation():
    targets = [
        {"labels": torch.tensor([0, 1]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.7, 0.2, 0.2]])},
        {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)},
    ]
    q, groups, max_gt = 6, 2, 2
    main_logits, main_boxes = _perfect_outputs(targets, q, [[0, 1], []])
    # aux layers put the objects on other queries: each must be matched on its own to give zero box loss
    aux = [dict(zip(("pred_logits", "pred_boxes"), _perfect_outputs(targets, q, qs, seed=s)))
           for s, qs in enumerate([[[4, 2], []], [[5, 3], []], [[1, 0], []]])]
    # denoising queries: per group max_gt positives then max_gt negatives -> positives at 0,1 and 4,5
    num_dn = 2 * max_gt * groups
    dn_pos = [torch.tensor([0, 1, 4, 5]), torch.zeros(0, dtype=torch.int64)]
    dn_layers = []
    for layer in range(3):
        lg = torch.zeros(2, num_dn, NUM_CLASSES, requires_grad=True)
        bx = torch.full((2, num_dn, 4), 0.1)
        bx[0, [0, 1, 4, 5]] = targets[0]["boxes"].repeat(groups, 1)
        bx[0, 4, 0] += 0.1 * (layer + 1)  # one shifted cx in group 2 (query 4 <-> target 0)
        dn_layers.append({"pred_logits": lg, "pred_boxes": bx.requires_grad_()})
    outputs = {
        "pred_logits": main_logits,
        "pred_boxes": main_boxes,
        "aux_outputs": aux,
        "dn_aux_outputs": dn_layers,
        "dn_meta": {"dn_positive_idx": dn_pos, "dn_num_group": groups, "dn_num_split": [num_dn, q]},
    }
    crit = SetCriterion(NUM_CLASSES, HungarianMatcher())
    losses = crit(outputs, targets)
    names = ("loss_vfl", "loss_bbox", "loss_giou")
    expected_keys = set(names)
    expected_keys |= {f"{n}_aux_{i}" for n in names for i in range(3)}
    expected_keys |= {f"{n}_dn_{i}" for n in names for i in range(3)}
    assert set(losses) == expected_keys
    for i in range(3):
        assert losses[f"loss_bbox_aux_{i}"].item() == pytest.approx(0.0, abs=1e-6)
        assert losses[f"loss_giou_aux_{i}"].item() == pytest.approx(0.0, abs=1e-6)
        # num_boxes = 2 targets; dn divides by num_boxes * groups = 4; weight 5
        assert losses[f"loss_bbox_dn_{i}"].item() == pytest.approx(5 * 0.1 * (i + 1) / (2 * groups), rel=1e-5)
    total_loss(losses).backward()
    assert dn_layers[0]["pred_boxes"].grad[0, 4].abs().sum() > 0
    assert dn_layers[0]["pred_boxes"].grad[0, 2].abs().sum() == 0  # a negative dn query has no box loss
    assert aux[-1]["pred_logits"].grad.abs().sum() > 0


def test_dn_meta_length_mismatch_is_an_error():
    targets = [{"labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}]
    logits, boxes = _perfect_outputs(targets, 4, [[0]])
    outputs = {
        "pred_logits": logits,
        "pred_boxes": boxes,
        "dn_aux_outputs": [{"pred_logits": torch.zeros(1, 4, NUM_CLASSES), "pred_boxes": torch.full((1, 4, 4), 0.2)}],
        "dn_meta": {"dn_positive_idx": [torch.tensor([0, 2, 3])], "dn_num_group": 2, "dn_num_split": [4, 4]},
    }
    with pytest.raises(ValueError, match="num_gt \\* dn_num_group"):
        SetCriterion(NUM_CLASSES, HungarianMatcher())(outputs, targets)


@pytest.mark.parametrize("sizes", [[0, 1], [0, 0]])
def test_images_without_objects_give_finite_losses_and_gradients(sizes):
    gen = torch.Generator().manual_seed(2)
    targets = [
        {"labels": torch.randint(0, NUM_CLASSES, (n,), generator=gen),
         "boxes": torch.cat([torch.rand(n, 2, generator=gen) * 0.5 + 0.25, torch.full((n, 2), 0.2)], -1)}
        for n in sizes
    ]
    logits = torch.randn(2, 5, NUM_CLASSES, generator=gen, requires_grad=True)
    boxes = torch.rand(2, 5, 4, generator=gen).mul(0.3).add(0.1).requires_grad_()
    outputs = {"pred_logits": logits, "pred_boxes": boxes,
               "aux_outputs": [{"pred_logits": logits * 1.0, "pred_boxes": boxes * 1.0}]}
    losses = SetCriterion(NUM_CLASSES, HungarianMatcher())(outputs, targets)
    for k, v in losses.items():
        assert torch.isfinite(v).all(), k
    total_loss(losses).backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()
    assert boxes.grad is not None and torch.isfinite(boxes.grad).all()
    if sum(sizes) == 0:
        assert losses["loss_bbox"].item() == 0.0 and losses["loss_giou"].item() == 0.0
        assert losses["loss_bbox"].requires_grad
        assert boxes.grad.abs().sum() == 0
        # no objects: num_boxes clamps to 1 and the VFL is the pure negative term
        expected = _vfl_reference(logits.detach().tolist(), {}, num_boxes=1)
        assert losses["loss_vfl"].item() == pytest.approx(expected, rel=1e-5)
    else:
        assert boxes.grad[1].abs().sum() > 0 and boxes.grad[0].abs().sum() == 0


def test_gradients_reach_logits_and_boxes():
    targets = _targets()
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(2, 6, NUM_CLASSES, generator=gen, requires_grad=True)
    boxes = torch.rand(2, 6, 4, generator=gen).mul(0.3).add(0.2).requires_grad_()
    losses = SetCriterion(NUM_CLASSES, HungarianMatcher())({"pred_logits": logits, "pred_boxes": boxes}, targets)
    losses["loss_bbox"].backward(retain_graph=True)
    assert boxes.grad.abs().sum() > 0
    boxes.grad = None
    losses["loss_vfl"].backward()
    assert logits.grad.abs().sum() > 0
    assert boxes.grad is None  # the IoU target of VFL is detached


def test_extra_losses_weighting_and_unknown_name():
    targets = _targets()
    logits, boxes = _perfect_outputs(targets, 4, [[0, 1], [2]])
    balance = torch.tensor(2.0, requires_grad=True)
    extra = {"loss_enc_moe_balance": balance, "loss_pruning": torch.tensor(3.0), "loss_dec_moe_z": torch.tensor(5.0)}
    outputs = {"pred_logits": logits, "pred_boxes": boxes, "extra_losses": extra}
    losses = SetCriterion(NUM_CLASSES, HungarianMatcher())(outputs, targets)
    assert losses["loss_enc_moe_balance"].item() == pytest.approx(
        2.0 * DEFAULT_EXTRA_LOSS_WEIGHTS["loss_enc_moe_balance"])
    assert losses["loss_pruning"].item() == pytest.approx(3.0 * 0.01)
    assert losses["loss_dec_moe_z"].item() == 0.0
    total_loss(losses).backward()
    assert balance.grad.item() == pytest.approx(0.03)
    # overriding one weight keeps the other defaults
    crit = SetCriterion(NUM_CLASSES, HungarianMatcher(), extra_loss_weights={"loss_pruning": 0.5})
    extra_losses = {"loss_pruning": torch.tensor(3.0), "loss_dec_moe_balance": torch.tensor(1.0)}
    losses = crit({**outputs, "extra_losses": extra_losses}, targets)
    assert losses["loss_pruning"].item() == pytest.approx(1.5)
    assert losses["loss_dec_moe_balance"].item() == pytest.approx(0.05)
    mystery = {**outputs, "extra_losses": {"loss_mystery": torch.tensor(1.0)}}
    with pytest.raises(KeyError, match="loss_mystery"):
        SetCriterion(NUM_CLASSES, HungarianMatcher())(mystery, targets)
    with pytest.raises(UnknownLossError):
        SetCriterion(NUM_CLASSES, HungarianMatcher())(mystery, targets)


def test_total_loss_is_sum_of_values():
    d = {"a": torch.tensor(1.5), "b": torch.tensor(2.0)}
    assert total_loss(d).item() == pytest.approx(3.5)


def test_focal_variant_and_constructor_validation():
    targets = _targets()
    logits, boxes = _perfect_outputs(targets, 4, [[0, 1], [2]])
    crit = SetCriterion(NUM_CLASSES, HungarianMatcher(), weight_dict={"loss_focal": 1.0}, alpha=0.25,
                        losses=("focal", "boxes"))
    losses = crit({"pred_logits": logits, "pred_boxes": boxes}, targets)
    assert set(losses) == {"loss_focal", "loss_bbox", "loss_giou"}
    assert 0 <= losses["loss_focal"].item() < 1e-3
    with pytest.raises(ValueError, match="no weight"):
        SetCriterion(NUM_CLASSES, HungarianMatcher(), losses=("focal",))
    with pytest.raises(ValueError, match="unknown loss"):
        SetCriterion(NUM_CLASSES, HungarianMatcher(), losses=("labels",))


def test_out_of_range_label_is_an_error():
    targets = [{"labels": torch.tensor([NUM_CLASSES]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}]
    logits, boxes = torch.zeros(1, 3, NUM_CLASSES), torch.full((1, 3, 4), 0.3)
    with pytest.raises(ValueError, match="labels must lie"):
        SetCriterion(NUM_CLASSES, HungarianMatcher())({"pred_logits": logits, "pred_boxes": boxes}, targets)


def test_num_boxes_under_single_process_distributed(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        targets = [{"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])},
                   {"labels": torch.tensor([0]), "boxes": torch.tensor([[0.2, 0.2, 0.2, 0.2]])}]
        boxes = torch.tensor([[[0.6, 0.5, 0.2, 0.2]], [[0.2, 0.2, 0.2, 0.2]]])
        crit = SetCriterion(NUM_CLASSES, FixedMatcher([([0], [0]), ([0], [0])]))
        losses = crit({"pred_logits": torch.zeros(2, 1, NUM_CLASSES), "pred_boxes": boxes}, targets)
        assert losses["loss_bbox"].item() == pytest.approx(5 * 0.1 / 2, rel=1e-5)
    finally:
        dist.destroy_process_group()
