"""The reference RT-DETR's own training step, timed beside ours (``python -m dset.bench train --reference DIR``).

``DIR`` is a checkout of https://github.com/lyuwenyu/RT-DETR (the repository, or its ``rtdetrv2_pytorch`` folder).
Its model, criterion, optimizer, EMA, GradScaler and warm-up schedule are built by its own ``YAMLConfig`` from one
of its configs (default :data:`REFERENCE_CONFIG`, the backbone's pretrained download off), with our configuration's
classes, queries and denoising queries, so that both do the same work. Its step is the body of its
``det_engine.train_one_epoch``, cut into our parts: ``forward`` under its autocast (float16 on CUDA, where its config
has ``use_amp``; float32 on CPU), ``loss`` its criterion outside autocast, ``backward`` through its GradScaler,
``optimizer`` its unscale, gradient clipping, step, ``zero_grad``, EMA update and warm-up step, ``stats`` its
``reduce_dict``, ``isfinite`` check and ``MetricLogger.update`` (a host read of every loss term, every step). Its data
pipeline is not used: it takes our loader's batches of the same images at the same size.

Modules its package imports but the model, criterion and optimizer never use (``tensorboard``, ``faster_coco_eval``)
are replaced by empty modules where they are not installed, for the time of the import only."""

from __future__ import annotations

import contextlib
import importlib
import importlib.abc
import importlib.machinery
import math
import subprocess
import sys
import types
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

from .bench_step import Clock, TimedMatcher, TimedSteps
from .config import Config
from .data.loaders import build_datasets, build_train_loader, set_loader_epoch
from .engine.distributed import DistInfo, resolve_device
from .engine.errors import NonFiniteLossError

__all__ = ["REFERENCE_CONFIG", "ReferenceSourceError", "ReferenceStepBench", "reference_folder"]

REFERENCE_CONFIG = "configs/rtdetrv2/rtdetrv2_r18vd_120e_coco.yml"
UNUSED_IMPORTS = ("tensorboard", "torch.utils.tensorboard", "faster_coco_eval")
PACKAGE = "src"   # the reference's top-level package name


class ReferenceSourceError(ValueError):
    """The reference's source could not be found or built; the message names the path and what is missing."""


def reference_folder(path: str | Path) -> Path:
    """The ``rtdetrv2_pytorch`` folder of a checkout at ``path`` (the repository or the folder itself)."""
    path = Path(path).expanduser()
    for folder in (path / "rtdetrv2_pytorch", path):
        if (folder / PACKAGE / "zoo" / "rtdetr" / "rtdetrv2_decoder.py").is_file():
            return folder.resolve()
    raise ReferenceSourceError(
        f"--reference {path}: not a checkout of the reference RT-DETR (no rtdetrv2_pytorch/src/zoo/rtdetr/"
        "rtdetrv2_decoder.py there); get one with: git clone https://github.com/lyuwenyu/RT-DETR")


class _EmptyModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports of ``roots`` (and their submodules) give empty modules whose every attribute is an empty class."""

    def __init__(self, roots: tuple[str, ...]) -> None:
        self.roots = roots

    def find_spec(self, name, path=None, target=None):
        if any(name == r or name.startswith(r + ".") for r in self.roots):
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _EmptyModule(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module) -> None:
        pass


class _EmptyModule(types.ModuleType):
    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return type(name, (), {"__init__": lambda self, *args, **kwargs: None})


@contextlib.contextmanager
def _reference_imports(folder: Path) -> Iterator[None]:
    """``folder`` first on ``sys.path`` and the unused modules that are not installed stood in for, during the
    import only (the modules imported stay loaded)."""
    if PACKAGE in sys.modules and not str(getattr(sys.modules[PACKAGE], "__file__", "")).startswith(str(folder)):
        raise ReferenceSourceError(f"another package named {PACKAGE!r} is already imported "
                                   f"({sys.modules[PACKAGE]!r}): run the reference bench in its own process")
    missing = tuple(name for name in UNUSED_IMPORTS if importlib.util.find_spec(name.split(".")[0]) is None
                    or (name == "torch.utils.tensorboard" and importlib.util.find_spec("tensorboard") is None))
    finder = _EmptyModules(missing)
    sys.path.insert(0, str(folder))
    sys.meta_path.insert(0, finder)
    try:
        yield
    finally:
        sys.meta_path.remove(finder)
        sys.path.remove(str(folder))


def _commit(folder: Path) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


class ReferenceStepBench(TimedSteps):
    """The reference's model, criterion, optimizer, EMA, scaler and warm-up built by its ``YAMLConfig`` on
    ``cfg``'s device, fed ``cfg``'s training batches; its ``train_one_epoch`` step, cut into our parts."""

    def __init__(self, source: str | Path, cfg: Config, epoch: int = 0, config: str = REFERENCE_CONFIG) -> None:
        folder = reference_folder(source)
        config_path = folder / config
        if not config_path.is_file():
            raise ReferenceSourceError(f"--reference-config {config}: no such file in {folder}")
        self.device = resolve_device(cfg.run.device, DistInfo())
        data = build_datasets(cfg)
        sizes = {"num_classes": data.num_classes, "num_queries": cfg.model.decoder.num_queries,
                 "num_denoising": cfg.model.decoder.num_denoising}
        # its builders print (the initial learning rates): to stderr, so that --json's stdout stays one object
        with _reference_imports(folder), contextlib.redirect_stdout(sys.stderr):
            try:
                importlib.import_module(PACKAGE)   # registers its modules with its workspace
                core = importlib.import_module(f"{PACKAGE}.core")
                misc = importlib.import_module(f"{PACKAGE}.misc")
            except ImportError as exc:
                raise ReferenceSourceError(f"--reference {folder}: importing its package failed: {exc}") from exc
            ref = core.YAMLConfig(str(config_path), PResNet={"pretrained": False}, num_classes=sizes["num_classes"],
                                  RTDETRTransformerv2={"num_queries": sizes["num_queries"],
                                                       "num_denoising": sizes["num_denoising"]})
            # as its solver does: the model on the device first, then the EMA copy, the optimizer and the rest
            self.model = ref.model.to(self.device)
            self.criterion = ref.criterion.to(self.device)
            self.ema = ref.ema.to(self.device) if ref.ema is not None else None
            self.optimizer = ref.optimizer
            self.warmup = ref.lr_warmup_scheduler
            self.scaler = ref.scaler if self.device.type == "cuda" else None   # its AMP is CUDA's float16
            self.max_norm = float(ref.yaml_cfg.get("clip_max_norm", 0.0) or 0.0)
            self.reduce_dict = misc.dist_utils.reduce_dict
            self.logger = misc.MetricLogger(delimiter="  ")
        self.matcher = TimedMatcher(self.criterion.matcher)
        self.criterion.matcher = self.matcher
        self.label = "ref " + "_".join(Path(config).stem.split("_")[:2])   # e.g. "ref rtdetrv2_r18vd"
        self.cfg, self.epoch, self.sizes = cfg, epoch, None
        self.config, self.folder, self.commit, self.shared = config, folder, _commit(folder), sizes
        self.global_step = 0
        self.loss_values: list[float] = []
        self.model.train()
        self.criterion.train()
        loader = build_train_loader(data.train, cfg, pin_memory=self.device.type == "cuda")
        set_loader_epoch(loader, epoch, cfg.run.seed, 0)
        self.start(loader)

    def trained_params(self) -> list[torch.Tensor]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def step(self, clock: Clock) -> int:
        model, criterion, optimizer, scaler = self.model, self.criterion, self.optimizer, self.scaler
        device = self.device
        self.matcher.clock = clock
        clock.begin()
        with clock.part("data"):
            images, targets = self.next_batch()
        with clock.part("copy"):
            samples = images.to(device)
            targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
            metas = {"epoch": self.epoch, "step": self.global_step, "global_step": self.global_step}
        if scaler is not None:
            with clock.part("forward"), torch.autocast(device_type=device.type, cache_enabled=True):
                outputs = model(samples, targets=targets)
            with clock.part("loss"):
                with torch.autocast(device_type=device.type, enabled=False):
                    loss_dict = criterion(outputs, targets, **metas)
                loss = sum(loss_dict.values())
            with clock.part("backward"):
                scaler.scale(loss).backward()
            with clock.part("optimizer"):
                if self.max_norm > 0:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(model.parameters(), self.max_norm)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad()
        else:
            with clock.part("forward"):
                outputs = model(samples, targets=targets)
            with clock.part("loss"):
                loss_dict = criterion(outputs, targets, **metas)
                loss = sum(loss_dict.values())
            with clock.part("optimizer"):
                optimizer.zero_grad()
            with clock.part("backward"):
                loss.backward()
            with clock.part("optimizer"):
                if self.max_norm > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), self.max_norm)
                optimizer.step()
        with clock.part("optimizer"):
            if self.ema is not None:
                self.ema.update(model)
            if self.warmup is not None:
                self.warmup.step()
        with clock.part("stats"):
            reduced = self.reduce_dict(loss_dict)
            loss_value = sum(reduced.values())
            with warnings.catch_warnings():   # its check reads a tensor that requires grad, which torch warns about
                warnings.filterwarnings("ignore", message="Converting a tensor with requires_grad")
                finite = math.isfinite(loss_value)
            if not finite:
                raise NonFiniteLossError(f"the reference's loss is {float(loss_value)} at bench step "
                                         f"{self.global_step}: {({k: float(v) for k, v in reduced.items()})}")
            self.logger.update(loss=loss_value, **reduced)
            self.logger.update(lr=optimizer.param_groups[0]["lr"])
        self.loss_values.append(float(loss_value))
        self.global_step += 1
        self.matcher.clock = None
        return int(images.shape[0])

    def mean_loss(self) -> float:
        return sum(self.loss_values) / max(1, len(self.loss_values))

    def describe(self) -> dict:
        return {"config_name": f"reference {self.config}", "reference_source": str(self.folder),
                "reference_commit": self.commit,
                "precision": "fp16 autocast + loss scaling" if self.scaler is not None else "fp32",
                "channels_last": False, "compiled": False, "loss_check_every": 1,
                "num_queries": self.shared["num_queries"], "num_denoising": self.shared["num_denoising"],
                "keep_ratio": None}
