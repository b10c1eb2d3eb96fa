//! The XDP prefilter: a deny list of source CIDRs on the node's host-facing interfaces, judged
//! before the kernel allocates anything for the packet.
//!
//! `PREFILTER` is an LPM trie from a source prefix to the entry's counter slot; each slot's
//! packets and bytes are counted per CPU in `PREFILTER_COUNTERS` (a `MetricValue` per slot), so
//! the drop path never writes a cache line another CPU writes. The agent chooses the slots,
//! zeroes a slot's counters before giving it to a new entry, and keeps the list across restarts
//! (the maps are pinned). Sampled drops go to the flow ring buffer as `EVENT_PREFILTER_DROP`
//! with `reason::drop::PREFILTER_DENIED`, rate-limited by the one-slot `PREFILTER_EVENT_RATE`.

use crate::{assert_layout, user_pod};

/// Entries the deny list holds (and counter slots).
pub const PREFILTER_MAX_ENTRIES: u32 = 16_384;

/// The trie's key: a source prefix, laid out as the ipcache's (`{ prefix_len, family + pad,
/// addr }`, so an IPv4 /24 has `prefix_len = 32 + 24`). One type, so the two cannot drift.
pub type PrefilterKey = crate::ipcache::IpcacheKey;

/// Bits of the LPM key before the address starts.
pub const PREFILTER_PREFIX_OFFSET_BITS: u32 = crate::ipcache::IPCACHE_PREFIX_OFFSET_BITS;

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct PrefilterValue {
    /// Index of this entry's counters in `PREFILTER_COUNTERS` (< `PREFILTER_MAX_ENTRIES`).
    pub counter_slot: u32,
    /// Reserved, 0.
    pub flags: u32,
}

assert_layout!(PrefilterValue, size = 8, align = 4, { counter_slot: 0, flags: 4 });
user_pod!(PrefilterValue);

/// Token bucket of the prefilter's flow events: refills `per_second` tokens a second up to
/// `burst` (at least 1) and takes one; false when none is left. `per_second == 0` is unlimited.
#[inline]
pub fn take_event_token(
    state: &mut crate::config::EventRateState,
    now_ns: u64,
    per_second: u32,
    burst: u32,
) -> bool {
    if per_second == 0 {
        return true;
    }
    let refill =
        crate::config::tokens_earned(now_ns.saturating_sub(state.last_refill_ns), per_second);
    if refill > 0 {
        let tokens = (u64::from(state.tokens) + refill).min(u64::from(burst.max(1)));
        state.tokens = u32::try_from(tokens).unwrap_or(u32::MAX);
        state.last_refill_ns = now_ns;
    }
    if state.tokens == 0 {
        return false;
    }
    state.tokens -= 1;
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::EventRateState;

    const NS_PER_SEC: u64 = 1_000_000_000;

    #[test]
    fn the_event_bucket_allows_its_burst_then_its_rate() {
        let mut s = EventRateState::default();
        let t0 = 10 * NS_PER_SEC;
        let taken = (0..10)
            .filter(|_| take_event_token(&mut s, t0, 2, 4))
            .count();
        assert_eq!(taken, 4, "a full bucket holds the burst");
        assert!(!take_event_token(&mut s, t0 + 100, 2, 4));
        // Half a second later at 2/s: one token.
        assert!(take_event_token(&mut s, t0 + NS_PER_SEC / 2, 2, 4));
        assert!(!take_event_token(&mut s, t0 + NS_PER_SEC / 2, 2, 4));
        assert!(
            take_event_token(&mut s, t0, 0, 0),
            "0 per second is unlimited"
        );
    }

    #[test]
    fn an_ipv4_key_holds_the_address_after_the_family() {
        let k = PrefilterKey::ipv4([192, 0, 2, 1]);
        assert_eq!(k.family, crate::family::IPV4);
        assert_eq!(&k.addr[..4], &[192, 0, 2, 1]);
        assert!(k.addr[4..].iter().all(|b| *b == 0));
    }
}
