// The storefront's script: each page's behaviour, chosen by <body data-page>.
// Everything is written with textContent: nothing from the API is ever parsed as HTML.
import * as cart from "./cart.js";
import * as session from "./session.js";

const LOW_STOCK = Number(document.body.dataset.lowStock || 5);
const CHECKOUT_KEY = "shop.checkout";
const NEXT_KEY = "shop.next";

function el(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (value === false || value === null || value === undefined) continue;
    if (name === "text") node.textContent = value;
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value === true ? "" : value);
  }
  for (const child of children) node.append(child);
  return node;
}

function flash(message) {
  const box = document.getElementById("flash");
  box.textContent = message;
}

function describe(answer, fallback) {
  return (answer.body && (answer.body.detail || answer.body.title)) || fallback;
}

function stockWords(quantity) {
  if (quantity <= 0) return ["out", "Out of stock"];
  if (quantity <= LOW_STOCK) return ["low", `Only ${quantity} left`];
  return ["in", `In stock (${quantity})`];
}

function goLogin() {
  sessionStorage.setItem(NEXT_KEY, location.pathname + location.search);
  location.assign("/shop/login");
}

function requireSignedIn() {
  if (session.current()) return true;
  goLogin();
  return false;
}

// Field errors (422 "errors", or one field's own) next to their inputs.
function showFieldErrors(form, errors, prefix = "") {
  for (const input of form.querySelectorAll("input, textarea, select")) {
    input.removeAttribute("aria-invalid");
    input.removeAttribute("aria-describedby");
  }
  for (const box of form.querySelectorAll(".field-error, .form-error")) box.textContent = "";
  const unplaced = [];
  for (const [field, message] of Object.entries(errors || {})) {
    const input = form.querySelector(`[name="${CSS.escape(field)}"]`);
    const box = input && document.getElementById(`${input.id}-error`);
    if (box) {
      box.textContent = `${input.labels[0] ? input.labels[0].textContent : field} ${message}`;
      input.setAttribute("aria-invalid", "true");
      input.setAttribute("aria-describedby", box.id);
    } else {
      unplaced.push(`${field}: ${message}`);
    }
  }
  const first = form.querySelector('[aria-invalid="true"]');
  if (first) first.focus();
  return unplaced;
}

// ---- header -------------------------------------------------------------------------
function header() {
  const held = session.current();
  const admin = !!(held && held.user && (held.user.roles || []).includes("admin"));
  for (const item of document.querySelectorAll("[data-when]")) {
    const when = item.dataset.when;
    item.hidden = !((when === "signed-in" && held) || (when === "signed-out" && !held) || (when === "admin" && admin));
  }
  const who = document.getElementById("who");
  if (who) who.textContent = held && held.user ? held.user.name || held.user.email : "";
  const count = document.getElementById("cart-count");
  if (count) count.textContent = String(cart.count());
}

document.getElementById("logout").addEventListener("click", async () => {
  await session.signOut();
  location.assign("/");
});
document.addEventListener("cart-changed", header);
window.addEventListener("storage", header);

// ---- catalogue and product pages ---------------------------------------------------
function productOf(node) {
  return { productId: node.dataset.id, skuCode: node.dataset.sku, name: node.dataset.name, price: node.dataset.price };
}

async function showStock() {
  const nodes = [...document.querySelectorAll("[data-stock-for]")];
  if (!nodes.length || !session.current()) return;
  const skus = [...new Set(nodes.map((n) => n.dataset.stockFor))];
  const query = skus.map((s) => `skuCode=${encodeURIComponent(s)}`).join("&");
  const answer = await session.api(`/api/inventory?${query}`);
  if (!answer.ok || !Array.isArray(answer.body)) return;
  const bySku = new Map(answer.body.map((row) => [row.skuCode, row.quantity]));
  for (const node of nodes) {
    const [level, words] = stockWords(bySku.get(node.dataset.stockFor) || 0);
    node.dataset.level = level;
    node.textContent = words;
  }
}

function catalogue() {
  for (const button of document.querySelectorAll("#products .add-to-cart")) {
    button.addEventListener("click", () => {
      const product = productOf(button.closest(".product"));
      cart.add(product, 1);
      flash(`${product.name} added to your cart.`);
    });
  }
  showStock();
}

function productPage() {
  const form = document.getElementById("add-form");
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const quantity = Number(form.quantity.value);
    if (!Number.isInteger(quantity) || quantity < 1 || quantity > 99) {
      flash("Choose a quantity from 1 to 99.");
      form.quantity.focus();
      return;
    }
    const product = productOf(document.querySelector(".product-page"));
    cart.add(product, quantity);
    flash(`${quantity} × ${product.name} added to your cart.`);
  });
  showStock();
}

// ---- cart ----------------------------------------------------------------------------
function linesTable(items, { editable, notes = {} }) {
  const body = el("tbody");
  for (const line of items) {
    const name = el("td", { "data-label": "Product" }, el("a", { href: `/shop/product/${line.productId}`, text: line.name }));
    if (notes[line.skuCode]) name.append(el("p", { class: "line-error", text: notes[line.skuCode] }));
    const quantity = editable
      ? el("td", { "data-label": "Quantity" },
          el("label", { class: "visually-hidden", for: `qty-${line.skuCode}`, text: `Quantity of ${line.name}` }),
          el("input", {
            id: `qty-${line.skuCode}`, type: "number", min: "0", max: "99", value: String(line.quantity),
            onchange: (event) => {
              const value = Number(event.target.value);
              if (Number.isInteger(value) && value >= 0 && value <= 99) cart.setQuantity(line.skuCode, value);
              cartPage();
            },
          }))
      : el("td", { class: "num", "data-label": "Quantity", text: String(line.quantity) });
    const row = el("tr", { "data-sku": line.skuCode }, name, quantity,
      el("td", { class: "num", "data-label": "Price", text: line.price }),
      el("td", { class: "num", "data-label": "Subtotal", text: cart.money(cart.cents(line.price) * line.quantity) }));
    if (editable) {
      row.append(el("td", {}, el("button", {
        type: "button", class: "secondary", "aria-label": `Remove ${line.name}`, text: "Remove",
        onclick: () => { cart.remove(line.skuCode); cartPage(); },
      })));
    }
    body.append(row);
  }
  const head = el("tr", {}, el("th", { text: "Product" }), el("th", { class: "num", text: "Quantity" }),
    el("th", { class: "num", text: "Price" }), el("th", { class: "num", text: "Subtotal" }));
  if (editable) head.append(el("th", {}, el("span", { class: "visually-hidden", text: "Actions" })));
  return el("table", { class: "lines" }, el("thead", {}, head), body);
}

function cartPage() {
  const box = document.getElementById("cart");
  const items = cart.lines();
  box.replaceChildren();
  if (!items.length) {
    box.append(el("p", { text: "Your cart is empty. " }, el("a", { href: "/", text: "Browse the catalogue" })));
    return;
  }
  box.append(
    linesTable(items, { editable: true }),
    el("p", { class: "price", id: "cart-total", text: `Total ${cart.money(cart.total(items))}` }),
    el("div", { class: "actions" }, el("a", { href: "/shop/checkout", id: "to-checkout", text: "Go to checkout" })),
  );
}

// ---- checkout ------------------------------------------------------------------------
// One Idempotency-Key per checkout attempt: kept with the body it was made for, so a
// double click, a retry or a reload sends the same key and the shop makes one order.
function attemptFor(body) {
  const text = JSON.stringify(body);
  try {
    const held = JSON.parse(sessionStorage.getItem(CHECKOUT_KEY) || "null");
    if (held && held.body === text) return held.key;
  } catch { /* a new attempt */ }
  const key = crypto.randomUUID ? crypto.randomUUID() : fallbackUuid();
  sessionStorage.setItem(CHECKOUT_KEY, JSON.stringify({ key, body: text }));
  return key;
}

function fallbackUuid() {
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  bytes[6] = (bytes[6] & 0x0f) | 0x40;
  bytes[8] = (bytes[8] & 0x3f) | 0x80;
  const hex = [...bytes].map((b) => b.toString(16).padStart(2, "0")).join("");
  return `${hex.slice(0, 8)}-${hex.slice(8, 12)}-${hex.slice(12, 16)}-${hex.slice(16, 20)}-${hex.slice(20)}`;
}

function checkoutPage() {
  if (!requireSignedIn()) return;
  const box = document.getElementById("checkout");
  const status = document.getElementById("checkout-status");
  const items = cart.lines();
  box.replaceChildren();
  if (!items.length) {
    box.append(el("p", { text: "Your cart is empty. " }, el("a", { href: "/", text: "Browse the catalogue" })));
    return;
  }
  const place = el("button", { type: "button", id: "place-order", text: "Place order" });
  const render = (notes = {}) => {
    box.replaceChildren(
      linesTable(items, { editable: false, notes }),
      el("p", { class: "price", text: `Total ${cart.money(cart.total(items))}` }),
      el("p", { class: "hint", text: "Prices are the catalogue's at the moment you order." }),
      el("div", { class: "actions" }, place, el("a", { href: "/shop/cart", text: "Change the cart" })),
    );
  };
  render();
  const say = (text, kind = "") => {
    status.className = `status ${kind}`.trim();
    status.textContent = text;
  };
  let busy = false;
  let retries = 0;
  const body = { orderLineItemDtoList: items.map((l) => ({ skuCode: l.skuCode, quantity: l.quantity })) };

  async function submit() {
    if (busy) return; // a second click while the first is on its way
    busy = true;
    place.disabled = true;
    say("Placing your order…");
    const key = attemptFor(body);
    const answer = await session.api("/api/order", { method: "POST", body, headers: { "Idempotency-Key": key } });
    if (answer.status === 201) {
      sessionStorage.removeItem(CHECKOUT_KEY);
      cart.clear();
      box.replaceChildren(
        el("p", { class: "status ok", id: "order-placed", text: `Order ${answer.body.orderNumber} placed: total ${answer.body.total}.` }),
        el("p", {}, el("a", { href: "/shop/orders", text: "See your orders" })),
      );
      say("");
      status.className = "";
      return;
    }
    busy = false;
    // 503: the inventory is unavailable; 409 with Retry-After: this key's first request is
    // still being placed. Either way the same key again, so at most one order is made.
    const inProgress = answer.status === 409 && answer.headers.get("retry-after") && !(answer.body && answer.body.shortages);
    if ((answer.status === 503 || inProgress) && retries < 20) {
      retries += 1;
      let left = session.retryAfter(answer.headers, 2);
      const tick = () => {
        say(inProgress ? `Your order is still being placed; checking again in ${left} s.`
          : `Inventory unavailable, retrying in ${left} s.`, "error");
        if (left <= 0) { busy = false; submit(); return; }
        left -= 1;
        setTimeout(tick, 1000);
      };
      busy = true;
      tick();
      return;
    }
    place.disabled = false;
    if (answer.status === 409 && answer.body && Array.isArray(answer.body.shortages)) {
      const names = new Map(items.map((l) => [l.skuCode, l.name]));
      const notes = {};
      const lines = answer.body.shortages.map((s) => {
        notes[s.skuCode] = `Only ${s.available} available; you asked for ${s.requested}.`;
        return `${names.get(s.skuCode) || s.skuCode}: you asked for ${s.requested}, ${s.available} available`;
      });
      render(notes);
      say(`Out of stock — ${lines.join("; ")}. Change the cart and try again.`, "error");
      sessionStorage.removeItem(CHECKOUT_KEY);
    } else if (answer.status === 429) {
      const wait = session.retryAfter(answer.headers, 5);
      place.disabled = true;
      say(`Too many requests: try again in ${wait} s.`, "error");
      setTimeout(() => { place.disabled = false; say(""); }, wait * 1000);
    } else if (answer.status === 422) {
      const errors = (answer.body && answer.body.errors) || {};
      const notes = {};
      const other = [];
      for (const [field, message] of Object.entries(errors)) {
        const match = /^(?:orderLineItemDtoList|items)\.(\d+)\.(\w+)/.exec(field);
        const line = match && items[Number(match[1])];
        if (line) notes[line.skuCode] = `${match[2]} ${message}`;
        else other.push(`${field}: ${message}`);
      }
      render(notes);
      say(`The order was refused: ${other.length ? other.join("; ") : "see the lines above"}.`, "error");
      sessionStorage.removeItem(CHECKOUT_KEY);
    } else if (answer.status === 401) {
      goLogin();
    } else if (answer.status === 0) {
      say(`${describe(answer, "The shop could not be reached.")} Your order was not confirmed; try again (it will not be placed twice).`, "error");
    } else {
      say(`${describe(answer, "The order failed.")} Try again: it will not be placed twice.`, "error");
    }
  }
  place.addEventListener("click", submit);
}

// ---- orders --------------------------------------------------------------------------
function when(iso) {
  const date = new Date(iso);
  return Number.isNaN(date.getTime()) ? String(iso) : date.toLocaleString();
}

async function ordersPage() {
  if (!requireSignedIn()) return;
  const box = document.getElementById("orders");
  const answer = await session.api("/api/order?limit=50");
  if (answer.status === 401) { goLogin(); return; }
  if (!answer.ok) {
    box.replaceChildren(el("p", { class: "problem", text: describe(answer, "Your orders could not be loaded.") }));
    return;
  }
  box.replaceChildren();
  if (!answer.body.length) {
    box.append(el("p", { text: "No orders yet. " }, el("a", { href: "/", text: "Browse the catalogue" })));
    return;
  }
  for (const order of answer.body) box.append(orderCard(order));
}

function orderCard(order) {
  const card = el("section", { class: "order", "data-order": order.orderNumber, "aria-label": `Order ${order.orderNumber}` });
  const status = el("span", { class: `badge ${order.status}`, text: order.status });
  const problem = el("p", { class: "line-error", role: "alert" });
  card.append(
    el("h2", { text: `Order ${order.orderNumber}` }),
    el("p", {}, status, ` placed ${when(order.createdAt)} · total ${order.total}`),
    el("ul", {}, ...order.lines.map((l) => el("li", { text: `${l.quantity} × ${l.skuCode} at ${l.unitPrice} = ${l.lineTotal}` }))),
    problem,
  );
  if (order.status === "PLACED") {
    const cancel = el("button", { type: "button", class: "secondary cancel", text: "Cancel order" });
    cancel.addEventListener("click", async () => {
      if (!confirm(`Cancel order ${order.orderNumber}?`)) return;
      cancel.disabled = true;
      const answer = await session.api(`/api/order/${encodeURIComponent(order.orderNumber)}/cancel`, { method: "POST" });
      if (answer.ok) {
        card.replaceWith(orderCard(answer.body));
        flash(`Order ${order.orderNumber} cancelled; its stock is released.`);
      } else {
        cancel.disabled = false;
        problem.textContent = answer.status === 429
          ? `Too many requests: try again in ${session.retryAfter(answer.headers, 5)} s.`
          : describe(answer, "The order could not be cancelled.");
      }
    });
    card.append(cancel);
  }
  return card;
}

// ---- notifications -------------------------------------------------------------------
const KINDS = { ORDER_PLACED: "Order placed", ORDER_CANCELLED: "Order cancelled" };

async function notificationsPage() {
  if (!requireSignedIn()) return;
  const box = document.getElementById("notifications");
  const load = async () => {
    const answer = await session.api("/api/notifications");
    if (answer.status === 401) { goLogin(); return; }
    if (!answer.ok) {
      box.replaceChildren(el("p", { class: "problem", text: describe(answer, "Your notifications could not be loaded.") }));
      return;
    }
    if (!answer.body.length) {
      box.replaceChildren(el("p", { text: "No notifications yet." }));
      return;
    }
    const rows = answer.body.map((n) => el("tr", { "data-order": n.orderNumber, "data-type": n.type },
      el("td", { "data-label": "When", text: when(n.createdAt) }),
      el("td", { "data-label": "About", text: `${KINDS[n.type] || n.type} · order ${n.orderNumber}` }),
      el("td", { "data-label": "Sent by", text: n.channel }),
      el("td", { "data-label": "Status", text: n.status })));
    box.replaceChildren(el("table", {},
      el("thead", {}, el("tr", {}, ...["When", "About", "Sent by", "Status"].map((t) => el("th", { text: t })))),
      el("tbody", {}, ...rows)));
  };
  document.getElementById("refresh-notifications").addEventListener("click", load);
  await load();
  // New ones arrive a moment after an order: look again now and then while the tab is open.
  setInterval(() => { if (!document.hidden) load(); }, 3000);
}

// ---- log in, sign up -----------------------------------------------------------------
function afterSignIn() {
  const next = sessionStorage.getItem(NEXT_KEY) || "/";
  sessionStorage.removeItem(NEXT_KEY);
  // Only a path of this site, never another origin.
  location.assign(next.startsWith("/") && !next.startsWith("//") ? next : "/");
}

function loginPage() {
  const form = document.getElementById("login-form");
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const button = form.querySelector("button[type=submit]");
    button.disabled = true;
    const fields = form.elements;
    const answer = await session.signIn(fields.namedItem("email").value.trim(), fields.namedItem("password").value);
    button.disabled = false;
    if (answer.ok) { afterSignIn(); return; }
    showFieldErrors(form, answer.status === 422 ? answer.body.errors : {});
    document.getElementById("form-error").textContent =
      answer.status === 401 ? "Wrong e-mail or password."
        : answer.status === 429 ? `Too many attempts: try again in ${session.retryAfter(answer.headers, 30)} s.`
          : answer.status === 422 ? "Check the fields above." : describe(answer, "Log-in failed.");
  });
}

function signupPage() {
  const form = document.getElementById("signup-form");
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const button = form.querySelector("button[type=submit]");
    const fields = form.elements;
    const body = { name: fields.namedItem("name").value.trim(), email: fields.namedItem("email").value.trim(), password: fields.namedItem("password").value };
    button.disabled = true;
    const answer = await session.publicCall("/auth/register", { method: "POST", body });
    if (answer.status === 201) {
      const login = await session.signIn(body.email, body.password);
      button.disabled = false;
      if (login.ok) { afterSignIn(); return; }
      location.assign("/shop/login");
      return;
    }
    button.disabled = false;
    const errors = answer.status === 422 ? answer.body.errors || {} : answer.status === 409 ? { email: "is already registered: log in instead" } : {};
    const unplaced = showFieldErrors(form, errors);
    document.getElementById("form-error").textContent = unplaced.length ? unplaced.join("; ")
      : answer.status === 429 ? `Too many requests: try again in ${session.retryAfter(answer.headers, 5)} s.`
        : Object.keys(errors).length ? "" : describe(answer, "The account could not be created.");
  });
}

// ---- admin ---------------------------------------------------------------------------
async function adminPage() {
  if (!requireSignedIn()) return;
  const gate = document.getElementById("admin-gate");
  const me = await session.api("/auth/me");
  if (!me.ok || !(me.body.roles || []).includes("admin")) {
    gate.replaceChildren(el("p", { class: "problem", text: "This page is for the shop's admins." }));
    return;
  }
  gate.hidden = true;
  document.getElementById("admin").hidden = false;
  const productForm = document.getElementById("product-form");
  const stockForm = document.getElementById("stock-form");
  const title = document.getElementById("product-form-title");
  const save = document.getElementById("product-save");
  const fresh = document.getElementById("product-new");
  const field = (name) => productForm.querySelector(`[name="${name}"]`);

  const editing = (product) => {
    field("id").value = product ? product.id : "";
    field("name").value = product ? product.name : "";
    field("description").value = product ? product.description : "";
    field("price").value = product ? product.price : "";
    field("category").value = product ? product.category : "";
    title.textContent = product ? `Edit ${product.name} (${product.skuCode})` : "New product";
    save.textContent = product ? "Save changes" : "Create product";
    fresh.hidden = !product;
    showFieldErrors(productForm, {});
    if (product) field("name").focus();
  };
  fresh.addEventListener("click", () => editing(null));

  const list = async () => {
    const box = document.getElementById("admin-products");
    const answer = await session.api("/api/product?limit=100");
    if (!answer.ok) { box.replaceChildren(el("p", { class: "problem", text: describe(answer, "Could not load products.") })); return; }
    const skus = answer.body.map((p) => `skuCode=${encodeURIComponent(p.skuCode)}`).join("&");
    const stock = skus ? await session.api(`/api/inventory?${skus}`) : { ok: false };
    const units = new Map(stock.ok ? stock.body.map((r) => [r.skuCode, r.quantity]) : []);
    const rows = answer.body.map((p) => el("tr", { "data-sku": p.skuCode },
      el("td", { "data-label": "Name", text: p.name }),
      el("td", { "data-label": "SKU", text: p.skuCode }),
      el("td", { class: "num", "data-label": "Price", text: p.price }),
      el("td", { "data-label": "Category", text: p.category }),
      el("td", { class: "num stock-units", "data-label": "Stock", text: units.has(p.skuCode) ? String(units.get(p.skuCode)) : "–" }),
      el("td", {},
        el("button", { type: "button", class: "secondary", "aria-label": `Edit ${p.name}`, text: "Edit", onclick: () => editing(p) }),
        " ",
        el("button", {
          type: "button", class: "secondary", "aria-label": `Set stock of ${p.name}`, text: "Stock",
          onclick: () => { stockForm.skuCode.value = p.skuCode; stockForm.quantity.value = units.get(p.skuCode) ?? ""; stockForm.quantity.focus(); },
        }))));
    box.replaceChildren(el("table", {},
      el("thead", {}, el("tr", {}, ...["Name", "SKU", "Price", "Category", "Stock", ""].map((t) => el("th", { text: t })))),
      el("tbody", {}, ...rows)));
  };

  productForm.addEventListener("submit", async (event) => {
    event.preventDefault();
    const id = field("id").value;
    // The reference's own body: no skuCode (the catalogue derives one on creation).
    const body = { name: field("name").value, description: field("description").value, price: field("price").value.trim() };
    if (field("category").value.trim()) body.category = field("category").value.trim();
    save.disabled = true;
    const answer = await session.api(id ? `/api/product/${encodeURIComponent(id)}` : "/api/product", { method: id ? "PUT" : "POST", body });
    save.disabled = false;
    if (answer.ok) {
      flash(`${answer.body.name} saved (SKU ${answer.body.skuCode}).`);
      stockForm.skuCode.value = answer.body.skuCode;
      editing(null);
      await list();
      stockForm.quantity.focus();
      return;
    }
    const unplaced = showFieldErrors(productForm, answer.status === 422 ? answer.body.errors : {});
    document.getElementById("product-form-error").textContent = unplaced.length ? unplaced.join("; ")
      : answer.status === 422 ? "" : describe(answer, "The product could not be saved.");
  });

  stockForm.addEventListener("submit", async (event) => {
    event.preventDefault();
    const sku = stockForm.skuCode.value.trim();
    const quantity = Number(stockForm.quantity.value);
    const local = {};
    if (!sku) local.skuCode = "is required";
    if (stockForm.quantity.value === "" || !Number.isInteger(quantity) || quantity < 0) local.quantity = "must be a whole number, 0 or more";
    if (Object.keys(local).length) { showFieldErrors(stockForm, local); return; }
    const answer = await session.api(`/api/inventory/${encodeURIComponent(sku)}`, { method: "PUT", body: { quantity } });
    if (answer.ok) {
      showFieldErrors(stockForm, {});
      flash(`Stock of ${sku} set to ${answer.body.quantity}.`);
      await list();
      return;
    }
    const unplaced = showFieldErrors(stockForm, answer.status === 422 ? answer.body.errors : {});
    document.getElementById("stock-form-error").textContent = unplaced.length ? unplaced.join("; ")
      : answer.status === 422 ? "" : describe(answer, "The stock could not be set.");
  });
  await list();
}

// ---- start ---------------------------------------------------------------------------
const PAGES = {
  catalogue, product: productPage, cart: cartPage, checkout: checkoutPage, orders: ordersPage,
  notifications: notificationsPage, login: loginPage, signup: signupPage, admin: adminPage,
};

document.documentElement.classList.add("js");
session.schedule();
header();
const run = PAGES[document.body.dataset.page];
if (run) run();
