"""Configuration: the pydantic schema and the YAML presets beside it."""

from configs.schema import ConfigError, LmforgeConfig, load

__all__ = ["ConfigError", "LmforgeConfig", "load"]
