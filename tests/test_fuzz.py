"""A live fuzz: a few thousand generated requests from a fixed seed, over real sockets, against a
real `mlproxy serve` (data plane and admin plane). Mutated infer bodies (bit flips, truncations,
wrong types, huge numbers, nested arrays, wrong shapes and datatypes), binary-extension bodies
with wrong lengths, headers that are not UTF-8, Content-Encodings real and fake, odd methods and
paths, broken framing, feedback bodies, admin calls with bad tokens.

The rule: no 5xx (a 503 for overload would be allowed, with Retry-After, and should not happen at
this rate), no connection left without an answer or a close past a bounded time, the process
alive, a good request answered 200 afterwards, and (bad input being the client's mistake) no
ERROR or traceback in the log, nor the admin token. A failure lists each distinct case once,
with the request's bytes and the answer."""

from __future__ import annotations

import collections
import functools
import gzip
import json
import random
import re
import socket
import threading
import time
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

from .helpers import BASE_CONFIG, free_port, model_section, serve_process

try:  # optional (the server decodes br only with it); here by way of tritonclient[http]
    import brotli
except ImportError:  # pragma: no cover
    brotli = None

SEED = 20_261_202
REQUESTS = 3_000  # at most; and no longer than TIME_CAP_S
TIME_CAP_S = 30.0
THREADS = 12
ANSWER_DEADLINE_S = 6.0  # a connection neither answered nor closed by then is hanging
STALL_TIMEOUT_S = 1  # [limits] header_timeout_s and body_timeout_s of the fuzzed server
MAX_BODY = 65_536
TOKEN = "fuzz-admin-token"
WARM_UP = 40  # good requests first: ids that feedback can name
LOG_ENTRY = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d")  # a log line's timestamp

DATATYPES = ["FP32", "FP64", "FP16", "INT64", "INT32", "INT16", "INT8", "UINT8", "UINT64", "BOOL"]
ODD_DATATYPES = ["BYTES", "fp32", "", "FP", "X" * 300, "FP32\x00", None, 5, ["FP32"], {"a": 1}]
EVIL: list[Any] = [
    None, True, False, 0, -1, 1.5, -0.0, 2**31, 2**63 - 1, 2**63, 2**64, -(2**63) - 1, 10**30,
    1e308, -1e308, 3.5e38, 1e-320, "", "x", "NaN", "Infinity", "1", "\u00b2", "\ud7ff", "x" * 5000,
    [], {}, [[]], [[[[]]]], [1, "a"], {"a": [1]}, [None], [True, False],
]  # fmt: skip
RAW_NUMBERS = [b"1e400", b"-1e400", b"NaN", b"Infinity", b"-Infinity", b"1" * 400, b"0x10",
               b"01", b"1.", b".5", b"+1", b"1e", b"-", b"9" * 30, b"1E+999999"]  # fmt: skip
DATA_PATHS = [
    "/v2", "/v2/health/live", "/v2/health/ready", "/v2/models/cancer", "/v2/models/cancer/ready",
    "/v2/models/cancer/infer", "/v2/models/cancer/versions/v1/infer",
    "/v2/models/cancer/versions/v2", "/v2/models/cancer/versions/v2/ready",
    "/v2/models/cancer/feedback", "/v2/models/nope/infer", "/v2/models/cancer/versions/v9/infer",
]  # fmt: skip
ADMIN_PATHS = [
    "/admin/status", "/metrics", "/admin/alerts", "/admin/monitor", "/dashboard", "/admin/reload",
    "/admin/models/cancer/promote", "/admin/models/cancer/rollback", "/admin/models/nope/promote",
    "/admin/models/cancer/versions/v1/sample", "/admin/models/cancer/versions/v9/sample",
]  # fmt: skip
METHODS = [b"GET", b"POST", b"PUT", b"DELETE", b"PATCH", b"HEAD", b"OPTIONS", b"TRACE",
           b"CONNECT", b"PRI", b"BREW", b"post", b"G\xffT", b"X" * 300, b"", b"GET GET",
           b"P\x00ST"]  # fmt: skip
VERSIONS = [b"HTTP/1.0", b"HTTP/0.9", b"HTTP/2.0", b"HTTP/1.2", b"http/1.1", b"HTTP/9.9", b"",
            b"HTTP/1.1 x", b"HTTP/1"]  # fmt: skip
ENCODINGS = [b"gzip", b"deflate", b"br", b"identity", b"x-gzip", b"compress", b"zstd",
             b"gzip, br", b"GZIP", b"", b"unknown", b"\xff\xfe", b"gzip, gzip"]  # fmt: skip
ODD_BYTES = [b"\xff", b"\xfe\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\x80", b"\xf4\x90\x80\x80",
             b"caf\xe9", b"\x7f", b"\x1b[31m", b"\t"]  # fmt: skip


@functools.cache
def bombs() -> tuple[bytes, ...]:
    """Small compressed bodies that expand to 8 MB (built once, on first use)."""
    return gzip.compress(b"0" * 8_000_000, mtime=0), zlib.compress(b" " * 8_000_000)


@dataclass(frozen=True, slots=True)
class Case:
    """One generated request (or a few, pipelined): which plane, the exact bytes, and how many
    answers must come before the server may close the connection."""

    kind: str
    plane: str
    raw: bytes
    head: bool = False  # a HEAD request: its answer has no body
    answers: int = 1  # answers to read (requests pipelined in `raw`)
    must_answer: int = 0  # answers the server must give before it may close


@dataclass(slots=True)
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes


@dataclass(slots=True)
class Outcome:
    """What came back: the answers, in order, and how the exchange ended short of them."""

    case: Case
    answers: list[Answer] = field(default_factory=list)
    error: str | None = None  # "hang", "closed" or "reset" before every answer came
    took_s: float = 0.0

    @property
    def status(self) -> int | None:
        return self.answers[0].status if self.answers else None

    @property
    def body(self) -> bytes:
        return self.answers[0].body if self.answers else b""


def http(
    method: bytes,
    target: bytes,
    headers: list[tuple[bytes, bytes]],
    body: bytes = b"",
    *,
    version: bytes = b"HTTP/1.1",
    close: bool = True,
) -> bytes:
    """A request written byte for byte; `Connection: close` last (unless `close` is false), so
    the server ends the connection after answering it."""
    lines = [method + b" " + target + b" " + version, b"Host: 127.0.0.1"]
    lines += [name + b": " + value for name, value in headers]
    lines.append(b"Content-Length: " + str(len(body)).encode())
    if close:
        lines.append(b"Connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


JSON_HEADERS = [(b"Content-Type", b"application/json")]


class Generator:
    """Builds the cases from one seeded random generator (the same cases every run, but for
    the ids the server made up in the warm-up)."""

    def __init__(self, rng: random.Random, rows: np.ndarray[Any, Any], ids: list[str]) -> None:
        self.rng = rng
        self.rows = rows
        self.ids = ids

    # -- valid material ---------------------------------------------------------------------

    def batch(self) -> np.ndarray[Any, Any]:
        n = self.rng.choice([1, 1, 1, 2, 3, 8])
        picked: np.ndarray[Any, Any] = self.rows[
            [self.rng.randrange(len(self.rows)) for _ in range(n)]
        ]
        return picked

    def infer_doc(self) -> dict[str, Any]:
        x = self.batch()
        doc: dict[str, Any] = {
            "inputs": [
                {
                    "name": "input",
                    "shape": list(x.shape),
                    "datatype": "FP32",
                    "data": [round(float(v), 4) for v in x.reshape(-1)],
                }
            ]
        }
        if self.rng.random() < 0.5:
            doc["id"] = f"fuzz-{self.rng.randrange(10**6)}"
        if self.rng.random() < 0.2:
            doc["outputs"] = [{"name": "label"}, {"name": "probabilities"}]
        return doc

    # -- mutations --------------------------------------------------------------------------

    def mutate_bytes(self, data: bytes) -> bytes:
        rng = self.rng
        b = bytearray(data)
        how = rng.randrange(7)
        if how == 0 and b:  # bit flips
            for _ in range(rng.randint(1, 8)):
                i = rng.randrange(len(b))
                b[i] ^= 1 << rng.randrange(8)
        elif how == 1:  # truncation
            del b[rng.randrange(len(b) + 1) :]
        elif how == 2:  # insertions
            for _ in range(rng.randint(1, 4)):
                b[rng.randrange(len(b) + 1) : 0] = rng.choice(
                    [b"{", b"}", b"[", b"]", b",", b":", b'"', b"\\", b"\x00", b"\xff", b"-"]
                )
        elif how == 3 and b:  # a span deleted
            i = rng.randrange(len(b))
            del b[i : i + rng.randint(1, 40)]
        elif how == 4 and b:  # a span repeated
            i = rng.randrange(len(b))
            b[i:i] = b[i : i + rng.randint(1, 200)]
        elif how == 5:  # a number replaced by raw text JSON cannot (or barely can) hold
            text = bytes(b)
            digits = [i for i, c in enumerate(text) if 48 <= c <= 57]
            if digits:
                i = rng.choice(digits)
                b[i : i + 1] = rng.choice(RAW_NUMBERS)
        else:  # random bytes
            b[rng.randrange(len(b) + 1) : 0] = rng.randbytes(rng.randint(1, 16))
        return bytes(b)

    def mutate_doc(self, doc: dict[str, Any]) -> Any:
        """One structural change: a field of the wrong type, shape or datatype."""
        rng = self.rng
        inp = doc["inputs"][0]
        n = len(inp["data"])
        how = rng.randrange(14)
        if how == 0:
            inp[rng.choice(["name", "shape", "datatype", "data", "parameters"])] = rng.choice(EVIL)
        elif how == 1:
            doc[rng.choice(["id", "inputs", "outputs", "parameters"])] = rng.choice(EVIL)
        elif how == 2:
            inp["datatype"] = rng.choice(DATATYPES + ODD_DATATYPES)
        elif how == 3:
            inp["shape"] = rng.choice(
                [[n], [1, n], [n, 1], [-1, 30], [0, 30], [2**62, 30], [n // 30, 30, 1], [1.0, 30],
                 ["1", "30"], [], [n // 30, -30], [True, 30], [n // 30, 31]]
            )  # fmt: skip
        elif how == 4:  # nested, ragged or mixed data
            data = inp["data"]
            inp["data"] = rng.choice(
                [
                    [data[i : i + 30] for i in range(0, n, 30)],
                    [data[:29], data[29:]],
                    [[data]],
                    [*data[:-1], "1.0"],
                    [*data[:-1], None],
                    [*data[:-1], True],
                    [*data[:-1], [1.0]],
                    [*data[:-1], {"v": 1}],
                    data[:-1],
                    [*data, 1.0],
                ]
            )
        elif how == 5:  # huge or tiny numbers
            data = list(inp["data"])
            for _ in range(rng.randint(1, 5)):
                data[rng.randrange(len(data))] = rng.choice(
                    [1e39, -1e39, 3.4e38, 1e308, 2**64, -(2**63) - 1, 10**30, 1e-45, 5e-324]
                )
            inp["data"] = data
        elif how == 6:  # more inputs, fewer, or duplicates
            doc["inputs"] = rng.choice(
                [[], [inp, inp], [inp, {**inp, "name": "other"}], {"input": inp}, [[inp]]]
            )
        elif how == 7:
            inp["name"] = rng.choice(["", "INPUT", "input\x00", "x" * 2000, "ïnput", 7])
        elif how == 8 and rng.random() < 0.3:
            doc["parameters"] = {"binary_data_output": rng.choice([True, False, 1, "yes", None])}
        elif how == 8:
            doc["outputs"] = rng.choice(
                [[{"name": "nope"}], [{}], [{"name": "label", "parameters": {"binary_data": 7}}],
                 [{"name": "probabilities", "parameters": {"binary_data": True}}], ["label"],
                 [{"name": "label"}] * 50]
            )  # fmt: skip
        elif how == 9:
            inp["parameters"] = rng.choice(
                [{"binary_data_size": 120}, {"binary_data_size": -1}, {"binary_data_size": "x"},
                 {"content_type": "str"}, {"binary_data_size": 2**64}]
            )  # fmt: skip
        elif how == 10:
            doc["id"] = rng.choice(["", "x" * 10_000, "\u0000", "\ud7ff\ue000", "é" * 50, 17])
        elif how == 11:  # a top level that is not an object
            return rng.choice([[doc], "doc", 1, None, True, [], ""])
        elif how == 12:  # deep nesting
            return ("DEEP", rng.choice([50, 300, 3000]))
        else:  # extra fields everywhere
            doc[rng.choice(["ID", "Inputs", "extra", "\u2603"])] = rng.choice(EVIL)
            inp[rng.choice(["extra", "Data", "shape "])] = rng.choice(EVIL)
        return doc

    def dumps(self, doc: Any) -> bytes:
        if isinstance(doc, tuple) and doc[0] == "DEEP":
            depth = doc[1]
            return (
                b'{"inputs": [{"name": "input", "shape": [1, 30], "datatype": "FP32", "data": '
                + b"[" * depth
                + b"1"
                + b"]" * depth
                + b"}]}"
            )
        # the stdlib's encoder: it writes integers past 64 bits, and NaN / Infinity tokens
        text = json.dumps(doc, ensure_ascii=self.rng.random() < 0.5)
        return text.encode("utf-8", "surrogatepass")  # a lone surrogate: bytes not UTF-8

    # -- generators, one per kind -----------------------------------------------------------

    def infer_json(self) -> Case:
        rng = self.rng
        doc = self.infer_doc()
        if rng.random() < 0.6:
            body = self.dumps(self.mutate_doc(doc))
        else:
            body = self.mutate_bytes(orjson.dumps(doc))
        if rng.random() < 0.2:
            body = self.mutate_bytes(body)
        path = rng.choice(
            [b"/v2/models/cancer/infer", b"/v2/models/cancer/versions/v1/infer",
             b"/v2/models/cancer/versions/v2/infer"]
        )  # fmt: skip
        headers = list(JSON_HEADERS)
        if rng.random() < 0.3:
            headers.append((b"x-user-id", rng.randbytes(rng.randint(1, 12)).replace(b"\r", b"")))
        return Case("infer_json", "data", http(b"POST", path, _clean(headers), body))

    def infer_binary(self) -> Case:
        """The binary extension: a JSON header, then the raw tensor; each part is wrong in
        about one case in four."""
        rng = self.rng

        def odd() -> bool:
            return rng.random() < 0.25

        x = self.batch()
        dtype = rng.choice(["FP64", "INT32", "BOOL", "BYTES", "FP16"]) if odd() else "FP32"
        raw = x.astype(np.float32).tobytes()
        size: Any = len(raw)
        if odd():
            size = rng.choice([len(raw) - 1, len(raw) + 4, 0, -4, 2**40, 2**64, "120", None])
        header_doc: dict[str, Any] = {
            "inputs": [
                {
                    "name": "input",
                    "shape": list(x.shape),
                    "datatype": dtype,
                    "parameters": {"binary_data_size": size},
                }
            ]
        }
        if rng.random() < 0.5:
            header_doc["outputs"] = [
                {"name": "probabilities", "parameters": {"binary_data": odd() or 1}},
                {"name": "label", "parameters": {"binary_data": rng.random() < 0.5}},
            ]
        head = self.dumps(header_doc)
        if odd():
            head = self.mutate_bytes(head)
        body = head + (raw[: rng.randrange(len(raw))] if odd() else raw)
        if odd():
            body += rng.randbytes(rng.randint(1, 64))
        length = str(len(head))
        if odd():
            length = rng.choice(
                [str(len(head) + 1), str(len(head) - 1), "0", "-1", str(len(body) + 10),
                 "99999999999999999999999", "abc", "1.5", " 12", "", "0x10", "\u0661\u0662"]
            )  # fmt: skip
        headers = [
            (b"Content-Type", b"application/json" if odd() else b"application/octet-stream"),
            (b"Inference-Header-Content-Length", length.encode()),
        ]
        return Case(
            "infer_binary",
            "data",
            http(b"POST", b"/v2/models/cancer/infer", headers, body),
        )

    def pipelined(self) -> Case:
        """Two requests on one keep-alive connection, written at once: a good one first must
        not cost the second its answer; a bad one first may end the connection, no more."""
        rng = self.rng
        good = self.rng.random() < 0.5
        if good:
            first = http(
                b"POST", b"/v2/models/cancer/infer", JSON_HEADERS,
                orjson.dumps(self.infer_doc()), close=False,
            )  # fmt: skip
        else:
            body = self.mutate_bytes(orjson.dumps(self.infer_doc()))
            path = rng.choice([b"/v2/models/cancer/infer", b"/v2/models/cancer/feedback"])
            first = http(b"POST", path, JSON_HEADERS, body, close=False)
        second = http(
            b"POST", b"/v2/models/cancer/versions/v1/infer", JSON_HEADERS,
            orjson.dumps(self.infer_doc()),
        )  # fmt: skip
        return Case("pipelined", "data", first + second, answers=2, must_answer=2 if good else 0)

    def feedback(self) -> Case:
        rng = self.rng
        if rng.random() < 0.3:  # near the truth: an id answered in the warm-up, a real class
            doc = {"id": rng.choice(self.ids), "label": rng.choice([0, 1, [0], [1], [0, 1]])}
            return Case(
                "feedback",
                "data",
                http(b"POST", b"/v2/models/cancer/feedback", JSON_HEADERS, orjson.dumps(doc)),
            )
        rid: Any = rng.choice(
            [*self.ids[:10], f"fuzz-{rng.randrange(10**6)}", "", 5, None, "x" * 5000, ["a"]]
        )
        label: Any = rng.choice(
            [0, 1, 7, -1, True, False, 2**63, 2**64, -(2**63) - 1, 1.5, float("1e308"), None,
             "1", [0, 1], [[0]], [], [1] * 9, {"a": 1}, [True], [0.5, 1e308], ["a"], 10**30]
        )  # fmt: skip
        doc: dict[str, Any] = {"id": rid, rng.choice(["label", "label", "value", "labels"]): label}
        if rng.random() < 0.2:
            del doc["id"]
        body = self.dumps(doc)
        if rng.random() < 0.3:
            body = self.mutate_bytes(body)
        return Case(
            "feedback",
            "data",
            http(b"POST", b"/v2/models/cancer/feedback", JSON_HEADERS, body),
        )

    def encoding(self) -> Case:
        rng = self.rng
        plain = orjson.dumps(self.infer_doc())
        if rng.random() < 0.3:
            plain = orjson.dumps({"id": rng.choice([*self.ids[:5], "x"]), "label": 1})
            path = b"/v2/models/cancer/feedback"
        else:
            path = b"/v2/models/cancer/infer"
        encoding = rng.choice(ENCODINGS)
        how = rng.randrange(6)
        if how == 0:
            body = gzip.compress(plain, mtime=0)
        elif how == 1:
            body = zlib.compress(plain)
        elif how == 2:
            body = plain if brotli is None else brotli.compress(plain, quality=4)
        elif how == 3:  # the right encoding, cut short
            body = gzip.compress(plain, mtime=0)[: rng.randrange(1, 30)]
        elif how == 4:  # a small bomb: 8 MB in ~8 KB
            body = rng.choice(bombs())
        else:  # not compressed at all
            body = plain
        headers = [*JSON_HEADERS, (b"Content-Encoding", encoding)]
        return Case("encoding", "data", http(b"POST", path, headers, body))

    def headers(self) -> Case:
        rng = self.rng
        body = orjson.dumps(self.infer_doc())
        headers = list(JSON_HEADERS)
        for _ in range(rng.randint(1, 4)):
            how = rng.randrange(8)
            if how == 0:
                headers.append((b"x-user-id", rng.choice(ODD_BYTES) + rng.randbytes(4)))
            elif how == 1:
                headers.append((b"Content-Type", rng.choice(
                    [b"text/plain", b"application/json; charset=latin-1", b"\xff/\xfe", b"",
                     b"multipart/form-data; boundary=x", b"application/octet-stream"]
                )))  # fmt: skip
            elif how == 2:
                headers.append((b"X-" + rng.choice(ODD_BYTES), b"v"))
            elif how == 3:
                headers.append((b"x-user-id", b"u" * rng.choice([100, 8000, 9000])))
            elif how == 4:
                headers.append((rng.choice([b"Foo Bar", b":authority", b"", b"X\x00Y"]), b"1"))
            elif how == 5:
                headers += [(b"X-Many-%d" % i, b"v") for i in range(rng.choice([50, 200]))]
            elif how == 6:
                headers.append((b"Expect", rng.choice([b"100-continue", b"nothing"])))
            else:
                headers.append((b"Accept-Encoding", rng.choice(ODD_BYTES)))
        return Case(
            "headers", "data", http(b"POST", b"/v2/models/cancer/infer", _clean(headers), body)
        )

    def target(self, paths: list[str]) -> bytes:
        rng = self.rng
        path = rng.choice(paths).encode()
        how = rng.randrange(12)
        if how == 0:  # percent-encode a character
            i = rng.randrange(1, len(path))
            path = path[:i] + b"%%%02X" % path[i] + path[i + 1 :]
        elif how == 1:
            path += rng.choice([b"/..", b"/../..", b"/%2e%2e", b"/./", b"//", b"/"])
        elif how == 2:
            path = rng.choice([b"/v2/../admin/status", b"/v2/models/../../etc/passwd", b"/..%2f"])
        elif how == 3:
            path += rng.choice([b"%00", b"%ff", b"%zz", b"%", b"%c3%28", b"%ed%a0%80"])
        elif how == 4:
            path += b"\x00" if rng.random() < 0.5 else rng.choice(ODD_BYTES)
        elif how == 5:
            path += b"/" + b"a" * rng.choice([1000, 8000, 9000, 20000])
        elif how == 6:
            path += rng.choice([b"?a=%ff&b", b"?" + b"x" * 5000, b"#frag", b"?id=\xff", b";p=1"])
        elif how == 7:
            path = b"http://127.0.0.1" + path
        elif how == 8:
            path = rng.choice([b"*", b"", b"v2/health/live", b"\\v2\\health", b"/\xc3\xa9"])
        elif how == 9:
            path = path.upper()
        return path

    def method_path(self) -> Case:
        rng = self.rng
        method = rng.choice(METHODS)
        version = rng.choice(VERSIONS) if rng.random() < 0.15 else b"HTTP/1.1"
        body = orjson.dumps(self.infer_doc()) if rng.random() < 0.5 else b""
        return Case(
            "method_path",
            "data",
            http(method, self.target(DATA_PATHS), JSON_HEADERS, body, version=version),
            head=method == b"HEAD",
        )

    def framing(self) -> Case:
        rng = self.rng
        body = orjson.dumps(self.infer_doc())
        start = b"POST /v2/models/cancer/infer HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        ct = b"Content-Type: application/json\r\n"
        n = len(body)
        chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (n, body)
        how = rng.randrange(12)
        if how == 0:
            head, payload = b"Content-Length: %d\r\nTransfer-Encoding: chunked\r\n" % n, chunked
        elif how == 1:
            head, payload = b"Transfer-Encoding: chunked\r\n", chunked
        elif how == 2:  # a chunk size that is not hex, or overflows
            size = rng.choice([b"zz", b"-1", b"ffffffffffffffffffff", b"1;" + b"x" * 9000, b""])
            head, payload = (
                b"Transfer-Encoding: chunked\r\n",
                size + b"\r\n" + body + b"\r\n0\r\n\r\n",
            )
        elif how == 3:
            te = rng.choice([b"gzip, chunked", b"chunked, chunked", b"Chunked", b"identity",
                             b"\xff", b"chunked;q=1", b"gzip"])  # fmt: skip
            head, payload = b"Transfer-Encoding: " + te + b"\r\n", chunked
        elif how == 4:
            cl = rng.choice([b"-5", b"abc", b"+%d" % n, b"0x10", b" %d" % n, b"%d, %d" % (n, n),
                             b"%d,%d" % (n, n + 1), b"99999999999999999999999", b"\xff"])  # fmt: skip
            head, payload = b"Content-Length: " + cl + b"\r\n", body
        elif how == 5:  # two Content-Length headers
            head = b"Content-Length: %d\r\nContent-Length: %d\r\n" % (n, rng.choice([n, n + 1]))
            payload = body
        elif how == 6:  # shorter than the body: the rest reads as a second request
            head, payload = b"Content-Length: %d\r\n" % (n // 2), body
        elif how == 7:  # no length at all: an empty body, then garbage
            head, payload = b"", body
        elif how == 8:  # chunks with extensions and a trailer
            payload = b"%x;ext=1\r\n%s\r\n0\r\nX-Trailer: 1\r\n\r\n" % (n, body)
            head = b"Transfer-Encoding: chunked\r\n"
        elif how == 9:  # a body larger than server.max_body_bytes
            big = b'{"inputs": [' + b" " * (MAX_BODY + 10) + b"]}"
            if rng.random() < 0.5:
                head, payload = b"Content-Length: %d\r\n" % len(big), big
            else:
                head = b"Transfer-Encoding: chunked\r\n"
                payload = b"%x\r\n%s\r\n0\r\n\r\n" % (len(big), big)
        elif how == 10:  # obsolete line folding and bare LF
            head, payload = b"X-Fold: a\r\n b\r\nContent-Length: %d\r\n" % n, body
        else:
            raw = start.replace(b"\r\n", b"\n") + b"Content-Length: %d\n\n" % n + body
            return Case("framing", "data", raw)
        raw = start + ct + head + b"Connection: close\r\n\r\n" + payload
        return Case("framing", "data", raw)

    def stalled(self) -> Case:
        """Bytes that stop short of a whole request: the server's header or body timeout must
        end it (an answer or a close), not leave it open."""
        rng = self.rng
        body = orjson.dumps(self.infer_doc())
        whole = http(b"POST", b"/v2/models/cancer/infer", JSON_HEADERS, body)
        how = rng.randrange(3)
        if how == 0:  # headers never finished
            raw = whole[: whole.index(b"\r\n\r\n") - rng.randrange(1, 10)]
        elif how == 1:  # a body shorter than its Content-Length
            raw = whole[: len(whole) - rng.randrange(1, len(body))]
        else:  # a chunked body with no last chunk
            raw = (
                b"POST /v2/models/cancer/infer HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked"
                b"\r\nConnection: close\r\n\r\n%x\r\n%s\r\n" % (len(body), body)
            )
        return Case("stalled", "data", raw)

    def admin(self) -> Case:
        rng = self.rng
        method = rng.choice([b"GET", b"GET", b"POST", b"POST", b"PUT", b"DELETE", b"HEAD",
                             b"OPTIONS", b"G\xffT"])  # fmt: skip
        headers: list[tuple[bytes, bytes]] = []
        how = rng.randrange(6)
        if how == 0:
            headers.append((b"Authorization", b"Bearer " + TOKEN.encode()))
        elif how == 1:
            headers.append((b"Authorization", b"Bearer " + rng.choice(ODD_BYTES) + b"token"))
        elif how == 2:
            headers.append((b"Authorization", rng.choice(
                [b"Basic Zm9vOmJhcg==", b"Bearer", b"Bearer  " + TOKEN.encode(), b"bearer x",
                 b"Bearer " + TOKEN.encode() + b"\xff", b"Bearer " + TOKEN.encode() + b"\x7f",
                 b"x" * 9000]
            )))  # fmt: skip
        body = b""
        if rng.random() < 0.3:
            body = self.mutate_bytes(orjson.dumps({"weights": {"v1": 1}}))
        return Case(
            "admin",
            "admin",
            http(method, self.target(ADMIN_PATHS), _clean(headers), body),
            head=method == b"HEAD",
        )

    def case(self) -> Case:
        kinds: list[tuple[Callable[[], Case], int]] = [
            (self.infer_json, 30),
            (self.infer_binary, 10),
            (self.feedback, 10),
            (self.encoding, 10),
            (self.headers, 8),
            (self.method_path, 10),
            (self.framing, 8),
            (self.admin, 12),
            (self.stalled, 1),
            (self.pipelined, 4),
        ]
        make = self.rng.choices([k for k, _ in kinds], weights=[w for _, w in kinds])[0]
        return make()


def _clean(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """No CR or LF inside a name or value: those would end the header section, not fuzz it."""
    return [
        (n.replace(b"\r", b"").replace(b"\n", b""), v.replace(b"\r", b"").replace(b"\n", b""))
        for n, v in headers
    ]


# ---------------------------------------------------------------------------------------------
# sending and reading


def exchange(case: Case, ports: dict[str, int]) -> Outcome:
    """Send the case on a fresh connection; read its answers (or the close)."""
    out = Outcome(case)
    started = time.monotonic()
    deadline = started + ANSWER_DEADLINE_S
    with socket.create_connection(("127.0.0.1", ports[case.plane]), timeout=5) as sock:
        try:
            sock.sendall(case.raw)
        except OSError:
            pass  # the server answered (and closed) before reading it all: read the answer
        data = b""
        while len(out.answers) < case.answers:
            parsed = parse_response(data, head=case.head)
            if parsed is not None:
                answer, used = parsed
                out.answers.append(answer)
                data = data[used:]
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                out.error = "hang"
                break
            sock.settimeout(remaining)
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                out.error = "hang"
                break
            except ConnectionResetError:
                out.error = "reset"
                break
            if not chunk:
                out.error = "closed"
                break
            data += chunk
    out.took_s = time.monotonic() - started
    return out


def parse_response(data: bytes, *, head: bool) -> tuple[Answer, int] | None:
    """The first final (non-1xx) response in `data` and the bytes it took, once it is all
    there; None until then."""
    at = 0
    while True:
        end = data.find(b"\r\n\r\n", at)
        if end < 0:
            return None
        lines = data[at:end].split(b"\r\n")
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower().decode("latin-1")] = value.strip().decode("latin-1")
        at = end + 4
        if 100 <= status < 200:
            continue
        if head or status in (204, 304):
            return Answer(status, headers, b""), at
        if "content-length" in headers:
            n = int(headers["content-length"])
            if len(data) - at < n:
                return None
            return Answer(status, headers, data[at : at + n]), at + n
        if headers.get("transfer-encoding", "").lower() == "chunked":
            body = b""
            while True:
                line_end = data.find(b"\r\n", at)
                if line_end < 0:
                    return None
                size = int(data[at:line_end].split(b";")[0], 16)
                if len(data) < line_end + 2 + size + 2:
                    return None
                if size == 0:
                    return Answer(status, headers, body), line_end + 4
                body += data[line_end + 2 : line_end + 2 + size]
                at = line_end + 2 + size + 2
        return None  # delimited by the close


def failure_of(out: Outcome) -> str | None:
    """What is wrong with this outcome, if anything."""
    for answer in out.answers:
        if answer.status == 503 and "retry-after" not in answer.headers:
            return "503 without Retry-After"
        if answer.status >= 500 and answer.status != 503:
            return f"{answer.status}"
    if out.error == "hang":
        return f"neither answered nor closed within {ANSWER_DEADLINE_S} s"
    if len(out.answers) < out.case.must_answer:
        return f"{len(out.answers)} of {out.case.must_answer} answers, then {out.error}"
    return None


# ---------------------------------------------------------------------------------------------


def fuzz_config(tmp_path: Path, repo: Path, port: int, admin: int) -> Path:
    text = BASE_CONFIG.format(max_body=MAX_BODY, max_inflight=512)
    text = text.replace("port = 0", f"port = {port}")
    text = text.replace(
        "queue_timeout_ms = 1000\n",
        f"queue_timeout_ms = 1000\nheader_timeout_s = {STALL_TIMEOUT_S}\n"
        f"body_timeout_s = {STALL_TIMEOUT_S}\n",
    )
    text += f'[admin]\nport = {admin}\ntoken_env = "MLPROXY_FUZZ_TOKEN"\n'
    text += model_section(mode="canary", repo=repo, extra='sticky_key = "x-user-id"')
    text += (
        "[models.cancer.canary]\nweights = { v1 = 50, v2 = 50 }\ngates = { max_error_rate = 0.9 }\n"
    )
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


def good_infer(port: int, rows: np.ndarray[Any, Any], i: int) -> Outcome:
    doc = {
        "inputs": [
            {
                "name": "input",
                "shape": [1, 30],
                "datatype": "FP32",
                "data": [float(v) for v in rows[i % len(rows)]],
            }
        ]
    }
    case = Case(
        "good",
        "data",
        http(b"POST", b"/v2/models/cancer/infer", JSON_HEADERS, orjson.dumps(doc)),
    )
    return exchange(case, {"data": port})


def describe(out: Outcome) -> str:
    raw = out.case.raw
    shown = raw if len(raw) <= 600 else raw[:400] + b"...(%d bytes)..." % len(raw) + raw[-120:]
    answer = ", ".join(f"{a.status} {a.body[:300]!r}" for a in out.answers)
    if out.error is not None:
        answer += f" ({out.error})"
    return f"  [{out.case.kind}] request {shown!r}\n    -> {answer} in {out.took_s:.2f} s"


def run_fuzz(cases: list[Case], ports: dict[str, int]) -> tuple[list[Outcome], float]:
    """Every case on its own connection, THREADS at a time, until TIME_CAP_S has passed."""
    outcomes: list[Outcome] = []
    lock = threading.Lock()
    began = time.monotonic()

    def run(case: Case) -> None:
        if time.monotonic() - began > TIME_CAP_S:
            return
        out = exchange(case, ports)
        with lock:
            outcomes.append(out)

    with ThreadPoolExecutor(THREADS) as pool:
        list(pool.map(run, cases))
    return outcomes, time.monotonic() - began


@pytest.mark.timeout(120)
def test_fuzzed_requests_get_no_5xx_and_leave_no_connection_hanging(
    tmp_path: Path, model_repo: Path, cancer_rows: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLPROXY_FUZZ_TOKEN", TOKEN)
    port, admin = free_port(), free_port()
    path = fuzz_config(tmp_path, model_repo, port, admin)
    with serve_process(path, port) as served:
        ids = []
        for i in range(WARM_UP):
            out = good_infer(port, cancer_rows, i)
            assert out.status == 200, describe(out)
            ids.append(orjson.loads(out.body)["id"])
        gen = Generator(random.Random(SEED), cancer_rows, ids)
        cases = [gen.case() for _ in range(REQUESTS)]
        outcomes, elapsed = run_fuzz(cases, {"data": port, "admin": admin})
        alive = served.proc.poll() is None
        after = [good_infer(port, cancer_rows, i) for i in range(5)]

    failures: dict[tuple[str, str], list[Outcome]] = {}
    for out in outcomes:
        wrong = failure_of(out)
        if wrong is not None:
            failures.setdefault((out.case.kind, wrong), []).append(out)
    report = "\n".join(
        f"{kind}: {wrong} x{len(outs)}\n" + "\n".join(describe(o) for o in _distinct(outs))
        for (kind, wrong), outs in sorted(failures.items())
    )
    answers = collections.Counter(o.status or str(o.error) for o in outcomes)
    by_kind = {
        kind: dict(
            collections.Counter(o.status or str(o.error) for o in outcomes if o.case.kind == kind)
        )
        for kind in sorted({o.case.kind for o in outcomes})
    }
    print(f"fuzz: {len(outcomes)} requests in {elapsed:.1f} s; answers by kind: {by_kind}")
    assert alive, f"mlproxy died during the fuzz:\n{served.output[-5000:]}"
    assert all(o.status == 200 for o in after), [describe(o) for o in after]
    assert len(outcomes) >= min(REQUESTS, 1000), f"only {len(outcomes)} requests in {TIME_CAP_S} s"
    assert answers[503] <= len(outcomes) // 100, answers  # overload: should not happen here
    assert not failures, f"{len(outcomes)} requests, answers {dict(answers)}:\n{report}"
    # Bad input is the client's mistake: no ERROR or traceback in the log, and no token.
    assert TOKEN not in served.output, "the admin token is in the log"
    errors = logged_errors(served.seen)
    assert not errors, f"{sum(errors.values())} errors logged:\n" + "\n".join(
        f"x{n}: {entry}" for entry, n in errors.items()
    )


def logged_errors(lines: list[str]) -> dict[str, int]:
    """Each distinct ERROR entry of the log (with its traceback), and how often it came."""
    entries: list[str] = []
    for line in lines:
        if LOG_ENTRY.match(line) or not entries:
            entries.append(line)
        else:
            entries[-1] += line
    found: dict[str, int] = {}
    for entry in entries:
        if " ERROR " in entry.partition("\n")[0] or "Traceback" in entry:
            key = entry.partition(" ")[2].partition(" ")[2]  # without the timestamp
            found[key] = found.get(key, 0) + 1
    return found


def _distinct(outs: list[Outcome], most: int = 6) -> list[Outcome]:
    """A few examples, each a different answer body where there are several."""
    seen: dict[bytes, Outcome] = {}
    for out in outs:
        seen.setdefault(out.body[:80], out)
    return list(seen.values())[:most]
