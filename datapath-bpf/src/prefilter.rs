//! The XDP prefilter on the node's host-facing interfaces: a packet whose IPv4 source is in the
//! CIDR deny list is dropped before the kernel does anything else with it, counted for its
//! entry and sampled into the flow ring buffer.
//!
//! It never drops what one of this node's endpoints sent: a source address the ipcache knows
//! as a local endpoint passes (it is judged by that endpoint's own programs). What is not
//! IPv4, or too short to read a source from, is not the prefilter's to judge and passes too;
//! only a deny-list match drops.

use aya_ebpf::{
    bindings::xdp_action,
    maps::{LpmTrie, PerCpuArray, lpm_trie::Key},
    programs::XdpContext,
};
use palisade_common::{
    config::EventRateState,
    family,
    flow::{EVENT_PREFILTER_DROP, FlowEvent},
    identity,
    ipcache::{IPCACHE_PREFIX_OFFSET_BITS, IpcacheKey},
    metrics::{MetricValue, OUTCOME_EVENTS_LOST, OUTCOME_EVENTS_RATE_LIMITED},
    prefilter::{
        PREFILTER_MAX_ENTRIES, PREFILTER_PREFIX_OFFSET_BITS, PrefilterKey, PrefilterValue,
        take_event_token,
    },
    proto,
    reason::{drop, verdict},
};

use crate::{
    conntrack::now_ns,
    events,
    maps::{CONFIG, FLOW_EVENTS, IPCACHE},
    packet::{ETH_HLEN, ETH_P_IP},
};

palisade_common::bpf_map!(
    PREFILTER,
    pub static PREFILTER: LpmTrie<PrefilterKey, PrefilterValue> =
        LpmTrie::pinned(PREFILTER_MAX_ENTRIES, 0);
);

palisade_common::bpf_map!(
    PREFILTER_COUNTERS,
    pub static PREFILTER_COUNTERS: PerCpuArray<MetricValue> =
        PerCpuArray::pinned(PREFILTER_MAX_ENTRIES, 0);
);

palisade_common::bpf_map!(
    PREFILTER_EVENT_RATE,
    pub static PREFILTER_EVENT_RATE: PerCpuArray<EventRateState> = PerCpuArray::pinned(1, 0);
);

const ETH_P_IP_BE: u16 = ETH_P_IP.to_be();
const IPV4_MIN_HLEN: usize = 20;
const IP_OFFSET_MASK_BE: u16 = 0x1fff_u16.to_be();

pub fn run(ctx: &XdpContext) -> u32 {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + ETH_HLEN + IPV4_MIN_HLEN > end {
        return xdp_action::XDP_PASS;
    }
    // SAFETY: the Ethernet and minimal IPv4 headers lie within [data, data_end), checked above.
    let ethertype = unsafe { core::ptr::read_unaligned((start + 12) as *const u16) };
    if ethertype != ETH_P_IP_BE {
        return xdp_action::XDP_PASS;
    }
    let ip = start + ETH_HLEN;
    // SAFETY: within the checked headers (source address at offset 12 of the IPv4 header).
    let saddr = unsafe { core::ptr::read_unaligned((ip + 12) as *const [u8; 4]) };
    let key = Key::new(PREFILTER_PREFIX_OFFSET_BITS + 32, PrefilterKey::ipv4(saddr));
    let Some(entry) = PREFILTER.get(&key) else {
        return xdp_action::XDP_PASS;
    };
    let slot = entry.counter_slot;
    // One of our endpoints' own addresses is never the prefilter's to drop.
    let src = ipcache_of(saddr);
    if src.1 != 0 {
        return xdp_action::XDP_PASS;
    }
    #[expect(
        clippy::cast_possible_truncation,
        reason = "an XDP frame is at most a page long"
    )]
    let len = (end - start) as u32;
    if let Some(c) = PREFILTER_COUNTERS.get_ptr_mut(slot) {
        // SAFETY: per-CPU slot from a successful lookup; no other writer on this CPU.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += u64::from(len);
        }
    }
    events::count(0, drop::PREFILTER_DENIED, len);
    report(ctx, ip, saddr, src.0, len);
    xdp_action::XDP_DROP
}

/// (identity, local endpoint id) of an IPv4 address, as the ipcache says (world, 0 when it
/// does not know it).
#[inline(always)]
fn ipcache_of(addr: [u8; 4]) -> (u32, u32) {
    let key = Key::new(IPCACHE_PREFIX_OFFSET_BITS + 32, IpcacheKey::ipv4(addr));
    match IPCACHE.get(&key) {
        Some(v) => (v.identity, v.endpoint_id),
        None => (identity::WORLD, 0),
    }
}

#[inline(always)]
const fn widen(a: [u8; 4]) -> [u8; 16] {
    [a[0], a[1], a[2], a[3], 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
}

/// Samples the drop into the flow ring buffer, as the prefilter's token bucket allows.
#[inline(never)]
fn report(ctx: &XdpContext, ip: usize, saddr: [u8; 4], src_identity: u32, len: u32) {
    let Some(cfg) = CONFIG.get(0) else { return };
    let Some(rate) = PREFILTER_EVENT_RATE.get_ptr_mut(0) else {
        return;
    };
    let now = now_ns();
    // SAFETY: per-CPU slot from a successful lookup; no other writer on this CPU.
    let rate = unsafe { &mut *rate };
    if !take_event_token(rate, now, cfg.events_per_second, cfg.events_burst) {
        events::count(0, OUTCOME_EVENTS_RATE_LIMITED, 0);
        return;
    }
    let end = ctx.data_end();
    // SAFETY: the IPv4 header's first 20 bytes were bounds-checked by `run`.
    let (ihl_byte, frag_be, protocol, daddr) = unsafe {
        (
            core::ptr::read_unaligned(ip as *const u8),
            core::ptr::read_unaligned((ip + 6) as *const u16),
            core::ptr::read_unaligned((ip + 9) as *const u8),
            core::ptr::read_unaligned((ip + 16) as *const [u8; 4]),
        )
    };
    let l4 = ip + usize::from(ihl_byte & 0x0f) * 4;
    let has_ports = (protocol == proto::TCP || protocol == proto::UDP)
        && frag_be & IP_OFFSET_MASK_BE == 0
        && l4 + 4 <= end;
    let (sport_be, dport_be) = if has_ports {
        // SAFETY: 4 bytes from `l4` are within the packet, checked just above.
        unsafe {
            (
                core::ptr::read_unaligned(l4 as *const u16),
                core::ptr::read_unaligned((l4 + 2) as *const u16),
            )
        }
    } else {
        (0, 0)
    };
    let tcp_flags = if has_ports && protocol == proto::TCP && l4 + 14 <= end {
        // SAFETY: 14 bytes from `l4` are within the packet, checked just above.
        unsafe { core::ptr::read_unaligned((l4 + 13) as *const u8) }
    } else {
        0
    };
    let Some(mut slot) = FLOW_EVENTS.reserve::<FlowEvent>(0) else {
        events::count(0, OUTCOME_EVENTS_LOST, 0);
        return;
    };
    let dst_identity = ipcache_of(daddr).0;
    let ifindex = u32::try_from(ctx.ingress_ifindex()).unwrap_or(0);
    let ev = slot.as_mut_ptr();
    // SAFETY: `ev` points at reserved ring buffer memory of the right size and alignment
    // (checked by the reserve); every field is written before submit.
    unsafe {
        (*ev).timestamp_ns = now;
        (*ev).endpoint_id = 0;
        (*ev).src_identity = src_identity;
        (*ev).dst_identity = dst_identity;
        (*ev).rule_id = 0;
        (*ev).packet_len = len;
        (*ev).ifindex = ifindex;
        (*ev).src_addr = widen(saddr);
        (*ev).dst_addr = widen(daddr);
        (*ev).src_port_be = sport_be;
        (*ev).dst_port_be = dport_be;
        (*ev).family = family::IPV4;
        (*ev).protocol = protocol;
        (*ev).direction = palisade_common::direction::INGRESS;
        (*ev).verdict = verdict::DROPPED;
        (*ev).drop_reason = drop::PREFILTER_DENIED;
        (*ev).tcp_flags = tcp_flags;
        (*ev).kind = EVENT_PREFILTER_DROP;
        (*ev)._pad = [0; 5];
    }
    slot.submit(0);
}
