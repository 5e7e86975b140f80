// Model output as safe HTML: Markdown through marked, then DOMPurify.
//
// Model output never runs as HTML.  Raw HTML in a reply is shown as the text it is (the
// `html` renderer escapes it), images become links (the page loads nothing a reply names),
// and DOMPurify removes whatever could still run (event handlers, `javascript:` links, style
// attributes, which the page's Content-Security-Policy would refuse anyway).

import { Marked } from "../vendor/marked/marked.esm.js";
import DOMPurify from "../vendor/dompurify/purify.es.mjs";

const ESCAPES = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };

export function escapeHtml(text) {
  return String(text).replace(/[&<>"']/g, (c) => ESCAPES[c]);
}

const markdown = new Marked({
  gfm: true,
  breaks: true,
  renderer: {
    html(token) {
      return escapeHtml(token.text);
    },
    image(token) {
      const label = token.text || token.href;
      return `<a href="${escapeHtml(token.href)}">${escapeHtml(label)}</a>`;
    },
  },
});

DOMPurify.addHook("afterSanitizeAttributes", (node) => {
  if (node.tagName === "A") {
    node.setAttribute("target", "_blank");
    node.setAttribute("rel", "noopener noreferrer");
  }
});

const PURIFY = {
  USE_PROFILES: { html: true },
  FORBID_TAGS: ["style", "img", "svg", "math", "form", "input", "button", "textarea", "select", "iframe"],
  FORBID_ATTR: ["style"],
};

/** The HTML to show for a reply's Markdown `text`: safe to assign to innerHTML. */
export function renderMarkdown(text) {
  return DOMPurify.sanitize(markdown.parse(text), PURIFY);
}
