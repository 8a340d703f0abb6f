"""The daemon's Prometheus metrics: events, state gauges, exposition, and the /metrics handler."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from lkrun.api.metrics import (
    METRIC_DOCS,
    OFFER_ANSWER_BUCKETS,
    OFFER_TO_ENTRYPOINT_BUCKETS,
    AgentSnapshot,
    Metrics,
    metrics_handler,
)


def snap(agent: str, **overrides: object) -> AgentSnapshot:
    values: dict[str, object] = {
        "agent": agent,
        "up": True,
        "jobs_running": 2,
        "max_jobs": 8,
        "idle_processes": 1,
        "load": 0.25,
        "job_memory_bytes": 123_456_789,
    }
    values.update(overrides)
    return AgentSnapshot(**values)  # type: ignore[arg-type]


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


def value(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def sample_names(body: bytes) -> set[str]:
    return {
        sample.name
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
    }


def test_metric_docs_are_unique_prefixed_and_typed() -> None:
    names = [name for name, _, _ in METRIC_DOCS]
    assert len(names) == len(set(names))
    for name, kind, help_text in METRIC_DOCS:
        assert name.startswith("lkrun_")
        assert kind in {"counter", "gauge", "histogram"}
        assert help_text
        # The exposed counter name ends in _total; nothing else does.
        assert name.endswith("_total") == (kind == "counter")


def test_registry_matches_metric_docs(metrics: Metrics) -> None:
    registered = {}
    for family in metrics.registry.collect():
        # The client keeps counter family names without the _total suffix.
        name = family.name + "_total" if family.type == "counter" else family.name
        registered[name] = (family.type, family.documentation)
    assert registered == {name: (kind, help_text) for name, kind, help_text in METRIC_DOCS}


def test_job_started_counts_by_agent_and_warm(metrics: Metrics) -> None:
    metrics.job_started("echo", warm=True)
    metrics.job_started("echo", warm=True)
    metrics.job_started("echo", warm=False)
    metrics.job_started("greeter", warm=False)
    assert value(metrics, "lkrun_jobs_started_total", agent="echo", warm="true") == 2
    assert value(metrics, "lkrun_jobs_started_total", agent="echo", warm="false") == 1
    assert value(metrics, "lkrun_jobs_started_total", agent="greeter", warm="false") == 1
    assert value(metrics, "lkrun_jobs_started_total", agent="greeter", warm="true") is None


def test_job_ended_counts_by_status(metrics: Metrics) -> None:
    from lkrun.jobs.book import JobStatus

    metrics.job_ended("echo", "success")
    metrics.job_ended("echo", JobStatus.SUCCESS)
    metrics.job_ended("echo", "failed")
    metrics.job_ended("echo", JobStatus.FAILED)
    assert value(metrics, "lkrun_jobs_ended_total", agent="echo", status="success") == 2
    assert value(metrics, "lkrun_jobs_ended_total", agent="echo", status="failed") == 2


def test_job_ended_maps_unknown_status_to_failed(metrics: Metrics) -> None:
    metrics.job_ended("echo", "crashed")
    assert value(metrics, "lkrun_jobs_ended_total", agent="echo", status="failed") == 1
    assert value(metrics, "lkrun_jobs_ended_total", agent="echo", status="crashed") is None


def test_offer_accepted(metrics: Metrics) -> None:
    metrics.offer_answered("echo", accepted=True, seconds=0.0003)
    assert value(metrics, "lkrun_offers_total", agent="echo", result="accepted") == 1
    assert value(metrics, "lkrun_offers_total", agent="echo", result="declined") is None
    declines = [
        s for f in metrics.registry.collect() if f.name == "lkrun_offer_declines" for s in f.samples
    ]
    assert declines == []


@pytest.mark.parametrize(
    ("reason", "label"),
    [
        ("rooms", "rooms"),
        ("max_jobs", "max_jobs"),
        ("cpu", "cpu"),
        ("not_accepting", "not_accepting"),
        ("error", "error"),
        ("", "other"),
        ("something new", "other"),
        ("CPU", "other"),
    ],
)
def test_offer_declined_maps_reason(metrics: Metrics, reason: str, label: str) -> None:
    metrics.offer_answered("echo", accepted=False, seconds=0.001, reason=reason)
    assert value(metrics, "lkrun_offers_total", agent="echo", result="declined") == 1
    assert value(metrics, "lkrun_offer_declines_total", agent="echo", reason=label) == 1
    reasons = {
        s.labels["reason"]
        for f in metrics.registry.collect()
        if f.name == "lkrun_offer_declines"
        for s in f.samples
        if s.name == "lkrun_offer_declines_total"
    }
    assert reasons == {label}


def test_offer_answer_histogram(metrics: Metrics) -> None:
    metrics.offer_answered("echo", accepted=True, seconds=0.00005)
    metrics.offer_answered("echo", accepted=False, seconds=0.002, reason="cpu")
    metrics.offer_answered("echo", accepted=True, seconds=0.5)
    name = "lkrun_offer_answer_seconds"
    assert value(metrics, f"{name}_count", agent="echo") == 3
    assert value(metrics, f"{name}_sum", agent="echo") == pytest.approx(0.50205)
    assert value(metrics, f"{name}_bucket", agent="echo", le="0.0001") == 1
    assert value(metrics, f"{name}_bucket", agent="echo", le="0.0025") == 2
    assert value(metrics, f"{name}_bucket", agent="echo", le="0.1") == 2
    assert value(metrics, f"{name}_bucket", agent="echo", le="+Inf") == 3
    assert min(OFFER_ANSWER_BUCKETS) == 0.0001
    assert max(OFFER_ANSWER_BUCKETS) == 0.1


def test_offer_to_entrypoint_histogram(metrics: Metrics) -> None:
    metrics.offer_to_entrypoint("echo", warm=True, seconds=0.004)
    metrics.offer_to_entrypoint("echo", warm=False, seconds=1.7)
    metrics.offer_to_entrypoint("echo", warm=False, seconds=2.2)
    name = "lkrun_offer_to_entrypoint_seconds"
    assert value(metrics, f"{name}_count", agent="echo", warm="true") == 1
    assert value(metrics, f"{name}_count", agent="echo", warm="false") == 2
    assert value(metrics, f"{name}_sum", agent="echo", warm="false") == pytest.approx(3.9)
    assert value(metrics, f"{name}_bucket", agent="echo", warm="true", le="0.005") == 1
    assert value(metrics, f"{name}_bucket", agent="echo", warm="false", le="1.0") == 0
    assert value(metrics, f"{name}_bucket", agent="echo", warm="false", le="2.5") == 2
    assert min(OFFER_TO_ENTRYPOINT_BUCKETS) == 0.001
    assert max(OFFER_TO_ENTRYPOINT_BUCKETS) == 30


def test_registration_reconnected(metrics: Metrics) -> None:
    metrics.registration_reconnected("echo")
    metrics.registration_reconnected("echo")
    metrics.registration_reconnected("greeter")
    assert value(metrics, "lkrun_registration_reconnects_total", agent="echo") == 2
    assert value(metrics, "lkrun_registration_reconnects_total", agent="greeter") == 1


GAUGES = {
    "lkrun_registration_up": "up",
    "lkrun_jobs_running": "jobs_running",
    "lkrun_jobs_max": "max_jobs",
    "lkrun_idle_processes": "idle_processes",
    "lkrun_agent_load": "load",
    "lkrun_job_memory_bytes": "job_memory_bytes",
}


# Gauges not per agent: the daemon's, and each inference process's (by interpreter).
OTHER_GAUGES = {"lkrun_daemon_info", "lkrun_inference_up", "lkrun_inference_memory_bytes"}


def test_gauge_table_covers_every_gauge() -> None:
    per_agent = {name for name, kind, _ in METRIC_DOCS if kind == "gauge"} - OTHER_GAUGES
    assert set(GAUGES) == per_agent


def test_inference_metrics_by_interpreter(metrics: Metrics) -> None:
    py = "/venv/bin/python"
    metrics.inference_state(py, up=True)
    metrics.inference_memory(py, rss=100, pss=60)
    metrics.inference_request(py, "eou", 0.004, ok=True)
    metrics.inference_request(py, "eou", 0.2, ok=False)
    metrics.inference_restarted(py)
    assert value(metrics, "lkrun_inference_up", interpreter=py) == 1
    assert value(metrics, "lkrun_inference_memory_bytes", interpreter=py, kind="pss") == 60
    assert value(metrics, "lkrun_inference_memory_bytes", interpreter=py, kind="rss") == 100
    ok = {"interpreter": py, "method": "eou", "result": "ok"}
    assert value(metrics, "lkrun_inference_requests_total", **ok) == 1
    assert value(metrics, "lkrun_inference_requests_total", **{**ok, "result": "error"}) == 1
    assert value(metrics, "lkrun_inference_request_seconds_count", interpreter=py) == 2
    assert value(metrics, "lkrun_inference_restarts_total", interpreter=py) == 1
    metrics.inference_state(py, up=False)  # down: no memory to speak of
    assert value(metrics, "lkrun_inference_memory_bytes", interpreter=py, kind="pss") == 0
    metrics.inference_gone(py)  # stopped for good: its gauges go, its counters stay
    assert value(metrics, "lkrun_inference_up", interpreter=py) is None
    assert value(metrics, "lkrun_inference_memory_bytes", interpreter=py, kind="rss") is None
    assert value(metrics, "lkrun_inference_restarts_total", interpreter=py) == 1
    metrics.inference_gone(py)  # twice is harmless


def test_daemon_info_names_the_daemon(metrics: Metrics) -> None:
    metrics.set_daemon("host-a", "0.1.0")
    labels = {"name": "host-a", "version": "0.1.0"}
    assert metrics.registry.get_sample_value("lkrun_daemon_info", labels) == 1


def test_snapshot_sets_gauges(metrics: Metrics) -> None:
    metrics.set_snapshot(
        [
            snap("echo"),
            snap(
                "greeter",
                up=False,
                jobs_running=0,
                max_jobs=3,
                idle_processes=0,
                load=0.9,
                job_memory_bytes=0,
            ),
        ]
    )
    assert value(metrics, "lkrun_registration_up", agent="echo") == 1
    assert value(metrics, "lkrun_jobs_running", agent="echo") == 2
    assert value(metrics, "lkrun_jobs_max", agent="echo") == 8
    assert value(metrics, "lkrun_idle_processes", agent="echo") == 1
    assert value(metrics, "lkrun_agent_load", agent="echo") == 0.25
    assert value(metrics, "lkrun_job_memory_bytes", agent="echo") == 123_456_789
    assert value(metrics, "lkrun_registration_up", agent="greeter") == 0
    assert value(metrics, "lkrun_jobs_running", agent="greeter") == 0
    assert value(metrics, "lkrun_jobs_max", agent="greeter") == 3
    assert value(metrics, "lkrun_agent_load", agent="greeter") == 0.9


def test_snapshot_updates_and_removes_vanished_agents(metrics: Metrics) -> None:
    metrics.set_snapshot([snap("echo"), snap("greeter")])
    metrics.set_snapshot([snap("echo", jobs_running=5, up=False)])
    assert value(metrics, "lkrun_jobs_running", agent="echo") == 5
    assert value(metrics, "lkrun_registration_up", agent="echo") == 0
    for name in GAUGES:
        assert value(metrics, name, agent="greeter") is None, name
    # An agent may come back (a manifest reload), and an empty snapshot clears everything.
    metrics.set_snapshot([snap("greeter")])
    assert value(metrics, "lkrun_jobs_running", agent="greeter") == 2
    metrics.set_snapshot([])
    for name in GAUGES:
        assert value(metrics, name, agent="echo") is None, name
        assert value(metrics, name, agent="greeter") is None, name


def test_snapshot_accepts_a_generator(metrics: Metrics) -> None:
    metrics.set_snapshot(snap(name) for name in ("a", "b"))
    metrics.set_snapshot(snap(name) for name in ("b",))
    assert value(metrics, "lkrun_jobs_max", agent="a") is None
    assert value(metrics, "lkrun_jobs_max", agent="b") == 8


def test_snapshot_leaves_event_counters_alone(metrics: Metrics) -> None:
    metrics.job_started("echo", warm=True)
    metrics.set_snapshot([snap("echo")])
    metrics.set_snapshot([])
    assert value(metrics, "lkrun_jobs_started_total", agent="echo", warm="true") == 1


def exercise_everything(metrics: Metrics) -> None:
    metrics.job_started("echo", warm=True)
    metrics.job_ended("echo", "success")
    metrics.offer_answered("echo", accepted=True, seconds=0.0002)
    metrics.offer_answered("echo", accepted=False, seconds=0.0002, reason="max_jobs")
    metrics.offer_to_entrypoint("echo", warm=True, seconds=0.01)
    metrics.registration_reconnected("echo")
    metrics.was_full("echo", "cpu", 1.5)
    metrics.set_daemon("host-a", "0.1.0")
    metrics.set_snapshot([snap("echo")])
    metrics.inference_state("/venv/bin/python", up=True)
    metrics.inference_memory("/venv/bin/python", rss=100, pss=60)
    metrics.inference_request("/venv/bin/python", "eou", 0.004, ok=True)
    metrics.inference_restarted("/venv/bin/python")
    metrics.recovered("echo", "signal")
    metrics.recovery_skipped("echo", "max_redispatches")


def test_render_parses_and_contains_every_metric(metrics: Metrics) -> None:
    exercise_everything(metrics)
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain; version=0.0.4")
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    names = sample_names(body)
    for name, kind, help_text in METRIC_DOCS:
        if kind == "histogram":
            assert {f"{name}_bucket", f"{name}_count", f"{name}_sum"} <= names, name
        else:
            assert name in names, name
        # The parser drops _total from counter family names, as the client does.
        family = families[name.removesuffix("_total")]
        assert family.type == kind
        assert family.documentation == help_text
    text = body.decode()
    for name, _, _ in METRIC_DOCS:
        assert f"# HELP {name} " in text, name


def test_render_before_any_event_still_documents_every_metric(metrics: Metrics) -> None:
    body, _ = metrics.render()
    text = body.decode()
    list(text_string_to_metric_families(text))
    for name, kind, _ in METRIC_DOCS:
        assert f"# TYPE {name} {kind}" in text, name


def test_instances_do_not_share_state() -> None:
    first, second = Metrics(), Metrics()
    assert first.registry is not second.registry
    first.job_started("echo", warm=False)
    first.offer_answered("echo", accepted=False, seconds=0.001, reason="cpu")
    first.set_snapshot([snap("echo")])
    assert value(first, "lkrun_jobs_started_total", agent="echo", warm="false") == 1
    assert value(second, "lkrun_jobs_started_total", agent="echo", warm="false") is None
    assert value(second, "lkrun_offer_declines_total", agent="echo", reason="cpu") is None
    assert value(second, "lkrun_jobs_running", agent="echo") is None
    assert b'agent="echo"' not in second.render()[0]


def test_does_not_touch_the_global_registry() -> None:
    from prometheus_client import REGISTRY

    Metrics()
    Metrics()  # a second one would raise "Duplicated timeseries" on a shared registry
    assert REGISTRY.get_sample_value("lkrun_jobs_running", {"agent": "echo"}) is None
    assert not any(f.name.startswith("lkrun_") for f in REGISTRY.collect())


class Snapshots:
    """A snapshot source whose content the test changes between scrapes."""

    def __init__(self) -> None:
        self.agents = [snap("echo"), snap("greeter")]
        self.calls = 0

    def __call__(self) -> list[AgentSnapshot]:
        self.calls += 1
        return list(self.agents)


@pytest.fixture
async def served() -> AsyncIterator[tuple[str, Metrics, Snapshots]]:
    metrics = Metrics()
    snapshots = Snapshots()
    app = web.Application()
    app.router.add_get("/metrics", metrics_handler(metrics, snapshots))
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = next(a[1] for a in runner.addresses if isinstance(a, tuple))
    try:
        yield f"http://127.0.0.1:{port}/metrics", metrics, snapshots
    finally:
        await runner.cleanup()


async def test_handler_serves_metrics(served: tuple[str, Metrics, Snapshots]) -> None:
    url, metrics, snapshots = served
    metrics.job_started("echo", warm=True)
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        assert response.status == 200
        content_type = response.headers["Content-Type"]
        body = await response.read()
    assert response.content_type == "text/plain"
    assert "version=0.0.4" in content_type
    assert snapshots.calls == 1
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    assert {name.removesuffix("_total") for name, _, _ in METRIC_DOCS} <= set(families)
    names = sample_names(body)
    assert "lkrun_jobs_started_total" in names
    assert 'lkrun_jobs_running{agent="greeter"} 2.0' in body.decode()


async def test_handler_refreshes_snapshot_each_scrape(
    served: tuple[str, Metrics, Snapshots],
) -> None:
    url, _, snapshots = served
    async with aiohttp.ClientSession() as session:
        async with session.get(url) as response:
            first = (await response.read()).decode()
        snapshots.agents = [snap("echo", jobs_running=7)]
        async with session.get(url) as response:
            second = (await response.read()).decode()
    assert snapshots.calls == 2
    assert 'agent="greeter"' in first
    assert 'agent="greeter"' not in second
    assert 'lkrun_jobs_running{agent="echo"} 7.0' in second


def test_recovery_counters_keep_their_labels_bounded(metrics: Metrics) -> None:
    metrics.recovered("echo", "memory_limit")
    metrics.recovered("echo", "whatever the caller says")
    metrics.recovery_skipped("echo", "no_caller")
    metrics.recovery_skipped("echo", "made up")
    body, _ = metrics.render()
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
        if sample.name.startswith("lkrun_recoveries")
    }
    assert samples[("lkrun_recoveries_total", (("agent", "echo"), ("cause", "memory_limit")))] == 1
    assert samples[("lkrun_recoveries_total", (("agent", "echo"), ("cause", "other")))] == 1
    skipped = "lkrun_recoveries_skipped_total"
    assert samples[(skipped, (("agent", "echo"), ("reason", "no_caller")))] == 1
    assert samples[(skipped, (("agent", "echo"), ("reason", "other")))] == 1
