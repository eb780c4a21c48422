"""Open Inference Protocol (KServe V2) REST: request JSON <-> numpy, with errors a client can act on."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from proxy.errors import InvalidInputError, NonFiniteInputError, UpstreamError
from proxy.protocol.ids import RequestIds

# V2 datatype <-> numpy dtype (little-endian, as the binary extension requires).
DTYPES: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype("bool"),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}
DATATYPE_OF = {dt: name for name, dt in DTYPES.items()}
NUMERIC_INPUTS = tuple(n for n in DTYPES if n != "BOOL")
BINARY_HEADER = "inference-header-content-length"
JSON_OPTIONS = orjson.OPT_SERIALIZE_NUMPY


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """Name, datatype and shape (-1 = any) of a model input or output."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


@dataclass(frozen=True, slots=True)
class InferRequest:
    """A decoded inference request: one input tensor as numpy rows in the model's dtype."""

    id: str
    x: np.ndarray[Any, Any]
    outputs: tuple[str, ...] | None
    binary_outputs: frozenset[str]
    seq: int = -1  # the counter behind an id `ids` made up (RequestIds); -1: the client's own


def parse_json_object(body: bytes, what: str = "request body") -> dict[str, Any]:
    """Parse a JSON object, or raise InvalidInputError saying why not."""
    if not body:
        raise InvalidInputError(f"{what} is empty; expected a JSON object")
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidInputError(f"{what} is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise InvalidInputError(f"{what} must be a JSON object, not {type(doc).__name__}")
    return doc


def parse_infer_request(
    body: bytes, spec: TensorSpec, *, ids: RequestIds, header_length: int | None = None
) -> InferRequest:
    """Decode a V2 infer request (JSON, or JSON + binary tensors) for a model with input `spec`;
    a request without an id gets a fresh one from `ids`."""
    binary = b""
    if header_length is not None:
        if not 0 < header_length <= len(body):
            raise InvalidInputError(
                f"Inference-Header-Content-Length is {header_length} but the body has {len(body)} bytes"
            )
        binary = body[header_length:]
        body = body[:header_length]
    doc = parse_json_object(body)
    rid = doc.get("id")
    seq = -1
    if rid is None:
        rid, seq = ids.new()
    elif not isinstance(rid, str):
        raise InvalidInputError(f"id must be a string, not {type(rid).__name__}")
    inputs = doc.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise InvalidInputError('"inputs" must be a non-empty list of tensors')
    if len(inputs) != 1:
        raise InvalidInputError(
            f"this model takes one input tensor, {spec.name!r}; the request has {len(inputs)}"
        )
    x = _decode_input(inputs[0], spec, binary, _may_hold_literals(body))
    requested, binary_outputs = _requested_outputs(doc)
    return InferRequest(rid, x, requested, binary_outputs, seq)


def _may_hold_literals(body: bytes) -> bool:
    """Whether a JSON body may hold a `true` or `false`: numpy takes them for 1 and 0 among
    numbers, so the data of such a body is searched for them. Most bodies hold neither an "r"
    nor an "f", and two memchr calls rule both literals out. (`find`, not `in`: bytes'
    `in` first tries its operand as an int, which costs more than the search; and a search for
    "true" itself costs more than the search of the data.)"""
    return body.find(b"r") >= 0 or body.find(b"f") >= 0


def _requested_outputs(doc: dict[str, Any]) -> tuple[tuple[str, ...] | None, frozenset[str]]:
    params = doc.get("parameters")
    if params is not None and not isinstance(params, dict):
        raise InvalidInputError('"parameters" must be an object')
    all_binary = bool(params and params.get("binary_data_output"))
    outputs = doc.get("outputs")
    if outputs is None:
        return None, frozenset(["*"]) if all_binary else frozenset()
    if not isinstance(outputs, list):
        raise InvalidInputError('"outputs" must be a list of {"name": ...} objects')
    names: list[str] = []
    binary: set[str] = set()
    for out in outputs:
        if not isinstance(out, dict) or not isinstance(out.get("name"), str):
            raise InvalidInputError(
                'each entry of "outputs" must be an object with a "name" string'
            )
        names.append(out["name"])
        oparams = out.get("parameters") or {}
        if not isinstance(oparams, dict):
            raise InvalidInputError(f"outputs[{out['name']!r}].parameters must be an object")
        if oparams.get("binary_data", all_binary):
            binary.add(out["name"])
    return tuple(names), frozenset(binary)


def _decode_input(
    tensor: Any, spec: TensorSpec, binary: bytes, literals: bool
) -> np.ndarray[Any, Any]:
    """`literals`: the JSON body may hold a `true` or `false` somewhere."""
    if not isinstance(tensor, dict):
        raise InvalidInputError("inputs[0] must be an object with name, shape, datatype and data")
    name = tensor.get("name")
    if name != spec.name:
        raise InvalidInputError(f"input is named {name!r}; this model's input is {spec.name!r}")
    shape = tensor.get("shape")
    if (
        not isinstance(shape, list)
        or not shape
        or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
    ):
        raise InvalidInputError(
            f"input {name!r}: shape must be a list of non-negative integers, not {shape!r}"
        )
    datatype = tensor.get("datatype")
    if datatype not in NUMERIC_INPUTS:
        raise InvalidInputError(
            f"input {name!r}: datatype {datatype!r} is not accepted; use one of {', '.join(NUMERIC_INPUTS)}"
        )
    _check_shape(name, shape, spec)
    count = math.prod(shape)
    params = tensor.get("parameters") or {}
    size = params.get("binary_data_size") if isinstance(params, dict) else None
    if size is not None:
        arr = _binary_tensor(name, datatype, size, count, binary)
    else:
        if "data" not in tensor:
            raise InvalidInputError(f'input {name!r}: "data" is missing')
        arr = _json_tensor(name, datatype, tensor["data"], count, literals)
    arr = arr.reshape(shape)
    want = DTYPES[spec.datatype]
    if (
        size is None
        and arr.size
        and arr.dtype.kind == "f"
        and want.kind == "f"
        and _fits(arr, want, tensor["data"])
    ):
        # JSON numbers are finite (orjson refuses NaN, Infinity and 1e400): within the model's
        # float range they stay finite cast, so the cast needs no overflow guard or check
        return arr if arr.dtype == want else arr.astype(want)
    if arr.dtype != want:
        with np.errstate(over="ignore", invalid="ignore"):
            arr = arr.astype(want)
    if want.kind == "f" and not np.isfinite(arr).all():
        bad = int(np.flatnonzero(~np.isfinite(arr.reshape(-1)))[0])
        raise NonFiniteInputError(
            f"input {name!r}: value at flat index {bad} is not finite"
            f" (NaN, infinite, or outside the {spec.datatype} range)"
        )
    return arr


_FLOAT_MAX = {np.dtype(t): float(np.finfo(t).max) for t in (np.float16, np.float32, np.float64)}


SMALL_FLAT = 256  # a flat JSON list up to this long is checked in Python, not numpy


def _fits(arr: np.ndarray[Any, Any], want: np.dtype[Any], data: list[Any]) -> bool:
    """Every value of `arr` (finite; decoded from the JSON list `data`) within `want`'s finite
    range. A short flat list is checked with Python's min and max (1.9 us for one 30-feature
    row, against 4.3 us for numpy's two reductions, whose cost is mostly per call)."""
    top = _FLOAT_MAX[want]
    if len(data) == arr.size <= SMALL_FLAT:
        return bool(-top <= min(data) and max(data) <= top)
    return bool(-top <= arr.min() and arr.max() <= top)


def _check_shape(name: str, shape: list[int], spec: TensorSpec) -> None:
    ok = len(shape) == len(spec.shape) and all(
        want in (-1, got) for want, got in zip(spec.shape, shape, strict=True)
    )
    if not ok:
        hint = ""
        if len(spec.shape) == 2 and len(shape) == 1 and shape[0] == spec.shape[1]:
            hint = f"; send one row as shape [1, {spec.shape[1]}]"
        elif len(spec.shape) == 2 and len(shape) == 2 and spec.shape[1] > 0:
            hint = f" (each row must have {spec.shape[1]} features, the request has {shape[1]})"
        raise InvalidInputError(
            f"input {name!r}: shape {shape} does not fit the model's shape {list(spec.shape)}{hint}"
        )
    if shape[0] == 0:
        raise InvalidInputError(f"input {name!r}: shape {shape} holds no rows")


def _json_tensor(
    name: str, datatype: str, data: Any, count: int, literals: bool
) -> np.ndarray[Any, Any]:
    if not isinstance(data, list):
        raise InvalidInputError(
            f"input {name!r}: data must be a list (flat or nested), not {type(data).__name__}"
        )
    try:
        arr = np.array(data)
    except ValueError:
        raise InvalidInputError(f"input {name!r}: data is a ragged nested list") from None
    kind = arr.dtype.kind
    if kind not in "iuf" or (kind == "f" and datatype not in ("FP16", "FP32", "FP64")):
        what = {"b": "booleans", "U": "strings", "O": "mixed or null values"}.get(
            kind, "non-integers"
        )
        expect = "numbers" if datatype.startswith("FP") else "integers"
        raise InvalidInputError(
            f"input {name!r}: datatype {datatype} needs {expect}, data has {what}"
        )
    if literals and _holds_bool(data, arr.ndim):
        bad = _first_bool(data)
        if bad is not None:
            raise InvalidInputError(
                f"input {name!r}: data holds a boolean ({bad[1]}) at flat index {bad[0]};"
                f" datatype {datatype} takes numbers only (true and false are for BOOL tensors)"
            )
    if arr.size != count:
        raise InvalidInputError(
            f"input {name!r}: shape holds {count} values but data has {arr.size}"
        )
    if kind in "iu" and not datatype.startswith("FP"):
        info = np.iinfo(DTYPES[datatype])
        if arr.size and (arr.min() < info.min or arr.max() > info.max):
            raise InvalidInputError(f"input {name!r}: a value is outside the {datatype} range")
    return arr


def _holds_bool(data: list[Any], ndim: int) -> bool:
    """Whether a nested list that numpy took as an `ndim`-dimensional array of numbers holds a
    boolean (a loop in C: a third of what `_first_bool` costs)."""
    flat: Any = data
    for _ in range(ndim - 1):
        flat = itertools.chain.from_iterable(flat)
    return bool in set(map(type, flat))


def _first_bool(data: list[Any]) -> tuple[int, str] | None:
    """(flat index, literal) of the first JSON true/false in a nested list that numpy took as
    numbers (so it is rectangular and at most 64 deep)."""
    flat = 0
    stack = [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            if item is True or item is False:
                return flat, "true" if item else "false"
            flat += 1
        else:
            stack.pop()
    return None


def _binary_tensor(
    name: str, datatype: str, size: Any, count: int, binary: bytes
) -> np.ndarray[Any, Any]:
    dtype = DTYPES[datatype]
    if type(size) is not int or size != count * dtype.itemsize:  # not a bool either
        raise InvalidInputError(
            f"input {name!r}: binary_data_size is {size!r}, but shape and {datatype} need {count * dtype.itemsize} bytes"
        )
    if len(binary) != size:
        raise InvalidInputError(
            f"input {name!r}: binary_data_size is {size} but {len(binary)} bytes follow the JSON header"
        )
    return np.frombuffer(binary, dtype=dtype)


def encode_infer_response(
    *,
    request_id: str,
    model: str,
    version: str,
    outputs: dict[str, np.ndarray[Any, Any]],
    requested: tuple[str, ...] | None,
    binary_outputs: frozenset[str],
) -> tuple[bytes, int | None]:
    """Encode a V2 response; returns (body, JSON header length if any output is binary)."""
    if requested is None:
        names: tuple[str, ...] = tuple(outputs)
    else:
        unknown = [n for n in requested if n not in outputs]
        if unknown:
            raise InvalidInputError(
                f"requested output {unknown[0]!r} does not exist (outputs: {', '.join(outputs)})"
            )
        names = requested
    entries = []
    blobs = []
    for n in names:
        arr = outputs[n]
        entry: dict[str, Any] = {"name": n, "datatype": DATATYPE_OF[arr.dtype], "shape": arr.shape}
        if "*" in binary_outputs or n in binary_outputs:
            blob = np.ascontiguousarray(arr).tobytes()
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = np.ascontiguousarray(arr).reshape(-1)
        entries.append(entry)
    doc = {"id": request_id, "model_name": model, "model_version": version, "outputs": entries}
    head = orjson.dumps(doc, option=JSON_OPTIONS)
    if not blobs:
        return head, None
    return head + b"".join(blobs), len(head)


def encode_infer_request(
    x: np.ndarray[Any, Any], spec: TensorSpec, request_id: str | None = None
) -> bytes:
    """The JSON body that asks a remote V2 server to run `x` (used by remote versions)."""
    doc: dict[str, Any] = {
        "inputs": [
            {
                "name": spec.name,
                "shape": x.shape,
                "datatype": DATATYPE_OF[x.dtype],
                "data": np.ascontiguousarray(x).reshape(-1),
            }
        ]
    }
    if request_id is not None:
        doc["id"] = request_id
    return orjson.dumps(doc, option=JSON_OPTIONS)


def decode_infer_response(body: bytes, where: str) -> dict[str, np.ndarray[Any, Any]]:
    """Parse a remote server's JSON infer response into named numpy outputs."""
    try:
        doc = orjson.loads(body)
        result: dict[str, np.ndarray[Any, Any]] = {}
        for out in doc["outputs"]:
            dtype = DTYPES[out["datatype"]]
            result[out["name"]] = np.asarray(out["data"], dtype=dtype).reshape(out["shape"])
        return result
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise UpstreamError(
            f"{where} answered an infer response that is not Open Inference Protocol: {exc!r}"
        ) from None


def parse_tensor_specs(items: Any, where: str) -> tuple[TensorSpec, ...]:
    """Tensor specs from model metadata (a manifest or a remote server's answer)."""
    specs = []
    if not isinstance(items, list):
        raise ValueError(f"{where}: must be a list of tensors")
    for i, item in enumerate(items):
        try:
            name, datatype, shape = item["name"], item["datatype"], item["shape"]
        except (KeyError, TypeError):
            raise ValueError(f"{where}[{i}]: needs name, datatype and shape") from None
        if datatype not in DTYPES or not isinstance(shape, list) or not isinstance(name, str):
            raise ValueError(f"{where}[{i}]: bad tensor spec {item!r}")
        specs.append(TensorSpec(name, datatype, tuple(int(d) for d in shape)))
    return tuple(specs)
