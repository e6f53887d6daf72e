// Upload: each file goes through FHIR Media/$analyze (so it lands in the worklist like anything an
// EHR sends), one at a time, with its own progress and a plain-language answer.
import { fhir, postWithProgress } from "./api.js";
import * as F from "./fhir.js";

const $ = (id) => document.getElementById(id);
const MRN_SYSTEM = "urn:cxr-fhir:web-page:patient-id"; // identifiers typed on this page
let config = null;
let onDone = () => {};

// Headline per error code (ml.errors / imaging); the server's own sentence follows it.
const HEADLINES = {
  not_chest_xray: "Refused: this does not look like a frontal chest radiograph.",
  unsupported_format: "Refused: not an image the server can read.",
  unsupported_media_type: "Refused: not an image the server can read.",
  unsupported_dicom: "Refused: this DICOM object is not a single-frame chest radiograph.",
  corrupt_image: "Refused: the image could not be decoded.",
  input_too_large: "Refused: the file is too large.",
  empty_input: "Refused: the file is empty.",
  server_busy: "Not analysed: the server is busy. Try again in a moment.",
  model_unavailable: "Not analysed: the model is not loaded on the server.",
};

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text != null) e.textContent = text;
  if (cls) e.className = cls;
  return e;
}

function contentType(file) {
  if (file.type && file.type !== "application/octet-stream") return file.type;
  const name = file.name.toLowerCase();
  if (name.endsWith(".png")) return "image/png";
  if (name.endsWith(".jpg") || name.endsWith(".jpeg")) return "image/jpeg";
  return "application/dicom"; // .dcm, .dicom and DICOM files without an extension
}

function readBase64(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(String(reader.result).slice(String(reader.result).indexOf(",") + 1));
    reader.onerror = () => reject(new Error(`${file.name} could not be read.`));
    reader.readAsDataURL(file);
  });
}

// The patient typed on the page, if any: found by identifier or created (conditional create).
async function patientReference() {
  const name = $("u-name").value.trim();
  const ident = $("u-id").value.trim();
  if (!name && !ident) return null;
  const patient = { resourceType: "Patient" };
  if (ident) patient.identifier = [{ system: MRN_SYSTEM, value: ident }];
  if (name) {
    const parts = name.split(/\s+/);
    patient.name = [{ text: name, family: parts.length > 1 ? parts[parts.length - 1] : name, given: parts.length > 1 ? parts.slice(0, -1) : undefined }];
  }
  const headers = { "Content-Type": "application/fhir+json", Prefer: "return=representation" };
  if (ident) headers["If-None-Exist"] = new URLSearchParams({ identifier: `${MRN_SYSTEM}|${ident}` }).toString();
  const stored = await fhir("/fhir/Patient", { method: "POST", headers, body: JSON.stringify(patient) });
  return { reference: `Patient/${stored.id}`, display: name || ident };
}

function row(file) {
  const li = el("li", null, "upload-item");
  const name = el("span", file.name, "u-file");
  name.title = file.name;
  const size = el("span", `${(file.size / 1024 / 1024).toFixed(file.size > 1e6 ? 1 : 2)} MB`, "muted");
  const bar = el("progress");
  bar.max = 100;
  bar.value = 0;
  bar.setAttribute("aria-label", `Upload progress of ${file.name}`);
  const status = el("span", "Waiting", "u-status");
  li.append(name, size, bar, status);
  $("upload-list").append(li);
  return { li, bar, status };
}

async function send(file, subject, ui) {
  ui.status.textContent = "Reading";
  const data = await readBase64(file);
  const media = {
    resourceType: "Media",
    meta: { source: config.upload_source },
    status: "completed",
    type: { coding: [{ system: "http://terminology.hl7.org/CodeSystem/media-type", code: "image", display: "Image" }] },
    content: { contentType: contentType(file), data, title: file.name, size: file.size },
  };
  if (subject) media.subject = subject;
  const body = JSON.stringify({ resourceType: "Parameters", parameter: [{ name: "media", resource: media }] });
  ui.status.textContent = "Uploading";
  const bundle = await postWithProgress("/fhir/Media/$analyze", body, "application/fhir+json", (f) => {
    ui.bar.value = Math.round(f * 90);
    if (f >= 1) ui.status.textContent = "Analysing";
  });
  ui.bar.value = 100;
  // warnings the server attached to the result (e.g. an image outside the validated population)
  ui.warnings = F.entries(bundle, "OperationOutcome").flatMap((o) => (o.issue || []).map((i) => i.diagnostics).filter(Boolean));
  return F.entries(bundle, "DiagnosticReport")[0];
}

export async function uploadFiles(files) {
  const list = [...files];
  if (!list.length) return;
  config = await config; // bound before the page's config arrived: a file chosen at once still goes
  $("upload-error").hidden = true;
  let subject = null;
  try {
    subject = await patientReference();
  } catch (e) {
    $("upload-error").textContent = "The patient could not be recorded: " + e.message;
    $("upload-error").hidden = false;
    return;
  }
  const rows = list.map(row);
  const reports = [];
  for (let i = 0; i < list.length; i++) {
    const ui = rows[i];
    try {
      const report = await send(list[i], subject, ui);
      const urgent = F.isUrgent(report, config.critical_findings);
      ui.li.classList.add("done");
      ui.status.replaceChildren();
      const pill = el("span", urgent ? "urgent" : "routine", "pill " + (urgent ? "urgent" : "routine"));
      const link = el("a", "Open report");
      link.href = `#/report/${report.id}`;
      link.setAttribute("aria-label", `Open the report of ${list[i].name}`);
      ui.status.append(pill, document.createTextNode(" " + F.topFinding(report) + " "), link);
      if (ui.warnings && ui.warnings.length) ui.status.append(el("span", "Warning: " + ui.warnings.join(" "), "u-warning"));
      reports.push(report);
    } catch (e) {
      ui.li.classList.add("failed");
      ui.bar.value = 100;
      const headline = HEADLINES[e.code] || (e.status ? "Not analysed." : "Not sent: the server could not be reached.");
      ui.status.replaceChildren(el("strong", headline), document.createTextNode(" " + e.message));
      ui.status.setAttribute("role", "alert");
    }
  }
  onDone(reports, list.length);
}

export function init(cfg, done) {
  config = cfg; // the config, or a promise of it
  onDone = done;
  const input = $("file");
  const drop = $("drop");
  $("choose").addEventListener("click", () => input.click());
  input.addEventListener("change", () => { const files = [...input.files]; input.value = ""; uploadFiles(files); });
  ["dragenter", "dragover"].forEach((t) => drop.addEventListener(t, (e) => { e.preventDefault(); drop.classList.add("over"); }));
  ["dragleave", "drop"].forEach((t) => drop.addEventListener(t, (e) => { e.preventDefault(); drop.classList.remove("over"); }));
  drop.addEventListener("drop", (e) => uploadFiles(e.dataTransfer.files));
  $("upload-clear").addEventListener("click", () => $("upload-list").replaceChildren());
}
