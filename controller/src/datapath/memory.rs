//! An in-memory datapath for unit tests of the engine: maps are a `MapState`, attachments a set.

use std::collections::BTreeSet;

use palisade_common::conntrack::{CtEntry, CtKey};
use palisade_policies::{
    endpoint::EndpointId,
    mapstate::{MapDiff, MapState},
};

use super::{ApplyError, CounterSample, Datapath, DatapathError};

#[derive(Debug, Default)]
pub struct MemoryDatapath {
    pub state: MapState,
    pub attached: BTreeSet<(String, u32)>,
    pub revision: u32,
    /// Fail `apply` after this many operations (to test rollback); None = never.
    pub fail_after: Option<usize>,
}

impl Datapath for MemoryDatapath {
    fn apply(&mut self, diff: &MapDiff) -> Result<(), ApplyError> {
        match self.fail_after {
            Some(n) if n < diff.len() => {
                self.state.apply_prefix(diff, n);
                Err(ApplyError {
                    applied: n,
                    source: DatapathError::MapFull { map: "POLICY_V1" },
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
        self.revision += 1;
        Ok(self.revision)
    }

    fn attach(&mut self, ifname: &str, ifindex: u32) -> Result<(), DatapathError> {
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

    fn counters(&self) -> Result<Vec<CounterSample>, DatapathError> {
        Ok(Vec::new())
    }

    fn prune_links(&mut self, live: &[(String, u32)]) {
        self.attached.retain(|a| live.contains(a));
    }

    fn conntrack_dump(&self) -> Result<Vec<(CtKey, CtEntry)>, DatapathError> {
        Ok(Vec::new())
    }

    fn conntrack_count(&self) -> usize {
        0
    }
}
