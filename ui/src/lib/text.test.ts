import { describe, expect, it } from "vitest";
import { charCount, bytesToBase64, initials, parseTags } from "./text";
import { asCommandError } from "./api";

describe("parseTags", () => {
  it("trims, drops empties and case-insensitive repeats", () => {
    expect(parseTags(" Fantasy, fantasy ,, Noir,")).toEqual(["Fantasy", "Noir"]);
    expect(parseTags("")).toEqual([]);
  });
});

describe("initials", () => {
  it("takes first and last words, including non-ASCII", () => {
    expect(initials("Captain Isolde Varga")).toBe("CV");
    expect(initials("élodie")).toBe("É");
    expect(initials("   ")).toBe("");
  });
});

describe("bytesToBase64", () => {
  it("encodes bytes beyond one chunk exactly", () => {
    const bytes = new Uint8Array(70000).map((_, i) => i % 251);
    const b64 = bytesToBase64(bytes);
    const back = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
    expect(back).toEqual(bytes);
  });
});

describe("charCount", () => {
  it("counts code points like Rust's chars()", () => {
    expect(charCount("a🌙é")).toBe(3);
  });
});

describe("asCommandError", () => {
  it("keeps typed errors and wraps strings", () => {
    const typed = asCommandError({ kind: "validation", message: "m", fields: [{ field: "name", message: "x" }] });
    expect(typed.fields[0]?.field).toBe("name");
    const plain = asCommandError("invalid args `id` for command `get_character`");
    expect(plain.kind).toBe("storage");
    expect(plain.message).toContain("invalid args");
  });
});

import { formatBytes, formatDuration } from "./text";

describe("formatBytes / formatDuration", () => {
  it("uses decimal units with one decimal", () => {
    expect(formatBytes(999)).toBe("999 B");
    expect(formatBytes(1_789_239_136)).toBe("1.8 GB");
    expect(formatBytes(5_600_000)).toBe("5.6 MB");
  });
  it("says minutes and hours plainly", () => {
    expect(formatDuration(42.4)).toBe("42 s");
    expect(formatDuration(0.3)).toBe("under a second");
    expect(formatDuration(200)).toBe("3 min 20 s");
    expect(formatDuration(3 * 3600 + 120)).toBe("3 h 2 min");
    expect(formatDuration(Number.NaN)).toBe("");
  });
});
