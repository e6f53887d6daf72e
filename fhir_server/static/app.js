// The reading page: worklist + upload (#/), viewer (#/report/<id>, #/task/<id>). Plain ES2020
// modules, no build step and nothing from outside this server, so it works offline.
import { askToken, setToken, token } from "./api.js";
import * as upload from "./upload.js";
import * as viewer from "./viewer.js";
import * as worklist from "./worklist.js";

const $ = (id) => document.getElementById(id);
let config = null;

async function showModel() {
  try {
    const r = await fetch("/readyz");
    const body = await r.json();
    $("model").textContent = r.ok
      ? `Model ${body.model} (${body.model_version})${body.untrained ? " - UNTRAINED DEMO, not for clinical use" : ""}`
      : `Model not ready: ${body.reason || r.status}`;
  } catch (e) {
    $("model").textContent = "Server not reachable";
  }
}

function showAuth() {
  const on = config && config.auth_enabled;
  $("auth").hidden = !on;
  $("auth-state").textContent = token() ? "Token set for this tab" : "No token";
  $("auth-forget").hidden = !token();
}

async function route() {
  const hash = location.hash || "#/";
  const m = hash.match(/^#\/(report|task)\/([A-Za-z0-9\-.]{1,64})$/);
  $("viewer-view").hidden = !m;
  $("worklist-view").hidden = Boolean(m);
  if (!m) {
    viewer.leaving();
    document.title = "Worklist - CXR-FHIR";
    await worklist.refresh();
    return;
  }
  document.title = "Viewer - CXR-FHIR";
  $("viewer-error").hidden = true;
  try {
    if (m[1] === "report") await viewer.openReport(m[2], config);
    else await viewer.openTask(m[2], config);
  } catch (e) {
    $("viewer-error").textContent = e.message;
    $("viewer-error").hidden = false;
  }
}

async function main() {
  $("token-form").addEventListener("submit", () => { /* method=dialog closes it with returnValue "ok" */ });
  $("auth-change").addEventListener("click", () => askToken("Enter the bearer token for this server.").then(route, () => {}));
  $("auth-forget").addEventListener("click", () => { setToken(null); showAuth(); });
  document.addEventListener("cxr-token", showAuth);
  showModel();
  config = await (await fetch("/web/api/config")).json();
  showAuth();
  if (config.auth_enabled && !token()) {
    try { await askToken("This server requires a bearer token. It is kept for this browser tab only."); } catch (e) { /* shown by the 401 path */ }
  }
  viewer.init();
  upload.init(config, (reports, total) => {
    worklist.refresh();
    if (total === 1 && reports.length === 1) location.hash = `#/report/${reports[0].id}`;
  });
  await worklist.init(config);
  window.addEventListener("hashchange", route);
  if (location.hash && location.hash !== "#/") await route();
  document.body.dataset.ready = "true";
}

main();
