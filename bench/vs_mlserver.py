"""mlproxy against Seldon MLServer, side by side (issue 11's goal: single >= 14x MLServer).

MLServer (PyPI `mlserver` + `mlserver-sklearn`, in its own venv, `.venv-mlserver`, made by
`make mlserver-venv`: its pins are not ours) serves the same kind of model as mlproxy's
cancer/v1: the same scikit-learn pipeline (StandardScaler + LogisticRegression, the same
split and seed as `mlproxy demo-models`), trained by MLServer's own scikit-learn and saved
with joblib, with its sklearn runtime. Tuned as its docs advise for one process: no debug, no
parallel inference workers, no metrics endpoint. mlproxy serves `single` with every monitor on.

Both servers run at once on CPU 0 (the idle one costs nothing); wrk -c64 on CPU 1 loads one,
then the other, for `--seconds` each, `--rounds` times, the order swapped every round. The
ratio is the median over rounds of mlproxy's req/s over MLServer's in the same round. Each
server first answers one probe. It judges no floor (the 14x is a goal, reported); it exits 1
when an mlproxy answer was not 2xx or a socket failed, and reports MLServer's the same way.

Run from the repository root (needs wrk, taskset, two cores, `mlproxy demo-models` and
`make mlserver-venv`):

    .venv/bin/python bench/vs_mlserver.py --out bench/results/vs-mlserver-run1   # ~2 minutes
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import orjson

from harness.configs import mlproxy_config
from harness.load import run_wrk
from harness.payloads import cancer_rows, infer_bodies, write_lua
from harness.report import save_run
from harness.servers import INFER_PATH, ROOT, ServerSpec, running
from harness.transcript import Transcript

SERVER_CPU = 0
LOAD_CPU = 1
CONNS = 64
GOAL = 14.0
VENV = ROOT / ".venv-mlserver"
# Run by MLServer's own interpreter, so that the pickle matches the scikit-learn that loads it.
TRAIN = """
import sys, joblib
from sklearn.datasets import load_breast_cancer
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
seed = int(sys.argv[2])
data = load_breast_cancer()
x_train, _, y_train, _ = train_test_split(
    data.data, data.target, test_size=0.2, random_state=seed, stratify=data.target
)
model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, random_state=seed))
joblib.dump(model.fit(x_train, y_train), sys.argv[1])
"""


def mlserver_spec(model_dir: Path) -> ServerSpec:
    """MLServer on the harness's ports: HTTP on the data port, gRPC on the 'admin' one."""

    def cmd(port: int, grpc_port: int, tmp: Path) -> list[str]:
        settings = {
            "host": "127.0.0.1",
            "http_port": port,
            "grpc_port": grpc_port,
            "debug": False,
            "parallel_workers": 0,
            "metrics_endpoint": None,
            "load_models_at_startup": True,
        }
        (model_dir / "settings.json").write_bytes(orjson.dumps(settings))
        return [str(VENV / "bin" / "mlserver"), "start", str(model_dir)]

    return ServerSpec("mlserver", "bare", cmd)


def mlproxy_spec() -> ServerSpec:
    def cmd(port: int, admin: int, tmp: Path) -> list[str]:
        path = tmp / "vs-mlserver.toml"
        path.write_text(mlproxy_config("single", port, admin, monitoring=True))
        return [sys.executable, "-m", "proxy", "serve", "--config", str(path)]

    return ServerSpec("single", "mlproxy", cmd)


def build_model_dir(root: Path) -> Path:
    from proxy.packaging import DEMO_SEED

    model_dir = root / "mlserver-cancer"
    model_dir.mkdir()
    subprocess.run(
        [
            str(VENV / "bin" / "python"),
            "-c",
            TRAIN,
            str(model_dir / "model.joblib"),
            str(DEMO_SEED),
        ],
        check=True,
        timeout=120,
    )
    model_settings = {
        "name": "cancer",
        "implementation": "mlserver_sklearn.SKLearnModel",
        "parameters": {"uri": "./model.joblib", "version": "v1"},
    }
    (model_dir / "model-settings.json").write_bytes(orjson.dumps(model_settings))
    return model_dir


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seconds", type=int, default=8)
    p.add_argument("--out", type=Path, help="write <out>.json and <out>.md")
    args = p.parse_args(argv)
    if not (VENV / "bin" / "mlserver").exists():
        print(f"no MLServer at {VENV}: run `make mlserver-venv` first", file=sys.stderr)
        return 2
    t = Transcript()
    bodies = infer_bodies(cancer_rows(256))
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as d, contextlib.ExitStack() as stack:
        tmp = Path(d)
        lua = tmp / "vs.lua"
        write_lua(lua, bodies)
        model_dir = build_model_dir(tmp)
        ours = stack.enter_context(
            running(mlproxy_spec(), tmp=tmp, cpu=SERVER_CPU, probe_body=bodies[0], transcript=t)
        )
        theirs = stack.enter_context(
            running(
                mlserver_spec(model_dir),
                tmp=tmp,
                cpu=SERVER_CPU,
                probe_body=bodies[0],
                transcript=t,
            )
        )
        for server in (ours, theirs):  # warm both (first batches, JIT-free but cache-cold)
            run_wrk(server.base + INFER_PATH, lua, conns=CONNS, duration=2, cpu=LOAD_CPU)
        for i in range(args.rounds):
            order = (ours, theirs) if i % 2 == 0 else (theirs, ours)
            got: dict[str, Any] = {}
            for server in order:
                r = run_wrk(
                    server.base + INFER_PATH, lua, conns=CONNS, duration=args.seconds, cpu=LOAD_CPU
                )
                got[server.spec.name] = r
            row = {
                "round": i + 1,
                "single_rps": got["single"]["rps"],
                "mlserver_rps": got["mlserver"]["rps"],
                "single_p50_ms": got["single"]["p50_ms"],
                "mlserver_p50_ms": got["mlserver"]["p50_ms"],
                # not 2xx, socket errors (wrk: connect, read, write, timeout), per server
                "single_bad": [got["single"]["non_2xx"], got["single"]["socket_errors"]],
                "mlserver_bad": [got["mlserver"]["non_2xx"], got["mlserver"]["socket_errors"]],
            }
            row["ratio"] = round(row["single_rps"] / max(row["mlserver_rps"], 1e-9), 2)
            rows.append(row)
            t.log(
                f"round {i + 1}: single {row['single_rps']} req/s, mlserver"
                f" {row['mlserver_rps']} req/s: {row['ratio']}x"
            )
    ratio = statistics.median(r["ratio"] for r in rows)
    clean = all(r["single_bad"] == [0, 0] for r in rows)
    theirs_clean = all(r["mlserver_bad"] == [0, 0] for r in rows)
    t.out(
        f"## mlproxy single against MLServer (sklearn runtime), wrk -c{CONNS}, {args.rounds} rounds"
    )
    t.out()
    t.out(
        "| round | single req/s | MLServer req/s | ratio | single p50 ms | MLServer p50 ms |"
        " not 2xx, socket errors: single / MLServer |"
    )
    t.out("|---|---|---|---|---|---|---|")
    for r in rows:
        t.out(
            f"| {r['round']} | {r['single_rps']} | {r['mlserver_rps']} | {r['ratio']} |"
            f" {r['single_p50_ms']} | {r['mlserver_p50_ms']} |"
            f" {r['single_bad']} / {r['mlserver_bad']} |"
        )
    t.out()
    verdict = "met" if ratio >= GOAL else "not met"
    t.out(
        f"median ratio {ratio}x (goal {GOAL}x: {verdict}); every mlproxy answer 2xx: {clean};"
        f" every MLServer answer 2xx: {theirs_clean}"
    )
    if args.out:
        result = {
            "rounds": rows,
            "ratio": ratio,
            "goal": GOAL,
            "clean": clean,
            "mlserver_clean": theirs_clean,
        }
        save_run(args.out, result, t)
    return 0 if clean else 1


if __name__ == "__main__":
    sys.exit(main())
