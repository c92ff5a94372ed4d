"""Config files as plain data: a shipped name or a YAML path, its ``base:`` chain merged, overrides applied.

A config is named by a path to a YAML file or by the name of a config that ships inside the
package (``flowmill.configs``: ``mmdit_tiny`` or ``mmdit_tiny.yaml``); an existing file wins
over a shipped name. A config may start from another one: ``base: mmdit_digits`` (a path
relative to the file that names it, or a shipped name) is read first, recursively, and the
file's own keys are merged over it (mappings key by key, anything else replaced). A chain that
comes back to a file already in it is refused, naming the files.

Nothing here imports torch: ``flowmill config show`` prints a resolved config in well under a
second. ``flowmill.train.config`` types and checks the result.
"""

from __future__ import annotations

import importlib.resources
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from flowmill.errors import UsageError

SHIPPED_PACKAGE = "flowmill.configs"
BASE_KEY = "base"  # the top-level key naming the config a file starts from
SUFFIXES = (".yaml", ".yml")


def shipped_dir() -> Path:
    """The folder of the shipped configs (``configs/`` of a checkout, ``flowmill/configs`` of an install)."""
    return Path(str(importlib.resources.files(SHIPPED_PACKAGE)))


def shipped_names() -> list[str]:
    """Names of the shipped configs, sorted (``mmdit_tiny``, ...)."""
    return sorted(path.stem for path in shipped_dir().iterdir() if path.suffix in SUFFIXES)


def find_config(ref: str | Path, relative_to: Path | None = None) -> Path:
    """The YAML file ``ref`` names: a file (relative to ``relative_to``, default the current
    folder), else a shipped config of that name. UsageError listing the shipped names otherwise."""
    path = Path(ref).expanduser()
    if relative_to is not None and not path.is_absolute():
        path = relative_to / path
    if path.is_file():
        return path
    name = str(ref).removesuffix(".yaml").removesuffix(".yml")
    shipped = shipped_dir() / f"{name}.yaml"
    if "/" not in name and shipped.is_file():
        return shipped
    where = f" (looked beside {relative_to})" if relative_to is not None else ""
    raise UsageError(f"config {ref} does not exist{where}; pass a YAML file or a shipped config: "
                     f"{', '.join(shipped_names())}")


def read_config(ref: str | Path) -> dict[str, Any]:
    """The plain mapping config ``ref`` (a path or a shipped name) describes, its ``base:`` chain merged."""
    return _read_chain(find_config(ref), ())


def resolve_config(ref: str | Path, overrides: list[str] = ()) -> dict[str, Any]:
    """``read_config(ref)`` with the ``dotted.key=value`` overrides applied (not typed: no defaults added)."""
    return apply_overrides(read_config(ref), overrides)


def apply_overrides(raw: Mapping[str, Any], overrides: list[str]) -> dict[str, Any]:
    """``raw`` with the ``dotted.key=value`` overrides merged in, as plain data (not yet typed)."""
    for item in overrides:
        if "=" not in item:
            raise UsageError(f"override {item!r} must look like dotted.key=value")
    for item in overrides:
        try:
            yaml.safe_load(item.partition("=")[2])
        except yaml.YAMLError as error:
            key, _, value = item.partition("=")
            raise UsageError(f"{key}: the override's value {value!r} is not YAML ({' '.join(str(error).split())}); "
                             f"a string goes in quotes: '{key}=\"{value}\"'") from None
    try:
        merged = OmegaConf.merge(OmegaConf.create(dict(raw)), OmegaConf.from_dotlist(list(overrides)))
    except OmegaConfBaseException as error:
        raise UsageError(f"bad override: {omegaconf_message(error)}") from None
    return OmegaConf.to_container(merged)


def omegaconf_message(error: OmegaConfBaseException) -> str:
    """The first line of an OmegaConf error, prefixed by the full key it concerns."""
    key = getattr(error, "full_key", None)
    first_line = str(error).splitlines()[0]
    return f"{key}: {first_line}" if key else first_line


def _read_chain(path: Path, chain: tuple[Path, ...]) -> dict[str, Any]:
    resolved = path.resolve()
    if resolved in chain:
        names = " -> ".join(str(item) for item in (*chain, resolved))
        raise UsageError(f"{BASE_KEY}: the configs start from each other in a cycle: {names}")
    raw = _read_yaml(path)
    if BASE_KEY not in raw:
        return raw
    base_ref = raw.pop(BASE_KEY)
    if not isinstance(base_ref, str) or not base_ref:
        raise UsageError(f"{path}: {BASE_KEY} must name one config (a path or a shipped name), got {base_ref!r}")
    base = _read_chain(find_config(base_ref, relative_to=resolved.parent), (*chain, resolved))
    try:
        return OmegaConf.to_container(OmegaConf.merge(OmegaConf.create(base), OmegaConf.create(raw)))
    except OmegaConfBaseException as error:
        raise UsageError(f"{path}: cannot be merged over its {BASE_KEY} {base_ref}: {omegaconf_message(error)}") from None


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise UsageError(f"{path} is not valid YAML: {' '.join(str(error).split())}") from None
    if not isinstance(raw, dict):
        raise UsageError(f"{path} must hold a mapping of sections, got {type(raw).__name__}")
    return raw
