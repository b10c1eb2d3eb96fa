//! skb->mark values the datapath and the L7 proxy agree on. The top byte says who marked the
//! packet; marks never survive a namespace crossing (veth scrubs them), so a mark seen on a
//! host-side veth was set in the node namespace: by our TC program or by the proxy.

pub const MAGIC_MASK: u32 = 0xff00_0000;
/// Set by `tc_from_endpoint` on packets it hands to the proxy: the node routes them to the
/// local stack (`ip rule fwmark TO_PROXY lookup PROXY_ROUTE_TABLE`).
pub const TO_PROXY: u32 = 0xa1 << 24;
/// Set (with SO_MARK) by the proxy on its upstream connections, with the original client's
/// identity in the low 24 bits; the proxy also sets skb->priority (SO_PRIORITY) to the
/// client's IPv4 address ([`client_priority`]). The destination's policy judges the client,
/// not the node, exactly as it would judge the client's own connection: by the ipcache's
/// answer for that address (identity and CIDR alias, so ipBlock rules apply), which must
/// agree with the identity in the mark.
pub const FROM_PROXY: u32 = 0xa2 << 24;
pub const IDENTITY_MASK: u32 = 0x00ff_ffff;
/// Routing table holding `local 0.0.0.0/0 dev lo` for packets marked TO_PROXY.
pub const PROXY_ROUTE_TABLE: u32 = 2005;

pub const fn from_proxy(identity: u32) -> u32 {
    FROM_PROXY | (identity & IDENTITY_MASK)
}

/// skb->priority of the proxy's upstream leg: the client's IPv4 address, most significant
/// byte first (the value of `u32::from(Ipv4Addr)`).
pub const fn client_priority(client: [u8; 4]) -> u32 {
    u32::from_be_bytes(client)
}
