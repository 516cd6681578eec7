"""Configuration: typed groups (schema), YAML merging (loader), derivation and validation."""

from megatron.config.config import Derived, NeoXConfig, default_world_size, load_config
from megatron.config.deepspeed import deepspeed_config
from megatron.config.loader import ConfigError, Override

__all__ = [
    "ConfigError", "Derived", "NeoXConfig", "Override", "deepspeed_config", "default_world_size",
    "load_config",
]
