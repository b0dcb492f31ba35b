import { describe, expect, it } from "vitest";
import { renderMarkdown } from "./markdown";

describe("renderMarkdown", () => {
  it("renders role-play emphasis and paragraphs", () => {
    const html = renderMarkdown("*smiles* Hello **there**\n\nSecond `code`");
    expect(html).toContain("<em>smiles</em>");
    expect(html).toContain("<strong>there</strong>");
    expect(html).toContain("<code>code</code>");
  });

  it("removes scripts, handlers, images, styles and javascript: links", () => {
    const html = renderMarkdown(
      '<img src=x onerror="window.pwned=1"> <script>window.pwned=1</script> <b onclick="x()">b</b> ' +
        '[click](javascript:alert(1)) [site](https://evil.example/) <a href="https://evil.example/">remote</a> <style>*{}</style> ' +
        '<iframe src="https://evil.example"></iframe> ![pic](https://evil.example/p.png)',
    );
    const doc = new DOMParser().parseFromString(`<div>${html}</div>`, "text/html");
    expect(doc.querySelectorAll("img, script, style, iframe, a, object, embed, svg").length).toBe(0);
    for (const el of Array.from(doc.querySelectorAll("*"))) {
      for (const attr of Array.from(el.attributes)) {
        expect(attr.name).toMatch(/^(title|class)$/);
        expect(attr.value).not.toMatch(/javascript:/i);
      }
    }
    expect(html).toContain("click");
    // Raw HTML reads as text.
    expect(doc.body.textContent).toContain("<script>window.pwned=1</script>");
    expect(html).toContain('title="https://evil.example/"');
  });

  it("keeps text that merely looks like tags readable", () => {
    expect(renderMarkdown("a < b and c > d")).toContain("a &lt; b and c &gt; d");
  });
});
