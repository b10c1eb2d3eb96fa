//! Endpoints, keyed by the ifindex of their host-side veth.

use crate::{assert_layout, user_pod};

/// Endpoint flag: the endpoint is selected by a policy with ingress rules, so ingress that no
/// rule allows is dropped. Unset: ingress is allowed (Kubernetes semantics).
pub const FLAG_INGRESS_ENFORCED: u32 = 1 << 0;
/// Same for egress.
pub const FLAG_EGRESS_ENFORCED: u32 = 1 << 1;
/// Policy audit mode: what policy would drop is forwarded and reported as AUDIT.
pub const FLAG_AUDIT: u32 = 1 << 2;
/// The host-side veth is a port of a Linux bridge (the attachment is chained after the CNI
/// `bridge` plugin): what the endpoint sends is switched at L2, past the node's routing, so a
/// frame handed to the L7 proxy is readdressed to the bridge (`bridge_mac`) and redirected into
/// the bridge device's own ingress (`bridge_ifindex`), where the node's stack takes it as the
/// bridge's. Not passed up through the bridge's port: bridge netfilter (br_netfilter, with
/// `bridge-nf-call-iptables`) orphans a bridged frame's socket, the one assigned for the proxy.
pub const FLAG_BRIDGE_PORT: u32 = 1 << 3;
/// Only policies in audit put ingress in default deny: ingress no entry matches is forwarded
/// as AUDIT (see `policy::flags::STAGED_DENY` for what entries say).
pub const FLAG_STAGED_INGRESS_ENFORCED: u32 = 1 << 4;
/// Same for egress.
pub const FLAG_STAGED_EGRESS_ENFORCED: u32 = 1 << 5;

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct EndpointInfo {
    pub endpoint_id: u32,
    pub identity: u32,
    pub flags: u32,
    pub family: u8,
    pub _pad: [u8; 3],
    /// The endpoint's own address (network byte order); packets leaving the endpoint from any
    /// other source address are dropped as spoofed.
    pub addr: [u8; 16],
    /// `FLAG_BRIDGE_PORT`: the ifindex of the bridge; 0 otherwise.
    pub bridge_ifindex: u32,
    /// MAC of the endpoint's own interface, inside its namespace (zero when unknown).
    pub mac: [u8; 6],
    /// MAC of the host-side veth (zero when unknown).
    pub host_mac: [u8; 6],
    /// `FLAG_BRIDGE_PORT`: the bridge's MAC; zero otherwise.
    pub bridge_mac: [u8; 6],
    pub _pad2: [u8; 2],
}

assert_layout!(EndpointInfo, size = 56, align = 4, { endpoint_id: 0, identity: 4, flags: 8, family: 12, addr: 16, bridge_ifindex: 32, mac: 36, host_mac: 42, bridge_mac: 48 });
user_pod!(EndpointInfo);
