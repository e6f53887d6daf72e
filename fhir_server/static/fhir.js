// Reading the server's FHIR resources for display. The shapes are documented in README.md (FHIR).

export function entries(bundle, type, mode) {
  return (bundle.entry || [])
    .filter((e) => e.resource && (!type || e.resource.resourceType === type) && (!mode || (e.search || {}).mode === mode))
    .map((e) => e.resource);
}

export function byRef(bundle) {
  const map = new Map();
  for (const e of bundle.entry || []) if (e.resource) map.set(`${e.resource.resourceType}/${e.resource.id}`, e.resource);
  return map;
}

export function nextLink(bundle) {
  const link = (bundle.link || []).find((l) => l.relation === "next");
  return link ? relative(link.url) : null;
}

export function prevLink(bundle) {
  const link = (bundle.link || []).find((l) => l.relation === "previous" || l.relation === "prev");
  return link ? relative(link.url) : null;
}

// Paging links are absolute ([base]/...); the page always talks to its own origin.
function relative(url) {
  try { const u = new URL(url, location.href); return u.pathname + u.search; } catch (e) { return url; }
}

export function patientName(patient) {
  if (!patient) return "";
  const n = (patient.name || [])[0];
  if (!n) return "";
  if (n.text) return n.text;
  return [...(n.given || []), n.family].filter(Boolean).join(" ");
}

export function patientId(patient) {
  const id = ((patient && patient.identifier) || []).find((i) => i.value);
  return id ? id.value : "";
}

// "Media/x#cxr:pneumonia-v1@2025.1" -> {name, version}; the report identifier names the model run.
export function modelOf(report) {
  const ident = (report.identifier || []).find((i) => (i.value || "").includes("#"));
  if (!ident) return { name: "", version: "" };
  const tail = ident.value.slice(ident.value.lastIndexOf("#") + 1);
  const at = tail.lastIndexOf("@");
  return at < 0 ? { name: tail, version: "" } : { name: tail.slice(0, at), version: tail.slice(at + 1) };
}

export function inputRef(report) {
  if ((report.imagingStudy || []).length) return report.imagingStudy[0].reference;
  const analysed = (report.media || []).find((m) => m.comment === "Analysed image");
  return analysed ? analysed.link.reference : null;
}

// upload (this page), PACS (an ImagingStudy fetched over DICOMweb), FHIR (anyone else's Media)
export function sourceOf(inputReference, media, uploadSource) {
  if (!inputReference) return "FHIR";
  if (inputReference.startsWith("ImagingStudy/")) return "PACS";
  if (media && media.meta && media.meta.source === uploadSource) return "Upload";
  return "FHIR";
}

export function isUrgent(report, critical) {
  const codes = new Set(critical.map((c) => `${c.system}|${c.code}`));
  return (report.conclusionCode || []).some((cc) => (cc.coding || []).some((c) => codes.has(`${c.system}|${c.code}`)));
}

// the server's impression prefix for a film outside the model's validated population (ml/findings.py)
export const OUTSIDE_POPULATION = "OUTSIDE THE VALIDATED POPULATION";

export function isOutsidePopulation(report) {
  return (report.conclusion || "").includes(OUTSIDE_POPULATION);
}

export function topFinding(report) {
  if (isOutsidePopulation(report)) return "Not interpreted: outside the model's validated population";
  const first = (report.conclusionCode || [])[0];
  if (!first) return "No finding above threshold";
  return first.text || ((first.coding || [])[0] || {}).display || "";
}

export function formatDate(value) {
  if (!value) return "";
  const d = new Date(value);
  if (Number.isNaN(d.getTime())) return value;
  const pad = (n) => String(n).padStart(2, "0");
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ${pad(d.getHours())}:${pad(d.getMinutes())}`;
}

export function decodeBase64Text(data) {
  const bytes = Uint8Array.from(atob(data), (c) => c.charCodeAt(0));
  return new TextDecoder("utf-8").decode(bytes);
}

export function base64ToBlob(data, type) {
  const bytes = Uint8Array.from(atob(data), (c) => c.charCodeAt(0));
  return new Blob([bytes], { type });
}

function noteValue(obs, prefix) {
  const note = (obs.note || []).find((n) => (n.text || "").startsWith(prefix));
  return note ? note.text.slice(prefix.length).trim() : "";
}

// One row of the findings table from an Observation (see resources.build_observation).
export function finding(obs) {
  const p = obs.valueQuantity ? obs.valueQuantity.value : null;
  const range = (obs.referenceRange || [])[0];
  const t = range && range.high ? range.high.value : null;
  const interp = (((obs.interpretation || [])[0] || {}).coding || [])[0] || {};
  const severity = (noteValue(obs, "Severity:").split(" ")[0] || "none").toLowerCase();
  const boxes = noteValue(obs, "Regions (x1,y1,x2,y2 in original image pixels):")
    .split(";").map((s) => s.split(",").map(Number)).filter((b) => b.length === 4 && b.every(Number.isFinite));
  const local = (obs.code.coding || []).find((c) => c.system === "http://cxr-fhir.org/fhir/CodeSystem/cxr-findings");
  return {
    id: obs.id,
    label: local ? local.code : obs.id,
    display: obs.code.text || (local && local.display) || "",
    probability: p,
    threshold: t,
    detected: interp.code === "POS",
    interpretation: interp.display || interp.code || "",
    severity,
    critical: noteValue(obs, "Severity:").includes("critical"),
    confidence: confidence(p, t),
    boxes,
  };
}

// README "How findings are scored": sigmoid(|logit(p) - logit(t)|), 0.5 at the operating point.
export function confidence(p, t) {
  if (p == null || t == null) return null;
  const clamp = (x) => Math.min(1 - 1e-6, Math.max(1e-6, x));
  const logit = (x) => Math.log(clamp(x) / (1 - clamp(x)));
  return 1 / (1 + Math.exp(-Math.abs(logit(p) - logit(t))));
}

export function pct(x, digits = 1) {
  return x == null ? "" : (x * 100).toFixed(digits) + " %";
}
