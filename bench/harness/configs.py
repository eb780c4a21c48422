"""mlproxy config files for the bench: the shipped config.toml with the bench's changes."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import orjson

from harness.servers import MODELS, ROOT

MAX_INFLIGHT = 4096  # high enough that the bench measures serving, not shedding


def _toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else orjson.dumps(key).decode()


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return orjson.dumps(value).decode()
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} {value!r} as TOML")


def dump_toml(doc: dict[str, Any]) -> str:
    """TOML for the subset config.toml uses: tables, scalars, arrays of scalars."""
    lines: list[str] = []

    def emit(path: list[str], table: dict[str, Any]) -> None:
        scalars = {k: v for k, v in table.items() if not isinstance(v, dict)}
        subtables = {k: v for k, v in table.items() if isinstance(v, dict)}
        if path and (scalars or not subtables):
            lines.append(f"\n[{'.'.join(_toml_key(p) for p in path)}]")
        for k, v in scalars.items():
            lines.append(f"{_toml_key(k)} = {_toml_value(v)}")
        for k, v in subtables.items():
            emit([*path, k], v)

    emit([], doc)
    return "\n".join(lines).lstrip() + "\n"


def mlproxy_config(
    mode: str,
    port: int,
    admin_port: int,
    *,
    monitoring: bool = True,
    base: Path = ROOT / "config.toml",
) -> str:
    """`base` (a config.toml) with models.cancer in `mode`, the given ports, absolute model
    paths, [limits] max_inflight = MAX_INFLIGHT and drift monitoring on or off."""
    doc = tomllib.loads(base.read_text())
    doc.setdefault("server", {}).update(host="127.0.0.1", port=port, workers=1)
    doc.setdefault("admin", {}).update(host="127.0.0.1", port=admin_port)
    doc.setdefault("limits", {})["max_inflight"] = MAX_INFLIGHT
    model = dict(doc.get("models", {}).get("cancer", {}))
    model["mode"] = mode
    model["stable"] = "v1"
    model["versions"] = {v: {"path": str(MODELS / v)} for v in ("v1", "v2")}
    model["canary"] = {"weights": {"v1": 90, "v2": 10}}
    model["shadow"] = {**model.get("shadow", {}), "primary": "v1", "mirrors": ["v2"], "sample": 1.0}
    model["drift"] = {**model.get("drift", {}), "enabled": monitoring}
    doc["models"] = {"cancer": model}
    return dump_toml(doc)
