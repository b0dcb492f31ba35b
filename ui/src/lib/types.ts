// Mirrors of the Rust types the commands send and take (serde field names).

/** Character Card V2 `data` (dramatis-persona `CharacterCard`). */
export interface CharacterCard {
  name: string;
  description: string;
  personality: string;
  scenario: string;
  first_mes: string;
  mes_example: string;
  creator_notes: string;
  system_prompt: string;
  post_history_instructions: string;
  alternate_greetings: string[];
  character_book?: unknown;
  tags: string[];
  creator: string;
  character_version: string;
  /** Other apps' data: kept verbatim, never edited here. */
  extensions: Record<string, unknown>;
  /** Unknown card keys (V3 and later) ride along untouched. */
  [other: string]: unknown;
}

/** dramatis-core `Character`. */
export interface Character {
  id: number;
  card: CharacterCard;
  builtin: boolean;
  avatar_version: number | null;
  /** The card's own lorebook, parsed for the editor (null when none). */
  book: Lorebook | null;
  tagline: string;
  created_at: number;
  updated_at: number;
}

/** dramatis-core `CharacterSummary`. */
export interface CharacterSummary {
  id: number;
  name: string;
  tagline: string;
  tags: string[];
  builtin: boolean;
  avatar_version: number | null;
}

/** dramatis-core `AvatarEdit`. */
export type AvatarEdit = { kind: "keep" } | { kind: "remove" } | { kind: "set"; data_base64: string };

/** dramatis-core `CharacterDraft`. */
export interface CharacterDraft {
  card: CharacterCard;
  avatar: AvatarEdit;
  /** An edit of the card's own lorebook; absent leaves it as it is. */
  book?: { kind: "set"; book: Lorebook } | { kind: "remove" };
}

/** dramatis-store `TagCount`. */
export interface TagCount {
  tag: string;
  count: number;
}

/** dramatis-core `Persona`. */
export interface Persona {
  id: number;
  name: string;
  description: string;
  is_default: boolean;
}

/** dramatis-persona `PersonaDraft`. */
export interface PersonaDraft {
  name: string;
  description: string;
}

/** The shell's `AppInfo`. */
export interface AppInfo {
  version: string;
  data_dir: string;
  schema_version: number;
}

/** dramatis-persona `FieldError`. */
export interface FieldError {
  field: string;
  message: string;
}

/** dramatis-core `ErrorKind`. */
export type ErrorKind =
  | "validation"
  | "not_found"
  | "too_new"
  | "disk_full"
  | "conflict"
  | "storage"
  | "network"
  | "cancelled"
  | "bad_file"
  | "no_model"
  | "out_of_memory";

/** The shell's `CommandError`. */
export interface CommandError {
  kind: ErrorKind;
  message: string;
  fields: FieldError[];
}

export function emptyCard(): CharacterCard {
  return {
    name: "",
    description: "",
    personality: "",
    scenario: "",
    first_mes: "",
    mes_example: "",
    creator_notes: "",
    system_prompt: "",
    post_history_instructions: "",
    alternate_greetings: [],
    tags: [],
    creator: "",
    character_version: "",
    extensions: {},
  };
}

/** dramatis-hub `RemoteFile`. */
export interface RemoteFile {
  repo: string;
  repo_type: "model" | "dataset";
  revision: string;
  path: string;
}

/** dramatis-hub `CatalogModel` with dramatis-core's install state (`CatalogItem`). */
export interface CatalogItem {
  id: string;
  name: string;
  description: string;
  default: boolean;
  format: "gguf" | "safetensors";
  quantization: string;
  approx_bytes: number;
  files: RemoteFile[];
  tokenizer: RemoteFile;
  installed_id: number | null;
  downloading: boolean;
  partial_bytes: number;
}

/** dramatis-core `Model`: an installed model. */
export interface Model {
  id: number;
  name: string;
  source: "catalog" | "import" | "quantized";
  catalog_id: string | null;
  format: "gguf" | "safetensors";
  quantization: string;
  path: string;
  tokenizer_path: string;
  size_bytes: number;
  sha256: string | null;
  is_default: boolean;
  present: boolean;
}

/** dramatis-core `DeviceInfo`. */
export interface DeviceInfo {
  kind: "cuda" | "metal" | "cpu";
  name: string;
  memory_bytes: number | null;
}

/** dramatis-core `ModelsOverview`. */
export interface ModelsOverview {
  installed: Model[];
  catalog: CatalogItem[];
  cache_dir: string;
  used_bytes: number;
  free_bytes: number | null;
  device: DeviceInfo;
}

/** dramatis-hub `DownloadProgress`. */
export interface DownloadProgress {
  phase: "checking" | "downloading" | "verifying";
  file: string;
  done_bytes: number;
  total_bytes: number;
  bytes_per_sec: number;
  eta_secs: number | null;
}

/** dramatis-llm `QuantizeProgress`: one report per tensor written. */
export interface QuantizeProgress {
  done: number;
  total: number;
  tensor: string;
}

/** dramatis-persona `PromptFormat`. */
export type PromptFormat = "roleplay" | "transcript";

/** dramatis-core `ChatSettings`. */
export interface ChatSettings {
  format: PromptFormat;
  temperature: number;
  top_k: number;
  top_p: number;
  min_p: number;
  repetition_penalty: number;
  max_new_tokens: number;
  seed: number | null;
  context: ContextMode;
  author_note: AuthorNote;
  memory: boolean;
  memory_budget: number;
  memory_depth: number | null;
  world_scan_depth: number;
  world_budget_percent: number;
  world_recursive: boolean;
}

/** dramatis-core `ContextMode`: what happens at the window's edge. */
export type ContextMode = "shift" | "exact";

/** dramatis-persona `AuthorNote`. */
export interface AuthorNote {
  text: string;
  depth: number;
  interval: number;
}

/** dramatis-persona `SectionKind`. */
export type SectionKind =
  | "system_prompt"
  | "definition"
  | "persona"
  | "examples"
  | "memory"
  | "history"
  | "author_note"
  | "world_info"
  | "post_history"
  | "reply";

/** dramatis-llm `PrefillCounts`. */
export interface PrefillCounts {
  prompt: number;
  reused: number;
  shifted: number;
  computed: number;
  discarded: number;
}

/** dramatis-core `PromptReport`. */
export interface PromptReport {
  tokens: number;
  budget: number;
  context: number;
  sections: { kind: SectionKind; tokens: number; start: number; end: number; text: string }[];
  turns_dropped: number;
  turns_total: number;
  first_message_id: number | null;
  memory_up_to_id: number | null;
  mode: ContextMode;
  counts: PrefillCounts | null;
  world_info: Activated[];
  world_info_dropped: string[];
}

/** dramatis-core `MemoryUpdate`. */
export type MemoryUpdate =
  | { status: "up_to_date" }
  | { status: "busy" }
  | { status: "stopped" }
  | { status: "written"; memory: ChatMemory; messages: number };

/** dramatis-store `MemoryRow`. */
export interface ChatMemory {
  id: number;
  chat_id: number;
  up_to_id: number;
  text: string;
  edited: boolean;
  updated_at: number;
}

/** dramatis-core `ChatMessage`. */
export interface ChatMessage {
  id: number;
  parent_id: number | null;
  role: "user" | "assistant" | "system";
  content: string;
  swipe_index: number;
  swipe_count: number;
  created_at: number;
  /** Lorebook entries that fired for this reply. */
  world_info: number;
}

/** dramatis-core `ChatSummary`. */
export interface ChatSummary {
  id: number;
  character_id: number;
  title: string;
  last_message: string | null;
  message_count: number;
  updated_at: number;
}

/** dramatis-core `ChatView`. */
export interface ChatView {
  chat: ChatSummary;
  character_name: string;
  user_name: string;
  messages: ChatMessage[];
  settings: ChatSettings;
  window_start_id: number | null;
  memory: ChatMemory | null;
}

/** dramatis-core `ChatEvent`. */
export type ChatEvent =
  | { type: "waiting"; ahead: number }
  | { type: "loading"; model: string }
  | {
      type: "started";
      user_message: ChatMessage | null;
      reply: ChatMessage;
      prompt_tokens: number;
      budget: number;
      turns_included: number;
      turns_total: number;
      first_message_id: number | null;
      sections: [SectionKind, number][];
    }
  | { type: "text"; text: string }
  | {
      type: "finished";
      reply: ChatMessage;
      stop_reason: string;
      tokens: number;
      tokens_per_sec: number;
      counts: PrefillCounts;
    };

/** dramatis-core `MessageHit`. */
export interface MessageHit {
  message_id: number;
  chat_id: number;
  chat_title: string;
  character_id: number;
  character_name: string;
  snippet: string;
  path: number[];
  on_visible_branch: boolean;
}

/** dramatis-train `TrainConfig`. */
export interface TrainConfig {
  r: number;
  alpha: number;
  dropout: number;
  targets: string[];
  lr: number;
  batch_size: number;
  grad_accum: number;
  epochs: number;
  max_steps: number | null;
  schedule: { kind: "constant" } | { kind: "cosine"; warmup: number };
  clip: number | null;
  weight_decay: number;
  eval_every: number;
  checkpoint_every: number;
  seed: number;
  gradient_checkpointing: boolean;
  /** Omitted: cross-entropy (SFT). */
  objective?: Objective;
}

/** dramatis-train `Objective`. */
export type Objective = { kind: "sft" } | { kind: "dpo"; beta: number; sft_weight: number };

/** dramatis-train `DataOptions`. */
export interface DataOptions {
  max_len: number;
  loss_on: "all" | "assistant_only";
  eval_fraction: number;
  limit: number | null;
  seed: number;
}

/** dramatis-core `DataSource`. */
export type DataSource =
  | { kind: "catalog"; dataset_id: string }
  | { kind: "file"; path: string; column: string }
  | { kind: "chats"; character_id: number }
  | { kind: "preferences"; character_id: number };

/** dramatis-core `TrainRequest`. */
export interface TrainRequest {
  name: string;
  model_id: number;
  character_id: number | null;
  source: DataSource;
  config: TrainConfig;
  data: DataOptions;
  start_adapter_id?: number | null;
}

/** dramatis-train `DataReport`. */
export interface DataReport {
  rows: number;
  used: number;
  truncated: number;
  empty: number;
  malformed: number;
  tokens: number;
  longest: number;
  train_rows: number;
  eval_rows: number;
}

/** dramatis-core `DataPreview`. */
export interface DataPreview {
  report: DataReport;
  samples: { row: number; text: string; tokens: number }[];
  problems: { row: number; message: string }[];
  pairs: PairPreview | null;
}

/** dramatis-train `PairReport`. */
export interface PairReport {
  pairs: number;
  used: number;
  truncated: number;
  empty: number;
  tokens: number;
  longest: number;
  train_pairs: number;
  eval_pairs: number;
}

/** dramatis-core `PairPreview`: the validation report of a character's pairs. */
export interface PairPreview {
  report: PairReport;
  excluded: number;
  other_models: number;
  rebuilt_prompts: number;
  imported: number;
  samples: { prompt: string; chosen: string; rejected: string }[];
  start_adapter: Adapter | null;
}

/** dramatis-train `Estimate`. */
export interface Estimate {
  peak_bytes: number;
  weight_bytes: number;
  activation_bytes: number;
  lora_bytes: number;
  tokens_per_sec: number | null;
  fits: boolean | null;
  advice: string[];
}

/** dramatis-train `TrainProgress`. */
export interface TrainProgress {
  step: number;
  total_steps: number;
  epoch: number;
  loss: number;
  lr: number;
  grad_norm: number;
  tokens_per_sec: number;
  tokens: number;
  eta_secs: number;
  eval_loss: number | null;
  memory_bytes: number | null;
  checkpoint: boolean;
  samples: string[];
  margin: number | null;
  accuracy: number | null;
  eval_margin: number | null;
  eval_accuracy: number | null;
  /** The data rows this step trained on (1-based); empty for DPO. */
  rows: number[];
}

/** dramatis-core `TrainEvent`. */
export type TrainEvent =
  | { type: "started"; run_id: number; report: DataReport; total_steps: number; step: number }
  | ({ type: "progress" } & TrainProgress);

/** dramatis-core `MetricPoint`. */
export interface MetricPoint {
  step: number;
  loss: number;
  eval_loss: number | null;
  margin?: number | null;
  accuracy?: number | null;
  eval_margin?: number | null;
}

/** dramatis-core `RunView`. */
export interface RunView {
  id: number;
  name: string;
  status: "running" | "stopped" | "finished" | "failed";
  step: number;
  total_steps: number;
  metrics: MetricPoint[];
  error: string | null;
  request: TrainRequest | null;
  adapter_id: number | null;
  updated_at: number;
}

/** dramatis-core `Adapter`. */
export interface Adapter {
  id: number;
  name: string;
  run_id: number | null;
  base_model_id: number | null;
  path: string;
  recipe: unknown;
  metrics: { final_loss?: number; steps?: number };
  characters: number[];
  created_at: number;
}

/** dramatis-hub `DatasetInfo`. */
export interface DatasetInfo {
  path: string;
  format: string;
  columns: string[];
  rows: number;
}

/** dramatis-core `OnDuplicate`. */
export type OnDuplicate = "ask" | "replace" | "keep_both" | "skip";

/** dramatis-core `ImportOutcome`: what happened to one imported file. */
export type ImportOutcome =
  | {
      status: "imported";
      file: string;
      character: CharacterSummary;
      replaced: boolean;
      changes: string[];
      adapter: string | null;
    }
  | { status: "lorebook"; file: string; id: number; name: string; entries: number }
  | { status: "duplicate"; file: string; name: string; existing_id: number }
  | { status: "skipped"; file: string; name: string }
  | { status: "failed"; file: string; message: string };

/** dramatis-core `CardFormat`. */
export type CardFormat = "png" | "json_v2" | "json_v3" | "charx";

/** dramatis-persona `lint::Severity`. */
export type Severity = "info" | "warning" | "error";

/** dramatis-persona `lint::LintReport`. */
export interface LintReport {
  fields: { field: string; tokens: number; in_prompt: boolean }[];
  permanent_tokens: number;
  window: number;
  history_tokens: number;
  history_turns_estimate: number;
  share: number;
  lints: { field: string; severity: Severity; message: string; fix: string }[];
}

/** dramatis-core `CardLint`. */
export interface CardLint {
  report: LintReport;
  /** The model whose tokenizer counted; null: estimated. */
  tokenizer: string | null;
}

/** dramatis-store `LorebookLink`. */
export type LorebookLink = { scope: "global" } | { scope: "character"; id: number } | { scope: "chat"; id: number };

/** dramatis-core `LorebookView`. */
export interface LorebookView {
  id: number;
  book: Lorebook;
  links: LorebookLink[];
  updated_at: number;
}

/** dramatis-core `LorebookFormat`. */
export type LorebookFormat = "world_info" | "v3";

/** dramatis-persona `lorebook::Position` (SillyTavern numbers them 0–6). */
export type LorePosition =
  | "before_char"
  | "after_char"
  | "author_note_top"
  | "author_note_bottom"
  | "at_depth"
  | "examples_top"
  | "examples_bottom";

/** dramatis-persona `lorebook::Logic`: how secondary keys combine. */
export type LoreLogic = "and_any" | "not_all" | "not_any" | "and_all";

/** dramatis-persona `lorebook::Role`. */
export type LoreRole = "system" | "user" | "assistant";

/** dramatis-persona `lorebook::Entry`. */
export interface LoreEntry {
  id: number;
  keys: string[];
  secondary_keys: string[];
  logic: LoreLogic;
  selective: boolean;
  content: string;
  comment: string;
  name: string;
  constant: boolean;
  enabled: boolean;
  insertion_order: number;
  priority: number | null;
  position: LorePosition;
  depth: number;
  role: LoreRole;
  probability: number;
  use_probability: boolean;
  case_sensitive: boolean | null;
  match_whole_words: boolean | null;
  use_regex: boolean;
  scan_depth: number | null;
  group: string;
  group_override: boolean;
  group_weight: number;
  exclude_recursion: boolean;
  prevent_recursion: boolean;
  delay_until_recursion: boolean;
  extensions: Record<string, unknown>;
  /** Keys of the file Dramatis does not know, kept verbatim. */
  [other: string]: unknown;
}

/** dramatis-persona `lorebook::Lorebook`. */
export interface Lorebook {
  name: string;
  description: string;
  scan_depth: number | null;
  token_budget: number | null;
  recursive_scanning: boolean;
  extensions: Record<string, unknown>;
  entries: LoreEntry[];
  [other: string]: unknown;
}

/** A new entry with SillyTavern's defaults. */
export function emptyEntry(id: number): LoreEntry {
  return {
    id,
    keys: [],
    secondary_keys: [],
    logic: "and_any",
    selective: true,
    content: "",
    comment: "",
    name: "",
    constant: false,
    enabled: true,
    insertion_order: 100,
    priority: null,
    position: "before_char",
    depth: 4,
    role: "system",
    probability: 100,
    use_probability: true,
    case_sensitive: null,
    match_whole_words: null,
    use_regex: false,
    scan_depth: null,
    group: "",
    group_override: false,
    group_weight: 100,
    exclude_recursion: false,
    prevent_recursion: false,
    delay_until_recursion: false,
    extensions: {},
  };
}

/** An empty book. */
export function emptyBook(name = ""): Lorebook {
  return { name, description: "", scan_depth: null, token_budget: null, recursive_scanning: false, extensions: {}, entries: [] };
}

/** dramatis-persona `worldinfo::Reason`: why an entry fired. */
export type LoreReason =
  | { kind: "constant" }
  | { kind: "decorator" }
  | { kind: "key"; key: string; secondary: string | null; message: number; recursion: boolean };

/** dramatis-persona `worldinfo::Activated`: an entry that fired for a reply. */
export interface Activated {
  book: number;
  entry: number;
  id: number;
  comment: string;
  content: string;
  position: LorePosition;
  depth: number;
  role: LoreRole;
  order: number;
  tokens: number;
  reason: LoreReason;
}

/** dramatis-core `ApiServerSettings`. */
export interface ApiServerSettings {
  enabled: boolean;
  port: number;
  api_key: string;
  allow_network: boolean;
  cors_origins: string[];
}

/** The shell's `ApiServerStatus`. */
export interface ApiServerStatus {
  settings: ApiServerSettings;
  url: string | null;
  error: string | null;
  requests: number;
  busy: boolean;
  waiting: number;
}

/** dramatis-core `ApiModel`. */
export interface ApiModel {
  id: string;
  model_id: number;
  adapter_id: number | null;
  context: number;
  created: number;
}

/** dramatis-llm `SamplerConfig`. */
export interface SamplerConfig {
  temperature: number;
  top_k: number;
  top_p: number;
  min_p: number;
  repetition_penalty: number;
  presence_penalty: number;
  frequency_penalty: number;
  penalty_window: number;
  seed: number;
}

/** dramatis-core `Completion`. */
export interface Completion {
  model: string;
  text: string;
  prompt_tokens: number;
  completion_tokens: number;
  finish_reason: "stop" | "length" | "cancelled";
  reused_tokens: number;
  tokens_per_sec: number;
}

/** dramatis-core `PreferencePair`. */
export interface PreferencePair {
  chat_id: number;
  chat_title: string;
  chosen_id: number;
  rejected_id: number;
  kind: "swipe" | "edit" | "imported";
  prompt: string;
  exact_prompt: boolean;
  chosen: string;
  rejected: string;
  chosen_model: string | null;
  rejected_model: string | null;
  excluded: boolean;
  imported_id: number | null;
  source: string | null;
}

/** dramatis-core `PrefsImport`. */
export interface PrefsImport {
  added: number;
  duplicates: number;
  skipped: { line: number; message: string }[];
  skipped_count: number;
  changed: string[];
}
