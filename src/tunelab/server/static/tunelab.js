// tunelab's pages: tabs, the live log and chart of a job (server-sent events that resume
// where they stopped), loss curves of runs overlaid, and a chat whose answers stream in.
"use strict";

const COLORS = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#be185d"];

function onReady(fn) {
  if (document.readyState !== "loading") fn();
  else document.addEventListener("DOMContentLoaded", fn);
}

// -- the template form ------------------------------------------------------------------
function showTab(id) {
  document.querySelectorAll("[role=tab]").forEach((tab) => {
    const on = tab.dataset.tab === id;
    tab.setAttribute("aria-selected", on ? "true" : "false");
    document.getElementById(tab.dataset.tab).hidden = !on;
  });
}

function setupForm() {
  document.querySelectorAll("[role=tab]").forEach((tab) =>
    tab.addEventListener("click", () => showTab(tab.dataset.tab)));
  // a problem's dotted path leads to its field (datasets.0.KEY is the data tab's ds.KEY)
  document.addEventListener("click", (event) => {
    const link = event.target.closest("[data-field]");
    if (!link) return;
    event.preventDefault();
    const path = link.dataset.field.replace(/^datasets\.0\./, "ds.");
    const input = document.getElementById("f-" + path) ||
      document.getElementById("f-" + path.split(".")[0]);
    if (!input) return;
    const panel = input.closest("[role=tabpanel]");
    if (panel) showTab(panel.id);
    const folded = input.closest("details");
    if (folded) folded.open = true;
    input.classList.add("invalid");
    input.focus();
  });
  // an upload fills the dataset field with the stored name and renders the preview
  document.body.addEventListener("htmx:afterSwap", (event) => {
    if (event.detail.target.id !== "uploaded") return;
    const chosen = event.detail.target.querySelector("template[data-chosen]");
    const input = document.getElementById("f-ds.path");
    if (chosen && chosen.dataset.chosen && input) {
      input.value = chosen.dataset.chosen;
      showTab("data-tab");
      htmx.trigger("#preview", "refresh");
    }
  });
}

// A request of a button or form that the server refused: its reason, at the top of the page
// (htmx swaps nothing for an error answer).
function setupFlash() {
  document.body.addEventListener("htmx:responseError", (event) => {
    const flash = document.getElementById("flash");
    if (!flash) return;
    let text = `The server answered ${event.detail.xhr.status}.`;
    try {
      const body = JSON.parse(event.detail.xhr.responseText);
      if (typeof body.detail === "string") text = body.detail + (body.hint ? ` (${body.hint})` : "");
      else if (Array.isArray(body.detail)) text = body.detail.map((p) => (p.path ? `${p.path}: ` : "") + (p.message || p.msg)).join("; ");
    } catch (err) { /* not JSON: keep the status */ }
    flash.textContent = text;
    flash.hidden = false;
  });
  document.body.addEventListener("htmx:beforeRequest", () => {
    const flash = document.getElementById("flash");
    if (flash) flash.hidden = true;
  });
}

// -- charts -----------------------------------------------------------------------------
function chartWidth(el) {
  return Math.max(320, el.clientWidth || 800);
}

// One uPlot chart over [x, ...series] columns; lr on its own axis at the right.
function makeChart(el, series) {
  const opts = {
    width: chartWidth(el),
    height: 300,
    scales: { x: { time: false } },
    axes: [{ label: "step" }, { label: "loss" }],
    series: [{ label: "step" }].concat(series.map((s, i) => ({
      label: s.label,
      stroke: s.color || COLORS[i % COLORS.length],
      width: 2,
      spanGaps: true,
      scale: s.scale || "y",
      dash: s.dash,
      points: { show: s.points || false },
    }))),
  };
  if (series.some((s) => s.scale === "lr")) {
    opts.axes.push({
      scale: "lr", side: 1, label: "learning rate", grid: { show: false }, size: 70,
      values: (u, ticks) => ticks.map((v) => (v === 0 ? "0" : v.toExponential(1))),
    });
  }
  const data = [[]].concat(series.map(() => []));
  const chart = new uPlot(opts, data, el);
  window.addEventListener("resize", () => chart.setSize({ width: chartWidth(el), height: 300 }));
  return chart;
}

// Records {step, loss?, eval_loss?, learning_rate?} as columns by step (a step's values
// merged, whichever record carried them).
function columns(records, keys) {
  const bySteps = new Map();
  for (const r of records) {
    if (r.step === undefined) continue;
    const row = bySteps.get(r.step) || {};
    for (const k of keys) if (r[k] !== undefined && r[k] !== null) row[k] = r[k];
    bySteps.set(r.step, row);
  }
  const steps = [...bySteps.keys()].sort((a, b) => a - b);
  return [steps].concat(keys.map((k) => steps.map((s) => bySteps.get(s)[k] ?? null)));
}

function followJob() {
  const chartEl = document.getElementById("chart");
  const logEl = document.getElementById("log");
  if (logEl) {
    const lines = [];
    let received = 0;
    let drawing = false;
    const logs = new EventSource(logEl.dataset.logs);
    logs.addEventListener("log", (event) => {
      lines.push(JSON.parse(event.data));
      received += 1;
      if (lines.length > 3000) lines.splice(0, lines.length - 3000);
      if (drawing) return;  // one redraw a frame, however many lines arrived
      drawing = true;
      requestAnimationFrame(() => {
        drawing = false;
        const atEnd = logEl.scrollTop + logEl.clientHeight >= logEl.scrollHeight - 20;
        logEl.textContent = lines.join("\n");
        logEl.dataset.lines = String(received);
        if (atEnd) logEl.scrollTop = logEl.scrollHeight;
      });
    });
    logs.addEventListener("end", () => { logs.close(); logEl.dataset.ended = "1"; });
  }
  if (chartEl) {
    const keys = ["loss", "eval_loss", "learning_rate"];
    const chart = makeChart(chartEl, [
      { label: "training loss" },
      { label: "validation loss", points: true },
      { label: "learning rate", scale: "lr", dash: [4, 4] },
    ]);
    const records = [];
    let pending = false;
    const metrics = new EventSource(chartEl.dataset.metrics);
    metrics.addEventListener("metrics", (event) => {
      records.push(JSON.parse(event.data));
      if (pending) return;
      pending = true;
      requestAnimationFrame(() => {
        pending = false;
        const data = columns(records, keys);
        chart.setData(data);
        chartEl.dataset.points = String(data[0].length);
      });
    });
    metrics.addEventListener("end", () => { metrics.close(); chartEl.dataset.ended = "1"; });
  }
}

function drawOverlay() {
  const el = document.getElementById("overlay");
  const source = document.getElementById("overlay-data");
  if (!el || !source) return;
  const runs = JSON.parse(el.dataset.runs);
  const all = JSON.parse(source.textContent);
  const series = [];
  const keys = [];
  runs.forEach((name, i) => {
    const color = COLORS[i % COLORS.length];
    series.push({ label: name + " loss", color });
    series.push({ label: name + " val loss", color, dash: [6, 4], points: true });
    keys.push([i, "loss"], [i, "eval_loss"]);
  });
  // one x column: every step of every run; each run's values null where it has none
  const perRun = all.map((records) => columns(records, ["loss", "eval_loss"]));
  const steps = [...new Set(perRun.flatMap((c) => c[0]))].sort((a, b) => a - b);
  const data = [steps].concat(keys.map(([i, key]) => {
    const cols = perRun[i];
    const at = new Map(cols[0].map((s, j) => [s, cols[key === "loss" ? 1 : 2][j]]));
    return steps.map((s) => at.get(s) ?? null);
  }));
  const chart = makeChart(el, series);
  chart.setData(data);
  el.dataset.points = String(steps.length);
}

// -- chat -------------------------------------------------------------------------------
function setupChat() {
  const form = document.getElementById("chat-send");
  if (!form) return;
  const run = document.getElementById("chat-run");
  const checkpoint = document.getElementById("chat-checkpoint");
  const compare = document.getElementById("chat-compare");
  const message = document.getElementById("chat-message");
  const errorEl = document.getElementById("chat-error");
  let history = { tuned: [], base: [] };  // each column's own conversation

  async function loadCheckpoints() {
    checkpoint.innerHTML = '<option value="">final</option>';
    if (!run.value) return;
    const answer = await fetch(`/api/runs/${encodeURIComponent(run.value)}/checkpoints`);
    if (!answer.ok) return;
    const rows = await answer.json();
    const names = rows.length ? ["best", "last"].concat(rows.map((r) => String(r.step))) : [];
    for (const name of names) checkpoint.add(new Option(name === "best" || name === "last" ? name : `step ${name}`, name));
  }
  run.addEventListener("change", () => { history = { tuned: [], base: [] }; clear(); loadCheckpoints(); });
  compare.addEventListener("change", () => {
    document.getElementById("base-column").hidden = !compare.checked;
  });
  document.getElementById("chat-clear").addEventListener("click", () => {
    history = { tuned: [], base: [] };
    clear();
  });
  message.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey) { event.preventDefault(); form.requestSubmit(); }
  });
  loadCheckpoints();

  function clear() {
    document.getElementById("chat-tuned").innerHTML = "";
    document.getElementById("chat-base").innerHTML = "";
  }

  function bubble(column, role, text) {
    const div = document.createElement("div");
    div.className = `message ${role}`;
    div.textContent = text;
    document.getElementById(column).appendChild(div);
    return div;
  }

  // POST /api/chat with stream: OpenAI-style "data: {...}" lines, then "data: [DONE]"
  async function stream(messages, which, target) {
    const body = {
      run: run.value, checkpoint: checkpoint.value || null, messages, stream: true, which,
      max_tokens: Number(document.getElementById("chat-max").value) || 200,
      temperature: Number(document.getElementById("chat-temperature").value) || 0,
    };
    const answer = await fetch("/api/chat", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
    });
    if (!answer.ok) {
      const detail = await answer.json().catch(() => ({}));
      throw new Error(typeof detail.detail === "string" ? detail.detail : `the server answered ${answer.status}`);
    }
    const reader = answer.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    let text = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data: ")) continue;
          const data = line.slice(6);
          if (data === "[DONE]") continue;
          const chunk = JSON.parse(data);
          if (chunk.error) throw new Error(chunk.error.message);
          text += chunk.choices?.[0]?.delta?.content || "";
          target.textContent = text;
        }
      }
    }
    target.classList.remove("streaming");
    return text;
  }

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const text = message.value.trim();
    if (!text || !run.value) return;
    errorEl.hidden = true;
    message.value = "";
    const system = document.getElementById("chat-system").value.trim();
    const columns = compare.checked ? ["tuned", "base"] : ["tuned"];
    const button = form.querySelector("button[type=submit]");
    button.disabled = true;
    try {
      for (const which of columns) {
        const turn = history[which].concat([{ role: "user", content: text }]);
        const messages = (system ? [{ role: "system", content: system }] : []).concat(turn);
        bubble(`chat-${which}`, "user", text);
        const target = bubble(`chat-${which}`, "assistant streaming", "");
        try {
          const reply = await stream(messages, which, target);
          history[which] = turn.concat([{ role: "assistant", content: reply }]);
        } finally {
          target.classList.remove("streaming");
        }
      }
    } catch (err) {
      errorEl.textContent = String(err.message || err);
      errorEl.hidden = false;
    } finally {
      button.disabled = false;
    }
  });
}

onReady(() => {
  setupFlash();
  setupForm();
  followJob();
  drawOverlay();
  setupChat();
});
