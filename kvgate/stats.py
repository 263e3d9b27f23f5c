"""Prometheus families from the numbers a component keeps: the one way stats are exported.

Components count in plain stats dataclasses (``RelayStats``, ``LoopStats``, ...) and read
them only when ``/metrics`` is scraped. This module turns those numbers into metric
families:

* ``counter`` / ``gauge``: one family from one value. A number is one sample; a mapping
  (a ``Counter[str]`` of rejections by kind, blocks by ``(rank, tier)``) is one sample per
  key, its key under ``label`` (a name, or one name per part of a tuple key);
* ``counters`` / ``gauges``: one family per ``Field`` of a stats object, named
  ``prefix + field name``; mapping fields come out in sorted key order, so that
  scrapes are stable whatever order the counts arrived in;
* ``every_field``: the ``Field`` list of a whole stats dataclass, documented from one
  template.

``labels`` are constant labels every sample carries (vLLM's ``model_name``, ``engine``),
before the mapping's own. Names are taken as given: a counter named ``x`` is exposed as
``x_total``, as ``prometheus_client`` does. These never register anything and never keep
state: a collector calls them from its ``collect()``.

``TextExposition`` writes a registry's page (what ``generate_latest`` writes, faster): the one
stateful piece here, a cache of each series' formatted name and labels.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.utils import floatToGoString

Number = int | float | bool
Value = Number | Mapping[str, Number] | Mapping[tuple[str, ...], Number]
"""One number, or numbers keyed by a label value (a tuple of values for several labels)."""


@dataclass(frozen=True, slots=True)
class Field:
    """One attribute of a stats object exported as one family."""

    attr: str
    doc: str
    name: str = ""
    """The family's name after the prefix; the attribute's name when empty."""
    label: str | tuple[str, ...] = "kind"
    """For a mapping attribute: the label(s) its keys go under."""


def counter(
    name: str, doc: str, value: Value, *, label: str | Sequence[str] = "kind", labels: Mapping[str, str] | None = None
) -> CounterMetricFamily:
    family = CounterMetricFamily(name, doc, labels=_label_names(value, label, labels))
    _add(family, value, labels)
    return family


def gauge(
    name: str, doc: str, value: Value, *, label: str | Sequence[str] = "kind", labels: Mapping[str, str] | None = None
) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, doc, labels=_label_names(value, label, labels))
    _add(family, value, labels)
    return family


def counters(
    prefix: str, stats: object, fields: Iterable[Field], *, labels: Mapping[str, str] | None = None
) -> Iterator[CounterMetricFamily]:
    for f in fields:
        yield counter(prefix + (f.name or f.attr), f.doc, _read(stats, f.attr), label=f.label, labels=labels)


def gauges(
    prefix: str, stats: object, fields: Iterable[Field], *, labels: Mapping[str, str] | None = None
) -> Iterator[GaugeMetricFamily]:
    for f in fields:
        yield gauge(prefix + (f.name or f.attr), f.doc, _read(stats, f.attr), label=f.label, labels=labels)


def every_field(stats: object, doc: str) -> tuple[Field, ...]:
    """A ``Field`` per field of the dataclass ``stats``; ``{name}`` in ``doc`` becomes its name in words."""
    return tuple(Field(f.name, doc.format(name=f.name.replace("_", " "))) for f in dataclasses.fields(stats))


def _read(stats: object, attr: str) -> Value:
    value = getattr(stats, attr)
    if isinstance(value, Mapping):
        return dict(sorted(value.items()))
    return value


def _label_names(value: Value, label: str | Sequence[str], labels: Mapping[str, str] | None) -> list[str]:
    names = list(labels or ())
    if isinstance(value, Mapping):
        names += [label] if isinstance(label, str) else list(label)
    return names


def _add(family: CounterMetricFamily | GaugeMetricFamily, value: Value, labels: Mapping[str, str] | None) -> None:
    constant = list((labels or {}).values())
    if not isinstance(value, Mapping):
        family.add_metric(constant, float(value))
        return
    for key, number in value.items():
        family.add_metric([*constant, *((key,) if isinstance(key, str) else key)], float(number))


# --- exposition ------------------------------------------------------------------------------------

_LEGACY_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
_LEGACY_LABEL = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
_FORMATTED_TYPES = frozenset({"counter", "gauge", "histogram", "summary"})
_OM_SUFFIXES = ("_created", "_gsum", "_gcount")


class TextExposition:
    """``generate_latest(registry)``, byte for byte, at about a third of its formatting cost.

    prometheus_client formats every sample from scratch (sorting, escaping and joining its labels) on
    every scrape: 5 µs a line, 3.4 ms for the gateway's 640 lines with 4 workers, on the event loop. The
    series of a gateway are nearly all the same from one scrape to the next, so this keeps each
    series' ``name{labels} `` prefix and formats only its value. A family it does not handle the same
    way as the library (a name or label outside the classic character set, a timestamp, an
    info / stateset / unknown type) renders the whole page with ``generate_latest``, so the text never
    differs; a test holds the two equal."""

    def __init__(self, registry: CollectorRegistry, max_prefixes: int = 100_000) -> None:
        self.registry = registry
        self._prefixes: dict[tuple[str, tuple[tuple[str, str], ...]], str] = {}
        self._heads: dict[tuple[str, str, str], str] = {}
        self._max = max_prefixes

    def render(self) -> bytes:
        out: list[str] = []
        self._begin()
        if not self._format(self.registry.collect(), out):
            return generate_latest(self.registry)
        return "".join(out).encode("utf-8")

    async def render_async(self, step: float = 0.001) -> bytes:
        """The same page, letting the event loop run between collectors whenever this scrape has
        held it ``step`` seconds: a large fleet's page takes several ms to collect and format (15 ms
        for the gateway's ~600 lines on a loaded 2-core host), which would otherwise stall every
        stream for that long. Each collector is read whole in one go (custom collectors iterate
        live state). Registries it cannot walk one collector at a time render in one piece."""
        collectors = getattr(self.registry, "_collector_to_names", None)
        if not isinstance(collectors, dict) or getattr(self.registry, "_target_info", None):
            return self.render()
        out: list[str] = []
        self._begin()
        started = time.perf_counter()
        for collector in list(collectors):
            if not self._format(collector.collect(), out):
                return generate_latest(self.registry)
            if time.perf_counter() - started > step:
                await asyncio.sleep(0)
                started = time.perf_counter()
        return "".join(out).encode("utf-8")

    def _begin(self) -> None:
        if len(self._prefixes) > self._max:  # label sets come and go (workers leave): start over now and then
            self._prefixes.clear()

    def _format(self, families: Iterable[Metric], out: list[str]) -> bool:
        """Append the families' text to ``out``; False when one needs the library's formatting."""
        prefixes, heads = self._prefixes, self._heads
        for metric in families:
            mtype = metric.type
            if mtype not in _FORMATTED_TYPES:
                return False
            head_key = (metric.name, mtype, metric.documentation)
            head = heads.get(head_key)
            if head is None:
                if not _LEGACY_NAME.match(metric.name):
                    return False
                head = heads[head_key] = family_head(metric.name, mtype, metric.documentation)
            out.append(head)
            om: dict[str, list[str]] | None = None
            for s in metric.samples:
                if s.timestamp is not None:
                    return False
                key = (s.name, tuple(s.labels.items()))
                prefix = prefixes.get(key)
                if prefix is None:
                    prefix = _prefix(s.name, s.labels)
                    if prefix is None:
                        return False
                    prefixes[key] = prefix
                line = prefix + floatToGoString(s.value) + "\n"
                suffix = s.name[len(metric.name) :]
                if suffix in _OM_SUFFIXES and s.name.startswith(metric.name):
                    om = om if om is not None else {}
                    om.setdefault(suffix, []).append(line)
                else:
                    out.append(line)
            if om:
                for suffix, lines in sorted(om.items()):
                    out.append(family_head(metric.name + suffix, "gauge", metric.documentation))
                    out.extend(lines)
        return True


def family_head(name: str, mtype: str, doc: str) -> str:
    """A family's HELP and TYPE lines as ``generate_latest`` writes them (a counter's name gets ``_total``)."""
    exposed = name + "_total" if mtype == "counter" else name
    return f"# HELP {exposed} {escape_help(doc)}\n# TYPE {exposed} {mtype}\n"


def _prefix(name: str, labels: Mapping[str, str]) -> str | None:
    if not _LEGACY_NAME.match(name) or not all(_LEGACY_LABEL.match(k) for k in labels):
        return None
    return sample_prefix(name, labels)


def escape_help(doc: str) -> str:
    """A HELP text as the text format escapes it."""
    return doc.replace("\\", r"\\").replace("\n", r"\n")


def escape_label(value: str) -> str:
    """A label value as the text format escapes it."""
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def sample_prefix(name: str, labels: Mapping[str, str]) -> str:
    """A sample line up to its value, as ``generate_latest`` writes it (labels sorted); classic names only."""
    if not labels:
        return name + " "
    return name + "{" + ",".join(f'{k}="{escape_label(v)}"' for k, v in sorted(labels.items())) + "} "
