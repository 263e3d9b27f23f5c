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
``x_total``, as ``prometheus_client`` does. Never registers anything and never keeps
state: a collector calls these from its ``collect()``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

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
