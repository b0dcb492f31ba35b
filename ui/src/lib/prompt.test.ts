import { describe, expect, it } from "vitest";
import { windowBar } from "./prompt";

describe("windowBar", () => {
  it("merges sections of a kind and leaves the rest of the window free", () => {
    const bar = windowBar(
      [
        ["system_prompt", 100],
        ["history", 600],
        ["author_note", 20],
        ["history", 200],
        ["reply", 4],
      ],
      2048,
    );
    expect(bar.map((s) => s.kind)).toEqual(["system_prompt", "history", "author_note", "reply", "free"]);
    expect(bar.find((s) => s.kind === "history")?.tokens).toBe(800);
    expect(bar.at(-1)?.tokens).toBe(2048 - 924);
    expect(bar.reduce((a, s) => a + s.percent, 0)).toBeCloseTo(100, 6);
  });

  it("never passes 100% for a prompt larger than the window", () => {
    const bar = windowBar([["history", 3000]], 2048);
    expect(bar).toHaveLength(1);
    expect(bar[0]?.percent).toBeCloseTo(100, 6);
  });
});
