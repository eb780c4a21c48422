"""The `mlproxy` command: serve, check, package, demo-models."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import importlib.util
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from proxy.config.load import inactive_settings, load_config
from proxy.config.schema import Config
from proxy.errors import ConfigError, ModelLoadError

if TYPE_CHECKING:
    from proxy.server import Worker

# What `package` and `demo-models` import beyond serving: the `package` extra (joblib comes
# with scikit-learn). Checked up front so that a serving-only install says what to do.
TRAINING_MODULES = ("sklearn", "skl2onnx", "onnx", "joblib")
PACKAGE_EXTRA = "pip install 'mlproxy[package]'"

log = logging.getLogger("proxy.cli")

# `workers` other than 1 runs a supervisor and N workers only with this set to 1: a preview
# until the rest of issue 11 (per-worker alerts, the efficiency bench) is in.
PREVIEW_WORKERS = "MLPROXY_PREVIEW_WORKERS"
WORKER_FAILED_START = 3
PR_SET_PDEATHSIG = 1  # prctl(2)


# Each request allocates dozens of short-lived containers; with the default gen-0 threshold (700)
# the cyclic GC ran every ~20 requests and took ~10% of a busy core (py-spy, 4k req/s).
GC_THRESHOLDS = (20_000, 20, 20)


async def _serve_tuned(config: Config, worker: Worker | None = None) -> None:
    """Serve with the process's GC tuned: what startup built (models, plan, both planes) lives
    forever, so it is frozen out of every later collection once both planes listen."""
    from proxy.server import serve

    ready = asyncio.Event()

    async def freeze_when_ready() -> None:
        await ready.wait()
        gc.collect()
        gc.freeze()

    freezer = asyncio.get_running_loop().create_task(freeze_when_ready())
    try:
        await serve(config, ready=ready, worker=worker)
    finally:
        freezer.cancel()


def _serve(args: argparse.Namespace) -> int:
    import uvloop

    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 1
    if config.server.workers != 1 and os.environ.get(PREVIEW_WORKERS) == "1":
        return _supervise(config)
    for warning in inactive_settings(config):
        log.warning("%s", warning)
    gc.set_threshold(*GC_THRESHOLDS)
    try:
        uvloop.run(_serve_tuned(config))
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"mlproxy: cannot listen: {exc}", file=sys.stderr)
        return 1
    return 0


def _supervise(config: Config) -> int:
    """`workers = N` (the preview; see PREVIEW_WORKERS): a supervisor and N workers."""
    import uvloop

    from proxy.scaleout import supervise, worker_count

    n = worker_count(config.server.workers)
    log.warning(
        "%s=1: serving with %d worker processes (a preview: duplicate-row and overload alerts"
        " and admission stay per worker, see docs/scaling.md)",
        PREVIEW_WORKERS,
        n,
    )
    try:
        return uvloop.run(supervise(config, workers=n))
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"mlproxy: cannot listen: {exc}", file=sys.stderr)
        return 1


def _worker(args: argparse.Namespace) -> int:
    """One worker of a supervisor (started by it, never by hand): the data plane on the
    inherited socket. Exit 3: it could not start (the supervisor gives such a slot up after
    a few tries in a row instead of restarting it in a loop)."""
    import uvloop

    from proxy.engine.pool import CountsPool
    from proxy.engine.shared import SharedCountsError
    from proxy.runtime.decisions import SharedDecisions
    from proxy.server import Worker

    _die_with_parent(args.group)
    try:
        config = load_config(args.config)
        pool = CountsPool(args.group, slots=args.slots, slot=args.slot)
    except (ConfigError, SharedCountsError, ValueError) as exc:
        print(f"mlproxy worker {args.slot}: cannot start: {exc}", file=sys.stderr)
        return WORKER_FAILED_START
    gc.set_threshold(*GC_THRESHOLDS)
    worker = Worker(
        slot=args.slot,
        fd=args.fd,
        pool=pool,
        decisions=SharedDecisions(args.group),
        onnx_threads=args.threads,
    )
    try:
        uvloop.run(_serve_tuned(config, worker))
    except (ConfigError, OSError, SharedCountsError) as exc:
        print(f"mlproxy worker {args.slot}: cannot start: {exc}", file=sys.stderr)
        return WORKER_FAILED_START
    return 0


def _die_with_parent(parent: int) -> None:
    """Have the kernel send SIGTERM to this worker when its supervisor dies (even by kill -9),
    so that no worker outlives its group; a worker whose supervisor is already gone stops."""
    import ctypes
    import signal

    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM))
    if os.getppid() != parent:
        os.kill(os.getpid(), signal.SIGTERM)


async def _check_models(config_path: str) -> list[str]:
    """Load the config and every model it names; returns the warnings for inactive settings."""
    from proxy.runtime.serving import close_serving, create_serving

    config = load_config(config_path)
    serving = await create_serving(config)
    await close_serving(serving)
    return inactive_settings(config)


def _check(args: argparse.Namespace) -> int:
    try:
        warnings = asyncio.run(_check_models(args.config))
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 1
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print(f"{args.config}: ok")
    return 0


def _missing_training_extra(command: str) -> bool:
    """True (after saying how to install it) when the `package` extra is not installed."""
    missing = [m for m in TRAINING_MODULES if importlib.util.find_spec(m) is None]
    if not missing:
        return False
    print(
        f"mlproxy {command} needs the training extra (missing: {', '.join(missing)}):"
        f" {PACKAGE_EXTRA}",
        file=sys.stderr,
    )
    return True


def _package(args: argparse.Namespace) -> int:
    if _missing_training_extra("package"):
        return 1
    import joblib
    import numpy as np

    from proxy.packaging import package_model

    try:
        model = joblib.load(args.model)
        x = np.load(args.train_data, allow_pickle=False)
        holdout = None
        if args.holdout_data or args.holdout_labels:
            if not (args.holdout_data and args.holdout_labels):
                print(
                    "mlproxy package: --holdout-data and --holdout-labels go together",
                    file=sys.stderr,
                )
                return 2
            holdout = (
                np.load(args.holdout_data, allow_pickle=False),
                np.load(args.holdout_labels, allow_pickle=False),
            )
        names = args.features.split(",") if args.features else None
        out = package_model(
            model,
            x,
            name=args.name,
            version=args.version,
            repo=Path(args.repo),
            feature_names=names,
            holdout=holdout,
        )
    except (OSError, ValueError, ModelLoadError) as exc:
        print(f"mlproxy package: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # skl2onnx raises many types for models it cannot convert
        print(
            f"mlproxy package: cannot convert {args.model}: {type(exc).__name__}: {exc}",
            file=sys.stderr,
        )
        return 1
    print(f"wrote {out}/model.onnx and {out}/manifest.json")
    return 0


def _demo(args: argparse.Namespace) -> int:
    if _missing_training_extra("demo-models"):
        return 1
    from proxy.packaging import build_demo_models

    for path in build_demo_models(Path(args.repo)):
        print(f"wrote {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mlproxy", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="serve the models config.toml names")
    s.add_argument("--config", default="config.toml")
    s.set_defaults(func=_serve)
    c = sub.add_parser("check", help="validate a config and every model it names")
    c.add_argument("config", nargs="?", default="config.toml")
    c.set_defaults(func=_check)
    k = sub.add_parser(
        "package", help="sklearn joblib model -> models/N/V/model.onnx + manifest.json"
    )
    k.add_argument("--model", required=True, help="a fitted sklearn estimator saved with joblib")
    k.add_argument(
        "--train-data", required=True, help=".npy of the training rows (baseline statistics)"
    )
    k.add_argument("--name", required=True)
    k.add_argument("--version", required=True)
    k.add_argument("--repo", default="models")
    k.add_argument("--features", help="comma-separated feature names (default f0, f1, ...)")
    k.add_argument("--holdout-data", help=".npy of holdout rows, for the manifest's holdout metric")
    k.add_argument("--holdout-labels", help=".npy of holdout labels or values")
    k.set_defaults(func=_package)
    d = sub.add_parser("demo-models", help="build the demo cancer v1 and v2 into models/")
    d.add_argument("--repo", default="models")
    d.set_defaults(func=_demo)
    w = sub.add_parser("_worker")  # started by the supervisor of `workers = N` only
    w.add_argument("--config", required=True)
    for flag in ("--fd", "--slot", "--slots", "--group", "--threads"):
        w.add_argument(flag, type=int, required=True)
    w.set_defaults(func=_worker)
    return p


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    args = build_parser().parse_args(argv)
    sys.exit(args.func(args))
