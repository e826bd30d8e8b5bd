"""What a fingerprint is made of: published stage-1 weights by content, the code of every project package and
the torch version, the weight files a configuration loads."""

from __future__ import annotations

import shutil

import torch

from dset import provenance
from dset.config import load_config
from studies.planning import pretrain


def _weights_file(path, value: float):
    torch.save({"model": {"w": torch.full((4,), value)}}, path)
    return path


def test_published_stage1_is_keyed_by_its_content_not_its_path(tmp_path):
    ckpt = _weights_file(tmp_path / "rtdetr_r18.pth", 1.0)
    spec_ = {"checkpoints": {18: str(ckpt)}}
    first = pretrain.plan_stage1(spec_, 18)
    assert first.key == provenance.file_digest(ckpt)[:16]
    assert pretrain.plan_stage1(spec_, 18).key == first.key                 # the same file: the same start
    _weights_file(ckpt, 2.0)                                          # replaced in place, same name
    assert pretrain.plan_stage1(spec_, 18).key != first.key
    assert first.key in first.describe() and first.key in first.init_source()


def test_weights_digest_follows_the_files_a_configuration_loads(tmp_path):
    assert provenance.weights_digest(load_config("rtdetr_r18")) is None
    ckpt = _weights_file(tmp_path / "start.pth", 1.0)
    cfg = load_config("rtdetr_r18", [f"model.checkpoint={ckpt}"])
    before = provenance.weights_digest(cfg)
    _weights_file(ckpt, 3.0)
    assert provenance.weights_digest(cfg) != before and len(before) == 16


def test_code_version_covers_every_project_package_and_torch(tmp_path, monkeypatch):
    copy = tmp_path / "project"
    for package in provenance.PROJECT_PACKAGES:
        shutil.copytree(provenance.PROJECT_DIR / package, copy / package,
                        ignore=shutil.ignore_patterns("__pycache__"))

    def version() -> str:
        provenance.code_version.cache_clear()
        return provenance.code_version()

    monkeypatch.setattr(provenance, "PROJECT_DIR", copy)
    base = version()
    assert version() == base
    for package in provenance.PROJECT_PACKAGES:                        # an edit in any package is other code
        init = copy / package / "__init__.py"
        original = init.read_text()
        init.write_text(original + "\n# edited\n")
        assert version() != base, package
        init.write_text(original)
    assert version() == base
    monkeypatch.setattr(provenance, "_installed_version", lambda dist: "0.0-other")   # another torch
    assert version() != base
    monkeypatch.undo()
    provenance.code_version.cache_clear()


def test_a_cell_whose_weight_file_was_replaced_is_another_cell(tmp_path):
    from studies.planning.cells import grid_cells
    from studies.planning.study import load_study

    ckpt = _weights_file(tmp_path / "start.pth", 1.0)
    first = grid_cells(load_study("smoke", [f"model.backbone.pretrained={ckpt}"]))[0]
    assert grid_cells(load_study("smoke", [f"model.backbone.pretrained={ckpt}"]))[0].fingerprint == \
        first.fingerprint
    _weights_file(ckpt, 5.0)                                          # the same path, other weights
    again = grid_cells(load_study("smoke", [f"model.backbone.pretrained={ckpt}"]))[0]
    assert again.cell_key == first.cell_key and again.fingerprint != first.fingerprint
