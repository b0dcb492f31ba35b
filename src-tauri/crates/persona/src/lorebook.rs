//! Lorebooks (world info): one data model and the three file shapes it is read
//! from and written to — a card's `character_book` (V2/V3), SillyTavern's own
//! world file (`{"entries": {"<uid>": {...}}}`), and a standalone V3
//! `lorebook_v3` — plus the V3 decorators at the top of an entry's content.
//!
//! Readers are lenient (numbers as strings, `null` for defaults, a key list as
//! one comma-separated string) and never panic; anything they do not know is
//! kept verbatim and written back.
//!
//! Where unknown keys go, per shape:
//! - Unknown top-level keys of a book or an entry land in `other` whichever
//!   shape they came from and are written back, in whichever shape is written,
//!   unless that shape already writes a key of the same name.
//! - An entry's `extensions` holds the card-shape extension keys the model has
//!   no field for (`display_index`, `sticky`, ...). SillyTavern's world file
//!   keeps a few of them at the top level under camelCase names
//!   ([`ST_PASSTHROUGH`]); those move between the two places on read and write.
//! - Model fields a shape has no slot for (a world file has no `name`,
//!   `priority` or `use_regex`; a book has no `description` there) are written
//!   under their model names only when they differ from the default.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use crate::error::ValidationErrors;

/// Largest lorebook file [`Lorebook::from_json`] reads.
pub const MAX_BOOK_BYTES: usize = 16 << 20;
/// Most entries one book may have; more is a hostile or broken file.
pub const MAX_BOOK_ENTRIES: usize = 10_000;

/// The field every conversion error is reported under.
const FIELD: &str = "lorebook";

/// A lorebook: entries that bring text into the prompt when their keys appear
/// in the chat.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Lorebook {
    /// What the book is called.
    pub name: String,
    /// Notes about the book; never part of a prompt.
    pub description: String,
    /// Messages scanned for keys, overriding the app's setting.
    pub scan_depth: Option<usize>,
    /// Most tokens this book's entries may take together.
    pub token_budget: Option<usize>,
    /// Whether activated content is scanned for further keys.
    pub recursive_scanning: bool,
    /// Application data of the book, kept verbatim.
    pub extensions: Map<String, Value>,
    /// The entries, in file order.
    pub entries: Vec<Entry>,
    /// Top-level keys of the file this model does not know, kept verbatim.
    #[serde(flatten)]
    pub other: Map<String, Value>,
}

impl Default for Lorebook {
    fn default() -> Self {
        Self {
            name: String::new(),
            description: String::new(),
            scan_depth: None,
            token_budget: None,
            recursive_scanning: false,
            extensions: Map::new(),
            entries: Vec::new(),
            other: Map::new(),
        }
    }
}

/// One lorebook entry: keys to look for and the content they bring in.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Entry {
    /// V2 `id` / SillyTavern `uid`.
    pub id: i64,
    /// Primary keys; any one present activates the entry.
    pub keys: Vec<String>,
    /// Secondary keys, combined with `logic` when `selective`.
    pub secondary_keys: Vec<String>,
    /// How secondary keys combine (SillyTavern `selectiveLogic`).
    pub logic: Logic,
    /// Whether the secondary keys are consulted at all.
    pub selective: bool,
    /// Text put into the prompt (may start with V3 decorators).
    pub content: String,
    /// The author's label for the entry; never part of a prompt.
    pub comment: String,
    /// V2 entry name; never part of a prompt.
    pub name: String,
    /// Always active, keys or not.
    pub constant: bool,
    /// Disabled entries never activate.
    pub enabled: bool,
    /// Lower is earlier in the prompt (SillyTavern `order`).
    pub insertion_order: i64,
    /// Lowest is dropped first when over budget; `None` uses `insertion_order`.
    pub priority: Option<i64>,
    /// Where the content goes in the prompt.
    pub position: Position,
    /// Messages from the end, for [`Position::AtDepth`].
    pub depth: usize,
    /// Who speaks the content, for [`Position::AtDepth`].
    pub role: Role,
    /// Chance to activate, in percent (0–100).
    pub probability: u32,
    /// Whether `probability` is rolled at all.
    pub use_probability: bool,
    /// Key matching respects case; `None` uses the global setting.
    pub case_sensitive: Option<bool>,
    /// One-word keys match whole words only; `None` uses the global setting.
    pub match_whole_words: Option<bool>,
    /// Every key is a regular expression.
    pub use_regex: bool,
    /// Messages scanned for this entry; `None` uses the book's or the app's.
    pub scan_depth: Option<usize>,
    /// Inclusion groups (comma-separated); one member of a group activates.
    pub group: String,
    /// Wins its group over members without the flag.
    pub group_override: bool,
    /// Relative chance to win its group.
    pub group_weight: u32,
    /// Never activated by another entry's content.
    pub exclude_recursion: bool,
    /// Its content never activates other entries.
    pub prevent_recursion: bool,
    /// Activated only in recursion passes.
    pub delay_until_recursion: bool,
    /// Card-shape extension keys with no field here, kept verbatim.
    pub extensions: Map<String, Value>,
    /// Entry keys of the file this model does not know, kept verbatim.
    #[serde(flatten)]
    pub other: Map<String, Value>,
}

impl Default for Entry {
    fn default() -> Self {
        Self {
            id: 0,
            keys: Vec::new(),
            secondary_keys: Vec::new(),
            logic: Logic::AndAny,
            selective: true,
            content: String::new(),
            comment: String::new(),
            name: String::new(),
            constant: false,
            enabled: true,
            insertion_order: 100,
            priority: None,
            position: Position::BeforeChar,
            depth: 4,
            role: Role::System,
            probability: 100,
            use_probability: true,
            case_sensitive: None,
            match_whole_words: None,
            use_regex: false,
            scan_depth: None,
            group: String::new(),
            group_override: false,
            group_weight: 100,
            exclude_recursion: false,
            prevent_recursion: false,
            delay_until_recursion: false,
            extensions: Map::new(),
            other: Map::new(),
        }
    }
}

/// Where an entry's content goes; SillyTavern numbers them 0–6.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Position {
    /// Before the character definitions (0, V2 `before_char`).
    #[default]
    BeforeChar,
    /// After the character definitions (1, V2 `after_char`).
    AfterChar,
    /// Above the author's note (2).
    AuthorNoteTop,
    /// Below the author's note (3).
    AuthorNoteBottom,
    /// Inside the chat, `depth` messages from the end (4).
    AtDepth,
    /// Above the example messages (5).
    ExamplesTop,
    /// Below the example messages (6).
    ExamplesBottom,
}

const POSITIONS: [(Position, &str); 7] = [
    (Position::BeforeChar, "before_char"),
    (Position::AfterChar, "after_char"),
    (Position::AuthorNoteTop, "author_note_top"),
    (Position::AuthorNoteBottom, "author_note_bottom"),
    (Position::AtDepth, "at_depth"),
    (Position::ExamplesTop, "examples_top"),
    (Position::ExamplesBottom, "examples_bottom"),
];

impl Position {
    /// SillyTavern's number for this position.
    pub fn st(self) -> i64 {
        POSITIONS.iter().position(|(p, _)| *p == self).unwrap_or(0) as i64
    }

    /// The position SillyTavern numbers `n`, if any.
    pub fn from_st(n: i64) -> Option<Self> {
        usize::try_from(n)
            .ok()
            .and_then(|i| POSITIONS.get(i))
            .map(|(p, _)| *p)
    }

    /// The V2 top-level string: V2 knows only before and after the character.
    pub fn v2(self) -> &'static str {
        if self == Self::BeforeChar {
            "before_char"
        } else {
            "after_char"
        }
    }

    /// Reads a position name: our snake_case names (V2's two among them).
    pub fn from_name(name: &str) -> Option<Self> {
        POSITIONS.iter().find(|(_, n)| *n == name).map(|(p, _)| *p)
    }

    /// Maps a V3 `@@position` value: `before_desc` → before the character,
    /// `after_desc` / `personality` / `scenario` → after it (we have no slot
    /// inside those fields); our own position names are accepted too.
    pub fn from_decorator(name: &str) -> Option<Self> {
        match name {
            "before_desc" => Some(Self::BeforeChar),
            "after_desc" | "personality" | "scenario" => Some(Self::AfterChar),
            other => Self::from_name(other),
        }
    }
}

/// How an entry's secondary keys combine; SillyTavern numbers them 0–3.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Logic {
    /// Some secondary key is present (0).
    #[default]
    AndAny,
    /// Not every secondary key is present (1).
    NotAll,
    /// No secondary key is present (2).
    NotAny,
    /// Every secondary key is present (3).
    AndAll,
}

const LOGICS: [(Logic, &str); 4] = [
    (Logic::AndAny, "and_any"),
    (Logic::NotAll, "not_all"),
    (Logic::NotAny, "not_any"),
    (Logic::AndAll, "and_all"),
];

impl Logic {
    /// SillyTavern's number for this logic.
    pub fn st(self) -> i64 {
        LOGICS.iter().position(|(l, _)| *l == self).unwrap_or(0) as i64
    }

    /// The logic SillyTavern numbers `n`, if any.
    pub fn from_st(n: i64) -> Option<Self> {
        usize::try_from(n)
            .ok()
            .and_then(|i| LOGICS.get(i))
            .map(|(l, _)| *l)
    }
}

/// Who speaks an entry placed in the chat; SillyTavern numbers them 0–2.
/// (The prompt's `Speaker` has no serde, so the stored shape has its own enum;
/// `prompt` converts it.)
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// The system part (0).
    #[default]
    System,
    /// The user (1).
    User,
    /// The character (2).
    Assistant,
}

const ROLES: [(Role, &str); 3] = [
    (Role::System, "system"),
    (Role::User, "user"),
    (Role::Assistant, "assistant"),
];

impl Role {
    /// SillyTavern's number for this role.
    pub fn st(self) -> i64 {
        ROLES.iter().position(|(r, _)| *r == self).unwrap_or(0) as i64
    }

    /// The role SillyTavern numbers `n`, if any.
    pub fn from_st(n: i64) -> Option<Self> {
        usize::try_from(n)
            .ok()
            .and_then(|i| ROLES.get(i))
            .map(|(r, _)| *r)
    }

    /// Reads `system` / `user` / `assistant`.
    pub fn from_name(name: &str) -> Option<Self> {
        ROLES.iter().find(|(_, n)| *n == name).map(|(r, _)| *r)
    }
}

/// One V3 decorator line (`@@name args`) from the top of an entry's content.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Decorator {
    /// `@@depth N`: placed in the chat N messages from the end.
    Depth(usize),
    /// `@@reverse_depth N`: placed in the chat N messages from the start.
    ReverseDepth(usize),
    /// `@@activate`: always on.
    Activate,
    /// `@@dont_activate`: always off.
    DontActivate,
    /// `@@position NAME`: a name [`Position::from_decorator`] knows.
    Position(String),
    /// `@@role system|user|assistant`.
    Role(Role),
    /// `@@scan_depth N`: messages scanned for this entry.
    ScanDepth(usize),
    /// `@@activate_only_after N`: only once the chat has more than N messages.
    ActivateOnlyAfter(usize),
    /// `@@activate_only_every N`: only when the message count is a multiple of N.
    ActivateOnlyEvery(usize),
    /// `@@additional_keys a,b`: more primary keys.
    AdditionalKeys(Vec<String>),
    /// `@@exclude_keys a,b`: any present keeps the entry off.
    ExcludeKeys(Vec<String>),
    /// A line we do not understand (or with a bad number), as written.
    Other(String),
}

impl Decorator {
    /// Reads one line that starts with `@@` (or `@@@`); unknown → `Other`.
    fn parse(line: &str) -> Self {
        let body = line.trim_start_matches('@').trim();
        let (name, arg) = body
            .split_once(char::is_whitespace)
            .map_or((body, ""), |(n, a)| (n, a.trim()));
        let number = || arg.parse::<usize>().ok();
        let list = || -> Vec<String> {
            arg.split(',')
                .map(str::trim)
                .filter(|k| !k.is_empty())
                .map(str::to_owned)
                .collect()
        };
        let parsed = match name {
            "depth" => number().map(Self::Depth),
            "reverse_depth" => number().map(Self::ReverseDepth),
            "activate" if arg.is_empty() => Some(Self::Activate),
            "dont_activate" if arg.is_empty() => Some(Self::DontActivate),
            "position" => Position::from_decorator(arg).map(|_| Self::Position(arg.to_owned())),
            "role" => Role::from_name(arg).map(Self::Role),
            "scan_depth" => number().map(Self::ScanDepth),
            "activate_only_after" => number().map(Self::ActivateOnlyAfter),
            // Zero would divide by zero: a bad number.
            "activate_only_every" => number().filter(|n| *n > 0).map(Self::ActivateOnlyEvery),
            "additional_keys" => Some(Self::AdditionalKeys(list())).filter(|_| !arg.is_empty()),
            "exclude_keys" => Some(Self::ExcludeKeys(list())).filter(|_| !arg.is_empty()),
            _ => None,
        };
        parsed.unwrap_or_else(|| Self::Other(line.trim().to_owned()))
    }
}

impl Entry {
    /// The V3 decorators at the start of `content` and the rest, which is
    /// what goes into the prompt. Each `@@` line yields one decorator; its
    /// `@@@` fallback lines are stripped too and stand in for it (the first
    /// one understood) only when the `@@` line itself is `Other`.
    pub fn decorators(&self) -> (Vec<Decorator>, &str) {
        let mut found: Vec<Decorator> = Vec::new();
        let mut rest = self.content.as_str();
        // Whether the last `@@` line is still unknown, so a fallback may replace it.
        let mut open = false;
        while rest.starts_with("@@") {
            let (line, after) = rest.split_once('\n').unwrap_or((rest, ""));
            let line = line.strip_suffix('\r').unwrap_or(line);
            let parsed = Decorator::parse(line);
            if line.starts_with("@@@") && !found.is_empty() {
                if open && !matches!(parsed, Decorator::Other(_)) {
                    *found.last_mut().expect("not empty") = parsed;
                    open = false;
                }
            } else {
                open = matches!(parsed, Decorator::Other(_));
                found.push(parsed);
            }
            rest = after;
        }
        (found, rest)
    }
}

// ---- lenient readers: messy real files give numbers as strings and nulls ----

/// An integer from a number (fractions truncated) or a numeric string.
fn int(v: Option<&Value>) -> Option<i64> {
    match v? {
        Value::Number(n) => n.as_i64().or_else(|| {
            n.as_f64()
                .filter(|f| f.is_finite())
                .map(|f| f.clamp(i64::MIN as f64, i64::MAX as f64) as i64)
        }),
        Value::String(s) => {
            let s = s.trim();
            s.parse::<i64>().ok().or_else(|| {
                s.parse::<f64>()
                    .ok()
                    .filter(|f| f.is_finite())
                    .map(|f| f.clamp(i64::MIN as f64, i64::MAX as f64) as i64)
            })
        }
        _ => None,
    }
}

/// A count: a non-negative integer (negative counts are treated as absent).
fn count(v: Option<&Value>) -> Option<usize> {
    int(v).and_then(|n| usize::try_from(n).ok())
}

/// A flag from a bool, a number (non-zero is true) or "true"/"false"/"1"/"0".
fn flag(v: Option<&Value>) -> Option<bool> {
    match v? {
        Value::Bool(b) => Some(*b),
        Value::Number(n) => n.as_f64().map(|f| f != 0.0),
        Value::String(s) => match s.trim().to_ascii_lowercase().as_str() {
            "true" | "1" | "yes" => Some(true),
            "false" | "0" | "no" | "" => Some(false),
            _ => None,
        },
        _ => None,
    }
}

/// Text from a string, or a number or bool written out; anything else is empty.
fn text(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// A key list from an array, or one comma-separated string; blanks dropped.
fn key_list(v: Option<&Value>) -> Option<Vec<String>> {
    match v? {
        Value::Array(items) => Some(
            items
                .iter()
                .filter_map(|k| text(Some(k)))
                .filter(|k| !k.trim().is_empty())
                .collect(),
        ),
        Value::String(s) => Some(
            s.split(',')
                .map(str::trim)
                .filter(|k| !k.is_empty())
                .map(str::to_owned)
                .collect(),
        ),
        Value::Number(_) => text(v).map(|k| vec![k]),
        _ => None,
    }
}

fn position(v: Option<&Value>) -> Option<Position> {
    match v? {
        Value::String(s) if int(v).is_none() => Position::from_name(s.trim()),
        _ => int(v).and_then(Position::from_st),
    }
}

fn logic(v: Option<&Value>) -> Option<Logic> {
    match v? {
        Value::String(s) if int(v).is_none() => {
            let s = s.trim();
            LOGICS.iter().find(|(_, n)| *n == s).map(|(l, _)| *l)
        }
        _ => int(v).and_then(Logic::from_st),
    }
}

fn role(v: Option<&Value>) -> Option<Role> {
    match v? {
        Value::String(s) if int(v).is_none() => Role::from_name(s.trim()),
        _ => int(v).and_then(Role::from_st),
    }
}

fn percent(v: Option<&Value>) -> Option<u32> {
    int(v).map(|n| n.clamp(0, 100) as u32)
}

fn weight(v: Option<&Value>) -> Option<u32> {
    int(v).map(|n| n.clamp(0, i64::from(u32::MAX)) as u32)
}

/// `null` / absent → `None`; else the value read by `read` (bad → `None`).
fn optional<T>(v: Option<&Value>, read: impl Fn(Option<&Value>) -> Option<T>) -> Option<T> {
    v.filter(|v| !v.is_null()).and_then(|v| read(Some(v)))
}

fn opt_json<T: Into<Value>>(v: Option<T>) -> Value {
    v.map_or(Value::Null, Into::into)
}

/// The names of the advanced fields in one shape: the card's entry
/// `extensions` (as SillyTavern writes them) or the world file's entry.
struct Names {
    position: &'static str,
    depth: &'static str,
    logic: &'static str,
    probability: &'static str,
    use_probability: &'static str,
    group: &'static str,
    group_override: &'static str,
    group_weight: &'static str,
    scan_depth: &'static str,
    case_sensitive: &'static str,
    match_whole_words: &'static str,
    role: &'static str,
    exclude_recursion: &'static str,
    prevent_recursion: &'static str,
    delay_until_recursion: &'static str,
}

const CARD_EXT: Names = Names {
    position: "position",
    depth: "depth",
    logic: "selectiveLogic",
    probability: "probability",
    use_probability: "useProbability",
    group: "group",
    group_override: "group_override",
    group_weight: "group_weight",
    scan_depth: "scan_depth",
    case_sensitive: "case_sensitive",
    match_whole_words: "match_whole_words",
    role: "role",
    exclude_recursion: "exclude_recursion",
    prevent_recursion: "prevent_recursion",
    delay_until_recursion: "delay_until_recursion",
};

const WORLD: Names = Names {
    position: "position",
    depth: "depth",
    logic: "selectiveLogic",
    probability: "probability",
    use_probability: "useProbability",
    group: "group",
    group_override: "groupOverride",
    group_weight: "groupWeight",
    scan_depth: "scanDepth",
    case_sensitive: "caseSensitive",
    match_whole_words: "matchWholeWords",
    role: "role",
    exclude_recursion: "excludeRecursion",
    prevent_recursion: "preventRecursion",
    delay_until_recursion: "delayUntilRecursion",
};

impl Names {
    fn all(&self) -> [&'static str; 15] {
        [
            self.position,
            self.depth,
            self.logic,
            self.probability,
            self.use_probability,
            self.group,
            self.group_override,
            self.group_weight,
            self.scan_depth,
            self.case_sensitive,
            self.match_whole_words,
            self.role,
            self.exclude_recursion,
            self.prevent_recursion,
            self.delay_until_recursion,
        ]
    }

    /// Sets the fields present (and not null) in `src`; the rest keep their values.
    fn read(&self, e: &mut Entry, src: &Map<String, Value>) {
        let get = |k: &str| src.get(k).filter(|v| !v.is_null());
        if let Some(p) = position(get(self.position)) {
            e.position = p;
        }
        if let Some(d) = count(get(self.depth)) {
            e.depth = d;
        }
        if let Some(l) = logic(get(self.logic)) {
            e.logic = l;
        }
        if let Some(p) = percent(get(self.probability)) {
            e.probability = p;
        }
        if let Some(b) = flag(get(self.use_probability)) {
            e.use_probability = b;
        }
        if let Some(g) = text(get(self.group)) {
            e.group = g;
        }
        if let Some(b) = flag(get(self.group_override)) {
            e.group_override = b;
        }
        if let Some(w) = weight(get(self.group_weight)) {
            e.group_weight = w;
        }
        if let Some(d) = count(get(self.scan_depth)) {
            e.scan_depth = Some(d);
        }
        if let Some(b) = flag(get(self.case_sensitive)) {
            e.case_sensitive = Some(b);
        }
        if let Some(b) = flag(get(self.match_whole_words)) {
            e.match_whole_words = Some(b);
        }
        if let Some(r) = role(get(self.role)) {
            e.role = r;
        }
        if let Some(b) = flag(get(self.exclude_recursion)) {
            e.exclude_recursion = b;
        }
        if let Some(b) = flag(get(self.prevent_recursion)) {
            e.prevent_recursion = b;
        }
        // SillyTavern also writes a delay level here; any level counts as "delayed".
        if let Some(b) = flag(get(self.delay_until_recursion)) {
            e.delay_until_recursion = b;
        }
    }

    fn write(&self, e: &Entry, dst: &mut Map<String, Value>) {
        let fields: [(&str, Value); 15] = [
            (self.position, e.position.st().into()),
            (self.depth, e.depth.into()),
            (self.logic, e.logic.st().into()),
            (self.probability, e.probability.into()),
            (self.use_probability, e.use_probability.into()),
            (self.group, e.group.clone().into()),
            (self.group_override, e.group_override.into()),
            (self.group_weight, e.group_weight.into()),
            (self.scan_depth, opt_json(e.scan_depth)),
            (self.case_sensitive, opt_json(e.case_sensitive)),
            (self.match_whole_words, opt_json(e.match_whole_words)),
            (self.role, e.role.st().into()),
            (self.exclude_recursion, e.exclude_recursion.into()),
            (self.prevent_recursion, e.prevent_recursion.into()),
            (self.delay_until_recursion, e.delay_until_recursion.into()),
        ];
        for (k, v) in fields {
            dst.insert(k.to_owned(), v);
        }
    }
}

/// SillyTavern fields the model has no slot for, which its world file keeps at
/// the entry's top level and a card keeps in the entry's `extensions`:
/// (world-file name, card-extension name).
pub const ST_PASSTHROUGH: [(&str, &str); 7] = [
    ("sticky", "sticky"),
    ("cooldown", "cooldown"),
    ("delay", "delay"),
    ("displayIndex", "display_index"),
    ("vectorized", "vectorized"),
    ("automationId", "automation_id"),
    ("useGroupScoring", "use_group_scoring"),
];

const CARD_ENTRY_KEYS: [&str; 15] = [
    "id",
    "keys",
    "secondary_keys",
    "comment",
    "content",
    "constant",
    "selective",
    "insertion_order",
    "enabled",
    "position",
    "use_regex",
    "case_sensitive",
    "name",
    "priority",
    "extensions",
];

const WORLD_ENTRY_KEYS: [&str; 13] = [
    "uid",
    "key",
    "keysecondary",
    "comment",
    "content",
    "constant",
    "selective",
    "order",
    "disable",
    "extensions",
    "name",
    "priority",
    "use_regex",
];

const BOOK_KEYS: [&str; 7] = [
    "name",
    "description",
    "scan_depth",
    "token_budget",
    "recursive_scanning",
    "extensions",
    "entries",
];

fn bad(message: impl Into<String>) -> ValidationErrors {
    let mut e = ValidationErrors::default();
    e.push(FIELD, message);
    e
}

/// The entries of a book as a list: an array, or an object keyed by uid (the
/// key is returned as well, as a uid of last resort).
fn entry_list(v: Option<&Value>) -> Result<Vec<(Option<&str>, &Value)>, ValidationErrors> {
    let list: Vec<(Option<&str>, &Value)> = match v {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(a)) => a.iter().map(|e| (None, e)).collect(),
        Some(Value::Object(o)) => o.iter().map(|(k, e)| (Some(k.as_str()), e)).collect(),
        Some(_) => {
            return Err(bad(
                "The lorebook's entries must be a list, or an object keyed by uid.",
            ));
        }
    };
    if list.len() > MAX_BOOK_ENTRIES {
        return Err(bad(format!(
            "The lorebook has {} entries; at most {MAX_BOOK_ENTRIES} are allowed.",
            list.len()
        )));
    }
    if let Some(i) = list.iter().position(|(_, e)| !e.is_object()) {
        return Err(bad(format!(
            "Entry {} of the lorebook is not a JSON object.",
            i + 1
        )));
    }
    Ok(list)
}

fn book_object(v: &Value) -> Result<&Map<String, Value>, ValidationErrors> {
    v.as_object()
        .ok_or_else(|| bad("A lorebook must be a JSON object."))
}

fn unknown(src: &Map<String, Value>, known: &[&str]) -> Map<String, Value> {
    src.iter()
        .filter(|(k, _)| !known.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// Copies `other` into `dst`, except keys the shape has already written.
fn append_other(dst: &mut Map<String, Value>, other: &Map<String, Value>) {
    for (k, v) in other {
        if !dst.contains_key(k) {
            dst.insert(k.clone(), v.clone());
        }
    }
}

/// Reads the book-level fields both shapes share; absent ones keep defaults.
fn read_book_fields(b: &mut Lorebook, o: &Map<String, Value>) {
    b.name = text(o.get("name")).unwrap_or_default();
    b.description = text(o.get("description")).unwrap_or_default();
    b.scan_depth = optional(o.get("scan_depth"), count);
    b.token_budget = optional(o.get("token_budget"), count);
    b.recursive_scanning = flag(o.get("recursive_scanning")).unwrap_or(false);
    b.extensions = o
        .get("extensions")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    b.other = unknown(o, &BOOK_KEYS);
}

impl Lorebook {
    /// Reads a card's `character_book` (V2/V3), SillyTavern's advanced fields
    /// from each entry's `extensions` included.
    pub fn from_character_book(v: &Value) -> Result<Self, ValidationErrors> {
        let o = book_object(v)?;
        let mut book = Self::default();
        read_book_fields(&mut book, o);
        book.entries = entry_list(o.get("entries"))?
            .into_iter()
            .enumerate()
            .map(|(i, (_, e))| card_entry(e.as_object().expect("checked"), i))
            .collect();
        Ok(book)
    }

    /// Writes the card `character_book` shape: V2 fields at the top of each
    /// entry and SillyTavern's advanced fields in its `extensions`.
    pub fn to_character_book(&self) -> Value {
        let mut o = Map::new();
        o.insert("name".into(), self.name.clone().into());
        o.insert("description".into(), self.description.clone().into());
        if let Some(d) = self.scan_depth {
            o.insert("scan_depth".into(), d.into());
        }
        if let Some(t) = self.token_budget {
            o.insert("token_budget".into(), t.into());
        }
        o.insert("recursive_scanning".into(), self.recursive_scanning.into());
        o.insert("extensions".into(), Value::Object(self.extensions.clone()));
        let entries = self.entries.iter().map(write_card_entry).collect();
        o.insert("entries".into(), Value::Array(entries));
        append_other(&mut o, &self.other);
        Value::Object(o)
    }

    /// Reads SillyTavern's world file: entries keyed by uid (a list is accepted too).
    pub fn from_world_info(v: &Value) -> Result<Self, ValidationErrors> {
        let o = book_object(v)?;
        let mut book = Self::default();
        read_book_fields(&mut book, o);
        book.entries = entry_list(o.get("entries"))?
            .into_iter()
            .enumerate()
            .map(|(i, (k, e))| world_entry(e.as_object().expect("checked"), k, i))
            .collect();
        Ok(book)
    }

    /// Writes SillyTavern's world file. Entries are keyed by uid; a repeated
    /// uid gets the next free number as its key (the `uid` inside is kept).
    pub fn to_world_info(&self) -> Value {
        let mut entries = Map::new();
        for e in &self.entries {
            let mut label = e.id;
            while entries.contains_key(&label.to_string()) {
                label = label.wrapping_add(1);
            }
            entries.insert(label.to_string(), write_world_entry(e));
        }
        let mut o = Map::new();
        o.insert("entries".into(), Value::Object(entries));
        if !self.name.is_empty() {
            o.insert("name".into(), self.name.clone().into());
        }
        if !self.description.is_empty() {
            o.insert("description".into(), self.description.clone().into());
        }
        if let Some(d) = self.scan_depth {
            o.insert("scan_depth".into(), d.into());
        }
        if let Some(t) = self.token_budget {
            o.insert("token_budget".into(), t.into());
        }
        if self.recursive_scanning {
            o.insert("recursive_scanning".into(), true.into());
        }
        if !self.extensions.is_empty() {
            o.insert("extensions".into(), Value::Object(self.extensions.clone()));
        }
        append_other(&mut o, &self.other);
        Value::Object(o)
    }

    /// Reads a standalone V3 lorebook, `{"spec": "lorebook_v3", "data": {...}}`.
    pub fn from_v3(v: &Value) -> Result<Self, ValidationErrors> {
        let o = book_object(v)?;
        // A missing `spec` is forgiven; another format's `spec` is not.
        if o.get("spec")
            .is_some_and(|s| s.as_str() != Some("lorebook_v3"))
        {
            return Err(bad("A V3 lorebook needs \"spec\": \"lorebook_v3\"."));
        }
        match o.get("data") {
            Some(data @ Value::Object(_)) => Self::from_character_book(data),
            _ => Err(bad("A V3 lorebook keeps its book in a \"data\" object.")),
        }
    }

    /// Writes a standalone V3 lorebook.
    pub fn to_v3(&self) -> Value {
        json!({ "spec": "lorebook_v3", "data": self.to_character_book() })
    }

    /// Reads a lorebook file of any shape: a V3 lorebook, SillyTavern's world
    /// file, a bare `character_book`, or a card JSON holding one.
    pub fn from_json(bytes: &[u8]) -> Result<Self, ValidationErrors> {
        if bytes.len() > MAX_BOOK_BYTES {
            return Err(bad(format!(
                "This file is {} MiB; a lorebook may be at most {} MiB.",
                bytes.len() >> 20,
                MAX_BOOK_BYTES >> 20
            )));
        }
        let v: Value = serde_json::from_slice(bytes)
            .map_err(|e| bad(format!("This file is not valid JSON ({e}).")))?;
        let o = book_object(&v)?;
        if o.get("spec").and_then(Value::as_str) == Some("lorebook_v3") {
            return Self::from_v3(&v);
        }
        // A card (V2/V3 under `data`, V1 at the top) carrying its book.
        let card_book = o
            .get("data")
            .and_then(|d| d.get("character_book"))
            .or_else(|| o.get("character_book"));
        let is_card = o
            .get("spec")
            .and_then(Value::as_str)
            .is_some_and(|s| s.starts_with("chara_card"));
        match card_book {
            Some(b @ Value::Object(_)) => return Self::from_character_book(b),
            _ if is_card => return Err(bad("This character card has no lorebook.")),
            _ => {}
        }
        match o.get("entries") {
            Some(Value::Object(_)) => Self::from_world_info(&v),
            Some(Value::Array(a)) => {
                // World-file entries have `key`/`uid`; card entries `keys`/`insertion_order`.
                let world = a.iter().any(|e| {
                    e.get("key").is_some() || e.get("uid").is_some() || e.get("order").is_some()
                });
                if world {
                    Self::from_world_info(&v)
                } else {
                    Self::from_character_book(&v)
                }
            }
            // Present but odd: the reader says what is wrong with it.
            Some(_) => Self::from_world_info(&v),
            None => Err(bad(
                "This file is not a lorebook: expected SillyTavern world info, a character book, or a lorebook_v3 file.",
            )),
        }
    }
}

fn card_entry(o: &Map<String, Value>, index: usize) -> Entry {
    let mut e = Entry {
        id: int(o.get("id")).unwrap_or(index as i64),
        keys: key_list(o.get("keys"))
            .or_else(|| key_list(o.get("key")))
            .unwrap_or_default(),
        secondary_keys: key_list(o.get("secondary_keys")).unwrap_or_default(),
        content: text(o.get("content")).unwrap_or_default(),
        comment: text(o.get("comment")).unwrap_or_default(),
        name: text(o.get("name")).unwrap_or_default(),
        constant: flag(o.get("constant")).unwrap_or(false),
        // V2: secondary keys count only when `selective` is set.
        selective: flag(o.get("selective")).unwrap_or(false),
        enabled: flag(o.get("enabled")).unwrap_or(true),
        insertion_order: int(o.get("insertion_order")).unwrap_or(100),
        priority: optional(o.get("priority"), int),
        use_regex: flag(o.get("use_regex")).unwrap_or(false),
        case_sensitive: optional(o.get("case_sensitive"), flag),
        position: position(o.get("position")).unwrap_or_default(),
        ..Entry::default()
    };
    let ext = o
        .get("extensions")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    // The extension's fields are SillyTavern's finer ones: they win.
    CARD_EXT.read(&mut e, &ext);
    e.extensions = unknown(&ext, &CARD_EXT.all());
    let mut known: Vec<&str> = CARD_ENTRY_KEYS.to_vec();
    if o.get("keys").is_none() {
        known.push("key");
    }
    e.other = unknown(o, &known);
    e
}

fn write_card_entry(e: &Entry) -> Value {
    let mut o = Map::new();
    o.insert("id".into(), e.id.into());
    o.insert("keys".into(), json!(e.keys));
    o.insert("secondary_keys".into(), json!(e.secondary_keys));
    o.insert("comment".into(), e.comment.clone().into());
    o.insert("content".into(), e.content.clone().into());
    o.insert("constant".into(), e.constant.into());
    o.insert("selective".into(), e.selective.into());
    o.insert("insertion_order".into(), e.insertion_order.into());
    o.insert("enabled".into(), e.enabled.into());
    o.insert("position".into(), e.position.v2().into());
    o.insert("use_regex".into(), e.use_regex.into());
    if let Some(c) = e.case_sensitive {
        o.insert("case_sensitive".into(), c.into());
    }
    o.insert("name".into(), e.name.clone().into());
    if let Some(p) = e.priority {
        o.insert("priority".into(), p.into());
    }
    let mut ext = e.extensions.clone();
    CARD_EXT.write(e, &mut ext);
    o.insert("extensions".into(), Value::Object(ext));
    append_other(&mut o, &e.other);
    Value::Object(o)
}

fn world_entry(o: &Map<String, Value>, label: Option<&str>, index: usize) -> Entry {
    let mut e = Entry {
        id: int(o.get("uid"))
            .or_else(|| label.and_then(|k| k.trim().parse().ok()))
            .unwrap_or(index as i64),
        keys: key_list(o.get("key"))
            .or_else(|| key_list(o.get("keys")))
            .unwrap_or_default(),
        secondary_keys: key_list(o.get("keysecondary")).unwrap_or_default(),
        content: text(o.get("content")).unwrap_or_default(),
        comment: text(o.get("comment")).unwrap_or_default(),
        name: text(o.get("name")).unwrap_or_default(),
        constant: flag(o.get("constant")).unwrap_or(false),
        selective: flag(o.get("selective")).unwrap_or(true),
        enabled: !flag(o.get("disable")).unwrap_or(false),
        insertion_order: int(o.get("order")).unwrap_or(100),
        priority: optional(o.get("priority"), int),
        use_regex: flag(o.get("use_regex")).unwrap_or(false),
        ..Entry::default()
    };
    WORLD.read(&mut e, o);
    let ext = o
        .get("extensions")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    // The world file's own top-level fields are authoritative over copies in `extensions`.
    e.extensions = unknown(&ext, &CARD_EXT.all());
    for (world, card) in ST_PASSTHROUGH {
        if let Some(v) = o.get(world) {
            e.extensions.insert(card.to_owned(), v.clone());
        }
    }
    let mut known: Vec<&str> = WORLD_ENTRY_KEYS.to_vec();
    known.extend(WORLD.all());
    known.extend(ST_PASSTHROUGH.iter().map(|(w, _)| *w));
    if o.get("key").is_none() {
        known.push("keys");
    }
    e.other = unknown(o, &known);
    e
}

fn write_world_entry(e: &Entry) -> Value {
    let mut o = Map::new();
    o.insert("uid".into(), e.id.into());
    o.insert("key".into(), json!(e.keys));
    o.insert("keysecondary".into(), json!(e.secondary_keys));
    o.insert("comment".into(), e.comment.clone().into());
    o.insert("content".into(), e.content.clone().into());
    o.insert("constant".into(), e.constant.into());
    o.insert("selective".into(), e.selective.into());
    o.insert("order".into(), e.insertion_order.into());
    o.insert("disable".into(), (!e.enabled).into());
    WORLD.write(e, &mut o);
    let mut ext = e.extensions.clone();
    for (world, card) in ST_PASSTHROUGH {
        if let Some(v) = ext.remove(card) {
            o.insert(world.to_owned(), v);
        }
    }
    if !e.name.is_empty() {
        o.insert("name".into(), e.name.clone().into());
    }
    if let Some(p) = e.priority {
        o.insert("priority".into(), p.into());
    }
    if e.use_regex {
        o.insert("use_regex".into(), true.into());
    }
    if !ext.is_empty() {
        o.insert("extensions".into(), Value::Object(ext));
    }
    append_other(&mut o, &e.other);
    Value::Object(o)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A row's check on the entry read.
    type Check = fn(&Entry) -> bool;
    /// Entries and name read, or a piece of the error message.
    type Expect = Result<(usize, &'static str), &'static str>;

    fn card_fixture() -> Value {
        serde_json::from_str(
            r#"{
            "name": "Moonlore", "description": "About the moon", "scan_depth": 3,
            "token_budget": "500", "recursive_scanning": true,
            "extensions": {"risu": {"x": 1}}, "x_top": [1, 2],
            "entries": [
                {
                    "id": 5, "keys": ["moon", "luna"], "secondary_keys": ["night"],
                    "comment": "Moon", "content": "@@depth 2\nThe moon is old.",
                    "constant": false, "selective": true, "insertion_order": "50",
                    "enabled": true, "position": "before_char", "use_regex": false,
                    "case_sensitive": false, "name": "moon", "priority": 3, "x_entry": "kept",
                    "extensions": {
                        "position": 4, "depth": 2, "selectiveLogic": 1, "probability": null,
                        "useProbability": true, "group": "sky", "group_override": false,
                        "group_weight": 10, "scan_depth": null, "case_sensitive": true,
                        "match_whole_words": null, "role": 2, "exclude_recursion": false,
                        "prevent_recursion": true, "delay_until_recursion": 1,
                        "display_index": 0, "sticky": 2, "vendor": {"a": [1]}
                    }
                },
                {"keys": "sun, sol", "content": "The sun is young."}
            ]
        }"#,
        )
        .unwrap()
    }

    fn world_fixture() -> Value {
        serde_json::from_str(
            r#"{
            "entries": {
                "0": {
                    "uid": 0, "key": ["moon"], "keysecondary": [], "comment": "Moon",
                    "content": "Moon lore", "constant": false, "vectorized": false,
                    "selective": true, "selectiveLogic": 0, "addMemo": true, "order": 100,
                    "position": 4, "disable": false, "excludeRecursion": false,
                    "preventRecursion": false, "delayUntilRecursion": false,
                    "probability": 100, "useProbability": true, "depth": 4, "group": "",
                    "groupOverride": false, "groupWeight": 100, "scanDepth": null,
                    "caseSensitive": null, "matchWholeWords": null, "useGroupScoring": null,
                    "automationId": "", "role": null, "sticky": 0, "cooldown": 0, "delay": 0,
                    "displayIndex": 0, "extensions": {"position": 1, "custom": true}
                },
                "7": {"key": "sun,sol", "content": "Sun", "order": "3", "disable": "true", "x": 1}
            },
            "originalData": {"entries": []},
            "name": "World"
        }"#,
        )
        .unwrap()
    }

    fn card_entry_of(v: Value) -> Entry {
        let book = Lorebook::from_character_book(&json!({ "entries": [v] })).unwrap();
        book.entries.into_iter().next().unwrap()
    }

    fn world_entry_of(v: Value) -> Entry {
        let book = Lorebook::from_world_info(&json!({ "entries": { "12": v } })).unwrap();
        book.entries.into_iter().next().unwrap()
    }

    #[test]
    fn reads_messy_card_entries() {
        let rows: &[(&str, Value, Check)] = &[
            ("order as a string", json!({"insertion_order": "7"}), |e| {
                e.insertion_order == 7
            }),
            ("keys as one string", json!({"keys": "a, b ,,c"}), |e| {
                e.keys == ["a", "b", "c"]
            }),
            (
                "nulls are defaults",
                json!({"enabled": null, "keys": null, "content": null, "priority": null}),
                |e| e.enabled && e.keys.is_empty() && e.content.is_empty() && e.priority.is_none(),
            ),
            ("missing id is the index", json!({}), |e| {
                e.id == 0 && !e.selective
            }),
            (
                "extension position wins",
                json!({"position": "before_char", "extensions": {"position": 4, "depth": "2", "role": 1}}),
                |e| e.position == Position::AtDepth && e.depth == 2 && e.role == Role::User,
            ),
            (
                "top-level position alone",
                json!({"position": "after_char"}),
                |e| e.position == Position::AfterChar,
            ),
            (
                "SillyTavern fields from extensions",
                json!({"extensions": {
                    "selectiveLogic": 3, "probability": "30", "useProbability": false,
                    "group": "g", "group_override": true, "group_weight": 5, "scan_depth": 3,
                    "case_sensitive": true, "match_whole_words": false,
                    "exclude_recursion": true, "prevent_recursion": 1, "delay_until_recursion": 2
                }}),
                |e| {
                    e.logic == Logic::AndAll
                        && e.probability == 30
                        && !e.use_probability
                        && e.group == "g"
                        && e.group_override
                        && e.group_weight == 5
                        && e.scan_depth == Some(3)
                        && e.case_sensitive == Some(true)
                        && e.match_whole_words == Some(false)
                        && e.exclude_recursion
                        && e.prevent_recursion
                        && e.delay_until_recursion
                },
            ),
            (
                "probability clamped high",
                json!({"extensions": {"probability": 250}}),
                |e| e.probability == 100,
            ),
            (
                "probability clamped low",
                json!({"extensions": {"probability": -5}}),
                |e| e.probability == 0,
            ),
            (
                "unknown keys kept",
                json!({"foo": 1, "extensions": {"display_index": 3, "x": {}, "depth": 1}}),
                |e| {
                    e.other.get("foo") == Some(&json!(1))
                        && e.extensions.get("display_index") == Some(&json!(3))
                        && e.extensions.contains_key("x")
                        && !e.extensions.contains_key("depth")
                },
            ),
            (
                "wrong types are defaults",
                json!({"keys": {"a": 1}, "insertion_order": true, "extensions": {"depth": -3, "role": "narrator"}}),
                |e| {
                    e.keys.is_empty()
                        && e.insertion_order == 100
                        && e.depth == 4
                        && e.role == Role::System
                },
            ),
            ("`key` accepted for `keys`", json!({"key": ["a"]}), |e| {
                e.keys == ["a"] && e.other.is_empty()
            }),
            (
                "fractional numbers truncated",
                json!({"insertion_order": 12.7, "id": "3"}),
                |e| e.insertion_order == 12 && e.id == 3,
            ),
        ];
        for (name, v, check) in rows {
            let e = card_entry_of(v.clone());
            assert!(check(&e), "{name}: {e:#?}");
        }
    }

    #[test]
    fn reads_messy_world_entries() {
        let rows: &[(&str, Value, Check)] = &[
            ("uid from the object key", json!({}), |e| e.id == 12),
            ("uid field wins", json!({"uid": "4"}), |e| e.id == 4),
            ("disable", json!({"disable": "true"}), |e| !e.enabled),
            ("selective defaults on", json!({}), |e| e.selective),
            (
                "key as one string",
                json!({"key": "a,b", "keysecondary": ["c"]}),
                |e| e.keys == ["a", "b"] && e.secondary_keys == ["c"],
            ),
            ("order as a string", json!({"order": "5"}), |e| {
                e.insertion_order == 5
            }),
            (
                "camelCase fields",
                json!({"groupOverride": true, "groupWeight": "7", "scanDepth": 1, "caseSensitive": true, "matchWholeWords": true, "role": 2, "position": 6}),
                |e| {
                    e.group_override
                        && e.group_weight == 7
                        && e.scan_depth == Some(1)
                        && e.case_sensitive == Some(true)
                        && e.match_whole_words == Some(true)
                        && e.role == Role::Assistant
                        && e.position == Position::ExamplesBottom
                },
            ),
            (
                "nulls are defaults",
                json!({"scanDepth": null, "role": null, "probability": null}),
                |e| e.scan_depth.is_none() && e.role == Role::System && e.probability == 100,
            ),
            (
                "SillyTavern extras move to extensions",
                json!({"displayIndex": 2, "sticky": 1, "addMemo": true}),
                |e| {
                    e.extensions.get("display_index") == Some(&json!(2))
                        && e.extensions.get("sticky") == Some(&json!(1))
                        && e.other.get("addMemo") == Some(&json!(true))
                },
            ),
            (
                "top-level fields beat copies in extensions",
                json!({"position": 2, "extensions": {"position": 0, "custom": 1}}),
                |e| {
                    e.position == Position::AuthorNoteTop
                        && e.extensions.get("custom") == Some(&json!(1))
                        && !e.extensions.contains_key("position")
                },
            ),
        ];
        for (name, v, check) in rows {
            let e = world_entry_of(v.clone());
            assert!(check(&e), "{name}: {e:#?}");
        }
    }

    #[test]
    fn every_shape_round_trips() {
        type From = fn(&Value) -> Result<Lorebook, ValidationErrors>;
        type To = fn(&Lorebook) -> Value;
        let rows: [(&str, Value, From, To); 3] = [
            (
                "character_book",
                card_fixture(),
                Lorebook::from_character_book,
                Lorebook::to_character_book,
            ),
            (
                "world info",
                world_fixture(),
                Lorebook::from_world_info,
                Lorebook::to_world_info,
            ),
            (
                "lorebook_v3",
                json!({"spec": "lorebook_v3", "data": card_fixture()}),
                Lorebook::from_v3,
                Lorebook::to_v3,
            ),
        ];
        for (name, v, from, to) in rows {
            let model = from(&v).unwrap();
            let written = to(&model);
            let again = from(&written).unwrap();
            assert_eq!(again, model, "{name}: model changed");
            assert_eq!(to(&again), written, "{name}: file changed");
        }
    }

    #[test]
    fn unknown_keys_survive_their_own_shape() {
        let card = Lorebook::from_character_book(&card_fixture())
            .unwrap()
            .to_character_book();
        assert_eq!(card["x_top"], json!([1, 2]));
        assert_eq!(card["extensions"]["risu"], json!({"x": 1}));
        let e = &card["entries"][0];
        assert_eq!(e["x_entry"], json!("kept"));
        assert_eq!(e["extensions"]["vendor"], json!({"a": [1]}));
        assert_eq!(e["extensions"]["display_index"], json!(0));

        let world = Lorebook::from_world_info(&world_fixture())
            .unwrap()
            .to_world_info();
        assert_eq!(world["originalData"], json!({"entries": []}));
        let e = &world["entries"]["0"];
        assert_eq!(e["addMemo"], json!(true));
        assert_eq!(e["displayIndex"], json!(0));
        assert_eq!(e["extensions"], json!({"custom": true}));
        assert_eq!(world["entries"]["7"]["x"], json!(1));
    }

    #[test]
    fn card_export_writes_both_forms() {
        let book = Lorebook::from_character_book(&card_fixture()).unwrap();
        let v = book.to_character_book();
        let e = &v["entries"][0];
        let rows: [(&str, &Value, Value); 9] = [
            ("V2 position", &e["position"], json!("after_char")),
            ("ST position", &e["extensions"]["position"], json!(4)),
            ("V2 case", &e["case_sensitive"], json!(true)),
            ("ST case", &e["extensions"]["case_sensitive"], json!(true)),
            ("ST logic", &e["extensions"]["selectiveLogic"], json!(1)),
            ("ST role", &e["extensions"]["role"], json!(2)),
            (
                "ST probability",
                &e["extensions"]["probability"],
                json!(100),
            ),
            (
                "ST delay",
                &e["extensions"]["delay_until_recursion"],
                json!(true),
            ),
            ("second entry id", &v["entries"][1]["id"], json!(1)),
        ];
        for (name, got, want) in rows {
            assert_eq!(*got, want, "{name}");
        }
    }

    #[test]
    fn crossing_shapes_keeps_every_field() {
        let mut extensions = Map::new();
        extensions.insert("sticky".into(), json!(3));
        extensions.insert("vendor".into(), json!({"k": "v"}));
        let mut other = Map::new();
        other.insert("x_other".into(), json!([1]));
        let entry = Entry {
            id: 42,
            keys: vec!["moon".into(), "/lun[ae]/i".into()],
            secondary_keys: vec!["night".into()],
            logic: Logic::NotAny,
            selective: false,
            content: "@@role user\nMoon".into(),
            comment: "c".into(),
            name: "n".into(),
            constant: true,
            enabled: false,
            insertion_order: -3,
            priority: Some(9),
            position: Position::ExamplesTop,
            depth: 7,
            role: Role::Assistant,
            probability: 33,
            use_probability: false,
            case_sensitive: Some(false),
            match_whole_words: Some(true),
            use_regex: true,
            scan_depth: Some(5),
            group: "a,b".into(),
            group_override: true,
            group_weight: 0,
            exclude_recursion: true,
            prevent_recursion: true,
            delay_until_recursion: true,
            extensions: extensions.clone(),
            other: other.clone(),
        };
        let book = Lorebook {
            name: "B".into(),
            description: "D".into(),
            scan_depth: Some(1),
            token_budget: Some(99),
            recursive_scanning: true,
            extensions,
            entries: vec![entry, Entry::default()],
            other,
        };
        let via_world = |b: &Lorebook| Lorebook::from_world_info(&b.to_world_info()).unwrap();
        let via_card =
            |b: &Lorebook| Lorebook::from_character_book(&b.to_character_book()).unwrap();
        let via_v3 = |b: &Lorebook| Lorebook::from_v3(&b.to_v3()).unwrap();
        assert_eq!(via_card(&via_world(&book)), book, "world → card");
        assert_eq!(via_world(&via_card(&book)), book, "card → world");
        assert_eq!(via_world(&via_v3(&book)), book, "v3 → world");

        let from_world = Lorebook::from_world_info(&world_fixture()).unwrap();
        assert_eq!(
            via_card(&from_world),
            from_world,
            "a SillyTavern file through a card"
        );
        let from_card = Lorebook::from_character_book(&card_fixture()).unwrap();
        assert_eq!(
            via_world(&from_card),
            from_card,
            "a card's book through SillyTavern"
        );
    }

    #[test]
    fn from_json_detects_the_shape() {
        let card = json!({"spec": "chara_card_v2", "data": {"name": "A", "character_book": card_fixture()}});
        let rows: Vec<(&str, String, Expect)> = vec![
            ("world info", world_fixture().to_string(), Ok((2, "World"))),
            (
                "world info as a list",
                json!({"entries": [{"key": ["a"], "uid": 1}]}).to_string(),
                Ok((1, "")),
            ),
            (
                "bare character_book",
                card_fixture().to_string(),
                Ok((2, "Moonlore")),
            ),
            (
                "lorebook_v3",
                json!({"spec": "lorebook_v3", "data": card_fixture()}).to_string(),
                Ok((2, "Moonlore")),
            ),
            ("card with a book", card.to_string(), Ok((2, "Moonlore"))),
            (
                "V1 card with a book",
                json!({"name": "A", "character_book": {"entries": []}}).to_string(),
                Ok((0, "")),
            ),
            (
                "card without a book",
                json!({"spec": "chara_card_v3", "data": {"name": "A"}}).to_string(),
                Err("no lorebook"),
            ),
            ("not JSON", "{nope".into(), Err("not valid JSON")),
            ("not an object", "[1, 2]".into(), Err("JSON object")),
            (
                "something else",
                json!({"hello": 1}).to_string(),
                Err("not a lorebook"),
            ),
            (
                "entries of the wrong type",
                json!({"entries": "x"}).to_string(),
                Err("must be a list"),
            ),
            (
                "an entry that is not an object",
                json!({"entries": [1]}).to_string(),
                Err("Entry 1"),
            ),
            (
                "V3 of another spec",
                json!({"spec": "lorebook_v3", "data": 5}).to_string(),
                Err("\"data\" object"),
            ),
        ];
        for (name, input, want) in rows {
            match (Lorebook::from_json(input.as_bytes()), want) {
                (Ok(book), Ok((entries, title))) => {
                    assert_eq!(
                        (book.entries.len(), book.name.as_str()),
                        (entries, title),
                        "{name}"
                    );
                }
                (Err(e), Err(needle)) => {
                    let msg = e.for_field("lorebook").unwrap_or_default();
                    assert!(msg.contains(needle), "{name}: {msg}");
                }
                (got, _) => panic!("{name}: unexpected {got:?}"),
            }
        }
    }

    #[test]
    fn size_limits_are_sentences() {
        let many: Vec<Value> = (0..=MAX_BOOK_ENTRIES).map(|_| json!({})).collect();
        let e = Lorebook::from_json(json!({"entries": many}).to_string().as_bytes()).unwrap_err();
        assert!(
            e.for_field("lorebook").unwrap().contains("at most 10000"),
            "{e}"
        );
        let huge = vec![b' '; MAX_BOOK_BYTES + 1];
        let e = Lorebook::from_json(&huge).unwrap_err();
        assert!(e.for_field("lorebook").unwrap().contains("MiB"), "{e}");
    }

    #[test]
    fn odd_json_never_panics() {
        let odd = [
            json!(null),
            json!(1),
            json!("x"),
            json!([]),
            json!({"entries": null}),
            json!({"entries": {"a": {"uid": {"x": 1}, "key": [null, 1, [2], {"k": 3}], "order": 1e300}}}),
            json!({"entries": [{"keys": 5, "content": ["x"], "extensions": [1], "id": -1e30}]}),
            json!({"entries": [{"extensions": {"position": 99, "role": -1, "depth": 1e40, "selectiveLogic": "x"}}]}),
            json!({"spec": "lorebook_v3"}),
            json!({"data": {"character_book": 3}}),
            json!({"name": {"a": 1}, "scan_depth": "deep", "extensions": "none"}),
        ];
        for v in odd {
            let _ = Lorebook::from_character_book(&v).map(|b| b.to_world_info());
            let _ = Lorebook::from_world_info(&v).map(|b| b.to_v3());
            let _ = Lorebook::from_v3(&v).map(|b| b.to_character_book());
            let _ = Lorebook::from_json(v.to_string().as_bytes());
        }
    }

    #[test]
    fn decorators_lead_the_content() {
        use Decorator as D;
        let rows: Vec<(&str, &str, Vec<Decorator>, &str)> = vec![
            ("none", "Hello", vec![], "Hello"),
            ("depth", "@@depth 3\nText", vec![D::Depth(3)], "Text"),
            (
                "bad number",
                "@@depth x\nText",
                vec![D::Other("@@depth x".into())],
                "Text",
            ),
            (
                "only at the start, CRLF",
                "@@activate\r\n@@role user\r\nText\n@@depth 2",
                vec![D::Activate, D::Role(Role::User)],
                "Text\n@@depth 2",
            ),
            (
                "fallback stands in for an unknown line",
                "@@position pt_main\n@@@position after_desc\nT",
                vec![D::Position("after_desc".into())],
                "T",
            ),
            (
                "fallback ignored after a known line",
                "@@depth 2\n@@@depth 5\nT",
                vec![D::Depth(2)],
                "T",
            ),
            (
                "all unknown",
                "@@foo\n@@@bar\nT",
                vec![D::Other("@@foo".into())],
                "T",
            ),
            (
                "key lists",
                "@@additional_keys a, b\n@@exclude_keys c\nT",
                vec![
                    D::AdditionalKeys(vec!["a".into(), "b".into()]),
                    D::ExcludeKeys(vec!["c".into()]),
                ],
                "T",
            ),
            (
                "every 0 is bad",
                "@@activate_only_every 0\nT",
                vec![D::Other("@@activate_only_every 0".into())],
                "T",
            ),
            (
                "nothing but decorators",
                "@@dont_activate",
                vec![D::DontActivate],
                "",
            ),
            (
                "the rest",
                "@@scan_depth 4\n@@activate_only_after 2\n@@activate_only_every 3\n@@reverse_depth 1\n@@position scenario\nT",
                vec![
                    D::ScanDepth(4),
                    D::ActivateOnlyAfter(2),
                    D::ActivateOnlyEvery(3),
                    D::ReverseDepth(1),
                    D::Position("scenario".into()),
                ],
                "T",
            ),
            (
                "a leading fallback acts alone",
                "@@@activate\nT",
                vec![D::Activate],
                "T",
            ),
            (
                "text that merely mentions @@",
                "Use @@depth\nT",
                vec![],
                "Use @@depth\nT",
            ),
        ];
        for (name, content, want, rest) in rows {
            let e = Entry {
                content: content.into(),
                ..Entry::default()
            };
            assert_eq!(e.decorators(), (want, rest), "{name}");
        }
    }

    #[test]
    fn storage_shape_accepts_partial_json() {
        let e: Entry =
            serde_json::from_str(r#"{"keys": ["a"], "position": "at_depth", "role": "user"}"#)
                .unwrap();
        assert_eq!(
            e,
            Entry {
                keys: vec!["a".into()],
                position: Position::AtDepth,
                role: Role::User,
                ..Entry::default()
            }
        );
        let b: Lorebook =
            serde_json::from_str(r#"{"name": "B", "entries": [{}], "x": 1}"#).unwrap();
        assert_eq!((b.entries.len(), b.other.get("x")), (1, Some(&json!(1))));
        let back: Lorebook = serde_json::from_value(serde_json::to_value(&b).unwrap()).unwrap();
        assert_eq!(back, b);
    }

    #[test]
    fn st_numbers_map_both_ways() {
        for n in 0..7 {
            assert_eq!(Position::from_st(n).map(Position::st), Some(n));
        }
        for n in 0..4 {
            assert_eq!(Logic::from_st(n).map(Logic::st), Some(n));
        }
        for n in 0..3 {
            assert_eq!(Role::from_st(n).map(Role::st), Some(n));
        }
        assert_eq!(
            (Position::from_st(7), Logic::from_st(-1), Role::from_st(3)),
            (None, None, None)
        );
    }
}
