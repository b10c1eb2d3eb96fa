//! Verdicts and drop reasons, with the words the CLI prints for them.

/// What happened to a packet or connection.
pub mod verdict {
    pub const FORWARDED: u8 = 1;
    pub const DROPPED: u8 = 2;
    /// Policy would have dropped it; audit mode let it through.
    pub const AUDIT: u8 = 3;
    /// Forwarded to the L7 proxy.
    pub const REDIRECTED: u8 = 4;
}

/// Drop reasons. Numbering follows Cilium's style (drops start at 130) so the codes read alike.
pub mod drop {
    pub const NONE: u8 = 0;
    pub const INVALID_SOURCE_IP: u8 = 132;
    /// No rule allows the traffic and the endpoint enforces policy in that direction.
    pub const POLICY_DENIED: u8 = 133;
    pub const INVALID_PACKET: u8 = 134;
    pub const CT_TRUNCATED_OR_INVALID: u8 = 135;
    pub const UNSUPPORTED_L3: u8 = 139;
    pub const UNKNOWN_ENDPOINT: u8 = 140;
    pub const CT_MAP_FULL: u8 = 155;
    pub const FRAGMENTED: u8 = 157;
    pub const UNSUPPORTED_L4: u8 = 160;
    /// An explicit deny rule matched.
    pub const POLICY_DENY_RULE: u8 = 181;
    /// The datapath has no configuration yet (agent not initialised): fail closed.
    pub const NOT_INITIALIZED: u8 = 190;
    pub const PROXY_UNAVAILABLE: u8 = 191;
}

/// Words for a drop reason, as `palisade observe` prints them.
pub const fn drop_reason_name(code: u8) -> &'static str {
    match code {
        drop::NONE => "none",
        drop::INVALID_SOURCE_IP => "Invalid source ip",
        drop::POLICY_DENIED => "Policy denied",
        drop::INVALID_PACKET => "Invalid packet",
        drop::CT_TRUNCATED_OR_INVALID => "CT: Truncated or invalid header",
        drop::UNSUPPORTED_L3 => "Unsupported L3 protocol",
        drop::UNKNOWN_ENDPOINT => "Unknown endpoint",
        drop::CT_MAP_FULL => "CT: Map insertion failed",
        drop::FRAGMENTED => "Fragmented packet",
        drop::UNSUPPORTED_L4 => "Unsupported L4 protocol",
        drop::POLICY_DENY_RULE => "Policy denied by denylist",
        drop::NOT_INITIALIZED => "Datapath not initialized",
        drop::PROXY_UNAVAILABLE => "Proxy redirection not possible",
        _ => "Unknown drop reason",
    }
}

/// Every drop reason, for metrics export.
pub const ALL_DROP_REASONS: [u8; 12] = [
    drop::INVALID_SOURCE_IP,
    drop::POLICY_DENIED,
    drop::INVALID_PACKET,
    drop::CT_TRUNCATED_OR_INVALID,
    drop::UNSUPPORTED_L3,
    drop::UNKNOWN_ENDPOINT,
    drop::CT_MAP_FULL,
    drop::FRAGMENTED,
    drop::UNSUPPORTED_L4,
    drop::POLICY_DENY_RULE,
    drop::NOT_INITIALIZED,
    drop::PROXY_UNAVAILABLE,
];

pub const fn verdict_name(code: u8) -> &'static str {
    match code {
        verdict::FORWARDED => "FORWARDED",
        verdict::DROPPED => "DROPPED",
        verdict::AUDIT => "AUDIT",
        verdict::REDIRECTED => "REDIRECTED",
        _ => "UNKNOWN",
    }
}
