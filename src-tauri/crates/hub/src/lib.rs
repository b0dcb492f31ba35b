//! Getting Phi-2 and the role-play dataset onto the user's machine: the
//! catalog (`assets/catalog.json`), downloads into the shared Hugging Face
//! cache, and reading datasets (parquet, JSONL, CSV).
//!
//! Invariants: a file counts as present only when its contents hash to the
//! ETag the hub reported; files already in the cache are found without a
//! request; the token never appears in an error, a log line or a `Debug`.

mod cache;
mod catalog;
pub mod dataset;
mod download;
mod error;

pub use cache::HubCache;
pub use catalog::{Catalog, CatalogDataset, CatalogModel, RemoteFile, RepoType, WeightFormat};
pub use download::{CancelToken, DownloadProgress, Fetched, Hub, HubOptions, Phase, human_bytes};
pub use error::{Error, Result};
