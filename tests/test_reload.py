"""Hot reload: what changes, what stays warm, what a bad edit does (nothing), and the watcher."""

from __future__ import annotations

import asyncio
import itertools
import os
import shutil
from pathlib import Path
from typing import Any

import orjson
import pytest

from proxy.models.backends import LocalBackend
from proxy.runtime.reloader import ConfigWatcher

from .helpers import BASE_CONFIG, infer_body, model_section
from .upstream import start_upstream


def blue_green(repo: Path, active: str) -> str:
    return model_section(mode="blue_green", repo=repo) + (
        f'[models.cancer.blue_green]\nblue = "v1"\ngreen = "v2"\nactive = "{active}"\n'
    )


AFTER = 30  # requests that must be answered after each blue-green flip


def rewrite(path: Path, models: str) -> None:
    path.write_text(BASE_CONFIG.format(max_body=4194304, max_inflight=512) + models)


async def test_reload_flips_blue_green_under_load_without_a_failed_request(
    start: Any, write_config: Any, model_repo: Path, cancer_rows: Any
) -> None:
    config = write_config(blue_green(model_repo, "blue"))
    client, serving = await start(config)
    body = infer_body(cancer_rows[:1])
    seen: list[tuple[int, str, int]] = []  # (status, version, flips done when it started)
    stop = asyncio.Event()
    flips_done = 0
    answered_after_flip = asyncio.Event()

    async def user() -> None:
        for _ in range(10_000):  # bounded; ends when the test says so
            if stop.is_set():
                return
            started = flips_done
            resp = await client.post("/v2/models/cancer/infer", json=body)
            seen.append((resp.status, resp.headers.get("x-model-version", ""), started))
            await resp.read()
            if sum(1 for *_, st in seen[-AFTER:] if st == flips_done) >= AFTER:
                answered_after_flip.set()  # AFTER requests that started after the swap answered

    users = [asyncio.ensure_future(user()) for _ in range(8)]
    flips = ["green", "blue", "green"]
    for active in flips:
        rewrite(Path(config.source), blue_green(model_repo, active))
        result = await serving.reloader.reload("test")
        assert result["outcome"] == "ok", result
        flips_done += 1
        answered_after_flip.clear()
        # AFTER requests that started after the swap have been answered (bounded: 30 s)
        await asyncio.wait_for(answered_after_flip.wait(), timeout=30)
        want = "v2" if active == "green" else "v1"
        after = [v for _, v, started in seen if started == flips_done]
        assert after and all(v == want for v in after), (active, after[:10])
    stop.set()
    await asyncio.gather(*users)
    assert all(status == 200 for status, _, _ in seen), [s for s in seen if s[0] != 200][:5]
    assert len(seen) >= AFTER * len(flips) and serving.counters.reloads() == {"ok": 3, "error": 0}


async def test_unchanged_versions_stay_warm_and_changed_ones_reload(
    start: Any, write_config: Any, repo: Path
) -> None:
    config = write_config(model_section(repo=repo))
    _, serving = await start(config)
    old = dict(serving.plan.models["cancer"].backends)
    result = await serving.reloader.reload("test")  # nothing changed on disk: nothing is loaded
    assert result["versions_loaded"] == 0
    assert serving.plan.models["cancer"].backends == old
    # v2's file changes (a retrained model in place): only v2 is loaded again
    for f in ("model.onnx", "manifest.json"):
        shutil.copy(repo / "cancer" / "v1" / f, repo / "cancer" / "v2" / f)
    result = await serving.reloader.reload("test")
    assert result["versions_loaded"] == 1
    new = serving.plan.models["cancer"].backends
    assert new["v1"] is old["v1"] and new["v2"] is not old["v2"]
    await asyncio.wait_for(serving.tasks.idle(), timeout=10)
    assert isinstance(old["v2"], LocalBackend) and old["v2"].batcher.closed
    assert not old["v1"].batcher.closed  # type: ignore[attr-defined]


async def test_retired_version_closes_after_its_last_request(
    start: Any, write_config: Any, model_repo: Path, aiohttp_raw_server: Any, cancer_rows: Any
) -> None:
    upstream_serving = await start(write_config(model_section(repo=model_repo)))
    up, _, url = await start_upstream(aiohttp_raw_server, upstream_serving[1])
    versions = {
        "v1": f'{{ path = "{model_repo}/cancer/v1" }}',
        "v2": f'{{ path = "{model_repo}/cancer/v2" }}',
        "v3": f'{{ url = "{url}", timeout_ms = 30000 }}',
    }
    config = write_config(model_section(repo=model_repo, versions=versions))
    client, serving = await start(config)
    v2 = serving.plan.models["cancer"].backends["v2"]
    up.gate.clear()
    held = asyncio.ensure_future(
        client.post("/v2/models/cancer/versions/v3/infer", json=infer_body(cancer_rows[:1]))
    )
    await asyncio.wait_for(up.first_received.wait(), timeout=10)
    old_plan = serving.plan
    only_v1 = {"v1": versions["v1"]}
    rewrite(Path(config.source), model_section(repo=model_repo, versions=only_v1))  # v2, v3 removed
    assert (await serving.reloader.reload("test"))["outcome"] == "ok"
    assert "v2" not in serving.plan.models["cancer"].backends
    assert old_plan.retired and old_plan.active == 1
    assert (
        isinstance(v2, LocalBackend) and not v2.batcher.closed
    )  # a request still runs on the old plan
    up.gate.set()
    resp = await asyncio.wait_for(held, timeout=10)
    assert resp.status == 200 and resp.headers["x-model-version"] == "v3"
    await asyncio.wait_for(old_plan.idle.wait(), timeout=10)
    await asyncio.wait_for(serving.tasks.idle(), timeout=10)
    assert v2.batcher.closed


BAD_EDITS = [
    ("invalid toml", lambda text, repo: text + "\n[models.cancer\n", "invalid TOML"),
    (
        "unknown key",
        lambda text, repo: text.replace('mode = "single"', 'mode = "single"\nmood = 1'),
        "models.cancer.mood: unknown key",
    ),
    (
        "missing version",
        lambda text, repo: text.replace('stable = "v1"', 'stable = "v9"'),
        "v9 is not a version of cancer",
    ),
    (
        "missing model dir",
        lambda text, repo: text.replace("cancer/v2", "cancer/v7"),
        "no such model directory",
    ),
]


@pytest.mark.parametrize(("case", "edit", "words"), BAD_EDITS, ids=[b[0] for b in BAD_EDITS])
async def test_bad_edit_changes_nothing(
    start: Any, write_config: Any, repo: Path, cancer_rows: Any, case: str, edit: Any, words: str
) -> None:
    config = write_config(model_section(repo=repo))
    client, serving = await start(config)
    path = Path(config.source)
    good = path.read_text()
    plan = serving.plan
    path.write_text(edit(good, repo))
    result = await serving.reloader.reload("test")
    assert result["outcome"] == "error"
    assert any(words in e for e in result["errors"]), result
    assert serving.plan is plan and words in (serving.reloader.last_error or "")
    assert serving.counters.reloads()["error"] == 1
    resp = await client.post("/v2/models/cancer/infer", json=infer_body(cancer_rows[:1]))
    assert resp.status == 200  # the running plan keeps serving
    path.write_text(good)
    assert (await serving.reloader.reload("test"))["outcome"] == "ok"
    assert serving.reloader.last_error is None


async def test_corrupt_model_file_refuses_the_reload(
    start: Any, write_config: Any, repo: Path
) -> None:
    config = write_config(model_section(repo=repo))
    _, serving = await start(config)
    data = bytearray((repo / "cancer" / "v2" / "model.onnx").read_bytes())
    data[100] ^= 0xFF
    (repo / "cancer" / "v2" / "model.onnx").write_bytes(bytes(data))
    result = await serving.reloader.reload("test")
    assert result["outcome"] == "error"
    assert any("models.cancer.versions.v2:" in e and "sha256 is" in e for e in result["errors"])
    serving.writer.wait_written()
    audit = [orjson.loads(line) for line in serving.audit.path.read_bytes().splitlines()]
    assert audit[-1]["event"] == "reload_refused"


async def test_concurrent_reloads_are_serialised(
    start: Any, write_config: Any, model_repo: Path
) -> None:
    config = write_config(blue_green(model_repo, "blue"))
    _, serving = await start(config)
    rewrite(Path(config.source), blue_green(model_repo, "green"))
    results = await asyncio.gather(*(serving.reloader.reload(f"r{i}") for i in range(4)))
    assert [r["outcome"] for r in results] == ["ok"] * 4
    events = [e for e in serving.audit.read() if e["event"] == "reload"]
    assert [e["cause"] for e in events] == ["r0", "r1", "r2", "r3"]
    # each reload saw the plan the previous one installed
    for a, b in itertools.pairwise(events):
        assert b["digest_before"] == a["digest_after"]


def test_watcher_sees_in_place_write_rename_and_symlink_swap(tmp_path: Path) -> None:
    # in-place write
    path = tmp_path / "config.toml"
    path.write_text("a = 1\n")
    w = ConfigWatcher(path)
    assert not w.check()
    with path.open("a") as f:
        f.write("b = 2\n")
    assert w.check() and not w.check()
    # an editor's write-and-rename (same size, same second: the inode changes)
    tmp = tmp_path / "config.toml.swp"
    tmp.write_text("a = 1\nb = 3\n")
    os.replace(tmp, path)
    assert w.check()
    # a Kubernetes ConfigMap: config.toml -> ..data/config.toml, ..data -> ..2026_1 swapped to ..2026_2
    cm = tmp_path / "cm"
    cm.mkdir()
    for gen, text in (("..2026_1", "x = 1\n"), ("..2026_2", "x = 2\n")):
        (cm / gen).mkdir()
        (cm / gen / "config.toml").write_text(text)
    (cm / "..data").symlink_to("..2026_1")
    (cm / "config.toml").symlink_to("..data/config.toml")
    w = ConfigWatcher(cm / "config.toml")
    assert not w.check()
    (cm / "..data_tmp").symlink_to("..2026_2")
    os.replace(cm / "..data_tmp", cm / "..data")  # the atomic swap kubelet does
    assert w.check()
    assert (cm / "config.toml").read_text() == "x = 2\n"


async def test_watcher_drives_a_reload(start: Any, write_config: Any, model_repo: Path) -> None:
    config = write_config(blue_green(model_repo, "blue"))
    _, serving = await start(config)
    watcher = ConfigWatcher(Path(config.source))
    tmp = Path(config.source).with_suffix(".new")
    tmp.write_text(
        BASE_CONFIG.format(max_body=4194304, max_inflight=512) + blue_green(model_repo, "green")
    )
    os.replace(tmp, config.source)
    assert watcher.check()
    assert (await serving.reloader.reload("file changed", only_if_changed=True))["outcome"] == "ok"
    assert serving.plan.models["cancer"].strategy.versions == ("v2",)
    assert (await serving.reloader.reload("file changed", only_if_changed=True))[
        "outcome"
    ] == "unchanged"
