// The viewer: the film on a canvas (pan, zoom, server-rendered window/level presets), the
// Grad-CAM heatmap of one finding faded over it, its region boxes, the findings table, the
// report text and the FHIR resources behind them.
import { fhir, request } from "./api.js";
import * as F from "./fhir.js";

const $ = (id) => document.getElementById(id);
const MAX_ZOOM = 16;

const view = {
  film: null, // ImageBitmap of the windowed preview
  width: 0, // original image size (region boxes are in original pixels)
  height: 0,
  zoom: 1,
  panX: 0,
  panY: 0,
  heat: new Map(), // finding label -> ImageBitmap (heatmap PNG)
  heatMedia: new Map(), // finding label -> Media
  selected: null,
  findings: [],
  mediaId: null,
  resources: new Map(),
  sort: { key: null, dir: 1 },
  token: 0, // guards against a slow answer of an earlier report
};

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text != null) e.textContent = text;
  if (cls) e.className = cls;
  return e;
}

// ------------------------------------------------------------------ drawing

export function draw() {
  const canvas = $("film");
  const box = canvas.parentElement.getBoundingClientRect();
  const dpr = window.devicePixelRatio || 1;
  const cw = Math.max(1, Math.floor(box.width));
  const ch = Math.max(1, Math.floor(box.height));
  if (canvas.width !== cw * dpr || canvas.height !== ch * dpr) {
    canvas.width = cw * dpr;
    canvas.height = ch * dpr;
    canvas.style.width = cw + "px";
    canvas.style.height = ch + "px";
  }
  const ctx = canvas.getContext("2d");
  ctx.setTransform(1, 0, 0, 1, 0, 0);
  ctx.fillStyle = "#000";
  ctx.fillRect(0, 0, canvas.width, canvas.height);
  const heat = view.selected && $("heat-on").checked ? view.heat.get(view.selected) : null;
  const base = view.film || heat;
  if (!base || !view.width) return;
  const fit = Math.min(cw / view.width, ch / view.height);
  const s = fit * view.zoom * dpr;
  ctx.setTransform(s, 0, 0, s, (cw * dpr) / 2 + view.panX * dpr - (view.width * s) / 2, (ch * dpr) / 2 + view.panY * dpr - (view.height * s) / 2);
  ctx.imageSmoothingEnabled = true;
  ctx.imageSmoothingQuality = "high";
  if (view.film) ctx.drawImage(view.film, 0, 0, view.width, view.height);
  if (heat) {
    ctx.globalAlpha = Number($("heat-opacity").value) / 100;
    ctx.drawImage(heat, 0, 0, view.width, view.height);
    ctx.globalAlpha = 1;
  }
  if ($("boxes-on").checked) {
    const f = view.findings.find((x) => x.label === view.selected);
    ctx.lineWidth = 2.5 / s * dpr;
    ctx.strokeStyle = "#ffd400";
    ctx.setLineDash([8 / s * dpr, 5 / s * dpr]);
    for (const [x1, y1, x2, y2] of (f && f.boxes) || []) ctx.strokeRect(x1, y1, x2 - x1, y2 - y1);
    ctx.setLineDash([]);
  }
  $("zoom-level").textContent = Math.round(view.zoom * 100) + " %";
}

function zoomBy(factor, cx = 0, cy = 0) {
  const z = Math.min(MAX_ZOOM, Math.max(1, view.zoom * factor));
  const k = z / view.zoom;
  view.panX = cx - (cx - view.panX) * k;
  view.panY = cy - (cy - view.panY) * k;
  view.zoom = z;
  if (z === 1) { view.panX = 0; view.panY = 0; }
  draw();
}

function resetView() {
  view.zoom = 1; view.panX = 0; view.panY = 0;
  draw();
}

function bindCanvas() {
  const canvas = $("film");
  canvas.addEventListener("wheel", (e) => {
    e.preventDefault();
    const r = canvas.getBoundingClientRect();
    zoomBy(e.deltaY < 0 ? 1.15 : 1 / 1.15, e.clientX - r.left - r.width / 2, e.clientY - r.top - r.height / 2);
  }, { passive: false });
  let drag = null;
  canvas.addEventListener("contextmenu", (e) => e.preventDefault());
  canvas.addEventListener("pointerdown", (e) => {
    // left drag pans; right drag or shift+drag sets window (horizontal) and level (vertical)
    drag = { x: e.clientX, y: e.clientY, wl: e.button === 2 || e.shiftKey };
    canvas.setPointerCapture(e.pointerId);
  });
  canvas.addEventListener("pointermove", (e) => {
    if (!drag) return;
    const dx = e.clientX - drag.x;
    const dy = e.clientY - drag.y;
    drag.x = e.clientX; drag.y = e.clientY;
    if (drag.wl) { adjustWindow(dx, dy); return; }
    view.panX += dx; view.panY += dy;
    draw();
  });
  canvas.addEventListener("pointerup", () => { drag = null; });
  canvas.addEventListener("dblclick", resetView);
  canvas.addEventListener("keydown", (e) => {
    const step = 40;
    const keys = {
      "+": () => zoomBy(1.25), "=": () => zoomBy(1.25), "-": () => zoomBy(0.8), "0": resetView,
      ArrowLeft: () => { view.panX += step; draw(); }, ArrowRight: () => { view.panX -= step; draw(); },
      ArrowUp: () => { view.panY += step; draw(); }, ArrowDown: () => { view.panY -= step; draw(); },
      h: () => { $("heat-on").click(); }, b: () => { $("boxes-on").click(); },
      "[": () => adjustWindow(-20, 0), "]": () => adjustWindow(20, 0),
      ",": () => adjustWindow(0, -20), ".": () => adjustWindow(0, 20),
    };
    if (keys[e.key]) { e.preventDefault(); keys[e.key](); }
  });
  $("zoom-in").addEventListener("click", () => zoomBy(1.25));
  $("zoom-out").addEventListener("click", () => zoomBy(0.8));
  $("zoom-fit").addEventListener("click", resetView);
  ["heat-on", "boxes-on"].forEach((id) => $(id).addEventListener("change", draw));
  $("heat-opacity").addEventListener("input", () => {
    $("heat-opacity-value").textContent = $("heat-opacity").value + " %";
    draw();
  });
  $("heat-finding").addEventListener("change", () => selectFinding($("heat-finding").value));
  document.querySelectorAll("input[name=preset]").forEach((r) => r.addEventListener("change", () => loadFilm(r.value)));
  new ResizeObserver(() => { if (!$("viewer-view").hidden) draw(); }).observe($("film").parentElement);
}

// ------------------------------------------------------------------ data

// Manual window/level: a step of 300 px spans the image's whole value range; the server renders
// the latest request (at most one in flight), so dragging stays smooth on a 16-bit film.
function adjustWindow(dx, dy) {
  const w = view.window;
  if (!w || !view.mediaId) return;
  const range = Math.max(1e-6, w.high - w.low);
  w.width = Math.max(range / 200, w.width * Math.exp(dx / 150));
  w.center += (dy / 300) * range * (w.inverted ? -1 : 1);
  w.manual = true;
  if (!w.busy) loadManual();
}

async function loadManual() {
  const w = view.window;
  w.busy = true;
  const asked = `${w.center}|${w.width}`;
  await loadFilm(w.preset, { center: w.center, width: w.width });
  w.busy = false;
  if (`${w.center}|${w.width}` !== asked) loadManual();
}

async function loadFilm(preset, manual = null) {
  const token = view.token;
  const status = $("wl-readout");
  if (!view.mediaId) {
    status.textContent = "The film is not stored on this server (PACS study): the heatmap's own copy is shown.";
    return;
  }
  status.textContent = "Loading film...";
  try {
    const q = manual ? `center=${manual.center}&width=${manual.width}` : `preset=${preset}`;
    const r = await request(`/web/api/preview/${encodeURIComponent(view.mediaId)}?${q}`);
    const blob = await r.blob();
    const bitmap = await createImageBitmap(blob);
    if (token !== view.token) return;
    view.film = bitmap;
    view.width = Number(r.headers.get("X-Image-Width")) || bitmap.width;
    view.height = Number(r.headers.get("X-Image-Height")) || bitmap.height;
    const c = Number(r.headers.get("X-Window-Center"));
    const w = Number(r.headers.get("X-Window-Width"));
    // one object for the film's lifetime: a drag keeps changing center/width while a render is
    // in flight, so a manual answer must not overwrite them with what was asked earlier
    view.window = view.window || { busy: false };
    Object.assign(view.window, {
      preset, manual: Boolean(manual),
      low: Number(r.headers.get("X-Value-Min")), high: Number(r.headers.get("X-Value-Max")),
      inverted: r.headers.get("X-Inverted") === "true",
    });
    if (!manual) Object.assign(view.window, { center: c, width: w });
    status.textContent = `Window ${fmt(w)} / level ${fmt(c)} (${manual ? "manual" : preset}) - ${view.width} x ${view.height} px`;
    $("film").dataset.loaded = manual ? "manual" : preset;
    draw();
  } catch (e) {
    if (token === view.token) status.textContent = "The film could not be shown: " + e.message;
  }
}

function fmt(x) {
  return Math.abs(x) >= 100 ? Math.round(x).toString() : x.toPrecision(3);
}

async function loadHeatmap(label) {
  if (view.heat.has(label)) return;
  const media = view.heatMedia.get(label);
  if (!media) return;
  const binaryRef = media.content.url;
  const binary = await fhir(binaryRef);
  view.heat.set(label, await createImageBitmap(F.base64ToBlob(binary.data, binary.contentType || "image/png")));
}

async function selectFinding(label) {
  view.selected = label;
  $("heat-finding").value = label;
  document.querySelectorAll("#findings-body tr").forEach((tr) => tr.setAttribute("aria-selected", String(tr.dataset.label === label)));
  const has = view.heatMedia.has(label);
  $("heat-on").disabled = !has;
  $("heat-note").textContent = has ? "" : "No heatmap for this finding (heatmaps are made for detected findings, or the most probable ones).";
  if (has) await loadHeatmap(label);
  if (!view.width && view.heat.get(label)) { view.width = view.heat.get(label).width; view.height = view.heat.get(label).height; }
  draw();
}

function severityRank(s) {
  return { high: 3, moderate: 2, low: 1 }[s] || 0;
}

function renderFindings() {
  const body = $("findings-body");
  const rows = [...view.findings];
  const { key, dir } = view.sort;
  if (key) {
    const val = (f) => (key === "severity" ? severityRank(f.severity) : key === "detected" ? Number(f.detected) : key === "display" ? f.display : f[key]);
    rows.sort((a, b) => (val(a) > val(b) ? 1 : val(a) < val(b) ? -1 : 0) * dir);
  }
  body.replaceChildren(...rows.map((f) => {
    const tr = el("tr", null, f.detected ? "detected" : "");
    tr.dataset.label = f.label;
    tr.setAttribute("aria-selected", String(f.label === view.selected));
    const name = el("th");
    name.scope = "row";
    const pick = el("button", f.display, "linkish");
    pick.type = "button";
    pick.title = "Show this finding's heatmap and regions";
    pick.addEventListener("click", () => selectFinding(f.label));
    name.append(pick);
    const prob = el("td", null, "num");
    const bar = el("span", null, "bar" + (f.detected ? " on" : ""));
    const fill = el("span");
    fill.style.width = ((f.probability || 0) * 100).toFixed(1) + "%";
    const mark = el("i");
    mark.style.left = ((f.threshold || 0) * 100).toFixed(1) + "%";
    bar.append(fill, mark);
    bar.setAttribute("aria-hidden", "true");
    prob.append(bar, document.createTextNode(F.pct(f.probability)));
    tr.append(name, prob, el("td", F.pct(f.threshold), "num"), el("td", f.severity + (f.critical ? " (critical)" : ""), "sev-" + f.severity),
      el("td", f.detected ? "yes" : "no"), el("td", F.pct(f.confidence, 0), "num"));
    return tr;
  }));
  document.querySelectorAll("#findings thead th[data-key]").forEach((th) => {
    th.setAttribute("aria-sort", th.dataset.key === key ? (dir > 0 ? "ascending" : "descending") : "none");
  });
}

function bindSorting() {
  document.querySelectorAll("#findings thead th[data-key] button").forEach((b) => {
    b.addEventListener("click", () => {
      const k = b.parentElement.dataset.key;
      const textual = k === "display";
      view.sort = view.sort.key === k ? { key: k, dir: -view.sort.dir } : { key: k, dir: textual ? 1 : -1 };
      renderFindings();
    });
  });
}

function jsonLink(ref, label) {
  const li = el("li");
  const b = el("button", label || ref, "linkish");
  b.type = "button";
  b.title = ref;
  b.addEventListener("click", async () => {
    const dialog = $("json-dialog");
    $("json-title").textContent = ref;
    $("json-body").textContent = "Loading...";
    dialog.showModal();
    try {
      $("json-body").textContent = JSON.stringify(await fhir(ref), null, 2);
    } catch (e) {
      $("json-body").textContent = e.message;
    }
  });
  const raw = el("a", "raw", "raw");
  raw.href = "/fhir/" + ref;
  raw.target = "_blank";
  raw.rel = "noopener";
  raw.setAttribute("aria-label", `${ref} as JSON in a new tab`);
  li.append(b, document.createTextNode(" "), raw);
  return li;
}

function clearView() {
  view.token += 1;
  Object.assign(view, { film: null, width: 0, height: 0, zoom: 1, panX: 0, panY: 0, selected: null, findings: [], mediaId: null, window: null });
  view.heat = new Map();
  view.heatMedia = new Map();
  $("findings-body").replaceChildren();
  $("heat-finding").replaceChildren();
  $("fhir-links").replaceChildren();
  $("report-text").textContent = "";
  $("v-impression").textContent = "";
  $("v-refusal").hidden = true;
  $("result").hidden = false;
  $("viewer-view").classList.remove("no-results");
  $("film").removeAttribute("data-loaded");
  $("wl-readout").textContent = "";
  draw();
}

function header(patient, date, source, triage) {
  $("v-patient").textContent = F.patientName(patient) || "Unknown patient";
  $("v-pid").textContent = F.patientId(patient) ? "ID " + F.patientId(patient) : "";
  $("v-date").textContent = date ? "Study " + F.formatDate(date) : "";
  $("v-source").textContent = source ? "Source: " + source : "";
  const t = $("triage");
  t.hidden = !triage;
  if (triage) { t.textContent = triage; t.className = "pill " + (triage === "urgent" ? "urgent" : triage === "routine" ? "routine" : "refused"); }
}

export async function openReport(id, config) {
  clearView();
  const token = view.token;
  $("v-title").focus();
  const bundle = await fhir(`/fhir/DiagnosticReport?_id=${encodeURIComponent(id)}&_include=DiagnosticReport:result&_include=DiagnosticReport:subject&_revinclude=Provenance:target`);
  const report = F.entries(bundle, "DiagnosticReport", "match")[0];
  if (!report) throw new Error(`DiagnosticReport/${id} was not found.`);
  if (token !== view.token) return;
  const refs = F.byRef(bundle);
  const input = F.inputRef(report);
  view.mediaId = input && input.startsWith("Media/") ? input.slice(6) : null;
  let inputMedia = null;
  if (view.mediaId) {
    const m = await fhir(`/fhir/Media?_id=${view.mediaId}&_summary=true`);
    inputMedia = F.entries(m, "Media")[0] || null;
  }
  const urgent = F.isUrgent(report, config.critical_findings);
  header(report.subject ? refs.get(report.subject.reference) : null, report.effectiveDateTime, F.sourceOf(input, inputMedia, config.upload_source), urgent ? "urgent" : "routine");
  const observations = (report.result || []).map((r) => refs.get(r.reference)).filter(Boolean);
  view.findings = observations.map(F.finding);
  const heatLinks = (report.media || []).filter((m) => m.comment !== "Analysed image");
  if (heatLinks.length) {
    const hb = await fhir(`/fhir/Media?_id=${heatLinks.map((m) => m.link.reference.slice(6)).join(",")}&_count=${heatLinks.length}`);
    for (const m of F.entries(hb, "Media")) {
      // identifier value "<analysis>#heatmap#<finding label>" (resources.build_heatmap)
      const ident = (m.identifier || []).find((i) => (i.value || "").includes("#heatmap#"));
      const label = ident ? ident.value.split("#heatmap#").pop() : null;
      if (label && view.findings.some((x) => x.label === label)) view.heatMedia.set(label, m);
    }
  }
  const model = F.modelOf(report);
  $("v-model").textContent = `${model.name}${model.version ? " version " + model.version : ""}`;
  const overall = (report.extension || []).find((x) => x.valueDecimal != null);
  $("v-confidence").textContent = overall ? F.pct(overall.valueDecimal, 0) : "";
  // the conclusion ends with the disclaimer, which the banner already shows on every screen
  $("v-impression").textContent = (report.conclusion || "").replace(config.disclaimer, "").trim();
  $("report-text").textContent = (report.presentedForm || []).map((p) => (p.data ? F.decodeBase64Text(p.data) : "")).join("\n\n");
  renderFindings();
  const select = $("heat-finding");
  select.replaceChildren(...view.findings.map((f) => {
    const o = el("option", `${f.display} (${F.pct(f.probability)})${view.heatMedia.has(f.label) ? "" : " - no heatmap"}`);
    o.value = f.label;
    return o;
  }));
  const links = $("fhir-links");
  links.append(jsonLink(`DiagnosticReport/${report.id}`, "DiagnosticReport"));
  observations.forEach((o) => links.append(jsonLink(`Observation/${o.id}`, `Observation: ${o.code.text || o.id}`)));
  F.entries(bundle, "Provenance").forEach((p) => links.append(jsonLink(`Provenance/${p.id}`, `Provenance (${F.formatDate(p.recorded)})`)));
  if (input) links.append(jsonLink(input, `Input ${input.split("/")[0]}`));
  const first = view.findings.find((f) => view.heatMedia.has(f.label)) || view.findings[0];
  const preset = (document.querySelector("input[name=preset]:checked") || {}).value || "default";
  await Promise.all([loadFilm(preset), first ? selectFinding(first.label) : Promise.resolve()]);
  $("viewer-view").dataset.ready = "true";
}

export async function openTask(id, config) {
  clearView();
  const bundle = await fhir(`/fhir/Task?_id=${encodeURIComponent(id)}&_include=Task:patient`);
  const task = F.entries(bundle, "Task", "match")[0];
  if (!task) throw new Error(`Task/${id} was not found.`);
  const refs = F.byRef(bundle);
  const focus = (task.focus || {}).reference || null;
  view.mediaId = focus && focus.startsWith("Media/") ? focus.slice(6) : null;
  let media = null;
  if (view.mediaId) media = F.entries(await fhir(`/fhir/Media?_id=${view.mediaId}&_summary=true`), "Media")[0] || null;
  header(task.for ? refs.get(task.for.reference) : null, task.authoredOn, F.sourceOf(focus, media, config.upload_source), task.status === "rejected" ? "refused" : "failed");
  $("result").hidden = true;
  $("viewer-view").classList.add("no-results");
  $("v-refusal").hidden = false;
  $("v-refusal-title").textContent = task.status === "rejected" ? "Not analysed: the image gate refused this image" : "Not analysed: the analysis failed";
  $("v-refusal-text").textContent = (task.statusReason || {}).text || "";
  $("fhir-links").append(jsonLink(`Task/${task.id}`, `Task (${task.status})`));
  if (focus) $("fhir-links").append(jsonLink(focus, `Input ${focus.split("/")[0]}`));
  await loadFilm((document.querySelector("input[name=preset]:checked") || {}).value || "default");
  $("viewer-view").dataset.ready = "true";
}

async function copyReport() {
  const text = $("report-text").textContent;
  try {
    await navigator.clipboard.writeText(text);
  } catch (e) { // no clipboard permission (e.g. plain http on another host): select + copy
    const area = document.createElement("textarea");
    area.value = text;
    document.body.append(area);
    area.select();
    document.execCommand("copy");
    area.remove();
  }
  $("copy-status").textContent = "Report text copied.";
  setTimeout(() => { $("copy-status").textContent = ""; }, 4000);
}

export function init() {
  bindCanvas();
  bindSorting();
  $("copy-report").addEventListener("click", copyReport);
  $("json-close").addEventListener("click", () => $("json-dialog").close());
}

export function leaving() {
  view.token += 1;
  $("viewer-view").dataset.ready = "false";
}
