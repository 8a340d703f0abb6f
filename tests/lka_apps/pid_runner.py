"""A local-model plugin in the shape of livekit-plugins-turn-detector, with no model.

It is written against the framework's runner API the way that plugin is: a runner class
(``_InferenceRunner`` with an ``INFERENCE_METHOD``, ``initialize()`` and ``run()``)
registered on import, and a model object that a job builds and that calls the runner
through ``get_job_context().inference_executor``. Its answer proves who answered: the pid
and interpreter of the process that ran it, how many requests that process has run, and
whether its ``initialize()`` ran there.

``run()`` takes a JSON object: ``{"text": ...}`` is echoed back; ``{"sleep": seconds}``
holds the answer that long (a request in flight, for the tests), after writing the pid to the
file ``"mark"`` names if given; ``{"until": path}`` holds it until that file exists (at most
a minute); ``{"fail": "why"}`` raises.
``LKRUN_TEST_RUNNER_INIT_SECONDS`` in the inference process's environment makes
``initialize()`` take that long (a model that loads slowly).
"""

from __future__ import annotations

import itertools
import json
import os
import sys
import threading
import time
from typing import Any

from livekit.agents.inference_runner import _InferenceRunner
from livekit.agents.ipc.inference_executor import InferenceExecutor
from livekit.agents.job import get_job_context

METHOD = "lkrun_test_pid"


class PidRunner(_InferenceRunner):
    INFERENCE_METHOD = METHOD

    def initialize(self) -> None:
        time.sleep(float(os.environ.get("LKRUN_TEST_RUNNER_INIT_SECONDS") or 0))
        self._initialized_in = os.getpid()
        self._counter = itertools.count(1)
        self._lock = threading.Lock()  # run() is called from a pool of threads

    def run(self, data: bytes) -> bytes | None:
        request = json.loads(data)
        if "fail" in request:
            raise ValueError(str(request["fail"]))
        if "mark" in request:  # says the request has arrived before it sleeps
            with open(request["mark"], "w") as mark:
                mark.write(str(os.getpid()))
        time.sleep(float(request.get("sleep", 0)))
        deadline = time.monotonic() + 60
        while "until" in request and not os.path.exists(request["until"]):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{request['until']} never came")
            time.sleep(0.01)
        with self._lock:
            count = next(self._counter)
        answer = {
            "pid": os.getpid(),
            "python": sys.executable,
            "count": count,
            "initialized_here": self._initialized_in == os.getpid(),
            "text": request.get("text"),
        }
        return json.dumps(answer).encode()


_InferenceRunner.register_runner(PidRunner)


class PidModel:
    """What a job uses, as the turn detector's EnglishModel is used."""

    def __init__(self, inference_executor: InferenceExecutor | None = None) -> None:
        self._executor = inference_executor or get_job_context().inference_executor

    async def ask(self, request: dict[str, Any]) -> dict[str, Any]:
        result = await self._executor.do_inference(METHOD, json.dumps(request).encode())
        assert result is not None
        answer: dict[str, Any] = json.loads(result)
        return answer
