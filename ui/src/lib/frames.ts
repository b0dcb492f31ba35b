// Frame-time statistics for the streaming self-test.

export interface FrameStats {
  frames: number;
  median_ms: number;
  p95_ms: number;
  max_ms: number;
  /** Frames slower than 50 ms (a visible stutter). */
  long_frames: number;
}

/** Statistics of the intervals between consecutive frame timestamps. */
export function frameStats(timestamps: number[]): FrameStats {
  const d: number[] = [];
  for (let i = 1; i < timestamps.length; i++) d.push((timestamps[i] ?? 0) - (timestamps[i - 1] ?? 0));
  d.sort((a, b) => a - b);
  const at = (q: number) => d[Math.min(d.length - 1, Math.floor(q * d.length))] ?? 0;
  return {
    frames: d.length,
    median_ms: at(0.5),
    p95_ms: at(0.95),
    max_ms: d.at(-1) ?? 0,
    long_frames: d.filter((x) => x > 50).length,
  };
}

/** Whether `got` is exactly 0, 1, ..., count - 1. */
export function inOrder(got: number[], count: number): boolean {
  return got.length === count && got.every((n, i) => n === i);
}

/** Collects streamed text and hands it over at most once per animation frame,
 * so a fast stream re-renders the message at the display's pace, not per piece. */
export function frameBatcher(apply: (text: string) => void): { push: (t: string) => void; flush: () => void } {
  let pending = "";
  let scheduled = false;
  const flush = () => {
    scheduled = false;
    if (pending) {
      const t = pending;
      pending = "";
      apply(t);
    }
  };
  return {
    push(t: string) {
      pending += t;
      if (!scheduled) {
        scheduled = true;
        requestAnimationFrame(flush);
      }
    },
    flush,
  };
}
