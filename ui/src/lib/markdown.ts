// Markdown for chat messages, rendered through a sanitizer. Everything a card
// or a model writes is untrusted: the output has no scripts, no event
// handlers, no styles, no images or other remote resources, and no links
// that navigate (links become plain text with the address in a tooltip).
import DOMPurify from "dompurify";
import { marked } from "marked";

const ALLOWED_TAGS = [
  "p", "br", "em", "strong", "del", "code", "pre", "blockquote", "ul", "ol", "li",
  "h1", "h2", "h3", "h4", "h5", "h6", "hr", "span", "table", "thead", "tbody", "tr", "th", "td",
];

// Raw HTML in a message is shown as text, not interpreted: `<script>` reads as
// `<script>`. The sanitizer below is the second line of defence.
function escapeHtml(s: string): string {
  return s.replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;").replace(/"/g, "&quot;");
}
marked.use({
  renderer: {
    html(token) {
      return escapeHtml(token.text);
    },
  },
});

let hooked = false;
function purifier() {
  if (!hooked) {
    // Links are turned into inert spans before sanitizing keeps only the tags above.
    DOMPurify.addHook("uponSanitizeElement", (node, data) => {
      if (data.tagName === "a" && node instanceof Element) {
        const span = node.ownerDocument.createElement("span");
        span.className = "link-text";
        const href = node.getAttribute("href");
        // Only web and mail addresses are shown, as a tooltip; nothing navigates.
        if (href && /^(https?:|mailto:)/i.test(href.trim())) span.setAttribute("title", href);
        span.textContent = node.textContent;
        node.replaceWith(span);
      }
    });
    hooked = true;
  }
  return DOMPurify;
}

/** Sanitized HTML for a message's Markdown. */
export function renderMarkdown(text: string): string {
  const html = marked.parse(text, { async: false, gfm: true, breaks: true }) as string;
  return purifier().sanitize(html, {
    ALLOWED_TAGS,
    ALLOWED_ATTR: ["title", "class"],
    ALLOW_DATA_ATTR: false,
    KEEP_CONTENT: true,
  });
}
