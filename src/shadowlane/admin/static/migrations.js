// The migrations page: GET /api/migrations every 2 s; each migration as a card with its stages
// as a timeline, every gate green (pass), amber (wait) or red (fail) with its figures, and the
// advance / rollback buttons (POST with the admin token typed in the top bar; it stays in this
// tab's sessionStorage only).
"use strict";

const REFRESH_MS = 2000;
const $ = (id) => document.getElementById(id);

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined && text !== null) e.textContent = String(text);
  return e;
}

function fmtValue(v) {
  if (v === null || v === undefined) return "–";
  if (typeof v === "number") return Number.isInteger(v) ? String(v) : v.toFixed(3);
  return String(v);
}

function fmtSeconds(s) {
  if (s < 90) return `${s.toFixed(0)}s`;
  if (s < 5400) return `${(s / 60).toFixed(1)}m`;
  return `${(s / 3600).toFixed(1)}h`;
}

function timeline(m) {
  const ol = el("ol", "timeline");
  for (const s of m.stages) {
    const li = el("li", `stage stage-${s.state}`);
    li.dataset.stage = s.name;
    li.appendChild(el("span", "stage-name", s.name));
    if (s.weights) {
      const steps = el("span", "steps");
      s.weights.forEach((w, i) => {
        const cur = s.state === "current" && i === s.step;
        const passed = s.state === "done" || (s.state === "current" && i < s.step);
        steps.appendChild(el("span", `step${cur ? " step-current" : ""}${passed ? " step-done" : ""}`, `${w}%`));
      });
      li.appendChild(steps);
    }
    if (s.entered) li.appendChild(el("time", "stage-time", new Date(s.entered * 1000).toLocaleTimeString()));
    ol.appendChild(li);
  }
  const end = el("li", `stage stage-${m.phase === "reverse" || m.phase === "done" ? "current" : "pending"}`);
  end.dataset.stage = m.phase === "done" ? "done" : "reverse";
  end.appendChild(el("span", "stage-name", m.phase === "done" ? "done" : "flipped"));
  ol.appendChild(end);
  return ol;
}

function gateTable(m) {
  const table = el("table", "gates");
  const head = el("tr");
  for (const h of ["gate", "route", "field", "measured", "threshold", "detail"]) head.appendChild(el("th", null, h));
  const thead = el("thead"); thead.appendChild(head); table.appendChild(thead);
  const body = el("tbody");
  for (const g of m.gates) {
    const tr = el("tr", `gate gate-${g.verdict}`);
    tr.dataset.gate = g.gate;
    tr.dataset.verdict = g.verdict;
    tr.appendChild(el("td", "gate-name", g.gate));
    tr.appendChild(el("td", "gate-route", g.route || ""));
    tr.appendChild(el("td", "gate-field mono", g.field || ""));
    tr.appendChild(el("td", "num gate-value", fmtValue(g.value)));
    tr.appendChild(el("td", "num gate-threshold", fmtValue(g.threshold)));
    tr.appendChild(el("td", "gate-detail", g.detail));
    body.appendChild(tr);
  }
  if (!m.gates.length) {
    const tr = el("tr"); const td = el("td", "muted", m.phase === "done" ? "done: nothing to judge" : "no evaluation yet for this stage");
    td.colSpan = 6; tr.appendChild(td); body.appendChild(tr);
  }
  table.appendChild(body);
  return table;
}

async function act(name, what, to) {
  const token = $("token").value.trim();
  sessionStorage.setItem("shadowlane-token", token);
  const out = $("action-result");
  try {
    const r = await fetch(`api/migrations/${encodeURIComponent(name)}/${what}`, {
      method: "POST",
      headers: { "authorization": `Bearer ${token}`, "content-type": "application/json" },
      body: JSON.stringify(to ? { to, by: "dashboard" } : { by: "dashboard" }),
    });
    const data = await r.json();
    out.hidden = false;
    out.className = `action-result ${r.ok ? "ok" : "failed"}`;
    out.textContent = r.ok ? `${name}: ${what} ${data.from} → ${data.to}` : `${name}: ${what} refused (${r.status}): ${data.error}`;
  } catch (e) {
    out.hidden = false; out.className = "action-result failed"; out.textContent = `${what} failed: ${e}`;
  }
  refresh();
}

function card(m) {
  const c = el("section", "card migration");
  c.dataset.migration = m.name;
  c.dataset.phase = m.phase;
  c.dataset.position = m.position;
  const head = el("div", "card-head");
  head.appendChild(el("h2", null, m.name));
  head.appendChild(el("span", "hint", `${m.old} → ${m.new} · ${m.auto ? "auto" : "manual"} · routes ${m.routes.join(", ")}`));
  c.appendChild(head);
  const line = el("div", "migration-line");
  line.appendChild(el("span", `phase phase-${m.phase}`, m.phase));
  line.appendChild(el("span", "position", m.position));
  line.appendChild(el("span", "muted", `in stage ${fmtSeconds(m.in_stage_seconds)} · new backend weight ${m.weight}%`));
  const blocking = el("span", "blocking");
  blocking.textContent = m.blocking.length ? "blocked by: " + m.blocking.map((g) => g.gate + (g.route ? ` (${g.route}${g.field ? " " + g.field : ""})` : "")).join(", ") : (m.phase === "done" ? "" : "every gate holds");
  line.appendChild(blocking);
  c.appendChild(line);
  c.appendChild(timeline(m));
  c.appendChild(gateTable(m));
  const buttons = el("div", "actions");
  const adv = el("button", "advance", m.phase === "halted" ? "resume" : "advance");
  adv.type = "button"; adv.disabled = m.phase === "done";
  adv.addEventListener("click", () => act(m.name, "advance"));
  const back = el("button", "rollback", "roll back one step");
  back.type = "button";
  back.addEventListener("click", () => act(m.name, "rollback"));
  buttons.appendChild(adv); buttons.appendChild(back);
  c.appendChild(buttons);
  if (m.last) c.appendChild(el("div", "last muted", `last: ${m.last.action} by ${m.last.actor}: ${m.last.reason}`));
  if (m.audit.length) {
    const t = el("table", "audit");
    const b = el("tbody");
    for (const a of m.audit.slice(0, 8)) {
      const tr = el("tr", `audit-row audit-${a.action}`);
      tr.appendChild(el("td", "mono", new Date(a.ts * 1000).toLocaleTimeString()));
      tr.appendChild(el("td", null, `${a.from || "·"} → ${a.to}`));
      tr.appendChild(el("td", null, a.action));
      tr.appendChild(el("td", null, a.actor));
      tr.appendChild(el("td", "muted", a.reason));
      b.appendChild(tr);
    }
    t.appendChild(b); c.appendChild(t);
  }
  return c;
}

async function refresh() {
  try {
    const r = await fetch("api/migrations", { cache: "no-store" });
    const data = await r.json();
    const box = $("migrations");
    box.replaceChildren();
    if (!data.migrations.length) box.appendChild(el("div", "empty", "no migration configured"));
    for (const m of data.migrations) box.appendChild(card(m));
    $("live-dot").className = "dot live";
    $("conn-state").textContent = "live";
    $("updated-at").textContent = new Date().toLocaleTimeString();
  } catch (e) {
    $("live-dot").className = "dot error";
    $("conn-state").textContent = "admin API unreachable";
  }
}

$("token").value = sessionStorage.getItem("shadowlane-token") || "";
refresh();
setInterval(refresh, REFRESH_MS);
