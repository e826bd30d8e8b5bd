"""The study's word on a stage 2 that cannot compare: an RT-DETR baseline cell (every switch off) whose best mAP
ends below ``targets.learning_floor_map`` has not learned these data, so its variants' differences are noise.
Said in the summary with the likely causes its run recorded (``dset.data.preflight.learning_risks``)."""

from __future__ import annotations

from collections.abc import Callable

from dset import metric_names as M

from ..planning.cells import Cell
from .jobs import RunResult


def baselines_below_floor(cells: list[Cell], results: list[RunResult], floor: float,
                          risks_of: Callable[[str], str | None]) -> list[str]:
    """One paragraph per RT-DETR baseline cell whose run ended below ``floor`` (``risks_of(run_id)``: the
    likely causes its run recorded, or None)."""
    by_cell = {r.cell: r for r in results}
    said = []
    for cell in cells:
        labels = cell.labels()
        if not labels["variant"].startswith("RT-DETR"):
            continue
        result = by_cell.get(cell.id)
        best = result.metrics.get(M.BEST_MAP) if result is not None else None
        if best is None or best >= floor:
            continue
        risks = risks_of(result.run_id) if result.run_id else None
        cause = f" Likely cause: {risks}." if risks else " No likely cause was recorded."
        said.append(f"{labels['variant']} ({cell.id}) ended at mAP {best:.4f}, below the learning floor "
                    f"{floor:g} (targets.learning_floor_map): this budget has not learned these data, so the "
                    f"variants of {labels['backbone']} cannot be compared with it.{cause}")
    return said
