//! The Hugging Face cache layout (`<root>/models--owner--name/{refs,blobs,snapshots}`),
//! shared with Python's huggingface_hub: what either downloaded, the other finds.

use std::path::{Path, PathBuf};

use crate::RemoteFile;

/// A Hugging Face hub cache folder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubCache {
    root: PathBuf,
}

/// Where the cache lives: `HF_HUB_CACHE`, else `HF_HOME/hub`, else
/// `~/.cache/huggingface/hub` (what huggingface_hub uses).
fn root_from_env() -> PathBuf {
    if let Some(p) = std::env::var_os("HF_HUB_CACHE").filter(|p| !p.is_empty()) {
        return p.into();
    }
    if let Some(p) = std::env::var_os("HF_HOME").filter(|p| !p.is_empty()) {
        return PathBuf::from(p).join("hub");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .or_else(|| directories::BaseDirs::new().map(|d| d.home_dir().to_owned()))
        .unwrap_or_else(|| PathBuf::from("."));
    home.join(".cache").join("huggingface").join("hub")
}

/// A 40-hex revision is a commit and names its snapshot directly.
pub(crate) fn is_commit(rev: &str) -> bool {
    rev.len() == 40 && rev.bytes().all(|b| b.is_ascii_hexdigit())
}

impl HubCache {
    /// The cache at `root`.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// The cache the environment names.
    pub fn from_env() -> Self {
        Self::new(root_from_env())
    }

    /// The cache folder.
    pub fn root(&self) -> &Path {
        &self.root
    }

    pub(crate) fn hf(&self) -> hf_hub::Cache {
        hf_hub::Cache::new(self.root.clone())
    }

    /// `models--owner--name` (or `datasets--…`) under the root.
    pub fn repo_dir(&self, f: &RemoteFile) -> PathBuf {
        self.root.join(f.hf_repo().folder_name())
    }

    /// The commit a revision points at in this cache, if known.
    pub fn commit(&self, f: &RemoteFile) -> Option<String> {
        if is_commit(&f.revision) {
            return Some(f.revision.clone());
        }
        let r = std::fs::read_to_string(self.repo_dir(f).join("refs").join(&f.revision)).ok()?;
        let r = r.trim();
        is_commit(r).then(|| r.to_owned())
    }

    /// The file's path in the snapshot, when it is fully present (no request made).
    pub fn find(&self, f: &RemoteFile) -> Option<PathBuf> {
        let commit = self.commit(f)?;
        let p = self
            .repo_dir(f)
            .join("snapshots")
            .join(commit)
            .join(&f.path);
        // `is_file` follows the symlink to the blob: a dangling link is absent.
        p.is_file().then_some(p)
    }

    /// The blob a snapshot path points to; its name is the hub's ETag.
    pub fn blob_of(path: &Path) -> std::io::Result<PathBuf> {
        std::fs::canonicalize(path)
    }

    /// Bytes of unfinished downloads in this repository (resumable parts).
    pub fn partial_bytes(&self, f: &RemoteFile) -> u64 {
        let Ok(rd) = std::fs::read_dir(self.repo_dir(f).join("blobs")) else {
            return 0;
        };
        rd.flatten()
            .filter(|e| e.path().extension().is_some_and(|x| x == "part"))
            .filter_map(|e| e.metadata().ok())
            // A part file carries an 8-byte progress trailer.
            .map(|m| m.len().saturating_sub(8))
            .sum()
    }

    /// Removes a downloaded file: its snapshot link and the blob behind it.
    /// Missing pieces are not an error.
    pub fn remove(&self, f: &RemoteFile) -> std::io::Result<()> {
        let Some(link) = self.find(f).or_else(|| {
            let commit = self.commit(f)?;
            Some(
                self.repo_dir(f)
                    .join("snapshots")
                    .join(commit)
                    .join(&f.path),
            )
        }) else {
            return Ok(());
        };
        if let Ok(blob) = Self::blob_of(&link) {
            remove_if_exists(&blob)?;
        }
        remove_if_exists(&link)
    }

    /// Removes the unfinished downloads of a repository.
    pub fn remove_partials(&self, f: &RemoteFile) -> std::io::Result<()> {
        let Ok(rd) = std::fs::read_dir(self.repo_dir(f).join("blobs")) else {
            return Ok(());
        };
        for e in rd.flatten() {
            if e.path().extension().is_some_and(|x| x == "part") {
                remove_if_exists(&e.path())?;
            }
        }
        Ok(())
    }
}

pub(crate) fn remove_if_exists(p: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(p) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_a_file_through_a_branch_ref_or_a_commit() {
        let dir = tempfile::tempdir().unwrap();
        let cache = HubCache::new(dir.path());
        let commit = "a".repeat(40);
        let mut f = RemoteFile::model("microsoft/phi-2", "tokenizer.json");
        let repo = dir.path().join("models--microsoft--phi-2");
        assert_eq!(cache.repo_dir(&f), repo);
        assert!(cache.find(&f).is_none());
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::create_dir_all(repo.join("blobs")).unwrap();
        std::fs::create_dir_all(repo.join("snapshots").join(&commit)).unwrap();
        std::fs::write(repo.join("refs/main"), &commit).unwrap();
        std::fs::write(repo.join("blobs/abc"), b"{}").unwrap();
        let link = repo.join("snapshots").join(&commit).join("tokenizer.json");
        #[cfg(unix)]
        std::os::unix::fs::symlink("../../blobs/abc", &link).unwrap();
        #[cfg(not(unix))]
        std::fs::copy(repo.join("blobs/abc"), &link).unwrap();
        assert_eq!(cache.find(&f).unwrap(), link);
        f.revision = commit.clone();
        assert_eq!(cache.find(&f).unwrap(), link);
        f.revision = "b".repeat(40);
        assert!(cache.find(&f).is_none());
        f.revision = "main".into();
        cache.remove(&f).unwrap();
        assert!(cache.find(&f).is_none());
        assert!(!repo.join("blobs/abc").exists());
    }
}
