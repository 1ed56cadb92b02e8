"""Endpoints made of weighted variants (Paddle Serving's ``variant_weight_list``): an API path whose
requests are split between several models or versions by weight, e.g. 90/10 for a canary.

    Endpoints:
      embedding:                      # POST /api/embedding
        Sticky: appId                 # optional: every request of one appId goes to one variant
        Variants:
          - {Name: stable, Model: embedding, Weight: 90}
          - {Name: canary, Model: embedding_v2, Version: "2", Weight: 10}

A request is routed by weight, at random, or - with ``Sticky`` - by a hash of that request field
(``appId``, or any top-level field of the envelope), so a caller always sees the same variant while
the weights stay as they are. The answer names the variant that served it (``data.variant`` and the
``X-Variant`` header). Weights change without a restart: the gateway re-reads its settings file when
it changes (``VariantTable.reload``).
"""

from __future__ import annotations

import bisect
import hashlib
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Variant:
    name: str
    model: str
    version: str      # "" = the version Triton's policy serves
    weight: float


@dataclass(frozen=True)
class Endpoint:
    path: str
    variants: tuple[Variant, ...]
    sticky: str | None = None

    def __post_init__(self) -> None:
        if not self.variants:
            raise ValueError(f"endpoint '{self.path}' has no variants")
        names = [v.name for v in self.variants]
        if len(set(names)) != len(names):
            raise ValueError(f"endpoint '{self.path}': variant names must differ, got {names}")
        if any(v.weight < 0 for v in self.variants) or sum(v.weight for v in self.variants) <= 0:
            raise ValueError(f"endpoint '{self.path}': weights must be >= 0 and sum to more than 0, "
                             f"got {[v.weight for v in self.variants]}")

    @property
    def _cumulative(self) -> list[float]:
        total, out = 0.0, []
        for v in self.variants:
            total += v.weight
            out.append(total)
        return out

    def choose(self, fields: Mapping[str, object], rng: random.Random | None = None) -> Variant:
        """The variant for one request (``fields``: the envelope's top-level fields)."""
        cumulative = self._cumulative
        total = cumulative[-1]
        key = fields.get(self.sticky) if self.sticky else None
        if key is not None:
            digest = hashlib.sha256(f"{self.path}\0{key}".encode("utf-8", "surrogatepass")).digest()
            point = int.from_bytes(digest[:8], "big") / 2**64 * total
        else:
            point = (rng or random).random() * total
        index = min(bisect.bisect_right(cumulative, point), len(self.variants) - 1)
        while self.variants[index].weight == 0:  # a zero-weight variant never takes traffic
            index = (index + 1) % len(self.variants)
        return self.variants[index]


def parse_endpoints(raw: Mapping[str, Mapping] | None) -> dict[str, Endpoint]:
    """``Endpoints`` of the settings (already validated by ``settings.EndpointMapping``)."""
    out = {}
    for path, spec in (raw or {}).items():
        variants: Sequence = spec.variants  # type: ignore[attr-defined]
        out[path] = Endpoint(path, tuple(Variant(v.name, v.model, v.version or "", float(v.weight))
                                         for v in variants), spec.sticky)  # type: ignore[attr-defined]
    return out
