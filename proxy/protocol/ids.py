"""Request ids the proxy makes up: a counter a client can read, and a tag it cannot forge."""

from __future__ import annotations

import hashlib
import hmac
import os

SECRET_BYTES = 32
# One 64-byte BLAKE2b digest (128 hex digits) tags 8 consecutive counters, 64 bits (16 hex
# digits) each: a hash per 8 ids. `new` writes these as shifts: seq >> 3 is the digest, (seq & 7)
# << 4 the tag's offset in it.
TAG_HEX = 16
TAGS_PER_DIGEST = 8
MAX_DIGITS = 19  # as many as an int64 counter has; int() refuses strings past 4,300 digits


class RequestIds:
    """Ids for requests that came without one: `<counter>-<tag>`, unique across processes and
    restarts (each process draws its own secret).

    The tag is 64 bits of BLAKE2b keyed with that secret over the counter, so a client that
    reads its own ids cannot make up another client's by counting: `seq_of` gives the counter
    only of an id whose tag is right. The counter keeps the prediction store's O(1) ring (slot
    `seq % capacity`); one digest tags 8 counters, so the hash costs an eighth per id.
    """

    def __init__(self, secret: bytes | None = None, *, start: int = 1, step: int = 1) -> None:
        """`start`, `step`: the counters this object hands out, start, start + step, ...: the
        workers of one supervisor share a secret and take the counters of their own residue
        (worker k of N: k + 1, k + 1 + N, ...), so their ids never collide and any of them can
        check (and find the owner of) another's."""
        if start < 1 or step < 1:
            raise ValueError(f"request id counters start >= 1 and step >= 1, not {start}, {step}")
        key = os.urandom(SECRET_BYTES) if secret is None else secret
        self._mac = hashlib.blake2b(key=key, digest_size=TAG_HEX * TAGS_PER_DIGEST // 2)
        self._next = start
        self._step = step
        self._block = -1
        self._tags = ""

    def new(self) -> tuple[str, int]:
        """A fresh id and the counter behind it."""
        seq = self._next
        self._next = seq + self._step
        block = seq >> 3
        if block != self._block:
            self._tags = self._digest(block)
            self._block = block
        at = (seq & 7) << 4
        return f"{seq}-{self._tags[at : at + 16]}", seq

    @property
    def next_seq(self) -> int:
        """The counter the next `new` hands out (a worker publishes it: its successor in the
        slot starts past it)."""
        return self._next

    def seq_of(self, request_id: str) -> int | None:
        """The counter of an id that `new` (of this object) made, else None."""
        digits, sep, tag = request_id.partition("-")
        # ASCII digits only (str.isdigit() also takes '²', '①' and other scripts' digits, and
        # int() refuses strings past 4,300 digits), written as `new` writes them (no leading 0).
        if not (
            sep
            and len(tag) == TAG_HEX
            and tag.isascii()
            and 0 < len(digits) <= MAX_DIGITS
            and digits.isascii()
            and digits.isdigit()
            and digits[0] != "0"
        ):
            return None
        seq = int(digits)
        block, at = seq >> 3, (seq & 7) << 4
        expected = self._tags if block == self._block else self._digest(block)
        if not hmac.compare_digest(tag, expected[at : at + 16]):
            return None
        return seq

    def _digest(self, block: int) -> str:
        mac = self._mac.copy()
        mac.update(block.to_bytes(8, "little"))
        return mac.hexdigest()
