//! A new connection to the proxy whose tuple is still in TIME_WAIT at the proxy.
//!
//! The proxy closes first after answering a request that asked to close (as a server does, and
//! as it must for an HTTP/1.0 client, which may read to the end of the connection), so the
//! TIME_WAIT is on its transparently accepted socket, under the client's own tuple; leaving it
//! to the client instead would cost the client its ports. A client that reuses that port
//! (it holds no TIME_WAIT for it) sends a SYN the datapath would hand (by `bpf_sk_assign`) to
//! the listener, past the kernel's TIME_WAIT handling; the listener finds the tuple taken and
//! drops it, and the client connects only after retransmitting. Instead, `tc_from_endpoint` assigns such a SYN to the TIME_WAIT
//! socket itself, so the kernel judges it as it judges any SYN for a TIME_WAIT tuple
//! (`tcp_timewait_state_process`: a newer SYN ends the TIME_WAIT and opens a connection), and
//! records the tuple in `TIME_WAIT_SYNS`. The kernel then looks for the listener of the
//! original destination; `sk_lookup_proxy`, attached to the node namespace, answers that
//! lookup for recorded tuples only, with the proxy's listener from `PROXY_LISTENERS`. Every
//! other lookup is left alone, and the SYN was judged by policy before it was recorded.

use crate::{assert_layout, user_pod};

/// A TCP tuple as the client sent it: its address and port, and its original destination's.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct TimeWaitSynKey {
    pub saddr_be: u32,
    pub daddr_be: u32,
    pub sport_be: u16,
    pub dport_be: u16,
}

assert_layout!(TimeWaitSynKey, size = 12, align = 4, {
    saddr_be: 0, daddr_be: 4, sport_be: 8, dport_be: 10,
});

/// Which listener takes the connection: its port, the key of `PROXY_LISTENERS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct TimeWaitSynValue {
    /// Host byte order.
    pub proxy_port: u32,
}

assert_layout!(TimeWaitSynValue, size = 4, align = 4, { proxy_port: 0 });
user_pod!(TimeWaitSynKey, TimeWaitSynValue);

/// Recorded SYNs not yet looked up (an LRU: a SYN the kernel never looked a listener up for,
/// say one it found too old, just ages out).
pub const TIME_WAIT_SYNS_MAX_ENTRIES: u32 = 4096;
/// The proxy's TCP listeners (HTTP, DNS over TCP), by port.
pub const PROXY_LISTENERS_MAX_ENTRIES: u32 = 8;
