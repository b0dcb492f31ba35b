// Downloads in flight, shared by the Models view and the first-run setup so
// progress survives switching views.
import { api } from "./api";
import type { CommandError, DownloadProgress, Model } from "./types";

export interface DownloadState {
  running: boolean;
  progress: DownloadProgress | null;
  error: CommandError | null;
}

export const downloads: Record<string, DownloadState> = $state({});

/** Starts (or resumes) a catalog download; resolves with the model, or null when it failed or stopped. */
export async function startDownload(catalogId: string): Promise<Model | null> {
  if (downloads[catalogId]?.running) return null;
  downloads[catalogId] = { running: true, progress: null, error: null };
  try {
    const model = await api.downloadModel(catalogId, (p) => {
      const d = downloads[catalogId];
      if (d) d.progress = p;
    });
    delete downloads[catalogId];
    return model;
  } catch (e) {
    const err = e as CommandError;
    downloads[catalogId] = { running: false, progress: downloads[catalogId]?.progress ?? null, error: err.kind === "cancelled" ? null : err };
    return null;
  }
}

/** Pauses (keeps the part) or cancels (removes it) a download. */
export async function stopDownload(catalogId: string, discard: boolean): Promise<void> {
  await api.stopDownload(catalogId, discard);
  if (discard) delete downloads[catalogId];
}

/** What to tell the user to do about a failed download. */
export function downloadHint(e: CommandError): string {
  switch (e.kind) {
    case "network":
      return "Check the internet connection, then press Resume: what was downloaded is kept.";
    case "disk_full":
      return "Free some disk space (or delete a model you no longer use), then try again.";
    case "bad_file":
      return "The file did not pass verification and was removed. Try the download again.";
    case "conflict":
      return "This model is already downloading.";
    default:
      return "";
  }
}
