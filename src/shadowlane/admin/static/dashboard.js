// shadowlane dashboard: polls the comparison API every 2 s and renders one card per
// (route, target), and the divergence ledger panel from /api/ledger. Vanilla JS, no
// dependencies, no build step.
//
// Everything that comes from the API (field names, bodies, URIs) is inserted as text
// (textContent / text nodes), never as HTML: answers are written by backends, not by us.
"use strict";

(function () {
  const POLL_MS = 2000;
  const EXAMPLE_LIMIT = 10;
  const MAX_FIELD_ROWS = 60;
  const LEDGER_ENTRIES = 20;
  const LEDGER_KEYS = 200;
  const ENTRY_KEYS = 5;

  const state = {
    paused: false,
    timer: 0,
    cards: new Map(), // key -> Card
  };

  // ---- small helpers ------------------------------------------------------------------------

  function h(tag, attrs, ...children) {
    const node = document.createElement(tag);
    if (attrs) {
      for (const [name, value] of Object.entries(attrs)) {
        if (value === undefined || value === null || value === false) continue;
        if (name === "class") node.className = value;
        else if (name === "style") Object.assign(node.style, value); // CSSOM: allowed by the CSP
        else if (name === "text") node.textContent = value;
        else if (name.startsWith("data-")) node.setAttribute(name, String(value));
        else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
        else node.setAttribute(name, value === true ? "" : String(value));
      }
    }
    for (const child of children) {
      if (child === undefined || child === null || child === false) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function num(value) {
    return typeof value === "number" && isFinite(value) ? value : null;
  }

  function fmtCount(value) {
    const n = num(value);
    return n === null ? "–" : n.toLocaleString("en-US");
  }

  function fmtPct(rate) {
    const r = num(rate);
    if (r === null) return "–";
    const pct = r * 100;
    if (pct === 0) return "0%";
    if (pct < 0.1) return "<0.1%";
    return (pct >= 10 ? pct.toFixed(1) : pct.toFixed(2)).replace(/\.?0+$/, "") + "%";
  }

  function ratio(part, whole) {
    const p = num(part);
    const w = num(whole);
    return p === null || !w ? null : p / w;
  }

  // Latencies come from the store in seconds (like every *_seconds metric).
  function fmtSeconds(seconds) {
    const s = num(seconds);
    if (s === null) return "–";
    const ms = s * 1000;
    if (ms < 1) return ms.toFixed(2) + " ms";
    if (ms < 100) return ms.toFixed(1) + " ms";
    if (ms < 10000) return Math.round(ms) + " ms";
    return s.toFixed(1) + " s";
  }

  function fmtTime(ts) {
    const t = num(ts);
    if (t === null) return "";
    const d = new Date(t * 1000);
    return d.toLocaleTimeString("en-GB", { hour12: false });
  }

  // A ledger entry may be days old: the date too, unless it is today.
  function fmtStamp(ts) {
    const t = num(ts);
    if (t === null) return "";
    const d = new Date(t * 1000);
    const time = d.toLocaleTimeString("en-GB", { hour12: false });
    if (d.toDateString() === new Date().toDateString()) return time;
    const pad = (n) => String(n).padStart(2, "0");
    return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ${time}`;
  }

  async function getJSON(url) {
    const response = await fetch(url, { cache: "no-store", headers: { accept: "application/json" } });
    if (!response.ok) {
      let detail = "";
      try {
        detail = (await response.json()).error || "";
      } catch (e) {
        detail = "";
      }
      throw new Error(`${response.status} ${detail || response.statusText}`.trim());
    }
    return response.json();
  }

  // Relative URLs, so the admin listener also works behind a reverse proxy under a path prefix.
  function apiBase(route, target) {
    return `api/comparisons/${encodeURIComponent(route)}/${encodeURIComponent(target)}`;
  }

  // ---- field paths ----------------------------------------------------------------------------
  // Answers are lifted to paths like `status`, `headers.content-type`, `body.items[3].id`:
  // object keys join with ".", array indexes with "[i]"; a key that would be ambiguous in that
  // syntax is written `["key"]`. Rule paths may use `[*]` (any index) and `*` (any key).

  function childPath(parent, key, isIndex) {
    if (isIndex) return `${parent}[${key}]`;
    // As compare.paths.key_segment: plain unless empty or holding `.`, `[`, `]` or `"`.
    const part = /^[^.[\]"]+$/.test(key) ? key : `[${JSON.stringify(key)}]`;
    if (!parent) return part;
    return part.startsWith("[") ? parent + part : `${parent}.${part}`;
  }

  const patternCache = new Map();

  function pathMatcher(path) {
    let re = patternCache.get(path);
    if (!re) {
      // `[*]` any index, `**` any number of segments, `*` any characters within one key.
      const source = path
        .split(/(\[\*\]|\*\*|\*)/)
        .map((part) => {
          if (part === "[*]") return "\\[\\d+\\]";
          if (part === "**") return ".*";
          if (part === "*") return "[^.\\[]*";
          return part.replace(/[.*+?^${}()|[\]\\]/g, "\\$&");
        })
        .join("");
      re = new RegExp(`^${source}$`);
      patternCache.set(path, re);
    }
    return re;
  }

  class Highlighter {
    constructor(diffPaths, noisePaths) {
      const noisy = new Set(noisePaths || []);
      this.diff = (diffPaths || []).filter((p) => !noisy.has(p)).map((p) => [p, pathMatcher(p)]);
      this.noise = (noisePaths || []).map((p) => [p, pathMatcher(p)]);
      this.found = new Set();
    }

    // Noise wins: a path that also differed between primary and secondary is noise for this
    // request, even though the candidate differs there too.
    classify(path) {
      for (const [p, re] of this.noise) {
        if (re.test(path)) {
          this.found.add(p);
          return "noise";
        }
      }
      for (const [p, re] of this.diff) {
        if (re.test(path)) {
          this.found.add(p);
          return "diff";
        }
      }
      return null;
    }

    absent() {
      const out = [];
      for (const [p] of this.diff) if (!this.found.has(p)) out.push(["diff", p]);
      for (const [p] of this.noise) if (!this.found.has(p)) out.push(["noise", p]);
      return out;
    }
  }

  // One side of an example as the document the paths refer to: {status, headers, trailers,
  // body}.
  function liftAnswer(answer) {
    const doc = {};
    if (!answer || typeof answer !== "object") return doc;
    // A failed answer is lifted as `status: "failed: <why>"` (compare.diff.lift).
    if (answer.failure) doc.status = `failed: ${answer.failure}`;
    else if (answer.status !== undefined) doc.status = answer.status;
    const headers = answer.headers;
    if (Array.isArray(headers)) {
      const obj = {};
      for (const pair of headers) {
        if (!Array.isArray(pair) || pair.length < 2) continue;
        const name = String(pair[0]).toLowerCase();
        obj[name] = name in obj ? `${obj[name]}, ${pair[1]}` : String(pair[1]);
      }
      doc.headers = obj;
    } else if (headers && typeof headers === "object") {
      doc.headers = headers;
    }
    // HTTP/2 (gRPC) answers: trailers beside the headers, as the comparison lifts them
    if (answer.trailers && typeof answer.trailers === "object") doc.trailers = answer.trailers;
    if (answer.body !== undefined && answer.body !== null) doc.body = parseBody(answer.body);
    return doc;
  }

  function parseBody(body) {
    if (typeof body !== "string") return body;
    const text = body.trim();
    if (text.startsWith("{") || text.startsWith("[")) {
      try {
        return JSON.parse(text);
      } catch (e) {
        return body;
      }
    }
    return body;
  }

  // Pretty-printed JSON as nested spans, one per value, each carrying data-path; highlighted
  // ones get class hl-diff / hl-noise (a highlighted object or array covers its whole block).
  function renderJSON(value, highlighter) {
    const pre = h("pre", { class: "json" });
    renderEntries(pre, value, "", 0, highlighter);
    return pre;
  }

  function renderEntries(parent, value, path, depth, hl) {
    const isArray = Array.isArray(value);
    const keys = isArray ? value.map((_, i) => i) : Object.keys(value);
    parent.append(punct(isArray ? "[" : "{"));
    if (keys.length === 0) {
      parent.append(punct(isArray ? "]" : "}"));
      return;
    }
    parent.append("\n");
    keys.forEach((key, i) => {
      const child = childPath(path, String(key), isArray);
      parent.append("  ".repeat(depth + 1));
      const node = h("span", { class: "node", "data-path": child });
      const cls = hl.classify(child);
      if (cls) node.classList.add(`hl-${cls}`);
      if (!isArray) node.append(h("span", { class: "j-key", text: JSON.stringify(String(key)) }), punct(": "));
      const v = value[key];
      if (v !== null && typeof v === "object") renderEntries(node, v, child, depth + 1, hl);
      else node.append(leaf(v));
      parent.append(node);
      if (i < keys.length - 1) parent.append(punct(","));
      parent.append("\n");
    });
    parent.append("  ".repeat(depth), punct(isArray ? "]" : "}"));
  }

  function punct(text) {
    return h("span", { class: "j-punct", text });
  }

  function leaf(v) {
    if (typeof v === "string") return h("span", { class: "j-str", text: JSON.stringify(v) });
    if (typeof v === "number") return h("span", { class: "j-num", text: String(v) });
    return h("span", { class: "j-lit", text: JSON.stringify(v === undefined ? null : v) });
  }

  // ---- one card per (route, target) ---------------------------------------------------------

  class Card {
    constructor(route, target) {
      this.route = route;
      this.target = target;
      // Examples are filtered to `field`; undefined until the user picks (then the top
      // reported field is shown: a noise-only example is rarely what one wants to see first).
      this.field = undefined;
      this.examples = [];
      this.examplesKey = "";
      this.examplesShown = "";
      this.selectedId = null;
      this.fields = [];
      this.summary = null;
      this.build();
    }

    build() {
      const tile = (cls, label) => {
        const value = h("div", { class: "value" });
        const sub = h("div", { class: "sub" });
        const node = h("div", { class: `tile ${cls}`, "data-metric": cls }, h("div", { class: "label", text: label }), value, sub);
        return { node, value, sub };
      };
      this.tiles = {
        compared: tile("compared", "compared"),
        matched: tile("matched", "matched"),
        differing: tile("differing", "differing"),
        noise: tile("noise", "noise only"),
      };
      this.fieldsBody = h("tbody");
      this.latencyBody = h("tbody");
      this.latencyNote = h("div", { class: "legend-line" });
      this.exampleBar = h("div", { class: "examples-bar" });
      this.exampleList = h("div", { class: "example-list" });
      this.exampleView = h("div", { class: "example-view" });
      this.error = h("div", { class: "error-line", hidden: true });
      this.root = h(
        "section",
        { class: "card", "data-route": this.route, "data-target": this.target },
        h(
          "div",
          { class: "card-head" },
          h("h2", null, h("span", { class: "route", text: this.route }), h("span", { class: "arrow", text: "→" }), h("span", { class: "target", text: this.target })),
          h("span", { class: "hint", text: "route → shadow target" }),
        ),
        h("div", { class: "tiles" }, ...Object.values(this.tiles).map((t) => t.node)),
        this.error,
        h(
          "div",
          { class: "grid" },
          h(
            "div",
            null,
            h("h3", { text: "Differing fields" }),
            h(
              "table",
              { class: "fields" },
              h("thead", null, h("tr", null, h("th", { text: "field" }), h("th", { text: "" }), h("th", { class: "num", text: "diff rate" }), h("th", { class: "num", text: "noise rate" }), h("th", { class: "num", text: "diffs" }))),
              this.fieldsBody,
            ),
          ),
          h(
            "div",
            null,
            h("h3", { text: "Latency" }),
            h(
              "table",
              { class: "latency" },
              h("thead", null, h("tr", null, h("th", { text: "" }), h("th", { class: "num", text: "primary" }), h("th", { class: "num", text: "shadow" }), h("th", { class: "num", text: "Δ" }))),
              this.latencyBody,
            ),
            this.latencyNote,
          ),
        ),
        h("div", { class: "examples" }, this.exampleBar, this.exampleList, this.exampleView),
      );
    }

    get key() {
      return cardKey(this.route, this.target);
    }

    get effectiveField() {
      if (this.field !== undefined) return this.field;
      const top = this.fields.find((f) => f.reported === true);
      return top ? top.field : null;
    }

    // The examples to (re)fetch: only when the counts or the filter changed since last time.
    wantsExamples() {
      const s = this.summary || {};
      const key = [s.compared, s.differing, s.noise, this.effectiveField].join("|");
      return key !== this.examplesKey ? key : null;
    }

    renderSummary(s) {
      this.summary = s;
      const compared = num(s.compared);
      const t = this.tiles;
      t.compared.value.textContent = fmtCount(compared);
      t.compared.sub.textContent = "answer pairs";
      const matchedRate = ratio(s.matched, compared);
      t.matched.value.textContent = fmtPct(matchedRate);
      t.matched.sub.textContent = `${fmtCount(s.matched)} of ${fmtCount(compared)}`;
      const diffRate = num(s.diff_rate) ?? ratio(s.differing, compared);
      t.differing.value.textContent = fmtPct(diffRate);
      t.differing.sub.textContent = `${fmtCount(s.differing)} with reported differences`;
      const noiseRate = num(s.noise_rate) ?? ratio(s.noise, compared);
      t.noise.value.textContent = fmtPct(noiseRate);
      t.noise.sub.textContent = `${fmtCount(s.noise)} differing only in noise`;
      this.renderLatency(s.latency || {});
    }

    renderLatency(lat) {
      const rows = [
        ["p50", num(lat.primary_p50), num(lat.shadow_p50)],
        ["p99", num(lat.primary_p99), num(lat.shadow_p99)],
      ];
      const max = Math.max(0, ...rows.flatMap((r) => [r[1] || 0, r[2] || 0]));
      const cell = (value, cls) =>
        h(
          "td",
          { class: `num lat-${cls}`, "data-latency": cls },
          fmtSeconds(value),
          h("div", { class: `lat-bar ${cls}`, style: { width: `${max && value ? Math.max(2, (100 * value) / max) : 0}%` } }),
        );
      const body = [];
      for (const [label, primary, shadow] of rows) {
        let delta = h("td", { class: "num delta", text: "–" });
        if (primary !== null && shadow !== null && primary > 0) {
          const change = (shadow - primary) / primary;
          const sign = change > 0 ? "+" : "";
          delta = h("td", { class: `num delta ${change > 0.05 ? "slower" : change < -0.05 ? "faster" : ""}`, text: `${sign}${Math.round(change * 100)}%` });
        }
        body.push(h("tr", { "data-quantile": label }, h("th", { text: label }), cell(primary, "primary"), cell(shadow, "shadow"), delta));
      }
      this.latencyBody.replaceChildren(...body);
      this.latencyNote.textContent = "Δ: shadow against primary";
    }

    renderFields(fields) {
      this.fields = fields;
      const rows = [...fields].sort((a, b) => (b.reported === true) - (a.reported === true) || (num(b.raw_rate) || 0) - (num(a.raw_rate) || 0));
      if (rows.length === 0) {
        this.fieldsBody.replaceChildren(h("tr", null, h("td", { class: "none", colspan: 5, text: "No differing fields." })));
        return;
      }
      const bar = (cls, rate) => h("div", { class: `bar ${cls}` }, h("span", { style: { width: `${Math.min(100, (num(rate) || 0) * 100)}%` } }));
      const out = rows.slice(0, MAX_FIELD_ROWS).map((f) => {
        const reported = f.reported === true;
        const row = h(
          "tr",
          {
            class: `field-row${this.effectiveField === f.field ? " selected" : ""}`,
            "data-field": f.field,
            "data-state": reported ? "reported" : "noise",
            tabindex: 0,
            title: reported ? "reported: differs clearly more often than between primary and secondary" : "noise: differs about as often between primary and secondary",
            onclick: () => this.selectField(f.field),
            onkeydown: (e) => {
              if (e.key === "Enter" || e.key === " ") {
                e.preventDefault();
                this.selectField(f.field);
              }
            },
          },
          h("td", { class: "field-name", text: f.field }),
          h("td", null, h("span", { class: `badge ${reported ? "reported" : "noise"}`, text: reported ? "reported" : "noise" })),
          h("td", { class: "num diff-rate" }, h("div", { class: "rate" }, bar("diff", f.raw_rate), h("span", { class: "pct", text: fmtPct(f.raw_rate) }))),
          h("td", { class: "num noise-rate" }, h("div", { class: "rate" }, bar("noise", f.noise_rate), h("span", { class: "pct", text: fmtPct(f.noise_rate) }))),
          h("td", { class: "num", text: fmtCount(f.raw) }),
        );
        return row;
      });
      if (rows.length > MAX_FIELD_ROWS) {
        out.push(h("tr", null, h("td", { class: "none", colspan: 5, text: `and ${rows.length - MAX_FIELD_ROWS} more (see the fields API)` })));
      }
      this.fieldsBody.replaceChildren(...out);
    }

    selectField(field) {
      this.field = this.effectiveField === field ? null : field;
      this.selectedId = null;
      this.renderFields(this.fields);
      this.refreshExamples().catch((e) => this.showError(e));
    }

    async refreshExamples() {
      const key = this.wantsExamples();
      if (key === null) return;
      let url = `${apiBase(this.route, this.target)}/examples?limit=${EXAMPLE_LIMIT}`;
      const field = this.effectiveField;
      if (field) url += `&field=${encodeURIComponent(field)}`;
      const examples = await getJSON(url);
      this.examplesKey = key;
      this.renderExamples(Array.isArray(examples) ? examples : []);
    }

    showError(error) {
      this.error.hidden = !error;
      this.error.textContent = error ? `Could not load: ${error.message || error}` : "";
    }

    renderExamples(examples) {
      this.examples = examples;
      const bar = [h("h3", { text: "Example pairs" })];
      const field = this.effectiveField;
      if (field) {
        bar.push(h("span", { class: "filter-chip" }, `field ${field}`, h("button", { type: "button", title: "show all examples", text: "×", onclick: () => this.selectField(field) })));
      } else {
        bar.push(h("span", { class: "hint", text: "all fields · click a field to see its examples" }));
      }
      this.exampleBar.replaceChildren(...bar);
      if (!examples.some((e) => e.request_id === this.selectedId)) {
        this.selectedId = examples.length ? examples[0].request_id : null;
      }
      this.renderExampleList();
      this.renderSelected();
    }

    renderExampleList() {
      if (this.examples.length === 0) {
        this.exampleList.replaceChildren(h("span", { class: "example-none", text: "No examples stored yet." }));
        return;
      }
      this.exampleList.replaceChildren(
        ...this.examples.map((ex) =>
          h(
            "button",
            {
              type: "button",
              class: `example-item${ex.request_id === this.selectedId ? " selected" : ""}`,
              "data-request-id": ex.request_id,
              onclick: () => {
                this.selectedId = ex.request_id;
                this.renderExampleList();
                this.renderSelected();
              },
            },
            h("span", { class: "req", text: `${ex.method || ""} ${ex.uri || ""}` }),
            h("span", { class: "meta", text: exampleMeta(ex) }),
          ),
        ),
      );
    }

    renderSelected() {
      const ex = this.examples.find((e) => e.request_id === this.selectedId);
      const shown = ex ? JSON.stringify(ex) : "";
      if (shown === this.examplesShown) return; // unchanged: keep scroll positions
      this.examplesShown = shown;
      if (!ex) {
        this.exampleView.replaceChildren();
        return;
      }
      const pathChips = (cls, paths) => (paths || []).map((p) => h("span", { class: `path ${cls}`, "data-path": p, text: p }));
      const head = h(
        "div",
        { class: "example-head" },
        h("span", { class: "mono", text: `${ex.method || ""} ${ex.uri || ""}` }),
        `  ·  request ${ex.request_id || "?"}  ·  ${fmtTime(ex.ts)}`,
      );
      const noisy = new Set(ex.noise || []);
      const real = (ex.differing || []).filter((p) => !noisy.has(p));
      const chips = h("div", { class: "paths" }, ...pathChips("diff", real), ...pathChips("noise", ex.noise));
      const parts = [head, chips];
      if (ex.request_body) {
        parts.push(h("details", { class: "pane request-body" }, h("summary", { text: "request body" }), renderBody(ex.request_body)));
      }
      parts.push(h("div", { class: "example-pair" }, pane("primary", "primary", ex.primary, ex), pane("candidate", `candidate (${this.target})`, ex.candidate, ex)));
      this.exampleView.replaceChildren(...parts);
    }

    render() {
      this.showError(null);
    }
  }

  function exampleMeta(ex) {
    const noisy = new Set(ex.noise || []);
    const real = (ex.differing || []).filter((p) => !noisy.has(p)).length;
    const parts = [fmtTime(ex.ts), `${real} differing`];
    if (noisy.size) parts.push(`${noisy.size} noise`);
    return parts.join(" · ");
  }

  function renderBody(body) {
    const value = parseBody(body);
    if (value !== null && typeof value === "object") return renderJSON(value, new Highlighter([], []));
    return h("pre", { text: String(value) });
  }

  function pane(cls, title, answer, ex) {
    const doc = liftAnswer(answer);
    const hl = new Highlighter(ex.differing, ex.noise);
    const bits = [];
    if (answer && answer.failure) bits.push(`failed: ${answer.failure}`);
    else if (answer && answer.status !== undefined) bits.push(`HTTP ${answer.status}`);
    if (answer && num(answer.seconds) !== null) bits.push(fmtSeconds(answer.seconds));
    if (answer && answer.truncated) bits.push("body cut");
    const status = bits.join(" · ");
    const node = h(
      "div",
      { class: `pane ${cls}` },
      h("div", { class: "pane-title" }, h("span", { text: title }), h("span", { class: "status-code", text: status })),
      renderJSON(doc, hl),
    );
    const absent = hl.absent();
    if (absent.length) {
      node.append(h("div", { class: "absent" }, "not in this answer: ", ...absent.map(([kind, p]) => h("span", { class: `path ${kind}`, "data-path": p, text: p })), ""));
    }
    return node;
  }

  function cardKey(route, target) {
    return `${route}\u0000${target}`;
  }

  // ---- the divergence ledger ------------------------------------------------------------------
  // Entries are copies of ordered writes that may have left a shadow in another state than the
  // primary; their keys stay suspect until `shadowlane verify --repair` resolves them.

  function pairCell(route, target) {
    return h("td", { class: "pair" }, h("span", { class: "route", text: route }), h("span", { class: "arrow", text: " → " }), h("span", { class: "target", text: target }));
  }

  function renderLedger(doc) {
    const counts = Array.isArray(doc.counts) ? doc.counts : [];
    const keys = Array.isArray(doc.suspect_keys) ? doc.suspect_keys : [];
    const entries = Array.isArray(doc.entries) ? doc.entries : [];
    const open = num(doc.open) || 0;
    const panel = document.getElementById("ledger");
    panel.dataset.open = String(open);
    document.getElementById("ledger-error").hidden = true;
    document.getElementById("ledger-open").textContent =
      open === 0 ? "No open divergences" : `${fmtCount(open)} open entr${open === 1 ? "y" : "ies"} · ${fmtCount(keys.length)}${doc.suspect_keys_truncated ? "+" : ""} suspect key${keys.length === 1 ? "" : "s"}`;
    document.getElementById("ledger-body").hidden = open === 0;
    document.getElementById("ledger-entries-box").hidden = entries.length === 0;

    document.getElementById("ledger-counts").replaceChildren(
      ...counts.map((c) =>
        h(
          "tr",
          { class: "ledger-count", "data-route": c.route, "data-target": c.target, "data-reason": c.reason },
          pairCell(c.route, c.target),
          h("td", null, h("span", { class: "badge reason", text: c.reason })),
          h("td", { class: "num count", text: fmtCount(c.n) }),
        ),
      ),
    );

    const shown = keys.slice(0, LEDGER_KEYS);
    document.getElementById("ledger-keys").replaceChildren(...shown.map((k) => h("span", { class: "suspect-key", "data-key": k, text: k })));
    const note = document.getElementById("ledger-keys-note");
    const more = keys.length - shown.length;
    note.hidden = !(more > 0 || doc.suspect_keys_truncated);
    note.textContent = doc.suspect_keys_truncated || more > 0 ? `and more: shadowlane verify --suspects lists them all` : "";

    document.getElementById("ledger-entries").replaceChildren(
      ...entries.map((e) => {
        const entryKeys = Array.isArray(e.keys) ? e.keys : [];
        const keyText = entryKeys.slice(0, ENTRY_KEYS).join(", ") + (entryKeys.length > ENTRY_KEYS ? ` (+${entryKeys.length - ENTRY_KEYS})` : "");
        return h(
          "tr",
          { class: "ledger-entry", "data-request-id": e.request_id, "data-reason": e.reason },
          h("td", { class: "time", text: fmtStamp(e.ts) }),
          pairCell(e.route, e.target),
          h("td", { class: "scope", text: e.scope }),
          h("td", null, h("span", { class: "badge reason", text: e.reason })),
          h("td", { class: "mono request", text: `${e.method || ""} ${e.uri || ""}` }),
          h("td", { class: "mono keys", title: entryKeys.join("\n"), text: keyText }),
          h("td", { class: "detail", text: e.detail || "" }),
        );
      }),
    );
  }

  async function refreshLedger() {
    try {
      renderLedger(await getJSON(`api/ledger?limit=${LEDGER_ENTRIES}`));
    } catch (error) {
      const line = document.getElementById("ledger-error");
      line.hidden = false;
      line.textContent = `Could not load the ledger: ${error.message || error}`;
    }
  }

  // ---- refresh loop ---------------------------------------------------------------------------

  async function refresh() {
    // the ledger's errors are shown in its panel: they do not stop the comparison cards
    await Promise.all([refreshLedger(), refreshComparisons()]);
  }

  async function refreshComparisons() {
    const summary = await getJSON("api/comparisons/summary");
    const entries = Array.isArray(summary) ? summary : [];
    const fieldLists = await Promise.all(entries.map((s) => getJSON(`${apiBase(s.route, s.target)}/fields`)));

    const container = document.getElementById("cards");
    const seen = new Set();
    const cards = entries.map((s, i) => {
      const key = cardKey(s.route, s.target);
      seen.add(key);
      let card = state.cards.get(key);
      if (!card) {
        card = new Card(s.route, s.target);
        state.cards.set(key, card);
      }
      card.render();
      card.renderSummary(s);
      card.renderFields(Array.isArray(fieldLists[i]) ? fieldLists[i] : []);
      return card;
    });
    for (const [key, card] of state.cards) {
      if (!seen.has(key)) {
        card.root.remove();
        state.cards.delete(key);
      }
    }
    // Keep the API's order; move nodes only when it changed (moving resets scroll positions).
    cards.forEach((card, i) => {
      if (container.children[i] !== card.root) container.insertBefore(card.root, container.children[i] || null);
    });
    document.getElementById("empty").hidden = entries.length > 0;
    await Promise.all(cards.map((card) => card.refreshExamples().catch((e) => card.showError(e))));
  }

  function setStatus(kind, text) {
    const dot = document.getElementById("live-dot");
    dot.className = `dot ${kind}`;
    document.getElementById("conn-state").textContent = text;
  }

  async function tick() {
    state.timer = 0;
    if (!state.paused) {
      try {
        await refresh();
        const now = new Date();
        const updated = document.getElementById("updated-at");
        updated.textContent = `updated at ${now.toLocaleTimeString("en-GB", { hour12: false })}`;
        updated.setAttribute("datetime", now.toISOString());
        setStatus("live", "live");
        document.body.dataset.loaded = "true";
      } catch (error) {
        setStatus("error", `cannot reach the API (${error.message || error}); retrying`);
      }
    }
    if (!state.timer) state.timer = window.setTimeout(tick, POLL_MS);
  }

  function togglePause() {
    state.paused = !state.paused;
    const button = document.getElementById("pause");
    button.setAttribute("aria-pressed", String(state.paused));
    button.textContent = state.paused ? "resume" : "pause";
    if (state.paused) {
      setStatus("paused", "paused");
    } else {
      window.clearTimeout(state.timer);
      state.timer = 0;
      tick();
    }
  }

  document.addEventListener("DOMContentLoaded", () => {
    document.getElementById("pause").addEventListener("click", togglePause);
    tick();
  });
})();
