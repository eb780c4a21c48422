"""One error hierarchy: every error carries the HTTP status a client sees."""

from __future__ import annotations


class ProxyError(Exception):
    """Base of every error mlproxy answers a client with; `status` is the HTTP status."""

    status = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def headers(self) -> dict[str, str]:
        return {}


class InvalidInputError(ProxyError):
    """The request body or its tensors break a rule of the protocol or of the model's schema."""

    status = 400


class NonFiniteInputError(InvalidInputError):
    """An input value is NaN, infinite, or beyond its datatype's range (counted for monitoring)."""


class NotFoundError(ProxyError):
    """No such route."""

    status = 404


class PredictionNotFoundError(NotFoundError):
    """Feedback names a request id with no stored prediction."""

    def __init__(self, model: str, request_id: str, kept: int) -> None:
        super().__init__(
            f"no stored prediction for id {request_id!r}: never answered by {model}, already"
            f" joined, or dropped (only the last {kept} predictions are kept)"
        )


class InvalidFeedbackError(InvalidInputError):
    """Feedback that does not fit its stored prediction (row count, label type)."""


class ModelNotFoundError(ProxyError):
    """The model, or the version of it, is not served."""

    status = 404

    def __init__(self, name: str, version: str | None = None, known: list[str] | None = None):
        if version is None:
            what = f"model {name!r} is not served"
        else:
            what = f"model {name!r} has no version {version!r}"
        if known is not None:
            what += f" (served: {', '.join(known) if known else 'none'})"
        super().__init__(what)
        self.name = name
        self.version = version


class MethodNotAllowedError(ProxyError):
    """The path exists but not for this HTTP method."""

    status = 405

    def __init__(self, method: str, path: str, allowed: tuple[str, ...]) -> None:
        super().__init__(f"{method} is not allowed on {path} (allowed: {', '.join(allowed)})")
        self.allowed = allowed

    def headers(self) -> dict[str, str]:
        return {"Allow": ", ".join(self.allowed)}


class PayloadTooLargeError(ProxyError):
    """The body is larger than `server.max_body_bytes`."""

    status = 413

    def __init__(self, limit: int) -> None:
        super().__init__(
            f"request body is larger than the limit of {limit} bytes (server.max_body_bytes)"
        )
        self.limit = limit


class UnsupportedEncodingError(ProxyError):
    """A Content-Encoding the proxy does not decode."""

    status = 415

    def __init__(self, encoding: str, supported: tuple[str, ...]) -> None:
        super().__init__(
            f"Content-Encoding {encoding[:40]!r} is not supported"
            f" (supported: {', '.join(supported)})"
        )
        self.encoding = encoding


class RequestTimeoutError(ProxyError):
    """The request's body did not all arrive in time."""

    status = 408

    def __init__(self, limit_s: float) -> None:
        super().__init__(
            f"the request body did not arrive within {limit_s:g} s (limits.body_timeout_s)"
        )


class OverloadedError(ProxyError):
    """The proxy sheds this request to protect the ones it is serving; retry later."""

    status = 503

    def __init__(self, reason: str, retry_after_s: int = 1) -> None:
        super().__init__(f"overloaded: {reason}; retry after {retry_after_s} s")
        self.retry_after_s = retry_after_s

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_s)}


class UpstreamError(ProxyError):
    """A remote inference server or a model run failed."""

    status = 502


class UpstreamTimeoutError(UpstreamError):
    """A remote inference server did not answer in time."""

    status = 504


class ModelLoadError(Exception):
    """A model version on disk (or a remote one) cannot be served; the message names the file."""


class ConfigError(Exception):
    """A config failed validation; `errors` holds one `key: reason` line per problem."""

    def __init__(self, errors: list[str], source: str = "config") -> None:
        self.errors = errors
        self.source = source
        super().__init__("\n".join(f"{source}:{e}" for e in errors))
