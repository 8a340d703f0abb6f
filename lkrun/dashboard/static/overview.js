// Overview: each agent registration, as `lkrun status` shows it.
import { every, getJson, onStatus } from "./api.js";
import { el, jobHref, link, syncRows } from "./dom.js";

const FAILURES_EVERY_MS = 10000;

function registration(agent) {
  if (agent.retiring) return "retiring (finishing its jobs)";
  if (agent.connected) return "registered";
  return agent.last_error ? `connecting: ${agent.last_error}` : "connecting";
}

function entrypoint(agent) {
  return agent.app || agent.start_method || "";
}

function framework(agent) {
  const name = agent.framework || "";
  return agent.framework_version ? `${name} ${agent.framework_version}` : name;
}

function python(agent) {
  if (!agent.python) return "(its own program)";
  return agent.python_version ? `${agent.python} (${agent.python_version})` : agent.python;
}

function lastFailure(failure) {
  if (!failure) return el("span", { class: "muted" }, "none");
  return link(jobHref(failure.id), {}, failure.error);
}

function agentRow(agent, failures, phase) {
  const state = agent.full ? "FULL" : "AVAILABLE";
  const draining = agent.full_reason === "draining" || phase === "draining" || agent.retiring;
  return el(
    "tr",
    {
      testid: "agent-row",
      // One row per registration: a retiring one beside its agent's new one.
      "data-key": `${agent.agent}/${agent.retiring ? agent.worker_id : ""}`,
      "data-agent": agent.agent,
      "data-state": state,
      "data-full-reason": agent.full_reason,
      "data-jobs": agent.jobs,
      "data-max-jobs": agent.max_jobs,
      "data-draining": draining ? "true" : "false",
      "data-retiring": agent.retiring ? "true" : "false",
    },
    el("td", { testid: "agent-name" }, agent.agent),
    el("td", { testid: "agent-registration" }, registration(agent)),
    el("td", { class: state === "FULL" ? "full" : "ok" },
      el("span", { testid: "agent-state" }, state), " ",
      el("span", { testid: "agent-full-reason", class: "muted" }, agent.full_reason)),
    el("td", { testid: "agent-draining" }, draining ? "draining" : "no"),
    el("td", { testid: "agent-jobs" }, `${agent.jobs} / ${agent.max_jobs}`),
    el("td", { testid: "agent-load" }, Number(agent.load).toFixed(2)),
    el("td", { testid: "agent-idle" }, String(agent.idle_processes)),
    el("td", { testid: "agent-entrypoint" }, entrypoint(agent)),
    el("td", { testid: "agent-framework" }, framework(agent)),
    el("td", { testid: "agent-python" }, python(agent)),
    el("td", { testid: "agent-last-failure" }, lastFailure(failures.get(agent.agent))),
  );
}

const HEADINGS = [
  "Agent", "Registration", "State", "Draining", "Jobs", "Load", "Warm ready", "Entrypoint",
  "Framework", "Interpreter", "Last failure",
];

export function mount(main) {
  const body = el("tbody");
  const summary = el("p", { class: "muted" });
  main.append(
    el("h1", {}, "Agents"),
    summary,
    el("table", { class: "grid" },
      el("thead", {}, el("tr", {}, HEADINGS.map((h) => el("th", {}, h)))), body),
  );
  let failures = new Map();
  let status = null;
  const draw = () => {
    if (!status) return;
    syncRows(body, status.agents.map((a) => agentRow(a, failures, status.phase)), "data-key");
    const jobs = status.agents.reduce((n, a) => n + a.jobs, 0);
    summary.textContent =
      `${status.agents.length} agent registration(s), ${jobs} job(s) running, ` +
      `CPU ${(status.cpu * 100).toFixed(0)}%, manifest ${status.manifest}`;
    main.dataset.loaded = "true";
  };
  const stopStatus = onStatus((s) => {
    status = s;
    draw();
  });
  const stopFailures = every(FAILURES_EVERY_MS, async () => {
    const found = await getJson("/api/v1/history?status=failed,lost&limit=1");
    failures = new Map(found.counts.map((c) => [c.agent, c.last_failure]));
    draw();
  });
  return () => {
    stopStatus();
    stopFailures();
  };
}
