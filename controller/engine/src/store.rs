//! What the engine keeps across restarts, and the trait it is kept through. The agent's store
//! writes a file in the state directory off the engine task; `MemoryStore` serves the tests.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

use palisade_policies::audit::NamespaceMode;
use palisade_policies::identity::AllocatorSnapshot;
use palisade_policies::labels::Labels;
use palisade_policies::model::Policy;
use serde::{Deserialize, Serialize};

use crate::model::{EndpointRecord, RemoteRecord};

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
    /// Namespaces not in protect mode.
    #[serde(default)]
    pub namespace_modes: BTreeMap<String, NamespaceMode>,
    /// Kubernetes mode: other nodes' pods and the other nodes, so a restart enforces what it
    /// enforced before its watchers have synced.
    #[serde(default)]
    pub remotes: Vec<(String, RemoteRecord)>,
    /// Kubernetes mode: the policies of the API, for the same reason.
    #[serde(default)]
    pub cluster_policies: Vec<Policy>,
    /// What DNS answers taught (`toFQDNs`), so a restart allows what it allowed before.
    #[serde(default)]
    pub fqdns: Vec<crate::fqdn::FqdnEntry>,
    /// The store's own count of saves, which this state is (0 for a store that keeps none):
    /// learned names recorded after it (`StateStore::record_learned`) are not in it.
    #[serde(default)]
    pub generation: u64,
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

/// The outcome of one save, for whoever must know it is durable (the caller of the change,
/// not the engine's task).
#[derive(Debug)]
pub struct SaveTicket(TicketState);

#[derive(Debug)]
enum TicketState {
    Done(Result<(), PersistError>),
    Pending(oneshot::Receiver<Result<(), PersistError>>),
}

impl SaveTicket {
    /// A save that has finished already.
    pub fn done(result: Result<(), PersistError>) -> Self {
        Self(TicketState::Done(result))
    }

    /// A save that finishes when the store sends on the other end.
    pub fn pending() -> (oneshot::Sender<Result<(), PersistError>>, Self) {
        let (tx, rx) = oneshot::channel();
        (tx, Self(TicketState::Pending(rx)))
    }

    /// Waits until the state is durable, or the store says why it is not.
    pub async fn wait(self) -> Result<(), PersistError> {
        match self.0 {
            TicketState::Done(r) => r,
            TicketState::Pending(rx) => rx.await.unwrap_or_else(|_| {
                Err(PersistError::new(std::io::Error::other(
                    "the state writer stopped before writing",
                )))
            }),
        }
    }
}

pub trait StateStore: Send {
    /// The state kept by an earlier engine, if any.
    fn load(&mut self) -> Result<Option<StateFile>, PersistError>;
    /// Keeps `state`, replacing what was kept. Must not block on the disk (the engine calls it
    /// on its own task); the ticket says when the state is durable, or why it is not.
    fn save(&mut self, state: StateFile) -> SaveTicket;
    /// Records what a batch of DNS answers taught, before the answers are released, so an
    /// agent that dies before the next save still finds it (`load` includes it). Called on
    /// the engine's task for every batch: it must be quick (a write to the page cache, which
    /// outlives the process; a node that reboots has neither the maps nor the connections
    /// the entries were for, so no sync to the disk is needed). The next save covers it.
    fn record_learned(&mut self, entries: &[crate::fqdn::FqdnEntry]) -> Result<(), PersistError> {
        let _ = entries;
        Ok(())
    }
}

/// A store in memory; clones share it, so a test can "restart" an engine on the same state.
#[derive(Clone, Debug, Default)]
pub struct MemoryStore {
    kept: Arc<Mutex<Option<StateFile>>>,
    /// Fail every save from now on (to test what the caller is told).
    fail: Arc<std::sync::atomic::AtomicBool>,
    /// What `record_learned` was given, in order.
    recorded: Arc<Mutex<Vec<crate::fqdn::FqdnEntry>>>,
}

/// The failure `MemoryStore` injects.
#[derive(Debug, thiserror::Error)]
#[error("injected failure of the state store")]
pub struct InjectedSaveFailure;

impl MemoryStore {
    /// Makes every later save fail (or succeed again).
    pub fn fail_saves(&self, fail: bool) {
        self.fail.store(fail, std::sync::atomic::Ordering::SeqCst);
    }

    /// What `record_learned` was given since the start, in order.
    pub fn recorded(&self) -> Vec<crate::fqdn::FqdnEntry> {
        self.recorded
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

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

    fn save(&mut self, state: StateFile) -> SaveTicket {
        if self.fail.load(std::sync::atomic::Ordering::SeqCst) {
            return SaveTicket::done(Err(PersistError::new(InjectedSaveFailure)));
        }
        *self
            .kept
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(state);
        SaveTicket::done(Ok(()))
    }

    fn record_learned(&mut self, entries: &[crate::fqdn::FqdnEntry]) -> Result<(), PersistError> {
        if self.fail.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(PersistError::new(InjectedSaveFailure));
        }
        self.recorded
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .extend_from_slice(entries);
        Ok(())
    }
}
