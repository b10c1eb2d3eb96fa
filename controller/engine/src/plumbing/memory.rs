//! Plumbing without a kernel: namespaces and links are sets. For engine tests and benchmarks.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use palisade_policies::endpoint::{BridgeLink, LinkLayer};

use super::{PlumbedEndpoint, Plumbing, PlumbingError, SocketPair};
use crate::model::NetnsRef;

/// The steps a test can make fail.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum PlumbingStep {
    Create,
    Activate,
    Delete,
    EndConnections,
}

/// The failure the in-memory plumbing injects.
#[derive(Debug, thiserror::Error)]
#[error("injected failure of step {0:?}")]
pub struct InjectedFailure(pub PlumbingStep);

#[derive(Debug, Default)]
pub struct MemoryPlumbing {
    /// Steps that fail.
    pub fail: BTreeSet<PlumbingStep>,
    pub netns: BTreeSet<String>,
    pub links: BTreeMap<String, u32>,
    pub up: BTreeSet<u32>,
    /// Connections ended, by namespace (its name, or its path).
    pub ended: Vec<(String, SocketPair)>,
    /// Namespace paths that exist (for containers a runtime made).
    pub netns_paths: BTreeSet<std::path::PathBuf>,
    /// Host-side interfaces that are bridge ports.
    pub bridge_ports: BTreeSet<u32>,
    next_ifindex: u32,
}

impl MemoryPlumbing {
    fn step(&self, step: PlumbingStep) -> Result<(), PlumbingError> {
        if self.fail.contains(&step) {
            return Err(PlumbingError::new(InjectedFailure(step)));
        }
        Ok(())
    }
}

impl Plumbing for MemoryPlumbing {
    async fn create_endpoint(
        &mut self,
        netns_name: &str,
        host_ifname: &str,
        _ip: Ipv4Addr,
    ) -> Result<PlumbedEndpoint, PlumbingError> {
        self.step(PlumbingStep::Create)?;
        self.netns.insert(netns_name.to_string());
        self.next_ifindex += 1;
        let ifindex = 100 + self.next_ifindex;
        self.links.insert(host_ifname.to_string(), ifindex);
        Ok(PlumbedEndpoint {
            host_ifname: host_ifname.to_string(),
            host_ifindex: ifindex,
        })
    }

    async fn activate(&mut self, host_ifindex: u32, _ip: Ipv4Addr) -> Result<(), PlumbingError> {
        self.step(PlumbingStep::Activate)?;
        self.up.insert(host_ifindex);
        Ok(())
    }

    async fn delete_endpoint(
        &mut self,
        netns_name: &str,
        host_ifname: &str,
    ) -> Result<(), PlumbingError> {
        self.step(PlumbingStep::Delete)?;
        self.netns.remove(netns_name);
        if let Some(i) = self.links.remove(host_ifname) {
            self.up.remove(&i);
        }
        Ok(())
    }

    async fn link_layer(
        &mut self,
        _netns: &NetnsRef,
        _ifname: &str,
        host_ifindex: u32,
    ) -> Result<LinkLayer, PlumbingError> {
        let [a, b, c, d] = host_ifindex.to_be_bytes();
        Ok(LinkLayer {
            mac: [2, 1, a, b, c, d],
            host_mac: [2, 2, a, b, c, d],
            bridge: self
                .bridge_ports
                .contains(&host_ifindex)
                .then_some(BridgeLink {
                    ifindex: 1,
                    mac: [2, 3, 0, 0, 0, 1],
                }),
        })
    }

    async fn ifindex(&mut self, ifname: &str) -> Result<Option<u32>, PlumbingError> {
        Ok(self.links.get(ifname).copied())
    }

    async fn node_addresses(&mut self) -> Result<Vec<Ipv4Addr>, PlumbingError> {
        Ok(vec![Ipv4Addr::new(10, 200, 0, 1)])
    }

    fn netns_exists(&self, name: &str) -> bool {
        self.netns.contains(name)
    }

    fn namespace_exists(&self, netns: &NetnsRef) -> bool {
        match netns {
            NetnsRef::Named(n) => self.netns.contains(n),
            NetnsRef::Path(p) => self.netns_paths.contains(p),
        }
    }

    async fn end_connections(
        &mut self,
        netns: &NetnsRef,
        sockets: &[SocketPair],
    ) -> Result<usize, PlumbingError> {
        self.step(PlumbingStep::EndConnections)?;
        let name = match netns {
            NetnsRef::Named(n) => n.clone(),
            NetnsRef::Path(p) => p.display().to_string(),
        };
        self.ended
            .extend(sockets.iter().map(|s| (name.clone(), *s)));
        Ok(sockets.len())
    }
}
