// The worklist: DiagnosticReport search (newest first, paged) or, for refused/failed analyses,
// Task search (status rejected/failed, see fhir_server/analysis_log.py). Polls page 1 for news.
import { fhir } from "./api.js";
import * as F from "./fhir.js";

// rows per page; a reading room with a tall monitor may want more: /?page_size=40 (1..100)
const PAGE_SIZE = Math.min(100, Math.max(1, Number(new URLSearchParams(location.search).get("page_size")) || 15));
const POLL_MS = 5000;
const $ = (id) => document.getElementById(id);

let config = null;
let current = null; // the query URL shown now
let firstPage = null;
let signature = "";
let timer = null;

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text != null) e.textContent = text;
  if (cls) e.className = cls;
  return e;
}

function criticalParam() {
  return config.critical_findings.map((c) => `${c.system}|${c.code}`).join(",");
}

export function buildQuery() {
  const status = $("f-status").value;
  const name = $("f-name").value.trim();
  const ident = $("f-id").value.trim();
  const date = $("f-date").value;
  const triage = $("f-triage").value;
  const q = new URLSearchParams();
  const tasks = status === "rejected" || status === "failed";
  if (tasks) {
    q.set("code", `${config.analyze_task_code.system}|${config.analyze_task_code.code}`);
    q.set("status", status);
    if (date) q.set("authored-on", date);
  } else {
    q.set("_include", "DiagnosticReport:subject");
    if (date) q.set("date", date);
    if (triage === "urgent") q.set("conclusion", criticalParam());
    if (triage === "routine") q.set("conclusion:not", criticalParam());
  }
  if (name) q.set("patient.name", name);
  if (ident) q.set("patient.identifier", ident);
  q.set("_sort", "-_lastUpdated");
  q.set("_count", String(PAGE_SIZE));
  if (tasks) q.append("_include", "Task:patient");
  $("f-triage").disabled = tasks;
  return `/fhir/${tasks ? "Task" : "DiagnosticReport"}?${q}`;
}

async function inputMedia(refs) {
  const ids = [...new Set(refs.filter((r) => r && r.startsWith("Media/")).map((r) => r.slice(6)))];
  if (!ids.length) return new Map();
  const bundle = await fhir(`/fhir/Media?_id=${ids.join(",")}&_summary=true&_count=${ids.length}`);
  return F.byRef(bundle);
}

function cellLink(href, text, label) {
  const a = el("a", text);
  a.href = href;
  if (label) a.setAttribute("aria-label", label);
  return a;
}

// Without a patient, the file name is what the sender will recognise.
function fileName(media) {
  return media && media.content && media.content.title ? media.content.title : "";
}

function pill(text, cls) {
  return el("span", text, "pill " + cls);
}

async function renderReports(bundle) {
  const refs = F.byRef(bundle);
  const reports = F.entries(bundle, "DiagnosticReport", "match");
  const media = await inputMedia(reports.map(F.inputRef));
  const rows = reports.map((r) => {
    const patient = r.subject ? refs.get(r.subject.reference) : null;
    const urgent = F.isUrgent(r, config.critical_findings);
    const model = F.modelOf(r);
    const tr = el("tr");
    tr.dataset.id = r.id;
    if (urgent) tr.className = "urgent";
    const who = F.patientName(patient) || "Unknown patient";
    const first = el("td");
    first.append(cellLink(`#/report/${r.id}`, who, `Open report: ${who}, ${F.formatDate(r.effectiveDateTime)}`));
    const input = F.inputRef(r);
    const sub = F.patientId(patient) || fileName(media.get(input));
    if (sub) { const span = el("span", sub, "sub"); span.title = sub; first.append(span); }
    tr.append(first, el("td", F.formatDate(r.effectiveDateTime)));
    tr.append(el("td", F.sourceOf(input, media.get(input), config.upload_source)));
    const tri = el("td");
    tri.append(pill(urgent ? "urgent" : "routine", urgent ? "urgent" : "routine"));
    tr.append(tri, el("td", F.topFinding(r)), el("td", model.name + (model.version ? ` (${model.version})` : ""), "model"));
    return tr;
  });
  return { rows, count: reports.length };
}

async function renderTasks(bundle) {
  const refs = F.byRef(bundle);
  const tasks = F.entries(bundle, "Task", "match");
  const media = await inputMedia(tasks.map((t) => (t.focus || {}).reference));
  const rows = tasks.map((t) => {
    const patient = t.for ? refs.get(t.for.reference) : null;
    const focus = (t.focus || {}).reference;
    const tr = el("tr", null, "refused");
    tr.dataset.id = t.id;
    const who = F.patientName(patient) || "Unknown patient";
    const first = el("td");
    first.append(cellLink(`#/task/${t.id}`, who, `Open ${t.status} analysis: ${who}`));
    const sub = F.patientId(patient) || fileName(media.get(focus));
    if (sub) first.append(el("span", sub, "sub"));
    tr.append(first, el("td", F.formatDate(t.authoredOn)), el("td", F.sourceOf(focus, media.get(focus), config.upload_source)));
    const st = el("td");
    st.append(pill(t.status === "rejected" ? "refused" : "failed", "refused"));
    tr.append(st, el("td", (t.statusReason || {}).text || "", "reason"), el("td", ""));
    return tr;
  });
  return { rows, count: tasks.length };
}

function headers(tasks) {
  const names = tasks
    ? ["Patient", "Sent", "Source", "Status", "Reason", ""]
    : ["Patient", "Study date", "Source", "Triage", "Top finding", "Model"];
  const tr = el("tr");
  names.forEach((n) => { const th = el("th", n); th.scope = "col"; tr.append(th); });
  $("wl-head").replaceChildren(tr);
}

export async function show(url, { quiet = false } = {}) {
  current = url;
  const tasks = url.startsWith("/fhir/Task");
  try {
    const bundle = await fhir(url);
    const fresh = (bundle.entry || []).map((e) => `${e.resource.id}@${(e.resource.meta || {}).versionId}`).join(",");
    $("wl-updated").textContent = "Updated " + new Date().toLocaleTimeString();
    if (quiet && fresh === signature) return; // nothing changed: leave the rows (and the focus) alone
    const { rows, count } = tasks ? await renderTasks(bundle) : await renderReports(bundle);
    // a keyboard user keeps their place when new rows arrive
    const active = document.activeElement;
    const focusedRow = active && active.closest ? active.closest("#wl-body tr[data-id]") : null;
    headers(tasks);
    const body = $("wl-body");
    const before = new Set([...body.querySelectorAll("tr[data-id]")].map((r) => r.dataset.id));
    if (quiet) rows.forEach((r) => { if (!before.has(r.dataset.id)) r.classList.add("new"); });
    body.replaceChildren(...rows);
    if (focusedRow) {
      const again = body.querySelector(`tr[data-id="${focusedRow.dataset.id}"] a`);
      if (again) again.focus();
    }
    if (!count) {
      const tr = el("tr");
      const td = el("td", tasks ? "Nothing here: no analysis was refused or failed with these filters." : "No results match these filters yet.", "empty");
      td.colSpan = 6;
      tr.append(td);
      body.append(tr);
    }
    const total = typeof bundle.total === "number" ? ` of ${bundle.total}` : "";
    $("wl-count").textContent = `${count} shown${total}`;
    const next = F.nextLink(bundle);
    const prev = F.prevLink(bundle);
    $("wl-next").disabled = !next;
    $("wl-prev").disabled = !prev;
    $("wl-next").onclick = () => next && show(next);
    $("wl-prev").onclick = () => prev && show(prev);
    $("wl-error").hidden = true;
    signature = fresh;
  } catch (e) {
    $("wl-error").textContent = "The worklist could not be loaded: " + e.message;
    $("wl-error").hidden = false;
  }
}

export function refresh() {
  firstPage = buildQuery();
  return show(firstPage);
}

// Live updates: re-run page 1 while it is on screen; new rows are marked and announced.
async function poll() {
  if (document.hidden || current !== firstPage || $("worklist-view").hidden) return;
  const before = signature;
  await show(current, { quiet: true });
  if (signature !== before) {
    const fresh = document.querySelectorAll("#wl-body tr.new").length;
    if (fresh) $("wl-live").textContent = `${fresh} new result${fresh > 1 ? "s" : ""} arrived.`;
  }
}

export function init(cfg) {
  config = cfg;
  $("filters").addEventListener("submit", (e) => { e.preventDefault(); refresh(); });
  $("filters").addEventListener("reset", () => setTimeout(refresh, 0));
  ["f-status", "f-triage", "f-date"].forEach((id) => $(id).addEventListener("change", refresh));
  clearInterval(timer);
  timer = setInterval(poll, POLL_MS);
  return refresh();
}
