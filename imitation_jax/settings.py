"""Settings files: a YAML file plus `dotted.key=value` overrides merged onto a structured
(dataclass) config with OmegaConf, every mistake (missing file, bad YAML, unknown key, wrong type)
a one-line `ConfigError`. Used by `train` and `prepare` (imitation_jax.train.config) and the study."""

from __future__ import annotations

import os
from typing import Sequence

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from imitation_jax.errors import ConfigError


def one_line(exc: OmegaConfBaseException, where: str) -> str:
    msg = str(exc).splitlines()[0].strip()
    key = getattr(exc, "full_key", None)
    if "not in" in msg and key:
        return f"{where}: unknown config key '{key}'"
    return f"{where}: {msg}" + (f" (key '{key}')" if key and key not in msg else "")


def merge_layers(base, layers: list[tuple[str, DictConfig]]) -> DictConfig:
    """`base` (a dataclass or a DictConfig) with each (where, layer) merged on in order."""
    cfg = base if isinstance(base, DictConfig) else OmegaConf.structured(base)
    for where, layer in layers:
        try:
            cfg = OmegaConf.merge(cfg, layer)
        except OmegaConfBaseException as exc:
            raise ConfigError(one_line(exc, where)) from None
    return cfg


def read_layers(path: str | None, overrides: Sequence[str] = (), label: str = "config"
                ) -> list[tuple[str, DictConfig]]:
    """The YAML file (if any; after the files it `extends`) then each `key=value` override as
    (where, layer), for merging onto a structured config in order; a file layer's `where` is its
    path. A missing file, bad YAML, an `extends` cycle or a malformed override is one line."""
    layers: list[tuple[str, DictConfig]] = _file_layers(path, label, ()) if path is not None else []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form dotted.key=value")
        try:
            layers.append((f"override '{item}'", OmegaConf.from_dotlist([item])))
        except OmegaConfBaseException as exc:
            raise ConfigError(one_line(exc, f"override '{item}'")) from None
    return layers


def _file_layers(path: str, label: str, chain: tuple[str, ...]) -> list[tuple[str, DictConfig]]:
    """`path`'s layer after those of the file its top-level `extends` names (a path relative to it):
    a family's config is the recipe it extends plus what differs, not a copy."""
    if not os.path.isfile(path):
        raise ConfigError(f"{label} file not found: {path}" + (f" (extended by {chain[-1]})" if chain else ""))
    try:
        layer = OmegaConf.load(path)
    except Exception as exc:  # YAML syntax errors come from several parsers' types
        raise ConfigError(f"{path}: not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(layer, DictConfig):
        raise ConfigError(f"{path}: a config file must hold a mapping of keys")
    if "extends" not in layer:
        return [(path, layer)]
    parent = layer.pop("extends")
    if not isinstance(parent, str):
        raise ConfigError(f"{path}: extends must be the path of another config file, not {parent!r}")
    parent = os.path.join(os.path.dirname(path), parent)
    if os.path.abspath(parent) in map(os.path.abspath, (*chain, path)):
        raise ConfigError(f"{path}: extends {parent}, which extends it again (a cycle)")
    return _file_layers(parent, label, (*chain, path)) + [(path, layer)]
