"""The paired image bootstrap (analysis/compute/bootstrap.py): its mAP is pycocotools' mAP, on the evaluated images
and on any multiset of them, and its intervals and verdicts say what they should.

The synthetic case (tests/report_fixtures.py): 4 classes plus one listed class with no box, images without
ground truth, misses, loose boxes and false positives, continuous scores.
"""

from __future__ import annotations

import copy
import math
import statistics

import numpy as np
import pytest
import report_fixtures as F

from analysis.compute import bootstrap


@pytest.fixture(scope="module")
def case():
    gt = F.synthetic_ground_truth(40, 4, seed=0, extra_category=True)
    assert any(not [a for a in gt["annotations"] if a["image_id"] == im["id"]] for im in gt["images"])
    good = F.synthetic_detections(gt, recall=0.9, jitter=0.05, false_per_image=1.0, seed=1)
    poor = F.synthetic_detections(gt, recall=0.6, jitter=0.15, false_per_image=3.0, seed=2)
    assert any(d["category_id"] == 5 for d in poor)  # false positives of the class without ground truth
    return gt, good, poor


def _duplicated(gt: dict, dets: list[dict], counts: np.ndarray) -> tuple[dict, list[dict]]:
    """The ground truth and detections with image ``i`` present ``counts[i]`` times, each copy a new image id."""
    ids = sorted(im["id"] for im in gt["images"])
    out_gt = {"images": [], "annotations": [], "categories": copy.deepcopy(gt["categories"])}
    out_dets = []
    for iid, n in zip(ids, counts):
        for c in range(int(n)):
            new = iid + 100_000 * (c + 1)
            im = next(im for im in gt["images"] if im["id"] == iid)
            out_gt["images"].append({**im, "id": new})
            for a in gt["annotations"]:
                if a["image_id"] == iid:
                    out_gt["annotations"].append({**copy.deepcopy(a), "image_id": new,
                                                  "id": len(out_gt["annotations"]) + 1})
            out_dets += [{**copy.deepcopy(d), "image_id": new} for d in dets if d["image_id"] == iid]
    return out_gt, out_dets


def test_identity_sample_is_pycocotools(case):
    gt, good, poor = case
    for dets in (good, poor, []):
        ev = bootstrap.evaluate_run(gt, dets, name="run")
        m, m50 = ev.observed()
        if dets:
            ref = F.coco_stats(gt, dets)
            assert 0.05 < ref[0] < ref[1] < 1
            assert (m, m50) == pytest.approx(ref, abs=1e-9)
        else:
            assert (m, m50) == (0.0, 0.0)


def test_a_resample_is_pycocotools_on_physically_duplicated_images(case):
    gt, good, poor = case
    n = len(gt["images"])
    rng = np.random.default_rng(5)
    counts = [rng.multinomial(n, np.ones(n) / n) for _ in range(3)]
    # and a resample without any image of class 4: that class is skipped, as pycocotools skips it (-1)
    with_4 = {a["image_id"] for a in gt["annotations"] if a["category_id"] == 4}
    ids = sorted(im["id"] for im in gt["images"])
    no_4 = np.array([0 if iid in with_4 else 2 for iid in ids])
    no_4[0] += 1
    counts.append(no_4)
    assert max(c.max() for c in counts) >= 3
    for dets in (good, poor):
        ev = bootstrap.evaluate_run(gt, dets, name="run")
        m, m50 = bootstrap.map_replicates(ev, np.stack(counts))
        for j, c in enumerate(counts):
            ref = F.coco_stats(*_duplicated(gt, dets, c))
            assert (m[j], m50[j]) == pytest.approx(ref, abs=1e-9), j


def test_image_weights_are_draws_with_replacement():
    w = bootstrap.image_weights(32, 500, seed=3)
    assert w.shape == (500, 32) and (w.sum(axis=1) == 32).all()
    assert (w == 0).any() and (w >= 2).any()
    assert np.array_equal(w, bootstrap.image_weights(32, 500, seed=3))
    assert w.mean() == pytest.approx(1.0)


def test_paired_delta_one_seed_is_the_paired_image_bootstrap(case):
    gt, good, poor = case
    v, b = bootstrap.evaluate_run(gt, good, name="good"), bootstrap.evaluate_run(gt, poor, name="poor")
    r = bootstrap.paired_delta([v], [b], n_resamples=400, seed=7)
    assert r.map.delta == pytest.approx(F.coco_stats(gt, good)[0] - F.coco_stats(gt, poor)[0], abs=1e-9)
    assert r.map50.delta == pytest.approx(F.coco_stats(gt, good)[1] - F.coco_stats(gt, poor)[1], abs=1e-9)
    # both sides on the same resamples: the deltas are the differences of the per-resample mAPs
    w = bootstrap.image_weights(len(gt["images"]), 400, seed=7)
    d = bootstrap.map_replicates(v, w)[0] - bootstrap.map_replicates(b, w)[0]
    assert (r.map.low, r.map.high) == pytest.approx(tuple(np.quantile(d, [0.025, 0.975])))
    assert 0 < r.map.low < r.map.delta < r.map.high
    assert r.map.verdict == "better (95% CI above 0)" and r.map50.verdict == "better (95% CI above 0)"
    assert (r.n_variant, r.n_baseline, r.n_images, r.n_resamples) == (1, 1, 40, 400)
    worse = bootstrap.paired_delta([b], [v], n_resamples=400, seed=7)
    assert worse.map.verdict == "worse (95% CI below 0)"
    assert (worse.map.low, worse.map.high) == pytest.approx((-r.map.high, -r.map.low))
    same = bootstrap.paired_delta([v], [v], n_resamples=200)
    assert (same.map.delta, same.map.low, same.map.high) == (0.0, 0.0, 0.0)
    assert same.map.verdict == "no difference detected (95% CI includes 0)"


def test_several_seeds_add_a_t_based_seed_term_without_shrinkage(case):
    """Two seeds a side: the interval is the paired image bootstrap of the seed-averaged ΔmAP, widened on each side in
    quadrature by t(2 df) x the pooled seed SE (sample variances, ddof 1). Resampling two seeds with replacement (or
    ddof 0) would shrink the seed variance by (n-1)/n = 1/2: the exact values below would then be off by far more
    than rounding."""
    from scipy import stats as sst

    gt, good, poor = case
    mid = F.synthetic_detections(gt, recall=0.75, jitter=0.1, false_per_image=2.0, seed=4)
    poorer = F.synthetic_detections(gt, recall=0.3, jitter=0.3, false_per_image=6.0, seed=5)
    v = [bootstrap.evaluate_run(gt, good, name="v0"), bootstrap.evaluate_run(gt, mid, name="v1")]
    b = [bootstrap.evaluate_run(gt, poor, name="b0"), bootstrap.evaluate_run(gt, poorer, name="b1")]
    r = bootstrap.paired_delta(v, b, n_resamples=400, seed=1)
    w = bootstrap.image_weights(len(gt["images"]), 400, seed=1)
    deltas = np.mean([bootstrap.map_replicates(ev, w)[0] for ev in v], axis=0) - np.mean(
        [bootstrap.map_replicates(ev, w)[0] for ev in b], axis=0)
    v_obs, b_obs = [ev.observed()[0] for ev in v], [ev.observed()[0] for ev in b]
    observed = statistics.fmean(v_obs) - statistics.fmean(b_obs)
    pooled = ((len(v_obs) - 1) * statistics.variance(v_obs) + (len(b_obs) - 1) * statistics.variance(b_obs)) / 2
    se_seed = math.sqrt(pooled * (1 / 2 + 1 / 2))
    half = sst.t.ppf(0.975, 2) * se_seed
    p_low, p_high = np.quantile(deltas, [0.025, 0.975])
    assert (r.map.seed_dof, r.map.se_seed) == (2, pytest.approx(se_seed))
    assert r.map.low == pytest.approx(observed - math.hypot(observed - p_low, half))
    assert r.map.high == pytest.approx(observed + math.hypot(p_high - observed, half))
    # decisive: the seed term is a large part of the width, so a shrunk one (x sqrt(1/2)) moves the bounds visibly
    shrunk = observed + math.hypot(p_high - observed, half * math.sqrt(0.5))
    assert r.map.high - shrunk > 0.1 * (r.map.high - r.map.low)
    assert r.map.se_image == pytest.approx(np.std(deltas, ddof=1))
    # MDE: 2.80 x SE_image and (t_0.975 + t_0.80 on 2 df) x SE_seed, in quadrature
    z = sst.norm.ppf(0.975) + sst.norm.ppf(0.8)
    t = sst.t.ppf(0.975, 2) + sst.t.ppf(0.8, 2)
    assert r.map.mde == pytest.approx(math.hypot(z * r.map.se_image, t * se_seed))
    assert z == pytest.approx(2.8016, abs=1e-4)


def test_seed_term_pools_sample_variances_and_one_seed_a_side_has_none():
    se, dof = bootstrap.seed_term(np.array([[0.50], [0.52], [0.54]]), np.array([[0.40]]))
    # one side with one seed borrows the other's spread: s^2 = 0.0004 (ddof 1), SE = s sqrt(1/3 + 1)
    assert dof == 2 and se[0] == pytest.approx(math.sqrt(0.0004 * (1 / 3 + 1)))
    se, dof = bootstrap.seed_term(np.array([[0.5, 0.6]]), np.array([[0.4, 0.3]]))
    assert dof == 0 and list(se) == [0.0, 0.0]


def test_runs_on_different_images_are_an_error(case):
    gt, good, poor = case
    sub = copy.deepcopy(gt)
    sub["images"] = sub["images"][:30]
    keep = {im["id"] for im in sub["images"]}
    sub["annotations"] = [a for a in sub["annotations"] if a["image_id"] in keep]
    a = bootstrap.evaluate_run(gt, good, name="run-a")
    b = bootstrap.evaluate_run(sub, [d for d in poor if d["image_id"] in keep], name="run-b")
    with pytest.raises(ValueError, match=r"different images: run-a \(40 images\) and run-b \(30 images\)"):
        bootstrap.paired_delta([a], [b])
    with pytest.raises(ValueError, match="run-x: detection 0 is on image 1040"):
        bootstrap.evaluate_run(sub, [d for d in good if d["image_id"] == 1040], name="run-x")


def test_verdict_and_noise_floor():
    assert bootstrap.verdict(0.001, 0.02) == "better (95% CI above 0)"
    assert bootstrap.verdict(-0.02, -0.001) == "worse (95% CI below 0)"
    assert bootstrap.verdict(-0.01, 0.02) == "no difference detected (95% CI includes 0)"
    assert bootstrap.verdict(0.0, 0.02) == "no difference detected (95% CI includes 0)"
    assert bootstrap.relative_percent(0.6, 0.5) == pytest.approx(20.0)
    assert math.isnan(bootstrap.relative_percent(0.0032, 0.001))  # "+220%" of two near-zero mAPs: not shown
    assert bootstrap.relative_percent(0.012, 0.001) == pytest.approx(1100.0)  # one side above the floor: shown
    assert math.isnan(bootstrap.relative_percent(0.5, 0.0))
