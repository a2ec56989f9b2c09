"""Operator configuration: one TOML file loaded into a typed msgspec schema, validated at start.

schema.py declares every key, its type and its default; values.py the value types; loader.py
reads the file; settings.py derives the engine's settings; keyring.py handles the secret.
"""

from sourceauth.adapters.config.keyring import load_or_create_keyring
from sourceauth.adapters.config.loader import (
    build_config,
    load_config,
)
from sourceauth.adapters.config.schema import (
    SECTIONS,
    AuthGateConfig,
    ChallengeConfig,
    Config,
    DeliveryConfig,
    ExemptionsConfig,
    LimitsConfig,
    LoggingConfig,
    MaintenanceConfig,
    MetricsConfig,
    PolicyConfig,
    ServerConfig,
    StorageConfig,
    XForwardConfig,
)
from sourceauth.adapters.config.settings import config_key, config_summary, engine_settings
from sourceauth.adapters.config.values import (
    DAY,
    HOUR,
    ConfigError,
    default_hostname,
    parse_duration,
    parse_size,
)

__all__ = [
    "DAY",
    "HOUR",
    "SECTIONS",
    "AuthGateConfig",
    "ChallengeConfig",
    "Config",
    "ConfigError",
    "DeliveryConfig",
    "ExemptionsConfig",
    "LimitsConfig",
    "LoggingConfig",
    "MaintenanceConfig",
    "MetricsConfig",
    "PolicyConfig",
    "ServerConfig",
    "StorageConfig",
    "XForwardConfig",
    "build_config",
    "config_key",
    "config_summary",
    "default_hostname",
    "engine_settings",
    "load_config",
    "load_or_create_keyring",
    "parse_duration",
    "parse_size",
]
