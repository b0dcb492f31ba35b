//! Card files in and out: import (PNG, JSON, CHARX, world-info JSON) with
//! avatars, duplicates and carried adapters, and export in every format.
//!
//! Invariants: an import that fails stores nothing (no character, no adapter
//! files, no lorebook); a local adapter id never leaves this installation (it
//! is stripped on export and ignored on import); a carried adapter is only
//! installed when a model here has its base's shape, and is checked by loading
//! it before anything is stored.

use std::path::{Path, PathBuf};

use dramatis_persona::cardfile::{self, Asset, CardFile, ImportedCard};
use dramatis_persona::lorebook::Lorebook;
use dramatis_persona::{Avatar, AvatarFormat, CharacterCard};
use dramatis_store::{AdapterRow, AvatarChange};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::characters::CharacterSummary;
use crate::{Dramatis, Error, Result};

/// The largest file an import reads (a CHARX may carry an adapter).
pub const MAX_IMPORT_BYTES: u64 = 512 * 1024 * 1024;

/// The asset type a carried adapter's files have in a CHARX.
pub const ADAPTER_ASSET: &str = "x_dramatis_lora";

use crate::training::EXT;

/// What to do when an imported card has the name and creator of a character
/// already here.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnDuplicate {
    /// Store nothing and report it, so the user can choose.
    #[default]
    Ask,
    /// Overwrite the existing character's card and avatar (its chats stay).
    Replace,
    /// Store the import as another character.
    KeepBoth,
    /// Leave the existing one and store nothing.
    Skip,
}

/// What happened to one imported file.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum ImportOutcome {
    /// A character was stored (or replaced one).
    Imported {
        /// The file's name.
        file: String,
        /// The character as the gallery shows it.
        character: CharacterSummary,
        /// Whether an existing character was overwritten.
        replaced: bool,
        /// What was changed on the way in, in sentences.
        changes: Vec<String>,
        /// The name of the adapter installed from the file, if any.
        adapter: Option<String>,
    },
    /// A lorebook was stored.
    Lorebook {
        /// The file's name.
        file: String,
        /// The new lorebook.
        id: i64,
        /// Its name.
        name: String,
        /// How many entries it has.
        entries: usize,
    },
    /// The card duplicates a character here; nothing was stored.
    Duplicate {
        /// The file's name.
        file: String,
        /// The card's name.
        name: String,
        /// The character it would duplicate.
        existing_id: i64,
    },
    /// Skipped as asked; nothing was stored.
    Skipped {
        /// The file's name.
        file: String,
        /// The card's name.
        name: String,
    },
    /// The file was refused; nothing was stored.
    Failed {
        /// The file's name.
        file: String,
        /// What is wrong with it.
        message: String,
    },
}

/// Export formats for a character.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CardFormat {
    /// The avatar with `chara` (V2) and `ccv3` (V3) chunks.
    Png,
    /// Character Card V2 JSON.
    JsonV2,
    /// Character Card V3 JSON.
    JsonV3,
    /// A CHARX zip: V3 card, avatar and (when attached) the adapter.
    Charx,
}

impl CardFormat {
    /// The file extension for this format.
    pub fn extension(self) -> &'static str {
        match self {
            Self::Png => "png",
            Self::JsonV2 | Self::JsonV3 => "json",
            Self::Charx => "charx",
        }
    }
}

/// The shape of the model an adapter was trained on: what must match for it to load.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BaseShape {
    /// The base's name as PEFT records it (`microsoft/phi-2`).
    pub base_model: String,
    /// Width of the hidden state.
    pub hidden_size: usize,
    /// Transformer blocks.
    pub num_hidden_layers: usize,
    /// Width of the MLP.
    pub intermediate_size: usize,
    /// Vocabulary.
    pub vocab_size: usize,
}

impl BaseShape {
    fn of(config: &dramatis_llm::PhiConfig, base_model: &str) -> Self {
        Self {
            base_model: base_model.to_owned(),
            hidden_size: config.hidden_size,
            num_hidden_layers: config.num_hidden_layers,
            intermediate_size: config.intermediate_size,
            vocab_size: config.vocab_size,
        }
    }

    fn fits(&self, config: &dramatis_llm::PhiConfig) -> bool {
        self.hidden_size == config.hidden_size
            && self.num_hidden_layers == config.num_hidden_layers
            && self.intermediate_size == config.intermediate_size
            && self.vocab_size == config.vocab_size
    }

    fn describe(&self) -> String {
        format!(
            "{} ({} layers, width {})",
            if self.base_model.is_empty() {
                "an unnamed base"
            } else {
                &self.base_model
            },
            self.num_hidden_layers,
            self.hidden_size
        )
    }
}

fn file_label(path: &Path) -> String {
    path.file_name().map_or_else(
        || path.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    )
}

/// Removes the local adapter id: it means nothing on another installation.
fn strip_local_ids(card: &mut CharacterCard) {
    if let Some(Value::Object(ext)) = card.extensions.get_mut(EXT) {
        ext.remove("adapter_id");
        if ext.is_empty() {
            card.extensions.remove(EXT);
        }
    }
}

/// Removes `assets` entries that point into the imported file: the avatar
/// and a carried adapter are stored on their own; other embedded pictures and
/// sounds are not kept (Dramatis shows only the avatar), and the user is told.
/// Entries pointing elsewhere (`ccdefault:`, URLs) stay as written.
fn drop_embedded_assets(card: &mut CharacterCard, changes: &mut Vec<String>) {
    let Some(Value::Array(assets)) = card.other.get_mut("assets") else {
        return;
    };
    let embedded = |a: &Value| {
        a.get("uri").and_then(Value::as_str).is_some_and(|u| {
            u.starts_with("embeded://") || u.starts_with("embedded://") || u.starts_with("__asset:")
        })
    };
    let kind = |a: &Value| {
        a.get("type")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned()
    };
    let mut lost: Vec<String> = Vec::new();
    assets.retain(|a| {
        if !embedded(a) {
            return true;
        }
        let k = kind(a);
        if k != "icon" && k != ADAPTER_ASSET {
            lost.push(k);
        }
        false
    });
    if !lost.is_empty() {
        let n = lost.len();
        lost.sort();
        lost.dedup();
        changes.push(format!(
            "{n} embedded {} ({}) {} not kept: Dramatis keeps only the avatar.",
            if n == 1 { "file" } else { "files" },
            lost.join(", "),
            if n == 1 { "was" } else { "were" },
        ));
    }
    if assets.is_empty() {
        card.other.remove("assets");
    }
}

/// A carried adapter found in a CHARX: its files and its base.
struct CarriedAdapter {
    name: String,
    base: BaseShape,
    files: Vec<(String, Vec<u8>)>,
}

fn carried_adapter(
    card: &CharacterCard,
    assets: &[Asset],
) -> std::result::Result<Option<CarriedAdapter>, String> {
    let files: Vec<(String, Vec<u8>)> = assets
        .iter()
        .filter(|a| a.kind == ADAPTER_ASSET)
        .map(|a| (format!("{}.{}", a.name, a.ext), a.bytes.clone()))
        .collect();
    if files.is_empty() {
        return Ok(None);
    }
    let info = card
        .extensions
        .get(EXT)
        .and_then(|e| e.get("adapter"))
        .ok_or("it carries adapter files but no description of the adapter")?;
    let base: BaseShape = serde_json::from_value(info.get("base").cloned().unwrap_or_default())
        .map_err(|e| format!("its adapter's base model is not described properly ({e})"))?;
    for need in ["adapter_config.json", "adapter_model.safetensors"] {
        if !files.iter().any(|(n, _)| n == need) {
            return Err(format!("its adapter is missing {need}"));
        }
    }
    if let Some((bad, _)) = files.iter().find(|(n, _)| {
        !matches!(
            n.as_str(),
            "adapter_config.json" | "adapter_model.safetensors"
        )
    }) {
        return Err(format!("its adapter has an unexpected file \"{bad}\""));
    }
    let name = info
        .get("name")
        .and_then(Value::as_str)
        .map(str::trim)
        .filter(|n| !n.is_empty())
        .unwrap_or("Imported adapter")
        .chars()
        .take(128)
        .collect();
    Ok(Some(CarriedAdapter { name, base, files }))
}

/// A PNG to carry a card when the character has no picture: a square in a
/// colour taken from the name, so different characters look different.
fn placeholder_png(name: &str) -> Vec<u8> {
    let h = name.bytes().fold(0x811c_9dc5u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    });
    let rgb = [
        (h >> 16) as u8 | 0x40,
        (h >> 8) as u8 | 0x40,
        h as u8 | 0x40,
    ];
    const SIDE: u32 = 64;
    let mut out = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut out, SIDE, SIDE);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let mut w = enc.write_header().expect("writing to a Vec cannot fail");
        let pixels: Vec<u8> = (0..SIDE * SIDE).flat_map(|_| rgb).collect();
        w.write_image_data(&pixels)
            .expect("writing to a Vec cannot fail");
    }
    out
}

impl Dramatis {
    /// Imports card and lorebook files; one outcome per file, in order. A
    /// file that fails does not stop the others.
    pub fn import_card_files(
        &self,
        paths: &[PathBuf],
        on_duplicate: OnDuplicate,
    ) -> Vec<ImportOutcome> {
        paths
            .iter()
            .map(|p| {
                let file = file_label(p);
                match read_limited(p) {
                    Ok(bytes) => self.import_card_bytes(&file, &bytes, on_duplicate),
                    Err(message) => ImportOutcome::Failed { file, message },
                }
            })
            .collect()
    }

    /// Imports one file's bytes (`file` names it in messages).
    pub fn import_card_bytes(
        &self,
        file: &str,
        bytes: &[u8],
        on_duplicate: OnDuplicate,
    ) -> ImportOutcome {
        let failed = |message: String| ImportOutcome::Failed {
            file: file.to_owned(),
            message,
        };
        match cardfile::read(file, bytes) {
            Err(e) => failed(e.message),
            Ok(CardFile::Lorebook(value)) => {
                let bytes = serde_json::to_vec(&value).expect("a value serializes");
                match Lorebook::from_json(&bytes) {
                    Err(e) => failed(e.to_string()),
                    Ok(mut book) => {
                        if book.name.trim().is_empty() {
                            book.name = Path::new(file)
                                .file_stem()
                                .map_or("Lorebook".into(), |s| s.to_string_lossy().into_owned());
                        }
                        match self.create_lorebook(book, Vec::new()) {
                            Ok(v) => ImportOutcome::Lorebook {
                                file: file.to_owned(),
                                id: v.id,
                                name: v.book.name.clone(),
                                entries: v.book.entries.len(),
                            },
                            Err(e) => failed(e.to_string()),
                        }
                    }
                }
            }
            Ok(CardFile::Card(imported)) => match self.import_card(file, imported, on_duplicate) {
                Ok(o) => o,
                Err(e) => failed(e.to_string()),
            },
        }
    }

    fn import_card(
        &self,
        file: &str,
        imported: ImportedCard,
        on_duplicate: OnDuplicate,
    ) -> Result<ImportOutcome> {
        let ImportedCard {
            mut card,
            avatar,
            assets,
            mut changes,
            ..
        } = imported;
        let carried = carried_adapter(&card, &assets)
            .map_err(|why| Error::Conflict(format!("This card cannot be imported: {why}.")))?;
        strip_local_ids(&mut card);
        drop_embedded_assets(&mut card, &mut changes);
        if let Some(Value::Object(ext)) = card.extensions.get_mut(EXT) {
            // Describes the carried files; re-created on export.
            ext.remove("adapter");
            if ext.is_empty() {
                card.extensions.remove(EXT);
            }
        }
        if let Some(book) = &card.character_book
            && let Err(e) = Lorebook::from_character_book(book)
        {
            changes.push(format!(
                "The card's lorebook could not be read ({e}); it is kept as it was but not used."
            ));
        }
        let avatar = match avatar.map(Avatar::parse) {
            None => None,
            Some(Ok(a)) => Some(a),
            Some(Err(e)) => {
                changes.push(format!(
                    "The picture was not kept: {}",
                    e.0.first()
                        .map_or("it is not a usable image.", |f| f.message.as_str())
                ));
                None
            }
        };
        let existing = self.store().characters_named(&card.name, &card.creator)?;
        let replace = match (existing.first(), on_duplicate) {
            (None, _) | (Some(_), OnDuplicate::KeepBoth) => None,
            (Some(&id), OnDuplicate::Ask) => {
                return Ok(ImportOutcome::Duplicate {
                    file: file.to_owned(),
                    name: card.name,
                    existing_id: id,
                });
            }
            (Some(_), OnDuplicate::Skip) => {
                return Ok(ImportOutcome::Skipped {
                    file: file.to_owned(),
                    name: card.name,
                });
            }
            (Some(&id), OnDuplicate::Replace) => Some(id),
        };
        // The adapter first: if it is refused, nothing else is stored.
        let installed = match &carried {
            Some(c) => Some(self.install_carried_adapter(c)?),
            None => None,
        };
        if let Some((adapter_id, _)) = installed {
            let ext = card
                .extensions
                .entry(EXT.to_owned())
                .or_insert_with(|| json!({}));
            if let Value::Object(o) = ext {
                o.insert("adapter_id".into(), adapter_id.into());
            }
        }
        // Replacing keeps the adapter the character here has, unless the file brings one.
        if let (Some(id), None) = (replace, installed.as_ref())
            && let Some(kept) = crate::training::attached_adapter(&self.store().character(id)?.card)
        {
            let ext = card
                .extensions
                .entry(EXT.to_owned())
                .or_insert_with(|| json!({}));
            if let Value::Object(o) = ext {
                o.insert("adapter_id".into(), kept.into());
            }
        }
        let stored = match replace {
            Some(id) => {
                let change = match &avatar {
                    Some(a) => AvatarChange::Set(a.clone()),
                    None => AvatarChange::Remove,
                };
                self.store().update_character(id, &card, change).map(|_| id)
            }
            None => self.store().insert_character(&card, avatar.as_ref(), None),
        };
        let id = match stored {
            Ok(id) => id,
            Err(e) => {
                if let Some((adapter_id, dir)) = installed {
                    let _ = self.store().delete_adapter(adapter_id);
                    let _ = std::fs::remove_dir_all(dir);
                }
                return Err(e.into());
            }
        };
        Ok(ImportOutcome::Imported {
            file: file.to_owned(),
            character: self.store().character(id)?.into(),
            replaced: replace.is_some(),
            changes,
            adapter: carried.map(|c| c.name),
        })
    }

    /// Checks a carried adapter against the installed models, writes its
    /// files and registers it; returns its id and folder.
    fn install_carried_adapter(&self, carried: &CarriedAdapter) -> Result<(i64, PathBuf)> {
        let models = self.list_models()?;
        let mut shapes = Vec::new();
        let mut matching = None;
        for m in &models {
            let Ok(info) = dramatis_llm::inspect_model(Path::new(&m.path)) else {
                continue;
            };
            if carried.base.fits(&info.config) {
                matching = Some((m.clone(), info.config));
                break;
            }
            shapes.push(BaseShape::of(&info.config, &m.name).describe());
        }
        let Some((model, config)) = matching else {
            return Err(Error::Conflict(if shapes.is_empty() {
                format!(
                    "This card carries an adapter made for {}, and no model is installed here. Install that model in Models, then import the card again.",
                    carried.base.describe()
                )
            } else {
                format!(
                    "This card carries an adapter made for {}; the models here are {}, so it would not load. Nothing was imported.",
                    carried.base.describe(),
                    shapes.join(", ")
                )
            }));
        };
        let root = self.data_dir().join("adapters");
        let stamp = format!(
            "imported-{}-{}",
            dramatis_store::now_ms(),
            std::process::id()
        );
        let dir = root.join(&stamp);
        let io = |e: std::io::Error| Error::Io {
            context: format!("cannot write the adapter to {}", dir.display()),
            source: e,
        };
        std::fs::create_dir_all(&dir).map_err(io)?;
        let undo = |e: Error| {
            let _ = std::fs::remove_dir_all(&dir);
            e
        };
        for (name, bytes) in &carried.files {
            crate::write_atomically(&dir.join(name), bytes).map_err(undo)?;
        }
        // Loading it is the check that the files are a real adapter for this base.
        dramatis_llm::LoraAdapter::load_peft(&dir, &config, &dramatis_llm::Device::Cpu).map_err(
            |e| {
                undo(Error::Conflict(format!(
                    "The card's adapter is damaged: {e}. Nothing was imported."
                )))
            },
        )?;
        let id = self
            .store()
            .insert_adapter(&AdapterRow {
                id: 0,
                name: carried.name.clone(),
                run_id: None,
                base_model_id: Some(model.id),
                base_sha256: None,
                path: dir.to_string_lossy().into_owned(),
                recipe: json!({"imported": true, "base": carried.base}).to_string(),
                metrics: "{}".into(),
                created_at: 0,
            })
            .map_err(|e| undo(e.into()))?;
        Ok((id, dir))
    }

    /// A character as a file in `format`: the file's suggested name and bytes.
    pub fn export_character(&self, id: i64, format: CardFormat) -> Result<(String, Vec<u8>)> {
        let c = self.character(id)?;
        let attached = crate::training::attached_adapter(&c.card);
        let mut card = c.card;
        strip_local_ids(&mut card);
        let avatar = self.avatar(id)?;
        let name = format!(
            "{}.{}",
            crate::paths::file_stem(&card.name, true),
            format.extension()
        );
        let bytes = match format {
            CardFormat::JsonV2 => cardfile::json_v2(&card),
            CardFormat::JsonV3 => cardfile::json_v3(&card),
            CardFormat::Png => {
                let image = match &avatar {
                    Some(a) if a.format() == AvatarFormat::Png => a.bytes().to_vec(),
                    Some(a) => {
                        return Err(Error::Conflict(format!(
                            "A PNG card needs a PNG picture and this one is {}; export as CHARX or JSON, or set a PNG picture first.",
                            a.format().mime()
                        )));
                    }
                    None => placeholder_png(&card.name),
                };
                cardfile::write_png(&card, &image).map_err(|e| Error::Conflict(e.message))?
            }
            CardFormat::Charx => {
                let mut extra = Vec::new();
                if let Some(adapter_id) = attached
                    && let Ok(a) = self.store().adapter(adapter_id)
                {
                    let base = self.adapter_base(&a)?;
                    let dir = Path::new(&a.path);
                    for (stem, ext) in
                        [("adapter_config", "json"), ("adapter_model", "safetensors")]
                    {
                        let path = dir.join(format!("{stem}.{ext}"));
                        let bytes = std::fs::read(&path).map_err(|e| Error::Io {
                            context: format!("cannot read {}", path.display()),
                            source: e,
                        })?;
                        extra.push(Asset {
                            kind: ADAPTER_ASSET.into(),
                            name: stem.into(),
                            ext: ext.into(),
                            uri: String::new(),
                            path: format!("assets/{ADAPTER_ASSET}/other/{stem}.{ext}"),
                            bytes,
                        });
                    }
                    let ext = card
                        .extensions
                        .entry(EXT.to_owned())
                        .or_insert_with(|| json!({}));
                    if let Value::Object(o) = ext {
                        o.insert(
                            "adapter".into(),
                            json!({"name": a.name, "format": "peft", "base": base}),
                        );
                    }
                }
                let pic = avatar.as_ref().map(|a| {
                    let ext = match a.format() {
                        AvatarFormat::Png => "png",
                        AvatarFormat::Jpeg => "jpeg",
                        AvatarFormat::Gif => "gif",
                        AvatarFormat::Webp => "webp",
                    };
                    (a.bytes(), ext)
                });
                cardfile::write_charx(&card, pic, &extra).map_err(|e| Error::Conflict(e.message))?
            }
        };
        Ok((name, bytes))
    }

    /// Writes a character to `path` in `format` (atomically).
    pub fn export_character_to(&self, id: i64, format: CardFormat, path: &Path) -> Result<()> {
        let (_, bytes) = self.export_character(id, format)?;
        crate::write_atomically(path, &bytes)
    }

    /// The shape of an adapter's base, from its PEFT config and its base model.
    fn adapter_base(&self, a: &AdapterRow) -> Result<BaseShape> {
        let config_path = Path::new(&a.path).join("adapter_config.json");
        let base_model = std::fs::read(&config_path)
            .ok()
            .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
            .and_then(|v| {
                v.get("base_model_name_or_path")?
                    .as_str()
                    .map(str::to_owned)
            })
            .unwrap_or_default();
        let model_id = a.base_model_id.ok_or_else(|| {
            Error::Conflict("the adapter's base model was deleted, so its shape is unknown".into())
        })?;
        let m = self.model(model_id)?;
        let info = dramatis_llm::inspect_model(Path::new(&m.path))?;
        Ok(BaseShape::of(&info.config, &base_model))
    }
}

fn read_limited(path: &Path) -> std::result::Result<Vec<u8>, String> {
    let meta = std::fs::metadata(path).map_err(|e| format!("This file cannot be read ({e})."))?;
    if !meta.is_file() {
        return Err("This is a folder, not a card file.".into());
    }
    if meta.len() > MAX_IMPORT_BYTES {
        return Err(format!(
            "This file is {} MiB; the most a card file can be is {} MiB.",
            meta.len() >> 20,
            MAX_IMPORT_BYTES >> 20
        ));
    }
    std::fs::read(path).map_err(|e| format!("This file cannot be read ({e})."))
}
