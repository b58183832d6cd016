// The shopper's tokens and every call to the public API (docs/storefront.md, Tokens).
// Both tokens live in this tab's sessionStorage: never in a URL, a cookie or localStorage.
const KEY = "shop.session";
// Refresh this long before the access token expires.
const EARLY_MS = 60_000;

export function current() {
  try {
    const raw = JSON.parse(sessionStorage.getItem(KEY) || "null");
    return raw && raw.access && raw.refresh ? raw : null;
  } catch {
    return null;
  }
}

function save(value) {
  sessionStorage.setItem(KEY, JSON.stringify(value));
}

export function forget() {
  sessionStorage.removeItem(KEY);
}

function fromPair(pair, user) {
  return {
    access: pair.access_token,
    refresh: pair.refresh_token,
    expiresAt: Date.now() + Number(pair.expires_in || 900) * 1000,
    user,
  };
}

async function send(path, { method = "GET", body, headers = {}, token } = {}) {
  const init = { method, headers: { Accept: "application/json", ...headers } };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  if (token) init.headers.Authorization = `Bearer ${token}`;
  let response;
  try {
    response = await fetch(path, init);
  } catch {
    return { status: 0, ok: false, headers: new Headers(), body: { detail: "The shop could not be reached; check your connection." } };
  }
  const type = response.headers.get("content-type") || "";
  let data = null;
  if (type.includes("json")) {
    try { data = await response.json(); } catch { data = null; }
  }
  return { status: response.status, ok: response.ok, headers: response.headers, body: data };
}

export async function signIn(email, password) {
  const answer = await send("/auth/token", { method: "POST", body: { email, password } });
  if (!answer.ok) return answer;
  const me = await send("/auth/me", { token: answer.body.access_token });
  save(fromPair(answer.body, me.ok ? me.body : { email, roles: ["customer"] }));
  schedule();
  return answer;
}

export async function signOut() {
  const held = current();
  forget();
  if (held) {
    await send("/auth/logout", { method: "POST", body: { refresh_token: held.refresh }, token: held.access });
  }
}

let refreshing = null;
let timer = null;

// One refresh at a time: the refresh token rotates, and a spent one revokes the family.
export function refresh() {
  if (!refreshing) {
    refreshing = (async () => {
      const held = current();
      if (!held) return false;
      const answer = await send("/auth/refresh", { method: "POST", body: { refresh_token: held.refresh } });
      if (answer.ok) {
        save(fromPair(answer.body, held.user));
        schedule();
        return true;
      }
      if (answer.status === 401) forget();
      return false;
    })().finally(() => { refreshing = null; });
  }
  return refreshing;
}

export function schedule() {
  clearTimeout(timer);
  const held = current();
  if (!held) return;
  const wait = Math.max(1_000, held.expiresAt - Date.now() - EARLY_MS);
  timer = setTimeout(refresh, wait);
}

// A call with the shopper's token: refreshed first when about to expire, and once more
// (then retried once) when the API says 401.
export async function api(path, options = {}) {
  let held = current();
  if (held && held.expiresAt - Date.now() < EARLY_MS) {
    await refresh();
    held = current();
  }
  let answer = await send(path, { ...options, token: held && held.access });
  if (answer.status === 401 && held) {
    if (await refresh()) answer = await send(path, { ...options, token: current().access });
  }
  return answer;
}

export function publicCall(path, options = {}) {
  return send(path, options);
}

// Seconds from a Retry-After header (seconds or an HTTP date), at least 1.
export function retryAfter(headers, fallback = 2) {
  const raw = headers.get("retry-after");
  if (!raw) return fallback;
  const seconds = Number(raw);
  if (Number.isFinite(seconds)) return Math.max(1, Math.ceil(seconds));
  const when = Date.parse(raw);
  return Number.isFinite(when) ? Math.max(1, Math.ceil((when - Date.now()) / 1000)) : fallback;
}
