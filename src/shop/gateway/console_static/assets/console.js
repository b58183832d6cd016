// The operations console (docs/console.md): log in as an admin through the public API,
// then poll the gateway's admin-only /console/api/services every few seconds.
// The token lives in sessionStorage (this tab only, gone when it closes), never in a URL.
"use strict";

const TOKEN_KEY = "shop.console.token";
const POLL_MS = 3000;
let timer = null;

const $ = (id) => document.getElementById(id);

function show(loggedIn) {
  $("login").hidden = loggedIn;
  $("overview").hidden = !loggedIn;
  $("logout").hidden = !loggedIn;
}

function loggedOut(message) {
  sessionStorage.removeItem(TOKEN_KEY);
  clearTimeout(timer);
  $("login-error").textContent = message || "";
  show(false);
}

async function detailOf(response) {
  try {
    const body = await response.json();
    return body.detail || body.title || `HTTP ${response.status}`;
  } catch {
    return `HTTP ${response.status}`;
  }
}

async function logIn(event) {
  event.preventDefault();
  $("login-error").textContent = "";
  const response = await fetch("/auth/token", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ email: $("email").value, password: $("password").value }),
  });
  if (!response.ok) {
    $("login-error").textContent = `Log-in refused: ${await detailOf(response)}`;
    return;
  }
  const { access_token: token } = await response.json();
  sessionStorage.setItem(TOKEN_KEY, token);
  $("password").value = "";
  show(true);
  poll();
}

function cell(text, status) {
  const td = document.createElement("td");
  td.textContent = text;
  if (status) {
    td.className = `status status-${text}`;
  }
  return td;
}

function render(overview) {
  const registry = $("registry-status");
  registry.textContent = overview.registry;
  registry.className = `status status-${overview.registry}`;
  const rows = [];
  for (const service of overview.services) {
    for (const instance of service.instances) {
      const row = document.createElement("tr");
      row.dataset.service = service.name;
      row.dataset.instance = instance.id;
      row.append(
        cell(service.name),
        cell(instance.id),
        cell(instance.url),
        cell(instance.registry, true),
        cell(instance.health, true),
      );
      row.lastChild.classList.add("health");
      rows.push(row);
    }
  }
  $("services").replaceChildren(...rows);
  $("updated").textContent = new Date().toLocaleTimeString();
}

async function poll() {
  clearTimeout(timer);
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (!token) {
    loggedOut();
    return;
  }
  try {
    const response = await fetch("/console/api/services", {
      headers: { Authorization: `Bearer ${token}` },
      cache: "no-store",
    });
    if (response.status === 401) {
      loggedOut("Your session has ended: log in again.");
      return;
    }
    if (response.status === 403) {
      loggedOut("The console is for admins only: this account is not one.");
      return;
    }
    if (!response.ok) {
      $("poll-error").textContent = `(last refresh failed: ${await detailOf(response)})`;
    } else {
      $("poll-error").textContent = "";
      render(await response.json());
    }
  } catch (error) {
    $("poll-error").textContent = `(gateway unreachable: ${error.message})`;
  }
  timer = setTimeout(poll, POLL_MS);
}

function logOut() {
  loggedOut("Logged out.");
}

document.addEventListener("DOMContentLoaded", () => {
  $("login-form").addEventListener("submit", logIn);
  $("logout").addEventListener("click", logOut);
  if (sessionStorage.getItem(TOKEN_KEY)) {
    show(true);
    poll();
  } else {
    show(false);
  }
});
