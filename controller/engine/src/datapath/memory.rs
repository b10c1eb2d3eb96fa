//! An in-memory datapath for the engine's tests and benchmarks: maps are a `MapState`,
//! attachments a set, and any step can be made to fail.

use std::collections::BTreeSet;

use palisade_policies::{
    endpoint::EndpointId,
    mapstate::{MapDiff, MapState},
};

use super::{ApplyError, Datapath, DatapathError, TrackedConnection};

/// The failures the in-memory datapath injects.
#[derive(Debug, thiserror::Error)]
pub enum InjectedFailure {
    /// What a real map reports when it has no room left.
    #[error("map {map} is full")]
    MapFull { map: &'static str },
    #[error("injected failure of the {step}")]
    Step { step: &'static str },
}

#[derive(Debug, Default)]
pub struct MemoryDatapath {
    pub state: MapState,
    pub attached: BTreeSet<(String, u32)>,
    pub revision: u32,
    /// Fail `apply` after this many operations (to test rollback); None = never.
    pub fail_after: Option<usize>,
    /// Fail `bump_revision`.
    pub fail_revision: bool,
    /// Fail `attach`.
    pub fail_attach: bool,
    /// What `connections` reports: the conntrack table, as a test sets it.
    pub tracked: Vec<TrackedConnection>,
}

impl Datapath for MemoryDatapath {
    fn apply(&mut self, diff: &MapDiff) -> Result<(), ApplyError> {
        match self.fail_after {
            Some(n) if n < diff.len() => {
                self.state.apply_prefix(diff, n);
                Err(ApplyError {
                    applied: n,
                    source: DatapathError::new(InjectedFailure::MapFull { map: "POLICY_V1" }),
                })
            }
            _ => {
                self.state.apply_prefix(diff, diff.len());
                Ok(())
            }
        }
    }

    fn read_state(&self) -> Result<MapState, DatapathError> {
        Ok(self.state.clone())
    }

    fn bump_revision(&mut self) -> Result<u32, DatapathError> {
        if self.fail_revision {
            return Err(DatapathError::new(InjectedFailure::Step {
                step: "revision bump",
            }));
        }
        self.revision += 1;
        Ok(self.revision)
    }

    fn attach(&mut self, ifname: &str, ifindex: u32) -> Result<(), DatapathError> {
        if self.fail_attach {
            return Err(DatapathError::new(InjectedFailure::Step { step: "attach" }));
        }
        self.attached.insert((ifname.to_string(), ifindex));
        Ok(())
    }

    fn detach(&mut self, ifname: &str, ifindex: u32) -> Result<(), DatapathError> {
        self.attached.remove(&(ifname.to_string(), ifindex));
        Ok(())
    }

    fn flush_conntrack(&mut self, _endpoint: EndpointId) -> Result<usize, DatapathError> {
        Ok(0)
    }

    fn gc_conntrack(&mut self) -> Result<(usize, usize), DatapathError> {
        Ok((0, 0))
    }

    fn prune_links(&mut self, live: &[(String, u32)]) {
        self.attached.retain(|a| live.contains(a));
    }

    fn connections(&self) -> Result<Vec<TrackedConnection>, DatapathError> {
        Ok(self.tracked.clone())
    }
}
