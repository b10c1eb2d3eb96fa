//! Flow events the datapath writes to the ring buffer: the verdict of each new connection and
//! every drop.

use crate::{assert_layout, user_pod};

/// A new connection was judged (forwarded, redirected or audited).
pub const EVENT_NEW_CONNECTION: u8 = 1;
/// A packet was dropped.
pub const EVENT_DROP: u8 = 2;
/// An established connection was re-checked after a policy change and is no longer allowed.
pub const EVENT_REVALIDATION_DROP: u8 = 3;
/// An established connection was re-checked after a policy change and is no longer allowed,
/// but the endpoint is in audit mode: it goes on, audited.
pub const EVENT_REVALIDATION_AUDIT: u8 = 4;
/// A packet from a denied source CIDR was dropped by the XDP prefilter on a host-facing
/// interface (`ifindex`), before any other processing; `endpoint_id` is 0.
pub const EVENT_PREFILTER_DROP: u8 = 5;

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct FlowEvent {
    /// Monotonic clock (bpf_ktime_get_ns).
    pub timestamp_ns: u64,
    pub endpoint_id: u32,
    pub src_identity: u32,
    pub dst_identity: u32,
    /// Policy rule behind the verdict (0 when none, e.g. default deny or no enforcement).
    pub rule_id: u32,
    pub packet_len: u32,
    pub ifindex: u32,
    pub src_addr: [u8; 16],
    pub dst_addr: [u8; 16],
    pub src_port_be: u16,
    pub dst_port_be: u16,
    pub family: u8,
    pub protocol: u8,
    pub direction: u8,
    pub verdict: u8,
    pub drop_reason: u8,
    pub tcp_flags: u8,
    pub kind: u8,
    pub _pad: [u8; 5],
}

assert_layout!(FlowEvent, size = 80, align = 8, {
    timestamp_ns: 0, endpoint_id: 8, src_identity: 12, dst_identity: 16, rule_id: 20,
    packet_len: 24, ifindex: 28, src_addr: 32, dst_addr: 48, src_port_be: 64, dst_port_be: 66,
    family: 68, protocol: 69, direction: 70, verdict: 71, drop_reason: 72, tcp_flags: 73, kind: 74,
});
user_pod!(FlowEvent);
