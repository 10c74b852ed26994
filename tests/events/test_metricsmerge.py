"""Merging the worker processes' expositions into the node's: counters and histograms
add up, gauges follow their rule, a worker that did not answer is counted as left out."""

from __future__ import annotations

from collections.abc import Sequence

from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from twisted.trial.unittest import SynchronousTestCase

from sendarix.events.metrics import GAUGE_RULES, Metrics
from sendarix.events.metricsmerge import (
    WORKERS,
    WORKERS_SCRAPED,
    GaugeRule,
    merge_expositions,
    parse_exposition,
)

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]

TENANTS = ("acme", "default", "other")
BUCKETS = (1.0, 5.0, 30.0)


def read(text: bytes) -> Samples:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text.decode())
        for s in family.samples
    }


def worker(
    node: str, accepted: dict[str, int], waits: Sequence[float] = (), queue: int = 0,
    open_: int = 0, sent: int = 0,
) -> str:
    """One worker's exposition with the families the merge treats differently."""
    r = CollectorRegistry()
    Info("sendarix_build", "Sendarix build information", registry=r).info(
        {"version": "1.2", "node": node})
    counter = Counter("sendarix_messages_accepted", "Accepted", ["tenant"], registry=r)
    for tenant, n in accepted.items():
        counter.labels(tenant).inc(n)
    histogram = Histogram("sendarix_throttle_wait_seconds", "Waits", ["site"],
                          buckets=BUCKETS, registry=r)
    child = histogram.labels("gmail")
    for w in waits:
        child.observe(w)
    Gauge("sendarix_queue_messages", "Queued", registry=r).set(queue)
    Gauge("sendarix_site_connections", "Open", ["site"], registry=r).labels("gmail").set(open_)
    Gauge("sendarix_egress_sent_today", "Sent", ["source", "site"],
          registry=r).labels("ip1", "gmail").set(sent)
    Gauge("sendarix_made_up", "No rule", registry=r).set(2)
    return generate_latest(r).decode()


def merge(*texts: str | None, shared: bool = False) -> Samples:
    readings = [None if t is None else parse_exposition(t) for t in texts]
    return read(merge_expositions(readings, "box", GAUGE_RULES, shared_state=shared))


counts = st.dictionaries(st.sampled_from(TENANTS), st.integers(0, 10**6))
waits = st.lists(st.floats(0, 60, allow_nan=False), max_size=20)


class MergeTests(SynchronousTestCase):
    def test_counters_add_up(self) -> None:
        got = merge(worker("box-w1", {"acme": 3}), worker("box-w2", {"acme": 4, "default": 1}))
        self.assertEqual(got[("sendarix_messages_accepted_total", (("tenant", "acme"),))], 7)
        self.assertEqual(got[("sendarix_messages_accepted_total", (("tenant", "default"),))], 1)
        # Each process's start is not the node's.
        self.assertFalse([n for n, _ in got if n.endswith("_created")])

    def test_gauge_rules(self) -> None:
        """The spool's depth is read by every worker (the largest reading); open
        connections are each worker's own (added up); sends today are each worker's
        own on SQLite, the cluster's on Redis; a gauge without a rule adds up."""
        one = worker("box-w1", {}, queue=10, open_=2, sent=5)
        two = worker("box-w2", {}, queue=12, open_=3, sent=6)
        got = merge(one, two)
        self.assertEqual(got[("sendarix_queue_messages", ())], 12)
        self.assertEqual(got[("sendarix_site_connections", (("site", "gmail"),))], 5)
        sent = ("sendarix_egress_sent_today", (("site", "gmail"), ("source", "ip1")))
        self.assertEqual(got[sent], 11)
        self.assertEqual(got[("sendarix_made_up", ())], 4)
        self.assertEqual(merge(one, two, shared=True)[sent], 6)

    def test_build_info_names_the_node(self) -> None:
        got = merge(worker("box-w1", {}), worker("box-w2", {}))
        build = [dict(labels) for name, labels in got if name == "sendarix_build_info"]
        self.assertEqual(build, [{"node": "box", "version": "1.2"}])

    def test_a_missing_worker_is_left_out_and_counted(self) -> None:
        got = merge(worker("box-w1", {"acme": 3}), None, worker("box-w3", {"acme": 1}))
        self.assertEqual(got[("sendarix_messages_accepted_total", (("tenant", "acme"),))], 4)
        self.assertEqual(got[(WORKERS, ())], 3)
        self.assertEqual(got[(WORKERS_SCRAPED, ())], 2)

    def test_garbage_is_not_an_exposition(self) -> None:
        self.assertRaises(ValueError, parse_exposition, "this is {not metrics\n")

    @given(st.lists(counts, min_size=1, max_size=5))
    def test_merging_counters_is_counting_once(self, workers: list[dict[str, int]]) -> None:
        """k workers' expositions merge into the exposition of one process that
        counted everything they counted."""
        total: dict[str, int] = {}
        for w in workers:
            for tenant, n in w.items():
                total[tenant] = total.get(tenant, 0) + n
        got = merge(*(worker(f"box-w{i}", w) for i, w in enumerate(workers, 1)))
        single = merge(worker("box-w1", total))
        counted = "sendarix_messages_accepted_total"
        self.assertEqual({k: v for k, v in got.items() if k[0] == counted},
                         {k: v for k, v in single.items() if k[0] == counted})

    @given(st.lists(waits, min_size=1, max_size=5))
    def test_histograms_stay_cumulative(self, workers: list[list[float]]) -> None:
        """Summed buckets are those of every observation in one histogram: cumulative,
        ending in the count, with the sum of the sums."""
        got = merge(*(worker(f"box-w{i}", {}, w) for i, w in enumerate(workers, 1)))
        everything = [x for w in workers for x in w]
        buckets = [got[("sendarix_throttle_wait_seconds_bucket",
                        (("le", le), ("site", "gmail")))]
                   for le in ("1.0", "5.0", "30.0", "+Inf")]
        self.assertEqual(buckets, sorted(buckets))
        self.assertEqual(buckets, [sum(1 for x in everything if x <= b)
                                   for b in (*BUCKETS, float("inf"))])
        count = got[("sendarix_throttle_wait_seconds_count", (("site", "gmail"),))]
        self.assertEqual(count, len(everything))
        self.assertAlmostEqual(
            got[("sendarix_throttle_wait_seconds_sum", (("site", "gmail"),))],
            sum(everything), places=6)

    def test_the_merged_exposition_parses_back(self) -> None:
        """What the merge renders is itself a valid exposition with the same families."""
        text = merge_expositions(
            [parse_exposition(worker("box-w1", {"acme": 1}, [0.5]))], "box", GAUGE_RULES)
        names = {f.name for f in parse_exposition(text.decode())}
        self.assertTrue({"sendarix_messages_accepted", "sendarix_throttle_wait_seconds",
                         "sendarix_build_info", WORKERS, WORKERS_SCRAPED} <= names)


class RuleTableTests(SynchronousTestCase):
    def test_every_gauge_family_has_a_rule(self) -> None:
        """Each gauge a node exposes (the routing state's too) says how the workers'
        readings combine, so a new gauge cannot be added up by default unnoticed."""
        metrics = Metrics(providers=frozenset({"gmail"}), pools=frozenset({"relay"}))
        metrics.watch_routing(lambda: {
            "sites": [{"site": "gmail", "open": 1, "rate": 10, "period": 1}],
            "pools": {"relay": {"relay/10.0.0.1:25": "closed"}},
            "egress": [{"name": "ip1", "sent_today": {"gmail": 1}, "warmup_cap": 5}],
        })
        metrics.set_held_tenants({"acme": "x", "acme/gmail": "y"})
        families = parse_exposition(generate_latest(metrics.registry).decode())
        gauges = {f.name for f in families
                  if f.type == "gauge" and not f.name.endswith("_created")}
        gauges.discard("sendarix_build_info")
        self.assertEqual(gauges - set(GAUGE_RULES), set())
        self.assertTrue(all(isinstance(rule, GaugeRule) for rule in GAUGE_RULES.values()))
