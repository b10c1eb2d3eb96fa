//! The network edge: how the engine joins a workload to the node (a namespace and a veth pair,
//! addresses and routes). The agent's rtnetlink implementation is the real one;
//! `memory::MemoryPlumbing` backs the engine's tests and benchmarks.

pub mod memory;

use std::net::{Ipv4Addr, SocketAddrV4};

use palisade_policies::endpoint::LinkLayer;

use crate::model::NetnsRef;

/// A failure of the plumbing edge; the edge's own typed error (netlink's, naming the
/// operation and the interface) is kept whole as the source.
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct PlumbingError(Box<dyn std::error::Error + Send + Sync + 'static>);

impl PlumbingError {
    pub fn new(source: impl std::error::Error + Send + Sync + 'static) -> Self {
        Self(Box::new(source))
    }
}

/// What plumbing an endpoint produced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlumbedEndpoint {
    pub host_ifname: String,
    pub host_ifindex: u32,
}

/// One end of a TCP connection, as a socket inside an endpoint's namespace sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct SocketPair {
    pub local: SocketAddrV4,
    pub remote: SocketAddrV4,
}

/// What the engine asks of the network. Async because netlink is.
#[expect(
    async_fn_in_trait,
    reason = "implemented and awaited only inside the agent; no caller needs a Send bound on the futures"
)]
pub trait Plumbing: Send {
    /// Creates namespace `netns_name` joined to the node by a veth (host side down) with `ip`.
    async fn create_endpoint(
        &mut self,
        netns_name: &str,
        host_ifname: &str,
        ip: Ipv4Addr,
    ) -> Result<PlumbedEndpoint, PlumbingError>;
    /// Brings the host side up and routes `ip` to it: called once the datapath judges the
    /// interface. Idempotent (also used after an agent restart).
    async fn activate(&mut self, host_ifindex: u32, ip: Ipv4Addr) -> Result<(), PlumbingError>;
    /// Removes the veth and the namespace (idempotent).
    async fn delete_endpoint(
        &mut self,
        netns_name: &str,
        host_ifname: &str,
    ) -> Result<(), PlumbingError>;
    /// The link layer of an endpoint's veth: its host side `host_ifindex`, and `ifname`, its
    /// peer inside `netns`.
    async fn link_layer(
        &mut self,
        netns: &NetnsRef,
        ifname: &str,
        host_ifindex: u32,
    ) -> Result<LinkLayer, PlumbingError>;
    /// The current ifindex of a host-side interface, if it exists.
    async fn ifindex(&mut self, ifname: &str) -> Result<Option<u32>, PlumbingError>;
    /// The node's IPv4 addresses (identity `host`).
    async fn node_addresses(&mut self) -> Result<Vec<Ipv4Addr>, PlumbingError>;
    /// Whether a network namespace of this name exists on the node.
    fn netns_exists(&self, name: &str) -> bool;
    /// Whether the namespace exists (a name, or a path a runtime gave).
    fn namespace_exists(&self, netns: &NetnsRef) -> bool;
    /// Ends these TCP connections inside namespace `netns` at once (the socket is
    /// aborted: its owner sees the connection reset, and a reset is sent to the peer);
    /// returns how many sockets there were to end. A socket already gone is not an error.
    async fn end_connections(
        &mut self,
        netns: &NetnsRef,
        sockets: &[SocketPair],
    ) -> Result<usize, PlumbingError>;
}
