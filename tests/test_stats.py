"""The statistics: buckets, percentiles, counters and their Prometheus form."""

from __future__ import annotations

import random
import time

from hypothesis import given
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from pmemblk import stats


@given(st.integers(min_value=5, max_value=1 << 40))
def test_a_value_falls_in_its_bucket(ns: int) -> None:
    low, high = stats.bucket_bounds(stats.bucket_index(ns))
    assert low < ns <= high
    assert high / low <= 1 + 1 / stats.SUB + 1e-9  # a bucket is at most 25 % wide


def test_bucket_index_is_monotonic() -> None:
    values = sorted(random.Random(1).randrange(1, 1 << 40) for _ in range(5000))
    indexes = [stats.bucket_index(v) for v in values]
    assert indexes == sorted(indexes)
    assert stats.bucket_index(0) == 0
    assert stats.bucket_index(1 << 60) == stats.NBUCKETS - 1  # slower ones count in the last


def test_percentiles_are_within_the_bucket_error() -> None:
    rng = random.Random(7)
    samples = sorted(rng.lognormvariate(11, 1) for _ in range(20000))  # ns, ~60 µs median
    buckets = [0] * stats.NBUCKETS
    for ns in samples:
        buckets[stats.bucket_index(int(ns))] += 1
    for pct in (50.0, 99.0, 99.9):
        true = samples[int(pct / 100 * len(samples)) - 1] / 1e9
        estimate = stats.percentile(buckets, pct)
        assert estimate is not None
        assert abs(estimate - true) / true < 0.125, (pct, estimate, true)
    assert stats.percentile([0] * stats.NBUCKETS, 50) is None


def test_iostats_counts_and_exports() -> None:
    s = stats.IoStats(("read", "write"))
    start = time.perf_counter_ns()
    s.record("write", 4096, start, ok=True)
    s.record("write", 4096, start, ok=False)
    s.record("read", 512, start, ok=True)
    summary = s.summary()
    assert summary["write"]["requests"] == 2 and summary["write"]["bytes"] == 4096
    assert summary["write"]["errors"] == 1 and summary["read"]["requests"] == 1
    text = stats.prometheus_text(lambda: s.metrics("pmemblk_client", {"device": "d"})).decode()
    parsed = {f.name: f for f in text_string_to_metric_families(text)}  # type: ignore[no-untyped-call]
    buckets = [x for x in parsed["pmemblk_client_request_seconds"].samples
               if x.name.endswith("_bucket") and x.labels["op"] == "write"]
    counts = [x.value for x in buckets]
    assert counts == sorted(counts) and counts[-1] == 2  # cumulative, +Inf is the total
    assert buckets[-1].labels["le"] == "+Inf"


def test_disabled_stats_count_nothing() -> None:
    s = stats.IoStats(("read",), enabled=False)
    s.record("read", 1, time.perf_counter_ns(), ok=True)
    assert s.summary()["read"]["requests"] == 0


def test_exported_buckets_count_exactly_what_le_says_at_every_edge() -> None:
    """Latencies one nanosecond below, at and above every exported bound: each ``le`` bucket
    counts exactly those at most its bound (Prometheus' meaning), +Inf all of them, and the
    sum is theirs."""
    s = stats.IoStats(("read",))
    edges = [1 << octave for octave in stats.EXPORT_OCTAVES]
    values = [v for e in edges for v in (e - 1, e, e + 1)] + [1, 3, 1 << 50]
    for ns in values:
        s.observe("read", 4096, ns, ok=True)
    text = stats.prometheus_text(lambda: s.metrics("p", {})).decode()
    family = {f.name: f for f in text_string_to_metric_families(text)}  # type: ignore[no-untyped-call]
    samples = family["p_request_seconds"].samples
    buckets = {x.labels["le"]: x.value for x in samples if x.name.endswith("_bucket")}
    assert len(buckets) == len(edges) + 1
    for e in edges:
        le = f"{e / 1e9:.9g}"
        assert buckets[le] == sum(v <= e for v in values), (e, le)
    assert buckets["+Inf"] == len(values)
    total = next(x.value for x in samples if x.name.endswith("_sum"))
    assert abs(total - sum(values) / 1e9) < 1e-6
    assert next(x.value for x in samples if x.name.endswith("_count")) == len(values)
