// The cart: kept in this browser's localStorage, so it survives a reload and a closed tab.
const KEY = "shop.cart";
const MAX_QUANTITY = 99;

export function lines() {
  try {
    const raw = JSON.parse(localStorage.getItem(KEY) || "[]");
    return Array.isArray(raw) ? raw.filter((l) => l && l.skuCode && l.quantity > 0) : [];
  } catch {
    return [];
  }
}

function save(items) {
  localStorage.setItem(KEY, JSON.stringify(items));
  document.dispatchEvent(new CustomEvent("cart-changed"));
}

export function add(product, quantity = 1) {
  const items = lines();
  const found = items.find((l) => l.skuCode === product.skuCode);
  if (found) {
    found.quantity = Math.min(MAX_QUANTITY, found.quantity + quantity);
    found.price = product.price;
    found.name = product.name;
  } else {
    items.push({ ...product, quantity: Math.min(MAX_QUANTITY, quantity) });
  }
  save(items);
}

export function setQuantity(skuCode, quantity) {
  const items = lines()
    .map((l) => (l.skuCode === skuCode ? { ...l, quantity: Math.min(MAX_QUANTITY, quantity) } : l))
    .filter((l) => l.quantity > 0);
  save(items);
}

export function remove(skuCode) {
  save(lines().filter((l) => l.skuCode !== skuCode));
}

export function clear() {
  save([]);
}

export function count() {
  return lines().reduce((sum, l) => sum + l.quantity, 0);
}

// Money as whole cents: "1299.00" -> 129900, never a float sum.
export function cents(text) {
  const match = /^(\d+)(?:\.(\d{1,2}))?$/.exec(String(text).trim());
  if (!match) return 0;
  return Number(match[1]) * 100 + Number((match[2] || "0").padEnd(2, "0"));
}

export function money(amount) {
  const whole = Math.trunc(amount / 100);
  return `${whole}.${String(amount % 100).padStart(2, "0")}`;
}

export function total(items = lines()) {
  return items.reduce((sum, l) => sum + cents(l.price) * l.quantity, 0);
}
