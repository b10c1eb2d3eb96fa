//! Accounting: per-CPU counters for every packet, and flow events (new connections, drops) in
//! the ring buffer, rate-limited per endpoint; what is lost or suppressed is counted.

use aya_ebpf::bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP};
use palisade_common::{
    config::Config,
    flow::FlowEvent,
    maps::{EVENT_RATE_SLOTS, FLOW_EVENTS_WAKEUP_BYTES},
    metrics::{OUTCOME_EVENTS_LOST, OUTCOME_EVENTS_RATE_LIMITED, metric_index},
};

use crate::{
    maps::{EVENT_RATE, FLOW_EVENTS, METRICS},
    packet::Packet,
};

#[inline(always)]
pub fn count(direction: u8, outcome: u8, bytes: u32) {
    if let Some(m) = METRICS.get_ptr_mut(metric_index(direction, outcome)) {
        // SAFETY: per-CPU slot from a successful lookup; no other writer on this CPU.
        unsafe {
            (*m).packets += 1;
            (*m).bytes += u64::from(bytes);
        }
    }
}

/// Token bucket per endpoint (per CPU): `events_per_second` refill, `events_burst` capacity.
#[inline(always)]
fn rate_allows(cfg: &Config, endpoint_id: u32, now: u64) -> bool {
    if cfg.events_per_second == 0 {
        return true;
    }
    let Some(state) = EVENT_RATE.get_ptr_mut(endpoint_id % EVENT_RATE_SLOTS) else {
        return false;
    };
    // SAFETY: per-CPU slot from a successful lookup.
    let state = unsafe { &mut *state };
    let refill = palisade_common::config::tokens_earned(
        now.saturating_sub(state.last_refill_ns),
        cfg.events_per_second,
    );
    if refill > 0 {
        let tokens = u64::from(state.tokens) + refill;
        let burst = u64::from(cfg.events_burst.max(1));
        #[expect(
            clippy::cast_possible_truncation,
            reason = "capped at `burst`, a u32; a checked conversion would add a branch"
        )]
        let capped = tokens.min(burst) as u32;
        state.tokens = capped;
        state.last_refill_ns = now;
    }
    if state.tokens == 0 {
        return false;
    }
    state.tokens -= 1;
    true
}

/// Everything a flow event says beyond the packet itself.
pub struct EventMeta {
    pub kind: u8,
    pub verdict: u8,
    pub drop_reason: u8,
    pub direction: u8,
    pub endpoint_id: u32,
    pub ifindex: u32,
    pub src_identity: u32,
    pub dst_identity: u32,
    pub rule_id: u32,
    pub packet_len: u32,
}

/// Writes one flow event straight into the ring buffer (rate limit permitting). `meta` is
/// a closure so its fields are computed in place rather than staged on the 512-byte stack.
#[inline(always)]
pub fn emit(
    cfg: &Config,
    now: u64,
    endpoint_id: u32,
    pkt: &Packet,
    meta: impl FnOnce() -> EventMeta,
) {
    if !rate_allows(cfg, endpoint_id, now) {
        count(0, OUTCOME_EVENTS_RATE_LIMITED, 0);
        return;
    }
    let Some(mut slot) = FLOW_EVENTS.reserve::<FlowEvent>(0) else {
        count(0, OUTCOME_EVENTS_LOST, 0);
        return;
    };
    let m = meta();
    let ev = slot.as_mut_ptr();
    // SAFETY: `ev` points at reserved ring buffer memory of the right size and alignment
    // (checked by the reserve); every field is written before submit.
    unsafe {
        (*ev).timestamp_ns = now;
        (*ev).endpoint_id = m.endpoint_id;
        (*ev).src_identity = m.src_identity;
        (*ev).dst_identity = m.dst_identity;
        (*ev).rule_id = m.rule_id;
        (*ev).packet_len = m.packet_len;
        (*ev).ifindex = m.ifindex;
        // The packet as it is: an ICMP error by its own addresses, not the embedded tuple's.
        (*ev).src_addr = pkt.outer_saddr;
        (*ev).dst_addr = pkt.outer_daddr;
        (*ev).src_port_be = if pkt.related { 0 } else { pkt.sport_be };
        (*ev).dst_port_be = if pkt.related { 0 } else { pkt.dport_be };
        (*ev).family = palisade_common::family::IPV4;
        (*ev).protocol = if pkt.related {
            palisade_common::proto::ICMP
        } else {
            pkt.protocol
        };
        (*ev).direction = m.direction;
        (*ev).verdict = m.verdict;
        (*ev).drop_reason = m.drop_reason;
        (*ev).tcp_flags = pkt.tcp_flags;
        (*ev).kind = m.kind;
        (*ev)._pad = [0; 5];
    }
    // The agent drains the ring on a timer; it is woken only for a batch worth the switch.
    let wakeup = if FLOW_EVENTS.query(u64::from(BPF_RB_AVAIL_DATA)) >= FLOW_EVENTS_WAKEUP_BYTES {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    };
    slot.submit(u64::from(wakeup));
}
