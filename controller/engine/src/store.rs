//! What the engine keeps across restarts, and the trait it is kept through. The agent's store
//! writes a file in the state directory off the engine task; `MemoryStore` serves the tests.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use palisade_policies::identity::AllocatorSnapshot;
use palisade_policies::labels::Labels;
use palisade_policies::model::Policy;
use serde::{Deserialize, Serialize};

use crate::model::EndpointRecord;

/// The version of `StateFile` this engine reads and writes.
pub const STATE_VERSION: u32 = 1;

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

/// A failure of the store; its own typed error (naming the file) is the source.
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct PersistError(Box<dyn std::error::Error + Send + Sync + 'static>);

impl PersistError {
    pub fn new(source: impl std::error::Error + Send + Sync + 'static) -> Self {
        Self(Box::new(source))
    }
}

pub trait StateStore: Send {
    /// The state kept by an earlier engine, if any.
    fn load(&mut self) -> Result<Option<StateFile>, PersistError>;
    /// Keeps `state`, replacing what was kept. May return before the state is durable; it must
    /// never block on the disk (the engine calls it on its own task).
    fn save(&mut self, state: StateFile) -> Result<(), PersistError>;
}

/// A store in memory; clones share it, so a test can "restart" an engine on the same state.
#[derive(Clone, Debug, Default)]
pub struct MemoryStore {
    kept: Arc<Mutex<Option<StateFile>>>,
}

impl MemoryStore {
    /// What was saved last.
    pub fn kept(&self) -> Option<StateFile> {
        self.kept
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

impl StateStore for MemoryStore {
    fn load(&mut self) -> Result<Option<StateFile>, PersistError> {
        Ok(self.kept())
    }

    fn save(&mut self, state: StateFile) -> Result<(), PersistError> {
        *self
            .kept
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(state);
        Ok(())
    }
}
