//! Character card files: PNG (`chara` / `ccv3` text chunks), JSON (V1, V2, V3)
//! and CHARX (a zip with `card.json` and `assets/…`) in; PNG, JSON and CHARX out.
//!
//! Reading is lenient: a card over the editor's [`crate::LIMITS`] but within
//! [`IMPORT_LIMITS`] is imported whole, fields of the wrong type are coerced,
//! and every such change is told in [`ImportedCard::changes`]. Every size taken
//! from a file (decompressed text, zip entries) is bounded before it is read.

use std::borrow::Cow;
use std::io::{self, Cursor, Read, Write};
use std::path::Path;

use base64::Engine as _;
use base64::alphabet;
use base64::engine::general_purpose::{GeneralPurpose, PAD_INDIFFERENT, STANDARD};
use serde_json::{Map, Value, json};
use zip::result::ZipError;
use zip::write::SimpleFileOptions;

use crate::avatar::{Avatar, MAX_AVATAR_SIDE};
pub use crate::card::IMPORT_LIMITS;
use crate::card::{CharacterCard, LIMITS};
use crate::error::ValidationErrors;

const MIB: usize = 1 << 20;

/// The most bytes a card's JSON may take, however the file stores it.
pub const MAX_CARD_JSON_BYTES: usize = 16 * MIB;
/// The most bytes a CHARX archive may unpack to, all its files together.
pub const MAX_CHARX_BYTES: usize = 256 * MIB;
/// The most files a CHARX archive may hold.
pub const MAX_CHARX_ENTRIES: usize = 1000;

/// A side longer than this is a damaged or hostile header, not a picture.
const MAX_PLAUSIBLE_SIDE: u32 = 100_000;
const PNG_SIGNATURE: [u8; 8] = [0x89, b'P', b'N', b'G', 0x0d, 0x0a, 0x1a, 0x0a];
const RISU_ASSET_PREFIX: &str = "chara-ext-asset_:";

// Writers disagree on padding and trailing bits, so reading accepts both.
const BASE64: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    PAD_INDIFFERENT.with_decode_allow_trailing_bits(true),
);
const BASE64_URL: GeneralPurpose = GeneralPurpose::new(
    &alphabet::URL_SAFE,
    PAD_INDIFFERENT.with_decode_allow_trailing_bits(true),
);

/// Which card spec a file followed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CardVersion {
    /// The bare fields, no `spec`.
    V1,
    /// `chara_card_v2`.
    V2,
    /// `chara_card_v3`.
    V3,
}

/// A file a card carries besides its JSON (an entry of V3's `assets[]`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Asset {
    /// The V3 asset type: `icon`, `background`, `emotion`, `user_icon`, `x_…`.
    pub kind: String,
    /// The asset's name (`main` for the avatar icon).
    pub name: String,
    /// File extension, lowercase, without the dot.
    pub ext: String,
    /// The URI as written in the card.
    pub uri: String,
    /// Where the file lies inside the archive (or the RisuAI chunk's path);
    /// empty if it is not embedded.
    pub path: String,
    /// The file's bytes.
    pub bytes: Vec<u8>,
}

/// A card read from a file, with what was changed on the way in.
#[derive(Debug, Clone, PartialEq)]
pub struct ImportedCard {
    /// The card, normalized and within [`IMPORT_LIMITS`].
    pub card: CharacterCard,
    /// The spec the file followed.
    pub version: CardVersion,
    /// The avatar image: a PNG card's own picture without its card chunks, or
    /// a CHARX card's `icon` asset named `main`; `None` when unusable.
    pub avatar: Option<Vec<u8>>,
    /// Every embedded asset, the avatar's icon included.
    pub assets: Vec<Asset>,
    /// One sentence for each thing changed or left out on import.
    pub changes: Vec<String>,
}

/// What a file turned out to hold.
#[derive(Debug, Clone, PartialEq)]
#[allow(clippy::large_enum_variant)] // one value per file read; boxing only makes matching clumsier
pub enum CardFile {
    /// A character card.
    Card(ImportedCard),
    /// A standalone lorebook (world info or `lorebook_v3`), as the file had it.
    Lorebook(Value),
}

/// Why a card file could not be read or written, in a sentence for the user.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}: {message}")]
pub struct CardFileError {
    /// The file's name.
    pub file: String,
    /// What is wrong with it.
    pub message: String,
}

/// Reads a card file, telling PNG, CHARX and JSON apart by their content;
/// `file_name` is used only in messages (and to name a nameless card).
pub fn read(file_name: &str, bytes: &[u8]) -> Result<CardFile, CardFileError> {
    read_with(file_name, bytes, &CHARX_LIMITS).map_err(|message| CardFileError {
        file: file_name.to_owned(),
        message,
    })
}

/// The card as a `chara_card_v3` document: every key the card has, plus V3's
/// required `group_only_greetings` and `assets` where the card lacks them.
pub fn to_v3_json(card: &CharacterCard) -> Value {
    wrap_v3(v3_data(card))
}

/// The card as pretty `chara_card_v2` JSON.
pub fn json_v2(card: &CharacterCard) -> Vec<u8> {
    pretty(&card.to_v2_json())
}

/// The card as pretty `chara_card_v3` JSON.
pub fn json_v3(card: &CharacterCard) -> Vec<u8> {
    pretty(&to_v3_json(card))
}

/// The PNG `image_png` carrying `card`: its old card chunks removed, a `chara`
/// (V2) and a `ccv3` (V3) tEXt chunk added before IEND, every other chunk
/// copied byte for byte.
pub fn write_png(card: &CharacterCard, image_png: &[u8]) -> Result<Vec<u8>, CardFileError> {
    let fail = |message: String| CardFileError {
        file: output_name(card, "png"),
        message,
    };
    let chunks = png_chunks(image_png)
        .map_err(|m| fail(format!("The picture cannot carry the card. {m}")))?;
    let v2 = STANDARD.encode(compact(&card.to_v2_json()));
    let v3 = STANDARD.encode(compact(&to_v3_json(card)));
    let mut out = Vec::with_capacity(image_png.len() + v2.len() + v3.len() + 64);
    out.extend_from_slice(&PNG_SIGNATURE);
    for c in chunks
        .iter()
        .filter(|c| &c.kind != b"IEND" && !is_card_chunk(c))
    {
        out.extend_from_slice(c.raw);
    }
    for (keyword, text) in [("chara", v2), ("ccv3", v3)] {
        let mut data = Vec::with_capacity(keyword.len() + 1 + text.len());
        data.extend_from_slice(keyword.as_bytes());
        data.push(0);
        data.extend_from_slice(text.as_bytes());
        push_chunk(&mut out, *b"tEXt", &data).map_err(fail)?;
    }
    push_chunk(&mut out, *b"IEND", &[]).map_err(fail)?;
    Ok(out)
}

/// A CHARX archive: `card.json` (V3) at the root, the avatar at
/// `assets/icon/images/main.<ext>`, each of `extra` at its `path` (or
/// `assets/other/<name>.<ext>`), each listed in `data.assets`. With an avatar,
/// an extra `icon` named `main` is skipped: the avatar takes its place.
pub fn write_charx(
    card: &CharacterCard,
    avatar: Option<(&[u8], &str)>,
    extra: &[Asset],
) -> Result<Vec<u8>, CardFileError> {
    let fail = |message: String| CardFileError {
        file: output_name(card, "charx"),
        message,
    };
    let mut data = v3_data(card);
    let mut files: Vec<(String, &[u8])> = Vec::new();
    if let Some((bytes, ext)) = avatar {
        let ext = clean_ext(ext).ok_or_else(|| {
            fail(format!(
                "\"{}\" is not a usable file extension for the picture.",
                excerpt(ext, 20)
            ))
        })?;
        let path = format!("assets/icon/images/main.{ext}");
        upsert_asset(&mut data, "icon", "main", &ext, &path);
        files.push((path, bytes));
    }
    for asset in extra {
        if avatar.is_some() && asset.kind == "icon" && asset.name == "main" {
            continue;
        }
        let ext = if asset.ext.is_empty() {
            String::new()
        } else {
            clean_ext(&asset.ext).ok_or_else(|| {
                fail(format!(
                    "The asset \"{}\" has an unusable file extension, \"{}\".",
                    excerpt(&asset.name, 60),
                    excerpt(&asset.ext, 20)
                ))
            })?
        };
        let path = match (asset.path.is_empty(), ext.is_empty()) {
            (false, _) => asset.path.clone(),
            (true, true) => format!("assets/other/{}", asset.name),
            (true, false) => format!("assets/other/{}.{ext}", asset.name),
        };
        if !is_safe_entry_name(&path) || path == "card.json" || path.ends_with('/') {
            return Err(fail(format!(
                "The asset \"{}\" cannot be stored at \"{}\": that is not a safe place inside the archive.",
                excerpt(&asset.name, 60),
                excerpt(&path, 120)
            )));
        }
        upsert_asset(&mut data, &asset.kind, &asset.name, &ext, &path);
        if !files.iter().any(|(p, _)| *p == path) {
            files.push((path, &asset.bytes));
        }
    }
    let broken = |_| fail("The CHARX archive could not be written.".into());
    let options = SimpleFileOptions::default().compression_method(zip::CompressionMethod::Deflated);
    let mut zip = zip::ZipWriter::new(Cursor::new(Vec::new()));
    zip.start_file("card.json", options).map_err(broken)?;
    zip.write_all(&pretty(&wrap_v3(data)))
        .map_err(|_| fail("The CHARX archive could not be written.".into()))?;
    for (path, bytes) in files {
        zip.start_file(path, options).map_err(broken)?;
        zip.write_all(bytes)
            .map_err(|_| fail("The CHARX archive could not be written.".into()))?;
    }
    Ok(zip.finish().map_err(broken)?.into_inner())
}

/// A tiny valid PNG (8×8 RGBA, a gradient) made by the `png` crate, for tests.
#[cfg(test)]
pub fn tiny_png() -> Vec<u8> {
    let mut out = Vec::new();
    let mut encoder = png::Encoder::new(&mut out, 8, 8);
    encoder.set_color(png::ColorType::Rgba);
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder.write_header().expect("header");
    let pixels: Vec<u8> = (0..8 * 8 * 4).map(|i| (i * 7 % 256) as u8).collect();
    writer.write_image_data(&pixels).expect("pixels");
    writer.finish().expect("finish");
    out
}

// ---------------------------------------------------------------- reading

/// Bounds on what a CHARX archive may unpack to; a parameter so tests can shrink them.
struct ArchiveLimits {
    entries: usize,
    total: usize,
    card_json: usize,
}

const CHARX_LIMITS: ArchiveLimits = ArchiveLimits {
    entries: MAX_CHARX_ENTRIES,
    total: MAX_CHARX_BYTES,
    card_json: MAX_CARD_JSON_BYTES,
};

/// A card's JSON turned into a card, before any avatar or asset is attached.
struct Parsed {
    card: CharacterCard,
    version: CardVersion,
    changes: Vec<String>,
}

impl Parsed {
    fn into_imported(self, avatar: Option<Vec<u8>>, assets: Vec<Asset>) -> ImportedCard {
        ImportedCard {
            card: self.card,
            version: self.version,
            avatar,
            assets,
            changes: self.changes,
        }
    }
}

fn read_with(file_name: &str, bytes: &[u8], limits: &ArchiveLimits) -> Result<CardFile, String> {
    if bytes.is_empty() {
        return Err("The file is empty.".into());
    }
    if bytes.starts_with(&PNG_SIGNATURE) {
        return read_png(file_name, bytes).map(CardFile::Card);
    }
    if bytes.starts_with(b"PK\x03\x04") {
        return read_charx(file_name, bytes, limits).map(CardFile::Card);
    }
    let text = skip_bom(bytes).trim_ascii_start();
    if text.starts_with(b"{") || text.starts_with(b"[") {
        return read_json(file_name, bytes);
    }
    Err(
        "This is not a character card: it is not a PNG image, a JSON file or a CHARX archive."
            .into(),
    )
}

fn read_json(file_name: &str, bytes: &[u8]) -> Result<CardFile, String> {
    check_json_size(bytes.len(), "The file")?;
    let value = parse_json(bytes, "This file")?;
    if is_lorebook(&value) {
        return Ok(CardFile::Lorebook(value));
    }
    let parsed = parse_card(value, file_name)?;
    Ok(CardFile::Card(parsed.into_imported(None, Vec::new())))
}

fn check_json_size(len: usize, what: &str) -> Result<(), String> {
    if len > MAX_CARD_JSON_BYTES {
        return Err(format!(
            "{what} is {} of JSON; a card can be at most {}.",
            human_size(len),
            human_size(MAX_CARD_JSON_BYTES)
        ));
    }
    Ok(())
}

fn parse_json(bytes: &[u8], what: &str) -> Result<Value, String> {
    serde_json::from_slice(skip_bom(bytes)).map_err(|e| {
        if e.is_eof() {
            format!("{what} is cut short: its JSON ends too early.")
        } else {
            format!(
                "{what} is not valid JSON (the problem is at line {}, column {}).",
                e.line(),
                e.column()
            )
        }
    })
}

/// A standalone lorebook: `lorebook_v3`, SillyTavern's `{entries}` world file,
/// or a bare V2 `character_book` (which may have a `name` but no card fields).
fn is_lorebook(value: &Value) -> bool {
    let Some(top) = value.as_object() else {
        return false;
    };
    match top.get("spec") {
        Some(spec) => spec.as_str() == Some("lorebook_v3"),
        None => {
            top.get("entries")
                .is_some_and(|e| e.is_object() || e.is_array())
                && ![
                    "first_mes",
                    "personality",
                    "scenario",
                    "mes_example",
                    "data",
                ]
                .iter()
                .any(|k| top.contains_key(*k))
        }
    }
}

/// Turns card JSON of any version into a card, coercing what it can and
/// noting every change; fails only on what cannot be a card or is too large.
fn parse_card(value: Value, file_name: &str) -> Result<Parsed, String> {
    let mut changes = Vec::new();
    let mut top = match value {
        Value::Object(top) => top,
        Value::Array(_) => return Err("This JSON holds a list, not a character card.".into()),
        _ => return Err("This JSON is not a character card.".into()),
    };
    let spec = top.get("spec").map(|s| s.as_str().map(str::to_owned));
    let (version, mut data) = match spec {
        Some(Some(spec)) => {
            let version = match spec.as_str() {
                "chara_card_v2" => CardVersion::V2,
                "chara_card_v3" => CardVersion::V3,
                other => {
                    return Err(format!(
                        "This is a \"{}\" document, not a character card Dramatis can read.",
                        excerpt(other, 40)
                    ));
                }
            };
            (version, take_data(&mut top)?)
        }
        Some(None) => {
            return Err("The card's `spec` is not text, so its format cannot be told.".into());
        }
        None if top.contains_key("name") => (CardVersion::V1, top),
        None if top.get("data").and_then(|d| d.get("name")).is_some() => {
            changes.push(
                "The card did not say which spec it follows; it was read as a V2 card.".into(),
            );
            (CardVersion::V2, take_data(&mut top)?)
        }
        None => {
            return Err(
                "This JSON is not a character card: it has neither a `spec` nor a `name`.".into(),
            );
        }
    };
    coerce_fields(&mut data, &mut changes);
    drop_v3_defaults(&mut data);
    let mut card: CharacterCard = serde_json::from_value(Value::Object(data))
        .map_err(|_| "A field of the card has a type Dramatis cannot read.".to_string())?;
    remove_control_chars(&mut card, &mut changes);

    let tags = card.tags.len();
    let empty = card.tags.iter().filter(|t| t.trim().is_empty()).count();
    card.normalize();
    let repeated = tags - empty - card.tags.len();
    if empty > 0 {
        changes.push(format!(
            "{} dropped.",
            count(empty, "empty tag was", "empty tags were")
        ));
    }
    if repeated > 0 {
        changes.push(format!(
            "{} dropped.",
            count(repeated, "repeated tag was", "repeated tags were")
        ));
    }
    if card.name.is_empty() {
        let stem = Path::new(file_name)
            .file_stem()
            .and_then(|s| s.to_str())
            .map_or("", str::trim);
        if !stem.is_empty() {
            card.name = stem.chars().take(LIMITS.name).collect();
            changes.push(format!(
                "The card had no name; it was named \"{}\" after its file.",
                card.name
            ));
        }
    }
    changes.extend(editor_limit_notes(&card));
    card.validate_with(&IMPORT_LIMITS)
        .map_err(|e| too_large(&e))?;
    Ok(Parsed {
        card,
        version,
        changes,
    })
}

fn take_data(top: &mut Map<String, Value>) -> Result<Map<String, Value>, String> {
    match top.remove("data") {
        Some(Value::Object(data)) => Ok(data),
        None => Err("The card has no `data` section, where its fields belong.".into()),
        Some(_) => Err("The card's `data` section is not a set of fields.".into()),
    }
}

const TEXT_FIELDS: [&str; 11] = [
    "name",
    "description",
    "personality",
    "scenario",
    "first_mes",
    "mes_example",
    "creator_notes",
    "system_prompt",
    "post_history_instructions",
    "creator",
    "character_version",
];

/// Rewrites fields of the wrong type (seen in real cards) into the types the
/// card has, so one odd field does not reject the whole card.
fn coerce_fields(data: &mut Map<String, Value>, changes: &mut Vec<String>) {
    for key in TEXT_FIELDS {
        let Some(value) = data.get_mut(key) else {
            continue;
        };
        let what = label(key);
        let note = match &*value {
            Value::String(_) => continue,
            Value::Null => format!("The field \"{what}\" was empty (null); it is now blank."),
            Value::Bool(_) | Value::Number(_) => format!(
                "The field \"{what}\" was the value {value}, not text; it is now the text \"{value}\"."
            ),
            Value::Array(items) if items.iter().all(Value::is_string) => format!(
                "The field \"{what}\" was a list; its {} joined into one text, a line each.",
                count(items.len(), "item was", "items were")
            ),
            _ => format!(
                "The field \"{what}\" held structured data, not text; it was kept as JSON text."
            ),
        };
        *value = Value::String(text_of(value));
        changes.push(note);
    }
    for key in ["tags", "alternate_greetings"] {
        let Some(value) = data.get_mut(key) else {
            continue;
        };
        let what = label(key);
        let (list, note) = match std::mem::take(value) {
            Value::Array(items) => {
                let odd = items.iter().filter(|i| !i.is_string()).count();
                let list = items
                    .into_iter()
                    .filter(|i| !i.is_null())
                    .map(|i| Value::String(text_of(&i)))
                    .collect();
                let note = (odd > 0).then(|| {
                    format!(
                        "In the field \"{what}\", {} not text: values became text and empty (null) ones were dropped.",
                        count(odd, "item was", "items were")
                    )
                });
                (list, note)
            }
            Value::String(s) if key == "tags" => (
                s.split(',').map(|t| Value::String(t.to_owned())).collect(),
                Some(format!(
                    "The field \"{what}\" was one text, not a list; it was split at its commas."
                )),
            ),
            Value::String(s) => (
                if s.is_empty() {
                    Vec::new()
                } else {
                    vec![Value::String(s)]
                },
                Some(format!(
                    "The field \"{what}\" was one text, not a list; it is now a list of it."
                )),
            ),
            Value::Null => (
                Vec::new(),
                Some(format!(
                    "The field \"{what}\" was empty (null); it is now an empty list."
                )),
            ),
            other @ (Value::Bool(_) | Value::Number(_)) => (
                vec![Value::String(other.to_string())],
                Some(format!(
                    "The field \"{what}\" was a single value, not a list; it is now a list of it."
                )),
            ),
            Value::Object(_) => (
                Vec::new(),
                Some(format!(
                    "The field \"{what}\" was not a list; it was dropped."
                )),
            ),
        };
        *value = Value::Array(list);
        changes.extend(note);
    }
    if let Some(value) = data.get_mut("extensions") {
        let note = match value {
            Value::Object(_) => None,
            Value::Null => Some("The field \"extensions\" was empty (null); it is now empty."),
            _ => Some("The field \"extensions\" was not a set of named values; it was dropped."),
        };
        if let Some(note) = note {
            *value = json!({});
            changes.push(note.into());
        }
    }
    if data.get("character_book").is_some_and(Value::is_null) {
        // A null book means no book; dropping it keeps export → import stable.
        data.shift_remove("character_book");
    }
}

/// The text a non-text value stands for.
fn text_of(value: &Value) -> String {
    match value {
        Value::Null => String::new(),
        Value::String(s) => s.clone(),
        Value::Array(items) if items.iter().all(Value::is_string) => items
            .iter()
            .filter_map(Value::as_str)
            .collect::<Vec<_>>()
            .join("\n"),
        other => other.to_string(),
    }
}

fn default_assets() -> Value {
    json!([{"type": "icon", "uri": "ccdefault:", "name": "main", "ext": "png"}])
}

/// Drops V3 keys equal to what [`to_v3_json`] adds, so a V3 round trip
/// gives back the same card.
fn drop_v3_defaults(data: &mut Map<String, Value>) {
    if data
        .get("group_only_greetings")
        .and_then(Value::as_array)
        .is_some_and(Vec::is_empty)
    {
        data.shift_remove("group_only_greetings");
    }
    if data.get("assets") == Some(&default_assets()) {
        data.shift_remove("assets");
    }
}

fn is_stray_control(c: char) -> bool {
    c.is_control() && !matches!(c, '\n' | '\t' | '\r')
}

/// Removes control characters other than newline, tab and carriage return.
fn strip_controls(s: &mut String) -> usize {
    let n = s.chars().filter(|&c| is_stray_control(c)).count();
    if n > 0 {
        s.retain(|c| !is_stray_control(c));
    }
    n
}

fn remove_control_chars(card: &mut CharacterCard, changes: &mut Vec<String>) {
    let mut note = |key: &str, n: usize| {
        if n > 0 {
            changes.push(format!(
                "{} removed from the field \"{}\".",
                count(n, "control character was", "control characters were"),
                label(key)
            ));
        }
    };
    for (key, value) in [
        ("name", &mut card.name),
        ("description", &mut card.description),
        ("personality", &mut card.personality),
        ("scenario", &mut card.scenario),
        ("first_mes", &mut card.first_mes),
        ("mes_example", &mut card.mes_example),
        ("creator_notes", &mut card.creator_notes),
        ("system_prompt", &mut card.system_prompt),
        (
            "post_history_instructions",
            &mut card.post_history_instructions,
        ),
        ("creator", &mut card.creator),
        ("character_version", &mut card.character_version),
    ] {
        note(key, strip_controls(value));
    }
    let n = card
        .alternate_greetings
        .iter_mut()
        .map(strip_controls)
        .sum();
    note("alternate_greetings", n);
    let n = card.tags.iter_mut().map(strip_controls).sum();
    note("tags", n);
}

/// Sentences for each way the card exceeds the editor's [`LIMITS`]: real
/// cards do, and they are kept whole.
fn editor_limit_notes(card: &CharacterCard) -> Vec<String> {
    let l = LIMITS;
    let mut notes = Vec::new();
    let long = |key: &str, n: usize, max: usize| {
        format!(
            "The field \"{}\" is {n} characters, more than the editor's {max}; it was kept whole.",
            label(key)
        )
    };
    let n = card.name.chars().count();
    if n > l.name {
        notes.push(long("name", n, l.name));
    }
    for (key, value) in [
        ("description", &card.description),
        ("personality", &card.personality),
        ("scenario", &card.scenario),
        ("first_mes", &card.first_mes),
        ("mes_example", &card.mes_example),
        ("creator_notes", &card.creator_notes),
        ("system_prompt", &card.system_prompt),
        ("post_history_instructions", &card.post_history_instructions),
    ] {
        let n = value.chars().count();
        if n > l.text {
            notes.push(long(key, n, l.text));
        }
    }
    for (key, value) in [
        ("creator", &card.creator),
        ("character_version", &card.character_version),
    ] {
        let n = value.chars().count();
        if n > l.short {
            notes.push(long(key, n, l.short));
        }
    }
    let greetings = card.alternate_greetings.len();
    if greetings > l.greetings {
        notes.push(format!(
            "The card has {greetings} alternate greetings, more than the editor's {}; all were kept.",
            l.greetings
        ));
    }
    for (i, g) in card.alternate_greetings.iter().enumerate() {
        let n = g.chars().count();
        if n > l.text {
            notes.push(format!(
                "Alternate greeting {} is {n} characters, more than the editor's {}; it was kept whole.",
                i + 1,
                l.text
            ));
        }
    }
    if card.tags.len() > l.tags {
        notes.push(format!(
            "The card has {} tags, more than the editor's {}; all were kept.",
            card.tags.len(),
            l.tags
        ));
    }
    for tag in &card.tags {
        let n = tag.chars().count();
        if n > l.tag {
            let start: String = tag.chars().take(16).collect();
            notes.push(format!(
                "The tag \"{start}…\" is {n} characters; kept whole."
            ));
        }
    }
    let extra = json_len(&card.extensions)
        + card.character_book.as_ref().map_or(0, json_len)
        + json_len(&card.other);
    if extra > l.extensions_bytes {
        notes.push(format!(
            "The card's extension and lorebook data is {}, more than the editor's {}; it was kept whole.",
            human_size(extra),
            human_size(l.extensions_bytes)
        ));
    }
    notes
}

fn json_len(value: &impl serde::Serialize) -> usize {
    serde_json::to_vec(value).map_or(0, |v| v.len())
}

fn too_large(errors: &ValidationErrors) -> String {
    let parts: Vec<String> = errors
        .0
        .iter()
        .map(|e| format!("The field \"{}\": {}", label(&e.field), e.message))
        .collect();
    format!("The card cannot be imported. {}", parts.join(" "))
}

/// A field's name as the user knows it.
fn label(key: &str) -> &str {
    match key {
        "first_mes" => "first message",
        "mes_example" => "example dialogue",
        "creator_notes" => "creator notes",
        "system_prompt" => "system prompt",
        "post_history_instructions" => "post-history instructions",
        "character_version" => "version",
        "alternate_greetings" => "alternate greetings",
        "character_book" => "lorebook",
        other => other,
    }
}

// ---------------------------------------------------------------- PNG

/// One PNG chunk: its type, its data, and all its bytes (length to CRC).
struct Chunk<'a> {
    kind: [u8; 4],
    data: &'a [u8],
    raw: &'a [u8],
}

/// Walks a PNG's chunks up to IEND, checking lengths and CRCs.
fn png_chunks(bytes: &[u8]) -> Result<Vec<Chunk<'_>>, String> {
    if !bytes.starts_with(&PNG_SIGNATURE) {
        return Err("This is not a PNG image.".into());
    }
    let mut chunks = Vec::new();
    let mut pos = PNG_SIGNATURE.len();
    loop {
        if pos == bytes.len() {
            return Err("The PNG is cut short: it has no end marker (IEND).".into());
        }
        let Some(head) = bytes.get(pos..pos + 8) else {
            return Err("The PNG is cut short: its last chunk is incomplete.".into());
        };
        let len = u32::from_be_bytes([head[0], head[1], head[2], head[3]]) as usize;
        let kind = [head[4], head[5], head[6], head[7]];
        if !kind.iter().all(u8::is_ascii_alphabetic) || len > i32::MAX as usize {
            return Err("The PNG is damaged: it has a chunk that is not valid.".into());
        }
        let name = String::from_utf8_lossy(&kind).into_owned();
        let Some(raw) = bytes.get(pos..pos + 12 + len) else {
            return Err(format!(
                "The PNG is cut short: its {name} chunk runs past the end of the file."
            ));
        };
        let stored = u32::from_be_bytes([raw[8 + len], raw[9 + len], raw[10 + len], raw[11 + len]]);
        if crc32fast::hash(&raw[4..8 + len]) != stored {
            return Err(format!(
                "The PNG is damaged: the checksum of its {name} chunk does not match."
            ));
        }
        if chunks.is_empty() && &kind != b"IHDR" {
            return Err("The PNG is damaged: it does not start with an image header.".into());
        }
        chunks.push(Chunk {
            kind,
            data: &raw[8..8 + len],
            raw,
        });
        pos += 12 + len;
        if &kind == b"IEND" {
            return Ok(chunks);
        }
    }
}

fn push_chunk(out: &mut Vec<u8>, kind: [u8; 4], data: &[u8]) -> Result<(), String> {
    let len = u32::try_from(data.len())
        .ok()
        .filter(|&n| n <= i32::MAX as u32)
        .ok_or_else(|| "The card is too large to fit in a PNG.".to_string())?;
    let mut crc = crc32fast::Hasher::new();
    crc.update(&kind);
    crc.update(data);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&kind);
    out.extend_from_slice(data);
    out.extend_from_slice(&crc.finalize().to_be_bytes());
    Ok(())
}

/// A tEXt, zTXt or iTXt chunk's keyword (Latin-1) and the bytes after it.
fn text_keyword<'a>(chunk: &Chunk<'a>) -> Option<(String, &'a [u8])> {
    if !matches!(&chunk.kind, b"tEXt" | b"zTXt" | b"iTXt") {
        return None;
    }
    let nul = chunk.data.iter().position(|&b| b == 0)?;
    let keyword = chunk.data[..nul].iter().map(|&b| char::from(b)).collect();
    Some((keyword, &chunk.data[nul + 1..]))
}

fn is_card_chunk(chunk: &Chunk<'_>) -> bool {
    text_keyword(chunk)
        .is_some_and(|(k, _)| k.eq_ignore_ascii_case("chara") || k.eq_ignore_ascii_case("ccv3"))
}

fn is_card_or_asset_chunk(chunk: &Chunk<'_>) -> bool {
    is_card_chunk(chunk)
        || text_keyword(chunk).is_some_and(|(k, _)| {
            k.get(..RISU_ASSET_PREFIX.len())
                .is_some_and(|p| p.eq_ignore_ascii_case(RISU_ASSET_PREFIX))
        })
}

const DAMAGED_TEXT: &str =
    "The character card inside this PNG is damaged: its text chunk is malformed.";

/// The text of a text chunk after its keyword, decompressed (within
/// [`MAX_CARD_JSON_BYTES`]) when the chunk is compressed.
fn chunk_text<'a>(kind: &[u8; 4], rest: &'a [u8]) -> Result<Cow<'a, [u8]>, String> {
    match kind {
        b"zTXt" => match rest.split_first() {
            Some((0, z)) => inflate(z).map(Cow::Owned),
            Some(_) => Err(unknown_compression()),
            None => Err(DAMAGED_TEXT.into()),
        },
        b"iTXt" => {
            let [flag, method, tail @ ..] = rest else {
                return Err(DAMAGED_TEXT.into());
            };
            let mut parts = tail.splitn(3, |&b| b == 0);
            let (Some(_language), Some(_translated), Some(text)) =
                (parts.next(), parts.next(), parts.next())
            else {
                return Err(DAMAGED_TEXT.into());
            };
            match (flag, method) {
                (0, _) => Ok(Cow::Borrowed(text)),
                (1, 0) => inflate(text).map(Cow::Owned),
                _ => Err(unknown_compression()),
            }
        }
        _ => Ok(Cow::Borrowed(rest)),
    }
}

fn unknown_compression() -> String {
    "The character card inside this PNG is compressed in a way Dramatis cannot read.".into()
}

fn inflate(z: &[u8]) -> Result<Vec<u8>, String> {
    read_limited(flate2::read::ZlibDecoder::new(z), MAX_CARD_JSON_BYTES, 0).map_err(|e| match e {
        Limited::TooBig => format!(
            "The character card inside this PNG expands past {}; it is too large (or a decompression bomb) and was not read.",
            human_size(MAX_CARD_JSON_BYTES)
        ),
        Limited::Damaged => {
            "The character card inside this PNG is damaged: its compressed text cannot be unpacked."
                .into()
        }
    })
}

enum Limited {
    TooBig,
    Damaged,
}

/// Reads all of `reader` but never more than `limit` bytes.
fn read_limited(reader: impl Read, limit: usize, size_hint: u64) -> Result<Vec<u8>, Limited> {
    let mut reader = reader.take(limit as u64 + 1);
    let hint = usize::try_from(size_hint).unwrap_or(limit).min(limit);
    let mut out = Vec::with_capacity(hint);
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => return Ok(out),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return Err(Limited::Damaged),
        };
        if out.len() + n > limit {
            return Err(Limited::TooBig);
        }
        out.extend_from_slice(&buf[..n]);
    }
}

fn decode_base64(text: &[u8]) -> Option<Vec<u8>> {
    let compact: Vec<u8> = text
        .iter()
        .copied()
        .filter(|b| !b.is_ascii_whitespace())
        .collect();
    BASE64
        .decode(&compact)
        .or_else(|_| BASE64_URL.decode(&compact))
        .ok()
}

/// The JSON a card chunk holds: base64 of it, or (from sloppy writers) the JSON itself.
fn decode_card_text(text: &[u8]) -> Result<Vec<u8>, String> {
    if let Some(bytes) = decode_base64(text) {
        return Ok(bytes);
    }
    let raw = skip_bom(text).trim_ascii();
    if raw.starts_with(b"{") {
        return Ok(match std::str::from_utf8(raw) {
            Ok(_) => raw.to_vec(),
            Err(_) => raw
                .iter()
                .map(|&b| char::from(b))
                .collect::<String>()
                .into_bytes(),
        });
    }
    Err(
        "The character card inside this PNG is damaged: its text is neither base64 nor JSON."
            .into(),
    )
}

fn load_png_card((kind, rest): ([u8; 4], &[u8]), file_name: &str) -> Result<Parsed, String> {
    let text = chunk_text(&kind, rest)?;
    let json = decode_card_text(&text)?;
    check_json_size(json.len(), "The character card inside this PNG")?;
    let value = parse_json(&json, "The character card inside this PNG")?;
    if is_lorebook(&value) {
        return Err("This PNG holds a lorebook, not a character card.".into());
    }
    parse_card(value, file_name)
}

fn read_png(file_name: &str, bytes: &[u8]) -> Result<ImportedCard, String> {
    let chunks = png_chunks(bytes)?;
    let ihdr = chunks[0].data;
    if ihdr.len() != 13 {
        return Err("The PNG is damaged: its image header has the wrong size.".into());
    }
    let width = u32::from_be_bytes([ihdr[0], ihdr[1], ihdr[2], ihdr[3]]);
    let height = u32::from_be_bytes([ihdr[4], ihdr[5], ihdr[6], ihdr[7]]);
    if width == 0 || height == 0 || width > MAX_PLAUSIBLE_SIDE || height > MAX_PLAUSIBLE_SIDE {
        return Err(format!(
            "The PNG is damaged: its header says the picture is {width}×{height} pixels."
        ));
    }
    let mut ccv3 = None;
    let mut chara = None;
    let mut risu = Vec::new();
    for chunk in &chunks {
        let Some((keyword, rest)) = text_keyword(chunk) else {
            continue;
        };
        let lower = keyword.to_ascii_lowercase();
        if lower == "ccv3" {
            ccv3.get_or_insert((chunk.kind, rest));
        } else if lower == "chara" {
            chara.get_or_insert((chunk.kind, rest));
        } else if lower.starts_with(RISU_ASSET_PREFIX) {
            risu.push((
                keyword[RISU_ASSET_PREFIX.len()..].to_owned(),
                chunk.kind,
                rest,
            ));
        }
    }
    let mut parsed = match (ccv3, chara) {
        (None, None) => {
            return Err("This PNG has no character card inside; it is only a picture.".into());
        }
        (None, Some(v2)) => load_png_card(v2, file_name)?,
        (Some(v3), v2) => match (load_png_card(v3, file_name), v2) {
            (Ok(parsed), _) => parsed,
            (Err(e), None) => return Err(e),
            (Err(e), Some(v2)) => {
                let mut parsed = load_png_card(v2, file_name).map_err(|_| e)?;
                parsed.changes.insert(
                    0,
                    "The card's V3 copy (ccv3) is damaged, so its V2 copy (chara) was read instead."
                        .into(),
                );
                parsed
            }
        },
    };

    let avatar = if width as usize > MAX_AVATAR_SIDE || height as usize > MAX_AVATAR_SIDE {
        parsed.changes.push(format!(
            "The picture is {width}×{height} pixels, more than the {MAX_AVATAR_SIDE} a side an avatar may have; the card was imported without it."
        ));
        None
    } else {
        let mut picture = PNG_SIGNATURE.to_vec();
        for chunk in chunks.iter().filter(|c| !is_card_or_asset_chunk(c)) {
            picture.extend_from_slice(chunk.raw);
        }
        checked_avatar(picture, &mut parsed.changes)
    };

    let entries = asset_entries(&parsed.card);
    let mut assets = Vec::new();
    for (path, kind, rest) in risu {
        let uri = format!("__asset:{path}");
        let Some(bytes) = chunk_text(&kind, rest).ok().and_then(|t| decode_base64(&t)) else {
            parsed.changes.push(format!(
                "The embedded file \"{}\" is damaged; it was left out.",
                excerpt(&path, 80)
            ));
            continue;
        };
        let entry = entries.iter().find(|e| e.uri == uri);
        assets.push(Asset {
            kind: entry.map_or_else(|| "x_risu".into(), |e| e.kind.clone()),
            name: entry.map_or_else(|| path.clone(), |e| e.name.clone()),
            ext: entry.map_or_else(String::new, |e| e.ext.clone()),
            uri,
            path,
            bytes,
        });
    }
    Ok(parsed.into_imported(avatar, assets))
}

/// The avatar bytes if they are an acceptable image, else `None` and a note.
fn checked_avatar(bytes: Vec<u8>, changes: &mut Vec<String>) -> Option<Vec<u8>> {
    match Avatar::parse(bytes) {
        Ok(avatar) => Some(avatar.bytes().to_vec()),
        Err(e) => {
            let why = e.for_field("avatar").unwrap_or("It is not a usable image.");
            changes.push(format!("The card was imported without its picture. {why}"));
            None
        }
    }
}

// ---------------------------------------------------------------- CHARX

/// One entry of a card's `assets[]`, its fields as text.
struct AssetEntry {
    kind: String,
    name: String,
    ext: String,
    uri: String,
}

fn asset_entries(card: &CharacterCard) -> Vec<AssetEntry> {
    let Some(list) = card.other.get("assets").and_then(Value::as_array) else {
        return Vec::new();
    };
    list.iter()
        .filter(|a| a.is_object())
        .map(|a| {
            let field = |k: &str| a.get(k).and_then(Value::as_str).unwrap_or("").to_owned();
            AssetEntry {
                kind: field("type"),
                name: field("name"),
                ext: field("ext"),
                uri: field("uri"),
            }
        })
        .collect()
}

/// The archive path an asset URI points to, if it points inside the file.
fn embedded_path(uri: &str) -> Option<&str> {
    ["embeded://", "embedded://", "__asset:"]
        .iter()
        .find_map(|prefix| uri.strip_prefix(prefix))
        .map(|p| p.trim_start_matches("./").trim_start_matches('/'))
}

/// A relative path that stays inside the archive on every system.
fn is_safe_entry_name(name: &str) -> bool {
    let b = name.as_bytes();
    let drive = b.len() >= 2 && b[0].is_ascii_alphabetic() && b[1] == b':';
    !(name.is_empty()
        || drive
        || name.starts_with('/')
        || name.contains('\\')
        || name.contains('\0')
        || name.split('/').any(|part| part == ".."))
}

type Archive<'a> = zip::ZipArchive<Cursor<&'a [u8]>>;

fn read_charx(
    file_name: &str,
    bytes: &[u8],
    limits: &ArchiveLimits,
) -> Result<ImportedCard, String> {
    let damaged =
        || "This CHARX archive is damaged; it cannot be opened as a zip file.".to_string();
    let mut zip = Archive::new(Cursor::new(bytes)).map_err(|_| damaged())?;
    if zip.len() > limits.entries {
        return Err(format!(
            "This CHARX archive holds {} files; the most Dramatis opens is {}.",
            zip.len(),
            limits.entries
        ));
    }
    let mut declared: u64 = 0;
    for i in 0..zip.len() {
        let entry = zip.by_index_data(i).map_err(|_| damaged())?;
        let name = entry
            .name()
            .map_err(|_| "This CHARX archive has a file whose name cannot be read.".to_string())?;
        if !is_safe_entry_name(&name) || entry.enclosed_name().is_none() {
            return Err(format!(
                "This CHARX archive contains a file with an unsafe path, \"{}\"; it was not opened.",
                excerpt(&name, 120)
            ));
        }
        if name == "card.json" && entry.size() > limits.card_json as u64 {
            return Err(card_json_too_big(limits));
        }
        declared = declared.saturating_add(entry.size());
    }
    if declared > limits.total as u64 {
        return Err(format!(
            "This CHARX archive unpacks to {}; the most Dramatis opens is {}.",
            human_size(usize::try_from(declared).unwrap_or(usize::MAX)),
            human_size(limits.total)
        ));
    }
    let mut budget = limits.total;
    let index = zip.index_for_name("card.json").ok_or_else(|| {
        "This CHARX archive has no card.json inside, so it holds no character card.".to_string()
    })?;
    let json = read_entry(
        &mut zip,
        index,
        "card.json",
        limits.card_json,
        &mut budget,
        limits,
    )?;
    let value = parse_json(&json, "The card.json inside this CHARX archive")?;
    if is_lorebook(&value) {
        return Err("This CHARX archive holds a lorebook, not a character card.".into());
    }
    let mut parsed = parse_card(value, file_name)?;

    let entries = asset_entries(&parsed.card);
    let avatar_at = entries
        .iter()
        .position(|e| e.kind == "icon" && e.name == "main")
        .or_else(|| entries.iter().position(|e| e.kind == "icon"));
    let mut avatar = None;
    let mut assets = Vec::new();
    for (i, entry) in entries.into_iter().enumerate() {
        let is_avatar = avatar_at == Some(i);
        let Some(path) = embedded_path(&entry.uri).map(str::to_owned) else {
            if is_avatar && !entry.uri.starts_with("ccdefault:") {
                parsed.changes.push(format!(
                    "The card's picture is not inside the file (it points to \"{}\"); the card was imported without it.",
                    excerpt(&entry.uri, 80)
                ));
            }
            continue;
        };
        let Some(index) = zip.index_for_name(&path) else {
            parsed.changes.push(if is_avatar {
                format!(
                    "The card's picture points to {}, which is not in the archive; the card was imported without it.",
                    excerpt(&path, 120)
                )
            } else {
                format!(
                    "The asset \"{}\" points to {}, which is not in the archive; it was left out.",
                    excerpt(&entry.name, 60),
                    excerpt(&path, 120)
                )
            });
            continue;
        };
        let bytes = read_entry(&mut zip, index, &path, limits.total, &mut budget, limits)?;
        if is_avatar {
            avatar = checked_avatar(bytes.clone(), &mut parsed.changes);
        }
        assets.push(Asset {
            kind: entry.kind,
            name: entry.name,
            ext: entry.ext,
            uri: entry.uri,
            path,
            bytes,
        });
    }
    Ok(parsed.into_imported(avatar, assets))
}

fn card_json_too_big(limits: &ArchiveLimits) -> String {
    format!(
        "The card.json inside this CHARX archive expands past {}; it is too large (or a zip bomb) and was not read.",
        human_size(limits.card_json)
    )
}

/// Unpacks one entry within `limit` and what is left of the archive's `budget`.
fn read_entry(
    zip: &mut Archive<'_>,
    index: usize,
    name: &str,
    limit: usize,
    budget: &mut usize,
    limits: &ArchiveLimits,
) -> Result<Vec<u8>, String> {
    let shown = excerpt(name, 120);
    let file = zip.by_index(index).map_err(|e| match e {
        ZipError::UnsupportedArchive(_) => format!(
            "The file {shown} in this CHARX archive is compressed or encrypted in a way Dramatis cannot read."
        ),
        _ => format!("The file {shown} in this CHARX archive is damaged."),
    })?;
    let declared = file.size();
    let cap = limit.min(*budget);
    let bytes = read_limited(file, cap, declared).map_err(|e| match e {
        Limited::TooBig if cap < limit => format!(
            "This CHARX archive unpacks to more than {}; it was not opened.",
            human_size(limits.total)
        ),
        Limited::TooBig if name == "card.json" => card_json_too_big(limits),
        Limited::TooBig => format!(
            "The file {shown} in this CHARX archive expands past {}; it was not read.",
            human_size(limit)
        ),
        Limited::Damaged => format!("The file {shown} in this CHARX archive is damaged."),
    })?;
    *budget -= bytes.len();
    Ok(bytes)
}

// ---------------------------------------------------------------- writing

fn v3_data(card: &CharacterCard) -> Map<String, Value> {
    let mut data = match serde_json::to_value(card) {
        Ok(Value::Object(data)) => data,
        _ => Map::new(),
    };
    data.entry("group_only_greetings")
        .or_insert_with(|| json!([]));
    data.entry("assets").or_insert_with(default_assets);
    data
}

fn wrap_v3(data: Map<String, Value>) -> Value {
    json!({"spec": "chara_card_v3", "spec_version": "3.0", "data": data})
}

/// Puts `{type, uri, name, ext}` in `data.assets`, replacing an entry of the same type and name.
fn upsert_asset(data: &mut Map<String, Value>, kind: &str, name: &str, ext: &str, path: &str) {
    let entry = json!({"type": kind, "uri": format!("embeded://{path}"), "name": name, "ext": ext});
    let assets = data.entry("assets").or_insert_with(|| json!([]));
    if !assets.is_array() {
        *assets = json!([]);
    }
    let Value::Array(list) = assets else {
        return;
    };
    let same = |a: &Value| {
        a.get("type").and_then(Value::as_str) == Some(kind)
            && a.get("name").and_then(Value::as_str) == Some(name)
    };
    match list.iter_mut().find(|a| same(a)) {
        Some(slot) => *slot = entry,
        None => list.push(entry),
    }
}

fn clean_ext(ext: &str) -> Option<String> {
    let ext = ext.trim().trim_start_matches('.').to_ascii_lowercase();
    (!ext.is_empty() && ext.len() <= 16 && ext.bytes().all(|b| b.is_ascii_alphanumeric()))
        .then_some(ext)
}

fn output_name(card: &CharacterCard, ext: &str) -> String {
    let name = card.name.trim();
    if name.is_empty() {
        format!("card.{ext}")
    } else {
        format!("{name}.{ext}")
    }
}

fn compact(value: &Value) -> Vec<u8> {
    serde_json::to_vec(value).expect("a JSON value always serializes")
}

fn pretty(value: &Value) -> Vec<u8> {
    serde_json::to_vec_pretty(value).expect("a JSON value always serializes")
}

// ---------------------------------------------------------------- small helpers

fn skip_bom(bytes: &[u8]) -> &[u8] {
    bytes.strip_prefix(b"\xef\xbb\xbf").unwrap_or(bytes)
}

/// `n` with its noun, singular or plural.
fn count(n: usize, one: &str, many: &str) -> String {
    if n == 1 {
        format!("1 {one}")
    } else {
        format!("{n} {many}")
    }
}

/// The start of `s`, control characters shown as `?`, for quoting in messages.
fn excerpt(s: &str, max: usize) -> String {
    let mut out: String = s
        .chars()
        .take(max)
        .map(|c| if c.is_control() { '?' } else { c })
        .collect();
    if s.chars().count() > max {
        out.push('…');
    }
    out
}

fn human_size(n: usize) -> String {
    if n >= MIB {
        if n.is_multiple_of(MIB) {
            format!("{} MiB", n / MIB)
        } else {
            format!("{:.1} MiB", n as f64 / MIB as f64)
        }
    } else if n >= 1024 {
        format!("{} KiB", n / 1024)
    } else {
        format!("{n} bytes")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    enum Text<'a> {
        T(&'a str, String),
        Z(&'a str, String),
        I(&'a str, String, bool),
    }
    use Text::{I, T, Z};

    fn pixels(w: u32, h: u32) -> Vec<u8> {
        (0..w * h * 4).map(|i| (i * 13 % 251) as u8).collect()
    }

    /// An 8×8 RGBA PNG from the `png` crate with the given text chunks.
    fn png_with(texts: &[Text<'_>]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut enc = png::Encoder::new(&mut out, 8, 8);
        enc.set_color(png::ColorType::Rgba);
        enc.set_depth(png::BitDepth::Eight);
        for t in texts {
            match t {
                T(k, v) => enc.add_text_chunk((*k).into(), v.clone()).unwrap(),
                Z(k, v) => enc.add_ztxt_chunk((*k).into(), v.clone()).unwrap(),
                I(k, v, false) => enc.add_itxt_chunk((*k).into(), v.clone()).unwrap(),
                I(_, _, true) => {}
            }
        }
        let mut w = enc.write_header().unwrap();
        for t in texts {
            if let I(k, v, true) = t {
                let mut chunk = png::text_metadata::ITXtChunk::new(*k, v.clone());
                chunk.compressed = true;
                w.write_text_chunk(&chunk).unwrap();
            }
        }
        w.write_image_data(&pixels(8, 8)).unwrap();
        w.finish().unwrap();
        out
    }

    fn decode_pixels(bytes: &[u8]) -> Vec<u8> {
        let mut reader = png::Decoder::new(Cursor::new(bytes)).read_info().unwrap();
        let mut buf = vec![0; reader.output_buffer_size().unwrap()];
        let info = reader.next_frame(&mut buf).unwrap();
        buf.truncate(info.buffer_size());
        buf
    }

    /// Rewrites the IHDR's width and height (and its CRC), leaving the pixels as they are.
    fn with_size(mut png: Vec<u8>, w: u32, h: u32) -> Vec<u8> {
        png[16..20].copy_from_slice(&w.to_be_bytes());
        png[20..24].copy_from_slice(&h.to_be_bytes());
        let crc = crc32fast::hash(&png[12..29]);
        png[29..33].copy_from_slice(&crc.to_be_bytes());
        png
    }

    fn b64(json: &Value) -> String {
        STANDARD.encode(serde_json::to_vec(json).unwrap())
    }

    fn sample() -> CharacterCard {
        let mut c = CharacterCard {
            name: "Mira".into(),
            description: "A pilot. <script>alert('x')</script> Ünïcödé 🌙".into(),
            first_mes: "Hello, {{user}}.".into(),
            mes_example: "<START>\n{{char}}: Hi.\r\n".into(),
            alternate_greetings: vec!["Yo.".into(), "\tHey.".into()],
            tags: vec!["Fantasy".into(), "Noir".into()],
            creator: "ann".into(),
            character_version: "1.2".into(),
            character_book: Some(json!({"name": "Sky", "entries": [
                {"keys": ["moon"], "content": "The moon.", "extensions": {}, "enabled": true,
                 "insertion_order": 1}]})),
            ..Default::default()
        };
        c.extensions
            .insert("zeta".into(), json!({"nested": [1, 2, {"k": null}]}));
        c.extensions.insert("alpha".into(), json!("x"));
        c.other.insert("nickname".into(), json!("Mi"));
        c.other.insert("creation_date".into(), json!(1_700_000_000));
        c
    }

    fn imported(file: &str, bytes: &[u8]) -> ImportedCard {
        match read(file, bytes) {
            Ok(CardFile::Card(card)) => card,
            other => panic!("expected a card, got {other:?}"),
        }
    }

    fn refused(file: &str, bytes: &[u8]) -> String {
        match read(file, bytes) {
            Err(e) => {
                assert_eq!(e.file, file);
                assert_eq!(e.to_string(), format!("{file}: {}", e.message));
                e.message
            }
            Ok(other) => panic!("expected an error, got {other:?}"),
        }
    }

    fn json_card(v: &Value) -> ImportedCard {
        imported("card.json", &serde_json::to_vec(v).unwrap())
    }

    fn card_chunks(png: &[u8]) -> Vec<(String, String)> {
        png_chunks(png)
            .unwrap()
            .iter()
            .filter(|c| is_card_chunk(c))
            .map(|c| {
                let (k, rest) = text_keyword(c).unwrap();
                (
                    String::from_utf8_lossy(&c.kind).into(),
                    k + "=" + &String::from_utf8_lossy(rest),
                )
            })
            .collect()
    }

    fn zip_of(files: &[(&str, &[u8])]) -> Vec<u8> {
        let mut zip = zip::ZipWriter::new(Cursor::new(Vec::new()));
        for (name, bytes) in files {
            zip.start_file(*name, SimpleFileOptions::default()).unwrap();
            zip.write_all(bytes).unwrap();
        }
        zip.finish().unwrap().into_inner()
    }

    fn v3_bytes(card: &CharacterCard) -> Vec<u8> {
        serde_json::to_vec(&to_v3_json(card)).unwrap()
    }

    // ------------------------------------------------------------ PNG

    #[test]
    fn png_round_trip_keeps_the_card_pixels_and_other_chunks() {
        let base = png_with(&[
            T("Comment", "made by hand".into()),
            Z("Software", "x".into()),
        ]);
        let out = write_png(&sample(), &base).unwrap();
        let got = imported("mira.png", &out);
        assert_eq!(got.card, sample());
        assert_eq!(got.version, CardVersion::V3);
        assert!(got.changes.is_empty(), "{:?}", got.changes);
        let keep = |png: &[u8]| -> Vec<Vec<u8>> {
            png_chunks(png)
                .unwrap()
                .iter()
                .filter(|c| !is_card_chunk(c))
                .map(|c| c.raw.to_vec())
                .collect()
        };
        assert_eq!(keep(&base), keep(&out), "other chunks are byte-identical");
        assert_eq!(decode_pixels(&base), decode_pixels(&out));
        let avatar = got.avatar.unwrap();
        assert_eq!(decode_pixels(&avatar), decode_pixels(&base));
        assert_eq!(
            keep(&avatar),
            keep(&base),
            "the avatar is the picture without the card"
        );
        let chunks = card_chunks(&out);
        assert_eq!(chunks.len(), 2);
        assert!(chunks[0].1.starts_with("chara=") && chunks[1].1.starts_with("ccv3="));
        let v2 = STANDARD.decode(&chunks[0].1["chara=".len()..]).unwrap();
        let v2: Value = serde_json::from_slice(&v2).unwrap();
        assert_eq!(v2, sample().to_v2_json());
        assert_eq!(
            refused("a.png", &avatar),
            "This PNG has no character card inside; it is only a picture."
        );
    }

    #[test]
    fn write_png_replaces_old_card_chunks() {
        let old = b64(&CharacterCard {
            name: "Old".into(),
            ..Default::default()
        }
        .to_v2_json());
        let base = png_with(&[
            T("Chara", old.clone()),
            Z("CCV3", old.clone()),
            I("chara", old.clone(), true),
            T("Comment", "keep me".into()),
        ]);
        let out = write_png(&sample(), &base).unwrap();
        assert_eq!(card_chunks(&out).len(), 2);
        let comment = png_chunks(&out)
            .unwrap()
            .iter()
            .filter_map(text_keyword)
            .any(|(k, v)| k == "Comment" && v == b"keep me");
        assert!(comment);
        assert_eq!(imported("a.png", &out).card, sample());
        let again = write_png(&sample(), &out).unwrap();
        assert_eq!(again, out, "writing twice gives the same file");
        let err = write_png(&sample(), b"GIF89a....").unwrap_err();
        assert_eq!(err.file, "Mira.png");
        assert!(err.message.contains("not a PNG"), "{}", err.message);
    }

    #[test]
    fn ccv3_is_read_before_chara_and_versions_are_told() {
        let a = CharacterCard {
            name: "Aya".into(),
            ..Default::default()
        };
        let b = CharacterCard {
            name: "Bea".into(),
            ..Default::default()
        };
        let png = png_with(&[
            T("chara", b64(&a.to_v2_json())),
            T("ccv3", b64(&to_v3_json(&b))),
        ]);
        let got = imported("x.png", &png);
        assert_eq!(
            (got.card.name.as_str(), got.version),
            ("Bea", CardVersion::V3)
        );
        let png = png_with(&[T("chara", b64(&a.to_v2_json()))]);
        assert_eq!(imported("x.png", &png).version, CardVersion::V2);
        let png = png_with(&[T("chara", b64(&json!({"name": "Old", "first_mes": "Hi"})))]);
        let got = imported("x.png", &png);
        assert_eq!(
            (got.card.first_mes.as_str(), got.version),
            ("Hi", CardVersion::V1)
        );
    }

    #[test]
    fn damaged_ccv3_falls_back_to_chara() {
        let png = png_with(&[
            T("ccv3", "%%%".into()),
            T("chara", b64(&sample().to_v2_json())),
        ]);
        let got = imported("x.png", &png);
        assert_eq!(got.card, sample());
        assert!(got.changes[0].contains("V2 copy"), "{:?}", got.changes);
        let png = png_with(&[T("ccv3", "%%%".into())]);
        assert!(refused("x.png", &png).contains("neither base64 nor JSON"));
    }

    #[test]
    fn ztxt_and_itxt_chunks_are_read() {
        let text = b64(&to_v3_json(&sample()));
        for chunk in [
            Z("chara", text.clone()),
            I("CCV3", text.clone(), true),
            I("ChArA", text.clone(), false),
        ] {
            assert_eq!(imported("x.png", &png_with(&[chunk])).card, sample());
        }
    }

    #[test]
    fn base64_and_raw_json_are_read_leniently() {
        let text = b64(&sample().to_v2_json());
        let unpadded = text.trim_end_matches('=').to_owned();
        assert_ne!(unpadded, text, "the fixture has padding to drop");
        let wrapped: String = text
            .as_bytes()
            .chunks(76)
            .map(|l| format!("{}\r\n", std::str::from_utf8(l).unwrap()))
            .collect();
        let raw = serde_json::to_string(&sample().to_v2_json()).unwrap();
        for chunk in [
            T("chara", unpadded),
            T("chara", format!("  {wrapped}")),
            I("chara", raw.clone(), false),
            I("chara", raw, true),
        ] {
            assert_eq!(imported("x.png", &png_with(&[chunk])).card, sample());
        }
        let ascii = json!({"name": "Plain", "description": "ascii only"}).to_string();
        assert_eq!(
            imported("x.png", &png_with(&[T("chara", ascii)])).card.name,
            "Plain"
        );
    }

    #[test]
    fn png_without_a_card_is_only_a_picture() {
        assert_eq!(
            refused("cat.png", &tiny_png()),
            "This PNG has no character card inside; it is only a picture."
        );
        let png = png_with(&[T("Comment", "chara".into())]);
        assert!(refused("cat.png", &png).contains("only a picture"));
    }

    #[test]
    fn truncated_png_is_reported() {
        let png = write_png(&sample(), &tiny_png()).unwrap();
        let msg = refused("x.png", &png[..png.len() - 40]);
        assert!(
            msg.contains("cut short") && msg.contains("runs past the end"),
            "{msg}"
        );
        let msg = refused("x.png", &png[..png.len() - 12]);
        assert!(msg.contains("no end marker"), "{msg}");
        let msg = refused("x.png", &png[..png.len() - 5]);
        assert!(msg.contains("cut short"), "{msg}");
        assert!(refused("x.png", &png[..10]).contains("cut short"));
    }

    #[test]
    fn bad_crc_is_reported() {
        let mut png = write_png(&sample(), &tiny_png()).unwrap();
        let idat = png.windows(4).position(|w| w == b"IDAT").unwrap();
        png[idat + 6] ^= 0xff;
        let msg = refused("x.png", &png);
        assert_eq!(
            msg,
            "The PNG is damaged: the checksum of its IDAT chunk does not match."
        );
    }

    #[test]
    fn garbage_in_the_card_chunk_is_reported() {
        let msg = refused(
            "x.png",
            &png_with(&[T("chara", "!!! not base64 !!!".into())]),
        );
        assert!(msg.contains("neither base64 nor JSON"), "{msg}");
        let msg = refused("x.png", &png_with(&[T("chara", STANDARD.encode("{nope"))]));
        assert!(
            msg.contains("not valid JSON") && msg.contains("line 1"),
            "{msg}"
        );
        let msg = refused("x.png", &png_with(&[T("chara", STANDARD.encode("[1, 2]"))]));
        assert!(msg.contains("list, not a character card"), "{msg}");
        let msg = refused(
            "x.png",
            &png_with(&[T("chara", STANDARD.encode("{\"a\": 1"))]),
        );
        assert!(msg.contains("cut short"), "{msg}");
    }

    #[test]
    fn huge_png_dimensions_drop_the_avatar_or_refuse_the_file() {
        let png = write_png(&sample(), &tiny_png()).unwrap();
        let got = imported("x.png", &with_size(png.clone(), 5000, 5000));
        assert_eq!(got.card, sample());
        assert_eq!(got.avatar, None);
        assert!(
            got.changes
                .iter()
                .any(|c| c.contains("5000×5000") && c.contains("without it")),
            "{:?}",
            got.changes
        );
        for (w, h) in [(200_000, 8), (8, 0), (0, 0)] {
            let msg = refused("x.png", &with_size(png.clone(), w, h));
            assert!(
                msg.contains("damaged") && msg.contains(&format!("{w}×{h}")),
                "{msg}"
            );
        }
    }

    #[test]
    fn ztxt_bomb_is_refused() {
        let bomb = "A".repeat(MAX_CARD_JSON_BYTES + 1024);
        let png = png_with(&[Z("chara", bomb)]);
        assert!(
            png.len() < MAX_CARD_JSON_BYTES / 100,
            "the fixture is small on disk"
        );
        let msg = refused("x.png", &png);
        assert!(msg.contains("expands past 16 MiB"), "{msg}");
    }

    #[test]
    fn risu_asset_chunks_are_collected() {
        let mut card = sample();
        card.other.insert(
            "assets".into(),
            json!([{"type": "emotion", "uri": "__asset:1", "name": "happy", "ext": "webp"}]),
        );
        let png = png_with(&[
            T("chara", b64(&card.to_v2_json())),
            T("chara-ext-asset_:1", STANDARD.encode(b"webp bytes")),
            T("chara-ext-asset_:2", STANDARD.encode(b"other bytes")),
        ]);
        let got = imported("x.png", &png);
        assert_eq!(got.assets.len(), 2);
        let a = &got.assets[0];
        assert_eq!(
            (
                a.kind.as_str(),
                a.name.as_str(),
                a.ext.as_str(),
                a.uri.as_str(),
                a.path.as_str()
            ),
            ("emotion", "happy", "webp", "__asset:1", "1")
        );
        assert_eq!(a.bytes, b"webp bytes");
        assert_eq!(
            (got.assets[1].kind.as_str(), got.assets[1].path.as_str()),
            ("x_risu", "2")
        );
        let avatar = got.avatar.unwrap();
        assert!(
            png_chunks(&avatar)
                .unwrap()
                .iter()
                .all(|c| !is_card_or_asset_chunk(c))
        );
    }

    // ------------------------------------------------------------ JSON

    #[test]
    fn files_are_detected_by_content_not_name() {
        let json = serde_json::to_vec(&sample().to_v2_json()).unwrap();
        assert_eq!(imported("looks-like.png", &json).card, sample());
        let mut bom = b"\xef\xbb\xbf \n\t".to_vec();
        bom.extend_from_slice(&json);
        assert_eq!(imported("bom.json", &bom).card, sample());
        let png = write_png(&sample(), &tiny_png()).unwrap();
        assert_eq!(imported("card.json", &png).card, sample());
        let charx = write_charx(&sample(), None, &[]).unwrap();
        assert_eq!(imported("card.png", &charx).card, sample());
        let msg = refused("x.png", b"GIF89a\x01\x00");
        assert_eq!(
            msg,
            "This is not a character card: it is not a PNG image, a JSON file or a CHARX archive."
        );
        assert_eq!(refused("x.json", b""), "The file is empty.");
    }

    #[test]
    fn json_versions_one_to_three_are_read() {
        let v1 = json_card(&json!({"name": "Old", "first_mes": "Hi", "chat": "x"}));
        assert_eq!(v1.version, CardVersion::V1);
        assert_eq!(v1.card.other["chat"], "x");
        let v2 = json_card(&sample().to_v2_json());
        assert_eq!((v2.version, &v2.card), (CardVersion::V2, &sample()));
        let mut v3 = to_v3_json(&sample());
        v3["data"]["source"] = json!(["https://example.org/mira"]);
        v3["data"]["group_only_greetings"] = json!(["Hi all."]);
        let got = json_card(&v3);
        assert_eq!(got.version, CardVersion::V3);
        assert_eq!(got.card.other["nickname"], "Mi");
        assert_eq!(got.card.other["group_only_greetings"], json!(["Hi all."]));
        assert_eq!(got.card.description, sample().description);
        let guessed = json_card(&json!({"data": {"name": "Nos"}}));
        assert_eq!(guessed.version, CardVersion::V2);
        assert_eq!(guessed.changes.len(), 1);
    }

    #[test]
    fn json_that_is_not_a_card_is_refused() {
        let no = |v: Value| refused("x.json", &serde_json::to_vec(&v).unwrap());
        assert_eq!(
            no(json!([{"name": "a"}])),
            "This JSON holds a list, not a character card."
        );
        assert!(no(json!({"title": "hello"})).contains("neither a `spec` nor a `name`"));
        assert!(no(json!({"spec": "chara_card_v9", "data": {}})).contains("\"chara_card_v9\""));
        assert!(no(json!({"spec": 2, "data": {}})).contains("`spec` is not text"));
        assert!(no(json!({"spec": "chara_card_v2"})).contains("no `data`"));
        assert!(no(json!({"spec": "chara_card_v2", "data": []})).contains("`data`"));
        assert!(no(json!("just text")).contains("not a character card"));
        let msg = refused("x.json", b"{\"name\": }");
        assert!(
            msg.starts_with("This file is not valid JSON (the problem is at line 1"),
            "{msg}"
        );
    }

    #[test]
    fn lorebooks_are_returned_raw() {
        for book in [
            json!({"entries": {"0": {"uid": 0, "key": ["moon"], "content": "c"}}}),
            json!({"entries": [{"keys": ["moon"], "content": "c"}]}),
            json!({"spec": "lorebook_v3", "data": {"entries": []}}),
            json!({"name": "Sky", "description": "A book", "entries": [{"keys": ["a"]}]}),
        ] {
            let got = read("book.json", &serde_json::to_vec(&book).unwrap()).unwrap();
            assert_eq!(got, CardFile::Lorebook(book));
        }
        let png = png_with(&[T("chara", b64(&json!({"entries": []})))]);
        assert!(refused("b.png", &png).contains("lorebook"));
        let card = json_card(&json!({"name": "Ada", "first_mes": "Hi", "entries": []}));
        assert_eq!(
            card.card.other["entries"],
            json!([]),
            "a card with an odd key stays a card"
        );
    }

    #[test]
    fn oversized_fields_are_kept_whole_and_noted() {
        let name = "N".repeat(300);
        let tag = "t".repeat(200);
        let description = "d".repeat(150_000);
        let got = json_card(&json!({"spec": "chara_card_v2", "data": {
            "name": name, "description": description, "tags": [tag, "ok"]}}));
        assert_eq!(got.card.name, name);
        assert_eq!(got.card.description, description);
        assert_eq!(got.card.tags, [tag.as_str(), "ok"]);
        assert!(got.card.validate().is_err(), "over the editor's limits");
        let has = |s: &str| got.changes.iter().any(|c| c == s);
        assert!(
            has("The tag \"tttttttttttttttt…\" is 200 characters; kept whole."),
            "{:?}",
            got.changes
        );
        assert!(has(
            "The field \"name\" is 300 characters, more than the editor's 128; it was kept whole."
        ));
        assert!(has(
            "The field \"description\" is 150000 characters, more than the editor's 100000; it was kept whole."
        ));
        assert_eq!(got.changes.len(), 3);
    }

    #[test]
    fn cards_over_the_import_limits_are_refused() {
        let big = "x".repeat(IMPORT_LIMITS.text + 1);
        let msg = refused(
            "x.json",
            &serde_json::to_vec(&json!({"name": "A", "first_mes": big})).unwrap(),
        );
        assert!(
            msg.contains("first message") && msg.contains("2000001") && msg.contains("2000000"),
            "{msg}"
        );
        let tags: Vec<String> = (0..600).map(|i| format!("t{i}")).collect();
        let msg = refused(
            "x.json",
            &serde_json::to_vec(&json!({"name": "A", "tags": tags})).unwrap(),
        );
        assert!(msg.contains("600 tags") && msg.contains("512"), "{msg}");
        let huge = vec![b' '; MAX_CARD_JSON_BYTES + 1];
        let mut file = b"{".to_vec();
        file.extend_from_slice(&huge);
        assert!(refused("x.json", &file).contains("at most 16 MiB"));
    }

    #[test]
    fn wrong_types_are_coerced_and_noted() {
        let got = json_card(&json!({"spec": "chara_card_v2", "data": {
            "name": "Ada", "character_version": 1.5, "creator": null,
            "description": ["line one", "line two"], "scenario": {"where": "sea"},
            "tags": "fantasy, noir", "alternate_greetings": null,
            "extensions": null, "character_book": null}}));
        let c = &got.card;
        assert_eq!(c.character_version, "1.5");
        assert_eq!(c.creator, "");
        assert_eq!(c.description, "line one\nline two");
        assert_eq!(c.scenario, r#"{"where":"sea"}"#);
        assert_eq!(c.tags, ["fantasy", "noir"]);
        assert!(c.alternate_greetings.is_empty() && c.extensions.is_empty());
        assert_eq!(c.character_book, None);
        assert!(
            got.changes.contains(
                &"The field \"version\" was the value 1.5, not text; it is now the text \"1.5\"."
                    .into()
            )
        );
        assert_eq!(got.changes.len(), 7, "{:?}", got.changes);
        let got = json_card(&json!({"name": "Ada", "tags": ["a", 7, null, true],
            "alternate_greetings": "Hello!"}));
        assert_eq!(got.card.tags, ["a", "7", "true"]);
        assert_eq!(got.card.alternate_greetings, ["Hello!"]);
        assert_eq!(got.changes.len(), 2, "{:?}", got.changes);
    }

    #[test]
    fn control_characters_are_removed_and_noted() {
        let got = json_card(&json!({"name": "Mi\u{0}ra\u{1b}",
            "description": "bell\u{7} kept:\n\t\r", "tags": ["a\u{85}b"]}));
        assert_eq!(got.card.name, "Mira");
        assert_eq!(got.card.description, "bell kept:\n\t\r");
        assert_eq!(got.card.tags, ["ab"]);
        assert_eq!(
            got.changes,
            [
                "2 control characters were removed from the field \"name\".",
                "1 control character was removed from the field \"description\".",
                "1 control character was removed from the field \"tags\".",
            ]
        );
    }

    #[test]
    fn dropped_tags_are_reported() {
        let got = json_card(&json!({"name": "A", "tags": ["a", "", " ", "A", "b", "  "]}));
        assert_eq!(got.card.tags, ["a", "b"]);
        assert_eq!(
            got.changes,
            ["3 empty tags were dropped.", "1 repeated tag was dropped."]
        );
    }

    #[test]
    fn nameless_card_is_named_after_its_file() {
        let v2 = json!({"spec": "chara_card_v2", "data": {"name": "  ", "first_mes": "Hi"}});
        let got = imported("Sky Pirate.json", &serde_json::to_vec(&v2).unwrap());
        assert_eq!(got.card.name, "Sky Pirate");
        assert_eq!(got.changes.len(), 1);
        assert!(refused("", &serde_json::to_vec(&v2).unwrap()).contains("needs a name"));
    }

    #[test]
    fn json_round_trips_are_stable() {
        // With preserve_order, Map equality still ignores key order; key order is kept anyway.
        let (a, b) = (json!({"x": 1, "y": 2}), json!({"y": 2, "x": 1}));
        assert_eq!(a, b);
        let v2_input = json!({"spec": "chara_card_v2", "spec_version": "2.0", "data": {
            "name": "Zoë", "tags": ["b", "a"], "extensions": {"z": 1, "a": {"k": [1]}},
            "weird_key": {"kept": true}, "creator_notes": null}});
        let v3_input = json!({"spec": "chara_card_v3", "spec_version": "3.0", "data": {
            "name": "Zoë", "nickname": "Z", "group_only_greetings": [],
            "assets": [{"type": "icon", "uri": "ccdefault:", "name": "main", "ext": "png"}],
            "creation_date": 0, "extensions": {"z": 1, "a": 2}}});
        for input in [v2_input, v3_input] {
            let first = json_card(&input).card;
            for bytes in [json_v2(&first), json_v3(&first)] {
                assert!(bytes.starts_with(b"{\n  "), "pretty JSON");
                let again = imported("again.json", &bytes);
                assert_eq!(again.card, first);
                assert!(again.changes.is_empty(), "{:?}", again.changes);
                let keys: Vec<_> = again.card.extensions.keys().collect();
                assert_eq!(keys, ["z", "a"]);
            }
        }
    }

    #[test]
    fn to_v3_json_adds_required_keys_and_keeps_the_rest() {
        let v3 = to_v3_json(&sample());
        assert_eq!(
            (v3["spec"].as_str(), v3["spec_version"].as_str()),
            (Some("chara_card_v3"), Some("3.0"))
        );
        assert_eq!(v3["data"]["group_only_greetings"], json!([]));
        assert_eq!(v3["data"]["assets"], default_assets());
        assert_eq!(v3["data"]["nickname"], "Mi");
        assert_eq!(
            v3["data"]["extensions"]["zeta"]["nested"][2],
            json!({"k": null})
        );
        let mut c = sample();
        c.other
            .insert("group_only_greetings".into(), json!(["Hi all."]));
        c.other.insert("assets".into(), json!([]));
        let v3 = to_v3_json(&c);
        assert_eq!(v3["data"]["group_only_greetings"], json!(["Hi all."]));
        assert_eq!(v3["data"]["assets"], json!([]));
    }

    #[test]
    fn hostile_text_survives_every_format_unchanged() {
        let mut c = sample();
        c.first_mes = "<img src=x onerror=alert(1)><script>fetch('//evil')</script>".into();
        let charx = write_charx(&c, None, &[]).unwrap();
        let png = write_png(&c, &tiny_png()).unwrap();
        for (name, bytes) in [
            ("a.json", json_v2(&c)),
            ("b.json", json_v3(&c)),
            ("c.png", png),
            ("d.charx", charx),
        ] {
            assert_eq!(imported(name, &bytes).card.first_mes, c.first_mes);
        }
    }

    // ------------------------------------------------------------ CHARX

    #[test]
    fn charx_round_trip_keeps_card_avatar_and_assets() {
        let got = imported("m.charx", &write_charx(&sample(), None, &[]).unwrap());
        assert_eq!(
            (got.card, got.version, got.avatar),
            (sample(), CardVersion::V3, None)
        );
        assert!(got.assets.is_empty() && got.changes.is_empty());

        let picture = tiny_png();
        let bg = Asset {
            kind: "background".into(),
            name: "sky".into(),
            ext: "PNG".into(),
            bytes: b"not checked".to_vec(),
            ..Default::default()
        };
        let charx = write_charx(&sample(), Some((&picture, "png")), &[bg]).unwrap();
        let got = imported("m.charx", &charx);
        assert!(got.changes.is_empty(), "{:?}", got.changes);
        assert_eq!(got.avatar.as_deref(), Some(&picture[..]));
        let listed: Vec<_> = got
            .assets
            .iter()
            .map(|a| (a.kind.as_str(), a.path.as_str()))
            .collect();
        assert_eq!(
            listed,
            [
                ("icon", "assets/icon/images/main.png"),
                ("background", "assets/other/sky.png")
            ]
        );
        assert_eq!(got.assets[0].uri, "embeded://assets/icon/images/main.png");
        assert_eq!(got.assets[1].bytes, b"not checked");
        let mut expected = sample();
        expected.other.insert("assets".into(), json!([
            {"type": "icon", "uri": "embeded://assets/icon/images/main.png", "name": "main", "ext": "png"},
            {"type": "background", "uri": "embeded://assets/other/sky.png", "name": "sky", "ext": "png"}]));
        assert_eq!(got.card, expected);

        // Writing what was read gives the same archive contents back.
        let again = write_charx(&got.card, Some((&picture, "png")), &got.assets).unwrap();
        let second = imported("m.charx", &again);
        assert_eq!(
            (second.card, second.avatar, second.assets),
            (got.card, got.avatar, got.assets)
        );
    }

    #[test]
    fn charx_avatar_is_found_by_any_uri_spelling() {
        let picture = tiny_png();
        for uri in ["embeded://a/p.png", "embedded://a/p.png", "__asset:a/p.png"] {
            let mut c = sample();
            c.other.insert(
                "assets".into(),
                json!([
                {"type": "icon", "uri": "embeded://a/x.png", "name": "other", "ext": "png"},
                {"type": "icon", "uri": uri, "name": "main", "ext": "png"}]),
            );
            let zip = zip_of(&[
                ("card.json", &v3_bytes(&c)),
                ("a/p.png", &picture),
                ("a/x.png", b"x"),
            ]);
            let got = imported("m.charx", &zip);
            assert_eq!(got.avatar.as_deref(), Some(&picture[..]), "{uri}");
            assert_eq!(got.assets.len(), 2);
        }
    }

    #[test]
    fn charx_avatar_problems_import_the_card_without_it() {
        let mut c = sample();
        c.other.insert("assets".into(), json!([
            {"type": "icon", "uri": "embeded://assets/icon/images/main.png", "name": "main", "ext": "png"}]));
        let got = imported("m.charx", &zip_of(&[("card.json", &v3_bytes(&c))]));
        assert_eq!((got.avatar, got.card.name.as_str()), (None, "Mira"));
        assert_eq!(
            got.changes,
            [
                "The card's picture points to assets/icon/images/main.png, which is not in the archive; the card was imported without it."
            ]
        );

        let zip = zip_of(&[
            ("card.json", &v3_bytes(&c)),
            ("assets/icon/images/main.png", b"hello"),
        ]);
        let got = imported("m.charx", &zip);
        assert_eq!(got.avatar, None);
        assert_eq!(got.assets.len(), 1, "the asset is still listed");
        assert!(
            got.changes[0].starts_with("The card was imported without its picture."),
            "{:?}",
            got.changes
        );

        let huge = with_size(tiny_png(), 8000, 8);
        let zip = zip_of(&[
            ("card.json", &v3_bytes(&c)),
            ("assets/icon/images/main.png", &huge),
        ]);
        let got = imported("m.charx", &zip);
        assert_eq!(got.avatar, None);
        assert!(got.changes[0].contains("8000×8"), "{:?}", got.changes);

        c.other.insert(
            "assets".into(),
            json!([{"type": "icon", "uri": "https://x.org/a.png", "name": "main", "ext": "png"}]),
        );
        let got = imported("m.charx", &zip_of(&[("card.json", &v3_bytes(&c))]));
        assert!(
            got.changes[0].contains("not inside the file"),
            "{:?}",
            got.changes
        );
    }

    #[test]
    fn charx_unsafe_paths_are_refused() {
        let card = v3_bytes(&sample());
        for name in [
            "../evil.txt",
            "assets/../../evil.txt",
            "/etc/passwd",
            "assets\\x.png",
            "C:/x.png",
        ] {
            let zip = zip_of(&[("card.json", &card), (name, b"x")]);
            let msg = refused("m.charx", &zip);
            assert!(
                msg.contains("unsafe path") && msg.contains(name),
                "{name}: {msg}"
            );
        }
    }

    #[test]
    fn charx_without_card_json_is_refused() {
        let zip = zip_of(&[("assets/icon/images/main.png", &tiny_png())]);
        assert!(refused("m.charx", &zip).contains("no card.json"));
        let zip = zip_of(&[("card.json", b"{broken")]);
        assert!(
            refused("m.charx", &zip)
                .contains("card.json inside this CHARX archive is not valid JSON")
        );
        let mut zip = zip_of(&[("card.json", &v3_bytes(&sample()))]);
        zip.truncate(zip.len() / 2);
        assert!(refused("m.charx", &zip).contains("damaged"));
    }

    #[test]
    fn charx_size_and_count_limits_hold() {
        let card = v3_bytes(&sample());
        let small = ArchiveLimits {
            entries: 3,
            total: 64 * 1024,
            card_json: 8 * 1024,
        };
        let read_small = |zip: &[u8]| read_with("m.charx", zip, &small).unwrap_err();

        let many: Vec<(String, Vec<u8>)> =
            (0..4).map(|i| (format!("assets/{i}"), vec![])).collect();
        let mut files: Vec<(&str, &[u8])> = vec![("card.json", &card)];
        files.extend(many.iter().map(|(n, b)| (n.as_str(), b.as_slice())));
        assert!(read_small(&zip_of(&files)).contains("holds 5 files"));

        let big = vec![0u8; 100 * 1024];
        let msg = read_small(&zip_of(&[("card.json", &card), ("assets/big", &big)]));
        assert!(msg.contains("unpacks to 100 KiB"), "{msg}");

        let padded = [card.clone(), vec![b' '; 10 * 1024]].concat();
        let msg = read_small(&zip_of(&[("card.json", &padded)]));
        assert!(
            msg.contains("card.json") && msg.contains("expands past 8 KiB"),
            "{msg}"
        );

        // A bomb that lies about its size is stopped while it is unpacked.
        let mut zip = zip_of(&[("card.json", &padded)]);
        lie_about_sizes(&mut zip, 100);
        let msg = read_small(&zip);
        assert!(
            msg.contains("card.json") && msg.contains("damaged"),
            "{msg}"
        );
        let mut bomb = flate2::read::ZlibEncoder::new(
            io::repeat(b'a').take(1 << 24),
            flate2::Compression::fast(),
        );
        let mut z = Vec::new();
        bomb.read_to_end(&mut z).unwrap();
        let reader = flate2::read::ZlibDecoder::new(&z[..]);
        assert!(matches!(
            read_limited(reader, 1000, 10),
            Err(Limited::TooBig)
        ));

        let real: Vec<(String, Vec<u8>)> = (0..MAX_CHARX_ENTRIES)
            .map(|i| (format!("a/{i}"), vec![]))
            .collect();
        let mut files: Vec<(&str, &[u8])> = vec![("card.json", &card)];
        files.extend(real.iter().map(|(n, b)| (n.as_str(), b.as_slice())));
        assert!(
            refused("m.charx", &zip_of(&files))
                .contains("holds 1001 files; the most Dramatis opens is 1000")
        );
    }

    /// Rewrites every entry's uncompressed size, in local and central headers.
    fn lie_about_sizes(zip: &mut [u8], size: u32) {
        for i in 0..zip.len().saturating_sub(30) {
            match &zip[i..i + 4] {
                b"PK\x03\x04" => zip[i + 22..i + 26].copy_from_slice(&size.to_le_bytes()),
                b"PK\x01\x02" => zip[i + 24..i + 28].copy_from_slice(&size.to_le_bytes()),
                _ => {}
            }
        }
    }

    #[test]
    fn charx_writer_refuses_unsafe_asset_paths() {
        let bad = Asset {
            kind: "x_a".into(),
            name: "../up".into(),
            ext: "png".into(),
            ..Default::default()
        };
        let err = write_charx(&sample(), None, &[bad]).unwrap_err();
        assert_eq!(err.file, "Mira.charx");
        assert!(err.message.contains("not a safe place"), "{}", err.message);
        let err = write_charx(&sample(), Some((b"x", "p/ng")), &[]).unwrap_err();
        assert!(err.message.contains("extension"), "{}", err.message);
    }
}
