"""config.toml validation: the shipped file parses; every bad edit names its key and reason."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.config.load import inactive_settings, load_config
from proxy.config.schema import (
    AdminConfig,
    AlertsConfig,
    BatchingConfig,
    CanaryConfig,
    DriftConfig,
    GatesConfig,
    LimitsConfig,
    ServerConfig,
    ShadowConfig,
    VersionConfig,
)
from proxy.errors import ConfigError

from .helpers import ROOT

GOOD = """
[models.cancer]
mode = "canary"
stable = "v1"
[models.cancer.versions]
v1 = { path = "models/cancer/v1" }
v2 = { path = "models/cancer/v2" }
[models.cancer.canary]
weights = { v1 = 90, v2 = 10 }
"""


def errors_of(tmp_path: Path, text: str) -> list[str]:
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value).startswith(f"{path}:")
    return err.value.errors


def test_shipped_config_parses() -> None:
    config = load_config(ROOT / "config.toml")
    m = config.models["cancer"]
    assert (
        m.mode == "canary" and m.canary is not None and m.canary.weights == {"v1": 90.0, "v2": 10.0}
    )
    assert m.shadow is not None and m.shadow.mirrors == ("v2",)
    assert m.blue_green is not None and m.blue_green.active_version == "v1"
    assert m.sticky_key == "x-user-id"
    assert m.versions["v1"].path == ROOT / "models/cancer/v1"
    assert len(config.digest) == 64


def test_good_minimal_config(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(GOOD)
    config = load_config(path)
    assert config.server.port == 8080 and config.batching.max_batch_size == 64


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (
            GOOD.replace("v1 = 90", "v3 = 90"),
            "models.cancer.canary.weights: v3 is not a version of cancer (versions: v1, v2)",
        ),
        (
            GOOD.replace("v1 = 90", "v1 = -1"),
            "models.cancer.canary.weights: v1 must be a non-negative number, not -1",
        ),
        (
            GOOD.replace("v1 = 90, v2 = 10", "v1 = 0, v2 = 0"),
            "models.cancer.canary.weights: at least one weight must be > 0",
        ),
        (
            GOOD.replace('mode = "canary"', 'mode = "bluegreen"'),
            "models.cancer.mode: must be one of single, canary, shadow, blue_green, not 'bluegreen'",
        ),
        (
            GOOD.replace('mode = "canary"', 'mode = "shadow"'),
            'models.cancer.mode: mode = "shadow" needs a [models.cancer.shadow] table',
        ),
        (
            GOOD.replace('stable = "v1"', 'stable = "v9"'),
            "models.cancer.stable: v9 is not a version of cancer",
        ),
        (
            GOOD + "\n[server]\nport = 99999\n",
            "server.port: must be a port number 0..65535, not 99999",
        ),
        (GOOD + "\n[server]\nprot = 1\n", "server.prot: unknown key"),
        (
            GOOD + '\n[batching]\nmax_batch_size = "64"\n',
            "batching.max_batch_size: must be an integer, not a string '64'",
        ),
        (GOOD + "\n[limits]\nmax_inflight = 0\n", "limits.max_inflight: must be > 0, not 0"),
        (GOOD + "\n[metrics]\n", "metrics: unknown section"),
        (
            GOOD.replace(
                'v2 = { path = "models/cancer/v2" }', 'v2 = { path = "a", url = "http://x" }'
            ),
            "models.cancer.versions.v2: needs exactly one of path",
        ),
        (
            GOOD.replace('v2 = { path = "models/cancer/v2" }', 'v2 = { url = "ftp://x" }'),
            "models.cancer.versions.v2.url: must be an http(s) URL",
        ),
        (
            GOOD + '[models.cancer.shadow]\nprimary = "v1"\nmirrors = ["v1"]\n',
            "models.cancer.shadow.mirrors: v1 is the primary",
        ),
        (
            GOOD + '[models.cancer.shadow]\nprimary = "v1"\nmirrors = ["v2"]\nsample = 1.5\n',
            "models.cancer.shadow.sample: must be a fraction in 0..1, not 1.5",
        ),
        (
            GOOD + '[models.cancer.blue_green]\nblue = "v1"\ngreen = "v2"\nactive = "red"\n',
            'models.cancer.blue_green.active: must be "blue" or "green"',
        ),
        (
            GOOD + "[models.cancer.drift]\nwindow = 100\nlong_window = 10\n",
            "models.cancer.drift.long_window: must be >= window (100), not 10",
        ),
        (
            GOOD.replace(
                "weights = { v1 = 90, v2 = 10 }", "weights = { v1 = 90, v2 = 10 }\nsteps = [50, 25]"
            ),
            "models.cancer.canary.steps: must increase step by step",
        ),
        (
            GOOD.replace(
                "weights = { v1 = 90, v2 = 10 }",
                "weights = { v1 = 90, v2 = 10 }\nsteps = [10, 150]",
            ),
            "models.cancer.canary.steps: must be a non-empty list of percentages in (0, 100]",
        ),
        (
            GOOD.replace(
                "weights = { v1 = 90, v2 = 10 }",
                "weights = { v1 = 90, v2 = 10 }\nstep_interval_s = 5",
            ),
            "models.cancer.canary.step_interval_s: step_interval_s needs steps",
        ),
        (
            GOOD.replace(
                "weights = { v1 = 90, v2 = 10 }",
                "weights = { v1 = 90, v2 = 10 }\nsteps = [25]\ngates = { max_psi = -0.2 }",
            ),
            "models.cancer.canary.gates.max_psi: must be > 0, not -0.2",
        ),
        (
            GOOD.replace(
                "weights = { v1 = 90, v2 = 10 }",
                "weights = { v1 = 90, v2 = 10 }\nsteps = [25]\ngates = { min_agreement = 2 }",
            ),
            "models.cancer.canary.gates.min_agreement: must be a fraction in 0..1, not 2",
        ),
        (
            GOOD.replace(
                "weights = { v1 = 90, v2 = 10 }",
                "weights = { v1 = 90, v2 = 10 }\nsteps = [25]\ngates = { max_eror_rate = 0.1 }",
            ),
            "models.cancer.canary.gates.max_eror_rate: unknown key",
        ),
        (
            GOOD.replace(
                "weights = { v1 = 90, v2 = 10 }",
                "weights = { v2 = 10, v1 = 80, v3 = 10 }\nsteps = [25]",
            ),
            "models.cancer.canary.weights: v3 is not a version",
        ),
        (
            GOOD.replace('stable = "v1"', 'stable = "v1"\nsticky_key = "u"')
            .replace("v2 = { path", 'v3 = { path = "x" }\nv2 = { path')
            .replace(
                "weights = { v1 = 90, v2 = 10 }",
                "weights = { v1 = 80, v2 = 10, v3 = 10 }\ngates = { max_error_rate = 0.1 }",
            ),
            "models.cancer.canary.weights: a progressive or gated canary splits between stable (v1) and one canary",
        ),
        ("", "models: at least one [models.<name>] table is required"),
    ],
)
def test_bad_edit_names_key_and_reason(tmp_path: Path, edit: str, expected: str) -> None:
    errors = errors_of(tmp_path, edit)
    assert any(expected in e for e in errors), errors


def test_every_error_is_reported_at_once(tmp_path: Path) -> None:
    text = GOOD.replace("v1 = 90", "v3 = 90") + "\n[server]\nport = -1\nbogus = 1\n"
    errors = errors_of(tmp_path, text)
    assert len(errors) == 3, errors


def test_invalid_toml_and_missing_file(tmp_path: Path) -> None:
    errors = errors_of(tmp_path, "[models.cancer\n")
    assert "invalid TOML" in errors[0]
    with pytest.raises(ConfigError, match="cannot read file"):
        load_config(tmp_path / "absent.toml")


def test_a_missing_key_takes_its_dataclass_default(tmp_path: Path) -> None:
    """Defaults live on the schema's dataclasses only: a config that leaves every optional key
    out equals them (a default repeated in a parser and then changed in one place fails here)."""
    path = tmp_path / "c.toml"
    text = GOOD.replace(
        "weights = { v1 = 90, v2 = 10 }", "weights = { v1 = 90, v2 = 10 }\nsteps = [50]"
    )
    text += '[models.cancer.shadow]\nprimary = "v1"\nmirrors = ["v2"]\n'
    text += '[models.cancer.blue_green]\nblue = "v1"\ngreen = "v2"\n'
    path.write_text(text)
    config = load_config(path)
    assert (config.server, config.admin, config.limits) == (
        ServerConfig(),
        AdminConfig(),
        LimitsConfig(),
    )
    assert (config.batching, config.alerts) == (BatchingConfig(), AlertsConfig())
    m = config.models["cancer"]
    assert m.versions["v1"] == VersionConfig(name="v1", path=tmp_path / "models/cancer/v1")
    assert m.drift == DriftConfig() and m.sticky_key is None
    assert m.canary == CanaryConfig(
        weights={"v1": 90.0, "v2": 10.0}, steps=(50.0,), canary="v2", gates=GatesConfig()
    )
    assert m.shadow == ShadowConfig(primary="v1", mirrors=("v2",))
    assert m.blue_green is not None and m.blue_green.active == "blue"


def test_inactive_settings_warn_only_when_they_ask_for_something(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[server]\nworkers = 1\n[limits]\nadaptive = false\n" + GOOD)
    assert inactive_settings(load_config(path)) == []
    path.write_text("[server]\nworkers = 0\n[limits]\nadaptive = true\nmax_inflight = 7\n" + GOOD)
    assert inactive_settings(load_config(path)) == [
        f"{path}:server.workers: 0 (one per core) is accepted and not active yet;"
        " this release serves with one process",
    ]  # limits.adaptive is built: true warns no more
    path.write_text("[server]\nworkers = 4\n[limits]\nadaptive = false\n" + GOOD)
    (warning,) = inactive_settings(load_config(path))
    assert warning.startswith(f"{path}:server.workers: 4 is accepted and not active yet")
