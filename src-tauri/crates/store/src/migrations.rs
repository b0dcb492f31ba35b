//! Versioned schema changes. Append only: a released step is never edited,
//! a new one is added after it.

use rusqlite::Connection;

use crate::Result;

/// The schema version this build writes.
pub const SCHEMA_VERSION: u32 = STEPS.len() as u32;

/// Step `i` takes the schema from version `i` to `i + 1`.
const STEPS: &[&str] = &[
    // 1: characters, personas, chats, the message tree, settings.
    r#"
    CREATE TABLE characters (
        id           INTEGER PRIMARY KEY,
        name         TEXT NOT NULL,
        name_folded  TEXT NOT NULL,
        card         TEXT NOT NULL,    -- Character Card V2 `data`, JSON
        avatar       BLOB,
        avatar_mime  TEXT,
        builtin_key  TEXT UNIQUE,      -- set on the characters shipped with the app
        created_at   INTEGER NOT NULL,
        updated_at   INTEGER NOT NULL,
        CHECK ((avatar IS NULL) = (avatar_mime IS NULL))
    );
    CREATE INDEX characters_by_name ON characters(name_folded);
    CREATE TABLE character_tags (
        character_id INTEGER NOT NULL REFERENCES characters(id) ON DELETE CASCADE,
        tag          TEXT NOT NULL,
        tag_folded   TEXT NOT NULL,
        position     INTEGER NOT NULL,
        PRIMARY KEY (character_id, tag_folded)
    );
    CREATE INDEX character_tags_by_tag ON character_tags(tag_folded);
    CREATE TABLE personas (
        id          INTEGER PRIMARY KEY,
        name        TEXT NOT NULL,
        description TEXT NOT NULL,
        is_default  INTEGER NOT NULL DEFAULT 0 CHECK (is_default IN (0, 1)),
        created_at  INTEGER NOT NULL,
        updated_at  INTEGER NOT NULL
    );
    CREATE UNIQUE INDEX personas_one_default ON personas(is_default) WHERE is_default = 1;
    CREATE TABLE chats (
        id               INTEGER PRIMARY KEY,
        character_id     INTEGER NOT NULL REFERENCES characters(id) ON DELETE CASCADE,
        persona_id       INTEGER REFERENCES personas(id) ON DELETE SET NULL,
        title            TEXT NOT NULL,
        selected_root_id INTEGER REFERENCES messages(id) ON DELETE SET NULL,
        created_at       INTEGER NOT NULL,
        updated_at       INTEGER NOT NULL
    );
    CREATE INDEX chats_by_character ON chats(character_id, updated_at);
    CREATE TABLE messages (
        id                INTEGER PRIMARY KEY,
        chat_id           INTEGER NOT NULL REFERENCES chats(id) ON DELETE CASCADE,
        parent_id         INTEGER REFERENCES messages(id) ON DELETE CASCADE,
        selected_child_id INTEGER REFERENCES messages(id) ON DELETE SET NULL,
        role              TEXT NOT NULL CHECK (role IN ('system', 'user', 'assistant')),
        content           TEXT NOT NULL,
        created_at        INTEGER NOT NULL,
        updated_at        INTEGER NOT NULL
    );
    CREATE INDEX messages_by_parent ON messages(chat_id, parent_id);
    CREATE TABLE settings (
        key   TEXT PRIMARY KEY,
        value TEXT NOT NULL           -- JSON
    );
    "#,
    // 2: full-text search over messages, kept in step by triggers.
    r#"
    CREATE VIRTUAL TABLE messages_fts USING fts5(
        content, content = 'messages', content_rowid = 'id', tokenize = 'unicode61 remove_diacritics 2'
    );
    INSERT INTO messages_fts(rowid, content) SELECT id, content FROM messages;
    CREATE TRIGGER messages_fts_insert AFTER INSERT ON messages BEGIN
        INSERT INTO messages_fts(rowid, content) VALUES (new.id, new.content);
    END;
    CREATE TRIGGER messages_fts_delete AFTER DELETE ON messages BEGIN
        INSERT INTO messages_fts(messages_fts, rowid, content) VALUES ('delete', old.id, old.content);
    END;
    CREATE TRIGGER messages_fts_update AFTER UPDATE OF content ON messages BEGIN
        INSERT INTO messages_fts(messages_fts, rowid, content) VALUES ('delete', old.id, old.content);
        INSERT INTO messages_fts(rowid, content) VALUES (new.id, new.content);
    END;
    "#,
    // 3: installed models (downloaded from the catalog, imported, or quantized here).
    r#"
    CREATE TABLE models (
        id             INTEGER PRIMARY KEY,
        name           TEXT NOT NULL,
        source         TEXT NOT NULL CHECK (source IN ('catalog', 'import', 'quantized')),
        catalog_id     TEXT UNIQUE,
        format         TEXT NOT NULL CHECK (format IN ('gguf', 'safetensors')),
        quantization   TEXT NOT NULL,
        path           TEXT NOT NULL UNIQUE,  -- the .gguf file or the safetensors folder
        tokenizer_path TEXT NOT NULL,
        size_bytes     INTEGER NOT NULL,
        sha256         TEXT,                  -- of the weights file, when one file
        files          TEXT NOT NULL,         -- JSON: every file that belongs to the model
        added_at       INTEGER NOT NULL
    );
    "#,
    // 4: per-chat generation settings (JSON; NULL means the defaults).
    r#"
    ALTER TABLE chats ADD COLUMN settings TEXT;
    "#,
    // 5: fine-tuning runs and the adapters they produce.
    r#"
    CREATE TABLE training_runs (
        id           INTEGER PRIMARY KEY,
        name         TEXT NOT NULL,
        model_id     INTEGER REFERENCES models(id) ON DELETE SET NULL,
        character_id INTEGER REFERENCES characters(id) ON DELETE SET NULL,
        request      TEXT NOT NULL,            -- JSON: base, data source, every setting
        dir          TEXT NOT NULL,            -- checkpoints
        status       TEXT NOT NULL CHECK (status IN ('running', 'stopped', 'finished', 'failed')),
        step         INTEGER NOT NULL DEFAULT 0,
        total_steps  INTEGER NOT NULL DEFAULT 0,
        metrics      TEXT NOT NULL DEFAULT '[]', -- JSON: [{step, loss, eval_loss}]
        error        TEXT,
        created_at   INTEGER NOT NULL,
        updated_at   INTEGER NOT NULL
    );
    CREATE TABLE adapters (
        id            INTEGER PRIMARY KEY,
        name          TEXT NOT NULL,
        run_id        INTEGER REFERENCES training_runs(id) ON DELETE SET NULL,
        base_model_id INTEGER REFERENCES models(id) ON DELETE SET NULL,
        base_sha256   TEXT,
        path          TEXT NOT NULL,           -- the PEFT folder
        recipe        TEXT NOT NULL,           -- JSON
        metrics       TEXT NOT NULL,           -- JSON
        created_at    INTEGER NOT NULL
    );
    "#,
    // 6: the prompt behind each reply (the inspector), and the memory of
    // what left a chat's window: one summary per covered message, so a
    // branch uses only summaries of messages on its own path.
    r#"
    CREATE TABLE reply_prompts (
        message_id INTEGER PRIMARY KEY REFERENCES messages(id) ON DELETE CASCADE,
        prompt     TEXT NOT NULL,
        info       TEXT NOT NULL            -- JSON: sections, window, reuse counts
    );
    CREATE TABLE chat_memories (
        id          INTEGER PRIMARY KEY,
        chat_id     INTEGER NOT NULL REFERENCES chats(id) ON DELETE CASCADE,
        up_to_id    INTEGER NOT NULL UNIQUE REFERENCES messages(id) ON DELETE CASCADE,
        text        TEXT NOT NULL,
        edited      INTEGER NOT NULL DEFAULT 0 CHECK (edited IN (0, 1)),
        created_at  INTEGER NOT NULL,
        updated_at  INTEGER NOT NULL
    );
    CREATE INDEX chat_memories_by_chat ON chat_memories(chat_id);
    "#,
    // 7: lorebooks (world info) of their own, and where each applies: to
    // every chat (no character, no chat), to a character's chats, or to one chat.
    r#"
    CREATE TABLE lorebooks (
        id          INTEGER PRIMARY KEY,
        name        TEXT NOT NULL,
        book        TEXT NOT NULL,       -- JSON: dramatis_persona::lorebook::Lorebook
        created_at  INTEGER NOT NULL,
        updated_at  INTEGER NOT NULL
    );
    CREATE TABLE lorebook_links (
        lorebook_id  INTEGER NOT NULL REFERENCES lorebooks(id) ON DELETE CASCADE,
        character_id INTEGER REFERENCES characters(id) ON DELETE CASCADE,
        chat_id      INTEGER REFERENCES chats(id) ON DELETE CASCADE,
        CHECK (character_id IS NULL OR chat_id IS NULL)
    );
    CREATE UNIQUE INDEX lorebook_links_once
        ON lorebook_links(lorebook_id, IFNULL(character_id, 0), IFNULL(chat_id, 0));
    CREATE INDEX lorebook_links_by_character ON lorebook_links(character_id);
    CREATE INDEX lorebook_links_by_chat ON lorebook_links(chat_id);
    "#,
    // 8: what preference pairs need beyond the tree: the text a reply had
    // before the user rewrote it (in place, or as a fork: `source_id`), and
    // the pairs and chats the user left out of training.
    r#"
    CREATE TABLE message_edits (
        message_id  INTEGER PRIMARY KEY REFERENCES messages(id) ON DELETE CASCADE,
        source_id   INTEGER REFERENCES messages(id) ON DELETE SET NULL,
        original    TEXT NOT NULL,
        created_at  INTEGER NOT NULL
    );
    CREATE TABLE preference_exclusions (
        chosen_id   INTEGER NOT NULL REFERENCES messages(id) ON DELETE CASCADE,
        rejected_id INTEGER NOT NULL REFERENCES messages(id) ON DELETE CASCADE,
        PRIMARY KEY (chosen_id, rejected_id)
    );
    ALTER TABLE chats ADD COLUMN prefs_excluded INTEGER NOT NULL DEFAULT 0 CHECK (prefs_excluded IN (0, 1));
    "#,
    // 9: preference pairs imported from a file (TRL's prompt/chosen/rejected
    // JSONL) for a character: not in any chat, so stored as rows.
    r#"
    CREATE TABLE imported_pairs (
        id           INTEGER PRIMARY KEY,
        character_id INTEGER NOT NULL REFERENCES characters(id) ON DELETE CASCADE,
        prompt       TEXT NOT NULL,
        chosen       TEXT NOT NULL,
        rejected     TEXT NOT NULL,
        source       TEXT NOT NULL,    -- the file's name
        excluded     INTEGER NOT NULL DEFAULT 0 CHECK (excluded IN (0, 1)),
        created_at   INTEGER NOT NULL
    );
    CREATE UNIQUE INDEX imported_pairs_once ON imported_pairs(character_id, prompt, chosen, rejected);
    "#,
];

/// Brings the schema up to `target`, one transaction per step.
pub(crate) fn migrate(conn: &mut Connection, target: u32) -> Result<()> {
    let current: u32 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    for (i, sql) in STEPS
        .iter()
        .enumerate()
        .take(target as usize)
        .skip(current as usize)
    {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", i as i64 + 1)?;
        tx.commit()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Store;

    /// Where the committed v1 database lives.
    fn v1_fixture() -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/v1.db")
    }

    /// Writes tests/fixtures/v1.db: a schema-1 database with a character, a
    /// persona, a setting and a chat of three messages. Run by hand with
    /// `cargo test -p dramatis-store -- --ignored write_v1_fixture`.
    #[test]
    #[ignore = "writes the committed fixture"]
    fn write_v1_fixture() {
        let path = v1_fixture();
        let _ = std::fs::remove_file(&path);
        let mut conn = Connection::open(&path).unwrap();
        migrate(&mut conn, 1).unwrap();
        conn.pragma_update(None, "application_id", crate::APPLICATION_ID)
            .unwrap();
        conn.execute_batch(
            r#"
            INSERT INTO characters (id, name, name_folded, card, created_at, updated_at) VALUES
              (1, 'Old Lighthouse Keeper', 'old lighthouse keeper',
               '{"name":"Old Lighthouse Keeper","description":"Keeps the lamp lit. Ça va.","tags":["Maritime"],"extensions":{"other_app":{"mood":"salty"}}}',
               1700000000000, 1700000000000);
            INSERT INTO character_tags VALUES (1, 'Maritime', 'maritime', 0);
            INSERT INTO personas (id, name, description, is_default, created_at, updated_at)
              VALUES (1, 'Wren', 'A curious traveller', 1, 1700000000000, 1700000000000);
            INSERT INTO settings VALUES ('theme', '"dark"');
            INSERT INTO chats (id, character_id, persona_id, title, created_at, updated_at)
              VALUES (1, 1, 1, 'Storm night', 1700000000000, 1700000000000);
            INSERT INTO messages (id, chat_id, parent_id, role, content, created_at, updated_at) VALUES
              (1, 1, NULL, 'assistant', 'The fog horn groans across the bay.', 1700000000000, 1700000000000),
              (2, 1, 1, 'user', 'Is the lamp still burning?', 1700000000001, 1700000000001),
              (3, 1, 2, 'assistant', 'Aye, it has not gone dark in forty winters.', 1700000000002, 1700000000002);
            UPDATE chats SET selected_root_id = 1 WHERE id = 1;
            UPDATE messages SET selected_child_id = 2 WHERE id = 1;
            UPDATE messages SET selected_child_id = 3 WHERE id = 2;
            "#,
        )
        .unwrap();
        conn.pragma_update(None, "journal_mode", "DELETE").unwrap();
    }

    #[test]
    fn committed_v1_database_migrates_and_keeps_its_rows() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.db");
        std::fs::copy(v1_fixture(), &path).unwrap();
        let version: u32 = Connection::open(&path)
            .unwrap()
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(version, 1, "the fixture is a schema-1 database");

        let store = Store::open(&path).unwrap();
        assert_eq!(store.schema_version().unwrap(), SCHEMA_VERSION);
        store.integrity_check().unwrap();
        let c = store.character(1).unwrap();
        assert_eq!(c.card.name, "Old Lighthouse Keeper");
        assert_eq!(c.card.description, "Keeps the lamp lit. Ça va.");
        assert_eq!(c.card.extensions["other_app"]["mood"], "salty");
        assert_eq!(c.card.tags, ["Maritime"]);
        let path_msgs = store.selected_path(1).unwrap();
        assert_eq!(path_msgs.len(), 3);
        // Step 2 indexed the messages that were already there.
        let hits = store.search_messages("burning", 10).unwrap();
        assert_eq!(hits.len(), 1);
        assert_eq!(hits[0].message_id, 2);
        assert_eq!(store.default_persona().unwrap().name, "Wren");
        let theme: Option<String> = store.setting("theme").unwrap();
        assert_eq!(theme.as_deref(), Some("dark"));
    }

    #[test]
    fn a_newer_database_is_refused_and_left_byte_for_byte() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("future.db");
        drop(Store::open(&path).unwrap());
        {
            let conn = Connection::open(&path).unwrap();
            conn.pragma_update(None, "user_version", SCHEMA_VERSION + 5)
                .unwrap();
            conn.pragma_update(None, "journal_mode", "DELETE").unwrap();
        }
        let before = std::fs::read(&path).unwrap();
        let err = Store::open(&path).unwrap_err();
        assert!(
            matches!(err, crate::Error::TooNew { found, .. } if found == i64::from(SCHEMA_VERSION + 5))
        );
        let msg = err.to_string();
        assert!(msg.contains("newer version of Dramatis"), "{msg}");
        assert!(msg.contains("not changed"), "{msg}");
        assert_eq!(std::fs::read(&path).unwrap(), before);
        assert!(!path.with_extension("db-wal").exists());
    }
}
