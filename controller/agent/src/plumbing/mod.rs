//! The engine's `Plumbing` over rtnetlink (`palisade_netlink`): the namespaces and veths of
//! the endpoints palisade makes itself, and the host side of those a CNI runtime made.

use std::net::Ipv4Addr;

use palisade_engine::model::NetnsRef;
use palisade_engine::plumbing::{PlumbedEndpoint, Plumbing, PlumbingError, SocketPair};
pub use palisade_netlink::NetlinkError;
use palisade_netlink::{Netlink, netns, sockets};
use palisade_policies::endpoint::{BridgeLink, LinkLayer};

/// Wraps the netlink error as the engine's.
fn plumbing(e: NetlinkError) -> PlumbingError {
    PlumbingError::new(e)
}

/// rtnetlink-backed plumbing in the agent's (node) namespace.
pub struct NetlinkPlumbing {
    netlink: Netlink,
}

impl NetlinkPlumbing {
    pub fn new() -> Result<Self, NetlinkError> {
        Ok(Self {
            netlink: Netlink::new()?,
        })
    }

    /// Prepares the node namespace (forwarding, loopback, the node address).
    pub async fn setup_node(&mut self, node_ip: Ipv4Addr) -> Result<(), NetlinkError> {
        self.netlink.setup_node(node_ip).await
    }

    /// Routes what the datapath marks for the proxy to the local stack.
    pub async fn setup_proxy_routing(&mut self) -> Result<(), NetlinkError> {
        self.netlink.setup_proxy_routing().await
    }
}

impl Plumbing for NetlinkPlumbing {
    async fn create_endpoint(
        &mut self,
        netns_name: &str,
        host_ifname: &str,
        ip: Ipv4Addr,
    ) -> Result<PlumbedEndpoint, PlumbingError> {
        let veth = self
            .netlink
            .create_named(netns_name, host_ifname, ip)
            .await
            .map_err(plumbing)?;
        Ok(PlumbedEndpoint {
            host_ifname: veth.host_ifname,
            host_ifindex: veth.host_ifindex,
        })
    }

    async fn activate(&mut self, host_ifindex: u32, ip: Ipv4Addr) -> Result<(), PlumbingError> {
        self.netlink
            .up_and_routed(host_ifindex, ip)
            .await
            .map_err(plumbing)
    }

    async fn delete_endpoint(
        &mut self,
        netns_name: &str,
        host_ifname: &str,
    ) -> Result<(), PlumbingError> {
        self.netlink
            .delete_named(netns_name, host_ifname)
            .await
            .map_err(plumbing)
    }

    async fn link_layer(
        &mut self,
        netns: &NetnsRef,
        ifname: &str,
        host_ifindex: u32,
    ) -> Result<LinkLayer, PlumbingError> {
        let path = match netns {
            NetnsRef::Named(n) => netns::path_of(n),
            NetnsRef::Path(p) => p.clone(),
        };
        let l = self
            .netlink
            .link_layer(host_ifindex, &path, ifname)
            .await
            .map_err(plumbing)?;
        Ok(LinkLayer {
            mac: l.mac,
            host_mac: l.host_mac,
            bridge: l.bridge.map(|(ifindex, mac)| BridgeLink { ifindex, mac }),
        })
    }

    async fn ifindex(&mut self, ifname: &str) -> Result<Option<u32>, PlumbingError> {
        self.netlink.ifindex(ifname).await.map_err(plumbing)
    }

    async fn node_addresses(&mut self) -> Result<Vec<Ipv4Addr>, PlumbingError> {
        self.netlink.addresses().await.map_err(plumbing)
    }

    fn netns_exists(&self, name: &str) -> bool {
        netns::exists(name)
    }

    fn namespace_exists(&self, netns: &NetnsRef) -> bool {
        match netns {
            NetnsRef::Named(n) => netns::exists(n),
            NetnsRef::Path(p) => netns::is_netns(p),
        }
    }

    async fn end_connections(
        &mut self,
        netns: &NetnsRef,
        pairs: &[SocketPair],
    ) -> Result<usize, PlumbingError> {
        let (path, netns_name) = match netns {
            NetnsRef::Named(n) => (netns::path_of(n), n.clone()),
            NetnsRef::Path(p) => (p.clone(), p.display().to_string()),
        };
        let pairs: Vec<sockets::SocketPair> = pairs
            .iter()
            .map(|p| sockets::SocketPair {
                local: p.local,
                remote: p.remote,
            })
            .collect();
        let what = format!("end connections in {netns_name}");
        tokio::task::spawn_blocking(move || sockets::destroy(&path, pairs))
            .await
            .map_err(|e| plumbing(palisade_netlink::io(what.clone())(std::io::Error::other(e))))?
            .map_err(|e| plumbing(palisade_netlink::io(what)(e)))
    }
}
