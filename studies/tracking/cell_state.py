"""What a study does with a cell, given the MLflow runs of earlier invocations: skip it, resume it, redo it
(stale: other code or data made it) or run it anew."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..planning.cells import Cell
from . import schema


def stale_reason(cell: Cell, run) -> str:
    """What differs between ``cell`` and an earlier run of the same cell (code version, data digest)."""
    tags = run.data.tags
    compared = (("code", schema.TAG_CODE_VERSION, "code"), ("data", schema.TAG_DATA_DIGEST, "data"))
    changed = [what for what, tag, key in compared if tags.get(tag) != cell.provenance.get(key)]
    return " and ".join(changed) + " changed" if changed else "made differently"


def classify_cell(cell: Cell, by_fingerprint: dict, stale_candidates: dict, keep_stale: bool,
                  alive: Callable[[Any], bool] | None = None) -> tuple[str, Any]:
    """What a study does with a valid cell: ("finished", run) skip it; ("elsewhere", run) a live process runs it;
    ("resume", run) continue its run; ("stale", old run) redo it, since other code or data made the finished
    run (with ``keep_stale``: "finished", the old run kept); ("new", None) run it. ``alive(run)``: the run's
    process still runs (None: never)."""
    run = by_fingerprint.get(cell.fingerprint)
    if run is not None:
        if run.info.status == "FINISHED":
            return "finished", run
        if run.info.status == "RUNNING" and alive is not None and alive(run):
            return "elsewhere", run
        return "resume", run
    return classify_by_key(cell, stale_candidates, keep_stale)


def classify_by_key(cell: Cell, stale_candidates: dict, keep_stale: bool) -> tuple[str, Any]:
    """A cell without a run of its fingerprint: ("stale", old run) when another fingerprint of the same cell
    finished (``keep_stale``: ("finished", old run)), ("new", None) otherwise."""
    old = stale_candidates.get(cell.cell_key)
    if old is not None:
        return ("finished", old) if keep_stale else ("stale", old)
    return "new", None
