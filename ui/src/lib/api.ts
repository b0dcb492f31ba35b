// Typed wrappers over the shell's commands: one function per command.
import { Channel, convertFileSrc, invoke } from "@tauri-apps/api/core";
import type {
  ApiModel,
  ApiServerSettings,
  ApiServerStatus,
  AppInfo,
  CardFormat,
  Completion,
  SamplerConfig,
  CardLint,
  Character,
  CharacterCard,
  ImportOutcome,
  Lorebook,
  LorebookFormat,
  LorebookLink,
  LorebookView,
  OnDuplicate,
  PreferencePair,
  PrefsImport,
  CharacterDraft,
  CharacterSummary,
  ChatEvent,
  ChatSettings,
  PromptReport,
  MemoryUpdate,
  ChatSummary,
  ChatView,
  CommandError,
  DownloadProgress,
  Model,
  MessageHit,
  ModelsOverview,
  Persona,
  PersonaDraft,
  QuantizeProgress,
  Adapter,
  DataOptions,
  DataPreview,
  DataSource,
  DatasetInfo,
  Estimate,
  RunView,
  TrainConfig,
  TrainEvent,
  TrainRequest,
  TagCount,
} from "./types";

/** Turns whatever a rejected invoke gave into a CommandError. */
export function asCommandError(e: unknown): CommandError {
  if (e && typeof e === "object" && "kind" in e && "message" in e) {
    const c = e as Partial<CommandError>;
    return { kind: c.kind ?? "storage", message: String(c.message), fields: c.fields ?? [] };
  }
  // Deserialization and ACL failures arrive as plain strings.
  return { kind: "storage", message: typeof e === "string" ? e : String(e), fields: [] };
}

async function call<T>(cmd: string, args?: Record<string, unknown>): Promise<T> {
  try {
    return await invoke<T>(cmd, args);
  } catch (e) {
    throw asCommandError(e);
  }
}

export const api = {
  appInfo: () => call<AppInfo>("app_info"),
  apiServerStatus: () => call<ApiServerStatus>("api_server_status"),
  setApiServerSettings: (settings: ApiServerSettings) => call<ApiServerStatus>("set_api_server_settings", { settings }),
  apiModels: () => call<ApiModel[]>("api_models"),
  playgroundGenerate: (
    request: { model: string | null; prompt: string; max_tokens: number; sampler: SamplerConfig; stop: string[] },
    onText: (t: string) => void,
  ) => call<Completion>("playground_generate", { request, onEvent: channel<{ type: "text"; text: string }>((e) => onText(e.text)) }),
  stopPlayground: () => call<boolean>("stop_playground"),
  listCharacters: (query: { tag?: string | null; search?: string | null } = {}) =>
    call<CharacterSummary[]>("list_characters", { query }),
  getCharacter: (id: number) => call<Character>("get_character", { id }),
  createCharacter: (draft: CharacterDraft) => call<Character>("create_character", { draft }),
  updateCharacter: (id: number, draft: CharacterDraft) => call<Character>("update_character", { id, draft }),
  duplicateCharacter: (id: number) => call<Character>("duplicate_character", { id }),
  deleteCharacter: (id: number) => call<null>("delete_character", { id }),
  listTags: () => call<TagCount[]>("list_tags"),
  restoreBuiltins: () => call<number>("restore_builtins"),
  importCards: (paths: string[], onDuplicate: OnDuplicate = "ask") =>
    call<ImportOutcome[]>("import_cards", { paths, onDuplicate }),
  exportCharacter: (id: number, format: CardFormat, path: string) =>
    call<null>("export_character", { id, format, path }),
  lintCard: (card: CharacterCard) => call<CardLint>("lint_card", { card }),
  listLorebooks: () => call<LorebookView[]>("list_lorebooks"),
  createLorebook: (book: Lorebook, links: LorebookLink[] = []) =>
    call<LorebookView>("create_lorebook", { book, links }),
  updateLorebook: (id: number, book: Lorebook, links: LorebookLink[] | null = null) =>
    call<LorebookView>("update_lorebook", { id, book, links }),
  deleteLorebook: (id: number) => call<null>("delete_lorebook", { id }),
  exportLorebook: (id: number, format: LorebookFormat, path: string) =>
    call<null>("export_lorebook", { id, format, path }),
  listPersonas: () => call<Persona[]>("list_personas"),
  createPersona: (draft: PersonaDraft) => call<Persona[]>("create_persona", { draft }),
  updatePersona: (id: number, draft: PersonaDraft) => call<Persona[]>("update_persona", { id, draft }),
  deletePersona: (id: number) => call<Persona[]>("delete_persona", { id }),
  setDefaultPersona: (id: number) => call<Persona[]>("set_default_persona", { id }),
  modelsOverview: () => call<ModelsOverview>("models_overview"),
  downloadModel: (catalogId: string, onProgress: (p: DownloadProgress) => void) => {
    const channel = new Channel<DownloadProgress>();
    channel.onmessage = onProgress;
    return call<Model>("download_model", { catalogId, onProgress: channel });
  },
  stopDownload: (catalogId: string, discard: boolean) => call<boolean>("stop_download", { catalogId, discard }),
  importModel: (path: string) => call<Model>("import_model", { path }),
  deleteModel: (id: number) => call<null>("delete_model", { id }),
  setDefaultModel: (id: number) => call<Model>("set_default_model", { id }),
  quantizeModel: (id: number, quant: string, onProgress: (p: QuantizeProgress) => void) => {
    const channel = new Channel<QuantizeProgress>();
    channel.onmessage = onProgress;
    return call<Model>("quantize_model", { id, quant, onProgress: channel });
  },
  listChats: (characterId: number) => call<ChatSummary[]>("list_chats", { characterId }),
  startChat: (characterId: number) => call<ChatView>("start_chat", { characterId }),
  chatView: (chatId: number) => call<ChatView>("chat_view", { chatId }),
  sendMessage: (chatId: number, text: string, onEvent: (e: ChatEvent) => void) =>
    call<ChatView>("send_message", { chatId, text, onEvent: channel(onEvent) }),
  regenerate: (messageId: number, onEvent: (e: ChatEvent) => void) =>
    call<ChatView>("regenerate", { messageId, onEvent: channel(onEvent) }),
  continueReply: (chatId: number, onEvent: (e: ChatEvent) => void) =>
    call<ChatView>("continue_reply", { chatId, onEvent: channel(onEvent) }),
  stopGeneration: () => call<boolean>("stop_generation"),
  selectSwipe: (messageId: number, index: number) => call<ChatView>("select_swipe", { messageId, index }),
  editMessage: (messageId: number, content: string) => call<ChatView>("edit_message", { messageId, content }),
  deleteMessage: (messageId: number) => call<ChatView>("delete_message", { messageId }),
  renameChat: (chatId: number, title: string) => call<ChatView>("rename_chat", { chatId, title }),
  deleteChat: (chatId: number) => call<null>("delete_chat", { chatId }),
  setChatSettings: (chatId: number, settings: ChatSettings) => call<ChatView>("set_chat_settings", { chatId, settings }),
  promptReport: (messageId: number) => call<PromptReport | null>("prompt_report", { messageId }),
  setChatMemory: (chatId: number, text: string) => call<ChatView>("set_chat_memory", { chatId, text }),
  updateMemory: (chatId: number) => call<MemoryUpdate>("update_memory", { chatId }),
  stopMemoryUpdate: () => call<boolean>("stop_memory_update"),
  searchMessages: (query: string) => call<MessageHit[]>("search_messages", { query }),
  openMessage: (messageId: number) => call<ChatView>("open_message", { messageId }),
  exportChat: (chatId: number, format: "jsonl" | "markdown", path: string | null) =>
    call<string>("export_chat", { chatId, format, path }),
  importChat: (characterId: number, path: string) => call<ChatView>("import_chat", { characterId, path }),
  streamTest: (count: number, perSec: number, onEvent: (e: ChatEvent) => void) =>
    call<{ pieces: number; seconds: number; pieces_per_sec: number }>("stream_test", {
      count,
      perSec,
      onEvent: channel(onEvent),
    }),
  preferencePairs: (characterId: number) => call<PreferencePair[]>("preference_pairs", { characterId }),
  setPairExcluded: (chosenId: number, rejectedId: number, excluded: boolean) =>
    call<null>("set_pair_excluded", { chosenId, rejectedId, excluded }),
  setChatPrefsExcluded: (chatId: number, excluded: boolean) => call<null>("set_chat_prefs_excluded", { chatId, excluded }),
  exportPreferences: (characterId: number, path: string) => call<number>("export_preferences", { characterId, path }),
  importPreferences: (characterId: number, path: string) => call<PrefsImport>("import_preferences", { characterId, path }),
  setImportedPairExcluded: (id: number, excluded: boolean) => call<null>("set_imported_pair_excluded", { id, excluded }),
  deleteImportedPairs: (characterId: number, source: string | null) =>
    call<number>("delete_imported_pairs", { characterId, source }),
  inspectDataset: (path: string) => call<DatasetInfo>("inspect_dataset", { path }),
  datasetDownloaded: (datasetId: string) => call<boolean>("dataset_downloaded", { datasetId }),
  downloadDataset: (datasetId: string, onProgress: (p: DownloadProgress) => void) =>
    call<unknown>("download_dataset", { datasetId, onProgress: channel(onProgress) }),
  previewTrainingData: (modelId: number, source: DataSource, data: DataOptions) =>
    call<DataPreview>("preview_training_data", { modelId, source, data }),
  estimateTraining: (modelId: number, config: TrainConfig, seqLen: number) =>
    call<Estimate>("estimate_training", { modelId, config, seqLen }),
  startTraining: (request: TrainRequest, onEvent: (e: TrainEvent) => void) =>
    call<RunView>("start_training", { request, onEvent: channel(onEvent) }),
  resumeTraining: (runId: number, onEvent: (e: TrainEvent) => void) =>
    call<RunView>("resume_training", { runId, onEvent: channel(onEvent) }),
  stopTraining: (runId: number) => call<boolean>("stop_training", { runId }),
  listRuns: () => call<RunView[]>("list_runs"),
  deleteRun: (runId: number) => call<null>("delete_run", { runId }),
  listAdapters: () => call<Adapter[]>("list_adapters"),
  attachAdapter: (characterId: number, adapterId: number | null) =>
    call<Character>("attach_adapter", { characterId, adapterId }),
  deleteAdapter: (adapterId: number) => call<null>("delete_adapter", { adapterId }),
  exportAdapter: (adapterId: number, format: "peft" | "gguf_lora" | "merged", path: string) =>
    call<null>("export_adapter", { adapterId, format, path }),
  sampleReplies: (modelId: number, adapterId: number | null, characterId: number | null, prompts: string[]) =>
    call<string[]>("sample_replies", { modelId, adapterId, characterId, prompts }),
};

function channel<T>(onMessage: (m: T) => void): Channel<T> {
  const c = new Channel<T>();
  c.onmessage = onMessage;
  return c;
}

/** The URL of a character's avatar; the version busts the cache after an edit. */
export function avatarUrl(id: number, version: number): string {
  return `${convertFileSrc(String(id), "avatar")}?v=${version}`;
}
