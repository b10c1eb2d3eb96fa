//! The node's status: the engine's view of its state, joined with what only the maps know
//! (counters, conntrack entries) and how many flows the agent holds. The maps are read on a
//! blocking thread, never on the engine's task, and the engine's part is the status it
//! published after its last command: a status request never waits for the engine's task
//! (which may be busy with a large policy).

use std::sync::Arc;

use palisade_engine::AskError;
use palisade_engine::views::EngineStatus;
use tokio::sync::watch;

use crate::datapath::{CounterSample, MapReader};
use crate::flows::store::FlowStore;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeStatus {
    pub engine: EngineStatus,
    pub conntrack_entries: usize,
    pub flows_stored: usize,
    pub counters: Vec<CounterSample>,
    /// AUDIT flows of namespaces not in discover mode, by namespace.
    pub violations: std::collections::BTreeMap<String, u64>,
}

/// Where the status comes from; cheap to clone.
#[derive(Clone)]
pub struct StatusSource {
    pub engine: watch::Receiver<Arc<EngineStatus>>,
    pub maps: Arc<MapReader>,
    pub flows: Arc<FlowStore>,
    /// The XDP prefilter, whose counters the metrics show.
    pub prefilter: crate::prefilter::Handle,
}

impl StatusSource {
    pub async fn gather(&self) -> Result<NodeStatus, AskError> {
        let engine = EngineStatus::clone(&self.engine.borrow());
        let maps = Arc::clone(&self.maps);
        let (conntrack_entries, counters) = tokio::task::spawn_blocking(move || {
            (maps.conntrack_count(), maps.counters().unwrap_or_default())
        })
        .await
        .unwrap_or_default();
        Ok(NodeStatus {
            engine,
            conntrack_entries,
            flows_stored: self.flows.len(),
            counters,
            violations: self.flows.violations(),
        })
    }
}
