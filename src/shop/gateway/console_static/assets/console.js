// The operations console (docs/console.md): log in as an admin through the public API,
// then poll the gateway's admin-only /console/api/services every few seconds: health (and
// why, when DEGRADED), breaker, outbox backlog, consumer lag and orders/s per instance, and
// the latest orders with links to their traces (when the gateway knows a trace UI).
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

// "–" where an instance does not export that figure (no breaker, outbox or consumer).
const NONE = "–";

function number(value, digits = 0) {
  return value === null || value === undefined ? NONE : value.toFixed(digits);
}

// The health word, and under it each reason a DEGRADED (or DOWN) instance gives.
function healthCell(instance) {
  const td = document.createElement("td");
  td.className = "health";
  const word = document.createElement("span");
  word.className = `status status-${instance.health}`;
  word.textContent = instance.health;
  td.append(word);
  const reasons = Object.entries(instance.reasons || {});
  if (reasons.length > 0) {
    const list = document.createElement("ul");
    list.className = "reasons";
    for (const [check, reason] of reasons) {
      const item = document.createElement("li");
      item.dataset.check = check;
      item.textContent = `${check}: ${reason}`;
      list.append(item);
    }
    td.append(list);
  }
  return td;
}

// One line per peer: "inventory-service: open".
function breakerCell(breaker) {
  const td = document.createElement("td");
  td.className = "breaker";
  const peers = Object.entries(breaker || {});
  if (peers.length === 0) {
    td.textContent = NONE;
  }
  for (const [peer, state] of peers) {
    const line = document.createElement("div");
    line.className = `breaker-state breaker-${state}`;
    line.dataset.peer = peer;
    line.dataset.state = state;
    line.textContent = `${peer}: ${state}`;
    td.append(line);
  }
  return td;
}

function outboxCell(instance) {
  const td = cell(number(instance.outboxBacklog));
  td.className = "outbox";
  if (instance.outboxBacklog) {
    td.textContent += ` (oldest ${number(instance.outboxOldestAgeS, 1)} s)`;
  }
  return td;
}

function lagCell(lag) {
  const td = document.createElement("td");
  td.className = "lag";
  const groups = Object.entries(lag || {});
  td.textContent = groups.length === 0 ? NONE : groups.map(([g, n]) => `${g} ${n}`).join(", ");
  return td;
}

// A link to the order's trace in the trace UI the gateway was given (its URL, checked to be
// http(s) here too); without one, the trace id as text.
function traceCell(order) {
  const td = document.createElement("td");
  td.className = "trace";
  if (!order.traceId) {
    td.textContent = NONE;
    return td;
  }
  let url = null;
  try {
    url = order.traceUrl ? new URL(order.traceUrl) : null;
  } catch {
    url = null;
  }
  if (url && (url.protocol === "http:" || url.protocol === "https:")) {
    const link = document.createElement("a");
    link.href = url.href;
    link.target = "_blank";
    link.rel = "noopener noreferrer";
    link.dataset.traceId = order.traceId;
    link.textContent = order.traceId;
    td.append(link);
  } else {
    const text = document.createElement("code");
    text.dataset.traceId = order.traceId;
    text.textContent = order.traceId;
    td.append(text);
  }
  return td;
}

function renderRecent(orders) {
  const rows = (orders || []).map((order) => {
    const row = document.createElement("tr");
    row.dataset.order = order.orderNumber;
    const at = new Date(order.at);
    row.append(
      cell(Number.isNaN(at.getTime()) ? order.at : at.toLocaleTimeString()),
      cell(order.orderNumber),
      cell(order.status),
      cell(order.total),
      cell(String(order.lines)),
      cell(order.instance),
      traceCell(order),
    );
    return row;
  });
  $("recent-orders").replaceChildren(...rows);
  $("recent-none").hidden = rows.length > 0;
  $("recent").hidden = rows.length === 0;
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
      const rate = cell(number(instance.ordersPerSecond, 1));
      rate.className = "rate";
      row.append(
        cell(service.name),
        cell(instance.id),
        cell(instance.url),
        cell(instance.registry, true),
        healthCell(instance),
        breakerCell(instance.breaker),
        outboxCell(instance),
        lagCell(instance.consumerLag),
        rate,
      );
      rows.push(row);
    }
  }
  $("services").replaceChildren(...rows);
  renderRecent(overview.recentOrders);
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
