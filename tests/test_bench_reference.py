"""The reference RT-DETR's training step beside ours (``python -m dset.bench train --reference DIR``,
dset/bench_reference.py). The reference's source is not here (CI has no GitHub): the mechanics are tested on a
stand-in checkout the test writes, with the reference's layout and API (its ``YAMLConfig``, ``dist_utils.reduce_dict``,
``MetricLogger``) around our own RT-DETR; the real one where ``DSET_REFERENCE_RTDETR`` names a checkout."""

from __future__ import annotations

import json
import os
import sys
import textwrap
from pathlib import Path

import pytest

from dset.bench import main as bench_main
from dset.bench_reference import ReferenceSourceError, reference_folder
from dset.bench_train import bench_train

TINY = ["data.image_size=64", "data.batch_size=2", "model.decoder.num_queries=10", "model.decoder.num_denoising=4",
        "model.eval_spatial_size=[64,64]", "data.synthetic.num_train=8", "data.synthetic.num_val=2",
        "data.synthetic.image_size=64", "run.device=cpu", "run.progress=false", "train.warmup_steps=1"]

# the stand-in's package: its __init__ imports what the real one imports and the bench stands in for
STAND_IN = {
    "src/__init__.py": """
        import faster_coco_eval.utils.pytorch            # not installed here: the bench's empty module
        from torch.utils.tensorboard import SummaryWriter  # likewise
        from . import core, misc
        BUILT = []
        """,
    "src/zoo/rtdetr/rtdetrv2_decoder.py": "",
    "src/core/__init__.py": """
        import torch
        import dset
        from dset.models.criterion import build_criterion
        from dset.config import load_config

        class _Criterion(torch.nn.Module):
            def __init__(self, cfg):
                super().__init__()
                self.inner = build_criterion(cfg)
                self.matcher = self.inner.matcher
            def forward(self, outputs, targets, epoch=None, step=None, global_step=None):
                self.inner.matcher = self.matcher
                return self.inner(outputs, targets)

        class _EMA:
            def __init__(self): self.updates = 0
            def to(self, device): return self
            def update(self, model): self.updates += 1

        class _Warmup:
            def __init__(self): self.steps = 0
            def step(self): self.steps += 1

        class YAMLConfig:
            def __init__(self, path, **kwargs):
                import src
                src.BUILT.append((path, kwargs))
                print("Initial lr: [0.0001]")   # the real one prints this to stdout
                dec = kwargs["RTDETRTransformerv2"]
                overrides = [f"model.num_classes={kwargs['num_classes']}",
                             f"model.decoder.num_queries={dec['num_queries']}",
                             f"model.decoder.num_denoising={dec['num_denoising']}", "model.eval_spatial_size=[64,64]"]
                self.cfg = load_config("rtdetr_r18", overrides)
                self.model = dset.build_model("rtdetr_r18", overrides)
                self.criterion = _Criterion(self.cfg)
                self.ema = _EMA()
                self.lr_warmup_scheduler = _Warmup()
                self.scaler = None
                self.yaml_cfg = {"clip_max_norm": 0.1}
                self._optimizer = None
            @property
            def optimizer(self):
                if self._optimizer is None:
                    self._optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
                return self._optimizer
        """,
    "src/misc/__init__.py": """
        from . import dist_utils
        class MetricLogger:
            def __init__(self, delimiter=""): self.seen = []
            def update(self, **kwargs):
                self.seen.append({k: float(v) for k, v in kwargs.items()})
        """,
    "src/misc/dist_utils.py": """
        def reduce_dict(data, avg=True):
            return data
        """,
    "configs/rtdetrv2/rtdetrv2_r18vd_120e_coco.yml": "# the stand-in's YAMLConfig does not read it\n",
}


@pytest.fixture
def stand_in(tmp_path):
    root = tmp_path / "RT-DETR"
    for name, text in STAND_IN.items():
        path = root / "rtdetrv2_pytorch" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    saved_meta_path, saved_path = list(sys.meta_path), list(sys.path)
    yield root
    for name in [m for m in sys.modules if m == "src" or m.startswith("src.") or m.startswith("faster_coco_eval")
                 or m.startswith("torch.utils.tensorboard")]:
        del sys.modules[name]
    assert sys.meta_path == saved_meta_path and sys.path == saved_path   # the bench put both back


def test_the_reference_step_runs_beside_ours_on_the_same_batches(stand_in):
    result = bench_train(["rtdetr_r18"], TINY, steps=2, warmup=1, reference=stand_in)
    ours, ref = result["models"]
    assert ref["model"] == "ref rtdetrv2_r18vd" and ref["config_name"].startswith("reference configs/rtdetrv2/")
    assert ref["reference_source"] == str((stand_in / "rtdetrv2_pytorch").resolve())
    # built with our configuration's classes, queries and denoising queries, so both do the same work
    import src
    (path, kwargs), = src.BUILT
    assert kwargs["RTDETRTransformerv2"] == {"num_queries": 10, "num_denoising": 4}
    assert kwargs["PResNet"] == {"pretrained": False} and path.endswith("rtdetrv2_r18vd_120e_coco.yml")
    assert ref["params"] == ours["params"] and ref["images_per_step"] == ours["images_per_step"] == [2, 2]
    # one size for every model: multi-scale off
    assert not ours["multi_scale"] and not ref["multi_scale"] and "data.multi_scale=false" in result["overrides"]
    # its step: an optimizer step (every tensor moved), its EMA and warm-up stepped, every loss term read back
    assert ref["params_changed_share"] > 0.9 and ref["update_norm"] > 0 and ref["mean_loss"] > 0
    assert ref["precision"] == "fp32" and ref["loss_check_every"] == 1
    assert 0 < ref["matcher_ms"] <= ref["parts_ms"]["loss"]
    assert result["vs_reference"] == {"rtdetr_r18": round(ours["images_per_s"] / ref["images_per_s"], 3)}


def test_the_cli_prints_one_json_object_and_the_ratio(stand_in, capsys):
    assert bench_main(["train", "rtdetr_r18", *TINY, "--steps", "1", "--warmup", "0", "--no-syncs",
                       "--reference", str(stand_in), "--json"]) == 0
    captured = capsys.readouterr()
    out = json.loads(captured.out)   # the reference's prints went to stderr
    assert "Initial lr" in captured.err and set(out["vs_reference"]) == {"rtdetr_r18"}


def test_a_folder_that_is_not_the_reference_is_refused(tmp_path, capsys):
    with pytest.raises(ReferenceSourceError, match="not a checkout of the reference RT-DETR"):
        reference_folder(tmp_path)
    assert bench_main(["train", "rtdetr_r18", *TINY, "--reference", str(tmp_path)]) == 2
    assert f"--reference {tmp_path}: not a checkout" in capsys.readouterr().err


REAL = os.environ.get("DSET_REFERENCE_RTDETR")


@pytest.mark.skipif(not REAL, reason="DSET_REFERENCE_RTDETR does not name a checkout of github.com/lyuwenyu/RT-DETR")
def test_the_real_reference_has_our_parameter_count_and_trains():
    result = bench_train(["rtdetr_r18"], TINY, steps=1, warmup=1, reference=Path(REAL))
    ours, ref = result["models"]
    # both R18s at 80 classes have 20,184,464; here 4 (the synthetic set's): 76 fewer rows in the 4 score heads
    # (encoder + 3 decoder layers, 256 weights + 1 bias each) and in the denoising class embedding (256 each)
    assert ref["params"] == ours["params"] == 20_184_464 - (80 - 4) * (4 * 257 + 256)
    assert ref["params_changed_share"] > 0.9 and ref["mean_loss"] > 0
