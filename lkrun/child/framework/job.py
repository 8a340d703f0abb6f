"""One job of a livekit-agents app, run with the framework's own JobContext.

It does what the official job process does (``ipc/job_proc_lazy_main.py`` in livekit-agents
1.8): a plain ``rtc.Room``, a ``RunningJobInfo``, the ``JobContext`` behind
``get_job_context()``, and the per-job HTTP session that plugins use. The job ends when the
room disconnects, when the app calls ``ctx.shutdown()``, when the daemon asks (drain
timeout, ``lkrun jobs kill``, a LiveKit termination), or when the entrypoint raises (the
job then FAILS with the error text, where the official worker reports a success). The
shutdown order is the framework's: the entrypoint is given a moment to return, the primary
AgentSession is closed, ``on_session_end`` runs, the room disconnects, then the shutdown
callbacks run.

What differs: an entrypoint that returns without connecting and without starting an
AgentSession ends the job (the official worker keeps the process until a shutdown), and an
entrypoint still running ``ENTRY_GRACE`` seconds after a shutdown request is cancelled
(the official worker waits 15 s, longer than lkrun's default shutdown_timeout).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import functools
import logging
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

from google.protobuf.json_format import ParseDict
from google.protobuf.message import DecodeError
from livekit import rtc
from livekit.agents.job import (
    JobAcceptArguments,
    JobContext,
    JobExecutorType,
    JobProcess,
    RunningJobInfo,
    _JobContextVar,
)
from livekit.agents.utils import http_context
from livekit.protocol import agent as proto

from lkrun.child.appkind import JobResult, call
from lkrun.child.framework import compat
from lkrun.child.framework.inference import NoInference, close_executor, executor_for_job
from lkrun.context import is_company, room_gone
from lkrun.shared import empty_room
from lkrun.shared.jobpipe import RoomGone
from lkrun.shared.tasks import BackgroundTasks
from lkrun.shared.text import describe


class HostedApp(Protocol):
    """What a job needs of its app (lkrun.child.framework.app.FrameworkApp): typed by shape,
    so that this module and the app's do not import each other."""

    entrypoint_fnc: Callable[..., Any]
    session_end_fnc: Callable[..., Any] | None
    session_end_timeout: float
    proc: JobProcess | None

    def take_spare(self) -> JobContext | None: ...


ENTRY_GRACE = 5.0  # after a shutdown request, before a still running entrypoint is cancelled
SESSION_CLOSE_TIMEOUT = 60.0  # the official worker's bound on AgentSession.aclose()
DRAINING_ATTRIBUTE = "lkrun.draining"
JOB_ID_ATTRIBUTE = "lkrun.job_id"


def running_job_info(start: Mapping[str, Any]) -> RunningJobInfo:
    """The framework's RunningJobInfo from lkrun's start message."""
    job = parse_job(start)
    accept = JobAcceptArguments(
        name=str(start.get("name", "")),
        identity=str(start["identity"]),
        metadata=str(start.get("metadata", "")),
        attributes=dict(start.get("attributes") or {}),
    )
    values: dict[str, Any] = {
        "accept_arguments": accept,
        "job": job,
        "url": start["url"],
        "token": start["token"],
        "worker_id": str(start.get("worker_id", "")),
        "fake_job": False,
        # The dispatch timeline, where this framework version keeps one.
        "received_at": float(start.get("received_at") or 0.0),
        "accepted_at": float(start.get("accepted_at") or 0.0),
        "assigned_at": float(start.get("assigned_at") or 0.0),
        "launched_at": time.time(),
    }
    known = compat.running_job_info_fields()
    return RunningJobInfo(**{k: v for k, v in values.items() if k in known})


def parse_job(start: Mapping[str, Any]) -> proto.Job:
    """The start's job: from its protobuf bytes when the daemon sent them (``job_pb``, a few
    microseconds), else from protobuf's JSON mapping (``job``, half a millisecond)."""
    packed = start.get("job_pb")
    if isinstance(packed, str):
        try:
            return proto.Job.FromString(base64.b64decode(packed, validate=True))
        except (binascii.Error, DecodeError, ValueError):  # not ours after all: the JSON says it
            pass
    return ParseDict(start["job"], proto.Job(), ignore_unknown_fields=True)


def warm_up_job_path(proc: JobProcess) -> JobContext | None:
    """The context this process's job will use, built while it waits for that job: building
    one takes the better part of a millisecond, and the first one after a fork pays for
    pages copied on write and first-use caches too, none of which should fall between the
    offer and the entrypoint (benchmarks/issue20-offer-prep). None if it cannot be built:
    the job then builds its own."""
    try:
        return spare_context(proc)
    except Exception as exc:  # only a head start: the real job reports its own errors
        logging.getLogger("lkrun.child.framework").debug("job warm-up failed: %r", exc)
        return None


def spare_context(proc: JobProcess) -> JobContext:
    """A JobContext for no job yet (adopt makes it one's), built as a job's is, but without
    the temporary directory its constructor made (removed at once; adopt makes the job's):
    only a job's clean-up removes it, and a warm process discarded without a job (a reload,
    a fork server replaced, the daemon stopping) ends with os._exit, which would leave it
    behind."""
    info = running_job_info(
        {
            "job": {"id": "warm-up", "room": {"name": "warm-up"}},
            "url": "",
            "token": "",
            "identity": "warm-up",
        }
    )
    ctx = new_context(proc, info, on_connect=_nothing, on_shutdown=_nothing)
    ctx._tempdir.cleanup()  # its name stays, for adopt to tell the session directory by
    return ctx


def new_context(
    proc: JobProcess,
    info: RunningJobInfo,
    *,
    on_connect: Callable[[], None],
    on_shutdown: Callable[[str], None],
) -> JobContext:
    room = rtc.Room()
    with contextlib.suppress(AttributeError):  # room.name before connect, as officially
        room._info.name = info.job.room.name
    return JobContext(
        proc=proc,
        info=info,
        room=room,
        on_connect=on_connect,
        on_shutdown=on_shutdown,
        # The agent env's shared inference process, when the agent's code registers
        # inference runners (lkrun.child.framework.inference); it connects at first use.
        inference_executor=executor_for_job(),
    )


def adopt(
    ctx: JobContext,
    info: RunningJobInfo,
    *,
    on_connect: Callable[[], None],
    on_shutdown: Callable[[str], None],
) -> JobContext:
    """The spare context made the job's: what its constructor takes from a job, set as the
    constructor sets it (compat.INSTANCE_ATTRIBUTES names them)."""
    ctx._info, ctx._on_connect, ctx._on_shutdown = info, on_connect, on_shutdown
    _new_tempdir(ctx)
    # Optional (not in INSTANCE_ATTRIBUTES): only the framework versions that redact have it.
    if hasattr(ctx, _REDACTION):
        setattr(ctx, _REDACTION, info.job.enable_redaction)
    with contextlib.suppress(AttributeError):  # room.name before connect, as officially
        ctx.room._info.name = info.job.room.name
    return ctx


_REDACTION = "_redaction_enabled"  # JobContext's, set from its job's enable_redaction
_SESSION_DIRECTORY = "_session_directory"  # JobContext's: its tempdir's, unless the console's


def _new_tempdir(ctx: JobContext) -> None:
    """The job's temporary directory, in place of the one spare_context removed, and the
    session directory with it where it was that one (the framework's console has its own)."""
    removed = ctx._tempdir
    ctx._tempdir = tempfile.TemporaryDirectory()
    if getattr(ctx, _SESSION_DIRECTORY, None) == Path(removed.name):
        setattr(ctx, _SESSION_DIRECTORY, Path(ctx._tempdir.name))


def _nothing(*args: Any) -> None:
    pass


# Imported lazily by the framework on every job's path (AgentActivity._setup_toolsets in
# 1.8): imported in the fork server instead, each job finds it there (measured with
# tests/bench/cow_probe.py: the one module a job of the agents workload imported).
LAZY_MODULES = ("livekit.agents.llm.async_toolset",)


def rehearse_in_fork_server() -> bool:
    """In the fork server, before it freezes and forks: fill the lazy caches every job would
    otherwise fill after the fork, writing to (and so copying) the fork server's pages.

    - pydantic computes, on a model's first instance, whether each private attribute's
      default_factory takes the validated data: ``inspect.signature`` of a builtin factory
      copies ``sys.modules``, which writes the reference count of every module object
      (measured: every module object's page copied in each job);
    - the framework's lazily imported modules (``LAZY_MODULES``);
    - an AgentSession, an Agent and a ChatContext built and dropped. An AgentSession takes
      the current event loop when given none (``asyncio.get_event_loop()``: with no loop
      running, 3.10 and 3.11 create one and install it, an epoll fd and a socketpair every
      forked job would inherit; 3.12 warns; 3.14 raises): it is given a loop of its own,
      closed at once, and none is left installed. No thread: safe before fork.

    False if the AgentSession part failed (a warning says why, on the fork server's stderr,
    which the daemon relays): each job then fills those caches itself.
    """
    import importlib

    from pydantic import BaseModel

    for name in LAZY_MODULES:
        with contextlib.suppress(ImportError):
            importlib.import_module(name)
    seen: set[type] = set()
    pending: list[type] = [BaseModel]
    while pending:
        cls = pending.pop()
        for sub in cls.__subclasses__():
            if sub not in seen:
                seen.add(sub)
                pending.append(sub)
        private = getattr(cls, "__private_attributes__", None)
        for attr in private.values() if isinstance(private, dict) else ():
            with contextlib.suppress(Exception):  # a cache filled early, nothing more
                attr.default_factory_takes_validated_data  # noqa: B018
    try:
        _rehearse_a_session()
    except Exception as exc:  # only a rehearsal: the jobs report their own errors
        logging.getLogger("lkrun.child.framework").warning(
            "lkrun: the fork server's rehearsal of a job failed (each job pays for it, "
            "about 6 MB of PSS): %s",
            describe(exc),
        )
        return False
    return True


def _rehearse_a_session() -> None:
    """An AgentSession, an Agent and a ChatContext built and dropped on a loop of their own:
    given to the AgentSession (every version lkrun hosts takes ``loop=``) and installed while
    they are built, in case something asks for the current loop instead; closed after, and
    none left installed (a job's asyncio.run installs its own)."""
    from livekit.agents import Agent, AgentSession, llm

    loop = asyncio.new_event_loop()
    try:
        asyncio.set_event_loop(loop)
        chat = llm.ChatContext()
        chat.add_message(role="user", content="rehearsal")
        AgentSession(loop=loop)
        Agent(instructions="rehearsal", chat_ctx=chat)
    finally:
        asyncio.set_event_loop(None)
        loop.close()


def throwaway_context(proc: JobProcess) -> JobContext:
    """A JobContext for no job, built as a real job's is (its tempdir is the caller's to
    clean up)."""
    info = running_job_info(
        {
            "job": {"id": "warm-up", "room": {"name": "warm-up"}},
            "url": "",
            "token": "",
            "identity": "warm-up",
        }
    )
    return JobContext(
        proc=proc,
        info=info,
        room=rtc.Room(),
        on_connect=_nothing,
        on_shutdown=_nothing,
        inference_executor=NoInference(),
    )


@functools.cache
def missing_job_attributes() -> list[str]:
    """The attributes lkrun reads off a JobContext (compat.INSTANCE_ATTRIBUTES) that this
    version's lacks, found on a throwaway one: they are set in its __init__, so NEEDED cannot
    name them, and a job would fail only when it shuts down.

    For the import check only: it needs an event loop (rtc.Room) and takes milliseconds, which
    a fork server must not have before it forks and a job should not spend before its job.
    """

    async def probe() -> list[str]:
        proc = JobProcess(
            executor_type=JobExecutorType.PROCESS, user_arguments=None, http_proxy=None
        )
        try:
            ctx = throwaway_context(proc)
        except Exception as exc:  # its constructor changed
            return [f"livekit.agents.job.JobContext as lkrun builds it ({describe(exc)})"]
        try:
            return compat.missing_attributes(ctx)
        finally:
            if (tempdir := getattr(ctx, "_tempdir", None)) is not None:
                tempdir.cleanup()

    return asyncio.run(probe())


class FrameworkJob:
    def __init__(self, app: HostedApp, start: Mapping[str, Any], logger: logging.Logger):
        self.app = app
        self.log = logger
        self.info = running_job_info(start)
        self.error = ""
        self.room_gone: RoomGone | None = None  # the daemon's to clean up (see _check_room)
        self.cause = ""  # why it ended, for the daemon: empty_room.CAUSE
        self.empty_timeout = empty_room.timeout_from_start(start)  # 0: off
        self._empty: empty_room.EmptyRoomWatch | None = None
        self.ctx: JobContext | None = None
        self._stopped: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._connected = False
        self._draining = False
        self._background = BackgroundTasks()

    # -- what the runner calls -------------------------------------------------------------

    def shutdown(self, reason: str) -> None:
        self._stop(reason)

    def drain(self) -> None:
        """The daemon is draining: mark the agent participant so the app and clients see it."""
        if self._draining:
            return
        self._draining = True
        self.log.info("the daemon is draining: finish the session; no new jobs will come")
        if self._connected:
            self._set_attribute(DRAINING_ATTRIBUTE, "true")

    async def run(self, grace: Callable[[], float]) -> JobResult:
        app = self.app
        assert app.proc is not None, "prepare() runs before any job"
        # The context built while the process waited (warm_up_job_path), else a new one.
        if (spare := app.take_spare()) is not None:
            ctx = adopt(spare, self.info, on_connect=self._on_connect, on_shutdown=self._shut)
        else:
            ctx = new_context(
                app.proc, self.info, on_connect=self._on_connect, on_shutdown=self._shut
            )
        self.ctx = ctx
        room = ctx.room
        room.on("disconnected", lambda *args: self._stop("room disconnected"))
        # livekit-rtc 1.1 sometimes changes the state without the "disconnected" event.
        room.on("connection_state_changed", self._on_connection_state)
        ctx._on_setup()
        token = _JobContextVar.set(ctx)
        http_context._new_session_ctx()
        reason = ""
        try:
            if self._stopped.done():  # stopped before it began: no entrypoint to run
                reason = self._stopped.result()
            else:
                entry = asyncio.create_task(_call_entry(app.entrypoint_fnc, ctx), name="entry")
                entry.add_done_callback(self._entry_done)
                reason = await self._stopped
                await self._shut_down(ctx, entry, reason, grace)
        finally:
            await self._clean_up(ctx, grace())
            _JobContextVar.reset(token)
        return JobResult(
            ok=not self.error,
            error=self.error,
            reason=reason,
            room_gone=self.room_gone,
            cause=self.cause,
        )

    async def _clean_up(self, ctx: JobContext, timeout: float) -> None:
        """What the official job process does after the shutdown, each step bounded."""
        if self._empty is not None:
            self._empty.close()
        leftovers = [*getattr(ctx, "_pending_tasks", ()), *self._background]
        for task in leftovers:
            task.cancel()
        await asyncio.gather(*leftovers, return_exceptions=True)
        for what, step in (
            ("the job context's cleanup", lambda: compat.cleanup_job(ctx)),
            ("closing the job's HTTP session", http_context._close_http_ctx),
            ("closing its inference connection", lambda: close_executor(ctx.inference_executor)),
        ):
            try:
                await asyncio.wait_for(step(), timeout)
            except Exception as exc:
                self.log.warning("%s failed: %s", what, describe(exc))

    # -- the job's life ----------------------------------------------------------------------

    def _shut(self, reason: str) -> None:
        """``ctx.shutdown()``: the app ends its job."""
        self._stop(reason or "user requested")

    def _stop(self, reason: str) -> None:
        if not self._stopped.done():
            self._stopped.set_result(reason)

    def _on_connection_state(self, state: int) -> None:
        if state == rtc.ConnectionState.CONN_DISCONNECTED and self._connected:
            self._stop("room disconnected")

    def _on_connect(self) -> None:
        if self._stopped.done():
            # A connect that completed after the job was told to stop (its clean-up may be
            # over already): nothing to watch or announce, and nothing would close it.
            return
        self._connected = True
        self._background.spawn(self._check_room())
        if self.empty_timeout > 0 and self.ctx is not None:
            # The framework calls this once its room has joined: the job is in the room.
            self._empty = empty_room.EmptyRoomWatch(
                self.ctx.room, self.empty_timeout, self._room_empty, self.log, is_company
            )
            self._empty.start()
        # Besides telling clients which job serves them, an attribute change makes LiveKit
        # announce the agent at once instead of in its next 3-second batch.
        self._set_attribute(JOB_ID_ATTRIBUTE, self.info.job.id)
        if self._draining:
            self._set_attribute(DRAINING_ATTRIBUTE, "true")

    async def _check_room(self) -> None:
        """Leave at once a room that is not the one assigned: it was deleted, and the join
        made it anew (the framework's connect gives no way to refuse it before)."""
        assert self.ctx is not None
        room, job = self.ctx.room, self.info.job
        if gone := await room_gone(room, job.room.name, job.room.sid, self.log):
            self.error, self.room_gone = str(gone), gone
            self._stop(str(gone))  # before the disconnect, whose own reason would come first
            try:
                await room.disconnect()
            except Exception as exc:
                self.log.warning("disconnecting from the room failed: %s", describe(exc))

    def _room_empty(self) -> None:
        if not self._stopped.done():  # only when it is why the job ends
            self.cause = empty_room.CAUSE
            self._stop(empty_room.REASON)

    def _set_attribute(self, key: str, value: str) -> None:
        assert self.ctx is not None
        local = self.ctx.room.local_participant

        async def update() -> None:
            try:
                await asyncio.wait_for(local.set_attributes({key: value}), 5)
            except Exception as exc:  # e.g. no can_update_metadata permission
                self.log.debug("could not set the %s attribute: %r", key, exc)

        self._background.spawn(update())

    def _entry_done(self, task: asyncio.Task[Any]) -> None:
        if task.cancelled():
            return
        if (exc := task.exception()) is not None:
            self.log.error("entrypoint failed", exc_info=exc)
            self.error = self.error or describe(exc)  # e.g. a room gone, which made it raise
            self._stop(f"entrypoint failed: {self.error}")
            return
        ctx = self.ctx
        if ctx is not None and not self._connected and ctx._primary_agent_session is None:
            self._stop("entrypoint returned without connecting")

    async def _shut_down(
        self, ctx: JobContext, entry: asyncio.Task[Any], reason: str, grace: Callable[[], float]
    ) -> None:
        """The official order: entrypoint, session, on_session_end, disconnect, callbacks."""
        if not entry.done():
            try:
                await asyncio.wait_for(asyncio.shield(entry), ENTRY_GRACE)
            except asyncio.TimeoutError:
                self.log.warning(
                    "entrypoint still running %gs after shutdown; cancelling", ENTRY_GRACE
                )
                entry.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await entry
            except Exception:  # _entry_done has recorded it
                pass
        if (session := ctx._primary_agent_session) is not None:
            try:
                await asyncio.wait_for(session.aclose(), SESSION_CLOSE_TIMEOUT)
            except Exception:
                self.log.exception("closing the AgentSession failed")
        if self.app.session_end_fnc is not None:
            try:
                await asyncio.wait_for(self.app.session_end_fnc(ctx), self.app.session_end_timeout)
            except Exception:
                self.log.exception("on_session_end failed")
        try:
            await ctx._on_session_end()
        except Exception:
            self.log.exception("the framework's session-end step failed")
        try:
            await asyncio.wait_for(ctx.room.disconnect(), grace())
        except Exception as exc:
            self.log.warning("disconnecting from the room failed: %s", describe(exc))
        await self._run_shutdown_callbacks(ctx, reason, grace())

    async def _run_shutdown_callbacks(self, ctx: JobContext, reason: str, timeout: float) -> None:
        # Together, as the official job process runs them; a sync one is tolerated too.
        tasks = [asyncio.ensure_future(call(cb, reason)) for cb in ctx._shutdown_callbacks]
        if not tasks:
            return
        done, pending = await asyncio.wait(tasks, timeout=timeout)
        for task in done:
            if not task.cancelled() and (exc := task.exception()) is not None:
                self.log.error("shutdown callback failed", exc_info=exc)
        if pending:
            self.log.warning("shutdown callbacks still running after %.1fs; going on", timeout)
            for task in pending:
                task.cancel()


async def _call_entry(entrypoint: Callable[..., Any], ctx: JobContext) -> None:
    await entrypoint(ctx)
