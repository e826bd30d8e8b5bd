"""The ``slurm:`` section of a study file (or ``slurm.KEY=VALUE`` on the command line): the resources of each
task of the study's job array, checked when the study is read so that a typo fails before anything is submitted."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

DEFAULT_TIME_MIN = 60
MAX_DEFAULT_TASKS = 4     # tasks when ``slurm.tasks`` is not set: one per cell or trial, at most this many


class SlurmSettingsError(ValueError):
    """A bad ``slurm.*`` setting; the message names the key and the value."""


@dataclass
class SlurmSettings:
    tasks: int | None = None          # the array's size: invocations of the study run at once (None: see default_tasks)
    partition: str | None = None
    time_min: int = DEFAULT_TIME_MIN  # each task's time limit
    cpus_per_task: int = 2
    gpus_per_task: int = 0
    mem: str | None = None            # sbatch --mem, e.g. 32G
    account: str | None = None
    qos: str | None = None
    signal_delay_s: int = 120         # SIGUSR2 this long before the time limit: the task checkpoints and requeues
    requeue: bool = True              # a signalled task requeues itself (its cell resumes from last.pt)
    setup: list[str] = field(default_factory=list)      # shell lines each task runs first (module load, venv)
    sbatch: dict[str, Any] = field(default_factory=dict)  # further sbatch options, e.g. {constraint: a100}
    log_dir: str | None = None        # where submitit writes the tasks' logs (default <out_dir>/<study>/slurm)
    job_name: str | None = None       # default dset-<study>

    def default_tasks(self, n_items: int) -> int:
        return self.tasks if self.tasks is not None else max(1, min(n_items, MAX_DEFAULT_TASKS))


KEYS = tuple(SlurmSettings.__dataclass_fields__)
_TIME = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")


def time_minutes(value: Any) -> int:
    """``slurm.time`` in SLURM's formats (``1:30:00``, ``2-00:00:00``, ``30:00`` is MM:SS, ``90`` is minutes), given as
    text, as whole minutes (at least 1). A number is refused: YAML reads an unquoted ``1:30:00`` as 5400."""
    if not isinstance(value, str):
        raise SlurmSettingsError(f"slurm.time: expected text such as '1:30:00' (quoted: YAML reads an unquoted "
                                 f"1:30:00 as the number 5400), or minutes as slurm.time_min; got {value!r}")
    m = _TIME.match(value.strip())
    if not m:
        raise SlurmSettingsError(f"slurm.time: expected [D-]HH:MM:SS, HH:MM:SS, MM:SS or minutes, got {value!r}")
    days, a, b, c = (int(g) if g is not None else None for g in m.groups())
    if days is not None:   # D-HH[:MM[:SS]]
        seconds = days * 86400 + a * 3600 + (b or 0) * 60 + (c or 0)
    elif c is not None:    # HH:MM:SS
        seconds = a * 3600 + b * 60 + c
    elif b is not None:    # MM:SS
        seconds = a * 60 + b
    else:                  # minutes
        seconds = a * 60
    return max(1, -(-seconds // 60))


def _int(key: str, value: Any, minimum: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise SlurmSettingsError(f"slurm.{key}: expected an integer >= {minimum}, got {value!r}")
    return value


def _text(key: str, value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, (dict, list)):
        raise SlurmSettingsError(f"slurm.{key}: expected text, got {value!r}")
    return str(value)


def parse_slurm_settings(raw: Any, where: str) -> SlurmSettings:
    """The ``slurm:`` mapping of a study file, checked."""
    if raw is None:
        return SlurmSettings()
    if not isinstance(raw, dict):
        raise SlurmSettingsError(f"{where}: slurm: expected a mapping of {', '.join(KEYS)}, got {raw!r}")
    raw = dict(raw)
    if "time" in raw:
        if "time_min" in raw:
            raise SlurmSettingsError(f"{where}: slurm: set time or time_min, not both")
        raw["time_min"] = time_minutes(raw.pop("time"))
    unknown = sorted(set(raw) - set(KEYS))
    if unknown:
        raise SlurmSettingsError(f"{where}: slurm: unknown keys {unknown}; valid: time, "
                                 + ", ".join(k for k in KEYS if k != "time_min"))
    s = SlurmSettings()
    for key, value in raw.items():
        if key in ("tasks", "time_min", "cpus_per_task"):
            value = None if key == "tasks" and value is None else _int(key, value, 1)
        elif key in ("gpus_per_task", "signal_delay_s"):
            value = _int(key, value, 0)
        elif key == "requeue":
            if not isinstance(value, bool):
                raise SlurmSettingsError(f"slurm.requeue: expected true or false, got {value!r}")
        elif key == "setup":
            value = [value] if isinstance(value, str) else value
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise SlurmSettingsError(f"slurm.setup: expected shell lines (a list of text), got {value!r}")
        elif key == "sbatch":
            if not isinstance(value, dict):
                raise SlurmSettingsError(f"slurm.sbatch: expected a mapping of sbatch options, got {value!r}")
            bad = [k for k in value if not re.fullmatch(r"[a-z][a-z0-9_-]*", str(k))]
            if bad:
                raise SlurmSettingsError(f"slurm.sbatch: {bad[0]!r} is not an sbatch option name (e.g. constraint)")
        else:
            value = _text(key, value)
        setattr(s, key, value)
    return s
