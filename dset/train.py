"""Train one run: ``python -m dset.train PRESET_OR_YAML [key=value ...] --out DIR [--resume] [--budget B]``.

The command line of :func:`dset.engine.loop.fit`: the configuration put together from a preset, a budget and the
overrides (:func:`dset.config.resolve_config`, as studies do), SIGTERM handled as Ctrl-C (the newest epoch's
resume state is written first; exit status 130), the errors a user can act on as one line. Usage, budgets and
resume: docs/training.md.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from pathlib import Path

from . import metric_names as M
from .config import (
    DEFAULT_BUDGET,
    Config,
    ConfigError,
    budget_path,
    flatten,
    load_config,
    read_budget,
    resolve_config,
    with_values,
)
from .run_folder import RunFolder


def _budget_help() -> str:
    try:
        path = budget_path(DEFAULT_BUDGET)
        flat = flatten(read_budget(DEFAULT_BUDGET)[0])
        lines = [f"  {k} = {v}" for k, v in flat.items() if k != "base"]
        budget = (f"default budget ({path.name}), applied by --budget auto on the synthetic data set when the\n"
                  "preset/YAML sets no data.*/train.* key; key=value overrides go on top of it:\n" + "\n".join(lines))
    except (ConfigError, OSError) as exc:
        budget = f"(budget file unavailable: {exc})"
    return budget + """

other keys worth knowing (any key of dset/config.py can be overridden):
  data.name=synthetic|coco   data.{train,val}.{images,annotations}   data.image_size   data.batch_size
  data.num_workers   data.max_train_images   data.max_val_images   data.augment=rtdetr|flip|none
  data.multi_scale=true|false   data.stop_epoch=N
  train.epochs   train.lr   train.lr_pretrained   train.warmup_steps   train.ema_decay   train.grad_clip
  train.early_stop_patience   train.eval_every   train.profile   train.pictures=N   run.seed
  train.checkpoint_every_minutes   train.keep_last_checkpoint
  run.device   model.backbone.pretrained=FILE   model.checkpoint=FILE   model.decoder.num_queries

examples:
  python -m dset.train rtdetr_r18 --out runs/r18                 # synthetic data, the CPU budget
  python -m dset.train dset_r18 train.epochs=20 --out runs/d18   # the budget, but longer
  python -m dset.train dset_r18 --budget none --out runs/full    # the preset's schedule (640 px, 72 epochs)
  torchrun --nproc_per_node 2 -m dset.train rtdetr_r18 --out runs/ddp
  python -m dset.train --resume --out runs/r18
"""


def _sigterm_to_interrupt(signum, frame):
    # a scheduler (SLURM, Kubernetes, torchrun tearing down its workers) stops a job with SIGTERM: handled as
    # Ctrl-C, so that training writes its newest resume state before the process ends
    raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m dset.train", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train and evaluate one RT-DETR / DSET run (see dset/engine/loop.py).",
        epilog=_budget_help())
    ap.add_argument("args", nargs="*", metavar="PRESET_OR_YAML [key=value ...]",
                    help="a preset (rtdetr_r18, dset_r18, dset_fast_r18, ...) or a YAML file, then dotted overrides")
    ap.add_argument("--out", help="output folder (config.yaml, metrics.jsonl, summary.json, checkpoints/); "
                    "default: run.out_dir of the configuration")
    ap.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints/last.pt "
                    "(without PRESET_OR_YAML the configuration is read from OUT/config.yaml)")
    ap.add_argument("--budget", default="auto", help="auto (default), none, a budget name (cpu) or a YAML file")
    ap.add_argument("-q", "--quiet", action="store_true", help="no progress bar, warnings only")
    return ap


def _resolve(ap: argparse.ArgumentParser, ns: argparse.Namespace) -> Config:
    """The run's configuration: the preset or YAML file, the budget and the overrides, or with ``--resume`` and
    no preset the run's own config.yaml. Usage errors exit through ``ap.error``; others are ConfigError."""
    config = next((a for a in ns.args if "=" not in a), None)
    overrides = [a for a in ns.args if "=" in a]
    if config is not None and ns.args.index(config) != 0:
        ap.error(f"the preset or YAML file must come first, got {config!r} after overrides")
    if config is None:
        if not ns.resume:
            ap.error("PRESET_OR_YAML is required (e.g. rtdetr_r18)")
        if ns.out is None:
            ap.error("--resume without PRESET_OR_YAML needs --out DIR")
        saved = RunFolder(ns.out).config
        if not saved.is_file():
            raise ConfigError(f"--resume without PRESET_OR_YAML needs {saved}")
        cfg = load_config(saved, overrides)
    else:
        cfg = resolve_config(config, budget=ns.budget, overrides=overrides)
    if ns.quiet:
        cfg = with_values(cfg, {"run.progress": False})
    if ns.out is None and cfg.run.out_dir is None:
        raise ConfigError("no output folder: give --out DIR (or run.out_dir=DIR)")
    return cfg


def _train(cfg: Config, out: Path, resume: bool) -> tuple[int, dict | None]:
    """``fit`` with SIGTERM handled as Ctrl-C; the exit status, and the summary when the run ended (completed or
    stopped). The errors a user can act on are one line on stderr, not a traceback."""
    from .data.errors import DatasetError
    from .engine.checkpoint import CheckpointWriteError
    from .engine.errors import NonFiniteLossError, error_message
    from .engine.loop import fit

    # only the main thread may set signal handlers (main() could be called from another one)
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous_sigterm = signal.signal(signal.SIGTERM, _sigterm_to_interrupt) if in_main_thread else None
    try:
        return 0, fit(cfg, out, resume=resume)
    except (ConfigError, DatasetError, FileNotFoundError) as exc:
        print(f"error: {error_message(exc)}", file=sys.stderr)
        return 2, None
    except NonFiniteLossError as exc:
        print(f"error: training failed: {exc} (see {out / 'summary.json'})", file=sys.stderr)
        return 1, None
    except CheckpointWriteError as exc:
        print(f"error: {exc}; free some space, then: python -m dset.train --resume --out {out}", file=sys.stderr)
        return 1, None
    except KeyboardInterrupt:
        print(f"interrupted; continue with: python -m dset.train --resume --out {out}", file=sys.stderr)
        return 130, None
    except RuntimeError as exc:
        if "DatasetError" in str(exc):  # a data error raised inside a loader worker
            print(f"error: {error_message(exc)}", file=sys.stderr)
            return 2, None
        raise
    finally:
        if in_main_thread:   # main() may be called in a longer-lived process (tests, notebooks)
            signal.signal(signal.SIGTERM, previous_sigterm if previous_sigterm is not None else signal.SIG_DFL)


def _outcome(summary: dict) -> str:
    """The run's outcome in one line: status, epochs, best epoch and its mAP, why it stopped, minutes."""
    m = summary["metrics"]
    parts = [f"{summary['status']}: {m[M.EPOCHS_RUN]}/{summary['epochs']} epochs"]
    if m.get(M.BEST_EPOCH) is not None:
        parts.append(f"best epoch {m[M.BEST_EPOCH] + 1}: mAP {_number(m.get(M.BEST_MAP)):.4f}, "
                     f"mAP50 {_number(m.get(M.BEST_MAP50)):.4f}")
    if summary.get("stop_reason"):
        parts.append(summary["stop_reason"])
    parts.append(f"{summary['train_time_s'] / 60:.1f} min")
    return "; ".join(parts)


def _number(value: float | None) -> float:
    return float("nan") if value is None else value


def main(argv: list[str] | None = None) -> int:
    ap = _parser()
    ns = ap.parse_intermixed_args(argv)
    logging.basicConfig(level=logging.WARNING if ns.quiet else logging.INFO, format="%(message)s")
    log = logging.getLogger("dset.train")
    try:
        cfg = _resolve(ap, ns)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = Path(ns.out if ns.out is not None else cfg.run.out_dir)
    log.info("budget: %s%s", cfg.run.budget, " (--budget none to train with the preset's own schedule)"
             if cfg.run.budget != "none" else "")
    code, summary = _train(cfg, out, ns.resume)
    if summary is not None and int(os.environ.get("RANK", "0")) == 0:
        log.info("%s -> %s", _outcome(summary), out)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
