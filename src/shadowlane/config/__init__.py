"""Configuration: pydantic models loaded from YAML, with errors a person can act on.

The models are the contract every other layer codes against, so attribute names are fixed (see
docs/config.md) and this module's names are the only ones other packages import: the modules
behind it (units, the model sections, loading, summary) may move without an importer changing.
"""

from __future__ import annotations

from shadowlane.config.backends import BackendConfig, Endpoint
from shadowlane.config.comparison import (
    DEFAULT_IGNORE_HEADERS,
    CompareConfig,
    CompareThresholds,
    GrpcCompare,
    RouteCompare,
    ShadowCompare,
)
from shadowlane.config.descriptors import DescriptorSet, build_descriptor_set, read_descriptor_set
from shadowlane.config.document import (
    AdminConfig,
    Config,
    LimitsConfig,
    OverloadConfig,
    TlsConfig,
)
from shadowlane.config.loading import ConfigError, load_config, parse_config
from shadowlane.config.matching import MatchConfig, ShadowMatch
from shadowlane.config.migrations import (
    MigrationConfig,
    MigrationVerify,
    ReverseShadow,
    StageConfig,
    StageGates,
    StageShadow,
)
from shadowlane.config.recording import RecordConfig, RedactConfig
from shadowlane.config.rewrites import ROUTE_RESERVED_HEADERS, RouteHeaders, RoutePathRewrite
from shadowlane.config.routes import RouteConfig, WeightedBackend
from shadowlane.config.shadows import HeaderMutation, PathRewrite, ShadowConfig
from shadowlane.config.summary import summarize
from shadowlane.config.units import (
    Duration,
    Size,
    format_duration,
    format_size,
    parse_duration,
    parse_host_port,
    parse_size,
)

__all__ = [
    "DEFAULT_IGNORE_HEADERS",
    "ROUTE_RESERVED_HEADERS",
    "AdminConfig",
    "BackendConfig",
    "CompareConfig",
    "CompareThresholds",
    "Config",
    "ConfigError",
    "DescriptorSet",
    "Duration",
    "Endpoint",
    "GrpcCompare",
    "HeaderMutation",
    "LimitsConfig",
    "MatchConfig",
    "MigrationConfig",
    "MigrationVerify",
    "OverloadConfig",
    "PathRewrite",
    "RecordConfig",
    "RedactConfig",
    "ReverseShadow",
    "RouteCompare",
    "RouteConfig",
    "RouteHeaders",
    "RoutePathRewrite",
    "ShadowCompare",
    "ShadowConfig",
    "ShadowMatch",
    "Size",
    "StageConfig",
    "StageGates",
    "StageShadow",
    "TlsConfig",
    "WeightedBackend",
    "build_descriptor_set",
    "format_duration",
    "format_size",
    "load_config",
    "parse_config",
    "parse_duration",
    "parse_host_port",
    "parse_size",
    "read_descriptor_set",
    "summarize",
]
