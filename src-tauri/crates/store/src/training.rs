use rusqlite::{OptionalExtension, Row, params};

use crate::{Error, Result, Store, now_ms};

/// A fine-tuning run as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunRow {
    /// Id.
    pub id: i64,
    /// Display name.
    pub name: String,
    /// The base model.
    pub model_id: Option<i64>,
    /// The character it is for.
    pub character_id: Option<i64>,
    /// JSON: everything needed to start or resume it.
    pub request: String,
    /// Its checkpoint folder.
    pub dir: String,
    /// `running`, `stopped`, `finished` or `failed`.
    pub status: String,
    /// Steps done.
    pub step: i64,
    /// Steps in all.
    pub total_steps: i64,
    /// JSON: the loss curve.
    pub metrics: String,
    /// Why it failed.
    pub error: Option<String>,
    /// ms since the epoch.
    pub created_at: i64,
    /// ms since the epoch.
    pub updated_at: i64,
}

/// An adapter as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdapterRow {
    /// Id.
    pub id: i64,
    /// Display name.
    pub name: String,
    /// The run that made it.
    pub run_id: Option<i64>,
    /// The base it was trained on.
    pub base_model_id: Option<i64>,
    /// The base's sha256, when known.
    pub base_sha256: Option<String>,
    /// Its PEFT folder.
    pub path: String,
    /// JSON: the settings.
    pub recipe: String,
    /// JSON: final losses.
    pub metrics: String,
    /// ms since the epoch.
    pub created_at: i64,
}

const RUN_COLS: &str = "id, name, model_id, character_id, request, dir, status, step, total_steps, metrics, error, created_at, updated_at";
const ADAPTER_COLS: &str =
    "id, name, run_id, base_model_id, base_sha256, path, recipe, metrics, created_at";

fn run_row(r: &Row<'_>) -> rusqlite::Result<RunRow> {
    Ok(RunRow {
        id: r.get(0)?,
        name: r.get(1)?,
        model_id: r.get(2)?,
        character_id: r.get(3)?,
        request: r.get(4)?,
        dir: r.get(5)?,
        status: r.get(6)?,
        step: r.get(7)?,
        total_steps: r.get(8)?,
        metrics: r.get(9)?,
        error: r.get(10)?,
        created_at: r.get(11)?,
        updated_at: r.get(12)?,
    })
}

fn adapter_row(r: &Row<'_>) -> rusqlite::Result<AdapterRow> {
    Ok(AdapterRow {
        id: r.get(0)?,
        name: r.get(1)?,
        run_id: r.get(2)?,
        base_model_id: r.get(3)?,
        base_sha256: r.get(4)?,
        path: r.get(5)?,
        recipe: r.get(6)?,
        metrics: r.get(7)?,
        created_at: r.get(8)?,
    })
}

impl Store {
    /// Records a new run (status `running`); `dir` may name the id as `{id}`.
    pub fn insert_run(
        &self,
        name: &str,
        model_id: i64,
        character_id: Option<i64>,
        request: &str,
        dir: &str,
    ) -> Result<i64> {
        self.write(|tx| {
            let now = now_ms();
            tx.execute(
                "INSERT INTO training_runs (name, model_id, character_id, request, dir, status, created_at, updated_at)
                 VALUES (?1, ?2, ?3, ?4, '', 'running', ?5, ?5)",
                params![name, model_id, character_id, request, now],
            )?;
            let id = tx.last_insert_rowid();
            tx.execute(
                "UPDATE training_runs SET dir = ?2 WHERE id = ?1",
                params![id, dir.replace("{id}", &id.to_string())],
            )?;
            Ok(id)
        })
    }

    /// Updates a run's progress and status.
    pub fn update_run(
        &self,
        id: i64,
        status: &str,
        step: usize,
        total: usize,
        metrics: &str,
        error: Option<&str>,
    ) -> Result<()> {
        self.write(|tx| {
            match tx.execute(
                "UPDATE training_runs SET status = ?2, step = ?3, total_steps = ?4, metrics = ?5, error = ?6, updated_at = ?7 WHERE id = ?1",
                params![id, status, step as i64, total as i64, metrics, error, now_ms()],
            )? {
                0 => Err(Error::NotFound { what: "training run", id }),
                _ => Ok(()),
            }
        })
    }

    /// One run.
    pub fn run(&self, id: i64) -> Result<RunRow> {
        self.conn()
            .query_row(
                &format!("SELECT {RUN_COLS} FROM training_runs WHERE id = ?1"),
                [id],
                run_row,
            )
            .optional()?
            .ok_or(Error::NotFound {
                what: "training run",
                id,
            })
    }

    /// Every run, newest first.
    pub fn list_runs(&self) -> Result<Vec<RunRow>> {
        let conn = self.conn();
        let mut st = conn.prepare(&format!(
            "SELECT {RUN_COLS} FROM training_runs ORDER BY id DESC"
        ))?;
        let rows = st
            .query_map([], run_row)?
            .collect::<rusqlite::Result<_>>()?;
        Ok(rows)
    }

    /// Deletes a run's record.
    pub fn delete_run(&self, id: i64) -> Result<()> {
        self.write(
            |tx| match tx.execute("DELETE FROM training_runs WHERE id = ?1", [id])? {
                0 => Err(Error::NotFound {
                    what: "training run",
                    id,
                }),
                _ => Ok(()),
            },
        )
    }

    /// Registers an adapter.
    pub fn insert_adapter(&self, a: &AdapterRow) -> Result<i64> {
        self.write(|tx| {
            tx.execute(
                "INSERT INTO adapters (name, run_id, base_model_id, base_sha256, path, recipe, metrics, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                params![a.name, a.run_id, a.base_model_id, a.base_sha256, a.path, a.recipe, a.metrics, now_ms()],
            )?;
            Ok(tx.last_insert_rowid())
        })
    }

    /// One adapter.
    pub fn adapter(&self, id: i64) -> Result<AdapterRow> {
        self.conn()
            .query_row(
                &format!("SELECT {ADAPTER_COLS} FROM adapters WHERE id = ?1"),
                [id],
                adapter_row,
            )
            .optional()?
            .ok_or(Error::NotFound {
                what: "adapter",
                id,
            })
    }

    /// Every adapter, newest first.
    pub fn list_adapters(&self) -> Result<Vec<AdapterRow>> {
        let conn = self.conn();
        let mut st = conn.prepare(&format!(
            "SELECT {ADAPTER_COLS} FROM adapters ORDER BY id DESC"
        ))?;
        let rows = st
            .query_map([], adapter_row)?
            .collect::<rusqlite::Result<_>>()?;
        Ok(rows)
    }

    /// Forgets an adapter.
    pub fn delete_adapter(&self, id: i64) -> Result<()> {
        self.write(
            |tx| match tx.execute("DELETE FROM adapters WHERE id = ?1", [id])? {
                0 => Err(Error::NotFound {
                    what: "adapter",
                    id,
                }),
                _ => Ok(()),
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_and_adapters_round_trip() {
        let s = Store::open_in_memory().unwrap();
        let m = s
            .upsert_model(&crate::ModelRow {
                id: 0,
                name: "m".into(),
                source: "import".into(),
                catalog_id: None,
                format: "gguf".into(),
                quantization: "Q8_0".into(),
                path: "/m.gguf".into(),
                tokenizer_path: "/t.json".into(),
                size_bytes: 1,
                sha256: None,
                files: vec![],
                added_at: 0,
            })
            .unwrap();
        let r = s.insert_run("Run", m, None, "{}", "/runs/{id}").unwrap();
        let row = s.run(r).unwrap();
        assert_eq!(row.dir, format!("/runs/{r}"));
        assert_eq!(row.status, "running");
        s.update_run(r, "stopped", 3, 10, "[1]", None).unwrap();
        let row = s.run(r).unwrap();
        assert_eq!(
            (row.status.as_str(), row.step, row.total_steps),
            ("stopped", 3, 10)
        );
        let a = s
            .insert_adapter(&AdapterRow {
                id: 0,
                name: "A".into(),
                run_id: Some(r),
                base_model_id: Some(m),
                base_sha256: None,
                path: "/a".into(),
                recipe: "{}".into(),
                metrics: "{}".into(),
                created_at: 0,
            })
            .unwrap();
        assert_eq!(s.adapter(a).unwrap().run_id, Some(r));
        s.delete_model(m).unwrap();
        assert_eq!(s.adapter(a).unwrap().base_model_id, None);
        assert_eq!(s.list_runs().unwrap().len(), 1);
        s.delete_adapter(a).unwrap();
        assert!(s.list_adapters().unwrap().is_empty());
    }
}
