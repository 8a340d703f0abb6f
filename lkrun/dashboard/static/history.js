// History: ended jobs with filters, failures grouped by error text, counts per agent.
import { getJson } from "./api.js";
import { clock, el, jobHref, link } from "./dom.js";

const SINCE = [
  ["1h", "last hour", 3600],
  ["6h", "last 6 hours", 6 * 3600],
  ["24h", "last 24 hours", 86400],
  ["7d", "last 7 days", 7 * 86400],
  ["all", "all kept", 0],
];
const STATUSES = [
  ["", "any ended"],
  ["success", "success"],
  ["failed", "failed"],
  ["lost", "lost"],
  ["failed,lost", "failed or lost"],
];

function options(select, pairs, selected) {
  select.replaceChildren(...pairs.map(([value, label]) =>
    el("option", { value, selected: value === selected }, label)));
}

function historyRow(job) {
  return el(
    "tr",
    {
      testid: "history-row",
      "data-job-id": job.id,
      "data-status": job.status,
      "data-cause": job.cause || "",
      "data-agent": job.agent,
    },
    el("td", {}, link(jobHref(job.id), { testid: "history-link" }, job.id)),
    el("td", { testid: "history-agent" }, job.agent),
    el("td", { testid: "history-room" }, job.room),
    el("td", { testid: "history-status", class: job.status }, job.status),
    el("td", { testid: "history-cause" }, job.cause),
    el("td", { testid: "history-ended" }, clock(job.ended_at)),
    el("td", { testid: "history-error", class: job.error ? "error-text" : "" },
      job.error || job.stop_reason),
  );
}

function failureGroup(group) {
  return el(
    "li",
    { testid: "failure-group", "data-count": group.count },
    el("span", { testid: "failure-count", class: "count" }, `${group.count}×`), " ",
    el("span", { testid: "failure-error", class: "error-text" }, group.error), " ",
    el("span", { testid: "failure-agents", class: "muted" },
      `${group.agents.join(", ")}${group.causes.length ? ` (${group.causes.join(", ")})` : ""}`),
    " ", link(jobHref(group.last_job), {}, "latest"),
  );
}

function agentCount(count) {
  return el(
    "tr",
    {
      testid: "agent-count",
      "data-agent": count.agent,
      "data-total": count.total,
      "data-success": count.success,
      "data-failed": count.failed,
    },
    el("td", {}, count.agent),
    el("td", {}, String(count.total)),
    el("td", {}, String(count.success)),
    el("td", {}, String(count.failed)),
    el("td", {}, String(count.lost)),
  );
}

export function mount(main) {
  const params = new URLSearchParams(location.search);
  const agent = el("select", { testid: "history-filter-agent" });
  const status = el("select", { testid: "history-filter-status" });
  const room = el("input", {
    testid: "history-filter-room", type: "text", placeholder: "room (exact)",
    value: params.get("room") || "",
  });
  const since = el("select", { testid: "history-filter-since" });
  const apply = el("button", { type: "submit", testid: "history-apply" }, "Apply");
  options(agent, [["", "any agent"]], params.get("agent") || "");
  options(status, STATUSES, params.get("status") || "");
  options(since, SINCE.map(([v, label]) => [v, label]), params.get("since") || "24h");
  const form = el("form", { class: "filters" }, agent, status, room, since, apply);
  const matched = el("p", { class: "muted" });
  const body = el("tbody");
  const empty = el("p", { testid: "history-empty", class: "muted" }, "No ended job matches.");
  const groups = el("ul", { testid: "failure-groups", class: "groups" });
  const counts = el("tbody");
  main.append(
    el("h1", {}, "History"),
    form,
    el("div", { class: "columns" },
      el("section", {}, el("h2", {}, "Failures by error"), groups),
      el("section", {},
        el("h2", {}, "Jobs per agent"),
        el("table", { class: "grid", testid: "agent-counts" },
          el("thead", {}, el("tr", {}, ["Agent", "Ended", "Success", "Failed", "Lost"]
            .map((h) => el("th", {}, h)))),
          counts))),
    matched,
    empty,
    el("table", { class: "grid", testid: "history-table" },
      el("thead", {}, el("tr", {}, ["Job", "Agent", "Room", "Status", "Cause", "Ended",
        "Error or stop reason"].map((h) => el("th", {}, h)))),
      body),
  );

  let generation = 0;
  // The agent asked in the address: an option only once the history names the agents.
  let wanted = params.get("agent") || "";
  const load = async () => {
    const mine = ++generation;
    const query = new URLSearchParams();
    const chosen = agent.value || wanted;
    if (chosen) query.set("agent", chosen);
    if (status.value) query.set("status", status.value);
    if (room.value.trim()) query.set("room", room.value.trim());
    const seconds = SINCE.find(([v]) => v === since.value)?.[2] ?? 0;
    if (seconds) query.set("since", String(Date.now() / 1000 - seconds));
    const data = await getJson(`/api/v1/history?${query}`);
    if (mine !== generation) return; // a newer filter was applied meanwhile
    options(agent, [["", "any agent"], ...data.agents.map((a) => [a, a])], chosen);
    wanted = "";
    body.replaceChildren(...data.jobs.map(historyRow));
    groups.replaceChildren(...data.failures.map(failureGroup));
    if (!data.failures.length) groups.append(el("li", { class: "muted" }, "No failure."));
    counts.replaceChildren(...data.counts.map(agentCount));
    empty.hidden = data.jobs.length > 0;
    matched.textContent =
      `${data.matched} job(s) match` +
      (data.matched >= data.scanned_limit ? ` (the newest ${data.scanned_limit} counted)` : "") +
      (data.jobs.length < data.matched ? `; the newest ${data.jobs.length} are listed` : "");
    main.dataset.loaded = "true";
  };
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const shown = new URLSearchParams();
    for (const [key, input] of [["agent", agent], ["status", status], ["room", room],
      ["since", since]]) {
      if (input.value.trim()) shown.set(key, input.value.trim());
    }
    history.replaceState(null, "", `/history?${shown}`);
    main.dataset.loaded = "false";
    load().catch((error) => showLoadError(matched, error));
  });
  load().catch((error) => showLoadError(matched, error));
  return () => {
    generation += 1;
  };
}

function showLoadError(node, error) {
  node.textContent = `cannot read the history: ${error.message}`;
}
