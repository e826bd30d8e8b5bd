"""DSET's study protocol: stage 1 (an RT-DETR checkpoint per backbone: trained here and cached, or published),
stage 2 (every cell fine-tuned from it), and when a finished cell still counts (same code, same data).

The end-to-end tests run on the smoke budget (64 px, 2 steps per epoch) with one torch thread."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import one_thread_for_module

import dset
from dset import provenance
from dset.config import load_config
from studies.planning import pretrain
from studies.planning.cells import grid_cells
from studies.planning.study import load_study
from studies.run import main
from studies.tracking import schema
from studies.tracking.cell_state import classify_cell

one_thread = pytest.fixture(autouse=True, scope="module")(one_thread_for_module)

BASE = {"model.encoder_moe.enabled": False, "model.token_pruning.enabled": False, "model.decoder_moe.enabled": False}
DSET = {"model.encoder_moe.enabled": True, "model.token_pruning.enabled": True, "model.decoder_moe.enabled": True}


def write_study(path: Path, budget: str = "smoke", variants: tuple = ("off", "dset"), **extra) -> Path:
    grid = {"backbone": {"r18": {"preset": "rtdetr_r18"}},
            "variant": {k: v for k, v in (("off", BASE), ("dset", DSET)) if k in variants}}
    path.write_text(yaml.safe_dump({"kind": "grid", "budget": budget, "seeds": [0], "grid": grid, **extra}))
    return path



def runs_of(uri: str, experiment: str) -> list:
    from mlflow.tracking import MlflowClient

    c = MlflowClient(tracking_uri=uri)
    exp = c.get_experiment_by_name(experiment)
    return list(c.search_runs([exp.experiment_id], max_results=1000)) if exp else []


# ------------------------------------------------------------------------------------------ stage 1 plan
def test_every_cell_of_the_default_grid_fine_tunes_from_its_backbones_stage1():
    st = load_study("ablation_grid")
    cells = grid_cells(st)
    by_depth: dict[int, set] = {}
    for cell in cells:
        by_depth.setdefault(cell.config.model.backbone.depth, set()).add(id(cell.stage1))
        assert cell.stage1.kind == "train" and cell.stage1.depth == cell.config.model.backbone.depth
    # one stage 1 per backbone, shared by all eight cells (the all-off RT-DETR cell included)
    assert {d: len(ids) for d, ids in by_depth.items()} == {18: 1, 34: 1}
    r18 = next(c for c in cells if c.id == "r18-base-s0").stage1
    assert r18.config.model.name == "rtdetr_r18" and not r18.config.model.token_pruning.enabled
    assert r18.config.run.budget == "pretrain_cpu"
    r34 = next(c for c in cells if c.id == "r34-base-s0").stage1   # a budget per backbone: R34 at a lower rate
    assert r34.config.run.budget == "pretrain_cpu_r34" and r34.config.train.lr < r18.config.train.lr
    assert r18.checkpoint == r18.folder / "checkpoints" / "best.pt"
    assert r18.folder.parent == pretrain.cache_root() and r18.key in r18.folder.name
    # the fine-tuning rates of the paper: pretrained parts 1e-5, new parts 1e-4
    assert all(c.config.train.lr_pretrained == 1e-5 and c.config.train.lr == 1e-4 for c in cells)


def test_stage1_cache_key_follows_config_data_and_code(monkeypatch, tmp_path):
    spec_ = {"budget": "smoke"}
    a = pretrain.plan_stage1(spec_, 18)
    assert pretrain.plan_stage1(spec_, 18).key == a.key                     # deterministic
    assert pretrain.plan_stage1(spec_, 34).key != a.key                     # another configuration
    assert pretrain.plan_stage1({"budget": "smoke", "seed": 1}, 18).key != a.key
    assert pretrain.plan_stage1(spec_, 18, ["run.device=cpu", "run.progress=false"]).key == a.key   # result-neutral
    monkeypatch.setattr(pretrain, "code_version", lambda: "another-version")
    assert pretrain.plan_stage1(spec_, 18).key != a.key                     # other code: trained anew
    monkeypatch.undo()
    monkeypatch.setenv("DSET_CACHE_DIR", str(tmp_path / "elsewhere"))
    moved = pretrain.plan_stage1(spec_, 18)
    assert moved.folder.parent == tmp_path / "elsewhere" / "pretrained" and not moved.cached


def test_data_digest_follows_the_annotation_files(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    ann = tmp_path / "train.json"
    ann.write_text(json.dumps({"images": [], "annotations": [], "categories": [{"id": 1, "name": "a"}]}))
    coco = ["data.name=coco", f"data.train.images={images}", f"data.train.annotations={ann}",
            f"data.val.images={images}", f"data.val.annotations={ann}"]
    before = provenance.data_digest(load_config("rtdetr_r18", coco))
    ann.write_text(json.dumps({"images": [], "annotations": [], "categories": [{"id": 1, "name": "b"}]}))
    assert provenance.data_digest(load_config("rtdetr_r18", coco)) != before
    synthetic = provenance.data_digest(load_config("rtdetr_r18", ["data.synthetic.seed=0"]))
    assert provenance.data_digest(load_config("rtdetr_r18", ["data.synthetic.seed=1"])) != synthetic
    assert len(provenance.code_version()) == 16


def test_a_budget_without_stage1_is_an_error_and_none_is_explicit(tmp_path):
    budget = tmp_path / "budget_mine.yaml"
    budget.write_text(yaml.safe_dump({"data": {"image_size": 64, "synthetic": {"image_size": 64}},
                                      "model": {"eval_spatial_size": [64, 64]}}))
    study = write_study(tmp_path / "study.yaml", budget=str(budget))
    with pytest.raises(pretrain.PretrainError, match="pretrain=none"):
        grid_cells(load_study(str(study)))
    cells = grid_cells(load_study(str(study), ["pretrain=none"]))
    assert all(c.stage1.kind == "none" and c.stage1.checkpoint is None for c in cells)


# ---------------------------------------------------------------------------------- published checkpoints
def _coco_overrides(tmp_path) -> list[str]:
    from dset.data.synthetic import make_synthetic_coco

    paths = make_synthetic_coco(root=tmp_path / "coco", num_train=4, num_val=2, image_size=64)
    return [f"data.train.images={paths['train_images']}", f"data.train.annotations={paths['train_annotations']}",
            f"data.val.images={paths['val_images']}", f"data.val.annotations={paths['val_annotations']}"]


def test_paper_budget_without_its_published_checkpoint_stops_before_any_work(tmp_path, store, capsys):
    code = main(["ablation_grid", "budget=paper", *_coco_overrides(tmp_path)])
    assert code == 2
    err = capsys.readouterr().err
    assert "checkpoints/rtdetrv2_r18vd_120e_coco_rerun_48.1.pth" in err and "github.com/lyuwenyu/RT-DETR" in err
    assert "pretrain.checkpoints.18=PATH" in err
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "runs").exists()


def test_paper_budget_starts_every_cell_from_the_published_files(tmp_path, store, capsys):
    files = {}
    for depth in (18, 34):   # a published file's stand-in in RT-DETRv2's layout (80 classes)
        state = dset.build_model(f"rtdetr_r{depth}").state_dict()
        files[depth] = tmp_path / f"rtdetrv2_r{depth}vd.pth"
        torch.save({"ema": {"module": state}}, files[depth])
    args = ["ablation_grid", "budget=paper", *_coco_overrides(tmp_path),
            f"pretrain.checkpoints.18={files[18]}", f"pretrain.checkpoints.34={files[34]}"]
    assert main([*args, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"R18: published checkpoint {files[18]}" in out and f"R34: published checkpoint {files[34]}" in out
    cells = grid_cells(load_study("ablation_grid", args[1:]))
    assert {c.stage1.checkpoint for c in cells} == {files[18], files[34]}
    # only R18 overridden: R34 keeps the budget's file (and is then missing)
    with pytest.raises(pretrain.PretrainError, match="rtdetrv2_r34vd_120e_coco_ema.pth"):
        grid_cells(load_study("ablation_grid", ["budget=paper", *_coco_overrides(tmp_path),
                                                          f"pretrain.checkpoints.18={files[18]}"]))


# ------------------------------------------------------------------------------- fingerprints and staleness
class _Run:
    def __init__(self, fingerprint, status="FINISHED", code="c", data="d"):
        self.info = type("I", (), {"status": status, "run_id": "r" * 32})()
        self.data = type("D", (), {"tags": {schema.TAG_FINGERPRINT: fingerprint, schema.TAG_CODE_VERSION: code,
                                            schema.TAG_DATA_DIGEST: data}})()


def test_a_cell_made_by_other_code_or_data_is_stale(monkeypatch):
    st = load_study("smoke")
    cell = grid_cells(st)[0]
    monkeypatch.setattr("studies.planning.cells.code_version", lambda: "other")
    other_code = grid_cells(load_study("smoke"))[0]
    assert other_code.cell_key == cell.cell_key and other_code.fingerprint != cell.fingerprint
    monkeypatch.undo()
    other_data = grid_cells(load_study("smoke", ["data.synthetic.seed=5"]))[0]
    assert other_data.fingerprint != cell.fingerprint

    old = _Run(cell.fingerprint)
    assert classify_cell(cell, {cell.fingerprint: old}, {cell.cell_key: old}, keep_stale=False) == ("finished", old)
    assert classify_cell(other_code, {cell.fingerprint: old}, {cell.cell_key: old}, keep_stale=False) == ("stale", old)
    assert classify_cell(other_code, {cell.fingerprint: old}, {cell.cell_key: old},
                         keep_stale=True) == ("finished", old)
    assert classify_cell(other_code, {}, {}, keep_stale=False) == ("new", None)


# ------------------------------------------------------------------------------------------ end to end
@pytest.mark.slow
def test_two_stages_end_to_end_cached_then_stale(tmp_path, store, capsys, monkeypatch):
    """Stage 1 trains once (an MLflow run tagged "pretrain"), the cells fine-tune from its checkpoint; a second
    study reuses the cache; other code makes the finished cells stale: the dry run says so, a run redoes them
    and the old runs are marked superseded (--keep-stale would have kept them)."""
    monkeypatch.setenv("DSET_CACHE_DIR", str(tmp_path / "cache"))
    study = write_study(tmp_path / "two_stage.yaml", variants=("dset",))   # one cell (DSET E+P+D): seconds
    args = [str(study), f"out_dir={tmp_path / 'runs'}", "run.progress=false"]
    assert main([*args, "--dry-run"]) == 0
    assert "RT-DETR trained here with budget smoke, to train first" in capsys.readouterr().out
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "stage 1: training RT-DETR R18 first" in out
    runs = runs_of(store, "two_stage")
    pre = [r for r in runs if r.data.tags[schema.TAG_ROLE] == "pretrain"]
    cells = [r for r in runs if r.data.tags[schema.TAG_ROLE] == "child"]
    assert len(pre) == 1 and len(cells) == 1 and pre[0].info.status == "FINISHED"
    stage1 = grid_cells(load_study(str(study)))[0].stage1
    assert stage1.cached and pre[0].data.tags[schema.TAG_STAGE1_KEY] == stage1.key
    assert pre[0].data.tags[schema.TAG_CHECKPOINT_DIR] == str(stage1.folder / "checkpoints")
    for run in cells:
        assert run.data.tags[schema.TAG_INIT_CHECKPOINT] == str(stage1.checkpoint.resolve())
        assert stage1.key in run.data.tags[schema.TAG_INIT_SOURCE]
        assert run.data.params["model.checkpoint"] == str(stage1.checkpoint.resolve())
        assert run.data.tags[schema.TAG_CODE_VERSION] == provenance.code_version()
        out_dir = Path(run.data.tags[schema.TAG_CHECKPOINT_DIR]).parent
        assert (out_dir / "eval" / "detections.json").is_file()

    # another study on the same machine: stage 1 comes from the cache, no pretraining run
    other = write_study(tmp_path / "second.yaml", variants=("off",))
    assert main([str(other), f"out_dir={tmp_path / 'runs2'}", "run.progress=false", "--dry-run"]) == 0
    assert "RT-DETR trained here with budget smoke, cached" in capsys.readouterr().out
    assert main([str(other), f"out_dir={tmp_path / 'runs2'}", "run.progress=false"]) == 0
    assert "stage 1: training" not in capsys.readouterr().out
    assert not [r for r in runs_of(store, "second") if r.data.tags[schema.TAG_ROLE] == "pretrain"]

    # other code: the finished cells are stale
    monkeypatch.setattr("studies.planning.cells.code_version", lambda: "0123456789abcdef")
    assert main([*args, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.count("STALE (code changed) -> rerun") == 1
    assert main([*args, "--dry-run", "--keep-stale"]) == 0
    assert capsys.readouterr().out.count("kept (--keep-stale)") == 1
    assert main(args) == 0
    runs = runs_of(store, "two_stage")
    old = {r.info.run_id for r in cells}
    superseded = {r.info.run_id: r.data.tags.get(schema.TAG_SUPERSEDED_BY) for r in runs if r.info.run_id in old}
    assert all(superseded.values())
    fresh = [r for r in runs if r.data.tags[schema.TAG_ROLE] == "child" and r.info.run_id not in old]
    assert len(fresh) == 1 and {r.info.run_id for r in fresh} == set(superseded.values())
    assert all(r.data.tags[schema.TAG_CODE_VERSION] == "0123456789abcdef" for r in fresh)
