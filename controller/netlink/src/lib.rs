//! Workload network plumbing over rtnetlink, shared by the agent (endpoints it makes itself)
//! and the CNI plugin (containers a runtime made): network namespaces, the veth pair that
//! joins a workload to the node, its address, routes and static neighbour, and ending TCP
//! connections from outside their process.
//!
//! Layout (as Calico/Cilium): the workload has its interface (`eth0` for palisade's own
//! endpoints, `CNI_IFNAME` for containers) with a /32 address and a default route via the
//! link-local gateway 169.254.1.1, whose MAC is pinned to the host-side veth by a static
//! neighbour entry; the node has a /32 route to the workload over the host-side veth. IPv6 is
//! disabled on both ends, so what crosses the veth is IPv4 and ARP.

use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::AsRawFd as _;
use std::path::Path;

use futures::TryStreamExt as _;
use netlink_packet_route::link::{LinkAttribute, LinkMessage};
use netlink_packet_route::neighbour::NeighbourState;
use netlink_packet_route::route::RouteScope;
use rtnetlink::{Handle, LinkUnspec, LinkVeth, RouteMessageBuilder};

/// The routing protocol number of routes to other nodes' pods (Kubernetes mode), so they are
/// told apart from the host's own (as BIRD or Cilium mark theirs).
pub const NODE_ROUTE_PROTOCOL: netlink_packet_route::route::RouteProtocol =
    netlink_packet_route::route::RouteProtocol::Other(0xba);
use tracing::debug;

pub mod netns;
pub mod sockets;

/// The endpoint's default gateway: link-local, answered by the host-side veth's MAC.
pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);

/// What can fail while plumbing, with the operation and the interface it failed on.
#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("netlink: {op}: {source}")]
    Netlink {
        op: String,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("interface {0} not found")]
    NoSuchInterface(String),
    #[error("interface {ifname} already exists in {netns}")]
    InterfaceTaken {
        ifname: String,
        netns: std::path::PathBuf,
    },
    #[error("interface {ifname} already exists on the node")]
    HostInterfaceTaken { ifname: String },
    #[error(transparent)]
    Netns(#[from] netns::NetnsError),
    #[error("{op}: {source}")]
    Io {
        op: String,
        #[source]
        source: std::io::Error,
    },
}

pub fn nl(op: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> NetlinkError {
    let op = op.into();
    move |source| NetlinkError::Netlink { op, source }
}

pub fn io(op: impl Into<String>) -> impl FnOnce(std::io::Error) -> NetlinkError {
    let op = op.into();
    move |source| NetlinkError::Io { op, source }
}

/// A veth pair made into a workload's namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Veth {
    pub host_ifname: String,
    pub host_ifindex: u32,
    pub host_mac: Vec<u8>,
    pub container_ifname: String,
    pub container_mac: Vec<u8>,
}

/// What the datapath needs of a workload veth's link layer (see `Netlink::link_layer`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LinkLayerInfo {
    pub mac: [u8; 6],
    pub host_mac: [u8; 6],
    /// The bridge the host side is a port of: its ifindex and MAC.
    pub bridge: Option<(u32, [u8; 6])>,
}

/// An Ethernet address from netlink's bytes; zero (unknown) when it is not six bytes long.
fn six(mac: &[u8]) -> [u8; 6] {
    <[u8; 6]>::try_from(mac).unwrap_or_default()
}

/// rtnetlink in the node's namespace (the namespace of the thread that made it).
pub struct Netlink {
    node: Handle,
}

pub async fn link_by_name(h: &Handle, name: &str) -> Result<Option<LinkMessage>, NetlinkError> {
    let mut links = h.link().get().match_name(name.to_string()).execute();
    match links.try_next().await {
        Ok(link) => Ok(link),
        // ENODEV: no such interface.
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => Ok(None),
        Err(e) => Err(nl(format!("get link {name}"))(e)),
    }
}

pub fn mac_of(link: &LinkMessage) -> Option<Vec<u8>> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::Address(mac) => Some(mac.clone()),
        _ => None,
    })
}

/// Opens a netlink connection whose socket lives in the namespace at `path`.
pub fn handle_in(path: &Path) -> Result<Handle, NetlinkError> {
    let rt = tokio::runtime::Handle::current();
    let (conn, handle) = netns::run_in(path, move || {
        let _guard = rt.enter();
        let (conn, handle, _) = rtnetlink::new_connection()?;
        // No IPv6 inside the endpoint: the datapath judges IPv4 only for now, and router
        // solicitations would otherwise be dropped as noise.
        for key in [
            "net.ipv6.conf.all.disable_ipv6",
            "net.ipv6.conf.default.disable_ipv6",
        ] {
            let _ = netns::write_sysctl(key, "1");
        }
        Ok((conn, handle))
    })
    .map_err(io(format!("netlink socket in {}", path.display())))?;
    tokio::spawn(conn);
    Ok(handle)
}

impl Netlink {
    pub fn new() -> Result<Self, NetlinkError> {
        let (conn, node, _) = rtnetlink::new_connection().map_err(io("netlink socket"))?;
        tokio::spawn(conn);
        Ok(Self { node })
    }

    /// Prepares the node namespace: forwarding on, loopback up and carrying `node_ip` (the
    /// address the node uses towards endpoints; on loopback because it needs no device of
    /// its own and cannot go down).
    pub async fn setup_node(&mut self, node_ip: Ipv4Addr) -> Result<(), NetlinkError> {
        netns::write_sysctl("net.ipv4.ip_forward", "1").map_err(io("enable IPv4 forwarding"))?;
        let lo = link_by_name(&self.node, "lo")
            .await?
            .ok_or_else(|| NetlinkError::NoSuchInterface("lo".into()))?;
        let index = lo.header.index;
        self.node
            .link()
            .set(LinkUnspec::new_with_index(index).up().build())
            .execute()
            .await
            .map_err(nl("set lo up"))?;
        if !self.addresses().await?.contains(&node_ip) {
            self.node
                .address()
                .add(index, IpAddr::V4(node_ip), 32)
                .execute()
                .await
                .map_err(nl(format!("add {node_ip}/32 to lo")))?;
        }
        Ok(())
    }

    /// Routes packets the datapath marked for the proxy to the local stack, where their
    /// assigned proxy socket takes them: `ip rule add fwmark TO_PROXY/MASK lookup 2005` and
    /// `ip route add local 0.0.0.0/0 dev lo table 2005`. Idempotent.
    pub async fn setup_proxy_routing(&mut self) -> Result<(), NetlinkError> {
        use netlink_packet_route::route::RouteType;
        use netlink_packet_route::rule::{RuleAction, RuleAttribute};
        use palisade_common::mark;
        let exists = |e: &rtnetlink::Error| matches!(e, rtnetlink::Error::NetlinkError(m) if m.raw_code() == -libc::EEXIST);
        let mut rule = self
            .node
            .rule()
            .add()
            .v4()
            .fw_mark(mark::TO_PROXY)
            .table_id(mark::PROXY_ROUTE_TABLE)
            .priority(90)
            .action(RuleAction::ToTable);
        rule.message_mut()
            .attributes
            .push(RuleAttribute::FwMask(mark::MAGIC_MASK));
        if let Err(e) = rule.execute().await
            && !exists(&e)
        {
            return Err(nl("add the proxy fwmark rule")(e));
        }
        let lo = link_by_name(&self.node, "lo")
            .await?
            .ok_or_else(|| NetlinkError::NoSuchInterface("lo".into()))?;
        self.node
            .route()
            .add(
                RouteMessageBuilder::<Ipv4Addr>::new()
                    .destination_prefix(Ipv4Addr::UNSPECIFIED, 0)
                    .output_interface(lo.header.index)
                    .kind(RouteType::Local)
                    .scope(RouteScope::Host)
                    .table_id(mark::PROXY_ROUTE_TABLE)
                    .build(),
            )
            .replace()
            .execute()
            .await
            .map_err(nl("add the proxy's local route"))
    }

    /// Makes a veth pair: `host_ifname` in the node (left down), its peer moved into the
    /// namespace at `netns_path` as `container_ifname` with `ip`/32, up, routed through the
    /// link-local gateway. Fails, changing nothing, if `container_ifname` is taken there.
    pub async fn veth_into(
        &mut self,
        netns_path: &Path,
        host_ifname: &str,
        container_ifname: &str,
        ip: Ipv4Addr,
    ) -> Result<Veth, NetlinkError> {
        let pod = handle_in(netns_path)?;
        if link_by_name(&pod, container_ifname).await?.is_some() {
            return Err(NetlinkError::InterfaceTaken {
                ifname: container_ifname.to_string(),
                netns: netns_path.to_path_buf(),
            });
        }
        // Never touch an interface this call did not make.
        if link_by_name(&self.node, host_ifname).await?.is_some() {
            return Err(NetlinkError::HostInterfaceTaken {
                ifname: host_ifname.to_string(),
            });
        }
        // A temporary name for the peer while it is still in the node: the kernel allows 15
        // characters, and a name of its own (the host side's, ending differently).
        let peer_tmp = format!("t{}", &host_ifname[host_ifname.len().saturating_sub(14)..]);
        match self
            .make_veth(
                &pod,
                netns_path,
                host_ifname,
                &peer_tmp,
                container_ifname,
                ip,
            )
            .await
        {
            Ok(v) => Ok(v),
            Err(e) => {
                // Leave no half-made veth: deleting the host side deletes its peer too.
                let _ = self.delete_link(host_ifname).await;
                Err(e)
            }
        }
    }

    /// Whether `ifname` exists inside the namespace at `netns_path`.
    pub async fn interface_in(
        &mut self,
        netns_path: &Path,
        ifname: &str,
    ) -> Result<bool, NetlinkError> {
        let pod = handle_in(netns_path)?;
        Ok(link_by_name(&pod, ifname).await?.is_some())
    }

    async fn make_veth(
        &mut self,
        pod: &Handle,
        netns_path: &Path,
        host_ifname: &str,
        peer_tmp: &str,
        container_ifname: &str,
        ip: Ipv4Addr,
    ) -> Result<Veth, NetlinkError> {
        self.node
            .link()
            .add(LinkVeth::new(host_ifname, peer_tmp).build())
            .execute()
            .await
            .map_err(nl(format!("add veth {host_ifname}")))?;
        let host = link_by_name(&self.node, host_ifname)
            .await?
            .ok_or_else(|| NetlinkError::NoSuchInterface(host_ifname.into()))?;
        let host_mac = mac_of(&host)
            .ok_or_else(|| NetlinkError::NoSuchInterface(format!("{host_ifname} (no MAC)")))?;
        let host_index = host.header.index;
        let _ = netns::write_sysctl(&format!("net.ipv6.conf.{host_ifname}.disable_ipv6"), "1");

        let peer = link_by_name(&self.node, peer_tmp)
            .await?
            .ok_or_else(|| NetlinkError::NoSuchInterface(peer_tmp.to_string()))?;
        let ns_file = std::fs::File::open(netns_path)
            .map_err(io(format!("open {}", netns_path.display())))?;
        self.node
            .link()
            .set(
                LinkUnspec::new_with_index(peer.header.index)
                    .setns_by_fd(ns_file.as_raw_fd())
                    .build(),
            )
            .execute()
            .await
            .map_err(nl(format!("move {peer_tmp} into {}", netns_path.display())))?;

        // Inside the workload.
        let eth = link_by_name(pod, peer_tmp)
            .await?
            .ok_or_else(|| NetlinkError::NoSuchInterface(peer_tmp.to_string()))?;
        let eth_index = eth.header.index;
        let container_mac = mac_of(&eth).unwrap_or_default();
        pod.link()
            .set(
                LinkUnspec::new_with_index(eth_index)
                    .name(container_ifname.to_string())
                    .build(),
            )
            .execute()
            .await
            .map_err(nl(format!("rename to {container_ifname}")))?;
        pod.address()
            .add(eth_index, IpAddr::V4(ip), 32)
            .execute()
            .await
            .map_err(nl(format!("add {ip}/32 to {container_ifname}")))?;
        pod.link()
            .set(LinkUnspec::new_with_index(eth_index).up().build())
            .execute()
            .await
            .map_err(nl(format!("set {container_ifname} up")))?;
        if let Some(lo) = link_by_name(pod, "lo").await? {
            pod.link()
                .set(LinkUnspec::new_with_index(lo.header.index).up().build())
                .execute()
                .await
                .map_err(nl("set lo up"))?;
        }
        pod.route()
            .add(
                RouteMessageBuilder::<Ipv4Addr>::new()
                    .destination_prefix(GATEWAY, 32)
                    .output_interface(eth_index)
                    .scope(RouteScope::Link)
                    .build(),
            )
            .execute()
            .await
            .map_err(nl("add gateway route"))?;
        pod.route()
            .add(
                RouteMessageBuilder::<Ipv4Addr>::new()
                    .gateway(GATEWAY)
                    .output_interface(eth_index)
                    .build(),
            )
            .execute()
            .await
            .map_err(nl("add default route"))?;
        pod.neighbours()
            .add(eth_index, IpAddr::V4(GATEWAY))
            .link_layer_address(&host_mac)
            .state(NeighbourState::Permanent)
            .execute()
            .await
            .map_err(nl("add gateway neighbour"))?;

        debug!(host_ifname, host_index, %ip, "workload plumbed");
        Ok(Veth {
            host_ifname: host_ifname.to_string(),
            host_ifindex: host_index,
            host_mac,
            container_ifname: container_ifname.to_string(),
            container_mac,
        })
    }
}

impl Netlink {
    /// A named namespace (`ip netns` compatible) joined to the node by a veth pair whose
    /// workload side is `eth0`. Leaves nothing behind when it fails.
    pub async fn create_named(
        &mut self,
        netns_name: &str,
        host_ifname: &str,
        ip: Ipv4Addr,
    ) -> Result<Veth, NetlinkError> {
        let path = netns::create(netns_name)?;
        match self.veth_into(&path, host_ifname, "eth0", ip).await {
            Ok(v) => Ok(v),
            Err(e) => {
                let _ = self.delete_named(netns_name, host_ifname).await;
                Err(e)
            }
        }
    }

    /// Brings the host side up and routes `ip` to it. Idempotent.
    pub async fn up_and_routed(
        &mut self,
        host_ifindex: u32,
        ip: Ipv4Addr,
    ) -> Result<(), NetlinkError> {
        self.node
            .link()
            .set(LinkUnspec::new_with_index(host_ifindex).up().build())
            .execute()
            .await
            .map_err(nl(format!("set ifindex {host_ifindex} up")))?;
        self.node
            .route()
            .add(
                RouteMessageBuilder::<Ipv4Addr>::new()
                    .destination_prefix(ip, 32)
                    .output_interface(host_ifindex)
                    .scope(RouteScope::Link)
                    .build(),
            )
            .replace()
            .execute()
            .await
            .map_err(nl(format!("add route to {ip}")))
    }

    /// Routes `cidr` (another node's pods) via `gateway` (that node), marked as palisade's
    /// so `routes_to_nodes` finds them again after a restart. Idempotent.
    pub async fn route_to_node(
        &mut self,
        cidr: ipnetwork::Ipv4Network,
        gateway: Ipv4Addr,
    ) -> Result<(), NetlinkError> {
        self.node
            .route()
            .add(
                RouteMessageBuilder::<Ipv4Addr>::new()
                    .destination_prefix(cidr.network(), cidr.prefix())
                    .gateway(gateway)
                    .protocol(NODE_ROUTE_PROTOCOL)
                    .build(),
            )
            .replace()
            .execute()
            .await
            .map_err(nl(format!("route {cidr} via {gateway}")))
    }

    pub async fn delete_route_to_node(
        &mut self,
        cidr: ipnetwork::Ipv4Network,
        gateway: Ipv4Addr,
    ) -> Result<(), NetlinkError> {
        let r = self
            .node
            .route()
            .del(
                RouteMessageBuilder::<Ipv4Addr>::new()
                    .destination_prefix(cidr.network(), cidr.prefix())
                    .gateway(gateway)
                    .protocol(NODE_ROUTE_PROTOCOL)
                    .build(),
            )
            .execute()
            .await;
        match r {
            Err(rtnetlink::Error::NetlinkError(m)) if m.raw_code() == -libc::ESRCH => Ok(()),
            other => other.map_err(nl(format!("delete the route {cidr} via {gateway}"))),
        }
    }

    /// The routes to other nodes' pods this agent (or an earlier one) made.
    pub async fn routes_to_nodes(
        &mut self,
    ) -> Result<Vec<(ipnetwork::Ipv4Network, Ipv4Addr)>, NetlinkError> {
        use netlink_packet_route::route::{RouteAddress, RouteAttribute};
        let mut out = Vec::new();
        let mut routes = self
            .node
            .route()
            .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
            .execute();
        while let Some(r) = routes.try_next().await.map_err(nl("list routes"))? {
            if r.header.protocol != NODE_ROUTE_PROTOCOL {
                continue;
            }
            let mut dst = None;
            let mut via = None;
            for a in &r.attributes {
                match a {
                    RouteAttribute::Destination(RouteAddress::Inet(d)) => dst = Some(*d),
                    RouteAttribute::Gateway(RouteAddress::Inet(g)) => via = Some(*g),
                    _ => {}
                }
            }
            if let (Some(d), Some(g)) = (dst, via)
                && let Ok(cidr) = ipnetwork::Ipv4Network::new(d, r.header.destination_prefix_length)
            {
                out.push((cidr, g));
            }
        }
        Ok(out)
    }

    /// Removes a named namespace and its veth (idempotent).
    pub async fn delete_named(
        &mut self,
        netns_name: &str,
        host_ifname: &str,
    ) -> Result<(), NetlinkError> {
        self.delete_link(host_ifname).await?;
        netns::delete(netns_name)?;
        Ok(())
    }

    /// Deletes an interface of the node, and with a veth its peer (idempotent).
    pub async fn delete_link(&mut self, ifname: &str) -> Result<(), NetlinkError> {
        if let Some(link) = link_by_name(&self.node, ifname).await? {
            self.node
                .link()
                .del(link.header.index)
                .execute()
                .await
                .map_err(nl(format!("delete {ifname}")))?;
        }
        Ok(())
    }

    /// The index of a node interface, if it exists.
    pub async fn ifindex(&mut self, ifname: &str) -> Result<Option<u32>, NetlinkError> {
        Ok(link_by_name(&self.node, ifname)
            .await?
            .map(|l| l.header.index))
    }

    /// The node interface, if it exists.
    pub async fn link(&mut self, ifname: &str) -> Result<Option<LinkMessage>, NetlinkError> {
        link_by_name(&self.node, ifname).await
    }

    /// The node's IPv4 addresses, loopback's excepted.
    pub async fn addresses(&mut self) -> Result<Vec<Ipv4Addr>, NetlinkError> {
        use netlink_packet_route::address::AddressAttribute;
        let mut out = Vec::new();
        let mut addrs = self.node.address().get().execute();
        while let Some(msg) = addrs.try_next().await.map_err(nl("list addresses"))? {
            for attr in &msg.attributes {
                if let AddressAttribute::Address(IpAddr::V4(a)) = attr
                    && !a.is_loopback()
                {
                    out.push(*a);
                }
            }
        }
        out.sort();
        out.dedup();
        Ok(out)
    }

    /// The host side of the veth whose peer is `ifname` inside the namespace at `netns_path`
    /// (what a chained plugin needs from a bridge's or ptp's attachment), if it is a veth.
    pub async fn host_peer(
        &mut self,
        netns_path: &Path,
        ifname: &str,
    ) -> Result<Option<(String, u32)>, NetlinkError> {
        let pod = handle_in(netns_path)?;
        let Some(link) = link_by_name(&pod, ifname).await? else {
            return Err(NetlinkError::NoSuchInterface(format!(
                "{ifname} in {}",
                netns_path.display()
            )));
        };
        let Some(peer_index) = link.attributes.iter().find_map(|a| match a {
            LinkAttribute::Link(i) => Some(*i),
            _ => None,
        }) else {
            return Ok(None);
        };
        let mut links = self.node.link().get().match_index(peer_index).execute();
        let peer = match links.try_next().await {
            Ok(l) => l,
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => None,
            Err(e) => return Err(nl(format!("get link {peer_index}"))(e)),
        };
        Ok(peer.and_then(|l| {
            l.attributes.iter().find_map(|a| match a {
                LinkAttribute::IfName(n) => Some((n.clone(), peer_index)),
                _ => None,
            })
        }))
    }

    /// The link layer of a workload's veth: the MACs of its host side (`host_ifindex`) and of
    /// its peer `ifname` inside the namespace at `netns_path`, and the bridge the host side is
    /// a port of. A peer that cannot be read leaves its MAC zero (unknown).
    pub async fn link_layer(
        &mut self,
        host_ifindex: u32,
        netns_path: &Path,
        ifname: &str,
    ) -> Result<LinkLayerInfo, NetlinkError> {
        use netlink_packet_route::link::{InfoKind, LinkInfo};
        let host = self
            .link_by_index(host_ifindex)
            .await?
            .ok_or_else(|| NetlinkError::NoSuchInterface(format!("ifindex {host_ifindex}")))?;
        let host_mac = mac_of(&host).unwrap_or_default();
        let master = host.attributes.iter().find_map(|a| match a {
            LinkAttribute::Controller(i) => Some(*i),
            _ => None,
        });
        let bridge = match master {
            Some(i) => self.link_by_index(i).await?.filter(|m| {
                m.attributes.iter().any(|a| {
                    matches!(a, LinkAttribute::LinkInfo(infos)
                        if infos.iter().any(|i| matches!(i, LinkInfo::Kind(InfoKind::Bridge))))
                })
            }),
            None => None,
        };
        let mac = match handle_in(netns_path) {
            Ok(pod) => link_by_name(&pod, ifname)
                .await?
                .as_ref()
                .and_then(mac_of)
                .unwrap_or_default(),
            Err(e) => {
                debug!(netns = %netns_path.display(), error = %e, "workload MAC not read");
                Vec::new()
            }
        };
        Ok(LinkLayerInfo {
            mac: six(&mac),
            host_mac: six(&host_mac),
            bridge: bridge.map(|b| (b.header.index, six(&mac_of(&b).unwrap_or_default()))),
        })
    }

    async fn link_by_index(&mut self, index: u32) -> Result<Option<LinkMessage>, NetlinkError> {
        let mut links = self.node.link().get().match_index(index).execute();
        match links.try_next().await {
            Ok(l) => Ok(l),
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => Ok(None),
            Err(e) => Err(nl(format!("get link {index}"))(e)),
        }
    }

    /// Whether `ifname` inside the namespace at `netns_path` is up with `ip`.
    pub async fn container_side_ok(
        &mut self,
        netns_path: &Path,
        ifname: &str,
        ip: Ipv4Addr,
    ) -> Result<bool, NetlinkError> {
        use netlink_packet_route::address::AddressAttribute;
        let pod = handle_in(netns_path)?;
        let Some(link) = link_by_name(&pod, ifname).await? else {
            return Ok(false);
        };
        let mut addrs = pod
            .address()
            .get()
            .set_link_index_filter(link.header.index)
            .execute();
        while let Some(msg) = addrs.try_next().await.map_err(nl("list addresses"))? {
            if msg
                .attributes
                .iter()
                .any(|a| matches!(a, AddressAttribute::Address(IpAddr::V4(a)) if *a == ip))
            {
                return Ok(true);
            }
        }
        Ok(false)
    }
}
