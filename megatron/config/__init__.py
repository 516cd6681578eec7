"""Configuration: typed groups (schema), YAML merging (loader), derivation and validation."""

from megatron.config.config import Derived, NeoXConfig, load_config
from megatron.config.deepspeed import deepspeed_config
from megatron.config.loader import ConfigError, Override

__all__ = [
    "ConfigError", "Derived", "NeoXConfig", "Override", "deepspeed_config",
    "load_config",
]
