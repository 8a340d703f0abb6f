"""deploy/grafana/lkrun.json, the Grafana dashboard for the daemon's Prometheus metrics:
every query parses as PromQL and names only series the daemon exports (read from the real
registry, with the suffixes Prometheus adds) and only labels those series carry, and the
dashboard is importable as documented (a datasource variable every panel uses, an agent
variable)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import promql_parser
import pytest
from prometheus_client.parser import text_string_to_metric_families

from lkrun.api.metrics import AgentSnapshot, Metrics

DASHBOARD = Path(__file__).resolve().parent.parent / "deploy" / "grafana" / "lkrun.json"

# The series a family of each type puts on /metrics (Prometheus text format): a counter's
# samples end in _total, a histogram's in _bucket/_sum/_count; prometheus_client also
# exposes a _created series for counters and histograms.
SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "gauge": ("",),
}

# Grafana's own interval variables become a duration; any other $variable is only ever
# used inside a label matcher's string, where any text parses.
INTERVALS = {"__rate_interval": "5m", "__interval": "1m", "__range": "1h"}
VARIABLE = re.compile(r"\$(?:\{(\w+)(?::\w+)?\}|(\w+))")
LABEL_VALUES = re.compile(r"^label_values\((?:(.+),\s*)?(\w+)\)$")
# Labels Prometheus adds to every series it scrapes.
SCRAPE_LABELS = frozenset({"instance", "job"})


def exported_series() -> set[str]:
    """Every series name the daemon's registry can expose."""
    names = set()
    for family in Metrics().registry.collect():
        names.update(family.name + suffix for suffix in SUFFIXES[family.type])
    return names


def exercised() -> Metrics:
    """The daemon's metrics with a sample in every family, recorded through the calls the
    daemon makes (so each series has its labels)."""
    metrics = Metrics()
    metrics.set_daemon("d", "0.0")
    metrics.job_started("a", warm=True)
    metrics.job_ended("a", "success")
    metrics.offer_answered("a", accepted=False, seconds=0.001, reason="cpu")
    metrics.offer_to_entrypoint("a", warm=True, seconds=0.1)
    metrics.registration_reconnected("a")
    metrics.recovered("a", "lost")
    metrics.recovery_skipped("a", "no_caller")
    metrics.was_full("a", "cpu", 1.0)
    metrics.set_snapshot([AgentSnapshot("a", True, 1, 2, 0, 0.5, 1)])
    metrics.inference_request("/py", "predict", 0.01, ok=True)
    metrics.inference_restarted("/py")
    metrics.inference_state("/py", up=True)
    metrics.inference_memory("/py", 1, 1)
    return metrics


def series_labels() -> dict[str, set[str]]:
    """Each exposed series' label names, from the exposition of exercised()."""
    labels: dict[str, set[str]] = {}
    body = exercised().render()[0].decode()
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            labels.setdefault(sample.name, set()).update(sample.labels)
    return labels


def substitute(expr: str) -> str:
    def value(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        return INTERVALS.get(name, "x")

    return VARIABLE.sub(value, expr)


def metric_names(expr: str) -> list[str | None]:
    """The metric name of every selector in a PromQL expression (None for a selector with
    no literal name, such as {__name__=~"..."}); ValueError when it does not parse."""
    names: list[str | None] = []

    def visit(node: Any) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            names.append(node.name)

    promql_parser.walk(promql_parser.parse(substitute(expr)), visit)
    return names


def labels_named(expr: str) -> tuple[set[str], set[str]]:
    """(metric names, label names) an expression uses: in matchers, by/without, on/ignoring
    and group_left/right."""
    metrics: set[str] = set()
    labels: set[str] = set()

    def visit(node: Any) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            metrics.add(node.name)
            labels.update(m.name for m in node.matchers.matchers if m.name != "__name__")
        elif isinstance(node, promql_parser.AggregateExpr) and node.modifier is not None:
            labels.update(node.modifier.labels)
        elif isinstance(node, promql_parser.BinaryExpr) and node.modifier is not None:
            if node.modifier.matching is not None:
                labels.update(node.modifier.matching.labels)
            labels.update(node.modifier.group_labels or ())

    promql_parser.walk(promql_parser.parse(substitute(expr)), visit)
    return metrics, labels


def panels(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for item in items:
        yield item
        yield from panels(item.get("panels", []))  # a collapsed row holds its panels


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def queries(board: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(where, PromQL) for every panel target and every query variable."""
    for panel in panels(board["panels"]):
        for target in panel.get("targets", []):
            yield f"panel {panel['title']!r} {target['refId']}", target["expr"]
    for var in board["templating"]["list"]:
        if var["type"] != "query":
            continue
        query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        match = LABEL_VALUES.match(query)
        assert match and match.group(1), f"variable {var['name']}: use label_values(metric, label)"
        yield f"variable {var['name']}", match.group(1)


def unknown_metrics(expr: str, exported: set[str]) -> list[str]:
    return [str(name) for name in metric_names(expr) if name not in exported]


def test_exported_series_come_with_their_suffixes() -> None:
    exported = exported_series()
    assert {"lkrun_jobs_started_total", "lkrun_jobs_running"} <= exported
    assert {
        "lkrun_offer_to_entrypoint_seconds_bucket",
        "lkrun_offer_to_entrypoint_seconds_sum",
        "lkrun_offer_to_entrypoint_seconds_count",
    } <= exported
    # What the checker must refuse: a family name without its suffix, a suffix on a gauge.
    assert (
        not {
            "lkrun_jobs_started",
            "lkrun_offer_to_entrypoint_seconds",
            "lkrun_jobs_running_total",
        }
        & exported
    )


def test_the_checker_finds_unknown_names_and_bad_syntax() -> None:
    exported = exported_series()
    assert unknown_metrics('sum by (agent) (rate(lkrun_nope_total{agent=~"$agent"}[5m]))', exported)
    assert unknown_metrics("lkrun_offer_to_entrypoint_seconds", exported)
    assert unknown_metrics('{__name__=~"lkrun_.*"}', exported) == ["None"]
    assert not unknown_metrics(
        "histogram_quantile(0.95, sum by (le) "
        "(rate(lkrun_offer_to_entrypoint_seconds_bucket[$__rate_interval])))",
        exported,
    )
    with pytest.raises(ValueError):
        metric_names("sum(rate(lkrun_jobs_started_total[5m])")
    with pytest.raises(ValueError):
        metric_names("rat(lkrun_jobs_started_total[5m])")


def test_every_query_names_only_exported_metrics() -> None:
    exported = exported_series()
    board = dashboard()
    checked = 0
    for where, expr in queries(board):
        try:
            unknown = unknown_metrics(expr, exported)
        except ValueError as err:
            pytest.fail(f"{where}: not PromQL ({err}): {expr}")
        assert not unknown, f"{where} names metrics the daemon does not export: {unknown}"
        checked += 1
    assert checked >= 20


def test_every_family_is_exercised_for_its_labels() -> None:
    """exercised() must record every metric, or its labels would go unchecked: a new metric
    needs a call there."""
    exposed = set(series_labels())
    missing = {n for n in exported_series() if not n.endswith("_created")} - exposed
    assert not missing, f"record these in exercised(): {sorted(missing)}"


def test_every_query_names_only_labels_its_metrics_carry() -> None:
    labels_of = series_labels()
    checked = 0
    for where, expr in queries(dashboard()):
        metrics, labels = labels_named(expr)
        carried = set(SCRAPE_LABELS).union(*(labels_of[m] for m in metrics))
        assert labels <= carried, f"{where}: labels {sorted(labels - carried)} on no series"
        checked += 1
    for var in dashboard()["templating"]["list"]:
        if var["type"] == "query":
            match = LABEL_VALUES.match(var["query"]["query"])
            assert match is not None
            metrics, _ = labels_named(match.group(1))
            carried = set(SCRAPE_LABELS).union(*(labels_of[m] for m in metrics))
            assert match.group(2) in carried, var["name"]
    assert checked >= 20


def test_the_label_check_finds_a_wrong_label() -> None:
    labels_of = series_labels()
    metrics, labels = labels_named("sum by (result) (rate(lkrun_jobs_ended_total[5m]))")
    assert metrics == {"lkrun_jobs_ended_total"} and labels == {"result"}
    assert "result" not in labels_of["lkrun_jobs_ended_total"]  # it is "status" there
    metrics, labels = labels_named('a{agent="x"} / on (agent) group_left (kind) lkrun_jobs_max')
    assert metrics == {"a", "lkrun_jobs_max"} and labels == {"agent", "kind"}


def test_it_shows_what_the_issue_asks_for() -> None:
    """Per-agent jobs, offers and declines, offer->running latency, load, FULL seconds,
    memory and recoveries each have a panel."""
    used = {
        name for _, expr in queries(dashboard()) for name in metric_names(expr) if name is not None
    }
    for series in (
        "lkrun_jobs_running",
        "lkrun_jobs_max",
        "lkrun_jobs_started_total",
        "lkrun_jobs_ended_total",
        "lkrun_offers_total",
        "lkrun_offer_declines_total",
        "lkrun_offer_to_entrypoint_seconds_bucket",
        "lkrun_agent_load",
        "lkrun_agent_full_seconds_total",
        "lkrun_job_memory_bytes",
        "lkrun_recoveries_total",
        "lkrun_registration_up",
    ):
        assert series in used, series


def test_it_imports_anywhere_with_a_datasource_and_an_agent_variable() -> None:
    board = dashboard()
    variables = {var["name"]: var for var in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert variables["agent"]["type"] == "query"
    assert variables["agent"]["includeAll"] and variables["agent"]["multi"]
    # No datasource uid of the exporting Grafana: every query goes through the variable.
    wanted = {"type": "prometheus", "uid": "${datasource}"}
    ids = []
    for panel in panels(board["panels"]):
        ids.append(panel["id"])
        for target in panel.get("targets", []):
            assert target["datasource"] == wanted, panel["title"]
        if panel["type"] != "row":
            assert panel["datasource"] == wanted, panel["title"]
            per_agent = any("agent" in t["expr"] for t in panel["targets"])
            if per_agent:  # a per-agent panel follows the agent selector
                assert all('agent=~"$agent"' in t["expr"] for t in panel["targets"]), panel["title"]
    assert len(ids) == len(set(ids))
    assert "__inputs" not in board  # nothing to map at import: the variable picks the source
