// trafficmgr dashboard: polls the control plane's /debug/dashboard/data every 2 s and draws it.
// Safety rule: every string from the data reaches the page through textContent or setAttribute (never
// innerHTML), and a link is made only from an http(s) URL, so a label value or an event message cannot
// inject markup or script.
"use strict";

(function () {
  const POLL_MS = 2000;
  const TIMEOUT_MS = 5000;
  // Relative to the page (/dashboard/): works on the admin endpoint and behind `trafficmgr dashboard`.
  const DATA_URL = new URL("../debug/dashboard/data", window.location.href).toString();
  const SVG = "http://www.w3.org/2000/svg";
  const TYPES = [["clusters", "CDS"], ["endpoints", "EDS"], ["listeners", "LDS"], ["routes", "RDS"], ["secrets", "SDS"]];

  let lastGood = null; // time (ms) of the last successful fetch

  // -- DOM helpers (text only) ----------------------------------------------------------------------
  function el(tag, attrs) {
    const node = document.createElement(tag);
    if (attrs) {
      for (const [k, v] of Object.entries(attrs)) {
        if (v !== null && v !== undefined) node.setAttribute(k, String(v));
      }
    }
    for (let i = 2; i < arguments.length; i++) append(node, arguments[i]);
    return node;
  }
  function svg(tag, attrs) {
    const node = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
    for (let i = 2; i < arguments.length; i++) append(node, arguments[i]);
    return node;
  }
  function append(node, child) {
    if (child === null || child === undefined || child === false) return;
    if (Array.isArray(child)) { child.forEach((c) => append(node, c)); return; }
    node.appendChild(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  function text(v) { return v === null || v === undefined ? "" : String(v); }
  function noData() { return el("span", { class: "nodata" }, "no data yet"); }
  function fillBody(table, rows, columns, emptyText) {
    const body = document.querySelector(table + " tbody");
    const fresh = document.createElement("tbody");
    if (!rows.length) fresh.appendChild(el("tr", null, el("td", { colspan: columns, class: "muted" }, emptyText)));
    rows.forEach((r) => fresh.appendChild(r));
    body.replaceWith(fresh);
  }

  // -- number formats (null: no data yet, never a made-up number) -----------------------------------
  function isNum(v) { return typeof v === "number" && isFinite(v); }
  function rate(v) { return isNum(v) ? el("span", null, (v >= 100 ? v.toFixed(0) : v.toFixed(2)) + " req/s") : noData(); }
  function errors(v) {
    if (!isNum(v)) return noData();
    return el("span", v > 0 ? { class: "bad" } : null, (v * 100).toFixed(v > 0 && v < 0.01 ? 2 : 1) + " %");
  }
  function ms(v) { return isNum(v) ? el("span", null, (v >= 100 ? v.toFixed(0) : v.toFixed(1)) + " ms") : noData(); }
  function clock(unix) {
    if (!isNum(unix)) return "";
    const d = new Date(unix * 1000);
    return d.toLocaleTimeString([], { hour12: false });
  }
  function safeHttpUrl(v) {
    if (typeof v !== "string" || !v) return null;
    try {
      const u = new URL(String(v), window.location.href);
      return u.protocol === "http:" || u.protocol === "https:" ? u.toString() : null;
    } catch (e) { return null; }
  }
  function shortName(id) {
    const s = text(id);
    const i = s.indexOf("/");
    return i >= 0 && s.slice(0, i) === "default" ? s.slice(i + 1) : s;
  }

  // -- sections ----------------------------------------------------------------------------------------
  // Plugin columns of the upstream rows (data.upstream_columns: [{name, title}]): the page names none.
  function columnValue(v) {
    if (isNum(v)) return String(v);
    return typeof v === "string" ? v : noData();
  }
  function renderServices(services, columns) {
    const heads = columns.filter((c) => c && typeof c.name === "string");
    const head = document.getElementById("upstreams-head");
    if (head) head.textContent = "Upstream pods (" + heads.map((c) => text(c.title) || c.name).concat(["rate", "errors"]).join(", ") + ")";
    const rows = services.map((s) => {
      const id = text(s.namespace) + "/" + text(s.name);
      const labels = (s.labels || []).map((l) => el("span", { class: "label", title: "owned by plugin " + text(l.plugin) },
        text(l.key) + "=" + text(l.value), el("span", { class: "plugin" }, text(l.plugin))));
      const ups = (s.upstreams || []).map((u) => el("li", { title: text(u.address) },
        el("code", null, text(u.pod) || text(u.address)),
        heads.map((c) => el("span", { "data-column": c.name }, " " + (text(c.title) || c.name) + " ",
          columnValue(Object.prototype.hasOwnProperty.call(u, c.name) ? u[c.name] : null), ",")), " ",
        !isNum(u.rps) && !isNum(u.error_rate) ? noData() : [rate(u.rps), ", ", errors(u.error_rate)]));
      const traces = safeHttpUrl(s.traces_url);
      return el("tr", { "data-service": id },
        el("td", null, el("strong", null, text(s.name)), el("span", { class: "muted" }, " " + text(s.namespace))),
        el("td", null, labels.length ? labels : el("span", { class: "muted" }, "none")),
        el("td", { class: "num", "data-field": "rps" }, rate(s.rps)),
        el("td", { class: "num", "data-field": "error_rate" }, errors(s.error_rate)),
        el("td", { class: "num" }, ms(s.p50_ms)),
        el("td", { class: "num" }, ms(s.p99_ms)),
        el("td", null, ups.length ? el("ul", { class: "upstreams" }, ups) : el("span", { class: "muted" }, "none")),
        el("td", null, traces ? el("a", { href: traces, target: "_blank", rel: "noopener noreferrer" }, "recent traces")
          : el("span", { class: "muted" }, "-")));
    });
    fillBody("#services", rows, 8, "no services yet");
  }

  // A layered layout: a node's column is the length of the longest caller chain reaching it (cycles cut).
  function renderGraph(services, edges) {
    const box = document.getElementById("graph-box");
    const ids = [];
    const seen = new Set();
    const add = (id) => { if (!seen.has(id)) { seen.add(id); ids.push(id); } };
    services.forEach((s) => add(text(s.namespace) + "/" + text(s.name)));
    edges.forEach((e) => { add(text(e.from)); add(text(e.to)); });
    while (box.firstChild) box.removeChild(box.firstChild);
    if (!ids.length) { box.appendChild(el("p", { class: "muted" }, "no services yet")); return; }
    const depth = new Map(ids.map((id) => [id, 0]));
    for (let round = 0; round < ids.length; round++) {
      let changed = false;
      edges.forEach((e) => {
        const a = text(e.from), b = text(e.to);
        if (a !== b && depth.get(b) < depth.get(a) + 1 && depth.get(a) + 1 < ids.length) {
          depth.set(b, depth.get(a) + 1); changed = true;
        }
      });
      if (!changed) break;
    }
    const columns = [];
    ids.forEach((id) => { const d = depth.get(id); (columns[d] = columns[d] || []).push(id); });
    const used = columns.filter((c) => c && c.length);
    const W = 150, H = 30, GX = 110, GY = 26, PAD = 10;
    const width = PAD * 2 + used.length * W + (used.length - 1) * GX;
    const height = PAD * 2 + Math.max(...used.map((c) => c.length)) * (H + GY) - GY;
    const pos = new Map();
    used.forEach((col, ci) => col.sort().forEach((id, ri) => {
      const top = PAD + (height - PAD * 2 - (col.length * (H + GY) - GY)) / 2;
      pos.set(id, { x: PAD + ci * (W + GX), y: top + ri * (H + GY) });
    }));
    const root = svg("svg", { viewBox: "0 0 " + width + " " + height, role: "img", "aria-label": "service graph" });
    root.appendChild(svg("defs", null, svg("marker", { id: "arrow", viewBox: "0 0 10 10", refX: 10, refY: 5,
      markerWidth: 7, markerHeight: 7, orient: "auto-start-reverse" }, svg("path", { d: "M 0 0 L 10 5 L 0 10 z", fill: "#64748b" }))));
    edges.forEach((e) => {
      const a = pos.get(text(e.from)), b = pos.get(text(e.to));
      if (!a || !b) return;
      const forward = b.x > a.x;
      const x1 = forward ? a.x + W : a.x + W / 2, y1 = forward ? a.y + H / 2 : a.y + H;
      const x2 = forward ? b.x : b.x + W / 2, y2 = forward ? b.y + H / 2 : b.y;
      const label = isNum(e.rps) ? e.rps.toFixed(2) + " req/s" : "no data yet";
      const bad = isNum(e.error_rate) && e.error_rate > 0 ? (e.error_rate * 100).toFixed(1) + " % errors" : "";
      const g = svg("g", { class: "edge" + (bad ? " errors" : ""), "data-from": text(e.from), "data-to": text(e.to) },
        svg("title", null, shortName(e.from) + " \u2192 " + shortName(e.to) + ": " + label + (bad ? ", " + bad : "")),
        svg("line", { x1: x1, y1: y1, x2: x2, y2: y2, "marker-end": "url(#arrow)" }),
        svg("text", { x: (x1 + x2) / 2, y: (y1 + y2) / 2 - 4, "text-anchor": "middle" }, label),
        bad ? svg("text", { class: "bad", x: (x1 + x2) / 2, y: (y1 + y2) / 2 + 12, "text-anchor": "middle" }, bad) : null);
      root.appendChild(g);
    });
    pos.forEach((p, id) => {
      root.appendChild(svg("g", { class: "node", "data-service": id },
        svg("title", null, id),
        svg("rect", { x: p.x, y: p.y, width: W, height: H, rx: 4 }),
        svg("text", { x: p.x + W / 2, y: p.y + H / 2 + 4, "text-anchor": "middle" }, shortName(id))));
    });
    box.appendChild(root);
  }

  function syncCell(entry) {
    if (!entry) return el("span", { class: "muted" }, "-");
    const sent = entry.sent, acked = entry.acked, nack = entry.last_nack;
    if ((sent === null || sent === undefined || sent === "") && (acked === null || acked === undefined || acked === "") && !nack) {
      return el("span", { class: "muted" }, "-");
    }
    if (sent && sent === acked) return el("span", { class: "sync-ok", title: "acked " + text(acked) }, "SYNCED");
    if (nack) return el("span", { class: "sync-nack", title: text(nack.error) }, "NACK");
    return el("span", { class: "sync-stale", title: "sent " + text(sent) + ", acked " + text(acked) },
      "STALE (sent " + text(sent).slice(0, 8) + ", acked " + text(acked).slice(0, 8) + ")");
  }

  function lastNack(p) {
    if (p.last_nack) return p.last_nack;
    for (const [short] of TYPES) {
      const n = p[short] && p[short].last_nack;
      if (n) return Object.assign({ type: short }, n);
    }
    return null;
  }

  function renderProxies(proxies) {
    const rows = proxies.map((p) => {
      const nack = lastNack(p);
      return el("tr", { "data-node": text(p.node_id) },
        el("td", null, el("code", null, text(p.node_id))),
        el("td", null, text(p.view)),
        el("td", null, text(p.mode)),
        TYPES.map(([short]) => el("td", null, syncCell(p[short]))),
        el("td", { class: "nack-cell" }, nack
          ? el("span", { class: "nack", title: text(nack.error) }, (isNum(nack.time) ? clock(nack.time) + " " : "") +
            text(nack.type) + (nack.type ? ": " : "") + text(nack.error || "rejected"))
          : el("span", { class: "muted" }, "none")));
    });
    fillBody("#proxies", rows, 9, "no proxies connected");
  }

  function renderEvents(events) {
    const rows = events.slice().sort((a, b) => (b.time || 0) - (a.time || 0)).map((e) => el("tr", null,
      el("td", { class: "num" }, clock(e.time)),
      el("td", null, el("span", { class: "bad" }, text(e.reason))),
      el("td", null, el("code", null, text(e.object))),
      el("td", null, text(e.message))));
    fillBody("#events", rows, 4, "no Warning events");
  }

  function list(values) {
    if (!Array.isArray(values) || !values.length) return el("span", { class: "muted" }, "-");
    return values.map((v, i) => [i ? el("br") : null, el("code", null, typeof v === "string" ? v : JSON.stringify(v))]);
  }

  function renderRoutes(routes) {
    const rows = routes.map((r) => el("tr", null,
      el("td", null, text(r.kind)),
      el("td", null, text(r.namespace) + "/" + text(r.name)),
      el("td", null, list(r.hosts)),
      el("td", null, list(r.matches)),
      el("td", null, list(r.backends)),
      el("td", null, text(r.status))));
    fillBody("#routes", rows, 6, "no routes");
  }

  function render(data) {
    const arr = (v) => (Array.isArray(v) ? v : []);
    renderServices(arr(data.services), arr(data.upstream_columns));
    renderGraph(arr(data.services), arr(data.edges));
    renderProxies(arr(data.proxies));
    renderEvents(arr(data.events));
    renderRoutes(arr(data.routes));
    document.getElementById("status").textContent = "updated " + clock(data.generated) + " \u00b7 numbers from " +
      (text(data.source) || "unknown") + (isNum(data.window_s) ? " over " + data.window_s + " s" : "") +
      " \u00b7 refreshes every " + POLL_MS / 1000 + " s";
  }

  function showError(message) {
    const banner = document.getElementById("error");
    if (message) {
      banner.textContent = "cannot read " + DATA_URL + ": " + message +
        (lastGood ? " (showing data from " + new Date(lastGood).toLocaleTimeString([], { hour12: false }) + ")" : "");
      banner.hidden = false;
    } else {
      banner.textContent = "";
      banner.hidden = true;
    }
  }

  async function poll() {
    const ctl = new AbortController();
    const timer = setTimeout(() => ctl.abort(), TIMEOUT_MS);
    try {
      const resp = await fetch(DATA_URL, { cache: "no-store", signal: ctl.signal, headers: { Accept: "application/json" } });
      if (!resp.ok) {
        const body = (await resp.text()).trim().slice(0, 300);
        throw new Error("HTTP " + resp.status + (body ? ": " + body : ""));
      }
      const data = await resp.json();
      render(data);
      lastGood = Date.now();
      showError(null);
    } catch (err) {
      showError(err && err.name === "AbortError" ? "no answer within " + TIMEOUT_MS / 1000 + " s"
        : err instanceof TypeError ? "the control plane is unreachable (" + err.message + ")"
        : (err && err.message) || String(err));
    } finally {
      clearTimeout(timer);
      setTimeout(poll, POLL_MS);
    }
  }

  poll();
})();
