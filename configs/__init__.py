"""Framework-neutral configuration shared by jax_impl and torch_ref."""

from configs.schema import (
    MESH_AXES,
    Config,
    ConfigError,
    DataConfig,
    ModelConfig,
    OptimConfig,
    ParallelConfig,
    TrainConfig,
    apply_overrides,
    config_from_dict,
    list_presets,
    lr_at,
    load_config,
    load_preset,
    mesh_devices,
    parse_mesh,
    parse_overrides,
    validate_config,
)

__all__ = [
    "MESH_AXES", "Config", "ConfigError", "DataConfig", "ModelConfig", "OptimConfig", "ParallelConfig",
    "TrainConfig", "apply_overrides", "config_from_dict", "list_presets", "load_config", "lr_at", "load_preset",
    "mesh_devices", "parse_mesh", "parse_overrides", "validate_config",
]
