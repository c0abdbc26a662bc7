"""Configuration: one typed model, loaded from YAML/JSON and command-line settings."""

from tunelab.config.load import LoadedConfig, load_config, resolved_dict
from tunelab.config.schema import BUILTIN_MODEL, DatasetSource, TuneConfig

__all__ = [
    "BUILTIN_MODEL",
    "DatasetSource",
    "LoadedConfig",
    "TuneConfig",
    "load_config",
    "resolved_dict",
]
