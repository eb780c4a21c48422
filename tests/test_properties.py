"""Properties over generated input (hypothesis): the protocol decoder, the feedback parser, the
admin guard and the config parser answer every input with their own result or their own error
(a 4xx, a ConfigError), never with another exception or a 5xx.

Examples are derandomized (the same ones every run, so CI is reproducible) and bounded in
number; the deadline is far above an example's cost (microseconds for the pure parsers, a
socket round trip for the guard) and catches only inputs that make a parser crawl."""

from __future__ import annotations

import asyncio
import dataclasses
import math
import tomllib
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from aiohttp import web
from hypothesis import HealthCheck, event, example, given, note, settings
from hypothesis import strategies as st

from proxy.config import schema
from proxy.config.load import load_config, parse_config
from proxy.config.schema import AdminConfig, Config
from proxy.errors import ConfigError, InvalidInputError, ProxyError
from proxy.http.admin import mutation_guard
from proxy.protocol.codec import (
    DTYPES,
    InferRequest,
    TensorSpec,
    parse_infer_request,
    parse_json_object,
)
from proxy.protocol.feedback import Classes, Feedback, Values, parse_feedback
from proxy.protocol.ids import RequestIds

PURE = settings(derandomize=True, database=None, max_examples=200, deadline=timedelta(seconds=1))
# The guard's examples each open a connection to a real server; fixtures outlive examples
# (the servers hold no state between requests).
SOCKETS = settings(
    derandomize=True,
    database=None,
    max_examples=120,
    deadline=timedelta(seconds=5),
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)

FEATURES = 3
SPECS = [
    TensorSpec("input", "FP32", (-1, FEATURES)),
    TensorSpec("input", "INT64", (-1, FEATURES)),
    TensorSpec("input", "FP64", (-1, 2)),
]
IDS = RequestIds(secret=b"property tests" * 2)

# ---------------------------------------------------------------- JSON values

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)  # what orjson reads as an int
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8)
)
json_values = st.recursive(
    json_scalars,
    lambda kids: (
        st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=6), kids, max_size=4)
    ),
    max_leaves=12,
)


def _paths(doc: Any, at: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every place in a JSON document (the root included) a mutation can hit."""
    found = [at]
    if isinstance(doc, dict):
        for k, v in doc.items():
            found += _paths(v, (*at, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            found += _paths(v, (*at, i))
    return found


def _set(doc: Any, path: tuple[Any, ...], value: Any) -> Any:
    if not path:
        return value
    parent = doc
    for step in path[:-1]:
        parent = parent[step]
    parent[path[-1]] = value
    return doc


def _delete(doc: Any, path: tuple[Any, ...]) -> Any:
    if not path:
        return doc
    parent = doc
    for step in path[:-1]:
        parent = parent[step]
    del parent[path[-1]]
    return doc


@st.composite
def mutated(draw: st.DrawFn, valid: st.SearchStrategy[Any]) -> Any:
    """A valid document with one to three parts replaced (by any JSON value, a boolean, the
    part wrapped in a list), deleted, or given an unknown key."""
    doc = draw(valid)
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(_paths(doc)))
        part: Any = doc
        for step in path:
            part = part[step]
        how = draw(st.sampled_from(["replace", "bool", "wrap", "delete", "extra"]))
        if how == "replace":
            doc = _set(doc, path, draw(json_values))
        elif how == "bool":
            doc = _set(doc, path, draw(st.booleans()))
        elif how == "wrap":
            doc = _set(doc, path, [part])
        elif how == "delete":
            doc = _delete(doc, path)
        elif isinstance(part, dict):
            part[draw(st.text(max_size=6))] = draw(json_values)
    return doc


# ---------------------------------------------------------------- (a) the protocol decoder


@st.composite
def infer_docs(draw: st.DrawFn, spec: TensorSpec) -> dict[str, Any]:
    """A valid V2 request for `spec`, in any numeric datatype, flat or nested data."""
    rows, cols = draw(st.integers(1, 3)), spec.shape[1]
    datatype = draw(st.sampled_from(["FP32", "FP64", "INT32", "INT64", "INT8", "UINT8"]))
    if datatype.startswith("FP"):
        value: st.SearchStrategy[Any] = st.floats(-1e6, 1e6, allow_nan=False)
    else:
        info = np.iinfo(DTYPES[datatype])
        value = st.integers(max(int(info.min), -100), min(int(info.max), 100))
    flat = draw(st.lists(value, min_size=rows * cols, max_size=rows * cols))
    data: list[Any] = flat
    if draw(st.booleans()):
        data = [flat[r * cols : (r + 1) * cols] for r in range(rows)]
    doc: dict[str, Any] = {
        "inputs": [{"name": "input", "shape": [rows, cols], "datatype": datatype, "data": data}]
    }
    if draw(st.booleans()):
        doc["id"] = draw(st.text(max_size=10))
    if draw(st.booleans()):
        doc["outputs"] = [{"name": "label"}]
    if draw(st.booleans()):
        doc["parameters"] = {"binary_data_output": draw(st.booleans())}
    return doc


def decodes_or_refuses(body: bytes, spec: TensorSpec, header_length: int | None = None) -> None:
    """The property: an InferRequest that fits the spec, or a ProxyError with a 4xx."""
    note(f"body={body!r} header_length={header_length}")
    try:
        req = parse_infer_request(body, spec, ids=IDS, header_length=header_length)
    except ProxyError as exc:
        assert 400 <= exc.status < 500, (exc.status, exc.message)
        assert exc.message
        return
    assert isinstance(req, InferRequest)
    assert req.x.dtype == DTYPES[spec.datatype] and req.x.ndim == 2
    assert req.x.shape[0] >= 1 and req.x.shape[1] == spec.shape[1]
    if req.x.dtype.kind == "f":
        assert np.isfinite(req.x).all()
    assert isinstance(req.id, str)


@PURE
@given(st.binary(max_size=200), st.sampled_from(SPECS))
def test_decoder_on_arbitrary_bytes(body: bytes, spec: TensorSpec) -> None:
    decodes_or_refuses(body, spec)
    try:
        doc = parse_json_object(body)
    except InvalidInputError as exc:
        assert exc.status == 400
    else:
        assert isinstance(doc, dict)


@PURE
@given(st.data())
def test_decoder_on_valid_requests(data: st.DataObject) -> None:
    spec = data.draw(st.sampled_from(SPECS))
    doc = data.draw(infer_docs(spec))
    req = parse_infer_request(orjson.dumps(doc), spec, ids=IDS)
    tensor = doc["inputs"][0]
    want = np.asarray(tensor["data"]).reshape(tensor["shape"]).astype(DTYPES[spec.datatype])
    assert np.array_equal(req.x, want)
    assert req.id == doc["id"] if "id" in doc else IDS.seq_of(req.id) == req.seq


@PURE
@given(st.data())
def test_decoder_on_mutated_requests(data: st.DataObject) -> None:
    spec = data.draw(st.sampled_from(SPECS))
    doc = data.draw(mutated(infer_docs(spec)))
    decodes_or_refuses(orjson.dumps(doc), spec)


@PURE
@given(st.data())
def test_decoder_on_mutated_bytes(data: st.DataObject) -> None:
    """Bytes of a valid body flipped, cut, or spliced with JSON literals."""
    spec = data.draw(st.sampled_from(SPECS))
    body = bytearray(orjson.dumps(data.draw(infer_docs(spec))))
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(body)))
        piece = data.draw(
            st.sampled_from([b"true", b"false", b"null", b"[", b"]", b"{", b"}", b",", b'"', b"-"])
            | st.binary(min_size=1, max_size=3)
        )
        how = data.draw(st.sampled_from(["insert", "overwrite", "cut"]))
        if how == "insert":
            body[at:at] = piece
        elif how == "overwrite":
            body[at : at + len(piece)] = piece
        else:
            del body[at : at + len(piece)]
    decodes_or_refuses(bytes(body), spec)


@PURE
@given(st.data())
def test_decoder_on_binary_tensors(data: st.DataObject) -> None:
    """The binary extension: a JSON header of any claimed length, any binary_data_size."""
    spec = TensorSpec("input", "FP32", (-1, FEATURES))
    rows = data.draw(st.integers(1, 3))
    datatype = data.draw(st.sampled_from(sorted(DTYPES)))
    blob = data.draw(st.binary(max_size=64))
    size = data.draw(
        st.just(len(blob))
        | st.integers(-5, 100)
        | st.booleans()
        | json_values
        | st.just(rows * FEATURES * DTYPES[datatype].itemsize)
    )
    head = orjson.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "shape": [rows, FEATURES],
                    "datatype": datatype,
                    "parameters": {"binary_data_size": size},
                }
            ]
        }
    )
    length = data.draw(st.just(len(head)) | st.integers(-3, len(head) + len(blob) + 3))
    decodes_or_refuses(head + blob, spec, header_length=length)


@PURE
@given(
    st.lists(st.floats(-1e6, 1e6, allow_nan=False), min_size=FEATURES, max_size=FEATURES),
    st.integers(0, FEATURES - 1),
    st.booleans(),
    st.sampled_from(["FP32", "FP64", "INT32"]),
)
def test_booleans_among_numbers_are_refused(
    row: list[float], at: int, flag: bool, datatype: str
) -> None:
    values: list[Any] = [int(v) for v in row] if datatype == "INT32" else list(row)
    values[at] = flag
    doc = {
        "inputs": [{"name": "input", "shape": [1, FEATURES], "datatype": datatype, "data": values}]
    }
    with pytest.raises(InvalidInputError, match=f"boolean .* at flat index {at}"):
        parse_infer_request(orjson.dumps(doc), SPECS[0], ids=IDS)


# ---------------------------------------------------------------- (b) the feedback parser

truths_rules = st.one_of(
    st.builds(
        Classes,
        st.just("m"),
        st.none() | st.lists(st.integers(-3, 3), min_size=1, max_size=4, unique=True).map(tuple),
    ),
    st.builds(Values, st.just("m")),
)
# Python values a parsed body could not even hold, too: NaN, infinities, ints past int64
label_scalars = (
    json_scalars | st.floats() | st.integers() | st.sampled_from([2**63, -(2**63) - 1, 2**64])
)
labels = st.recursive(
    label_scalars,
    lambda kids: (
        st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=3), kids, max_size=2)
    ),
    max_leaves=8,
)
feedback_docs = st.fixed_dictionaries(
    {},
    optional={
        "id": st.text(max_size=8) | json_values,
        "label": labels,
        "value": labels,
        "extra": json_values,
    },
)


def _has_bool(value: Any) -> bool:
    if isinstance(value, list):
        return any(_has_bool(v) for v in value)
    return isinstance(value, bool)


@PURE
@given(feedback_docs, truths_rules)
def test_feedback_parser_accepts_only_what_the_model_answers(
    doc: dict[str, Any], truths: Classes | Values
) -> None:
    try:
        fb = parse_feedback(doc, truths)
    except InvalidInputError as exc:
        assert exc.status == 400 and exc.message
        return
    assert isinstance(fb, Feedback) and isinstance(fb.id, str) and fb.id
    given_value = doc["label"] if "label" in doc else doc["value"]
    assert not _has_bool(given_value)
    assert fb.truth.ndim == 1 and fb.truth.size >= 1
    items = given_value if isinstance(given_value, list) else [given_value]
    assert fb.truth.size == len(items)
    if isinstance(truths, Values):
        assert fb.truth.dtype == np.float64 and np.isfinite(fb.truth).all()
    else:
        assert fb.truth.dtype == np.int64
        assert all(a == b for a, b in zip(items, fb.truth.tolist(), strict=True))
        if truths.classes is not None:
            assert set(fb.truth.tolist()) <= set(truths.classes)


@PURE
@given(st.data())
def test_feedback_parser_takes_every_class(data: st.DataObject) -> None:
    classes = data.draw(
        st.lists(st.integers(-(2**63), 2**63 - 1), min_size=1, max_size=4, unique=True)
    )
    rows = data.draw(st.lists(st.sampled_from(classes), min_size=1, max_size=5))
    label: Any = rows if len(rows) > 1 or data.draw(st.booleans()) else rows[0]
    fb = parse_feedback({"id": "r", "label": label}, Classes("m", tuple(classes)))
    assert fb.truth.tolist() == rows
    values = data.draw(st.lists(st.floats(allow_nan=False, allow_infinity=False), min_size=1))
    fb = parse_feedback({"id": "r", "value": values}, Values("m"))
    assert fb.truth.tolist() == values


# ---------------------------------------------------------------- (c) the admin guard

TOKEN = b"s3cret-property-token"
TOKEN_ENV = "MLPROXY_PROPERTY_TOKEN"
# Header bytes the HTTP grammar forbids in a field value (CTLs but HTAB): the parser may refuse
# the request (400) before the guard sees it.
FORBIDDEN = set(range(0x20)) - {0x09} | {0x7F}


async def _ok(request: web.Request) -> web.Response:
    return web.json_response({"ok": True})


@pytest.fixture
async def guarded(aiohttp_server: Any, monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Three admin planes' guards on real servers: with a token, without one on loopback, and
    without one on a host that is not loopback: {kind: port}."""
    monkeypatch.setenv(TOKEN_ENV, TOKEN.decode())
    monkeypatch.delenv("MLPROXY_PROPERTY_UNSET", raising=False)
    admins = {
        "token": AdminConfig(token_env=TOKEN_ENV),
        "loopback": AdminConfig(token_env="MLPROXY_PROPERTY_UNSET"),
        "open": AdminConfig(host="0.0.0.0", token_env="MLPROXY_PROPERTY_UNSET"),
    }
    ports = {}
    for kind, admin in admins.items():
        app = web.Application()
        app.router.add_post("/admin/reload", mutation_guard(admin, _ok))
        ports[kind] = (await aiohttp_server(app)).port
    return ports


async def _post(port: int, headers: list[bytes]) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        head = [b"POST /admin/reload HTTP/1.1", b"Host: 127.0.0.1", b"Content-Length: 0"]
        head += [*headers, b"Connection: close"]
        writer.write(b"\r\n".join(head) + b"\r\n\r\n")
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), timeout=10)
    finally:
        writer.close()
    return int(answer.split(b" ", 2)[1])


auth_values = st.one_of(
    st.binary(max_size=40),
    st.text(max_size=20).map(lambda s: s.encode("utf-8", "surrogatepass")),
    st.tuples(
        st.sampled_from([b"Bearer ", b"bearer ", b"Bearer", b"Basic ", b""]),
        st.sampled_from([TOKEN, TOKEN[:-1], TOKEN + b"x", TOKEN.upper(), b""]),
        st.binary(max_size=3),
    ).map(b"".join),
    st.just(b"Bearer " + TOKEN),
).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))


@SOCKETS
@given(
    kind=st.sampled_from(["token", "loopback", "open"]),
    values=st.lists(auth_values, max_size=2),
)
async def test_admin_guard_answers_401_403_or_2xx(
    guarded: dict[str, int], kind: str, values: list[bytes]
) -> None:
    status = await _post(guarded[kind], [b"Authorization: " + v for v in values])
    if status == 400:  # the HTTP parser's: a byte no header value may hold
        assert any(FORBIDDEN & set(v) for v in values), values
        return
    if kind == "open":
        assert status == 403
    elif kind == "loopback":
        assert status == 200
    else:
        assert status in (200, 401)
        first = values[0] if values else b""
        if status == 200:  # never a false yes
            assert first.strip(b" \t") == b"Bearer " + TOKEN, values
        if first == b"Bearer " + TOKEN:  # and never a false no
            assert status == 200


# ---------------------------------------------------------------- (d) the config parser


def _schema_keys() -> list[str]:
    """Every key config.toml knows (the schema's dataclass fields) and its tables' names."""
    keys = {"server", "admin", "limits", "batching", "alerts", "models", "versions", "cancer"}
    for obj in vars(schema).values():
        if dataclasses.is_dataclass(obj) and isinstance(obj, type):
            keys.update(f.name for f in dataclasses.fields(obj))
    return sorted(keys | {"v1", "v2"})


KEYS = _schema_keys()
toml_keys = st.sampled_from(KEYS) | st.text(max_size=8)
toml_scalars = (
    st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.integers()  # tomllib reads integers of any size
    | st.floats()
    | st.text(max_size=12)
    | st.sampled_from(KEYS)
    | st.sampled_from(["single", "canary", "shadow", "blue_green", "blue", "green", "v1", "v2"])
    | st.datetimes()
    | st.dates()
    | st.times()
)
toml_values = st.recursive(
    toml_scalars,
    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(toml_keys, kids, max_size=3),
    max_leaves=10,
)

VALID = """
[server]
host = "127.0.0.1"
port = 8080
max_body_bytes = 4194304
[admin]
token_env = "MLPROXY_ADMIN_TOKEN"
[limits]
max_inflight = 512
queue_timeout_ms = 100
adaptive = true
[batching]
max_batch_size = 64
max_delay_ms = 1.0
[alerts]
webhook = ""
[models.cancer]
mode = "canary"
stable = "v1"
sticky_key = "x-user-id"
[models.cancer.versions]
v1 = { path = "models/cancer/v1" }
v2 = { path = "models/cancer/v2" }
v3 = { url = "http://127.0.0.1:9001/v2/models/cancer", timeout_ms = 500 }
[models.cancer.canary]
weights = { v1 = 90, v2 = 10 }
steps = [10, 25, 50, 100]
step_interval_s = 60
gates = { max_error_rate = 0.01, max_p99_ms = 25, max_psi = 0.25, min_agreement = 0.9 }
[models.cancer.shadow]
primary = "v1"
mirrors = ["v2"]
sample = 1.0
[models.cancer.blue_green]
blue = "v1"
green = "v2"
active = "blue"
[models.cancer.drift]
window = 2000
long_window = 50000
psi_warn = 0.1
psi_alert = 0.25
"""


def parses_or_refuses(data: dict[str, Any]) -> None:
    """The property: a Config, or a ConfigError listing each problem as `key: reason`."""
    note(f"config={data!r}")
    try:
        config = parse_config(data, base_dir=Path("/nonexistent/base"))
    except ConfigError as exc:
        assert exc.errors and all(isinstance(e, str) and ":" in e for e in exc.errors)
        assert str(exc)
    else:
        assert isinstance(config, Config) and config.models


def test_the_valid_config_parses() -> None:
    parse_config(tomllib.loads(VALID), base_dir=Path("/nonexistent/base"))


HUGE = 10**400  # tomllib reads an integer of any size; float() and math.isfinite() refuse it
SHADOW = {"stable": "v1", "mode": "shadow", "versions": {"v1": {"url": "http://h"}}}


@PURE
@given(st.dictionaries(toml_keys, toml_values, max_size=6))
# found by the generated examples, kept as explicit ones:
@example({"batching": {"max_delay_ms": HUGE}})
@example({"models": {"m": {**SHADOW, "shadow": {"primary": "v1", "mirrors": [["v1"]]}}}})
def test_config_parser_on_generated_tables(data: dict[str, Any]) -> None:
    parses_or_refuses(data)


@PURE
@given(mutated(st.builds(lambda: tomllib.loads(VALID))), st.data())
def test_config_parser_on_mutated_configs(doc: Any, data: st.DataObject) -> None:
    # mutated() draws JSON values; TOML's own (datetimes, huge integers, NaN) come in here
    path = data.draw(st.sampled_from(_paths(doc)))
    doc = _set(doc, path, data.draw(toml_values)) if path else doc
    parses_or_refuses(doc if isinstance(doc, dict) else {"models": doc})


toml_lines = st.one_of(
    st.builds(
        lambda k, v: f"{k} = {v}",
        toml_keys,
        st.sampled_from(
            [
                "1",
                "-1",
                "0",
                "1.5",
                "nan",
                "inf",
                "-inf",
                "true",
                '"x"',
                "[]",
                "[1, 2]",
                "{}",
                '{ path = "m" }',
                '{ url = "http://h" }',
                "1979-05-27",
                "9" * 30,
                '"v1"',
                '"canary"',
            ]
        ),
    ),
    st.builds(
        lambda k: f"[{k}]",
        st.sampled_from(
            [
                "server",
                "limits",
                "models.cancer",
                "models.cancer.versions",
                "models.cancer.canary",
                "models.cancer.drift",
                "models",
            ]
        ),
    ),
    st.text(max_size=20),
)


@pytest.fixture(scope="module")
def config_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("props") / "config.toml"


@PURE
@given(lines=st.lists(toml_lines, max_size=12), tail=st.binary(max_size=4))
@example(lines=["[limits]", f"queue_timeout_ms = {HUGE}"], tail=b"")
def test_config_loader_on_generated_files(config_file: Path, lines: list[str], tail: bytes) -> None:
    config_file.write_bytes("\n".join(lines).encode("utf-8", "surrogatepass") + tail)
    try:
        config = load_config(config_file)
    except ConfigError as exc:
        assert exc.errors and all(isinstance(e, str) for e in exc.errors)
        assert str(config_file) in str(exc)
    else:
        assert isinstance(config, Config)
        assert all(math.isfinite(m.drift.psi_alert) for m in config.models.values())


@PURE
@given(
    st.lists(
        st.floats(allow_nan=False, allow_infinity=False)
        | st.sampled_from([3.4028235e38, 3.4028235677973366e38, 3.5e38, -3.5e38, 1e-46]),
        min_size=FEATURES,
        max_size=FEATURES,
    ),
    st.sampled_from([1, 10]),
    st.booleans(),
)
def test_json_floats_decode_as_a_guarded_cast_would(
    row: list[float], rows: int, nested: bool
) -> None:
    """JSON floats for an FP32 model skip the overflow guard when they fit its range; the
    answer is the guarded cast's either way: the same array, or 400 for what overflows. Short
    flat data is range-checked in Python, nested or long data (10 rows: 300 values) by numpy."""
    batch = [row[i:] + row[:i] for i in range(rows)]
    data: list[Any] = batch if nested else [v for r in batch for v in r]
    body = orjson.dumps(
        {"inputs": [{"name": "input", "shape": [rows, FEATURES], "datatype": "FP64", "data": data}]}
    )
    with np.errstate(over="ignore", invalid="ignore"):
        want = np.array(batch).astype(np.float32)
    if not np.isfinite(want).all():
        with pytest.raises(InvalidInputError, match="not finite"):
            parse_infer_request(body, SPECS[0], ids=IDS)
        return
    got = parse_infer_request(body, SPECS[0], ids=IDS).x
    assert got.dtype == np.float32 and np.array_equal(got, want)


# ---------------------------------------------------------------- the fast path's parser

_HEADER_NAMES = [
    "Host", "Content-Type", "Content-Length", "content-length", "Connection", "Content-Encoding",
    "Transfer-Encoding", "Expect", "Upgrade", "X-User-Id", "inference-header-content-length",
    "Accept", "X Bad", "Bad:Name", "Ünicode",
]  # fmt: skip
_HEADER_VALUES = [
    "x", "application/json", "close", "keep-alive", "keep-alive, close", "Close", "gzip",
    "identity", "chunked", "100-continue", "websocket", "  padded  ", "\tx\t", "v\x01",
    "ü", "5", "+5", "05", "1" * 13, "",
]  # fmt: skip


@st.composite
def raw_requests(draw: st.DrawFn) -> bytes:
    """Mostly plain infer requests, with generated header lines, lengths and tails."""
    path = draw(
        st.sampled_from(
            [b"/v2/models/cancer/infer"] * 3 + [b"/v2/models/m.1/versions/v-2/infer"] * 2 +
            [b"/v2/models//infer",
             b"/v2/models/cancer/infer?x=1", b"/v2/models/cancer/ready"]
        )
    )  # fmt: skip
    line = draw(
        st.sampled_from([b"POST %s HTTP/1.1"] * 4 + [b"POST %s HTTP/1.0", b"GET %s HTTP/1.1"])
    )
    body = draw(st.binary(max_size=12))
    benign = st.sampled_from(
        [("Content-Type", "application/json"), ("X-User-Id", "u1"), ("Accept", "*/*"),
         ("Connection", "keep-alive"), ("Connection", "close"), ("Content-Encoding", "identity")]
    )  # fmt: skip
    risky = st.tuples(st.sampled_from(_HEADER_NAMES), st.sampled_from(_HEADER_VALUES))
    headers = draw(st.lists(benign | benign | benign | risky, max_size=4))
    lines = [f"{k}: {v}".encode() for k, v in headers]
    if draw(st.integers(0, 9)):
        lines.insert(0, b"Host: x")
    if draw(st.integers(0, 9)):
        lines.append(b"Content-Length: %d" % (len(body) + draw(st.sampled_from([0] * 8 + [1, -1]))))
    if not draw(st.integers(0, 9)):
        lines.insert(draw(st.integers(0, len(lines))), b" folded")
    tail = draw(st.sampled_from([b"", b"", b"", b"", b"", b"GET / HTTP/1.1\r\n\r\n", b"x"]))
    return (line % path) + b"\r\n" + b"".join(x + b"\r\n" for x in lines) + b"\r\n" + body + tail


def _aiohttp_parse(data: bytes) -> tuple[Any, bytes] | None:
    """aiohttp's own parser on `data`: (its one message, the body) or None when it does not
    parse as exactly one whole request."""
    from aiohttp.base_protocol import BaseProtocol
    from aiohttp.http_parser import HttpRequestParser

    loop = asyncio.new_event_loop()
    try:
        parser = HttpRequestParser(BaseProtocol(loop), loop, 2**16, max_field_size=8190)
        try:
            messages, upgraded, tail = parser.feed_data(data)
        except Exception:  # any parse error: not one plain request
            return None
        if len(messages) != 1 or upgraded or tail:
            return None
        msg, payload = messages[0]
        if not payload.is_eof():
            return None
        return msg, b"".join(getattr(payload, "_buffer", ()))
    finally:
        loop.close()


@settings(PURE, max_examples=800)  # a tenth or so are plain infers the fast path takes
@given(raw_requests())
@example(b"POST /v2/models/cancer/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
def test_the_fast_path_parser_reads_what_aiohttps_reads(data: bytes) -> None:
    """Whatever `plain_infer` takes, aiohttp's parser reads as the same one request: the same
    path, headers (the first of repeats), body and keep-alive; what it leaves, aiohttp judges."""
    from proxy.http.fastpath import plain_infer

    plain = plain_infer(data)
    note(repr(plain))
    event("taken by the fast path" if plain else "left to aiohttp")
    if plain is None:
        return
    parsed = _aiohttp_parse(data)
    assert parsed is not None, "plain_infer took a request aiohttp does not parse as one"
    msg, body = parsed
    model, version, headers, got_body, close = plain
    want_path = f"/v2/models/{model}" + (f"/versions/{version}" if version else "") + "/infer"
    assert msg.method == "POST" and msg.path == want_path and msg.version == (1, 1)
    assert got_body == body and close == msg.should_close
    assert msg.headers.get("Content-Encoding", "identity").lower() == "identity"
    for name, value in headers.items():
        assert msg.headers.get(name) == value
    assert len(headers) == len({k.lower() for k in msg.headers})
