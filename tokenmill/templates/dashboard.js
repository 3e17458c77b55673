// tokenmill dashboard: polls the JSON endpoints and rewrites the numbers in place.
// Data is only ever written with textContent and attributes, never innerHTML: job names, ids and worker
// names are user input and must show as text.
"use strict";
(function () {
  const body = document.body;
  const view = body.dataset.view;
  const api = body.dataset.api;
  const pollMs = Number(body.dataset.pollMs) || 1000;
  const known = new Set(["completed", "completed_with_errors", "cancelled", "running", "queued", "ingesting",
    "failed", "expired"]);
  const workerStates = new Set(["busy", "ready", "lost", "failed"]);
  const live = document.getElementById("live");

  function num(v, decimals) {
    return Number(v).toLocaleString("en-US", {minimumFractionDigits: decimals || 0, maximumFractionDigits: decimals || 0});
  }
  function duration(s) {  // the same words as the templates' duration filter
    if (s < 60) return s.toFixed(1) + " s";
    const pad = (n) => String(Math.floor(n)).padStart(2, "0");
    if (s < 3600) return Math.floor(s / 60) + "m " + pad(s % 60) + "s";
    return Math.floor(s / 3600) + "h " + pad((s % 3600) / 60) + "m";
  }
  function el(tag, text, cls) {
    const e = document.createElement(tag);
    if (text !== undefined && text !== null) e.textContent = String(text);
    if (cls) e.className = cls;
    return e;
  }
  function cell(text, cls) {
    return el("td", text, cls);
  }
  function badge(state) {
    return el("span", state, "badge" + (known.has(state) ? " s-" + state : ""));
  }
  function bar(j) {
    const outer = el("div", null, "bar" + (j.final ? " done" : ""));
    const inner = el("div");
    inner.style.width = j.percent + "%";
    outer.appendChild(inner);
    return outer;
  }
  function eta(j) {
    return j.eta_s === null ? "—" : duration(j.eta_s);
  }

  function jobRow(j) {
    const tr = el("tr");
    tr.dataset.job = j.id;
    const name = cell(null, "name");
    const link = el("a", j.name);
    link.href = "/dashboard/jobs/" + encodeURIComponent(j.id);
    const id = el("small");
    id.appendChild(el("code", j.id));
    name.append(link, el("br"), id);
    const state = cell(null, "state");
    state.appendChild(badge(j.state));
    const progress = cell();
    progress.appendChild(bar(j));
    const model = cell(null, "model");
    model.appendChild(el("code", j.model));
    tr.append(name, state, progress, cell(num(j.done), "num done"), cell(num(j.failed), "num failed"),
      cell(num(j.total), "num total"), cell(num(j.tokens_per_second, 1), "num tps"), cell(eta(j), "num eta"), model);
    return tr;
  }

  function workerRow(w) {
    const tr = el("tr");
    tr.dataset.worker = w.id;
    const name = cell(null, "wname");
    name.append(el("code", w.name), el("br"), el("small", w.id));
    const state = cell(null, "state");
    state.appendChild(el("span", w.state, "badge" + (workerStates.has(w.state) ? " s-" + w.state : "")));
    const variant = cell(null, "variant");
    variant.appendChild(el("code", w.variant || "—"));
    tr.append(name, cell(w.host, "host"), state, variant, cell(w.device || "—", "device"), cell(w.load, "load"),
      cell(num(w.rows_done), "num rows"), cell(num(w.tokens_generated), "num tokens"),
      cell(duration(w.heartbeat_age_s) + " ago", "num beat"));
    return tr;
  }

  async function getJson(url) {
    const r = await fetch(url, {cache: "no-store", headers: {Accept: "application/json"}});
    if (!r.ok) throw new Error(url + ": HTTP " + r.status);
    return r.json();
  }

  function fill(tbodyId, emptyId, items, build) {
    document.getElementById(tbodyId).replaceChildren(...items.map(build));
    document.getElementById(emptyId).hidden = items.length > 0;
  }

  async function refreshIndex() {
    const [jobs, workers] = await Promise.all([getJson(api), getJson("/dashboard/api/workers")]);
    fill("job-rows", "no-jobs", jobs.jobs, jobRow);
    fill("worker-rows", "no-workers", workers.workers, workerRow);
    document.getElementById("n-jobs").textContent = jobs.jobs.length;
    document.getElementById("n-active").textContent = jobs.jobs.filter((j) => !j.final).length;
    document.getElementById("n-workers").textContent = workers.workers.length;
    document.getElementById("n-busy").textContent = workers.workers.filter((w) => w.state === "busy").length;
  }

  function setKpi(id, value, sub) {
    const box = document.getElementById(id);
    box.querySelector(".value").textContent = value;
    if (sub !== undefined) box.querySelector(".sub").textContent = sub;
  }

  async function refreshJob() {
    const j = await getJson(api);
    setKpi("kpi-done", num(j.done), "of " + num(j.total) + " rows");
    setKpi("kpi-failed", num(j.failed));
    setKpi("kpi-tps", num(j.tokens_per_second, 1));
    setKpi("kpi-elapsed", duration(j.elapsed_s));
    setKpi("kpi-eta", eta(j));
    document.getElementById("job-state").replaceWith(Object.assign(badge(j.state), {id: "job-state"}));
    document.getElementById("job-bar").replaceWith(Object.assign(bar(j), {id: "job-bar"}));
    if (j.final && body.dataset.final !== "true") {
      body.dataset.final = "true";
      window.location.reload();  // the plots and failures are drawn from the finished job
    }
  }

  const refresh = view === "index" ? refreshIndex : view === "job" ? refreshJob : null;
  if (!refresh) {
    live.hidden = true;
    return;
  }
  async function tick() {
    try {
      await refresh();
      live.textContent = "live · updated " + new Date().toLocaleTimeString();
      live.classList.remove("stale");
    } catch (err) {
      live.textContent = "not updating: " + err.message;
      live.classList.add("stale");
    }
    setTimeout(tick, pollMs);
  }
  setTimeout(tick, pollMs);
})();
