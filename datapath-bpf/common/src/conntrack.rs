//! Connection tracking: an LRU hash on the 5-tuple plus the scope (which endpoint direction
//! created the entry). Replies are found by looking up the reversed tuple.

use crate::{assert_layout, user_pod};

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CtKey {
    /// Network byte order; IPv4 uses the first 4 bytes.
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    /// For ICMP queries `sport_be` holds the identifier and `dport_be` the request's type
    /// (the key of a reply is found turned around, with the reply type turned into the
    /// request's); ICMP that is no query is never tracked.
    pub sport_be: u16,
    pub dport_be: u16,
    pub protocol: u8,
    pub family: u8,
    /// `direction::EGRESS`: created by the source endpoint's egress check;
    /// `direction::INGRESS`: by the destination endpoint's ingress check.
    pub scope: u8,
    pub _pad: u8,
}

/// TCP: a packet of the reply direction has been seen (the connection is established).
pub const CT_FLAG_SEEN_REPLY: u16 = 1 << 0;
/// TCP FIN seen in the original direction.
pub const CT_FLAG_FIN_FORWARD: u16 = 1 << 1;
/// TCP FIN seen in the reply direction.
pub const CT_FLAG_FIN_REPLY: u16 = 1 << 2;
/// The connection is redirected to the L7 proxy.
pub const CT_FLAG_PROXY_REDIRECT: u16 = 1 << 3;
/// The connection was let through by audit mode, not by policy.
pub const CT_FLAG_AUDIT: u16 = 1 << 4;
/// The connection is the proxy's upstream leg: `peer_identity` is the original client's
/// (whose address the packet carries in skb->priority, see `mark::FROM_PROXY`), not the
/// identity of the source address (the node).
pub const CT_FLAG_FROM_PROXY: u16 = 1 << 5;

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct CtEntry {
    /// Monotonic clock (bpf_ktime_get_ns); the entry is dead once the clock passes it.
    pub expires_ns: u64,
    pub created_ns: u64,
    pub packets: u64,
    pub bytes: u64,
    pub endpoint_id: u32,
    /// Identity of the peer when the entry was created or last revalidated.
    pub peer_identity: u32,
    /// Policy rule that allowed the connection.
    pub rule_id: u32,
    /// `Config::policy_revision` at the last policy check; a different current revision makes
    /// the next packet re-check policy, so a connection that policy no longer allows stops.
    pub policy_revision: u32,
    pub flags: u16,
    pub proxy_port_be: u16,
    pub _pad: [u8; 4],
    /// The proxy's upstream leg (`CT_FLAG_FROM_PROXY`): the original client's address, which
    /// revalidation judges the connection by, as it would judge the client's own connection
    /// (identity and CIDR alias from the ipcache). Zero otherwise.
    pub proxy_client: [u8; 16],
}

assert_layout!(CtKey, size = 40, align = 2, { saddr: 0, daddr: 16, sport_be: 32, dport_be: 34, protocol: 36, family: 37, scope: 38 });
assert_layout!(CtEntry, size = 72, align = 8, { expires_ns: 0, created_ns: 8, packets: 16, bytes: 24, endpoint_id: 32, peer_identity: 36, rule_id: 40, policy_revision: 44, flags: 48, proxy_port_be: 50, proxy_client: 56 });
user_pod!(CtKey, CtEntry);
