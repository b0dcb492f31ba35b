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
export type ErrorKind = "validation" | "not_found" | "too_new" | "disk_full" | "conflict" | "storage";

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
