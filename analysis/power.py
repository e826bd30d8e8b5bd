"""How many images and seeds a study needs to detect a ΔmAP of a given size, at this study's noise: the command.

    python -m analysis.power --experiment ablation_grid --delta 0.01 [--seeds 1 2 3 5] [--tracking-uri URI]

The computation and its formula are in :mod:`analysis.compute.power`; docs/statistics.md explains them.
"""

from __future__ import annotations

import argparse
import math
import sys

from analysis.compute.loading import load_study_results
from analysis.compute.power import DEFAULT_SEEDS, plan
from analysis.compute.report_error import ReportError
from studies.tracking import mlflow_store


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m analysis.power",
        description="How many images and seeds are needed to detect a ΔmAP of --delta at this study's noise.")
    parser.add_argument("--experiment", default="ablation_grid", help="MLflow experiment (= study name)")
    parser.add_argument("--delta", type=float, required=True, help="the ΔmAP to detect, absolute (e.g. 0.01)")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(DEFAULT_SEEDS),
                        help="seeds per side to plan for (default 1 2 3 5)")
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow tracking URI; default $MLFLOW_TRACKING_URI, else "
                        f"{mlflow_store.DEFAULT_TRACKING_URI}")
    args = parser.parse_args(argv)
    if any(k < 1 for k in args.seeds):
        parser.error(f"--seeds: expected integers >= 1, got {args.seeds}")
    try:
        study = load_study_results(args.experiment, args.tracking_uri)
        table, note = plan(study, args.delta, tuple(args.seeds))
    except ReportError as exc:
        print(f"analysis.power: {exc}", file=sys.stderr)
        return exc.exit_code
    except ValueError as exc:
        print(f"analysis.power: {exc}", file=sys.stderr)
        return 2
    fmt = {"SE_image": "{:.4f}".format, "MDE now": "{:.4f}".format}
    shown = table.copy()
    for c in shown.columns:
        if c in fmt:
            shown[c] = shown[c].map(fmt[c])
        elif c.startswith("images for"):
            shown[c] = shown[c].map(lambda x: "–" if math.isnan(x) else ("never" if math.isinf(x) else str(int(x))))
    print(shown.to_markdown(index=False))
    print("\n" + note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
