//! An in-memory datapath for the engine's tests and benchmarks: maps are a `MapState`,
//! attachments a set, and any step can be made to fail.

use std::collections::BTreeSet;

use palisade_policies::{
    endpoint::EndpointId,
    mapstate::{MapDiff, MapState},
};

use super::{ApplyError, Datapath, DatapathError, EndpointHealth, TrackedConnection};

/// The steps a test can make fail.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum DatapathStep {
    ReadState,
    Revision,
    Attach,
    Detach,
    FlushConntrack,
    GcConntrack,
    Connections,
}

/// The failures the in-memory datapath injects.
#[derive(Debug, thiserror::Error)]
pub enum InjectedFailure {
    /// What a real map reports when it has no room left.
    #[error("map {map} is full")]
    MapFull { map: &'static str },
    #[error("injected failure of step {0:?}")]
    Step(DatapathStep),
}

#[derive(Debug, Default)]
pub struct MemoryDatapath {
    pub state: MapState,
    pub attached: BTreeSet<(String, u32)>,
    pub revision: u32,
    /// Fail `apply` after this many operations (to test rollback); None = never.
    pub fail_after: Option<usize>,
    /// Let this many `apply` calls through, then fail the later ones after this many
    /// operations (to test a failing rollback).
    pub fail_after_applies: Option<(usize, usize)>,
    /// How many times `apply` was called.
    pub applies: usize,
    /// Steps that fail (besides `apply`, see `fail_after`).
    pub fail: BTreeSet<DatapathStep>,
    /// What `connections` reports: the conntrack table, as a test sets it.
    pub tracked: Vec<TrackedConnection>,
}

impl MemoryDatapath {
    fn step(&self, step: DatapathStep) -> Result<(), DatapathError> {
        if self.fail.contains(&step) {
            return Err(DatapathError::new(InjectedFailure::Step(step)));
        }
        Ok(())
    }
}

impl Datapath for MemoryDatapath {
    fn apply(&mut self, diff: &MapDiff) -> Result<(), ApplyError> {
        self.applies += 1;
        let fail_after = match self.fail_after_applies {
            Some((through, after)) if self.applies > through => Some(after),
            _ => self.fail_after,
        };
        match fail_after {
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
        self.step(DatapathStep::ReadState)?;
        Ok(self.state.clone())
    }

    fn bump_revision(&mut self) -> Result<u32, DatapathError> {
        self.step(DatapathStep::Revision)?;
        self.revision += 1;
        Ok(self.revision)
    }

    fn attach(&mut self, ifname: &str, ifindex: u32) -> Result<(), DatapathError> {
        self.step(DatapathStep::Attach)?;
        self.attached.insert((ifname.to_string(), ifindex));
        Ok(())
    }

    fn detach(&mut self, ifname: &str, ifindex: u32) -> Result<(), DatapathError> {
        self.step(DatapathStep::Detach)?;
        self.attached.remove(&(ifname.to_string(), ifindex));
        Ok(())
    }

    fn flush_conntrack(&mut self, _endpoint: EndpointId) -> Result<usize, DatapathError> {
        self.step(DatapathStep::FlushConntrack)?;
        Ok(0)
    }

    fn gc_conntrack(&mut self) -> Result<(usize, usize), DatapathError> {
        self.step(DatapathStep::GcConntrack)?;
        Ok((0, 0))
    }

    fn prune_links(&mut self, live: &[(String, u32)]) {
        self.attached.retain(|a| live.contains(a));
    }

    fn endpoint_health(
        &self,
        endpoint: EndpointId,
        ifname: &str,
        ifindex: u32,
    ) -> Result<EndpointHealth, DatapathError> {
        let attached = self.attached.contains(&(ifname.to_string(), ifindex));
        Ok(EndpointHealth {
            interface_present: attached,
            programs_attached: attached,
            in_datapath: self
                .state
                .endpoints
                .get(&endpoint)
                .is_some_and(|e| e.ifindex == ifindex),
        })
    }

    fn connections(&self) -> Result<Vec<TrackedConnection>, DatapathError> {
        self.step(DatapathStep::Connections)?;
        Ok(self.tracked.clone())
    }
}
