// Live calls: the running jobs, read every second (no reload).
import { every, getJson } from "./api.js";
import { duration, el, jobHref, link, megabytes, syncRows } from "./dom.js";

const EVERY_MS = 1000;

function recovered(job) {
  if (!job.recovered_from) return "no";
  return `yes: attempt ${job.attempt}, after ${job.recovered_from}`;
}

function row(job) {
  return el(
    "tr",
    { testid: "live-row", "data-job-id": job.id, "data-status": job.status },
    el("td", {}, link(jobHref(job.id), { testid: "live-link" }, job.id)),
    el("td", { testid: "live-agent" }, job.agent),
    el("td", { testid: "live-room" }, job.room),
    // The participant a publisher or participant job is about; a room job has none.
    el("td", { testid: "live-participant" }, job.participant || "—"),
    el("td", { testid: "live-status" }, job.status),
    el("td", { testid: "live-age" }, duration(job.age)),
    el("td", { testid: "live-memory" }, megabytes(job.memory_mb)),
    el("td", { testid: "live-cpu" }, `${Number(job.cpu_percent || 0).toFixed(0)}%`),
    el("td", { testid: "live-recovered", "data-recovered": job.recovered_from ? "true" : "false" },
      recovered(job)),
  );
}

const HEADINGS = [
  "Job", "Agent", "Room", "Participant", "Status", "Age", "Memory (tree)", "CPU", "Recovered",
];

export function mount(main) {
  const count = el("span", { testid: "live-count", "data-count": "0" }, "0");
  const empty = el("p", { testid: "live-empty", class: "muted" }, "No job is running.");
  const body = el("tbody");
  main.append(
    el("h1", {}, "Live calls ", el("small", { class: "muted" }, "(", count, " running)")),
    empty,
    el("table", { class: "grid", testid: "live-table" },
      el("thead", {}, el("tr", {}, HEADINGS.map((h) => el("th", {}, h)))), body),
  );
  return every(EVERY_MS, async () => {
    const { jobs } = await getJson("/api/v1/jobs");
    syncRows(body, jobs.map(row), "data-job-id");
    count.textContent = String(jobs.length);
    count.dataset.count = String(jobs.length);
    empty.hidden = jobs.length > 0;
    main.dataset.loaded = "true";
  });
}
