"""How a worker's Prometheus metrics reach the API's one `/metrics`: the worker collects its own
`prometheus_client` registry every second and writes it, as JSON, under `WORKER_METRICS_KEY` (with
the same TTL as its figures hash); each API process reads every worker's entry at scrape time and
merges the families, adding a ``worker`` label. See docs/observability.md for why this road.

The shape is a list of families, each ``[name, type, help, [[sample_name, labels, value], ...]]``
(``name`` without the ``_total`` of a counter, as prometheus_client keeps it), zlib-compressed: the
histograms' buckets repeat their labels, and 40 KB of JSON a second per worker shrinks to a few.
"""

from __future__ import annotations

import json
import math
import zlib
from collections.abc import Iterable
from typing import Any

Family = list[Any]  # [name, type, help, samples]


def encode_families(families: Iterable[Any]) -> bytes:
    """JSON for the metric families of a ``registry.collect()`` (``*_created`` samples left out:
    the API's exposition has none)."""
    out: list[Family] = []
    for fam in families:
        samples = [[s.name, dict(s.labels), s.value] for s in fam.samples
                   if not s.name.endswith("_created") and not (isinstance(s.value, float) and math.isnan(s.value))]
        out.append([fam.name, fam.type, fam.documentation, samples])
    return zlib.compress(json.dumps(out, separators=(",", ":")).encode(), 1)


def decode_families(entry: bytes) -> list[Family]:
    """The families of one worker's entry; an entry that is not of this shape gives none."""
    try:
        data = json.loads(zlib.decompress(entry))
    except (ValueError, TypeError, zlib.error):
        return []
    if not isinstance(data, list):
        return []
    return [f for f in data if isinstance(f, list) and len(f) == 4 and isinstance(f[3], list)]
