"""A plan of several models: each routed by its own mode, fed back, counted and reloaded apart."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from proxy.engine.counters import FeedbackOutcome
from proxy.http.admin import create_admin_app

from .helpers import BASE_CONFIG, infer_body, model_section


def two_models(repo: Path, *, tumour_active: str) -> str:
    """cancer (single, v1) and tumour (blue-green), both over the demo's cancer v1 and v2."""
    tumour = model_section(mode="blue_green", repo=repo, name="tumour") + (
        f'[models.tumour.blue_green]\nblue = "v1"\ngreen = "v2"\nactive = "{tumour_active}"\n'
    )
    return model_section(repo=repo) + tumour


async def test_two_models_are_routed_fed_back_and_reloaded_independently(
    start: Any, write_config: Any, model_repo: Path, aiohttp_client: Any, cancer_rows: Any
) -> None:
    config = write_config(two_models(model_repo, tumour_active="green"))
    client, serving = await start(config)
    admin = await aiohttp_client(create_admin_app(serving))

    async def infer(model: str, i: int, rid: str | None = None) -> tuple[str, str, int]:
        """(answering version, request id, predicted label) of one row sent to `model`."""
        body = infer_body(cancer_rows[i : i + 1], rid=rid)
        resp = await client.post(f"/v2/models/{model}/infer", json=body)
        assert resp.status == 200, await resp.text()
        doc = await resp.json()
        assert doc["model_name"] == model
        label = next(o for o in doc["outputs"] if o["name"] == "label")["data"][0]
        return resp.headers["x-model-version"], doc["id"], label

    async def feedback(model: str, rid: str, label: int) -> tuple[int, dict[str, Any]]:
        resp = await client.post(f"/v2/models/{model}/feedback", json={"id": rid, "label": label})
        return resp.status, await resp.json()

    async def requests_by_version() -> dict[str, dict[str, int]]:
        status = await (await admin.get("/admin/status")).json()
        return {
            m: {v: doc["requests"] for v, doc in status["models"][m]["versions"].items()}
            for m in status["models"]
        }

    # routed independently: cancer answers with its stable v1, tumour with its green v2
    answers = {m: [await infer(m, i) for i in range(20)] for m in ("cancer", "tumour")}
    assert {v for v, _, _ in answers["cancer"]} == {"v1"}
    assert {v for v, _, _ in answers["tumour"]} == {"v2"}
    status = await (await admin.get("/admin/status")).json()
    assert set(status["models"]) == {"cancer", "tumour"}
    assert status["models"]["cancer"]["mode"] == "single"
    assert status["models"]["cancer"]["weights"] == {"v1": 1.0}
    assert status["models"]["tumour"]["mode"] == "blue_green"
    assert status["models"]["tumour"]["weights"] == {"v2": 1.0}
    assert await requests_by_version() == {
        "cancer": {"v1": 20, "v2": 0},
        "tumour": {"v1": 0, "v2": 20},
    }

    # feedback joins only the model's own predictions: ids this process made up...
    _, cancer_id, cancer_label = answers["cancer"][0]
    _, tumour_id, tumour_label = answers["tumour"][0]
    assert (await feedback("tumour", cancer_id, cancer_label))[0] == 404
    assert (await feedback("cancer", tumour_id, tumour_label))[0] == 404
    status_code, joined = await feedback("cancer", cancer_id, cancer_label)
    assert status_code == 200 and (joined["model_name"], joined["model_version"]) == (
        "cancer",
        "v1",
    )
    status_code, joined = await feedback("tumour", tumour_id, tumour_label)
    assert status_code == 200 and (joined["model_name"], joined["model_version"]) == (
        "tumour",
        "v2",
    )
    # ...and a client's id sent to both names two predictions, one per model
    _, _, first = await infer("cancer", 30, rid="user-7")
    _, _, second = await infer("tumour", 31, rid="user-7")
    status_code, joined = await feedback("tumour", "user-7", second)
    assert status_code == 200 and joined["model_version"] == "v2"
    assert (await feedback("tumour", "user-7", second))[0] == 404  # joined once
    status_code, joined = await feedback("cancer", "user-7", first)  # cancer's is still there
    assert status_code == 200 and joined["model_version"] == "v1"
    assert serving.counters.feedback_counts() == {
        ("tumour", FeedbackOutcome.UNKNOWN_ID): 2,
        ("cancer", FeedbackOutcome.UNKNOWN_ID): 1,
        ("cancer", FeedbackOutcome.JOINED): 2,
        ("tumour", FeedbackOutcome.JOINED): 2,
    }

    # a reload that flips tumour leaves cancer alone: its counters, its warm versions, its
    # stored predictions; tumour's counters carry over too
    cancer_backends = dict(serving.plan.models["cancer"].backends)
    _, kept_id, kept_label = await infer("cancer", 40)
    Path(config.source).write_text(
        BASE_CONFIG.format(max_body=4194304, max_inflight=512)
        + two_models(model_repo, tumour_active="blue")
    )
    result = await serving.reloader.reload("test")
    assert result["outcome"] == "ok" and result["versions_loaded"] == 0
    assert serving.plan.models["cancer"].backends == cancer_backends
    assert await requests_by_version() == {
        "cancer": {"v1": 22, "v2": 0},
        "tumour": {"v1": 0, "v2": 21},
    }
    assert (await infer("tumour", 41))[0] == "v1"
    assert (await infer("cancer", 42))[0] == "v1"
    assert await requests_by_version() == {
        "cancer": {"v1": 23, "v2": 0},
        "tumour": {"v1": 1, "v2": 21},
    }
    status_code, joined = await feedback("cancer", kept_id, kept_label)
    assert status_code == 200 and joined["model_version"] == "v1"
