use rusqlite::{OptionalExtension, params};
use serde::{Serialize, de::DeserializeOwned};

use crate::{Error, Result, Store};

impl Store {
    /// A setting's value, or `None` when it was never set.
    pub fn setting<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>> {
        let raw: Option<String> = self
            .conn()
            .query_row("SELECT value FROM settings WHERE key = ?1", [key], |r| {
                r.get(0)
            })
            .optional()?;
        raw.map(|s| {
            serde_json::from_str(&s)
                .map_err(|e| Error::Corrupt(format!("setting `{key}` cannot be read: {e}")))
        })
        .transpose()
    }

    /// Sets a setting (stored as JSON).
    pub fn set_setting<T: Serialize + ?Sized>(&self, key: &str, value: &T) -> Result<()> {
        let json = serde_json::to_string(value)
            .map_err(|e| Error::Corrupt(format!("setting `{key}` cannot be encoded: {e}")))?;
        self.write(|tx| {
            tx.execute(
                "INSERT INTO settings (key, value) VALUES (?1, ?2)
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                params![key, json],
            )?;
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use crate::Store;

    #[test]
    fn settings_round_trip_as_json() {
        let store = Store::open_in_memory().unwrap();
        assert_eq!(store.setting::<u32>("missing").unwrap(), None);
        store.set_setting("n", &3u32).unwrap();
        store.set_setting("n", &4u32).unwrap();
        assert_eq!(store.setting::<u32>("n").unwrap(), Some(4));
        store.set_setting("names", &["a", "b"]).unwrap();
        assert_eq!(
            store.setting::<Vec<String>>("names").unwrap().unwrap(),
            ["a", "b"]
        );
        assert!(
            store.setting::<u32>("names").is_err(),
            "a wrong type is an error, not a panic"
        );
    }
}
