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
