// The run being trained, shared so its progress survives leaving the view.
import { api } from "./api";
import type { CommandError, MetricPoint, RunView, TrainEvent, TrainProgress, TrainRequest } from "./types";

export interface LiveRun {
  runId: number | null;
  running: boolean;
  progress: TrainProgress | null;
  metrics: MetricPoint[];
  total: number;
  result: RunView | null;
  error: CommandError | null;
  /** The latest checkpoint's replies to the sample prompts. */
  samples: string[];
}

export const live: LiveRun = $state({
  runId: null,
  running: false,
  progress: null,
  metrics: [],
  total: 0,
  result: null,
  error: null,
  samples: [],
});

function onEvent(e: TrainEvent) {
  if (e.type === "started") {
    live.runId = e.run_id;
    live.total = e.total_steps;
  } else {
    live.progress = e;
    live.metrics.push({
      step: e.step,
      loss: e.loss,
      eval_loss: e.eval_loss,
      margin: e.margin,
      accuracy: e.accuracy,
      eval_margin: e.eval_margin,
    });
    if (e.samples.length) live.samples = e.samples;
  }
}

async function drive(start: () => Promise<RunView>, metrics: MetricPoint[]) {
  live.running = true;
  live.error = null;
  live.result = null;
  live.progress = null;
  live.metrics = metrics;
  try {
    live.result = await start();
  } catch (e) {
    live.error = e as CommandError;
  } finally {
    live.running = false;
  }
}

/** Starts a new run. */
export function startRun(request: TrainRequest): Promise<void> {
  return drive(() => api.startTraining(request, onEvent), []);
}

/** Resumes a stopped run from its last checkpoint. */
export function resumeRun(run: RunView): Promise<void> {
  live.runId = run.id;
  live.total = run.total_steps;
  return drive(() => api.resumeTraining(run.id, onEvent), [...run.metrics]);
}

/** Stops the run at its next step; it can be resumed. */
export async function stopRun(): Promise<void> {
  if (live.runId !== null) await api.stopTraining(live.runId);
}
