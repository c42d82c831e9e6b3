"""Configs from a YAML file, command-line flags and ``--set KEY=VALUE`` overrides, validated into the models
of `pipeline.config` with one readable error line that names the key or flag to fix."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from pipeline.config import BackboneConfig, ConfigError


def load_yaml(path: str) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file '{path}' not found: pass an existing YAML file to --config")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file '{path}' is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping of sections (source:, backbone: ...)")
    return data


def set_path(data: dict[str, Any], dotted: str, value: Any) -> None:
    """data['a']['b'] = value for dotted='a.b'."""
    keys = dotted.split(".")
    node = data
    for k in keys[:-1]:
        nxt = node.setdefault(k, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"cannot set '{dotted}': '{k}' is not a section")
        node = nxt
    node[keys[-1]] = value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> None:
    """Apply ``a.b=c`` strings; values are parsed as YAML (numbers, true/false, null, [lists], {maps})."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set takes KEY=VALUE (e.g. --set runtime.batch_size=64), got '{item}'")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError:
            value = raw
        set_path(data, key.strip(), value)


_REQUIRED_FLAGS = {
    "source": "--source", "source.uri": "--source", "output": "--output", "output.uri": "--output",
    "backbone": "--model", "backbone.model": "--model",
}


def _format_errors(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"])
        if e["type"] == "extra_forbidden" and loc in BackboneConfig.model_fields:
            lines.append(f"unknown key '{loc}': it belongs in the backbone section (backbone.{loc}, or "
                         f"--{loc})")
        elif e["type"] == "extra_forbidden":
            lines.append(f"unknown key '{loc}' (check the spelling; see `pipeline extract --help`)")
        elif e["type"] == "missing":
            flag = _REQUIRED_FLAGS.get(loc)
            lines.append(f"missing '{loc}'" + (f" (pass {flag})" if flag else ""))
        else:
            lines.append(f"{loc}: {e['msg']}" if loc else e["msg"])
    return "; ".join(lines)


def build(model: type[BaseModel], data: dict[str, Any]):
    """Validate a nested dict into a config model, with one readable error line."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise ConfigError(f"invalid configuration: {_format_errors(e)}") from None


def merge_sources(
    model: type[BaseModel],
    config_file: str | None = None,
    flags: dict[str, Any] | None = None,
    overrides: list[str] | None = None,
):
    """Config file < flags < --set overrides. Flags are dotted keys; None values are ignored."""
    data: dict[str, Any] = load_yaml(config_file) if config_file else {}
    for key, value in (flags or {}).items():
        if value is not None:
            set_path(data, key, value)
    apply_overrides(data, overrides or [])
    return build(model, data)


def to_yaml(cfg: BaseModel) -> str:
    return yaml.safe_dump(json.loads(cfg.model_dump_json()), sort_keys=False)

