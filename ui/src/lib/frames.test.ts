import { describe, expect, it } from "vitest";
import { frameStats, inOrder } from "./frames";

describe("frameStats", () => {
  it("reports median, p95, max and long frames", () => {
    const t = Array.from({ length: 100 }, (_, i) => i * 16);
    t.push(99 * 16 + 80);
    const s = frameStats(t);
    expect(s.frames).toBe(100);
    expect(s.median_ms).toBe(16);
    expect(s.max_ms).toBe(80);
    expect(s.long_frames).toBe(1);
  });
  it("detects drops and reordering", () => {
    expect(inOrder([0, 1, 2], 3)).toBe(true);
    expect(inOrder([0, 2, 1], 3)).toBe(false);
    expect(inOrder([0, 1], 3)).toBe(false);
  });
});

import { frameBatcher } from "./frames";
import { vi } from "vitest";

describe("frameBatcher", () => {
  it("hands over everything, once per frame, in order", () => {
    const frames: FrameRequestCallback[] = [];
    vi.stubGlobal("requestAnimationFrame", (cb: FrameRequestCallback) => frames.push(cb));
    const out: string[] = [];
    const b = frameBatcher((t) => out.push(t));
    b.push("a");
    b.push("b");
    expect(frames.length).toBe(1);
    frames.shift()?.(0);
    b.push("c");
    b.flush();
    expect(out).toEqual(["ab", "c"]);
    vi.unstubAllGlobals();
  });
});
