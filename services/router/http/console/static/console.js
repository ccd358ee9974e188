// The console's pages: forms sent as JSON with the session's CSRF token, charts drawn with Chart.js.
"use strict";

const csrf = () => (document.querySelector('meta[name="csrf-token"]') || {}).content || "";
const $ = (selector, root = document) => root.querySelector(selector);
const $$ = (selector, root = document) => Array.from(root.querySelectorAll(selector));

function say(text, ok = false) {
  const box = $("#message");
  box.textContent = text;
  box.className = ok ? "message ok" : "message";
  box.hidden = false;
}

async function api(method, path, body) {
  const response = await fetch(path, {
    method, credentials: "same-origin",
    headers: { "content-type": "application/json", "x-csrf-token": csrf() },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const doc = await response.json().catch(() => ({}));
  if (!response.ok) {
    const message = (doc.error && doc.error.message) || `${response.status} ${response.statusText}`;
    if (response.status === 401 && location.pathname !== "/console/login") location.assign("/console/login");
    throw new Error(message);
  }
  return doc;
}

function formData(form) {
  const doc = {};
  for (const input of $$("input, select", form)) {
    if (!input.name) continue;
    doc[input.name] = input.type === "checkbox" ? input.checked : input.value;
  }
  return doc;
}

function onSubmit(form, handler) {
  if (!form) return;
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    try { await handler(form); } catch (error) { say(error.message); }
  });
}

function cell(row, text, className) {
  const td = row.insertCell();
  td.textContent = text;
  if (className) td.className = className;
}

const PALETTE = ["#2f6fde", "#e07b39", "#2e9e4f", "#9b59b6", "#c0392b", "#16a085", "#d4ac0d", "#7f8c8d"];
const charts = {};

function draw(id, type, labels, datasets, stacked, money = false) {
  if (!window.Chart) return;
  const old = charts[id];
  if (old) { old.data.labels = labels; old.data.datasets = datasets; old.update("none"); return; }
  charts[id] = new window.Chart($("#" + id), {
    type, data: { labels, datasets },
    options: { animation: false, responsive: true, maintainAspectRatio: false,
               scales: { x: { stacked },
                         y: { stacked, beginAtZero: true,
                              ticks: money ? { callback: (v) => Number(v).toFixed(6) } : {} } },
               plugins: { legend: { position: "bottom" } } },
  });
}

// --- sign in / out ---
onSubmit($("#login-form"), async (form) => {
  await api("POST", "/console/api/session", { token: $("#token", form).value });
  location.assign("/console/spend");
});
const signOut = $("#sign-out");
if (signOut) signOut.addEventListener("click", async () => {
  try { await api("POST", "/console/api/session/end", {}); } catch (error) { /* a read-only session just goes */ }
  location.assign("/console/login");
});

// --- Spend ---
async function loadSpend() {
  const data = await api("GET", "/console/api/spend" + location.search);
  $("#total-cost").textContent = data.total.cost;
  $("#total-tokens").textContent = data.total.tokens;
  $("#total-requests").textContent = data.total.requests;
  const buckets = [...new Set(data.rows.map((r) => r.bucket))].sort();
  const groups = [...new Set(data.rows.map((r) => r.group))].sort();
  const series = (field) => groups.map((group, i) => ({
    label: group, backgroundColor: PALETTE[i % PALETTE.length],
    data: buckets.map((b) => data.rows.filter((r) => r.bucket === b && r.group === group)
      .reduce((sum, r) => sum + (field === "cost" ? Number(r.cost) : r.prompt_tokens + r.completion_tokens), 0)),
  }));
  draw("cost-chart", "bar", buckets, series("cost"), true, true);
  draw("tokens-chart", "bar", buckets, series("tokens"), true);
  const rows = $("#spend-rows tbody");
  rows.replaceChildren();
  for (const r of data.rows) {
    const tr = rows.insertRow();
    tr.dataset.group = r.group;
    for (const v of [r.bucket, r.group, r.requests, r.prompt_tokens, r.completion_tokens, r.cost]) cell(tr, v);
    cell(tr, r.anomalous ? "anomalous" : "", "flag");
  }
  const keys = $("#top-keys tbody");
  keys.replaceChildren();
  for (const r of data.top_keys) {
    const tr = keys.insertRow();
    tr.dataset.key = r.group;
    for (const v of [r.group, r.requests, r.prompt_tokens + r.completion_tokens, r.cost]) cell(tr, v);
    cell(tr, r.anomalous ? "anomalous" : "", "flag");
  }
}

// --- Live ---
async function loadLive() {
  const data = await api("GET", "/console/api/live");
  const points = data.points;
  const labels = points.map((p) => new Date(p.time * 1000).toLocaleTimeString());
  const line = (label, values, color) => ({ label, data: values, borderColor: color, backgroundColor: color,
                                             pointRadius: 0, tension: 0.2 });
  draw("rate-chart", "line", labels, [line("requests/s", points.map((p) => p.requests_per_s), PALETTE[0]),
                                      line("tokens/s", points.map((p) => p.tokens_per_s), PALETTE[1])], false);
  draw("ttft-chart", "line", labels, [line("p50", points.map((p) => p.ttft_p50_ms), PALETTE[2]),
                                      line("p99", points.map((p) => p.ttft_p99_ms), PALETTE[4])], false);
  draw("error-chart", "line", labels, [line("errors / requests", points.map((p) => p.error_rate), PALETTE[4])], false);
  const last = points[points.length - 1];
  if (last) {
    const fix = (v, d) => (v === null || v === undefined ? "–" : Number(v).toFixed(d));
    $("#now-rps").textContent = fix(last.requests_per_s, 2);
    $("#now-tps").textContent = fix(last.tokens_per_s, 1);
    $("#now-p50").textContent = fix(last.ttft_p50_ms, 0);
    $("#now-p99").textContent = fix(last.ttft_p99_ms, 0);
    $("#now-err").textContent = (100 * last.error_rate).toFixed(1) + " %";
  }
  return data.interval_s;
}

function every(seconds, load) {
  const tick = async () => {
    try { await load(); } catch (error) { say(error.message); }
  };
  tick();
  setInterval(tick, seconds * 1000);
}

// --- Budgets ---
onSubmit($("#budget-form"), async (form) => {
  const doc = formData(form);
  const id = doc.budget_id;
  delete doc.budget_id;
  const saved = await api("POST", id ? `/console/api/budgets/${encodeURIComponent(id)}` : "/console/api/budgets", doc);
  say(`budget ${saved.budget_id} saved`, true);
  setTimeout(() => location.reload(), 600);
});
for (const button of $$(".edit-budget")) button.addEventListener("click", () => {
  const d = button.dataset;
  $("#budget_id").value = d.id;
  for (const name of ["tenant", "key", "tag", "amount", "tokens", "period", "webhook"]) $("#budget-" + name).value = d[name] || "";
  $("#budget-soft").checked = d.soft === "True";
  $("#budget-form-title").textContent = `Edit budget ${d.id}`;
});
const resetBudget = $("#budget-new");
if (resetBudget) resetBudget.addEventListener("click", () => {
  $("#budget_id").value = "";
  $("#budget-form-title").textContent = "New budget";
});
for (const button of $$(".delete-budget")) button.addEventListener("click", async () => {
  try {
    await api("POST", `/console/api/budgets/${encodeURIComponent(button.dataset.id)}/delete`, {});
    location.reload();
  } catch (error) { say(error.message); }
});

// --- Keys ---
onSubmit($("#key-form"), async (form) => {
  const key = await api("POST", "/console/api/keys", formData(form));
  $("#secret-value").textContent = key.secret;
  $("#new-secret").hidden = false;
  $("#new-secret").dataset.key = key.key_id;
  say(`key ${key.key_id} created for tenant ${key.tenant_id}`, true);
});
const copy = $("#copy-secret");
if (copy) copy.addEventListener("click", async () => {
  try { await navigator.clipboard.writeText($("#secret-value").textContent); say("copied", true); }
  catch (error) { say("copy failed: select the secret and copy it by hand"); }
});
for (const button of $$(".revoke")) button.addEventListener("click", async () => {
  try {
    await api("POST", `/console/api/keys/${encodeURIComponent(button.dataset.id)}/revoke`, {});
    location.reload();
  } catch (error) { say(error.message); }
});

// --- Models ---
for (const form of $$(".split-form")) onSubmit(form, async () => {
  const weights = {};
  for (const input of $$(".split-weight", form)) weights[input.name] = input.value;
  await api("POST", `/console/api/models/${encodeURIComponent(form.dataset.model)}/split`, { weights });
  say("traffic split saved", true);
  setTimeout(() => location.reload(), 600);
});

async function loadLastUse() {
  const cells = $$(".last-use");
  if (!cells.length) return;
  try {
    const latest = await api("GET", "/console/api/keys/last-use");
    for (const td of cells) td.textContent = latest[td.dataset.key] || "not in 7 days";
  } catch (error) {
    for (const td of cells) td.textContent = "?";
    say(error.message);
  }
}

const page = document.body.dataset.page;
if (page === "keys") loadLastUse();
if (page === "spend") every(5, loadSpend);
if (page === "live") loadLive().then((interval) => every(interval || 5, loadLive)).catch((e) => say(e.message));
