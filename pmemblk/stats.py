"""Statistics: request counts, bytes and latency per operation, and their Prometheus form.

The data path records into plain integers under one lock: a request costs one ``perf_counter_ns``
pair, one ``frexp`` and a few additions (``scripts/bench`` measures it against ``stats=false``).
``prometheus_client``'s own ``Histogram.observe`` walks its buckets in a Python loop, so it is
used for what it does well, the exposition format (``prometheus_text``), through a collector
that reads these counters.

Latency buckets are log-linear: four per power of two of nanoseconds, so a percentile read from
them is within 12.5 % of the true value (the bucket is interpolated linearly, as Prometheus'
``histogram_quantile`` does).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.core import (
    CollectorRegistry,
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.exposition import generate_latest

#: Sub-buckets per power of two.
SUB = 4
#: Buckets up to 2**40 ns (about 18 minutes); slower requests count in the last one.
OCTAVES = 40
NBUCKETS = OCTAVES * SUB
#: Percentiles ``pmemblk status`` shows.
PERCENTILES = (50.0, 99.0, 99.9)
#: Bucket bounds exported to Prometheus: each power of two from 1 µs to about 69 s.
EXPORT_OCTAVES = range(10, 37)


def bucket_index(ns: int) -> int:
    """The bucket of a latency of ``ns`` nanoseconds: the one with low < ns <= high, as
    Prometheus' ``le`` (less or equal) counts, so a bound exported is exact."""
    if ns <= 1:
        return 0
    # For whole nanoseconds, ns <= high exactly when ns - 1 < high.
    mantissa, exponent = math.frexp(ns - 1)  # = mantissa * 2**exponent, 0.5 <= mantissa < 1
    return min(NBUCKETS - 1, (exponent - 1) * SUB + int((mantissa - 0.5) * 2 * SUB))


def bucket_bounds(index: int) -> tuple[float, float]:
    """(low, high] in nanoseconds of bucket ``index``."""
    octave, sub = divmod(index, SUB)
    base = float(1 << octave)
    return base * (1 + sub / SUB), base * (1 + (sub + 1) / SUB)


def percentile(buckets: list[int], pct: float) -> float | None:
    """The ``pct``-th percentile in seconds, interpolated within its bucket; None if empty."""
    total = sum(buckets)
    if not total:
        return None
    rank = pct / 100.0 * total
    seen = 0
    for index, count in enumerate(buckets):
        if count and seen + count >= rank:
            low, high = bucket_bounds(index)
            return (low + (high - low) * max(0.0, rank - seen) / count) / 1e9
        seen += count
    return bucket_bounds(NBUCKETS - 1)[1] / 1e9


@dataclass
class OpStats:
    """One operation's counters."""

    requests: int = 0
    bytes: int = 0
    errors: int = 0
    seconds: float = 0.0
    buckets: list[int] = field(default_factory=lambda: [0] * NBUCKETS)

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"requests": self.requests, "bytes": self.bytes,
                               "errors": self.errors}
        for pct in PERCENTILES:
            value = percentile(self.buckets, pct)
            out[f"p{pct:g}_us"] = None if value is None else round(value * 1e6, 1)
        return out


class IoStats:
    """Counters for a set of operations, shared by every thread that records into it."""

    def __init__(self, ops: Iterable[str], enabled: bool = True) -> None:
        self.ops = {op: OpStats() for op in ops}
        self.enabled = enabled
        self._lock = threading.Lock()
        self.started = time.time()
        #: Reconnections to the target, over every connection.
        self.reconnects = 0

    def reconnected(self) -> None:
        with self._lock:
            self.reconnects += 1

    def record(self, op: str, nbytes: int, started_ns: int, ok: bool) -> None:
        """A request that started at ``started_ns`` (``time.perf_counter_ns``) ended now."""
        if self.enabled:
            self.observe(op, nbytes, time.perf_counter_ns() - started_ns, ok)

    def observe(self, op: str, nbytes: int, ns: int, ok: bool) -> None:
        """A request of ``nbytes`` that took ``ns`` nanoseconds."""
        index = bucket_index(ns)
        with self._lock:
            s = self.ops[op]
            s.requests += 1
            s.bytes += nbytes if ok else 0
            s.errors += not ok
            s.seconds += ns / 1e9
            s.buckets[index] += 1

    def copy(self) -> dict[str, OpStats]:
        with self._lock:
            return {op: OpStats(s.requests, s.bytes, s.errors, s.seconds, list(s.buckets))
                    for op, s in self.ops.items()}

    def summary(self) -> dict[str, dict[str, Any]]:
        return {op: s.summary() for op, s in self.copy().items()}

    def metrics(self, prefix: str, labels: dict[str, str]) -> Iterator[Metric]:
        """Prometheus families: requests, bytes and errors per op, and a latency histogram."""
        names, values = list(labels), list(labels.values())
        ops = self.copy()
        families = {
            "requests": CounterMetricFamily(f"{prefix}_requests", "Requests completed",
                                            labels=[*names, "op"]),
            "bytes": CounterMetricFamily(f"{prefix}_bytes", "Bytes moved by successful requests",
                                         labels=[*names, "op"]),
            "errors": CounterMetricFamily(f"{prefix}_errors", "Requests that failed",
                                          labels=[*names, "op"]),
        }
        latency = HistogramMetricFamily(f"{prefix}_request_seconds", "Request latency",
                                        labels=[*names, "op"])
        for op, s in ops.items():
            families["requests"].add_metric([*values, op], s.requests)
            families["bytes"].add_metric([*values, op], s.bytes)
            families["errors"].add_metric([*values, op], s.errors)
            cumulative, bounds = 0, []
            upto = 0
            for octave in EXPORT_OCTAVES:
                limit = octave * SUB  # the buckets of latencies up to 2**octave ns
                cumulative += sum(s.buckets[upto:limit])
                upto = limit
                bounds.append((f"{(1 << octave) / 1e9:.9g}", cumulative))
            bounds.append(("+Inf", sum(s.buckets)))
            latency.add_metric([*values, op], bounds, s.seconds)
        yield from families.values()
        yield latency


class Collector:
    """A prometheus_client collector made of a function that yields metric families."""

    def __init__(self, collect: Any) -> None:
        self._collect = collect

    def collect(self) -> Iterator[Metric]:
        yield from self._collect()


def prometheus_text(collect: Any) -> bytes:
    """The text exposition format (node_exporter's textfile collector reads it)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(Collector(collect))  # type: ignore[arg-type]
    return generate_latest(registry)


def gauge(name: str, doc: str, value: float, labels: dict[str, str] | None = None) -> Metric:
    family = GaugeMetricFamily(name, doc, labels=list(labels or {}))
    family.add_metric(list((labels or {}).values()), value)
    return family


def counter(name: str, doc: str, value: float, labels: dict[str, str] | None = None) -> Metric:
    family = CounterMetricFamily(name, doc, labels=list(labels or {}))
    family.add_metric(list((labels or {}).values()), value)
    return family


def info(name: str, doc: str, values: dict[str, str]) -> Metric:
    family = InfoMetricFamily(name, doc)
    family.add_metric([], values)
    return family
