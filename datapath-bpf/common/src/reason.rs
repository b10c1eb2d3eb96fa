//! Verdicts and drop reasons, each code written once beside the words the CLI prints for it.

/// The one table of a kind of code: its constants, its name function, and the list of all.
macro_rules! codes {
    (
        $(#[$mdoc:meta])* mod $module:ident;
        $(#[$fdoc:meta])* fn $name_fn:ident, unknown = $unknown:literal;
        $(#[$adoc:meta])* all $all:ident;
        $( $(#[$doc:meta])* $konst:ident = $code:literal => $words:literal, )*
    ) => {
        $(#[$mdoc])*
        pub mod $module {
            $( $(#[$doc])* pub const $konst: u8 = $code; )*
        }

        $(#[$fdoc])*
        pub const fn $name_fn(code: u8) -> &'static str {
            match code {
                $( $code => $words, )*
                _ => $unknown,
            }
        }

        $(#[$adoc])*
        pub const $all: &[u8] = &[$( $module::$konst ),*];
    };
}

codes! {
    /// What happened to a packet or connection.
    mod verdict;
    /// The verdict in words, as flows show it.
    fn verdict_name, unknown = "UNKNOWN";
    /// Every verdict.
    all ALL_VERDICTS;
    FORWARDED = 1 => "FORWARDED",
    DROPPED = 2 => "DROPPED",
    /// Policy would have dropped it; audit mode let it through.
    AUDIT = 3 => "AUDIT",
    /// Forwarded to the L7 proxy.
    REDIRECTED = 4 => "REDIRECTED",
}

codes! {
    /// Drop reasons. Numbering follows Cilium's style (drops start at 130) so the codes read
    /// alike.
    mod drop;
    /// Words for a drop reason, as `palisade observe` prints them.
    fn drop_reason_name, unknown = "Unknown drop reason";
    /// Every drop code (NONE included), each produced by the datapath.
    all ALL_DROP_REASONS;
    NONE = 0 => "none",
    INVALID_SOURCE_IP = 132 => "Invalid source ip",
    /// No rule allows the traffic and the endpoint enforces policy in that direction.
    POLICY_DENIED = 133 => "Policy denied",
    INVALID_PACKET = 134 => "Invalid packet",
    CT_TRUNCATED_OR_INVALID = 135 => "CT: Truncated or invalid header",
    /// An ICMP error whose own addresses do not fit the connection it reports on: not sent
    /// back to the reported packet's source, or sent by an endpoint about a packet that was
    /// not addressed to it.
    ICMP_ERROR_MISMATCH = 136 => "ICMP error does not match its connection",
    UNSUPPORTED_L3 = 139 => "Unsupported L3 protocol",
    UNKNOWN_ENDPOINT = 140 => "Unknown endpoint",
    /// The IPv4 total length is shorter than the header or longer than the packet.
    INVALID_IP_LENGTH = 141 => "Invalid IPv4 total length",
    /// A packet handed to an endpoint is addressed to someone else.
    INVALID_DESTINATION_IP = 144 => "Invalid destination ip",
    CT_MAP_FULL = 155 => "CT: Map insertion failed",
    FRAGMENTED = 157 => "Fragmented packet",
    /// An explicit deny rule matched.
    POLICY_DENY_RULE = 181 => "Policy denied by denylist",
    /// The datapath has no configuration yet (agent not initialised): fail closed.
    NOT_INITIALIZED = 190 => "Datapath not initialized",
    PROXY_UNAVAILABLE = 191 => "Proxy redirection not possible",
    /// A policy change sends an established connection through the L7 proxy, which cannot
    /// take it over mid-stream: it is ended, and the client's next connection takes the proxy.
    PROXY_REQUIRED = 192 => "Policy now requires the L7 proxy",
    /// A packet marked as the proxy's upstream leg whose client address (skb->priority) does
    /// not have the identity in its mark, as far as the ipcache knows.
    PROXY_CLIENT_MISMATCH = 193 => "Proxy mark does not match the client",
    /// Policy sends a flow that is not TCP (new, or open when the policy changed) to the L7
    /// proxy, which takes TCP only.
    PROXY_UNSUPPORTED_PROTOCOL = 194 => "Proxy redirection not supported for protocol",
    /// The XDP prefilter on a host-facing interface: the source is in its CIDR deny list.
    PREFILTER_DENIED = 195 => "Denied by prefilter",
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_has_its_own_words() {
        for (i, a) in ALL_DROP_REASONS.iter().enumerate() {
            assert_ne!(drop_reason_name(*a), "Unknown drop reason");
            for b in &ALL_DROP_REASONS[i + 1..] {
                assert_ne!(a, b, "drop code {a} is defined twice");
                assert_ne!(drop_reason_name(*a), drop_reason_name(*b));
            }
        }
        assert_eq!(drop_reason_name(drop::POLICY_DENIED), "Policy denied");
        assert_eq!(verdict_name(verdict::AUDIT), "AUDIT");
        assert_eq!(verdict_name(99), "UNKNOWN");
    }
}
