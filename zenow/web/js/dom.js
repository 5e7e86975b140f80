// Building DOM nodes without HTML strings: text is always text.

/**
 * `h("button", {class: "primary", onclick: f}, "Send")`: an element with attributes
 * (`on…` keys become listeners, `false`/`null` values are skipped) and children
 * (strings become text nodes; null and false are skipped).
 */
export function h(tag, attributes = {}, ...children) {
  const element = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (value === false || value === null || value === undefined) continue;
    if (name.startsWith("on")) element.addEventListener(name.slice(2), value);
    else if (name in element && typeof value !== "string") element[name] = value;
    else element.setAttribute(name, value === true ? "" : value);
  }
  append(element, children);
  return element;
}

function append(element, children) {
  for (const child of children.flat()) {
    if (child === null || child === false || child === undefined) continue;
    element.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

export const $ = (id) => document.getElementById(id);

/** Bytes as "1.5 MB" (powers of 1000, like download tools show). */
export function formatBytes(bytes) {
  if (bytes === null || bytes === undefined) return "—";
  const units = ["B", "kB", "MB", "GB", "TB"];
  let value = bytes;
  let unit = 0;
  while (value >= 1000 && unit < units.length - 1) {
    value /= 1000;
    unit += 1;
  }
  return `${value.toFixed(value < 10 && unit > 0 ? 1 : 0)} ${units[unit]}`;
}

/** A short human message for an error thrown by api.js. */
export function describeError(error) {
  return error?.detail ?? error?.message ?? String(error);
}
