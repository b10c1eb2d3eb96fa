//! The agent's state directory: one JSON file, written atomically after every change, read
//! at start so identities, endpoints and policies survive restarts.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use palisade_policies::identity::AllocatorSnapshot;
use palisade_policies::labels::Labels;
use palisade_policies::model::Policy;
use serde::{Deserialize, Serialize};

use super::EndpointRecord;

pub const STATE_VERSION: u32 = 1;
const FILE: &str = "state.json";

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StateFile {
    pub version: u32,
    pub endpoints: Vec<EndpointRecord>,
    pub namespaces: BTreeMap<String, Labels>,
    /// Policies applied through the API (policy-dir ones are re-read from their files).
    pub policies: Vec<Policy>,
    pub identities: AllocatorSnapshot,
    pub next_endpoint_id: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    #[error("state file {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("state file {path} is corrupt: {source}")]
    Corrupt {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("state file {path} has version {found}, this agent reads version {STATE_VERSION}")]
    Version { path: PathBuf, found: u32 },
}

pub struct StateDir {
    dir: PathBuf,
}

impl StateDir {
    pub fn new(dir: &Path) -> Result<Self, PersistError> {
        fs::create_dir_all(dir).map_err(|source| PersistError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        Ok(Self {
            dir: dir.to_path_buf(),
        })
    }

    fn path(&self) -> PathBuf {
        self.dir.join(FILE)
    }

    pub fn load(&self) -> Result<Option<StateFile>, PersistError> {
        let path = self.path();
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(PersistError::Io { path, source }),
        };
        let state: StateFile =
            serde_json::from_slice(&bytes).map_err(|source| PersistError::Corrupt {
                path: path.clone(),
                source,
            })?;
        if state.version != STATE_VERSION {
            return Err(PersistError::Version {
                path,
                found: state.version,
            });
        }
        Ok(Some(state))
    }

    /// Writes to a temporary file, syncs, then renames: a crash leaves the old or the new
    /// state, never half of one.
    pub fn save(&self, state: &StateFile) -> Result<(), PersistError> {
        let path = self.path();
        let tmp = self.dir.join(format!("{FILE}.tmp"));
        let io_err = |source| PersistError::Io {
            path: tmp.clone(),
            source,
        };
        let json = serde_json::to_vec_pretty(state).map_err(|source| PersistError::Corrupt {
            path: path.clone(),
            source,
        })?;
        let mut f = fs::File::create(&tmp).map_err(io_err)?;
        f.write_all(&json).map_err(io_err)?;
        f.sync_all().map_err(io_err)?;
        fs::rename(&tmp, &path).map_err(|source| PersistError::Io { path, source })
    }
}
