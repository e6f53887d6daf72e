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
  $("auth").hidden = !(config && config.auth_enabled);
  $("auth-state").textContent = token() ? "(set for this tab)" : "(none)";
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
  const useToken = () => { const v = $("token").value.trim(); if (v) { setToken(v); $("auth").open = false; } };
  $("token-form").addEventListener("submit", (e) => { e.preventDefault(); useToken(); });
  $("token").addEventListener("change", useToken);
  $("auth-forget").addEventListener("click", () => setToken(null));
  document.addEventListener("cxr-token", showAuth);
  $("token").value = token() || "";
  showModel();
  const configured = fetch("/web/api/config").then((r) => r.json());
  // the upload listens from the first moment; a file chosen before the config arrives waits for it
  upload.init(configured, (reports, total) => {
    worklist.refresh();
    if (total === 1 && reports.length === 1) location.hash = `#/report/${reports[0].id}`;
  });
  config = await configured;
  showAuth();
  if (config.auth_enabled && !token()) askToken("none is set for this tab yet");
  viewer.init();
  window.addEventListener("hashchange", route);
  const listed = worklist.init(config);
  if (token() || !config.auth_enabled) await listed; // else it waits for the token; the page is usable
  if (location.hash && location.hash !== "#/") await route();
  document.body.dataset.ready = "true";
}

main();
