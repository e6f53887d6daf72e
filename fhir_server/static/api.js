// HTTP for the page: every call carries the bearer token (kept in sessionStorage only, so it
// dies with the tab), a 401 opens the token field and retries once a token is entered, errors
// become readable sentences.
const TOKEN_KEY = "cxr-access-token";
let waiting = null; // requests waiting for a token share one promise

export function token() {
  return sessionStorage.getItem(TOKEN_KEY);
}

export function setToken(value) {
  if (value) sessionStorage.setItem(TOKEN_KEY, value);
  else sessionStorage.removeItem(TOKEN_KEY);
  document.getElementById("token").value = value || "";
  if (value && waiting) {
    document.getElementById("error").hidden = true;
    waiting.resolve(value);
    waiting = null;
  }
  document.dispatchEvent(new CustomEvent("cxr-token"));
}

export class HttpError extends Error {
  constructor(status, message, code) {
    super(message);
    this.status = status;
    this.code = code || null;
  }
}

// Opens the access token field with the reason; resolves when a token is entered there.
export function askToken(reason) {
  const details = document.getElementById("auth");
  const error = document.getElementById("error");
  details.hidden = false;
  details.open = true;
  error.textContent = `This server requires an access token (${reason}): paste a current one under "Access token".`;
  error.hidden = false;
  document.getElementById("token").focus();
  if (!waiting) {
    let resolve;
    const promise = new Promise((r) => { resolve = r; });
    waiting = { promise, resolve };
  }
  return waiting.promise;
}

// A 401 for a request sent with a token: that token is dropped (unless another one was entered
// meanwhile) and the reason says it was refused, whichever waiting request reports first.
function rejected(sent, why) {
  if (!sent) return why;
  if (token() === sent) setToken(null);
  return "the token was not accepted: " + why;
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
    const sent = token();
    try {
      response = await fetch(url, { ...options, headers: withAuth(options.headers) });
    } catch (e) {
      throw new HttpError(0, "The server could not be reached.");
    }
    if (response.status === 401) {
      await askToken(rejected(sent, (await readError(response)).message));
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
      const sent = token();
      const answer = await send();
      if (answer.status === 401) {
        await askToken(rejected(sent, describe(401, answer.body).message));
        continue;
      }
      if (answer.status >= 400) throw describe(answer.status, answer.body);
      return answer.body;
    }
  })();
}
