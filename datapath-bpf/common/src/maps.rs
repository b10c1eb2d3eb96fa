//! Map and program names, and map capacities. The names are the ELF symbols in the BPF object
//! and the file names under the agent's bpffs directory, so they carry the layout version.
//!
//! Each name is written once, in the table below. Userspace opens maps by the constants; the
//! BPF programs declare their maps with [`bpf_map!`](crate::bpf_map) and their entry points
//! with [`bpf_classifier!`](crate::bpf_classifier), which take the name from the same row, so
//! the two sides cannot disagree: a name missing on either side fails to compile.

/// The one table of names. `$d` is a literal `$`, so that the macros it defines can take
/// repetitions of their own.
macro_rules! abi_names {
    (
        $d:tt
        maps { $( $(#[$mdoc:meta])* $map:ident = $map_name:literal, )* }
        classifiers { $( $(#[$pdoc:meta])* $prog:ident = $prog_fn:ident, )* }
        xdp { $( $(#[$xdoc:meta])* $xprog:ident = $xprog_fn:ident, )* }
        sk_lookup { $( $(#[$sdoc:meta])* $sprog:ident = $sprog_fn:ident, )* }
    ) => {
        $( $(#[$mdoc])* pub const $map: &str = $map_name; )*
        $( $(#[$pdoc])* pub const $prog: &str = stringify!($prog_fn); )*
        $( $(#[$xdoc])* pub const $xprog: &str = stringify!($xprog_fn); )*
        $( $(#[$sdoc])* pub const $sprog: &str = stringify!($sprog_fn); )*

        /// Declares a BPF map under its ABI name:
        /// `palisade_common::bpf_map!(IPCACHE, pub static IPCACHE: LpmTrie<K, V> = ...;)`.
        #[macro_export]
        macro_rules! bpf_map {
            $(
                ($map, $d($d item:tt)*) => {
                    #[aya_ebpf::macros::map(name = $map_name)]
                    $d($d item)*
                };
            )*
        }

        /// Declares a TC classifier under its ABI name:
        /// `palisade_common::bpf_classifier!(PROG_FROM_ENDPOINT, |ctx| body)`.
        #[macro_export]
        macro_rules! bpf_classifier {
            $(
                ($prog, |$d ctx:ident| $d body:expr) => {
                    #[aya_ebpf::macros::classifier]
                    pub fn $prog_fn($d ctx: aya_ebpf::programs::TcContext) -> i32 {
                        $d body
                    }
                };
            )*
        }

        /// Declares an XDP program under its ABI name:
        /// `palisade_common::bpf_xdp!(PROG_PREFILTER, |ctx| body)`.
        #[macro_export]
        macro_rules! bpf_xdp {
            $(
                ($xprog, |$d ctx:ident| $d body:expr) => {
                    #[aya_ebpf::macros::xdp]
                    pub fn $xprog_fn($d ctx: aya_ebpf::programs::XdpContext) -> u32 {
                        $d body
                    }
                };
            )*
        }

        /// Declares an sk_lookup program under its ABI name:
        /// `palisade_common::bpf_sk_lookup!(PROG_PROXY_LOOKUP, |ctx| body)`.
        #[macro_export]
        macro_rules! bpf_sk_lookup {
            $(
                ($sprog, |$d ctx:ident| $d body:expr) => {
                    #[aya_ebpf::macros::sk_lookup]
                    pub fn $sprog_fn($d ctx: aya_ebpf::programs::SkLookupContext) -> u32 {
                        $d body
                    }
                };
            )*
        }
    };
}

abi_names! { $
    maps {
        IPCACHE = "IPCACHE_V1",
        /// V2: the endpoint's and its host side's MACs.
        ENDPOINTS = "ENDPOINTS_V2",
        POLICY = "POLICY_V1",
        /// V2: ICMP keys hold identifier and type; entries carry the proxy's client address.
        CONNTRACK = "CT_V2",
        METRICS = "METRICS_V1",
        FLOW_EVENTS = "FLOW_EVENTS_V1",
        /// V2: flags (fast path, conntrack accounting).
        CONFIG = "CONFIG_V2",
        EVENT_RATE = "EVENT_RATE_V1",
        /// A local endpoint's address (16 bytes, IPv4 in the first 4) -> the ifindex of its
        /// host-side veth: where the fast path delivers. A hint only: the endpoint behind the
        /// ifindex must own the address.
        ENDPOINT_BY_ADDR = "ENDPOINT_BY_ADDR_V1",
        /// The XDP prefilter's deny list: source prefix -> counter slot.
        PREFILTER = "PREFILTER_V1",
        /// Per-CPU packets and bytes the prefilter dropped, per counter slot.
        PREFILTER_COUNTERS = "PREFILTER_COUNTERS_V1",
        /// The prefilter's own flow-event token bucket (one slot, per CPU).
        PREFILTER_EVENT_RATE = "PREFILTER_EVENT_RATE_V1",
        /// SYNs for a tuple in TIME_WAIT at the proxy, handed to the kernel's TIME_WAIT
        /// handling, whose listener lookup `PROG_PROXY_LOOKUP` answers (see `proxy`). Not
        /// pinned: it only lives from one packet to the next.
        TIME_WAIT_SYNS = "TIME_WAIT_SYNS_V1",
        /// The proxy's TCP listeners by port (a SOCKHASH the agent fills; not pinned, the
        /// sockets are the running agent's).
        PROXY_LISTENERS = "PROXY_LISTENERS_V1",
    }
    classifiers {
        /// TC ingress of an endpoint's host-side veth: what the endpoint sends.
        PROG_FROM_ENDPOINT = tc_from_endpoint,
        /// TC egress of an endpoint's host-side veth: what the endpoint receives.
        PROG_TO_ENDPOINT = tc_to_endpoint,
    }
    xdp {
        /// XDP on a host-facing interface: the CIDR deny list, before any other processing.
        PROG_PREFILTER = xdp_prefilter,
    }
    sk_lookup {
        /// sk_lookup in the node namespace: the proxy's listener for the SYNs recorded in
        /// `TIME_WAIT_SYNS`, nothing for any other lookup.
        PROG_PROXY_LOOKUP = sk_lookup_proxy,
    }
}

pub const IPCACHE_MAX_ENTRIES: u32 = 65_536;
pub const ENDPOINTS_MAX_ENTRIES: u32 = 16_384;
pub const ENDPOINT_BY_ADDR_MAX_ENTRIES: u32 = ENDPOINTS_MAX_ENTRIES;
pub const POLICY_MAX_ENTRIES: u32 = 1 << 20;
pub const CONNTRACK_MAX_ENTRIES: u32 = 262_144;
/// Ring buffer size in bytes (power of two, multiple of the page size).
pub const FLOW_EVENTS_BYTES: u32 = 4 << 20;
/// Pending flow events (bytes) past which a submit wakes the agent. Below it the agent is not
/// woken per event (thousands a second under many new connections, each a context switch or
/// two) but drains the ring on its own short timer (`FLOW_EVENTS_DRAIN_MS`).
pub const FLOW_EVENTS_WAKEUP_BYTES: u64 = 256 << 10;
/// How often the agent drains the flow ring without being woken, in milliseconds: the most
/// a flow waits before `palisade observe` can show it.
pub const FLOW_EVENTS_DRAIN_MS: u64 = 50;
/// Slots in the per-endpoint event rate limiter (indexed by endpoint id modulo this).
pub const EVENT_RATE_SLOTS: u32 = 16_384;
