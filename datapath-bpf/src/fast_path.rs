//! The fast path between two endpoints of the node: once the source's egress verdict lets a
//! packet out and its destination is another local endpoint, the destination's ingress
//! verdict is judged here too (the same pipeline its own program would run, see
//! `judge::run`), and the frame goes straight into the destination's namespace with
//! `bpf_redirect_peer`: readdressed as the node would readdress it (the destination's MAC,
//! from its host side's), the TTL decremented as routing would, past the node's routing,
//! netfilter and the destination's host-side veth. Whatever does not fit (a bridge port,
//! MACs unknown, a TTL routing would expire, the fast path switched off) takes the node's
//! path, where the destination's own program judges it.

use aya_ebpf::{bindings::TC_ACT_SHOT, helpers::bpf_redirect_peer, programs::TcContext};
use palisade_common::{
    config::CONFIG_FLAG_FAST_PATH,
    endpoint::{EndpointInfo, FLAG_BRIDGE_PORT},
};

use crate::{
    maps::{CONFIG, ENDPOINT_BY_ADDR, ENDPOINTS},
    packet::{self, ETH_HLEN, ETH_P_IP, ETHERTYPE_OFFSET, Ipv4FrameWire},
};

/// Offsets in the IPv4 header: TTL (with the protocol after it), checksum.
const IP_TTL: usize = ETH_HLEN + 8;
const IP_CHECKSUM: usize = ETH_HLEN + 10;

#[inline(always)]
fn fits(ep: &EndpointInfo) -> bool {
    ep.flags & FLAG_BRIDGE_PORT == 0 && ep.mac != [0; 6] && ep.host_mac != [0; 6]
}

/// The ifindex of the host-side veth of the local endpoint this frame (already let out by the
/// egress verdict of the endpoint on `src_ifindex`) is addressed to, when the fast path takes
/// it; 0 when the node's path does. Out of line, returning a plain number: its lookups need
/// stack the judging path must not carry.
#[inline(never)]
pub fn local_destination(ctx: &TcContext, src_ifindex: u32) -> u32 {
    let Some(cfg) = CONFIG.get(0) else { return 0 };
    if cfg.flags & CONFIG_FLAG_FAST_PATH == 0 {
        return 0;
    }
    let Some(frame) = packet::read::<Ipv4FrameWire>(ctx, ETHERTYPE_OFFSET) else {
        return 0;
    };
    // A packet whose TTL routing would expire is the node's to answer.
    if u16::from_be(frame.ethertype_be) != ETH_P_IP || frame.ip.ttl <= 1 {
        return 0;
    }
    let mut key = [0u8; 16];
    key[..4].copy_from_slice(&frame.ip.daddr);
    // SAFETY: map values stay valid for the whole program run; the agent only replaces them.
    let Some(&dst) = (unsafe { ENDPOINT_BY_ADDR.get(key) }) else {
        return 0;
    };
    if dst == src_ifindex {
        return 0;
    }
    // SAFETY: as above.
    let (Some(src_ep), Some(dst_ep)) = (unsafe { ENDPOINTS.get(src_ifindex) }, unsafe {
        ENDPOINTS.get(dst)
    }) else {
        return 0;
    };
    // The address map is only a hint: the endpoint behind the ifindex must own the address.
    if dst_ep.addr != key || !fits(src_ep) || !fits(dst_ep) {
        return 0;
    }
    dst
}

/// Hands a frame that both verdicts let through to the endpoint on `dst_ifindex` (from
/// `local_destination`): readdressed and its TTL decremented, into the endpoint's namespace.
/// Anything that fails is a drop.
#[inline(never)]
pub fn deliver(ctx: &TcContext, dst_ifindex: u32) -> i32 {
    // SAFETY: map values stay valid for the whole program run; the agent only replaces them.
    let Some(ep) = (unsafe { ENDPOINTS.get(dst_ifindex) }) else {
        return TC_ACT_SHOT;
    };
    // The Ethernet header's destination and source, in one write.
    let mut macs = [0u8; 12];
    macs[..6].copy_from_slice(&ep.mac);
    macs[6..].copy_from_slice(&ep.host_mac);
    if ctx.store(0, &macs, 0).is_err() {
        return TC_ACT_SHOT;
    }
    // TTL and protocol as the 16-bit word the header checksum covers.
    let Ok(old) = ctx.load::<[u8; 2]>(IP_TTL) else {
        return TC_ACT_SHOT;
    };
    if old[0] <= 1 {
        return TC_ACT_SHOT;
    }
    let new = [old[0] - 1, old[1]];
    if ctx.store(IP_TTL, &new, 0).is_err()
        || ctx
            .l3_csum_replace(
                IP_CHECKSUM,
                u64::from(u16::from_ne_bytes(old)),
                u64::from(u16::from_ne_bytes(new)),
                2,
            )
            .is_err()
    {
        return TC_ACT_SHOT;
    }
    // SAFETY: a helper taking plain integers; it returns TC_ACT_REDIRECT, or TC_ACT_SHOT when
    // it refuses.
    let action = unsafe { bpf_redirect_peer(dst_ifindex, 0) };
    i32::try_from(action).unwrap_or(TC_ACT_SHOT)
}
