//! Connection tracking. Each endpoint direction keeps its own entries (the scope), so a
//! connection between two local endpoints is tracked by both: the client's egress check and
//! the server's ingress check are independent, as their policies are.

use aya_ebpf::helpers::bpf_ktime_get_ns;
use palisade_common::{
    config::{CONFIG_FLAG_CT_ACCOUNTING, CT_REFRESH_NS, Config},
    conntrack::{CT_FLAG_FIN_FORWARD, CT_FLAG_FIN_REPLY, CT_FLAG_SEEN_REPLY, CtEntry, CtKey},
    direction, family, proto,
};

use crate::{
    maps::CONNTRACK,
    packet::{Packet, TCP_FIN, TCP_RST, icmp_counterpart},
};

const NS_PER_SEC: u64 = 1_000_000_000;

#[inline(always)]
pub fn now_ns() -> u64 {
    // SAFETY: helper without arguments.
    unsafe { bpf_ktime_get_ns() }
}

#[inline(always)]
pub fn opposite(dir: u8) -> u8 {
    if dir == direction::INGRESS {
        direction::EGRESS
    } else {
        direction::INGRESS
    }
}

#[inline(always)]
pub fn key_forward(pkt: &Packet, scope: u8) -> CtKey {
    CtKey {
        saddr: pkt.saddr,
        daddr: pkt.daddr,
        sport_be: pkt.sport_be,
        dport_be: pkt.dport_be,
        protocol: pkt.protocol,
        family: family::IPV4,
        scope,
        _pad: 0,
    }
}

/// Turns a key around (source and destination swapped) and sets its scope. An ICMP key keeps
/// its identifier and takes the counterpart type: a reply's key turned around is its
/// request's, and a request's turned around is no request's, so the other side's request
/// with the same identifier never passes as a reply (nor a reply as a request).
#[inline(always)]
pub fn reverse_in_place(key: &mut CtKey, scope: u8) {
    core::mem::swap(&mut key.saddr, &mut key.daddr);
    if key.protocol == proto::ICMP {
        #[expect(
            clippy::cast_possible_truncation,
            reason = "an ICMP key's type is a u8 stored in a u16"
        )]
        let icmp_type = u16::from_be(key.dport_be) as u8;
        key.dport_be = u16::from(icmp_counterpart(icmp_type)).to_be();
    } else {
        core::mem::swap(&mut key.sport_be, &mut key.dport_be);
    }
    key.scope = scope;
}

/// A live entry for `key`, or None (an expired entry is removed and reported as absent).
#[inline(always)]
pub fn lookup(key: &CtKey, now: u64) -> Option<*mut CtEntry> {
    let entry = CONNTRACK.get_ptr_mut(key)?;
    // SAFETY: the pointer comes from a successful map lookup and is valid for this program run.
    if unsafe { (*entry).expires_ns } < now {
        let _ = CONNTRACK.remove(key);
        return None;
    }
    Some(entry)
}

#[inline(always)]
fn timeout_ns(cfg: &Config, protocol: u8, flags: u16) -> u64 {
    let secs = if protocol == proto::TCP {
        if flags & CT_FLAG_FIN_FORWARD != 0 && flags & CT_FLAG_FIN_REPLY != 0 {
            cfg.ct_tcp_close_timeout_s
        } else if flags & CT_FLAG_SEEN_REPLY != 0 {
            cfg.ct_tcp_established_timeout_s
        } else {
            cfg.ct_tcp_syn_timeout_s
        }
    } else {
        cfg.ct_other_timeout_s
    };
    u64::from(secs) * NS_PER_SEC
}

/// Creates the entry for a new, allowed connection. Fails closed: an insert error is a drop.
#[expect(
    clippy::too_many_arguments,
    reason = "always inlined: a struct would only add stack"
)]
#[inline(always)]
pub fn create(
    key: &CtKey,
    cfg: &Config,
    now: u64,
    len: u32,
    endpoint_id: u32,
    peer_identity: u32,
    rule_id: u32,
    flags: u16,
    proxy_port_be: u16,
    proxy_client: &[u8; 16],
) -> Result<(), ()> {
    let entry = CtEntry {
        expires_ns: now + timeout_ns(cfg, key.protocol, flags),
        created_ns: now,
        packets: 1,
        bytes: u64::from(len),
        endpoint_id,
        peer_identity,
        rule_id,
        policy_revision: cfg.policy_revision,
        flags,
        proxy_port_be,
        _pad: [0; 4],
        proxy_client: *proxy_client,
    };
    CONNTRACK.insert(key, entry, 0).map_err(|_| ())
}

/// Advances TCP state for a packet of a tracked connection and keeps the entry alive.
/// Returns true when the connection is over (RST), in which case the caller removes the entry
/// after forwarding. Writes the entry only when its state changes or its expiry is more than
/// `CT_REFRESH_NS` stale (and per packet with `CONFIG_FLAG_CT_ACCOUNTING`): an established
/// connection's packets, on whichever CPUs, share the entry's cache line read-only.
#[inline(always)]
pub fn update(
    entry: *mut CtEntry,
    cfg: &Config,
    pkt: &Packet,
    is_reply: bool,
    now: u64,
    len: u32,
) -> bool {
    // SAFETY: `entry` comes from a map lookup in this program run; concurrent updates from
    // other CPUs can only lose counter increments, never corrupt control flow.
    let e = unsafe { &mut *entry };
    if cfg.flags & CONFIG_FLAG_CT_ACCOUNTING != 0 {
        e.packets += 1;
        e.bytes += u64::from(len);
    }
    let mut flags = e.flags;
    if pkt.protocol == proto::TCP {
        if pkt.tcp_flags & TCP_RST != 0 {
            return true;
        }
        if is_reply {
            flags |= CT_FLAG_SEEN_REPLY;
        }
        if pkt.tcp_flags & TCP_FIN != 0 {
            flags |= if is_reply {
                CT_FLAG_FIN_REPLY
            } else {
                CT_FLAG_FIN_FORWARD
            };
        }
    }
    let expires = now + timeout_ns(cfg, pkt.protocol, flags);
    if flags != e.flags {
        e.flags = flags;
        e.expires_ns = expires;
    } else if expires > e.expires_ns + CT_REFRESH_NS {
        e.expires_ns = expires;
    }
    false
}

#[inline(always)]
pub fn remove(key: &CtKey) {
    let _ = CONNTRACK.remove(key);
}
