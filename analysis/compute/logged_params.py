"""A run's logged MLflow params (strings, flat dotted keys) back to values, and to the dset configuration they
describe. Pure: no MLflow."""

from __future__ import annotations

import ast
from collections.abc import Mapping
from typing import Any

from dset.config import Config, ConfigError, config_from_dict, unflatten

from .report_error import ReportError


def parse_param(text):
    """An MLflow param string back to a value: int, float, bool, None or the string itself."""
    if not isinstance(text, str):
        return text
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return text


def config_from_params(params: Mapping[str, Any], run_id: str = "?") -> Config:
    """The dset :class:`~dset.config.Config` a run's params describe: the resolved configuration, flat dotted keys,
    each value as ``str()`` wrote it (values already parsed are taken as they are). Keys not given keep the defaults
    of ``dset/config.py``. Raises :class:`ReportError`, naming the run and the key, for a value that does not fit."""
    try:
        return config_from_dict(unflatten({key: _param_value(value) for key, value in params.items()}))
    except ConfigError as exc:
        raise ReportError(f"run {run_id}: its logged params do not make a dset configuration: {exc}") from None


def _param_value(text: Any) -> Any:
    """A logged param back to the value ``str()`` wrote it from: a number, bool, None or list is a Python literal;
    anything else is the string itself."""
    if not isinstance(text, str):
        return text
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text
