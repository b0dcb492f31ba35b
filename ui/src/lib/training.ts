// Presets and helpers for the fine-tune wizard.
import type { DataOptions, TrainConfig } from "./types";

const ALL_TARGETS = ["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"];

/** The seed recipe: r 16, alpha 16, dropout 0.05, every projection, lr 2e-4, batch 2, one epoch. */
export function seedRecipe(): { config: TrainConfig; data: DataOptions } {
  return {
    config: {
      r: 16,
      alpha: 16,
      dropout: 0.05,
      targets: [...ALL_TARGETS],
      lr: 2e-4,
      batch_size: 2,
      grad_accum: 1,
      epochs: 1,
      max_steps: null,
      schedule: { kind: "constant" },
      clip: 1.0,
      weight_decay: 0,
      eval_every: 50,
      checkpoint_every: 50,
      seed: 42,
      gradient_checkpointing: false,
    },
    data: { max_len: 2048, loss_on: "all", eval_fraction: 0.05, limit: 1000, seed: 42 },
  };
}

export type PresetName = "seed" | "quick" | "quality";

export const presets: { id: PresetName; name: string; hint: string }[] = [
  { id: "seed", name: "Seed recipe", hint: "r 16, α 16, lr 2e-4, batch 2, one epoch over the first 1000 rows" },
  { id: "quick", name: "Quick test", hint: "a few steps on short rows, to check that everything works" },
  { id: "quality", name: "Quality", hint: "r 32, two epochs, warmup and cosine decay, loss on the character's turns" },
];

/** A preset's settings. */
export function preset(id: PresetName): { config: TrainConfig; data: DataOptions } {
  const p = seedRecipe();
  if (id === "quick") {
    p.config.max_steps = 12;
    p.config.eval_every = 4;
    p.config.checkpoint_every = 4;
    p.config.lr = 1e-3;
    p.data.max_len = 256;
    p.data.limit = 64;
  } else if (id === "quality") {
    p.config.r = 32;
    p.config.alpha = 32;
    p.config.epochs = 2;
    p.config.grad_accum = 4;
    p.config.schedule = { kind: "cosine", warmup: 20 };
    p.data.loss_on = "assistant_only";
    p.data.limit = null;
  }
  return p;
}

export type DpoPresetName = "choices" | "choices-quick" | "choices-strong";

/** Presets for "Learn from my choices" (DPO on the character's pairs). */
export const dpoPresets: { id: DpoPresetName; name: string; hint: string }[] = [
  { id: "choices", name: "Learn from my choices", hint: "β 0.1 (TRL's default), lr 5e-5, three passes over the pairs" },
  { id: "choices-quick", name: "Quick test", hint: "a few steps, to check that everything works" },
  { id: "choices-strong", name: "Stronger", hint: "β 0.05 and lr 1e-4: moves further from where it started, with a light SFT term on the chosen replies" },
];

/** A DPO preset's settings: the seed recipe's LoRA shape, without dropout (as TRL's DPO trainer). */
export function dpoPreset(id: DpoPresetName): { config: TrainConfig; data: DataOptions } {
  const p = seedRecipe();
  p.config.objective = { kind: "dpo", beta: 0.1, sft_weight: 0 };
  p.config.dropout = 0;
  p.config.lr = 5e-5;
  p.config.epochs = 3;
  p.config.eval_every = 10;
  p.config.checkpoint_every = 10;
  p.data = { max_len: 1024, loss_on: "all", eval_fraction: 0.1, limit: null, seed: 42 };
  if (id === "choices-quick") {
    p.config.max_steps = 6;
    p.config.eval_every = 2;
    p.config.checkpoint_every = 3;
    p.config.lr = 1e-3;
    p.data.max_len = 512;
  } else if (id === "choices-strong") {
    p.config.objective = { kind: "dpo", beta: 0.05, sft_weight: 0.1 };
    p.config.lr = 1e-4;
  }
  return p;
}

/** One line per setting, for the Advanced panel. */
export const explain: Record<string, string> = {
  r: "Rank of the adapter: more capacity, more memory.",
  alpha: "Scales the adapter's effect (alpha / r).",
  dropout: "Share of inputs the adapter ignores at random: fights overfitting.",
  lr: "Learning rate: how big each update is.",
  batch_size: "Rows per step: more is steadier but needs more memory.",
  grad_accum: "Steps whose gradients are added before one update: a bigger batch for free memory.",
  epochs: "Passes over the data.",
  max_steps: "Stop after this many updates (blank: by epochs).",
  max_len: "Longest row in tokens; longer rows are cut (activation memory grows with it).",
  eval_fraction: "Share of rows held out to measure the eval loss.",
  limit: "Use only the first N rows (blank: all).",
  seed: "Same seed, same data order and initial weights.",
  gradient_checkpointing: "Recompute each block when going backward: far less memory, about a third more time.",
  beta: "How far the character may move from where it started: lower moves further.",
  sft_weight: "Also train on the chosen replies as text (0: off).",
};
