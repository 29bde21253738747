"""The data listener's request metrics expose what prometheus-client's own
Counter and Histogram would for the same observations."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from cachesvc.api.metrics import _LATENCY_BUCKETS, CACHE_RESULTS, PREFIX, RequestCollector

observations = st.lists(
    st.tuples(
        st.sampled_from(["GET", "HEAD", "PUT", "OTHER"]),
        st.sampled_from([200, 206, 404, 499]),
        st.one_of(
            st.sampled_from(_LATENCY_BUCKETS),  # exactly on a bound: "le" includes it
            st.floats(0.0, 100.0, allow_nan=False),
        ),
        st.sampled_from(["hit", "miss", "bypass", "-"]),
    ),
    max_size=40,
)


@settings(max_examples=60, deadline=None)
@given(observations)
def test_exposition_equals_prometheus_clients(seen: list[tuple[str, int, float, str]]) -> None:
    ours = CollectorRegistry()
    collector = RequestCollector()
    ours.register(collector)
    theirs = CollectorRegistry()
    requests = Counter(
        f"{PREFIX}_http_requests",
        "HTTP requests on the data listener.",
        ["method", "status"],
        registry=theirs,
    )
    durations = Histogram(
        f"{PREFIX}_http_request_duration_seconds",
        "Time to answer a data request.",
        ["method"],
        buckets=_LATENCY_BUCKETS,
        registry=theirs,
    )
    results = Counter(
        f"{PREFIX}_cache_requests",
        "Data requests that read file bytes, by cache result: hit (all from the cache),"
        " miss (some filled from the origin), bypass (some read pass-through).",
        ["result"],
        registry=theirs,
    )
    for result in CACHE_RESULTS:
        results.labels(result)
    for method, status, seconds, result in seen:
        collector.observe(method, status, seconds, result)
        requests.labels(method, str(status)).inc()
        durations.labels(method).observe(seconds)
        if result != "-":
            results.labels(result).inc()
    assert _lines(generate_latest(ours)) == _lines(generate_latest(theirs))


def _lines(exposition: bytes) -> list[str]:
    """HELP, TYPE and sample lines, sorted (series order is not part of the
    format), with sums rounded (they are added in different orders)."""
    out = []
    for line in exposition.decode().splitlines():
        if "_created" in line:
            continue
        name, _, value = line.rpartition(" ")
        is_sum = not line.startswith("#") and "_sum" in name
        out.append(f"{name} {round(float(value), 6)}" if is_sum else line)
    return sorted(out)
