//! The catalog of models and datasets Dramatis offers to download. It is
//! data, `assets/catalog.json`, compiled in; [`Catalog::from_json`] reads
//! another one (a mirror's, or a test's).

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// The catalog shipped with the app.
const BUILTIN: &str = include_str!("../../../../assets/catalog.json");

/// Whether a repository holds a model or a dataset (the hub's URLs differ).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum RepoType {
    /// `https://huggingface.co/<repo>`.
    #[default]
    Model,
    /// `https://huggingface.co/datasets/<repo>`.
    Dataset,
}

/// One file in a hub repository, at a revision (branch, tag or commit).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct RemoteFile {
    /// `owner/name`.
    pub repo: String,
    /// Model or dataset repository.
    #[serde(default)]
    pub repo_type: RepoType,
    /// Branch, tag or 40-hex commit.
    pub revision: String,
    /// Path inside the repository.
    pub path: String,
}

impl RemoteFile {
    /// A file of a model repository on `main`.
    pub fn model(repo: &str, path: &str) -> Self {
        Self {
            repo: repo.into(),
            repo_type: RepoType::Model,
            revision: "main".into(),
            path: path.into(),
        }
    }

    pub(crate) fn hf_repo(&self) -> hf_hub::Repo {
        let t = match self.repo_type {
            RepoType::Model => hf_hub::RepoType::Model,
            RepoType::Dataset => hf_hub::RepoType::Dataset,
        };
        hf_hub::Repo::with_revision(self.repo.clone(), t, self.revision.clone())
    }

    /// `repo/path`, for messages.
    pub fn display(&self) -> String {
        format!("{}/{}", self.repo, self.path)
    }
}

/// How a model's weights are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WeightFormat {
    /// One llama.cpp GGUF file.
    Gguf,
    /// A Hugging Face folder: config.json and safetensors shards.
    Safetensors,
}

/// A model the catalog offers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CatalogModel {
    /// Stable id (`phi-2-q4_k_m`), used by the CLI and the database.
    pub id: String,
    /// Display name.
    pub name: String,
    /// One or two sentences for the Models view.
    pub description: String,
    /// The one offered on first run.
    #[serde(default)]
    pub default: bool,
    /// GGUF or safetensors.
    pub format: WeightFormat,
    /// `Q4_K_M`, `Q8_0`, `F16`...
    pub quantization: String,
    /// Download size as listed (the hub's own size is used to download).
    pub approx_bytes: u64,
    /// The weight files (for safetensors, config and index too).
    pub files: Vec<RemoteFile>,
    /// Phi-2's tokenizer.json.
    pub tokenizer: RemoteFile,
}

impl CatalogModel {
    /// Every file to fetch: the weights, then the tokenizer.
    pub fn all_files(&self) -> Vec<RemoteFile> {
        let mut v = self.files.clone();
        if !v.contains(&self.tokenizer) {
            v.push(self.tokenizer.clone());
        }
        v
    }
}

/// A dataset the catalog offers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CatalogDataset {
    /// Stable id (`roleplay`).
    pub id: String,
    /// Display name.
    pub name: String,
    /// One or two sentences.
    pub description: String,
    /// Download size as listed.
    pub approx_bytes: u64,
    /// Row count as listed.
    pub approx_rows: u64,
    /// The column holding the training text.
    pub text_column: String,
    /// The data files.
    pub files: Vec<RemoteFile>,
}

/// Everything downloadable.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Catalog {
    /// Format version of the catalog file.
    pub version: u32,
    /// Models, the default first.
    pub models: Vec<CatalogModel>,
    /// Datasets.
    pub datasets: Vec<CatalogDataset>,
}

impl Catalog {
    /// The catalog compiled into this build.
    pub fn builtin() -> Self {
        Self::from_json(BUILTIN).expect("assets/catalog.json is checked by the tests")
    }

    /// Reads and checks a catalog file's text.
    pub fn from_json(text: &str) -> Result<Self> {
        let c: Self = serde_json::from_str(text).map_err(|e| Error::Catalog(e.to_string()))?;
        if c.version != 1 {
            return Err(Error::Catalog(format!("unsupported version {}", c.version)));
        }
        if c.models.iter().filter(|m| m.default).count() != 1 {
            return Err(Error::Catalog(
                "exactly one model must be the default".into(),
            ));
        }
        let mut ids: Vec<&str> = c.models.iter().map(|m| m.id.as_str()).collect();
        ids.extend(c.datasets.iter().map(|d| d.id.as_str()));
        let n = ids.len();
        ids.sort_unstable();
        ids.dedup();
        if ids.len() != n {
            return Err(Error::Catalog("ids must be unique".into()));
        }
        for m in &c.models {
            if m.files.is_empty() {
                return Err(Error::Catalog(format!("model `{}` lists no files", m.id)));
            }
        }
        Ok(c)
    }

    /// The model offered on first run.
    pub fn default_model(&self) -> &CatalogModel {
        self.models
            .iter()
            .find(|m| m.default)
            .expect("checked on load")
    }

    /// A model by id.
    pub fn model(&self, id: &str) -> Result<&CatalogModel> {
        self.models
            .iter()
            .find(|m| m.id == id)
            .ok_or_else(|| Error::UnknownEntry(id.into()))
    }

    /// A dataset by id.
    pub fn dataset(&self, id: &str) -> Result<&CatalogDataset> {
        self.datasets
            .iter()
            .find(|d| d.id == id)
            .ok_or_else(|| Error::UnknownEntry(id.into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_catalog_reads_and_names_phi2_and_the_dataset() {
        let c = Catalog::builtin();
        let d = c.default_model();
        assert_eq!(d.id, "phi-2-q4_k_m");
        assert_eq!(d.files[0].repo, "TheBloke/phi-2-GGUF");
        assert_eq!(d.tokenizer.repo, "microsoft/phi-2");
        assert!(c.model("phi-2-q8_0").is_ok());
        let st = c.model("phi-2").unwrap();
        assert_eq!(st.format, WeightFormat::Safetensors);
        assert_eq!(st.all_files().len(), 5);
        let ds = c.dataset("roleplay").unwrap();
        assert_eq!(ds.files[0].repo_type, RepoType::Dataset);
        assert_eq!(ds.files[0].path, "data/train-00000-of-00001.parquet");
        assert!(matches!(c.model("nope"), Err(Error::UnknownEntry(_))));
    }

    #[test]
    fn bad_catalogs_are_refused() {
        let good = Catalog::builtin();
        let mut two_defaults = good.clone();
        two_defaults.models[1].default = true;
        let text = serde_json::to_string(&two_defaults).unwrap();
        assert!(
            Catalog::from_json(&text)
                .unwrap_err()
                .to_string()
                .contains("default")
        );
        let mut dup = good.clone();
        dup.models[1].id = dup.models[0].id.clone();
        let text = serde_json::to_string(&dup).unwrap();
        assert!(
            Catalog::from_json(&text)
                .unwrap_err()
                .to_string()
                .contains("unique")
        );
        assert!(Catalog::from_json("{").is_err());
    }
}
