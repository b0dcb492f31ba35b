use rusqlite::{OptionalExtension, Row, params};

use crate::{Error, Result, Store, now_ms};

/// An installed model as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelRow {
    /// Row id (0 before insertion).
    pub id: i64,
    /// Display name.
    pub name: String,
    /// `catalog`, `import` or `quantized`.
    pub source: String,
    /// The catalog entry it came from.
    pub catalog_id: Option<String>,
    /// `gguf` or `safetensors`.
    pub format: String,
    /// `Q4_K_M`, `F16`...
    pub quantization: String,
    /// The .gguf file or the safetensors folder.
    pub path: String,
    /// Its tokenizer.json.
    pub tokenizer_path: String,
    /// Bytes of weights.
    pub size_bytes: u64,
    /// sha256 of a one-file model.
    pub sha256: Option<String>,
    /// Every file that belongs to it (for delete).
    pub files: Vec<String>,
    /// When it was registered (ms since the epoch).
    pub added_at: i64,
}

const COLUMNS: &str = "id, name, source, catalog_id, format, quantization, path, tokenizer_path, size_bytes, sha256, files, added_at";

fn from_row(r: &Row<'_>) -> rusqlite::Result<ModelRow> {
    let files: String = r.get(10)?;
    Ok(ModelRow {
        id: r.get(0)?,
        name: r.get(1)?,
        source: r.get(2)?,
        catalog_id: r.get(3)?,
        format: r.get(4)?,
        quantization: r.get(5)?,
        path: r.get(6)?,
        tokenizer_path: r.get(7)?,
        size_bytes: r.get::<_, i64>(8)? as u64,
        sha256: r.get(9)?,
        files: serde_json::from_str(&files).unwrap_or_default(),
        added_at: r.get(11)?,
    })
}

impl Store {
    /// Registers a model, replacing an earlier registration of the same
    /// path or catalog entry. Returns its id.
    pub fn upsert_model(&self, m: &ModelRow) -> Result<i64> {
        self.write(|tx| {
            tx.execute(
                "DELETE FROM models WHERE path = ?1 OR (catalog_id IS NOT NULL AND catalog_id = ?2)",
                params![m.path, m.catalog_id],
            )?;
            tx.execute(
                "INSERT INTO models (name, source, catalog_id, format, quantization, path,
                                     tokenizer_path, size_bytes, sha256, files, added_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
                params![
                    m.name,
                    m.source,
                    m.catalog_id,
                    m.format,
                    m.quantization,
                    m.path,
                    m.tokenizer_path,
                    m.size_bytes as i64,
                    m.sha256,
                    serde_json::to_string(&m.files).expect("strings serialize"),
                    now_ms(),
                ],
            )?;
            Ok(tx.last_insert_rowid())
        })
    }

    /// Every installed model, oldest first.
    pub fn list_models(&self) -> Result<Vec<ModelRow>> {
        let conn = self.conn();
        let mut st = conn.prepare(&format!("SELECT {COLUMNS} FROM models ORDER BY id"))?;
        let rows = st
            .query_map([], from_row)?
            .collect::<rusqlite::Result<_>>()?;
        Ok(rows)
    }

    /// One model.
    pub fn model(&self, id: i64) -> Result<ModelRow> {
        self.conn()
            .query_row(
                &format!("SELECT {COLUMNS} FROM models WHERE id = ?1"),
                [id],
                from_row,
            )
            .optional()?
            .ok_or(Error::NotFound { what: "model", id })
    }

    /// Forgets a model (its files are the caller's business).
    pub fn delete_model(&self, id: i64) -> Result<()> {
        self.write(|tx| {
            if tx.execute("DELETE FROM models WHERE id = ?1", [id])? == 0 {
                return Err(Error::NotFound { what: "model", id });
            }
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(path: &str, catalog: Option<&str>) -> ModelRow {
        ModelRow {
            id: 0,
            name: "Phi-2".into(),
            source: if catalog.is_some() {
                "catalog"
            } else {
                "import"
            }
            .into(),
            catalog_id: catalog.map(Into::into),
            format: "gguf".into(),
            quantization: "Q4_K_M".into(),
            path: path.into(),
            tokenizer_path: "/t/tokenizer.json".into(),
            size_bytes: 1_789_000_000,
            sha256: Some("ab".repeat(32)),
            files: vec![path.into(), "/t/tokenizer.json".into()],
            added_at: 0,
        }
    }

    #[test]
    fn models_register_replace_and_delete() {
        let s = Store::open_in_memory().unwrap();
        let a = s
            .upsert_model(&row("/m/a.gguf", Some("phi-2-q4_k_m")))
            .unwrap();
        let b = s.upsert_model(&row("/m/b.gguf", None)).unwrap();
        assert_eq!(s.list_models().unwrap().len(), 2);
        let got = s.model(a).unwrap();
        assert_eq!(got.files, ["/m/a.gguf", "/t/tokenizer.json"]);
        assert_eq!(got.size_bytes, 1_789_000_000);
        // Re-downloading the same catalog entry replaces its row.
        let a2 = s
            .upsert_model(&row("/m/a2.gguf", Some("phi-2-q4_k_m")))
            .unwrap();
        let all = s.list_models().unwrap();
        assert_eq!(all.len(), 2);
        assert!(all.iter().all(|m| m.id != a));
        s.delete_model(b).unwrap();
        assert!(matches!(s.delete_model(b), Err(Error::NotFound { .. })));
        assert_eq!(s.list_models().unwrap()[0].id, a2);
    }
}
