// Charts drawn by hand in SVG (no library): jobs per agent and load over the last hour, from
// the daemon's own ring of 10 s samples, and the offer -> running latency distribution.
import { every, getJson } from "./api.js";
import { el, svg } from "./dom.js";

const EVERY_MS = 10000;
const W = 720;
const H = 220;
const PAD = { left: 44, right: 12, top: 24, bottom: 28 };
const COLOURS = 8; // CSS classes series-0 .. series-7

function frame(node, ymax, yLabel, xLabels) {
  const plotH = H - PAD.top - PAD.bottom;
  const parts = [];
  for (let i = 0; i <= 4; i += 1) {
    const y = PAD.top + plotH - (plotH * i) / 4;
    const value = (ymax * i) / 4;
    parts.push(svg("line", { x1: PAD.left, x2: W - PAD.right, y1: y, y2: y, class: "gridline" }));
    parts.push(svg("text", { x: PAD.left - 6, y: y + 4, class: "tick", "text-anchor": "end" },
      Number.isInteger(value) ? String(value) : value.toFixed(2)));
  }
  for (const [x, label] of xLabels) {
    parts.push(svg("text", { x, y: H - 8, class: "tick", "text-anchor": "middle" }, label));
  }
  parts.push(svg("text", { x: 4, y: 12, class: "axis" }, yLabel));
  node.replaceChildren(...parts);
}

// The x axis is the ring's whole span ending at the last sample: a daemon up for five
// minutes fills the right twelfth of the chart.
function lineChart(node, at, span, series, { ymax, label }) {
  node.setAttribute("viewBox", `0 0 ${W} ${H}`);
  node.dataset.points = String(at.length);
  const t1 = at[at.length - 1];
  const t0 = t1 - span;
  const plotW = W - PAD.left - PAD.right;
  const plotH = H - PAD.top - PAD.bottom;
  const x = (t) => PAD.left + ((t - t0) / span) * plotW;
  const y = (v) => PAD.top + plotH - (Math.min(v, ymax) / ymax) * plotH;
  const minutes = Math.round(span / 60);
  frame(node, ymax, label, [[x(t0), `-${minutes}m`], [x(t0 + span / 2), `-${minutes / 2}m`],
    [x(t1), "now"]]);
  series.forEach(({ name, values }, index) => {
    // A gap (null: the agent was not there) breaks the line.
    let d = "";
    let pen = "M";
    let last = null;
    values.forEach((v, i) => {
      if (v === null || v === undefined) {
        pen = "M";
        return;
      }
      d += `${pen}${x(at[i]).toFixed(1)},${y(v).toFixed(1)} `;
      pen = "L";
      last = [x(at[i]), y(v)];
    });
    const colour = `series-${index % COLOURS}`;
    node.append(svg("path", { d: d.trim(), class: `series ${colour}` }, svg("title", {}, name)));
    // The latest value as a dot: visible even while there is one sample only.
    if (last) {
      node.append(svg("circle", {
        cx: last[0].toFixed(1), cy: last[1].toFixed(1), r: 3, class: `dot ${colour}`,
      }, svg("title", {}, name)));
    }
  });
}

function legend(names) {
  return el("ul", { class: "legend" }, names.map((name, index) =>
    el("li", {}, el("span", { class: `swatch series-${index % COLOURS}` }), name)));
}

function barChart(node, latency) {
  node.setAttribute("viewBox", `0 0 ${W} ${H}`);
  node.dataset.points = String(latency.samples);
  const labels = [...latency.edges_ms.map((e) => `≤${e >= 1000 ? `${e / 1000}s` : `${e}ms`}`),
    `>${latency.edges_ms[latency.edges_ms.length - 1] / 1000}s`];
  const top = Math.max(1, ...latency.counts);
  const plotW = W - PAD.left - PAD.right;
  const plotH = H - PAD.top - PAD.bottom;
  const slot = plotW / latency.counts.length;
  frame(node, top, "jobs", labels.map((label, i) => [PAD.left + slot * (i + 0.5), label]));
  latency.counts.forEach((count, i) => {
    const h = (count / top) * plotH;
    node.append(svg("rect", {
      x: (PAD.left + slot * i + 3).toFixed(1), y: (PAD.top + plotH - h).toFixed(1),
      width: (slot - 6).toFixed(1), height: h.toFixed(1), class: "bar",
    }, svg("title", {}, `${labels[i]}: ${count}`)));
  });
}

function ms(value) {
  return value === null || value === undefined ? "–" : `${Number(value).toFixed(0)} ms`;
}

export function mount(main) {
  const jobs = svg("svg", { testid: "chart-jobs", class: "chart", role: "img" });
  const load = svg("svg", { testid: "chart-load", class: "chart", role: "img" });
  const latency = svg("svg", { testid: "chart-latency", class: "chart", role: "img" });
  const empty = el("p", { testid: "chart-empty", class: "muted" },
    "No samples yet: the daemon samples every 10 s.");
  const jobsLegend = el("div");
  const loadLegend = el("div");
  const latencyNote = el("p", { class: "muted" });
  main.append(
    el("h1", {}, "Charts"),
    empty,
    el("h2", {}, "Running jobs per agent, last hour"), jobsLegend, jobs,
    el("h2", {}, "Load per agent (what it reports to LiveKit), and the machine's CPU"),
    loadLegend, load,
    el("h2", {}, "Offer → running latency, jobs of the last hour"), latencyNote, latency,
  );
  return every(EVERY_MS, async () => {
    const data = await getJson("/api/v1/charts");
    const { at, agents, cpu } = data.samples;
    const names = Object.keys(agents);
    empty.hidden = at.length > 0;
    if (at.length) {
      const jobSeries = names.map((name) => ({ name, values: agents[name].jobs }));
      const most = Math.max(1, ...jobSeries.flatMap((s) => s.values.filter((v) => v !== null)),
        ...names.flatMap((n) => agents[n].max_jobs.filter((v) => v !== null)));
      lineChart(jobs, at, data.samples.span, jobSeries, { ymax: most, label: "jobs" });
      jobsLegend.replaceChildren(legend(names));
      const loadSeries = [...names.map((name) => ({ name, values: agents[name].load })),
        { name: "CPU", values: cpu }];
      lineChart(load, at, data.samples.span, loadSeries, { ymax: 1, label: "load" });
      loadLegend.replaceChildren(legend([...names, "CPU"]));
    }
    const l = data.latency;
    latencyNote.textContent =
      `${l.samples} job(s); p50 ${ms(l.p50_ms)}, p95 ${ms(l.p95_ms)}, max ${ms(l.max_ms)}`;
    barChart(latency, l);
    main.dataset.loaded = "true";
  });
}
