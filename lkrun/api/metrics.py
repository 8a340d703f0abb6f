"""Prometheus metrics for the daemon: job and offer events, plus per-agent state gauges."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# generate_latest() writes the classic text format; prometheus-client >= 0.22 sets
# CONTENT_TYPE_LATEST to "version=1.0.0", so name the format we actually emit.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# (name, type, help) of every metric: the README table and the help strings both come from here.
METRIC_DOCS: list[tuple[str, str, str]] = [
    (
        "lkrun_jobs_started_total",
        "counter",
        "Jobs whose subprocess was started, by agent and whether it came from the warm pool.",
    ),
    (
        "lkrun_jobs_ended_total",
        "counter",
        "Jobs that ended, by agent and final status (success or failed).",
    ),
    (
        "lkrun_offers_total",
        "counter",
        "Job offers answered, by agent and result (accepted or declined).",
    ),
    (
        "lkrun_offer_declines_total",
        "counter",
        "Declined job offers, by agent and reason "
        "(rooms, max_jobs, cpu, not_accepting, participant, expired, error, other).",
    ),
    (
        "lkrun_offer_answer_seconds",
        "histogram",
        "Time from receiving a job offer to its answer being queued for sending, in seconds.",
    ),
    (
        "lkrun_offer_to_entrypoint_seconds",
        "histogram",
        "Time from receiving a job offer to the job's entrypoint being called, in seconds.",
    ),
    (
        "lkrun_recoveries_total",
        "counter",
        'Failed jobs redispatched to their room (on_failure = "redispatch"), by agent and '
        "cause (signal, memory_limit, raised, exit, start_failed, lost).",
    ),
    (
        "lkrun_recoveries_skipped_total",
        "counter",
        "Failed jobs, of a kind worth a redispatch, left failed, by agent and reason "
        "(policy_off, max_redispatches, no_caller, participant_left, room_gone, agent_present, "
        "error).",
    ),
    (
        "lkrun_registration_reconnects_total",
        "counter",
        "Times an agent's worker registration reconnected to LiveKit.",
    ),
    (
        "lkrun_registration_up",
        "gauge",
        "1 if the agent's worker registration with LiveKit is up, else 0.",
    ),
    ("lkrun_jobs_running", "gauge", "Jobs currently running for the agent."),
    ("lkrun_jobs_max", "gauge", "Maximum concurrent jobs allowed for the agent."),
    (
        "lkrun_idle_processes",
        "gauge",
        "Idle prewarmed processes waiting for a job of the agent.",
    ),
    ("lkrun_agent_load", "gauge", "The load the agent's worker last reported to LiveKit (0..1)."),
    (
        "lkrun_daemon_info",
        "gauge",
        "Always 1; its labels name the daemon (its [daemon] name, else the host name) and "
        "lkrun's version, to tell daemons apart when several are scraped.",
    ),
    (
        "lkrun_agent_full_seconds_total",
        "counter",
        "Seconds the agent reported itself FULL (LiveKit offers it no job), by reason "
        "(starting, max_jobs, cpu, draining).",
    ),
    (
        "lkrun_job_memory_bytes",
        "gauge",
        "Sum of the resident memory (RSS) of the agent's running job processes, in bytes.",
    ),
    (
        "lkrun_inference_up",
        "gauge",
        "1 while the inference process of an agent environment (by interpreter) is up.",
    ),
    (
        "lkrun_inference_memory_bytes",
        "gauge",
        "Memory of the inference process of an agent environment, by interpreter and kind "
        "(rss, pss), in bytes.",
    ),
    (
        "lkrun_inference_requests_total",
        "counter",
        "Inference requests the inference process answered, by interpreter, method and "
        "result (ok or error).",
    ),
    (
        "lkrun_inference_request_seconds",
        "histogram",
        "Time the inference process took to answer a request (queue and run), in seconds.",
    ),
    (
        "lkrun_inference_restarts_total",
        "counter",
        "Times the inference process of an agent environment ended on its own (or failed to "
        "start) and was started again.",
    ),
]

_HELP = {name: help_text for name, _, help_text in METRIC_DOCS}

# A fixed set keeps label cardinality bounded whatever text the daemon passes.
DECLINE_REASONS = frozenset(
    {"rooms", "max_jobs", "cpu", "not_accepting", "error", "participant", "expired"}
)
# lkrun.recovery's causes and skip reasons (not imported: it imports this module).
RECOVERY_CAUSES = frozenset({"signal", "memory_limit", "raised", "exit", "start_failed", "lost"})
RECOVERY_SKIPS = frozenset(
    {
        "policy_off",
        "max_redispatches",
        "no_caller",
        "participant_left",
        "room_gone",
        "agent_present",
        "stopped",
        "error",
    }
)
FULL_REASONS = frozenset({"max_jobs", "cpu", "draining"})

# Answering an offer is in-process bookkeeping: sub-millisecond normally, 100 ms is already bad.
OFFER_ANSWER_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1)
# A local model answers in milliseconds (the turn detector's: tens); a queue makes seconds.
INFERENCE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)
# Warm starts should land in milliseconds, cold ones (interpreter + imports) in seconds.
OFFER_TO_ENTRYPOINT_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)


@dataclass(frozen=True)
class AgentSnapshot:
    agent: str
    up: bool
    jobs_running: int
    max_jobs: int
    idle_processes: int
    load: float
    job_memory_bytes: int


def _bool_label(value: bool) -> str:
    return "true" if value else "false"


class Metrics:
    """All of the daemon's metrics, in a registry of their own."""

    def __init__(self) -> None:
        # Our own registry, not the global one: tests and several daemons in one process
        # would otherwise collide on metric names.
        self.registry = CollectorRegistry()
        self._jobs_started = self._counter("lkrun_jobs_started_total", "agent", "warm")
        self._jobs_ended = self._counter("lkrun_jobs_ended_total", "agent", "status")
        self._offers = self._counter("lkrun_offers_total", "agent", "result")
        self._declines = self._counter("lkrun_offer_declines_total", "agent", "reason")
        self._reconnects = self._counter("lkrun_registration_reconnects_total", "agent")
        self._recoveries = self._counter("lkrun_recoveries_total", "agent", "cause")
        self._recoveries_skipped = self._counter(
            "lkrun_recoveries_skipped_total", "agent", "reason"
        )
        self._full = self._counter("lkrun_agent_full_seconds_total", "agent", "reason")
        self._offer_answer = self._histogram(
            "lkrun_offer_answer_seconds", OFFER_ANSWER_BUCKETS, "agent"
        )
        self._offer_to_entrypoint = self._histogram(
            "lkrun_offer_to_entrypoint_seconds", OFFER_TO_ENTRYPOINT_BUCKETS, "agent", "warm"
        )
        self._up = self._gauge("lkrun_registration_up")
        self._jobs_running = self._gauge("lkrun_jobs_running")
        self._jobs_max = self._gauge("lkrun_jobs_max")
        self._idle = self._gauge("lkrun_idle_processes")
        self._load = self._gauge("lkrun_agent_load")
        self._info = Gauge(
            "lkrun_daemon_info",
            _HELP["lkrun_daemon_info"],
            ["name", "version"],
            registry=self.registry,
        )
        self._memory = self._gauge("lkrun_job_memory_bytes")
        self._state_gauges = (
            self._up,
            self._jobs_running,
            self._jobs_max,
            self._idle,
            self._load,
            self._memory,
        )
        self._inference_up = Gauge(
            "lkrun_inference_up",
            _HELP["lkrun_inference_up"],
            ["interpreter"],
            registry=self.registry,
        )
        self._inference_memory = Gauge(
            "lkrun_inference_memory_bytes",
            _HELP["lkrun_inference_memory_bytes"],
            ["interpreter", "kind"],
            registry=self.registry,
        )
        self._inference_requests = self._counter(
            "lkrun_inference_requests_total", "interpreter", "method", "result"
        )
        self._inference_seconds = self._histogram(
            "lkrun_inference_request_seconds", INFERENCE_BUCKETS, "interpreter"
        )
        self._inference_restarts = self._counter("lkrun_inference_restarts_total", "interpreter")
        # Agents that currently have gauge series, so vanished ones can be removed.
        self._snapshot_agents: set[str] = set()
        # Two scrapes at once must not interleave their set-and-remove passes.
        self._snapshot_lock = threading.Lock()

    # Help strings come from METRIC_DOCS (KeyError if a metric is missing there).

    def _counter(self, name: str, *labels: str) -> Counter:
        # prometheus_client strips and re-adds "_total"; the exposed name is `name`.
        return Counter(name, _HELP[name], labels, registry=self.registry)

    def _histogram(self, name: str, buckets: tuple[float, ...], *labels: str) -> Histogram:
        return Histogram(name, _HELP[name], labels, buckets=buckets, registry=self.registry)

    def _gauge(self, name: str) -> Gauge:
        return Gauge(name, _HELP[name], ["agent"], registry=self.registry)

    # Events.

    def set_daemon(self, name: str, version: str) -> None:
        self._info.labels(name=name, version=version).set(1)

    def job_started(self, agent: str, warm: bool) -> None:
        self._jobs_started.labels(agent=agent, warm=_bool_label(warm)).inc()

    def job_ended(self, agent: str, status: str) -> None:
        # Only two ended statuses exist; anything but success counts as failed to bound labels.
        # (JobStatus is a str enum, so JobStatus.SUCCESS compares equal to "success".)
        label = "success" if status == "success" else "failed"
        self._jobs_ended.labels(agent=agent, status=label).inc()

    def was_full(self, agent: str, reason: str, seconds: float) -> None:
        label = reason if reason in FULL_REASONS else "other"
        self._full.labels(agent=agent, reason=label).inc(max(0.0, seconds))

    def offer_answered(self, agent: str, accepted: bool, seconds: float, reason: str = "") -> None:
        result = "accepted" if accepted else "declined"
        self._offers.labels(agent=agent, result=result).inc()
        if not accepted:
            label = reason if reason in DECLINE_REASONS else "other"
            self._declines.labels(agent=agent, reason=label).inc()
        self._offer_answer.labels(agent=agent).observe(seconds)

    def offer_to_entrypoint(self, agent: str, warm: bool, seconds: float) -> None:
        self._offer_to_entrypoint.labels(agent=agent, warm=_bool_label(warm)).observe(seconds)

    def registration_reconnected(self, agent: str) -> None:
        self._reconnects.labels(agent=agent).inc()

    def recovered(self, agent: str, cause: str) -> None:
        label = cause if cause in RECOVERY_CAUSES else "other"
        self._recoveries.labels(agent=agent, cause=label).inc()

    def recovery_skipped(self, agent: str, reason: str) -> None:
        label = reason if reason in RECOVERY_SKIPS else "other"
        self._recoveries_skipped.labels(agent=agent, reason=label).inc()

    def inference_request(self, interpreter: str, method: str, seconds: float, ok: bool) -> None:
        result = "ok" if ok else "error"
        self._inference_requests.labels(interpreter=interpreter, method=method, result=result).inc()
        self._inference_seconds.labels(interpreter=interpreter).observe(seconds)

    def inference_restarted(self, interpreter: str) -> None:
        self._inference_restarts.labels(interpreter=interpreter).inc()

    # State.

    def inference_state(self, interpreter: str, *, up: bool) -> None:
        self._inference_up.labels(interpreter=interpreter).set(1 if up else 0)
        if not up:
            for kind in ("rss", "pss"):
                self._inference_memory.labels(interpreter=interpreter, kind=kind).set(0)

    def inference_memory(self, interpreter: str, rss: int, pss: int) -> None:
        self._inference_memory.labels(interpreter=interpreter, kind="rss").set(rss)
        self._inference_memory.labels(interpreter=interpreter, kind="pss").set(pss)

    def inference_gone(self, interpreter: str) -> None:
        """Its process was stopped for good: its gauges go (the counters stay)."""
        for gauge, labels in (
            (self._inference_up, ((interpreter,),)),
            (self._inference_memory, ((interpreter, "rss"), (interpreter, "pss"))),
        ):
            for values in labels:
                with contextlib.suppress(KeyError):
                    gauge.remove(*values)

    def set_snapshot(self, agents: Iterable[AgentSnapshot]) -> None:
        """Set the per-agent gauges to the snapshot; drop the series of agents not in it."""
        with self._snapshot_lock:
            seen: set[str] = set()
            for snap in agents:
                seen.add(snap.agent)
                self._up.labels(agent=snap.agent).set(1 if snap.up else 0)
                self._jobs_running.labels(agent=snap.agent).set(snap.jobs_running)
                self._jobs_max.labels(agent=snap.agent).set(snap.max_jobs)
                self._idle.labels(agent=snap.agent).set(snap.idle_processes)
                self._load.labels(agent=snap.agent).set(snap.load)
                self._memory.labels(agent=snap.agent).set(snap.job_memory_bytes)
            for agent in self._snapshot_agents - seen:
                for gauge in self._state_gauges:
                    gauge.remove(agent)
            self._snapshot_agents = seen

    def render(self) -> tuple[bytes, str]:
        """The exposition body and its Content-Type."""
        return generate_latest(self.registry), CONTENT_TYPE


def metrics_handler(
    metrics: Metrics, snapshot: Callable[[], Iterable[AgentSnapshot]]
) -> Callable[[web.Request], Awaitable[web.Response]]:
    """An aiohttp GET /metrics handler that refreshes the gauges from snapshot() first."""

    async def handle(request: web.Request) -> web.Response:
        metrics.set_snapshot(snapshot())
        body, content_type = metrics.render()
        # web.Response(content_type=...) rejects a charset parameter; set the header whole.
        return web.Response(body=body, headers={"Content-Type": content_type})

    return handle
