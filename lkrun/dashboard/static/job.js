// One job: its timeline, outcome, metadata, recovery chain, and its log followed live.
import { ApiError, confirmAction, getJson, post, request, showResult } from "./api.js";
import { clock, el, jobHref, link, setText } from "./dom.js";

const EVERY_MS = 1000;
const LOG_TAIL = 1000;
const ACTIVE = new Set(["starting", "running", "stopping"]);

const STEPS = [
  ["timeline-offered", "offered", "offered_at"],
  ["timeline-assigned", "assigned", "accepted_at"],
  ["timeline-running", "running", "started_at"],
  ["timeline-ended", "ended", "ended_at"],
];

function field(label, testid) {
  const value = el("dd", { testid });
  return [el("dt", {}, label), value];
}

function since(job, at) {
  const first = job.offered_at || job.accepted_at;
  if (!at || !first) return "";
  return ` (+${((at - first) * 1000).toFixed(0)} ms)`;
}

// Reads the streamed log (the control API's follow) and appends one element per line.
async function followLog(jobId, box, state, signal) {
  state.dataset.following = "true";
  setText(state, "following");
  try {
    const url = `/api/v1/jobs/${encodeURIComponent(jobId)}/logs?follow=1&tail=${LOG_TAIL}`;
    const response = await request(url, { signal });
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let pending = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      pending += value;
      const lines = pending.split("\n");
      pending = lines.pop();
      const atBottom = box.scrollTop + box.clientHeight >= box.scrollHeight - 4;
      box.append(...lines.map((line) => el("div", { testid: "log-line" }, line)));
      if (atBottom) box.scrollTop = box.scrollHeight;
    }
    if (pending) box.append(el("div", { testid: "log-line" }, pending));
    setText(state, "the job ended: the whole log is shown");
  } catch (error) {
    if (signal.aborted) return;
    setText(state, `log not followed: ${error.message}`);
  } finally {
    state.dataset.following = "false";
  }
}

export function mount(main, jobId) {
  const status = el("span", { testid: "job-status", class: "status" });
  const killButton = el("button", { type: "button", class: "danger", testid: "kill-button" },
    "Stop (graceful)");
  const forceButton = el("button", { type: "button", class: "danger", testid: "force-kill-button" },
    "Kill now (force)");
  const timeline = el("ol", { testid: "job-timeline", class: "timeline" });
  const steps = STEPS.map(([testid, label]) => {
    const time = el("span");
    const item = el("li", { testid, "data-time": "" }, el("strong", {}, label), " ", time);
    timeline.append(item);
    return { item, time };
  });
  const details = el("dl", { class: "details" });
  const fields = {};
  for (const [label, testid] of [
    ["Agent", "job-agent"], ["Room", "job-room"], ["Participant", "job-participant"],
    ["Agent identity", "job-identity"], ["Dispatch", "job-dispatch"],
    ["Cause", "job-cause"], ["Stop reason", "job-stop-reason"], ["Error", "job-error"],
    ["Exit code", "job-exit-code"], ["Recovery", "job-recovery"], ["Metadata", "job-metadata"],
  ]) {
    const [dt, dd] = field(label, testid);
    details.append(dt, dd);
    fields[testid] = dd;
  }
  const chain = el("ol", { testid: "job-chain", class: "chain" });
  const logBox = el("div", { testid: "job-log", class: "log" });
  const logState = el("span", { testid: "job-log-state", class: "muted", "data-following": "false" });
  const notFound = el("p", { testid: "job-not-found", class: "error" }, `No job ${jobId}.`);
  notFound.hidden = true;
  main.append(
    el("h1", {}, "Job ", el("code", { testid: "job-id" }, jobId), " ", status),
    notFound,
    el("div", { class: "actions" }, killButton, forceButton),
    timeline,
    details,
    el("h2", {}, "Recovery chain"),
    chain,
    el("h2", {}, "Log ", logState),
    logBox,
  );
  let forceOffered = false;
  let timer = null;
  const aborter = new AbortController();

  const draw = (job, attempts) => {
    setText(status, job.status);
    status.dataset.status = job.status;
    STEPS.forEach(([, , key], i) => {
      steps[i].item.dataset.time = job[key] ? String(job[key]) : "";
      setText(steps[i].time, job[key] ? clock(job[key]) + since(job, job[key]) : "not yet");
      steps[i].item.classList.toggle("reached", Boolean(job[key]));
    });
    const values = {
      "job-agent": job.agent,
      "job-room": job.room,
      "job-participant": job.participant,
      "job-identity": job.identity,
      "job-dispatch": job.dispatch_id,
      "job-cause": job.cause,
      "job-stop-reason": job.stop_reason,
      "job-error": job.error,
      "job-exit-code": job.exit_code,
      "job-recovery": job.recovery,
      "job-metadata": job.metadata,
    };
    for (const [testid, value] of Object.entries(values)) {
      const empty = value === null || value === undefined || value === "";
      setText(fields[testid], empty ? "—" : value);
      fields[testid].classList.toggle("muted", empty);
    }
    fields["job-cause"].dataset.cause = job.cause || "";
    fields["job-error"].classList.toggle("error-text", Boolean(job.error));
    chain.replaceChildren(...attempts.map((a) =>
      el("li", {}, link(jobHref(a.id), {}, a.id), ` attempt ${a.attempt}: ${a.status}`,
        a.cause ? ` (${a.cause})` : "")));
    const active = ACTIVE.has(job.status);
    killButton.hidden = !active || job.status === "stopping";
    forceButton.hidden = !active || !(forceOffered || job.status === "stopping");
    main.dataset.loaded = "true";
    return active;
  };

  const refresh = async () => {
    let active = false;
    try {
      const found = await getJson(`/api/v1/jobs/${encodeURIComponent(jobId)}?lines=0`);
      active = draw(found.job, found.chain);
    } catch (error) {
      if (error instanceof ApiError && error.status === 404) {
        notFound.hidden = false;
        killButton.hidden = forceButton.hidden = true;
        main.dataset.loaded = "true";
        aborter.abort();
        return;
      }
      active = true; // try again
    }
    if (active && !aborter.signal.aborted) timer = setTimeout(refresh, EVERY_MS);
  };

  const kill = async (force) => {
    const question = force
      ? `Kill job ${jobId} now? Its process tree gets SIGKILL: no clean-up.`
      : `Stop job ${jobId}? It is asked to shut down, then killed after the shutdown timeout.`;
    if (!(await confirmAction(question))) return;
    try {
      const answer = await post(
        `/api/v1/jobs/${encodeURIComponent(jobId)}/kill${force ? "?force=1" : ""}`,
      );
      showResult(`job ${jobId}: ${answer.action}`, true);
      forceOffered = true;
    } catch (error) {
      showResult(`job ${jobId}: ${error.message}`, false);
    }
    clearTimeout(timer);
    refresh();
  };
  killButton.addEventListener("click", () => kill(false));
  forceButton.addEventListener("click", () => kill(true));
  killButton.hidden = forceButton.hidden = true;
  refresh();
  followLog(jobId, logBox, logState, aborter.signal);
  return () => {
    aborter.abort();
    clearTimeout(timer);
  };
}
