"""DSET study harness: RT-DETR and DSET (Dual-Sparse Expert Transformer) models, data, training,
evaluation and measurement. The map of the code: docs/architecture.md."""

from .config import Config, ConfigError, load_config

__all__ = ["Config", "ConfigError", "load_config", "build_model"]


def build_model(cfg="rtdetr_r18", overrides=None, load_weights=True):
    """Build the detector a preset name, YAML path or :class:`Config` describes (see dset.models.detector)."""
    from .models.detector import build_model as _build

    return _build(cfg, overrides, load_weights)
