//! `--policy-dir`: the manifests (*.yaml, *.yml) of one directory, applied at start and again
//! whenever a file changes, appears or goes. Files are read and parsed here, on a blocking
//! thread, and handed to the engine whole; a file that does not parse is reported and the
//! directory's previous policies stay in force.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use palisade_engine::model::FilePolicies;
use palisade_engine::{Command, ask};
use palisade_policies::manifest::{self, ManifestError};
use tokio::sync::mpsc;
use tracing::{error, info};

/// How often the directory is looked at.
const POLL_EVERY: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum PolicyDirError {
    #[error("policy directory {dir}: {source}")]
    ReadDir {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("policy file {path}: {source}")]
    ReadFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "policy file {path} is {bytes} bytes, more than the {} accepted",
        manifest::limits::MAX_MANIFEST_BYTES
    )]
    TooLarge { path: PathBuf, bytes: u64 },
    #[error("policy file {path}: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: ManifestError,
    },
}

/// Which files there are, with their modification time and size: a change to any is a reload.
type Stamp = Vec<(PathBuf, SystemTime, u64)>;

pub struct PolicyDir {
    dir: PathBuf,
    /// What the engine last accepted.
    accepted: Option<Stamp>,
}

impl PolicyDir {
    pub fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_path_buf(),
            accepted: None,
        }
    }

    fn stamp(dir: &Path) -> Result<Stamp, PolicyDirError> {
        let rd = std::fs::read_dir(dir).map_err(|source| PolicyDirError::ReadDir {
            dir: dir.to_path_buf(),
            source,
        })?;
        let mut files: Stamp = rd
            .flatten()
            .map(|e| e.path())
            .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")))
            .filter_map(|p| {
                let md = std::fs::metadata(&p).ok()?;
                Some((p, md.modified().ok()?, md.len()))
            })
            .collect();
        files.sort();
        Ok(files)
    }

    /// Reads and parses every file when anything changed since what the engine last
    /// accepted; `None` when nothing did. Blocking.
    pub fn read_if_changed(&self) -> Result<Option<(Stamp, Vec<FilePolicies>)>, PolicyDirError> {
        let stamp = Self::stamp(&self.dir)?;
        if self.accepted.as_ref() == Some(&stamp) {
            return Ok(None);
        }
        let mut loaded = Vec::new();
        for (path, _, len) in &stamp {
            // Not read at all when larger than the parser would accept.
            if *len > manifest::limits::MAX_MANIFEST_BYTES as u64 {
                return Err(PolicyDirError::TooLarge {
                    path: path.clone(),
                    bytes: *len,
                });
            }
            let text =
                std::fs::read_to_string(path).map_err(|source| PolicyDirError::ReadFile {
                    path: path.clone(),
                    source,
                })?;
            let parsed =
                manifest::parse_manifests(&text).map_err(|source| PolicyDirError::Parse {
                    path: path.clone(),
                    source,
                })?;
            loaded.push((path.clone(), parsed));
        }
        Ok(Some((stamp, loaded)))
    }

    pub fn accept(&mut self, stamp: Stamp) {
        self.accepted = Some(stamp);
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }
}

/// Watches the directory until the engine goes away, handing every change to it.
pub async fn watch(mut dir: PolicyDir, engine: mpsc::Sender<Command>) {
    let mut tick = tokio::time::interval(POLL_EVERY);
    let mut last_error = String::new();
    loop {
        tick.tick().await;
        let (read, back) =
            match tokio::task::spawn_blocking(move || (dir.read_if_changed(), dir)).await {
                Ok(r) => r,
                Err(e) => {
                    error!(error = %e, "policy directory reader failed; no longer watching it");
                    return;
                }
            };
        dir = back;
        let outcome = match read {
            Ok(None) => Ok(None),
            Ok(Some((stamp, loaded))) => {
                match ask(&engine, |r| Command::ReplaceFilePolicies(loaded, r)).await {
                    Ok(ops) => Ok(Some((stamp, ops))),
                    Err(palisade_engine::AskError::EngineGone) => return,
                    Err(palisade_engine::AskError::Engine(e)) => Err(e.to_string()),
                    // The directory's policies are in force (they are re-read from their
                    // files at start, never from the state directory); the writer logs why.
                    Err(palisade_engine::AskError::NotSaved(_)) => Ok(Some((stamp, 0))),
                }
            }
            Err(e) => Err(e.to_string()),
        };
        match outcome {
            Ok(None) => {}
            Ok(Some((stamp, ops))) => {
                info!(dir = %dir.path().display(), map_operations = ops, "policy directory applied");
                dir.accept(stamp);
                last_error.clear();
            }
            // Said once per distinct problem, not every two seconds.
            Err(msg) if msg != last_error => {
                error!(error = %msg, "policy directory not applied; previous policies stay in force");
                last_error = msg;
            }
            Err(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: a, namespace: x}\nspec:\n  podSelector: {}\n";

    fn dir(name: &str) -> PathBuf {
        let d =
            std::env::temp_dir().join(format!("palisade-policy-dir-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn reads_yaml_files_once_until_they_change() {
        let d = dir("change");
        std::fs::write(d.join("a.yaml"), POLICY).unwrap();
        std::fs::write(d.join("notes.txt"), "not a manifest").unwrap();
        let mut pd = PolicyDir::new(&d);
        let (stamp, loaded) = pd.read_if_changed().unwrap().unwrap();
        assert_eq!(loaded.len(), 1, "only *.yaml and *.yml are read");
        assert_eq!(loaded[0].1.len(), 1);
        pd.accept(stamp);
        assert!(pd.read_if_changed().unwrap().is_none(), "nothing changed");
        std::fs::write(d.join("b.yml"), POLICY.replace("name: a", "name: b")).unwrap();
        let (_, loaded) = pd.read_if_changed().unwrap().unwrap();
        assert_eq!(loaded.len(), 2);
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_file_that_does_not_parse_is_named_and_nothing_is_accepted() {
        let d = dir("bad");
        std::fs::write(d.join("a.yaml"), POLICY).unwrap();
        std::fs::write(d.join("b.yaml"), "kind: [").unwrap();
        let pd = PolicyDir::new(&d);
        let err = pd.read_if_changed().unwrap_err();
        assert!(err.to_string().contains("b.yaml"), "{err}");
        assert!(err.to_string().contains("invalid YAML"), "{err}");
        let missing = PolicyDir::new(&d.join("nope"));
        let err = missing.read_if_changed().unwrap_err();
        assert!(err.to_string().starts_with("policy directory "), "{err}");
        let _ = std::fs::remove_dir_all(&d);
    }
}
