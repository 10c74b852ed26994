"""One node's metrics from the expositions of its worker processes (no I/O).

Each worker of ``[node] workers`` counts what it handled in its own registry; a scrape
of ``/metrics`` must still read as if the node were one process.  The worker that
answers parses its own exposition and its peers' (:func:`parse_exposition`) and
:func:`merge_expositions` renders them back as one:

* counters and histograms (buckets, ``_sum``, ``_count``) are added up per label
  set; a sum of cumulative bucket counts stays cumulative;
* their ``_created`` series are left out: each is one process's start, and no
  single one is the node's;
* a gauge follows its rule (:class:`GaugeRule`, the table is
  :data:`sendarix.events.metrics.GAUGE_RULES`): added up, the largest reading, or
  added up only where each worker keeps its own part; a gauge without a rule is
  added up;
* ``sendarix_build_info`` is one sample, named after the node (not ``NAME-wI``);
* ``sendarix_workers`` (how many workers the node runs) and
  ``sendarix_workers_scraped`` (how many of them this scrape holds) say whether a
  worker was left out because it did not answer.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterator, Mapping, Sequence

from attrs import define
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

__all__ = [
    "BUILD_INFO", "WORKERS", "WORKERS_SCRAPED", "GaugeRule", "merge_expositions",
    "parse_exposition",
]

#: The build information family (one sample per process, labelled with its node).
BUILD_INFO = "sendarix_build_info"
#: The families the merge adds.
WORKERS = "sendarix_workers"
WORKERS_SCRAPED = "sendarix_workers_scraped"

#: Families whose samples are added up whatever their labels.
_SUMMED_TYPES = ("counter", "histogram", "summary", "gaugehistogram")


class GaugeRule(enum.Enum):
    """How the workers' readings of one gauge make the node's."""

    #: Each worker holds its own part (connections it has open, deliveries it queued).
    SUM = "sum"
    #: Every worker reads the same thing (the shared spool, the shared holds) or the
    #: node's figure is the largest (1 while any worker has a site suspended).
    MAX = "max"
    #: Each worker's own count where the stores keep such state per process (SQLite:
    #: added up), the count of the whole cluster where they share it (Redis: every
    #: worker reads it, so the largest).
    PARTS = "parts"


def parse_exposition(text: str) -> list[Metric]:
    """The families of one Prometheus text exposition; ValueError when it is not one."""
    try:
        return list(text_string_to_metric_families(text))
    except ValueError:
        raise
    except Exception as e:  # the parser raises assorted types on garbage
        raise ValueError(f"not a Prometheus text exposition: {e}") from e


def _key(labels: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(labels.items()))


@define
class _Family:
    """One family being merged: its first-seen documentation and type, and the
    samples by (sample name, label set), in first-seen order."""

    name: str
    documentation: str
    type: str
    values: dict[tuple[str, tuple[tuple[str, str], ...]], float]

    def metric(self) -> Metric:
        metric = Metric(self.name, self.documentation, self.type)
        for (sample, labels), value in self.values.items():
            metric.samples.append(Sample(sample, dict(labels), value))
        return metric


def merge_expositions(
    readings: Sequence[Sequence[Metric] | None],
    node: str,
    rules: Mapping[str, GaugeRule],
    shared_state: bool = False,
) -> bytes:
    """The node's exposition from each worker's parsed families (None for a worker
    that did not answer); ``node`` is the node's name, ``rules`` the gauges' rules,
    ``shared_state`` True where the stores share limits and routing state."""
    families: dict[str, _Family] = {}
    build: Sample | None = None
    build_doc = "Sendarix build information"
    for reading in readings:
        if reading is None:
            continue
        summed = {m.name for m in reading if m.type in _SUMMED_TYPES}
        for metric in reading:
            if metric.name.endswith("_created") and metric.name[:-8] in summed:
                continue
            if metric.name == BUILD_INFO:
                if build is None and metric.samples:
                    build, build_doc = metric.samples[0], metric.documentation
                continue
            family = families.get(metric.name)
            if family is None:
                family = families[metric.name] = _Family(
                    metric.name, metric.documentation, metric.type, {}
                )
            combine = _combiner(family, rules, shared_state)
            for sample in metric.samples:
                if sample.name.endswith("_created") and metric.type in _SUMMED_TYPES:
                    continue
                key = (sample.name, _key(sample.labels))
                old = family.values.get(key)
                family.values[key] = sample.value if old is None else combine(old, sample.value)
    workers = len(readings)
    scraped = sum(1 for r in readings if r is not None)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Merged(families, build, build_doc, node, workers, scraped))
    return generate_latest(registry)


def _combiner(
    family: _Family, rules: Mapping[str, GaugeRule], shared_state: bool
) -> Callable[[float, float], float]:
    if family.type in _SUMMED_TYPES:
        return _add
    rule = rules.get(family.name, GaugeRule.SUM)
    if rule is GaugeRule.PARTS:
        rule = GaugeRule.MAX if shared_state else GaugeRule.SUM
    return max if rule is GaugeRule.MAX else _add


def _add(a: float, b: float) -> float:
    return a + b


@define(eq=False)
class _Merged:
    """A collector yielding the merged families (for ``generate_latest``)."""

    families: Mapping[str, _Family]
    build: Sample | None
    build_doc: str
    node: str
    workers: int
    scraped: int

    def collect(self) -> Iterator[Metric]:
        if self.build is not None:
            info = Metric(BUILD_INFO, self.build_doc, "gauge")
            info.samples.append(
                Sample(BUILD_INFO, {**self.build.labels, "node": self.node}, self.build.value)
            )
            yield info
        for family in self.families.values():
            yield family.metric()
        yield GaugeMetricFamily(WORKERS, "Worker processes of this node", value=self.workers)
        yield GaugeMetricFamily(
            WORKERS_SCRAPED,
            "Worker processes whose figures this scrape holds (the others did not "
            "answer in time and are left out)",
            value=self.scraped,
        )
