//! Per-CPU packet/byte counters, indexed by direction and outcome.
//!
//! Index = `direction * 256 + outcome`, where outcome is `OUTCOME_FORWARDED`,
//! `OUTCOME_REDIRECTED`, `OUTCOME_AUDIT`, or a drop reason code (>= 130).

use crate::{assert_layout, user_pod};

pub const OUTCOME_FORWARDED: u8 = 0;
pub const OUTCOME_REDIRECTED: u8 = 1;
pub const OUTCOME_AUDIT: u8 = 2;
/// Flow events lost because the ring buffer was full (counted under direction 0).
pub const OUTCOME_EVENTS_LOST: u8 = 3;
/// Flow events suppressed by the per-endpoint rate limit (counted under direction 0).
pub const OUTCOME_EVENTS_RATE_LIMITED: u8 = 4;

pub const METRICS_MAX_ENTRIES: u32 = 3 * 256;

/// A counter's outcome in words: its verdict, the kind of lost event, or its drop reason.
pub const fn outcome_name(outcome: u8) -> &'static str {
    match outcome {
        OUTCOME_FORWARDED => "FORWARDED",
        OUTCOME_REDIRECTED => "REDIRECTED",
        OUTCOME_AUDIT => "AUDIT",
        OUTCOME_EVENTS_LOST => "EVENTS_LOST",
        OUTCOME_EVENTS_RATE_LIMITED => "EVENTS_RATE_LIMITED",
        drop => crate::reason::drop_reason_name(drop),
    }
}

/// A counter's direction in words; 0 counts the datapath as a whole.
pub const fn direction_name(direction: u8) -> &'static str {
    match direction {
        crate::direction::INGRESS => "ingress",
        crate::direction::EGRESS => "egress",
        _ => "datapath",
    }
}

pub const fn metric_index(direction: u8, outcome: u8) -> u32 {
    (direction as u32) * 256 + outcome as u32
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct MetricValue {
    pub packets: u64,
    pub bytes: u64,
}

assert_layout!(MetricValue, size = 16, align = 8, { packets: 0, bytes: 8 });
user_pod!(MetricValue);
