"use strict";
// The upload page: POST the chosen file to /api/v1/predict?heatmaps=true and render the answer.
const $ = (id) => document.getElementById(id);

function text(tag, value, cls) {
  const el = document.createElement(tag);
  el.textContent = value;
  if (cls) el.className = cls;
  return el;
}

async function showModel() {
  try {
    const r = await fetch("/readyz");
    const body = await r.json();
    $("model").textContent = r.ok
      ? `Model: ${body.model} (${body.model_version})${body.untrained ? " - UNTRAINED DEMO" : ""}`
      : `Model not ready: ${body.reason || r.status}`;
  } catch (e) {
    $("model").textContent = "Server not reachable";
  }
}

// The access token lives in sessionStorage: this tab only, gone when it closes; never in a URL.
function authHeaders() {
  const token = ($("token").value || "").trim();
  return token ? { Authorization: "Bearer " + token } : {};
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = false;
}

function render(body) {
  const p = body.prediction;
  const m = body.metadata;
  // the banner carries every flag: untrained model, gate in warn mode, outside the validated population
  const flags = [m.untrained ? m.warning : null, ...(body.warnings || [])].filter(Boolean);
  $("untrained").hidden = flags.length === 0;
  $("untrained").textContent = flags.join(" ");
  const triage = $("triage");
  triage.textContent = p.triage;
  triage.className = "pill " + p.triage;
  $("confidence").textContent = (p.confidence_score * 100).toFixed(0) + " %";
  $("time").textContent = p.processing_time_ms + " ms";
  const img = m.image || {};
  $("imageinfo").textContent = [img.format, img.width && `${img.width}x${img.height}`, img.view_position, img.modality]
    .filter(Boolean).join(" - ");
  $("impression").textContent = p.impression;
  const rows = $("rows");
  rows.replaceChildren();
  const maps = $("heatmaps");
  maps.replaceChildren();
  for (const d of p.diagnoses) {
    const tr = document.createElement("tr");
    if (d.detected) tr.className = "detected";
    tr.appendChild(text("td", d.display || d.condition));
    const cell = document.createElement("td");
    const bar = document.createElement("span");
    bar.className = "bar" + (d.detected ? " on" : "");
    const fill = document.createElement("span");
    fill.style.width = (d.probability * 100).toFixed(1) + "%";
    const mark = document.createElement("i");
    mark.style.left = (d.threshold * 100).toFixed(1) + "%";
    mark.title = "threshold " + d.threshold;
    bar.append(fill, mark);
    cell.append(bar, document.createTextNode((d.probability * 100).toFixed(1) + " %"));
    tr.appendChild(cell);
    tr.appendChild(text("td", d.detected ? "yes" : "no"));
    tr.appendChild(text("td", d.severity, "sev-" + d.severity));
    tr.appendChild(text("td", (d.regions || []).map((b) => `[${b.join(", ")}]`).join(" ")));
    rows.appendChild(tr);
    if (d.heatmap_png) {
      const fig = document.createElement("figure");
      const im = document.createElement("img");
      im.src = "data:image/png;base64," + d.heatmap_png;
      im.alt = "Grad-CAM overlay for " + (d.display || d.condition);
      fig.append(im, text("figcaption", `${d.display || d.condition}: ${(d.probability * 100).toFixed(1)} %`));
      maps.appendChild(fig);
    }
  }
  if (!maps.children.length) maps.appendChild(text("p", "No overlay was produced.", "muted"));
  $("report").textContent = p.report;
  $("result").hidden = false;
}

async function analyse(file) {
  $("error").hidden = true;
  $("result").hidden = true;
  $("status").textContent = `Analysing ${file.name} (${(file.size / 1024).toFixed(0)} KB)...`;
  const form = new FormData();
  form.append("image", file, file.name);
  try {
    const r = await fetch("/api/v1/predict?heatmaps=true", { method: "POST", body: form, headers: authHeaders() });
    if (r.status === 401) {
      $("status").textContent = "";
      $("auth").open = true;
      showError("This server requires an access token (expired or missing): paste a current one under \"Access token\".");
      return;
    }
    let body = null;
    try { body = await r.json(); } catch (e) { /* not JSON */ }
    $("status").textContent = "";
    if (!r.ok || !body || body.status !== "success") {
      const msg = body && body.error ? body.error.message : `The server answered ${r.status}.`;
      showError(`Not analysed: ${msg}`);
      return;
    }
    render(body);
  } catch (e) {
    $("status").textContent = "";
    showError("The server could not be reached. " + e);
  }
}

const drop = $("drop");
const input = $("file");
drop.addEventListener("click", (e) => { if (e.target.tagName !== "LABEL") input.click(); });
drop.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") input.click(); });
input.addEventListener("change", () => { if (input.files.length) analyse(input.files[0]); input.value = ""; });
["dragenter", "dragover"].forEach((t) => drop.addEventListener(t, (e) => { e.preventDefault(); drop.classList.add("over"); }));
["dragleave", "drop"].forEach((t) => drop.addEventListener(t, (e) => { e.preventDefault(); drop.classList.remove("over"); }));
drop.addEventListener("drop", (e) => { if (e.dataTransfer.files.length) analyse(e.dataTransfer.files[0]); });
$("token").value = sessionStorage.getItem("cxr-access-token") || "";
$("token").addEventListener("change", () => sessionStorage.setItem("cxr-access-token", $("token").value.trim()));
showModel();
