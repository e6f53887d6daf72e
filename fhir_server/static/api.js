// HTTP for the page: every call carries the bearer token (kept in sessionStorage only, so it
// dies with the tab), a 401 asks for a token once and retries, errors become readable sentences.
const TOKEN_KEY = "cxr-fhir-token";
let asking = null; // one token prompt at a time, shared by every waiting request

export function token() {
  return sessionStorage.getItem(TOKEN_KEY);
}

export function setToken(value) {
  if (value) sessionStorage.setItem(TOKEN_KEY, value);
  else sessionStorage.removeItem(TOKEN_KEY);
  document.dispatchEvent(new CustomEvent("cxr-token"));
}

export class HttpError extends Error {
  constructor(status, message, code) {
    super(message);
    this.status = status;
    this.code = code || null;
  }
}

// Shows the token dialog; resolves when a token was entered (rejects when dismissed).
export function askToken(reason) {
  if (asking) return asking;
  const dialog = document.getElementById("token-dialog");
  const input = document.getElementById("token-input");
  document.getElementById("token-reason").textContent = reason || "This server requires a bearer token.";
  input.value = "";
  asking = new Promise((resolve, reject) => {
    const done = () => {
      dialog.removeEventListener("close", done);
      asking = null;
      const value = dialog.returnValue === "ok" ? input.value.trim() : "";
      if (value) { setToken(value); resolve(value); } else reject(new HttpError(401, "A bearer token is required to use this server."));
    };
    dialog.addEventListener("close", done);
  });
  dialog.showModal();
  input.focus();
  return asking;
}

function withAuth(headers) {
  const h = new Headers(headers || {});
  const t = token();
  if (t) h.set("Authorization", "Bearer " + t);
  return h;
}

async function readError(response) {
  let body = null;
  try { body = await response.json(); } catch (e) { /* not JSON */ }
  return describe(response.status, body);
}

// A sentence for a failed answer: OperationOutcome diagnostics, legacy JSON errors, OAuth errors.
export function describe(status, body) {
  if (body && body.resourceType === "OperationOutcome" && Array.isArray(body.issue)) {
    const issue = body.issue.find((i) => i.severity === "error" || i.severity === "fatal") || body.issue[0] || {};
    const code = issue.details && issue.details.text ? issue.details.text : issue.code;
    return new HttpError(status, issue.diagnostics || `The server answered ${status}.`, code);
  }
  if (body && body.error && body.error.message) return new HttpError(status, body.error.message, body.error.code);
  if (body && body.detail) return new HttpError(status, typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail));
  if (status === 503) return new HttpError(status, "The server is busy or its model is not loaded; try again shortly.");
  return new HttpError(status, `The server answered ${status}.`);
}

export async function request(url, options = {}) {
  for (;;) {
    let response;
    try {
      response = await fetch(url, { ...options, headers: withAuth(options.headers) });
    } catch (e) {
      throw new HttpError(0, "The server could not be reached.");
    }
    if (response.status === 401) {
      const err = await readError(response);
      setToken(null);
      await askToken(token() ? "The token was not accepted: " + err.message : err.message);
      continue;
    }
    if (!response.ok) throw await readError(response);
    return response;
  }
}

export async function fhir(path, options = {}) {
  const headers = { Accept: "application/fhir+json", ...(options.headers || {}) };
  const response = await request(path.startsWith("/") ? path : "/fhir/" + path, { ...options, headers });
  return response.json();
}

// POST with upload progress (fetch has none). onProgress(fraction) while sending.
export function postWithProgress(url, body, contentType, onProgress) {
  const send = () => new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open("POST", url);
    xhr.setRequestHeader("Content-Type", contentType);
    xhr.setRequestHeader("Accept", "application/fhir+json");
    const t = token();
    if (t) xhr.setRequestHeader("Authorization", "Bearer " + t);
    xhr.upload.onprogress = (e) => { if (e.lengthComputable) onProgress(e.loaded / e.total); };
    xhr.upload.onload = () => onProgress(1);
    xhr.onerror = () => reject(new HttpError(0, "The server could not be reached."));
    xhr.onload = () => {
      let parsed = null;
      try { parsed = JSON.parse(xhr.responseText); } catch (e) { /* not JSON */ }
      resolve({ status: xhr.status, body: parsed });
    };
    xhr.send(body);
  });
  return (async () => {
    for (;;) {
      const answer = await send();
      if (answer.status === 401) {
        setToken(null);
        await askToken(describe(401, answer.body).message);
        continue;
      }
      if (answer.status >= 400) throw describe(answer.status, answer.body);
      return answer.body;
    }
  })();
}
