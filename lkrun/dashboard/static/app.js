// The dashboard's shell: the router, the daemon header, the drain action.
import { confirmAction, onStatus, pollStatus, post, showResult } from "./api.js";
import { byTestId, duration, setText } from "./dom.js";
import * as charts from "./charts.js";
import * as historyView from "./history.js";
import * as job from "./job.js";
import * as live from "./live.js";
import * as overview from "./overview.js";

function drawHeader(status) {
  setText(byTestId("daemon-name"), status.name);
  setText(byTestId("daemon-version"), status.version);
  setText(byTestId("daemon-uptime"), duration(status.uptime));
  setText(byTestId("daemon-url"), status.url);
  const phase = byTestId("daemon-phase");
  setText(phase, status.phase);
  phase.dataset.phase = status.phase;
  byTestId("drain-button").disabled = status.phase !== "serving";
  document.title = `lkrun: ${status.name}`;
}

async function drain() {
  const ok = await confirmAction(
    "Drain this daemon? It takes no new jobs, lets the running ones end (up to its " +
      "drain_timeout), then exits.",
  );
  if (!ok) return;
  try {
    const answer = await post("/api/v1/drain");
    showResult(`daemon ${answer.phase}`, true);
  } catch (error) {
    showResult(`drain refused: ${error.message}`, false);
  }
}

const VIEWS = [
  { pattern: /^\/$/, name: "overview", module: overview },
  { pattern: /^\/live$/, name: "live", module: live },
  { pattern: /^\/history$/, name: "history", module: historyView },
  { pattern: /^\/charts$/, name: "charts", module: charts },
  { pattern: /^\/jobs\/([^/]+)$/, name: "job", module: job },
];

let unmount = null;

function route() {
  if (unmount) unmount();
  unmount = null;
  const main = byTestId("view");
  main.replaceChildren();
  main.dataset.loaded = "false";
  const path = location.pathname;
  const found = VIEWS.find((view) => view.pattern.test(path));
  for (const a of document.querySelectorAll("nav a")) {
    a.classList.toggle("current", found !== undefined && a.getAttribute("href") === path);
  }
  if (!found) {
    main.dataset.view = "";
    main.append("No such view.");
    return;
  }
  main.dataset.view = found.name;
  const args = path.match(found.pattern).slice(1).map(decodeURIComponent);
  unmount = found.module.mount(main, ...args);
}

function navigate(href) {
  history.pushState(null, "", href);
  route();
}

// Links marked data-link change the view without a reload.
document.addEventListener("click", (event) => {
  const a = event.target.closest("a[data-link]");
  if (!a || event.ctrlKey || event.metaKey || event.shiftKey || event.button !== 0) return;
  event.preventDefault();
  navigate(a.getAttribute("href"));
});
window.addEventListener("popstate", route);
byTestId("drain-button").addEventListener("click", drain);
onStatus(drawHeader);
route();
pollStatus();
