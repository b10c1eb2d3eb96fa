//! The datapath edge: the engine talks to BPF maps and program attachments only through the
//! `Datapath` trait. `bpf::BpfDatapath` is the real one; `memory::MemoryDatapath` backs unit
//! tests of the engine without root.

pub mod bpf;
pub mod convert;
pub mod events;
pub mod memory;

use std::path::PathBuf;

use palisade_common::conntrack::{CtEntry, CtKey};
use palisade_policies::{
    endpoint::EndpointId,
    mapstate::{MapDiff, MapState},
};

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("bpffs at {path}: {source}")]
    Bpffs {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("loading the BPF object failed: {0}")]
    Load(String),
    #[error("the BPF object has no program {name}")]
    MissingProgram { name: &'static str },
    #[error("the BPF object has no map {name}")]
    MissingMap { name: &'static str },
    #[error("BPF program {name}: {detail}")]
    Program { name: &'static str, detail: String },
    #[error("attaching to {ifname}: {detail}")]
    Attach { ifname: String, detail: String },
    #[error("map {map} is full")]
    MapFull { map: &'static str },
    #[error("map {map}: {op} failed: {source}")]
    Map {
        map: &'static str,
        op: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("reading map state back: {0}")]
    Decode(#[from] convert::DecodeError),
}

/// A diff that failed part way: `applied` operations (in diff order) reached the maps.
#[derive(Debug, thiserror::Error)]
#[error("{source} (after {applied} map operations)")]
pub struct ApplyError {
    pub applied: usize,
    #[source]
    pub source: DatapathError,
}

/// One non-zero datapath counter, summed over CPUs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CounterSample {
    /// 0 for datapath-wide counters, else `palisade_common::direction`.
    pub direction: u8,
    /// `palisade_common::metrics::OUTCOME_*` or a drop reason.
    pub outcome: u8,
    pub packets: u64,
    pub bytes: u64,
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
    fn counters(&self) -> Result<Vec<CounterSample>, DatapathError>;
    /// Forgets attachments of interfaces not in `live` (gone while the agent was down).
    fn prune_links(&mut self, live: &[(String, u32)]);
    /// Every conntrack entry, as the datapath holds it.
    fn conntrack_dump(&self) -> Result<Vec<(CtKey, CtEntry)>, DatapathError>;
    /// How many conntrack entries there are (without copying them out).
    fn conntrack_count(&self) -> usize;
}

/// CLOCK_MONOTONIC in nanoseconds: the clock `bpf_ktime_get_ns` reads.
pub fn monotonic_now_ns() -> u64 {
    let ts = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .expect("CLOCK_MONOTONIC is always available");
    ts.tv_sec() as u64 * 1_000_000_000 + ts.tv_nsec() as u64
}
