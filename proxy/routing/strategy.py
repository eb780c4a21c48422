"""Which version answers a request, and which mirror it: pure functions of config and inputs."""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

from proxy.config.schema import ModelConfig

_TWO_64 = float(2**64)


@dataclass(frozen=True, slots=True)
class Route:
    """The version whose answer the client gets, and the versions that get a mirrored copy."""

    primary: str
    mirrors: tuple[str, ...] = ()


def stable_unit(*parts: str) -> float:
    """A uniform number in (0, 1) from strings: the same on every run, process and machine.

    A header that is not UTF-8 arrives with its bad bytes as surrogates (aiohttp decodes with
    surrogateescape): encoding the same way gives back the client's bytes, so it hashes like any
    other key instead of failing."""
    key = "\x1f".join(parts).encode("utf-8", "surrogateescape")
    digest = hashlib.blake2b(key, digest_size=8).digest()
    return (int.from_bytes(digest, "big") + 0.5) / _TWO_64


@dataclass(frozen=True, slots=True)
class Strategy:
    """A model's routing rule, built once per config; `choose` is called per request."""

    mode: str
    versions: tuple[str, ...]  # versions that may answer, in config order
    weights: tuple[float, ...]  # normalised to sum 1, same order as versions
    mirrors: tuple[str, ...] = ()
    sample: float = 0.0
    salt: str = ""
    mirror_for: str | None = None  # mirror only requests this version answers (None: all)

    def choose(self, sticky: str | None, u: float, mirror_u: float = 1.0) -> Route:
        """Pick a route. `u` and `mirror_u` are uniform draws in [0, 1) from the caller's rng.

        With a sticky value the choice is weighted rendezvous hashing: each version scores the
        key, the best score wins. Changing one weight moves only the users that must move
        (to or from that version), and no state is kept anywhere.
        """
        mirrors = self.mirrors if self.mirrors and mirror_u < self.sample else ()
        if len(self.versions) == 1:
            return Route(self.versions[0], mirrors)
        if self.mirror_for is not None:
            route = self._pick(sticky, u)
            return Route(route, mirrors if route == self.mirror_for else ())
        return Route(self._pick(sticky, u), mirrors)

    def _pick(self, sticky: str | None, u: float) -> str:
        if sticky is not None:
            best, best_score = self.versions[0], -math.inf
            for version, weight in zip(self.versions, self.weights, strict=True):
                if weight <= 0.0:
                    continue
                score = -weight / math.log(stable_unit(self.salt, version, sticky))
                if score > best_score:
                    best, best_score = version, score
            return best
        acc = 0.0
        for version, weight in zip(self.versions, self.weights, strict=True):
            acc += weight
            if u < acc and weight > 0.0:
                return version
        last = max(i for i, w in enumerate(self.weights) if w > 0.0)
        return self.versions[last]

    def split(self) -> dict[str, float]:
        """The share of traffic each version answers."""
        return dict(zip(self.versions, self.weights, strict=True))


def create_strategy(model: ModelConfig, weights: dict[str, float] | None = None) -> Strategy:
    """The Strategy in force for a model's `mode`; `weights` overrides a canary's split (rollout)."""
    if model.mode == "canary":
        c = model.canary
        assert c is not None
        split = weights if weights is not None else c.weights
        names = tuple(c.weights)
        total = sum(split.get(n, 0.0) for n in names)
        if total <= 0:  # everything rolled back: the stable version answers
            return Strategy("canary", (model.stable,), (1.0,), salt=model.name)
        shares = tuple(split.get(n, 0.0) / total for n in names)
        if c.canary is not None and c.gates.min_agreement is not None:
            # Compare the canary's answers with stable's: its requests are mirrored to stable.
            return Strategy(
                "canary",
                names,
                shares,
                mirrors=(model.stable,),
                sample=1.0,
                salt=model.name,
                mirror_for=c.canary,
            )
        return Strategy("canary", names, shares, salt=model.name)
    if model.mode == "shadow":
        assert model.shadow is not None
        s = model.shadow
        return Strategy("shadow", (s.primary,), (1.0,), s.mirrors, s.sample, salt=model.name)
    if model.mode == "blue_green":
        assert model.blue_green is not None
        return Strategy("blue_green", (model.blue_green.active_version,), (1.0,), salt=model.name)
    return Strategy("single", (model.stable,), (1.0,), salt=model.name)
