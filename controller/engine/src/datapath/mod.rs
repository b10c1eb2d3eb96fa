//! The datapath edge: the engine writes BPF maps and attaches programs only through the
//! `Datapath` trait. The agent's aya implementation is the real one; `memory::MemoryDatapath`
//! backs the engine's tests and benchmarks without root.

pub mod memory;

use std::net::SocketAddrV4;

use palisade_policies::{
    endpoint::EndpointId,
    mapstate::{MapDiff, MapState},
    model::Direction,
};

/// A failure of the datapath edge. The edge's own typed error (aya's, with the map and the
/// operation) is kept whole as the source; the engine needs no more than that it failed.
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct DatapathError(Box<dyn std::error::Error + Send + Sync + 'static>);

impl DatapathError {
    pub fn new(source: impl std::error::Error + Send + Sync + 'static) -> Self {
        Self(Box::new(source))
    }

    /// The edge's own error, for callers that know the edge.
    pub fn source_ref(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
        self.0.as_ref()
    }
}

/// A diff that failed part way: `applied` operations (in diff order) reached the maps.
#[derive(Debug, thiserror::Error)]
#[error("{source} (after {applied} map operations)")]
pub struct ApplyError {
    pub applied: usize,
    #[source]
    pub source: DatapathError,
}

/// A connection the datapath tracks, as one endpoint's side opened it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TrackedConnection {
    /// The endpoint whose check opened it.
    pub endpoint: EndpointId,
    /// Which check: the endpoint's egress (it is the client) or ingress (it is the server).
    pub scope: Direction,
    /// IP protocol number.
    pub protocol: u8,
    /// Original direction: who opened it, and to where.
    pub source: SocketAddrV4,
    pub destination: SocketAddrV4,
    /// The client's side hands it to the L7 proxy.
    pub through_proxy: bool,
    /// It is the proxy's upstream leg.
    pub from_proxy: bool,
    /// The rule that allowed it.
    pub rule: palisade_policies::mapstate::RuleId,
    /// Still in use: not expired, and (TCP) not closed both ways.
    pub open: bool,
}

/// Whether an endpoint's attachment is whole.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EndpointHealth {
    /// The host-side interface exists with the index the datapath was given.
    pub interface_present: bool,
    /// Both classifiers are attached to it.
    pub programs_attached: bool,
    /// The endpoint map holds its entry.
    pub in_datapath: bool,
}

pub trait Datapath: Send {
    /// Applies the diff in its order. On failure reports how much was applied.
    fn apply(&mut self, diff: &MapDiff) -> Result<(), ApplyError>;
    /// What the maps hold now.
    fn read_state(&self) -> Result<MapState, DatapathError>;
    /// Marks a policy change: established connections are re-checked on their next packet.
    fn bump_revision(&mut self) -> Result<u32, DatapathError>;
    fn attach(&mut self, ifname: &str, ifindex: u32) -> Result<(), DatapathError>;
    fn detach(&mut self, ifname: &str, ifindex: u32) -> Result<(), DatapathError>;
    /// Drops the conntrack entries of one endpoint; returns how many.
    fn flush_conntrack(&mut self, endpoint: EndpointId) -> Result<usize, DatapathError>;
    /// Deletes expired conntrack entries; returns (deleted, still live).
    fn gc_conntrack(&mut self) -> Result<(usize, usize), DatapathError>;
    /// Forgets attachments of interfaces not in `live` (gone while the agent was down).
    fn prune_links(&mut self, live: &[(String, u32)]);
    /// Every connection the datapath tracks.
    fn connections(&self) -> Result<Vec<TrackedConnection>, DatapathError>;
    /// Whether the endpoint's interface, programs and map entry are in place.
    fn endpoint_health(
        &self,
        endpoint: EndpointId,
        ifname: &str,
        ifindex: u32,
    ) -> Result<EndpointHealth, DatapathError>;
}
