//! Endpoints, keyed by the ifindex of their host-side veth.

use crate::{assert_layout, user_pod};

/// Endpoint flag: the endpoint is selected by a policy with ingress rules, so ingress that no
/// rule allows is dropped. Unset: ingress is allowed (Kubernetes semantics).
pub const FLAG_INGRESS_ENFORCED: u32 = 1 << 0;
/// Same for egress.
pub const FLAG_EGRESS_ENFORCED: u32 = 1 << 1;
/// Policy audit mode: what policy would drop is forwarded and reported as AUDIT.
pub const FLAG_AUDIT: u32 = 1 << 2;
/// Only policies in audit put ingress in default deny: ingress no entry matches is forwarded
/// as AUDIT (see `policy::flags::STAGED_DENY` for what entries say).
pub const FLAG_STAGED_INGRESS_ENFORCED: u32 = 1 << 3;
/// Same for egress.
pub const FLAG_STAGED_EGRESS_ENFORCED: u32 = 1 << 4;

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
}

assert_layout!(EndpointInfo, size = 32, align = 4, { endpoint_id: 0, identity: 4, flags: 8, family: 12, addr: 16 });
user_pod!(EndpointInfo);
