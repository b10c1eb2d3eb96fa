//! Datapath-wide settings: a one-element array the agent writes.

use crate::{assert_layout, user_pod};

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Config {
    /// Bumped by the agent after every policy map change; see `CtEntry::policy_revision`.
    pub policy_revision: u32,
    /// Non-zero once the agent has written the config; until then every packet is dropped.
    pub initialized: u32,
    pub ct_tcp_syn_timeout_s: u32,
    pub ct_tcp_established_timeout_s: u32,
    pub ct_tcp_close_timeout_s: u32,
    pub ct_other_timeout_s: u32,
    /// Flow events each endpoint may emit per second (0 = unlimited).
    pub events_per_second: u32,
    /// Burst allowance on top of the rate.
    pub events_burst: u32,
    /// `CONFIG_FLAG_*` bits.
    pub flags: u32,
}

/// Traffic between two endpoints of the node is judged by both verdicts in the sender's
/// program and handed straight into the destination's namespace (`bpf_redirect_peer`),
/// past the node's routing and netfilter.
pub const CONFIG_FLAG_FAST_PATH: u32 = 1 << 0;
/// Conntrack entries count every packet and byte of their connection (a write to the entry
/// per packet); without it they keep the first packet's, and established packets write
/// nothing but the expiry, at most once per `CT_REFRESH_NS`.
pub const CONFIG_FLAG_CT_ACCOUNTING: u32 = 1 << 1;

/// How stale a conntrack entry's expiry may get before a packet refreshes it: established
/// connections write their entry at most this often.
pub const CT_REFRESH_NS: u64 = 1_000_000_000;

const NS_PER_SEC: u64 = 1_000_000_000;

/// Tokens a bucket refilling `per_second` a second has earned in `elapsed_ns`: the whole
/// seconds' worth plus the fraction's, rounded down. Under a flood the bucket is empty and
/// asked on every packet, microseconds after its last refill: that case costs a multiply and
/// a compare, no division (a 64-bit division is the dearest instruction of a drop path, and
/// the plain formula takes two per packet).
#[inline]
pub fn tokens_earned(elapsed_ns: u64, per_second: u32) -> u64 {
    let rate = u64::from(per_second);
    if elapsed_ns < NS_PER_SEC {
        // Below a second: elapsed * rate < 2^30 * 2^32, no overflow.
        let scaled = elapsed_ns * rate;
        if scaled < NS_PER_SEC {
            0
        } else {
            scaled / NS_PER_SEC
        }
    } else {
        elapsed_ns / NS_PER_SEC * rate + (elapsed_ns % NS_PER_SEC) * rate / NS_PER_SEC
    }
}

assert_layout!(Config, size = 36, align = 4, { policy_revision: 0, initialized: 4, ct_tcp_syn_timeout_s: 8, events_per_second: 24, flags: 32 });
user_pod!(Config);

/// Per-endpoint token bucket for flow events (one slot per endpoint id, per CPU).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct EventRateState {
    pub last_refill_ns: u64,
    pub tokens: u32,
    pub _pad: u32,
}

assert_layout!(EventRateState, size = 16, align = 8, { last_refill_ns: 0, tokens: 8 });
user_pod!(EventRateState);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_earned_is_the_seconds_and_the_fraction_rounded_down() {
        let reference = |elapsed: u64, rate: u32| {
            let rate = u64::from(rate);
            elapsed / NS_PER_SEC * rate + (elapsed % NS_PER_SEC) * rate / NS_PER_SEC
        };
        let elapsed = [
            0,
            1,
            999,
            1_000_000 - 1,
            1_000_000,
            1_000_001,
            NS_PER_SEC / 2,
            NS_PER_SEC - 1,
            NS_PER_SEC,
            NS_PER_SEC + 1,
            3 * NS_PER_SEC / 2,
            3_600 * NS_PER_SEC + 7,
            1_000_000 * NS_PER_SEC,
        ];
        for e in elapsed {
            for rate in [0, 1, 2, 3, 1_000, 7_919, 1_000_000, 1_000_000_000, u32::MAX] {
                assert_eq!(
                    tokens_earned(e, rate),
                    reference(e, rate),
                    "{e} ns at {rate}/s"
                );
            }
        }
        assert_eq!(tokens_earned(NS_PER_SEC / 1_000 - 1, 1_000), 0);
        assert_eq!(tokens_earned(NS_PER_SEC / 1_000, 1_000), 1);
    }
}
