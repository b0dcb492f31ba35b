import type { LoreReason, SectionKind } from "./types";

/** What each part of a prompt is called in the inspector and the window bar. */
export const SECTION_LABELS: Record<SectionKind, string> = {
  system_prompt: "System prompt",
  definition: "Character definition",
  persona: "Persona",
  examples: "Examples",
  memory: "Memory summary",
  history: "History",
  author_note: "Author's note",
  world_info: "Lorebook entries",
  post_history: "Post-history instructions",
  reply: "Reply opening",
};

/** One stretch of the window bar: a kind of section and its share of the window. */
export interface BarSegment {
  kind: SectionKind | "free";
  tokens: number;
  /** Percent of the whole window. */
  percent: number;
}

/**
 * The window bar: sections of one kind merged (history split by a note is one
 * stretch per kind, in first-seen order), then what is left of the window for
 * the reply. Shares never sum past 100, even for a prompt over its budget.
 */
export function windowBar(sections: [SectionKind, number][], context: number): BarSegment[] {
  const totals = new Map<SectionKind, number>();
  for (const [kind, tokens] of sections) totals.set(kind, (totals.get(kind) ?? 0) + tokens);
  const used = [...totals.values()].reduce((a, b) => a + b, 0);
  const whole = Math.max(context, used, 1);
  const out: BarSegment[] = [...totals].map(([kind, tokens]) => ({ kind, tokens, percent: (100 * tokens) / whole }));
  const free = whole - used;
  if (free > 0) out.push({ kind: "free", tokens: free, percent: (100 * free) / whole });
  return out;
}

/** Why a lorebook entry fired, in words. */
export function loreReason(r: LoreReason): string {
  if (r.kind === "constant") return "always on";
  if (r.kind === "decorator") return "forced on by @@activate";
  const where = r.recursion
    ? "in another entry's text"
    : r.message === 0
      ? "in the newest message"
      : `${r.message} ${r.message === 1 ? "message" : "messages"} back`;
  const second = r.secondary ? ` with "${r.secondary}"` : "";
  return `"${r.key}"${second} ${where}`;
}
