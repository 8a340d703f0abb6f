// DOM helpers. Text always goes in as text nodes (textContent): nothing the daemon sends
// (room names, identities, error texts, log lines: participants and apps control them) is
// ever parsed as HTML: no markup string is ever handed to the DOM in the dashboard.

const SVG_NS = "http://www.w3.org/2000/svg";

function setAttributes(node, attrs) {
  for (const [key, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "testid") node.setAttribute("data-testid", value);
    else if (key === "on") {
      for (const [event, fn] of Object.entries(value)) node.addEventListener(event, fn);
    } else node.setAttribute(key, String(value));
  }
}

function appendAll(node, children) {
  for (const child of children.flat(Infinity)) {
    if (child === undefined || child === null || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  setAttributes(node, attrs);
  appendAll(node, children);
  return node;
}

export function svg(tag, attrs = {}, ...children) {
  const node = document.createElementNS(SVG_NS, tag);
  setAttributes(node, attrs);
  appendAll(node, children);
  return node;
}

export function setText(node, text) {
  node.textContent = text === undefined || text === null ? "" : String(text);
}

export function byTestId(id, root = document) {
  return root.querySelector(`[data-testid="${id}"]`);
}

export function duration(seconds) {
  if (seconds === null || seconds === undefined) return "";
  const s = Math.max(0, Math.round(seconds));
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m ${s % 60}s`;
  if (s < 86400) return `${Math.floor(s / 3600)}h ${Math.floor((s % 3600) / 60)}m`;
  return `${Math.floor(s / 86400)}d ${Math.floor((s % 86400) / 3600)}h`;
}

export function clock(epoch) {
  if (!epoch) return "";
  const d = new Date(epoch * 1000);
  const pad = (n, w = 2) => String(n).padStart(w, "0");
  const date = `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())}`;
  return `${date} ${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}.${pad(d.getMilliseconds(), 3)}`;
}

export function megabytes(mb) {
  return mb === null || mb === undefined ? "" : `${Number(mb).toFixed(1)} MB`;
}

export function jobHref(id) {
  return `/jobs/${encodeURIComponent(id)}`;
}

// A link the router follows without a reload.
export function link(href, attrs, ...children) {
  return el("a", { href, "data-link": "", ...attrs }, ...children);
}

// Makes `node` look like `fresh` (attributes, text, children) while keeping the elements
// that did not change: a view redrawn every second keeps its text selection, and the
// elements a test or a screen reader holds stay the same.
export function morph(node, fresh) {
  if (node.nodeType !== fresh.nodeType || node.nodeName !== fresh.nodeName) {
    node.replaceWith(fresh);
    return fresh;
  }
  if (node.nodeType === Node.TEXT_NODE) {
    if (node.nodeValue !== fresh.nodeValue) node.nodeValue = fresh.nodeValue;
    return node;
  }
  for (const { name } of [...node.attributes]) {
    if (!fresh.hasAttribute(name)) node.removeAttribute(name);
  }
  for (const { name, value } of [...fresh.attributes]) {
    if (node.getAttribute(name) !== value) node.setAttribute(name, value);
  }
  const old = [...node.childNodes];
  const next = [...fresh.childNodes];
  next.forEach((child, i) => {
    if (i < old.length) morph(old[i], child);
    else node.append(child);
  });
  for (const extra of old.slice(next.length)) extra.remove();
  return node;
}

// Puts `rows` (fresh elements) in `body`, each reusing the current row of the same key
// (the attribute `keyAttr`), in the given order.
export function syncRows(body, rows, keyAttr) {
  const current = new Map([...body.children].map((row) => [row.getAttribute(keyAttr), row]));
  const kept = rows.map((row) => {
    const found = current.get(row.getAttribute(keyAttr));
    return found ? morph(found, row) : row;
  });
  const same = kept.length === body.children.length && kept.every((row, i) => body.children[i] === row);
  if (!same) body.replaceChildren(...kept);
}
