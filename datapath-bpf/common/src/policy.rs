//! The policy map: one LPM trie for all endpoints.
//!
//! Key data is `{endpoint, peer identity, direction | protocol | port}`; the first 72 bits are
//! always matched exactly, the protocol byte and the port bits are prefix-matched, so one entry
//! can cover "any protocol", "any port of TCP" or an aligned port range. The datapath looks up
//! the peer's identity and the `identity::ANY` wildcard; userspace compiles the map so that the
//! longest match within one identity is already the right answer (a deny covering a more
//! specific allow is pushed down onto it), and the datapath lets deny win across the lookups.

use crate::{assert_layout, user_pod};

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyKey {
    pub endpoint_id: u32,
    /// Peer identity; `identity::ANY` (0) is the wildcard entry.
    pub identity: u32,
    /// `direction::INGRESS` or `direction::EGRESS`.
    pub direction: u8,
    /// IP protocol; meaningful only when the prefix covers it.
    pub protocol: u8,
    /// Destination port in network byte order (for ICMP: the message type).
    pub dport_be: u16,
}

/// Prefix length (bits) matching endpoint, identity and direction exactly: any protocol/port.
pub const POLICY_PREFIX_ANY_PROTO: u32 = 72;
/// Prefix length matching a protocol with any port.
pub const POLICY_PREFIX_ANY_PORT: u32 = 80;
/// Prefix length of a fully specified key.
pub const POLICY_PREFIX_FULL: u32 = 96;

pub mod action {
    /// No action of the policies in force: an entry only the policies in audit have (see
    /// `flags::STAGED_DENY`). It never wins a lookup.
    pub const NONE: u8 = 0;
    pub const ALLOW: u8 = 1;
    pub const DENY: u8 = 2;
    /// Allow, and hand the connection to the L7 proxy listening on `proxy_port_be`.
    pub const REDIRECT: u8 = 3;
}

/// `PolicyValue::flags`.
pub mod flags {
    /// The policies in audit would deny what this entry matches, although the policies in
    /// force allow it (or, with `action::NONE`, have no entry here): it is forwarded as AUDIT,
    /// naming `rule_id`. An entry with `action::NONE` and no such flag is one where only the
    /// policies in audit allow.
    pub const STAGED_DENY: u8 = 1 << 0;
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct PolicyValue {
    pub action: u8,
    /// `flags::*` bits.
    pub flags: u8,
    pub proxy_port_be: u16,
    /// Which policy rule produced this entry (the agent's rule table resolves it), so flows
    /// and traces can name the policy.
    pub rule_id: u32,
}

assert_layout!(PolicyKey, size = 12, align = 4, { endpoint_id: 0, identity: 4, direction: 8, protocol: 9, dport_be: 10 });
assert_layout!(PolicyValue, size = 8, align = 4, { action: 0, flags: 1, proxy_port_be: 2, rule_id: 4 });
user_pod!(PolicyKey, PolicyValue);
