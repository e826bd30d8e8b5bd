"""Box ops and Hungarian matcher: hand-computed values and brute-force assignment."""

import itertools
import math

import pytest
import torch

from dset.models.box_ops import (
    box_cxcywh_to_xyxy,
    box_iou,
    box_xyxy_to_cxcywh,
    elementwise_box_iou,
    elementwise_generalized_box_iou,
    generalized_box_iou,
)
from dset.models.matcher import HungarianMatcher

# ----------------------------------------------------------------------------- box ops


def test_conversions_known_values_and_round_trip():
    cxcywh = torch.tensor([[0.5, 0.5, 0.2, 0.4], [0.1, 0.9, 0.0, 0.2]])
    xyxy = box_cxcywh_to_xyxy(cxcywh)
    torch.testing.assert_close(xyxy, torch.tensor([[0.4, 0.3, 0.6, 0.7], [0.1, 0.8, 0.1, 1.0]]))
    torch.testing.assert_close(box_xyxy_to_cxcywh(xyxy), cxcywh)
    g = torch.Generator().manual_seed(0)
    b = torch.rand(7, 3, 4, generator=g)  # arbitrary leading dims
    torch.testing.assert_close(box_cxcywh_to_xyxy(box_xyxy_to_cxcywh(b)), b)


def test_iou_and_giou_hand_values():
    a = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 2.0, 2.0]])
    b = torch.tensor([[0.0, 0.0, 1.0, 1.0], [2.0, 0.0, 3.0, 1.0], [1.0, 1.0, 3.0, 3.0]])
    iou, union = box_iou(a, b)
    expected_iou = torch.tensor([[1.0, 0.0, 0.0], [0.25, 0.0, 1 / 7]])
    expected_union = torch.tensor([[1.0, 2.0, 5.0], [4.0, 5.0, 7.0]])
    torch.testing.assert_close(iou, expected_iou)
    torch.testing.assert_close(union, expected_union)
    giou = generalized_box_iou(a, b)
    expected_giou = torch.tensor(
        [
            [1.0, -1 / 3, 0 - (9 - 5) / 9],  # identical; disjoint side by side: enclosing 3, union 2
            [0.25, 0 - (6 - 5) / 6, 1 / 7 - (9 - 7) / 9],
        ]
    )
    torch.testing.assert_close(giou, expected_giou)
    # elementwise variants are the diagonal of the pairwise ones
    a2 = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 2.0, 2.0]])
    b2 = torch.tensor([[2.0, 0.0, 3.0, 1.0], [1.0, 1.0, 3.0, 3.0]])
    torch.testing.assert_close(elementwise_generalized_box_iou(a2, b2), torch.tensor([-1 / 3, 1 / 7 - 2 / 9]))
    torch.testing.assert_close(elementwise_box_iou(a2, b2)[0], torch.tensor([0.0, 1 / 7]))


def test_elementwise_matches_diagonal_random():
    g = torch.Generator().manual_seed(1)
    a = box_cxcywh_to_xyxy(torch.rand(20, 4, generator=g))
    b = box_cxcywh_to_xyxy(torch.rand(20, 4, generator=g))
    torch.testing.assert_close(elementwise_generalized_box_iou(a, b), generalized_box_iou(a, b).diag())
    torch.testing.assert_close(elementwise_box_iou(a, b)[0], box_iou(a, b)[0].diag())
    assert (generalized_box_iou(a, b) >= -1).all() and (generalized_box_iou(a, b) <= 1).all()


def test_giou_rejects_degenerate_but_passes_nan_through():
    good = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    bad = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.5, 0.0, 0.4, 1.0]])
    with pytest.raises(ValueError, match="degenerate.*row 1"):
        generalized_box_iou(bad, good)
    with pytest.raises(ValueError, match="degenerate"):
        elementwise_generalized_box_iou(good, bad[1:])
    nan_box = torch.tensor([[float("nan"), 0.0, 1.0, 1.0]])
    out = generalized_box_iou(nan_box, good)
    assert torch.isnan(out).all()


# ----------------------------------------------------------------------------- matcher


def _focal_cost(logit: float, alpha: float = 0.25, gamma: float = 2.0) -> float:
    p = 1 / (1 + math.exp(-logit))
    pos = alpha * (1 - p) ** gamma * -math.log(p + 1e-8)
    neg = (1 - alpha) * p**gamma * -math.log(1 - p + 1e-8)
    return pos - neg


def _giou_py(a, b) -> float:
    ax1, ay1, ax2, ay2 = a[0] - a[2] / 2, a[1] - a[3] / 2, a[0] + a[2] / 2, a[1] + a[3] / 2
    bx1, by1, bx2, by2 = b[0] - b[2] / 2, b[1] - b[3] / 2, b[0] + b[2] / 2, b[1] + b[3] / 2
    inter = max(0.0, min(ax2, bx2) - max(ax1, bx1)) * max(0.0, min(ay2, by2) - max(ay1, by1))
    union = a[2] * a[3] + b[2] * b[3] - inter
    encl = (max(ax2, bx2) - min(ax1, bx1)) * (max(ay2, by2) - min(ay1, by1))
    return inter / union - (encl - union) / encl


def _pair_cost(logits, box, label, tgt_box) -> float:
    l1 = sum(abs(x - y) for x, y in zip(box, tgt_box))
    return 5.0 * l1 + 2.0 * _focal_cost(logits[label]) + 2.0 * -_giou_py(box, tgt_box)


def _brute_force(logits, boxes, labels, tgt_boxes):
    """Minimum total cost and its (query, target) pairs over all injective target -> query maps."""
    q, n = len(boxes), len(labels)
    cost = [[_pair_cost(logits[i], boxes[i], labels[j], tgt_boxes[j]) for j in range(n)] for i in range(q)]
    best, best_pairs = math.inf, None
    for queries in itertools.permutations(range(q), n):  # queries[j] is the query for target j
        total = sum(cost[queries[j]][j] for j in range(n))
        if total < best:
            best, best_pairs = total, sorted((queries[j], j) for j in range(n))
    return best, best_pairs, cost


def _random_problem(gen, bs, q, c, sizes):
    logits = torch.randn(bs, q, c, generator=gen) * 2
    boxes = torch.cat([torch.rand(bs, q, 2, generator=gen) * 0.6 + 0.2,
                       torch.rand(bs, q, 2, generator=gen) * 0.3 + 0.05], -1)
    targets = []
    for n in sizes:
        tb = torch.cat([torch.rand(n, 2, generator=gen) * 0.6 + 0.2, torch.rand(n, 2, generator=gen) * 0.3 + 0.05], -1)
        targets.append({"labels": torch.randint(0, c, (n,), generator=gen), "boxes": tb})
    return {"pred_logits": logits, "pred_boxes": boxes}, targets


@pytest.mark.parametrize("seed", range(6))
def test_matcher_agrees_with_brute_force(seed):
    gen = torch.Generator().manual_seed(seed)
    sizes = [3, 0, 1, 2]
    outputs, targets = _random_problem(gen, len(sizes), 5, 4, sizes)
    indices = HungarianMatcher()(outputs, targets)  # one batched call: also checks the per-image split
    assert len(indices) == len(sizes)
    for b, (n, (qi, ti)) in enumerate(zip(sizes, indices)):
        assert qi.dtype == torch.int64 and ti.dtype == torch.int64
        assert len(qi) == len(ti) == n
        if n == 0:
            continue
        best, best_pairs, cost = _brute_force(
            outputs["pred_logits"][b].tolist(),
            outputs["pred_boxes"][b].tolist(),
            targets[b]["labels"].tolist(),
            targets[b]["boxes"].tolist(),
        )
        got = sum(cost[i][j] for i, j in zip(qi.tolist(), ti.tolist()))
        assert got == pytest.approx(best, rel=1e-5, abs=1e-5)
        assert sorted(zip(qi.tolist(), ti.tolist())) == best_pairs
        assert sorted(ti.tolist()) == list(range(n))


def test_matcher_fewer_queries_than_targets():
    gen = torch.Generator().manual_seed(7)
    outputs, targets = _random_problem(gen, 1, 2, 3, [4])
    qi, ti = HungarianMatcher()(outputs, targets)[0]
    assert sorted(qi.tolist()) == [0, 1] and len(set(ti.tolist())) == 2


def test_matcher_empty_targets():
    gen = torch.Generator().manual_seed(3)
    outputs, targets = _random_problem(gen, 3, 5, 4, [0, 0, 0])
    indices = HungarianMatcher()(outputs, targets)
    assert len(indices) == 3
    for qi, ti in indices:
        assert qi.shape == (0,) and ti.shape == (0,) and qi.dtype == torch.int64 and ti.dtype == torch.int64


def test_class_cost_hand_values():
    m = HungarianMatcher()
    logits = torch.tensor([[0.0, 2.0, -1.0]])
    cost = m.class_cost(logits, torch.tensor([0, 1, 2, 1]))
    # logit 0: p = 0.5: pos = 0.25*0.25*ln2, neg = 0.75*0.25*ln2 -> -0.125*ln2
    assert cost[0, 0].item() == pytest.approx(-0.125 * math.log(2), abs=1e-6)
    expected = [_focal_cost(0.0), _focal_cost(2.0), _focal_cost(-1.0), _focal_cost(2.0)]
    torch.testing.assert_close(cost[0], torch.tensor(expected), rtol=1e-5, atol=1e-6)
    # the class cost of one query against one target, as the matcher's full cost with box weights 0
    m_cls = HungarianMatcher(cost_class=1.0, cost_bbox=0.0, cost_giou=0.0)
    assert m_cls.class_cost(torch.tensor([[2.0]]), torch.tensor([0])).item() == pytest.approx(_focal_cost(2.0),
                                                                                              rel=1e-5)
    # softmax variant: -softmax prob of the target class
    m_sm = HungarianMatcher(use_focal=False)
    torch.testing.assert_close(m_sm.class_cost(logits, torch.tensor([1])), -logits.softmax(-1)[:, [1]])


def test_matcher_prefers_class_when_boxes_equal():
    # two queries with identical boxes; the target's class is confident only in query 1
    outputs = {
        "pred_logits": torch.tensor([[[5.0, -5.0], [-5.0, 5.0]]]),
        "pred_boxes": torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.5, 0.5, 0.2, 0.2]]]),
    }
    targets = [{"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}]
    qi, ti = HungarianMatcher()(outputs, targets)[0]
    assert qi.tolist() == [1] and ti.tolist() == [0]


def test_matcher_nan_predictions_do_not_crash():
    gen = torch.Generator().manual_seed(5)
    outputs, targets = _random_problem(gen, 2, 5, 3, [2, 1])
    outputs["pred_boxes"][0, 2] = float("nan")
    outputs["pred_logits"][1, 0] = float("nan")
    indices = HungarianMatcher()(outputs, targets)
    assert [len(i) for i, _ in indices] == [2, 1]


def test_matcher_rejects_bad_shapes():
    with pytest.raises(ValueError, match="pred_logits"):
        HungarianMatcher()({"pred_logits": torch.zeros(2, 3), "pred_boxes": torch.zeros(2, 3, 4)}, [{}, {}])
    with pytest.raises(ValueError, match="cannot all be 0"):
        HungarianMatcher(0, 0, 0)
