"""A locust load test for mlproxy: users with sticky ids sending real breast-cancer rows.

    .venv/bin/locust -f bench/locustfile.py --host http://127.0.0.1:8080 \
        --headless -u 200 -r 50 -t 60s --processes 2

Each simulated user has its own `x-user-id` (so a canary with `sticky_key` keeps it on one
version), sends one to four rows per request, and checks that every answer names the version
that served it. One locust process tops out near 8k requests/s on this hardware: use
`--processes` to scale, and wrk (bench/throughput.py) for throughput ceilings.
"""

from __future__ import annotations

import random
import uuid

import orjson
from locust import FastHttpUser, between, task
from sklearn.datasets import load_breast_cancer

ROWS = load_breast_cancer().data.astype("float32")
MODEL = "cancer"


class InferenceUser(FastHttpUser):
    """One client application user."""

    wait_time = between(0.0, 0.01)

    def on_start(self) -> None:
        self.user_id = uuid.uuid4().hex
        self.rng = random.Random(self.user_id)

    def _body(self) -> bytes:
        n = self.rng.randint(1, 4)
        start = self.rng.randrange(0, len(ROWS) - n)
        rows = ROWS[start : start + n]
        return orjson.dumps(
            {
                "inputs": [
                    {
                        "name": "input",
                        "shape": [n, 30],
                        "datatype": "FP32",
                        "data": rows.reshape(-1).tolist(),
                    }
                ]
            }
        )

    @task(20)
    def infer(self) -> None:
        with self.client.post(
            f"/v2/models/{MODEL}/infer",
            data=self._body(),
            headers={"Content-Type": "application/json", "x-user-id": self.user_id},
            name="infer",
            catch_response=True,
        ) as resp:
            if resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}: {resp.text[:200]}")
            elif not resp.headers.get("x-model-version"):
                resp.failure("answer without x-model-version")
            else:
                resp.success()

    @task(1)
    def metadata(self) -> None:
        self.client.get(f"/v2/models/{MODEL}", name="metadata")
