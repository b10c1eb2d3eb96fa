//! The pipeline both classifiers share: parse -> conntrack -> policy -> account.
//!
//! `judge_packet` returns `Ok(outcome)` to forward or `Err(drop)` to drop; `judge` carries that
//! out of line and `run` turns it into a TC action, so no error path can forward by accident.
//! Between two endpoints of the node `run` judges twice, the sender's egress and then the
//! destination's ingress, and forwards only what both let through (`fast_path`).

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    programs::TcContext,
};
use palisade_common::{
    config::Config,
    conntrack::{CT_FLAG_AUDIT, CT_FLAG_FROM_PROXY, CT_FLAG_PROXY_REDIRECT, CtEntry, CtKey},
    direction,
    endpoint::{EndpointInfo, FLAG_AUDIT},
    family,
    flow::{EVENT_DROP, EVENT_NEW_CONNECTION, EVENT_REVALIDATION_AUDIT, EVENT_REVALIDATION_DROP},
    identity,
    ipcache::{IPCACHE_PREFIX_OFFSET_BITS, IpcacheKey, IpcacheValue},
    metrics::{OUTCOME_AUDIT, OUTCOME_FORWARDED, OUTCOME_REDIRECTED},
    policy::action,
    proto,
    reason::{drop, verdict},
};

use crate::{
    conntrack::{self, now_ns, opposite},
    events::{self, EventMeta},
    fast_path,
    maps::{CONFIG, ENDPOINTS, IPCACHE},
    packet::{Frame, Packet, Parsed},
    policy::{self, Decision},
    proxy,
};

/// Why a packet is dropped, with what the flow event needs to explain it.
struct Drop {
    reason: u8,
    kind: u8,
    peer_identity: u32,
    rule_id: u32,
}

impl Drop {
    const fn plain(reason: u8) -> Self {
        Self {
            reason,
            kind: EVENT_DROP,
            peer_identity: 0,
            rule_id: 0,
        }
    }
}

pub fn run(ctx: &TcContext, dir: u8) -> i32 {
    // SAFETY: reading a field of the context the kernel handed us.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    let len = ctx.len();
    // Parsed once for both verdicts of the fast path (and a drop's event): nothing rewrites
    // the frame before `fast_path::deliver`, after them.
    let mut parsed = Parsed::new();
    parsed.parse(ctx);
    let mut d = Drop::plain(drop::NONE);
    let outcome = judge(ctx, dir, ifindex, &parsed, &mut d);
    if outcome == JUDGED_DROP {
        return dropped(dir, ifindex, len, &d, &parsed);
    }
    events::count(dir, outcome, len);
    if outcome == OUTCOME_REDIRECTED {
        return proxy::deliver(ifindex);
    }
    if dir != direction::EGRESS {
        return TC_ACT_OK;
    }
    // Another endpoint of the node: its own ingress verdict, here, then straight to it.
    let peer = fast_path::local_destination(ctx, ifindex);
    if peer == 0 {
        return TC_ACT_OK;
    }
    match judge(ctx, direction::INGRESS, peer, &parsed, &mut d) {
        JUDGED_DROP => dropped(direction::INGRESS, peer, len, &d, &parsed),
        // An ingress verdict never redirects (only a sender's egress reaches the proxy).
        OUTCOME_REDIRECTED => TC_ACT_SHOT,
        outcome => {
            events::count(direction::INGRESS, outcome, len);
            fast_path::deliver(ctx, peer)
        }
    }
}

#[inline(always)]
fn dropped(dir: u8, ifindex: u32, len: u32, d: &Drop, parsed: &Parsed) -> i32 {
    events::count(dir, d.reason, len);
    report_drop(dir, ifindex, len, d, parsed);
    TC_ACT_SHOT
}

/// Emits the drop event. Best effort: without config or a parsable packet there is nothing
/// meaningful to report beyond the counter, which `run` already bumped. Kept out of line so
/// its stack frame is not stacked on top of the judging path's.
#[inline(never)]
fn report_drop(dir: u8, ifindex: u32, len: u32, d: &Drop, parsed: &Parsed) {
    let Some(cfg) = CONFIG.get(0) else { return };
    // SAFETY: map values stay valid for the whole program run; the agent only replaces them.
    let Some(ep) = (unsafe { ENDPOINTS.get(ifindex) }) else {
        return;
    };
    let pkt = parsed.ipv4().unwrap_or(&Packet::NONE);
    let (src_identity, dst_identity) = if dir == direction::EGRESS {
        (ep.identity, d.peer_identity)
    } else {
        (d.peer_identity, ep.identity)
    };
    events::emit(cfg, now_ns(), ep.endpoint_id, pkt, || EventMeta {
        kind: d.kind,
        verdict: verdict::DROPPED,
        drop_reason: d.reason,
        direction: dir,
        endpoint_id: ep.endpoint_id,
        ifindex,
        src_identity,
        dst_identity,
        rule_id: d.rule_id,
        packet_len: len,
    });
}

/// The verdict of `dir` at the endpoint on `ifindex`: the interface the packet is on, or for
/// the fast path the destination's (see `run`), of the packet as `run` parsed it: the
/// outcome to forward with, or `JUDGED_DROP` with why in `dropped`. Out of line, so its
/// stack is not stacked twice on the fast path; a plain number out, because a BPF function
/// returning a struct would hand back a pointer into its caller's stack, which the verifier
/// refuses.
#[inline(never)]
fn judge(ctx: &TcContext, dir: u8, ifindex: u32, parsed: &Parsed, dropped: &mut Drop) -> u8 {
    match judge_packet(ctx, dir, ifindex, parsed) {
        Ok(outcome) => outcome,
        Err(d) => {
            *dropped = d;
            JUDGED_DROP
        }
    }
}

/// What `judge` returns for a drop: no outcome has this code.
const JUDGED_DROP: u8 = u8::MAX;

/// `judge`'s verdict: `Ok(outcome)` to forward, `Err(drop)` to drop.
#[inline(always)]
fn judge_packet(ctx: &TcContext, dir: u8, ifindex: u32, parsed: &Parsed) -> Result<u8, Drop> {
    let len = ctx.len();
    let Some(cfg) = CONFIG.get(0) else {
        return Err(Drop::plain(drop::NOT_INITIALIZED));
    };
    if cfg.initialized == 0 {
        return Err(Drop::plain(drop::NOT_INITIALIZED));
    }
    // SAFETY: map values stay valid for the whole program run; the agent only replaces them.
    let Some(ep) = (unsafe { ENDPOINTS.get(ifindex) }) else {
        return Err(Drop::plain(drop::UNKNOWN_ENDPOINT));
    };
    let pkt = match parsed.frame() {
        Err(reason) => return Err(Drop::plain(reason)),
        Ok(Frame::Arp) => return Ok(OUTCOME_FORWARDED),
        Ok(Frame::Ipv4) => parsed.ipv4().ok_or(Drop::plain(drop::INVALID_PACKET))?,
    };
    // What an endpoint sends must come from its address, and what the node hands to it must
    // be addressed to it: ICMP errors included, by their own (outer) addresses.
    if dir == direction::EGRESS && pkt.outer_saddr != ep.addr {
        return Err(Drop::plain(drop::INVALID_SOURCE_IP));
    }
    if dir == direction::INGRESS && pkt.outer_daddr != ep.addr {
        return Err(Drop::plain(drop::INVALID_DESTINATION_IP));
    }
    let now = now_ns();
    // The proxy's upstream connections carry the original client's identity in their mark
    // (and its address in their priority, see `mark::FROM_PROXY`).
    // Only a packet on the endpoint's own interface comes from the node's stack, so only there
    // can a proxy mark be the proxy's: the fast path judges a destination's ingress on a
    // packet straight from another endpoint, whose marks mean nothing.
    // SAFETY: reading a field of the context the kernel handed us.
    let from_node = unsafe { (*ctx.skb.skb).ifindex } == ifindex;
    let proxied_from = if dir == direction::INGRESS && from_node {
        proxy::from_proxy_identity(ctx)
    } else {
        None
    };

    if pkt.related {
        return related(pkt, dir, now);
    }

    // Original direction of a connection this direction opened. One key is turned around
    // in place for the reply lookup: the BPF stack has no room for two.
    let mut key = conntrack::key_forward(pkt, dir);
    if let Some(entry) = conntrack::lookup(&key, now) {
        let outcome = established(cfg, ep, dir, &key, entry, pkt, false, now, ifindex, len)?;
        // SAFETY: valid map value pointer for this program run.
        let e = unsafe { &*entry };
        if dir == direction::EGRESS && e.flags & CT_FLAG_PROXY_REDIRECT != 0 {
            proxy::redirect(ctx, ep, pkt, e.proxy_port_be).map_err(Drop::plain)?;
            return Ok(OUTCOME_REDIRECTED);
        }
        return Ok(outcome);
    }
    // Reply to a connection the opposite direction let in or out.
    conntrack::reverse_in_place(&mut key, opposite(dir));
    if let Some(entry) = conntrack::lookup(&key, now) {
        return established(cfg, ep, dir, &key, entry, pkt, true, now, ifindex, len);
    }
    conntrack::reverse_in_place(&mut key, dir);
    new_connection(
        ctx,
        cfg,
        ep,
        dir,
        &key,
        pkt,
        now,
        ifindex,
        len,
        proxied_from,
    )
}

/// An ICMP error (destination unreachable, time exceeded, parameter problem) passes only as
/// part of the connection it reports on, and only travelling that connection's reply
/// direction: the embedded packet is one of the connection's original direction, tracked by
/// the opposite direction of this endpoint (the side that sent it), and the error goes back
/// to that packet's source. Its outer source: when this endpoint sends the error, the
/// embedded packet's destination, that is itself (the source check made sure of its own
/// address): an endpoint reports only on what was addressed to it, never on others'
/// connections. When this endpoint receives it, any source: a router on the way (the node,
/// or one beyond it) may report as well as the peer, and its address cannot be known in
/// advance (Linux conntrack accepts any outer source too); a local endpoint cannot forge one,
/// its own egress check (above) stops it first. Errors about the reply direction (travelling
/// the original one) are not let through.
#[inline(always)]
fn related(pkt: &Packet, dir: u8, now: u64) -> Result<u8, Drop> {
    if pkt.outer_daddr != pkt.saddr || (dir == direction::EGRESS && pkt.outer_saddr != pkt.daddr) {
        return Err(Drop::plain(drop::ICMP_ERROR_MISMATCH));
    }
    let key = conntrack::key_forward(pkt, opposite(dir));
    match conntrack::lookup(&key, now) {
        Some(_) => Ok(OUTCOME_FORWARDED),
        None => Err(Drop::plain(drop::CT_TRUNCATED_OR_INVALID)),
    }
}

/// Identity (and CIDR alias) of the peer address; an address nobody claims is `world`.
#[inline(always)]
fn peer_of(addr: &[u8; 16]) -> IpcacheValue {
    let key = aya_ebpf::maps::lpm_trie::Key::new(
        IPCACHE_PREFIX_OFFSET_BITS + 32,
        IpcacheKey {
            family: family::IPV4,
            _pad: [0; 3],
            addr: *addr,
        },
    );
    match IPCACHE.get(&key) {
        Some(v) => *v,
        None => IpcacheValue {
            identity: identity::WORLD,
            endpoint_id: 0,
            cidr_identity: 0,
            flags: 0,
        },
    }
}

/// The policy decision for a connection as `scope` saw it open, and the peer identity it was
/// judged as. The peer is the far end of the connection, or, for the proxy's upstream leg,
/// the original client at `proxy_client`: judged exactly as the client's own connection
/// would be, by the ipcache's identity and CIDR alias for its address (the node's address,
/// which the packets carry, says nothing about the client).
#[inline(always)]
fn check_policy(
    ep: &EndpointInfo,
    scope: u8,
    key: &CtKey,
    policy_port_be: u16,
    proxy_client: Option<&[u8; 16]>,
) -> (Decision, u32) {
    let peer_addr = match proxy_client {
        Some(client) => client,
        None if scope == direction::EGRESS => &key.daddr,
        None => &key.saddr,
    };
    let peer = peer_of(peer_addr);
    let mut decision = policy::decide(
        ep,
        scope,
        peer.identity,
        peer.cidr_identity,
        key.protocol,
        policy_port_be,
    );
    if proxy_client.is_some() && decision.action == action::REDIRECT {
        // The proxy is the one sending: it enforced the HTTP rules already.
        decision.action = action::ALLOW;
    }
    (decision, peer.identity)
}

#[expect(
    clippy::too_many_arguments,
    reason = "always inlined: a struct would only add stack"
)]
#[inline(always)]
fn established(
    cfg: &Config,
    ep: &EndpointInfo,
    dir: u8,
    key: &CtKey,
    entry: *mut CtEntry,
    pkt: &Packet,
    is_reply: bool,
    now: u64,
    ifindex: u32,
    len: u32,
) -> Result<u8, Drop> {
    // SAFETY: valid map value pointer for this program run.
    let e = unsafe { &mut *entry };
    if e.policy_revision != cfg.policy_revision {
        revalidate(cfg, ep, dir, key, entry, pkt, now, ifindex, len)?;
    }
    let audit = e.flags & CT_FLAG_AUDIT != 0;
    if conntrack::update(entry, cfg, pkt, is_reply, now, len) {
        conntrack::remove(key);
    }
    Ok(if audit {
        OUTCOME_AUDIT
    } else {
        OUTCOME_FORWARDED
    })
}

/// Policy changed since this connection was last checked: check it again, as a new one
/// would be checked. A connection the new policy denies stops instead of living on in
/// conntrack, or, with the endpoint in audit mode, goes on as audited (reported as such, as
/// the drop would have been); one the new policy allows again is no longer audited. One the
/// new policy sends through the L7 proxy stops too: TCP because it cannot be moved into the
/// proxy mid-stream (the agent resets both ends and the client's next connection takes the
/// proxy), anything else because the proxy takes TCP only, as a new flow would be dropped. A
/// connection already going through the proxy keeps doing so.
#[expect(
    clippy::too_many_arguments,
    reason = "always inlined: a struct would only add stack"
)]
#[inline(always)]
fn revalidate(
    cfg: &Config,
    ep: &EndpointInfo,
    dir: u8,
    key: &CtKey,
    entry: *mut CtEntry,
    pkt: &Packet,
    now: u64,
    ifindex: u32,
    len: u32,
) -> Result<(), Drop> {
    // SAFETY: valid map value pointer for this program run.
    let e = unsafe { &mut *entry };
    // The port policy saw when the connection opened (for ICMP: the request's type), and for
    // the proxy's upstream leg the client it carries, as it is known now.
    let client = e.proxy_client;
    let proxy_client = (e.flags & CT_FLAG_FROM_PROXY != 0).then_some(&client);
    let (decision, peer_identity) = check_policy(ep, key.scope, key, key.dport_be, proxy_client);
    let stop = |reason| Drop {
        reason,
        kind: EVENT_REVALIDATION_DROP,
        peer_identity,
        rule_id: decision.rule_id,
    };
    let mut rule_id = decision.rule_id;
    let audited = if matches!(decision.action, action::ALLOW | action::REDIRECT) {
        if proxy_client.is_none() && e.flags & CT_FLAG_PROXY_REDIRECT == 0 {
            if key.protocol != proto::TCP && decision.action == action::REDIRECT {
                conntrack::remove(key);
                // UDP (DNS) is taken by the proxy from the next datagram on.
                let reason = if key.protocol == proto::UDP && key.scope == direction::EGRESS {
                    drop::PROXY_REQUIRED
                } else {
                    drop::PROXY_UNSUPPORTED_PROTOCOL
                };
                return Err(stop(reason));
            }
            if key.protocol == proto::TCP && proxy_port_needed(ep, decision, key) != 0 {
                conntrack::remove(key);
                return Err(stop(drop::PROXY_REQUIRED));
            }
        }
        // Allowed, but the policies in audit would stop it: it goes on audited (unless the
        // proxy carries it), by their rule.
        if decision.staged_deny && e.flags & CT_FLAG_PROXY_REDIRECT == 0 {
            rule_id = decision.staged_rule_id;
            true
        } else {
            false
        }
    } else if ep.flags & FLAG_AUDIT != 0 {
        true
    } else {
        conntrack::remove(key);
        return Err(stop(deny_reason(decision.action)));
    };
    if audited {
        e.flags |= CT_FLAG_AUDIT;
        report(
            cfg,
            ep,
            dir,
            pkt,
            now,
            ifindex,
            len,
            peer_identity,
            rule_id,
            verdict::AUDIT,
            EVENT_REVALIDATION_AUDIT,
        );
    } else {
        e.flags &= !CT_FLAG_AUDIT;
    }
    e.policy_revision = cfg.policy_revision;
    e.rule_id = rule_id;
    e.peer_identity = peer_identity;
    Ok(())
}

#[inline(always)]
fn deny_reason(action_code: u8) -> u8 {
    if action_code == action::DENY {
        drop::POLICY_DENY_RULE
    } else {
        drop::POLICY_DENIED
    }
}

/// The proxy port a TCP connection must be redirected to, 0 when none: its own side's
/// redirect, or, on the client's egress, the local destination's ingress HTTP rules (the
/// redirect can only happen here, at TC ingress on the client's side). `key` is the
/// connection's original direction, as its scope opened it. Out of line: its lookups need
/// stack that the paths calling it must not carry, and a BPF subprogram returns a plain number.
#[inline(never)]
fn proxy_port_needed(ep: &EndpointInfo, decision: Decision, key: &CtKey) -> u16 {
    if decision.action == action::REDIRECT {
        return decision.proxy_port_be;
    }
    if key.scope != direction::EGRESS {
        return 0;
    }
    let dst = peer_of(&key.daddr);
    if dst.endpoint_id == 0 {
        return 0;
    }
    let me = peer_of(&key.saddr);
    let theirs = policy::best_match(
        dst.endpoint_id,
        direction::INGRESS,
        ep.identity,
        me.cidr_identity,
        proto::TCP,
        key.dport_be,
    );
    if theirs.action == action::REDIRECT {
        theirs.proxy_port_be
    } else {
        0
    }
}

#[expect(
    clippy::too_many_arguments,
    reason = "always inlined: a struct would only add stack"
)]
#[inline(always)]
fn new_connection(
    ctx: &TcContext,
    cfg: &Config,
    ep: &EndpointInfo,
    dir: u8,
    key: &CtKey,
    pkt: &Packet,
    now: u64,
    ifindex: u32,
    len: u32,
    proxied_from: Option<u32>,
) -> Result<u8, Drop> {
    let client = proxy::client_address(ctx);
    let proxy_client = proxied_from.map(|_| &client);
    let (decision, peer_identity) = check_policy(ep, dir, key, pkt.policy_port_be, proxy_client);
    let deny = |reason| Drop {
        reason,
        kind: EVENT_DROP,
        peer_identity,
        rule_id: decision.rule_id,
    };
    // The identity the proxy judged the client's requests as must be the one the client's
    // address has here: anything else is a stale or forged mark.
    if let Some(identity) = proxied_from
        && identity != peer_identity
    {
        return Err(deny(drop::PROXY_CLIENT_MISMATCH));
    }
    let (mut outcome, mut verdict_code, mut ct_flags) = match decision.action {
        action::ALLOW | action::REDIRECT => (OUTCOME_FORWARDED, verdict::FORWARDED, 0),
        denied => {
            if ep.flags & FLAG_AUDIT == 0 {
                return Err(deny(deny_reason(denied)));
            }
            (OUTCOME_AUDIT, verdict::AUDIT, CT_FLAG_AUDIT)
        }
    };
    let proxy_port_be = if outcome == OUTCOME_AUDIT {
        0
    } else {
        // Only TCP can be handed to the proxy; a redirect of anything else fails closed below.
        if decision.action == action::REDIRECT || pkt.protocol == proto::TCP {
            proxy_port_needed(ep, decision, key)
        } else {
            0
        }
    };
    let is_syn = pkt.protocol == proto::TCP && pkt.opens;
    if proxy_port_be != 0 || decision.action == action::REDIRECT {
        // Only a TCP connection opened on an endpoint's egress, or a UDP flow there that its
        // own policy redirects (DNS), can be handed to the proxy; anything else that policy
        // sends there fails closed.
        let udp = pkt.protocol == proto::UDP
            && decision.action == action::REDIRECT
            && dir == direction::EGRESS;
        if pkt.protocol != proto::TCP && !udp {
            return Err(deny(drop::PROXY_UNSUPPORTED_PROTOCOL));
        }
        if dir != direction::EGRESS || !(is_syn || udp) {
            return Err(deny(drop::PROXY_UNAVAILABLE));
        }
        outcome = OUTCOME_REDIRECTED;
        verdict_code = verdict::REDIRECTED;
        ct_flags |= CT_FLAG_PROXY_REDIRECT;
    }
    if proxied_from.is_some() {
        ct_flags |= CT_FLAG_FROM_PROXY;
    }
    // Forwarded, but the policies in audit would drop it: audited, by their rule.
    let mut rule_id = decision.rule_id;
    if decision.staged_deny && outcome == OUTCOME_FORWARDED {
        outcome = OUTCOME_AUDIT;
        verdict_code = verdict::AUDIT;
        ct_flags |= CT_FLAG_AUDIT;
        rule_id = decision.staged_rule_id;
    }
    // Only a SYN opens a TCP connection, only a request an ICMP one (and ICMP that is no
    // query opens none). Anything else that policy allows is forwarded but tracks nothing:
    // otherwise a peer could turn the other side's packets into "replies" of a connection
    // that never passed policy in that direction. In audit mode what policy would have
    // dropped is still reported, packet by packet as the drops would be.
    if !pkt.opens {
        if outcome == OUTCOME_AUDIT {
            report(
                cfg,
                ep,
                dir,
                pkt,
                now,
                ifindex,
                len,
                peer_identity,
                rule_id,
                verdict_code,
                EVENT_NEW_CONNECTION,
            );
        }
        return Ok(outcome);
    }
    if conntrack::create(
        key,
        cfg,
        now,
        len,
        ep.endpoint_id,
        peer_identity,
        rule_id,
        ct_flags,
        proxy_port_be,
        if proxied_from.is_some() {
            &client
        } else {
            &[0; 16]
        },
    )
    .is_err()
    {
        return Err(deny(drop::CT_MAP_FULL));
    }
    if ct_flags & CT_FLAG_PROXY_REDIRECT != 0
        && let Err(reason) = proxy::redirect(ctx, ep, pkt, proxy_port_be)
    {
        conntrack::remove(key);
        return Err(deny(reason));
    }
    report(
        cfg,
        ep,
        dir,
        pkt,
        now,
        ifindex,
        len,
        peer_identity,
        rule_id,
        verdict_code,
        EVENT_NEW_CONNECTION,
    );
    Ok(outcome)
}

/// The flow event of a verdict that is no drop (drops are `report_drop`'s): a new
/// connection's, or in audit mode that of a packet or connection policy would have dropped.
#[expect(
    clippy::too_many_arguments,
    reason = "always inlined: a struct would only add stack"
)]
#[inline(always)]
fn report(
    cfg: &Config,
    ep: &EndpointInfo,
    dir: u8,
    pkt: &Packet,
    now: u64,
    ifindex: u32,
    len: u32,
    peer_identity: u32,
    rule_id: u32,
    verdict_code: u8,
    kind: u8,
) {
    let (src_identity, dst_identity) = if dir == direction::EGRESS {
        (ep.identity, peer_identity)
    } else {
        (peer_identity, ep.identity)
    };
    events::emit(cfg, now, ep.endpoint_id, pkt, || EventMeta {
        kind,
        verdict: verdict_code,
        drop_reason: drop::NONE,
        direction: dir,
        endpoint_id: ep.endpoint_id,
        ifindex,
        src_identity,
        dst_identity,
        rule_id,
        packet_len: len,
    });
}
