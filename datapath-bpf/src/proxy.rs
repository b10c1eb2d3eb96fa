//! Transparent redirect to the L7 proxy, at TC ingress of the client's host-side veth: the
//! packet is assigned to a proxy socket in the node namespace with bpf_sk_assign and marked
//! so the node routes it to its local stack. The connection's own (accepted) socket is found
//! by its tuple; a new connection goes to the proxy's transparent listener, whose accepted
//! socket then has the original destination as its local address. From a bridge port the frame
//! goes to the bridge's own input instead, readdressed to it, so that it is routed by the node
//! rather than switched straight to its destination.
//!
//! A SYN whose tuple is still in TIME_WAIT at the proxy goes to that TIME_WAIT socket, for the
//! kernel to judge as it judges any SYN for a TIME_WAIT tuple; its listener lookup is answered
//! by [`listener_for_time_wait_syn`] (see `palisade_common::proxy`).

use core::ffi::c_void;

use aya_ebpf::{
    bindings::{
        BPF_F_CURRENT_NETNS, BPF_F_INGRESS, BPF_TCP_TIME_WAIT, TC_ACT_OK, TC_ACT_SHOT, bpf_sock,
        bpf_sock_tuple, bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1, sk_action::SK_PASS,
    },
    helpers::{bpf_redirect, bpf_sk_assign, bpf_sk_lookup_udp, bpf_sk_release, bpf_skc_lookup_tcp},
    programs::{SkLookupContext, TcContext},
};
use palisade_common::{
    endpoint::{EndpointInfo, FLAG_BRIDGE_PORT},
    mark, proto,
    proxy::{TimeWaitSynKey, TimeWaitSynValue},
    reason::drop,
};

use crate::{
    maps::{ENDPOINTS, PROXY_LISTENERS, TIME_WAIT_SYNS},
    packet::Packet,
};

#[inline(always)]
fn v4(addr: &[u8; 16]) -> u32 {
    u32::from_ne_bytes([addr[0], addr[1], addr[2], addr[3]])
}

/// The size of the IPv4 member of `bpf_sock_tuple`.
#[expect(
    clippy::cast_possible_truncation,
    reason = "a 12-byte size, in a const where `u32::try_from` cannot be called"
)]
const TUPLE_V4_SIZE: u32 = size_of::<bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1>() as u32;

/// Looks up a TCP socket (of any state, listeners included), or with `udp` a UDP one, in the
/// node namespace.
#[inline(always)]
fn lookup(
    ctx: &TcContext,
    saddr: u32,
    daddr: u32,
    sport_be: u16,
    dport_be: u16,
    udp: bool,
) -> *mut bpf_sock {
    // SAFETY: `bpf_sock_tuple` is a C union of plain integers, for which all zeroes is valid.
    let mut tuple: bpf_sock_tuple = unsafe { core::mem::zeroed() };
    tuple.__bindgen_anon_1.ipv4 = bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1 {
        saddr,
        daddr,
        sport: sport_be,
        dport: dport_be,
    };
    if udp {
        // SAFETY: as below.
        return unsafe {
            bpf_sk_lookup_udp(
                ctx.skb.skb.cast::<c_void>(),
                &raw mut tuple,
                TUPLE_V4_SIZE,
                i64::from(BPF_F_CURRENT_NETNS).cast_unsigned(),
                0,
            )
        };
    }
    // SAFETY: valid context and tuple; the size is that of the IPv4 member, as the helper
    // requires for an IPv4 lookup.
    unsafe {
        bpf_skc_lookup_tcp(
            ctx.skb.skb.cast::<c_void>(),
            &raw mut tuple,
            TUPLE_V4_SIZE,
            // -1 (all ones), as the helper takes it.
            i64::from(BPF_F_CURRENT_NETNS).cast_unsigned(),
            0,
        )
    }
}

#[inline(always)]
fn assign(ctx: &TcContext, sk: *mut bpf_sock) -> Result<(), u8> {
    // SAFETY: valid context; `sk` came from a successful lookup and is not released yet.
    let rc = unsafe { bpf_sk_assign(ctx.skb.skb.cast::<c_void>(), sk.cast::<c_void>(), 0) };
    // SAFETY: `sk` came from a successful lookup and is released exactly once, here.
    unsafe { bpf_sk_release(sk.cast::<c_void>()) };
    if rc != 0 {
        return Err(drop::PROXY_UNAVAILABLE);
    }
    ctx.set_mark(mark::TO_PROXY);
    Ok(())
}

/// A bridge port's frame is switched at L2 past the node's routing, so it is readdressed to
/// the bridge, for `deliver` to hand to the bridge's own input (see `FLAG_BRIDGE_PORT`).
#[inline(always)]
fn readdress_to_bridge(ctx: &TcContext, ep: &EndpointInfo) -> Result<(), u8> {
    if ep.flags & FLAG_BRIDGE_PORT == 0 {
        return Ok(());
    }
    let mac = ep.bridge_mac;
    ctx.store(0, &mac, 0).map_err(|_| drop::PROXY_UNAVAILABLE)
}

/// The TC action that takes a packet `redirect` assigned to the proxy into the node's stack:
/// from a routed veth the host side's own input (`TC_ACT_OK`); from a bridge port the
/// bridge's, where the frame arrives readdressed to the bridge, its assigned socket intact.
/// An endpoint that vanished meanwhile is a drop.
#[inline(always)]
pub fn deliver(ifindex: u32) -> i32 {
    // SAFETY: map values stay valid for the whole program run; the agent only replaces them.
    let Some(ep) = (unsafe { ENDPOINTS.get(ifindex) }) else {
        return TC_ACT_SHOT;
    };
    if ep.flags & FLAG_BRIDGE_PORT == 0 {
        return TC_ACT_OK;
    }
    // SAFETY: a helper taking plain integers; it returns TC_ACT_REDIRECT, or TC_ACT_SHOT when
    // it refuses.
    let action = unsafe { bpf_redirect(ep.bridge_ifindex, u64::from(BPF_F_INGRESS)) };
    i32::try_from(action).unwrap_or(TC_ACT_SHOT)
}

/// Hands a packet of a proxied connection to the proxy: to the connection's own socket when
/// the proxy has one for it, else (a new or retransmitted SYN) to the listener. A UDP
/// datagram (DNS) always goes to the proxy's one UDP socket on that port.
#[inline(always)]
pub fn redirect(
    ctx: &TcContext,
    ep: &EndpointInfo,
    pkt: &Packet,
    proxy_port_be: u16,
) -> Result<(), u8> {
    if proxy_port_be == 0 {
        return Err(drop::PROXY_UNAVAILABLE);
    }
    readdress_to_bridge(ctx, ep)?;
    let (saddr, daddr) = (v4(&pkt.saddr), v4(&pkt.daddr));
    let udp = pkt.protocol == proto::UDP;
    if !udp {
        let sk = lookup(ctx, saddr, daddr, pkt.sport_be, pkt.dport_be, false);
        if !sk.is_null() {
            // SAFETY: `sk` came from a successful lookup and is not released yet; `state` is
            // readable on any socket a lookup returns.
            if pkt.opens && unsafe { (*sk).state } == BPF_TCP_TIME_WAIT {
                let key = TimeWaitSynKey {
                    saddr_be: saddr,
                    daddr_be: daddr,
                    sport_be: pkt.sport_be,
                    dport_be: pkt.dport_be,
                };
                let value = TimeWaitSynValue {
                    proxy_port: u32::from(u16::from_be(proxy_port_be)),
                };
                // Unrecorded (the map full of recent SYNs), the SYN still goes to the
                // TIME_WAIT socket, which answers it as before: the client retransmits.
                let _ = TIME_WAIT_SYNS.insert(key, value, 0);
            }
            return assign(ctx, sk);
        }
    }
    let listener = lookup(ctx, saddr, daddr, pkt.sport_be, proxy_port_be, udp);
    if listener.is_null() {
        return Err(drop::PROXY_UNAVAILABLE);
    }
    assign(ctx, listener)
}

/// The sk_lookup program: for a SYN [`redirect`] recorded as meeting the proxy's TIME_WAIT
/// socket, the kernel, having ended that TIME_WAIT, looks for the listener of the original
/// destination, and gets the proxy's. Any other lookup goes on as if this program were not
/// there (`SK_PASS` with nothing selected), and so does this one when the listener is gone.
#[inline(always)]
pub fn listener_for_time_wait_syn(ctx: &SkLookupContext) -> u32 {
    // SAFETY: reading fields of the context the kernel handed us.
    let (protocol, saddr, daddr, sport_be, dport) = unsafe {
        let l = &*ctx.lookup;
        (
            l.protocol,
            l.remote_ip4,
            l.local_ip4,
            l.remote_port,
            l.local_port,
        )
    };
    if protocol != u32::from(proto::TCP) {
        return SK_PASS;
    }
    let Ok(dport) = u16::try_from(dport) else {
        return SK_PASS;
    };
    let key = TimeWaitSynKey {
        saddr_be: saddr,
        daddr_be: daddr,
        sport_be,
        dport_be: dport.to_be(),
    };
    // SAFETY: the value is copied out before the entry is removed.
    let Some(port) = (unsafe { TIME_WAIT_SYNS.get(key) }).map(|v| v.proxy_port) else {
        return SK_PASS;
    };
    let _ = TIME_WAIT_SYNS.remove(key);
    let _ = PROXY_LISTENERS.redirect_sk_lookup(ctx, port, 0);
    SK_PASS
}

/// The original client's address a packet the proxy sent upstream carries in its priority
/// (see `mark::FROM_PROXY`); meaningful only when `from_proxy_identity` says it is one.
#[inline(always)]
pub fn client_address(ctx: &TcContext) -> [u8; 16] {
    // SAFETY: reading a field of the context the kernel handed us.
    let p = unsafe { (*ctx.skb.skb).priority }.to_be_bytes();
    let mut addr = [0u8; 16];
    addr[..4].copy_from_slice(&p);
    addr
}

/// The client identity carried by a packet the proxy sent upstream, if it is one.
#[inline(always)]
pub fn from_proxy_identity(ctx: &TcContext) -> Option<u32> {
    // SAFETY: reading a field of the context the kernel handed us.
    let m = unsafe { (*ctx.skb.skb).mark };
    (m & mark::MAGIC_MASK == mark::FROM_PROXY).then_some(m & mark::IDENTITY_MASK)
}
