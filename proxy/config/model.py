"""[models.<name>]: one model's versions, routing mode and monitoring, and how they are checked.

Part of config.toml (config/load.py reads the rest); every error names its key and the rule
it broke.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

from proxy.config.schema import (
    MODES,
    BlueGreenConfig,
    CanaryConfig,
    DriftConfig,
    GatesConfig,
    ModelConfig,
    ShadowConfig,
    VersionConfig,
)
from proxy.config.tables import TableReader, field_default, is_kind, positive_key


def _version_ref(
    r: TableReader, name: str, value: Any, versions: dict[str, VersionConfig], model: str
) -> bool:
    if value is None:
        return False
    if value not in versions:
        known = ", ".join(versions) or "none"
        r.error(f"{value} is not a version of {model} (versions: {known})", name)
        return False
    return True


def parse_model(name: str, table: Any, base_dir: Path, errors: list[str]) -> ModelConfig | None:
    key = f"models.{name}"
    r = TableReader(table, key, errors)
    n_errors = len(errors)
    if not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
        r.error("a model name may hold only letters, digits, '-', '_' and '.'")
    mode = r.get("mode", "a string", field_default(ModelConfig, "mode"))
    if mode not in MODES:
        r.error(f"must be one of {', '.join(MODES)}, not {mode!r}", "mode")
    stable = r.get("stable", "a string")
    sticky_key = r.get("sticky_key", "a string", field_default(ModelConfig, "sticky_key"))
    versions = _parse_versions(r.table_of("versions"), f"{key}.versions", base_dir, errors)
    if stable is not None and versions:
        _version_ref(r, "stable", stable, versions, name)

    canary = shadow = blue_green = None
    raw = r.table_of("canary")
    if raw is not None:
        canary = _parse_canary(TableReader(raw, f"{key}.canary", errors), versions, name, stable)
    raw = r.table_of("shadow")
    if raw is not None:
        shadow = _parse_shadow(TableReader(raw, f"{key}.shadow", errors), versions, name)
    raw = r.table_of("blue_green")
    if raw is not None:
        blue_green = _parse_blue_green(
            TableReader(raw, f"{key}.blue_green", errors), versions, name
        )
    raw = r.table_of("drift")
    drift = _parse_drift(TableReader(raw if raw is not None else {}, f"{key}.drift", errors))
    r.done()

    needed = {"canary": canary, "shadow": shadow, "blue_green": blue_green}
    if mode in needed and needed[mode] is None and len(errors) == n_errors:
        r.error(f'mode = "{mode}" needs a [{key}.{mode}] table', "mode")
    if len(errors) > n_errors:
        return None
    return ModelConfig(
        name=name,
        mode=mode,
        stable=stable,
        versions=versions,
        sticky_key=sticky_key.lower() if sticky_key else None,
        canary=canary,
        shadow=shadow,
        blue_green=blue_green,
        drift=drift,
    )


def _parse_versions(
    raw: Any, key: str, base_dir: Path, errors: list[str]
) -> dict[str, VersionConfig]:
    if raw is None:
        errors.append(f"{key}: is required (at least one version)")
        return {}
    r = TableReader(raw, key, errors)
    versions: dict[str, VersionConfig] = {}
    for vname in list(r.table):
        vr = TableReader(r.table.pop(vname), f"{key}.{vname}", errors)
        path = vr.get("path", "a string", None)
        url = vr.get("url", "a string", None)
        timeout = positive_key(
            vr, "timeout_ms", "a number", field_default(VersionConfig, "timeout_ms")
        )
        baseline = vr.get("baseline", "a string", None)
        vr.done()
        if (path is None) == (url is None):
            vr.error("needs exactly one of path (a local model directory) or url (a remote server)")
            continue
        if url is not None and not url.startswith(("http://", "https://")):
            vr.error(f"must be an http(s) URL, not {url!r}", "url")
            continue
        if baseline is not None and url is None:
            vr.error(
                "is for url versions: a local version is watched on its own manifest.json",
                "baseline",
            )
            continue
        resolved = None if path is None else (base_dir / path)
        versions[vname] = VersionConfig(
            name=vname,
            path=resolved,
            url=url.rstrip("/") if url else None,
            timeout_ms=timeout,
            baseline=None if baseline is None else base_dir / baseline,
        )
    if not versions and not raw:
        errors.append(f"{key}: at least one version is required")
    return versions


def _parse_canary(
    r: TableReader, versions: dict[str, VersionConfig], model: str, stable: str | None
) -> CanaryConfig | None:
    raw = r.get("weights", "a table")
    steps_raw = r.get("steps", "an array", None)
    interval = positive_key(r, "step_interval_s", "a number", None)
    gates_raw = r.table_of("gates")
    gates = GatesConfig()
    if gates_raw is not None:
        gates = _parse_gates(TableReader(gates_raw, f"{r.key}.gates", r.errors))
    r.done()
    if raw is None:
        return None
    weights: dict[str, float] = {}
    for vname, w in raw.items():
        if not _version_ref(r, "weights", vname, versions, model):
            continue
        if not is_kind(w, "a number") or w < 0:
            r.error(f"{vname} must be a non-negative number, not {w!r}", "weights")
            continue
        weights[vname] = float(w)
    if len(weights) != len(raw):
        return None
    if sum(weights.values()) <= 0:
        r.error("at least one weight must be > 0", "weights")
        return None
    steps: tuple[float, ...] = ()
    if steps_raw is not None:
        if not steps_raw or not all(is_kind(x, "a number") and 0 < x <= 100 for x in steps_raw):
            r.error(
                f"must be a non-empty list of percentages in (0, 100], not {steps_raw!r}", "steps"
            )
            return None
        steps = tuple(float(x) for x in steps_raw)
        if any(b <= a for a, b in itertools.pairwise(steps)):
            r.error(f"must increase step by step, not {steps_raw!r}", "steps")
            return None
    if interval is not None and not steps:
        r.error("step_interval_s needs steps", "step_interval_s")
        return None
    canary = None
    if steps or gates.any:
        others = [v for v in weights if v != stable]
        if stable not in weights or len(others) != 1:
            r.error(
                f"a progressive or gated canary splits between stable ({stable}) and one canary"
                f" version, not {', '.join(weights)}",
                "weights",
            )
            return None
        canary = others[0]
    return CanaryConfig(
        weights=weights,
        steps=steps,
        step_interval_s=(
            interval if interval is not None else field_default(CanaryConfig, "step_interval_s")
        ),
        gates=gates,
        canary=canary,
    )


def _parse_gates(r: TableReader) -> GatesConfig:
    d = GatesConfig()
    gates = GatesConfig(
        max_error_rate=r.get("max_error_rate", "a number", d.max_error_rate),
        max_psi=positive_key(r, "max_psi", "a number", d.max_psi),
        max_p99_ms=positive_key(r, "max_p99_ms", "a number", d.max_p99_ms),
        min_agreement=r.get("min_agreement", "a number", d.min_agreement),
        min_requests=positive_key(r, "min_requests", "an integer", d.min_requests),
    )
    r.done()
    for name in ("max_error_rate", "min_agreement"):
        value = getattr(gates, name)
        if value is not None and not 0.0 <= value <= 1.0:
            r.error(f"must be a fraction in 0..1, not {value}", name)
    return gates


def _parse_shadow(
    r: TableReader, versions: dict[str, VersionConfig], model: str
) -> ShadowConfig | None:
    def d(name: str) -> Any:
        return field_default(ShadowConfig, name)

    primary = r.get("primary", "a string")
    mirrors = r.get("mirrors", "an array")
    sample = r.get("sample", "a number", d("sample"))
    queue_rows = positive_key(r, "queue_rows", "an integer", d("queue_rows"))
    timeout = positive_key(r, "timeout_ms", "a number", d("timeout_ms"))
    failures = positive_key(r, "breaker_failures", "an integer", d("breaker_failures"))
    pause = positive_key(r, "breaker_pause_s", "a number", d("breaker_pause_s"), allow_zero=True)
    r.done()
    ok = _version_ref(r, "primary", primary, versions, model)
    if sample is not None and not 0.0 <= sample <= 1.0:
        r.error(f"must be a fraction in 0..1, not {sample}", "sample")
        ok = False
    if mirrors is None:
        return None
    for m in mirrors:
        if not isinstance(m, str):
            r.error(f"must list version names, not {m!r}", "mirrors")
            ok = False
        elif not _version_ref(r, "mirrors", m, versions, model):
            ok = False
        elif m == primary:
            r.error(f"{m} is the primary; a version cannot mirror itself", "mirrors")
            ok = False
    names = [m for m in mirrors if isinstance(m, str)]  # others were refused above
    if len(set(names)) != len(names):
        r.error("lists a version twice", "mirrors")
        ok = False
    if not ok:
        return None
    return ShadowConfig(
        primary=primary,
        mirrors=tuple(mirrors),
        sample=sample,
        queue_rows=queue_rows,
        timeout_ms=timeout,
        breaker_failures=failures,
        breaker_pause_s=pause,
    )


def _parse_blue_green(
    r: TableReader, versions: dict[str, VersionConfig], model: str
) -> BlueGreenConfig | None:
    blue = r.get("blue", "a string")
    green = r.get("green", "a string")
    active = r.get("active", "a string", field_default(BlueGreenConfig, "active"))
    r.done()
    ok = _version_ref(r, "blue", blue, versions, model)
    ok = _version_ref(r, "green", green, versions, model) and ok
    if active not in ("blue", "green"):
        r.error(f'must be "blue" or "green", not {active!r}', "active")
        ok = False
    if ok and blue == green:
        r.error(f"blue and green are both {blue}; they must be two versions", "green")
        ok = False
    return BlueGreenConfig(blue=blue, green=green, active=active) if ok else None


def _parse_drift(r: TableReader) -> DriftConfig:
    d = DriftConfig()
    drift = DriftConfig(
        window=positive_key(r, "window", "an integer", d.window),
        long_window=positive_key(r, "long_window", "an integer", d.long_window),
        psi_warn=positive_key(r, "psi_warn", "a number", d.psi_warn),
        psi_alert=positive_key(r, "psi_alert", "a number", d.psi_alert),
        enabled=r.get("enabled", "a boolean", d.enabled),
        accuracy_margin=positive_key(
            r, "accuracy_margin", "a number", d.accuracy_margin, allow_zero=True
        ),
        min_feedback=positive_key(r, "min_feedback", "an integer", d.min_feedback),
        predictions=positive_key(r, "predictions", "an integer", d.predictions),
        mae_margin=positive_key(r, "mae_margin", "a number", d.mae_margin, allow_zero=True),
    )
    r.done()
    window, long_window = drift.window, drift.long_window
    if window and long_window and long_window < window:
        r.error(f"must be >= window ({window}), not {long_window}", "long_window")
    if drift.psi_warn and drift.psi_alert and drift.psi_alert < drift.psi_warn:
        r.error(f"must be >= psi_warn ({drift.psi_warn}), not {drift.psi_alert}", "psi_alert")
    if window and window < 10:
        r.error(f"must be >= 10 rows, not {window}", "window")
    return drift
