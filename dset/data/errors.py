"""The data sets' error type, in a module of its own without torch so that the converters' command lines
(``python -m dset.data.synthetic``, ``python -m dset.data.dair_v2x``) start fast."""

from __future__ import annotations


class DatasetError(ValueError):
    """A data set file is missing or malformed; the message names the file and the offending key/value."""
