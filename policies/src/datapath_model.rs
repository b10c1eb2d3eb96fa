//! The datapath's per-packet decision, written again as plain Rust: what the two TC
//! classifiers in datapath-bpf/src/ do with one frame, given the maps (`MapState`), a
//! conntrack table and the config. It exists to be compared with the real programs
//! (integration/tests/differential.rs runs them with BPF_PROG_TEST_RUN on the same frames and
//! map states), so it follows them function by function, in the same order of checks; each
//! function says which BPF function it mirrors. The fast path is in: between two endpoints
//! of the node the sender's program gives the destination's ingress verdict too. Out of scope, because they do not change a
//! verdict: flow events and their rate limit, conntrack expiry and LRU eviction (every entry
//! lives as long as a test needs it), and `CT_MAP_FULL`.
//!
//! The outcome is what the datapath counts: forwarded, redirected (to the L7 proxy), audit
//! (forwarded although policy would drop it), or dropped with a reason code from
//! `palisade_common::reason::drop`.

use std::collections::BTreeMap;
use std::fmt;
use std::net::Ipv4Addr;

use palisade_common::conntrack::{
    CT_FLAG_AUDIT, CT_FLAG_FIN_FORWARD, CT_FLAG_FIN_REPLY, CT_FLAG_FROM_PROXY,
    CT_FLAG_PROXY_REDIRECT, CT_FLAG_SEEN_REPLY,
};
use palisade_common::metrics::{OUTCOME_AUDIT, OUTCOME_FORWARDED, OUTCOME_REDIRECTED};
use palisade_common::reason::{drop, drop_reason_name};
use palisade_common::{maps as names, mark, proto};

use crate::endpoint::EndpointId;
use crate::identity::Identity;
use crate::mapstate::{Action, EndpointEntry, IpcacheEntry, MapState, RuleId};
use crate::model::Direction;

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_ARP: u16 = 0x0806;
const IP_MF: u16 = 0x2000;
const IP_OFFSET_MASK: u16 = 0x1fff;
const ICMP_ECHO_REPLY: u8 = 0;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_ECHO: u8 = 8;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMP_PARAMETER_PROBLEM: u8 = 12;
const ICMP_TIMESTAMP: u8 = 13;
const ICMP_TIMESTAMP_REPLY: u8 = 14;
const ICMP_INFO_REQUEST: u8 = 15;
const ICMP_INFO_REPLY: u8 = 16;
const ICMP_ADDRESS: u8 = 17;
const ICMP_ADDRESS_REPLY: u8 = 18;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_PSH: u8 = 0x08;
pub const TCP_ACK: u8 = 0x10;

/// TC actions, as the programs return them.
pub const TC_ACT_OK: u32 = 0;
pub const TC_ACT_SHOT: u32 = 2;
/// What `bpf_redirect_peer` returns: the fast path's hand-over.
pub const TC_ACT_REDIRECT: u32 = 7;

/// Which classifier judges the frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Program {
    /// `tc_from_endpoint`: TC ingress of the host-side veth, the endpoint's egress.
    FromEndpoint,
    /// `tc_to_endpoint`: TC egress of the host-side veth, the endpoint's ingress.
    ToEndpoint,
}

impl Program {
    pub const BOTH: [Program; 2] = [Program::FromEndpoint, Program::ToEndpoint];

    /// The endpoint direction the program judges.
    pub fn direction(self) -> Direction {
        match self {
            Program::FromEndpoint => Direction::Egress,
            Program::ToEndpoint => Direction::Ingress,
        }
    }

    /// The program's name in the BPF object.
    pub fn name(self) -> &'static str {
        match self {
            Program::FromEndpoint => names::PROG_FROM_ENDPOINT,
            Program::ToEndpoint => names::PROG_TO_ENDPOINT,
        }
    }
}

fn opposite(d: Direction) -> Direction {
    match d {
        Direction::Ingress => Direction::Egress,
        Direction::Egress => Direction::Ingress,
    }
}

/// One frame arriving at a program, and what the node around it provides.
#[derive(Clone, Copy, Debug)]
pub struct Input<'a> {
    pub program: Program,
    /// The interface the frame is on (the endpoints map is keyed by it).
    pub ifindex: u32,
    /// skb->mark: the proxy's upstream leg carries `mark::from_proxy(client identity)`.
    pub mark: u32,
    /// skb->priority: the proxy's upstream leg carries `mark::client_priority(client address)`.
    pub priority: u32,
    /// The proxy's listener exists and `bpf_sk_assign` to it succeeds; without it a redirect
    /// drops with `PROXY_UNAVAILABLE`.
    pub proxy_listener: bool,
    /// Ethernet header onwards, exactly the bytes the program can load.
    pub frame: &'a [u8],
}

/// What the datapath counts for a packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Outcome {
    Forwarded,
    Redirected,
    Audit,
    /// A `palisade_common::reason::drop` code.
    Dropped(u8),
}

impl Outcome {
    /// The counter the datapath bumps (`metrics::OUTCOME_*` or the drop reason).
    pub fn counter(self) -> u8 {
        match self {
            Outcome::Forwarded => OUTCOME_FORWARDED,
            Outcome::Redirected => OUTCOME_REDIRECTED,
            Outcome::Audit => OUTCOME_AUDIT,
            Outcome::Dropped(reason) => reason,
        }
    }

    /// The TC action the program returns.
    pub fn tc_action(self) -> u32 {
        match self {
            Outcome::Dropped(_) => TC_ACT_SHOT,
            _ => TC_ACT_OK,
        }
    }

    /// The outcome a program's return value and counter stand for.
    pub fn from_counter(return_value: u32, counter: u8) -> Option<Outcome> {
        Some(match (return_value, counter) {
            (TC_ACT_OK, OUTCOME_FORWARDED) => Outcome::Forwarded,
            (TC_ACT_OK, OUTCOME_REDIRECTED) => Outcome::Redirected,
            (TC_ACT_OK, OUTCOME_AUDIT) => Outcome::Audit,
            (TC_ACT_SHOT, reason) if reason >= 130 => Outcome::Dropped(reason),
            _ => return None,
        })
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Forwarded => f.write_str("FORWARDED"),
            Outcome::Redirected => f.write_str("REDIRECTED"),
            Outcome::Audit => f.write_str("AUDIT"),
            Outcome::Dropped(r) => write!(f, "DROPPED ({}, {r})", drop_reason_name(*r)),
        }
    }
}

/// Which step of the pipeline decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    NotInitialized,
    UnknownEndpoint,
    Parse,
    Arp,
    SourceCheck,
    /// Ingress: the destination address must be the endpoint's.
    DestinationCheck,
    /// An ICMP error, judged by the connection it reports on.
    Related,
    /// A packet of a tracked connection (`reply`: of its reply direction).
    Established {
        reply: bool,
    },
    /// A tracked connection re-checked after a policy change, and stopped.
    Revalidation,
    NewConnection,
}

/// A conntrack key: the connection's original tuple and the endpoint direction that tracks
/// it (`CtKey` in datapath-bpf/common/src/conntrack.rs, in host byte order).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CtKey {
    pub scope: Direction,
    pub protocol: u8,
    pub saddr: Ipv4Addr,
    pub sport: u16,
    pub daddr: Ipv4Addr,
    pub dport: u16,
}

impl fmt::Display for CtKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "[{}] proto {} {}:{} -> {}:{}",
            self.scope, self.protocol, self.saddr, self.sport, self.daddr, self.dport
        )
    }
}

/// The parts of a conntrack entry that follow from the packets and the policy (`CtEntry`
/// without its clocks).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CtEntry {
    pub endpoint: EndpointId,
    /// The peer's identity when the entry was created or last revalidated.
    pub peer_identity: Identity,
    pub rule: RuleId,
    pub policy_revision: u32,
    /// `palisade_common::conntrack::CT_FLAG_*`.
    pub flags: u16,
    pub proxy_port: u16,
    pub packets: u64,
    pub bytes: u64,
    /// The proxy's upstream leg: the original client's address (else unspecified).
    pub proxy_client: Ipv4Addr,
}

/// What a packet did to conntrack.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CtChange {
    Created(CtKey),
    Updated(CtKey),
    /// Re-checked against a new policy revision and kept.
    Revalidated(CtKey),
    Removed(CtKey),
}

/// The verdict on one packet and everything it changed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Judgement {
    pub outcome: Outcome,
    /// skb->mark afterwards (`mark::TO_PROXY` once handed to the proxy).
    pub mark: u32,
    pub step: Step,
    /// Conntrack changes, the fast path's destination's after the sender's.
    pub changes: Vec<CtChange>,
    /// The fast path (`fast_path.rs`): the sender's egress let the frame out to another
    /// endpoint of the node, whose ingress verdict the same program then gave.
    pub fast_path: Option<FastPath>,
}

impl Judgement {
    /// The TC action the program returns: the fast path's redirect when both verdicts let
    /// the frame through, a drop when the destination's refused it.
    pub fn tc_action(&self) -> u32 {
        match self.fast_path {
            None => self.outcome.tc_action(),
            Some(FastPath {
                outcome: Outcome::Dropped(_) | Outcome::Redirected,
                ..
            }) => TC_ACT_SHOT,
            Some(_) => TC_ACT_REDIRECT,
        }
    }
}

/// The destination's ingress verdict on the fast path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FastPath {
    /// The destination's host-side interface.
    pub ifindex: u32,
    pub outcome: Outcome,
    pub step: Step,
}

/// The config map, as far as verdicts care.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    pub policy_revision: u32,
    /// `CONFIG_FLAG_FAST_PATH`.
    pub fast_path: bool,
}

/// The datapath's state: config (None: missing or not initialized), maps, conntrack.
#[derive(Clone, Debug, Default)]
pub struct DatapathModel {
    pub config: Option<Config>,
    pub maps: MapState,
    pub conntrack: BTreeMap<CtKey, CtEntry>,
}

// ---- packet.rs ------------------------------------------------------------------------------

/// The connection tuple of a packet plus what policy needs (`Packet` in packet.rs). ICMP
/// queries carry their identifier in `sport` and their type in `dport`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Packet {
    pub saddr: Ipv4Addr,
    pub daddr: Ipv4Addr,
    pub sport: u16,
    pub dport: u16,
    pub protocol: u8,
    pub tcp_flags: u8,
    /// The "port" policy matches: the destination port, or the ICMP type.
    pub policy_port: u16,
    /// May open a connection: a TCP SYN, an ICMP query request, any packet of other
    /// protocols.
    pub opens: bool,
    /// An ICMP error: the tuple is the embedded packet's.
    pub related: bool,
    /// The IP header's own addresses (an ICMP error's, not the embedded packet's).
    pub outer_saddr: Ipv4Addr,
    pub outer_daddr: Ipv4Addr,
}

/// `packet::icmp_counterpart`: a query's request and reply types are each other's; any other
/// type is its own.
fn icmp_counterpart(icmp_type: u8) -> u8 {
    match icmp_type {
        ICMP_ECHO => ICMP_ECHO_REPLY,
        ICMP_ECHO_REPLY => ICMP_ECHO,
        ICMP_TIMESTAMP => ICMP_TIMESTAMP_REPLY,
        ICMP_TIMESTAMP_REPLY => ICMP_TIMESTAMP,
        ICMP_INFO_REQUEST => ICMP_INFO_REPLY,
        ICMP_INFO_REPLY => ICMP_INFO_REQUEST,
        ICMP_ADDRESS => ICMP_ADDRESS_REPLY,
        ICMP_ADDRESS_REPLY => ICMP_ADDRESS,
        t => t,
    }
}

/// `packet::icmp_is_request`.
fn icmp_is_request(icmp_type: u8) -> bool {
    matches!(
        icmp_type,
        ICMP_ECHO | ICMP_TIMESTAMP | ICMP_INFO_REQUEST | ICMP_ADDRESS
    )
}

/// `Parsed` in packet.rs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Parsed {
    Arp,
    Ipv4(Packet),
}

/// `bpf_skb_load_bytes`: `n` bytes at `off`, or `INVALID_PACKET` past the end.
fn load(frame: &[u8], off: usize, n: usize) -> Result<&[u8], u8> {
    frame.get(off..off + n).ok_or(drop::INVALID_PACKET)
}

fn load_u8(frame: &[u8], off: usize) -> Result<u8, u8> {
    Ok(load(frame, off, 1)?[0])
}

fn load_u16(frame: &[u8], off: usize) -> Result<u16, u8> {
    let b = load(frame, off, 2)?;
    Ok(u16::from_be_bytes([b[0], b[1]]))
}

fn load_addr(frame: &[u8], off: usize) -> Result<Ipv4Addr, u8> {
    let b = load(frame, off, 4)?;
    Ok(Ipv4Addr::new(b[0], b[1], b[2], b[3]))
}

/// `packet::parse`.
pub fn parse(frame: &[u8]) -> Result<Parsed, u8> {
    match load_u16(frame, 12)? {
        ETH_P_IP => parse_ipv4(frame, ETH_HLEN).map(Parsed::Ipv4),
        ETH_P_ARP => Ok(Parsed::Arp),
        _ => Err(drop::UNSUPPORTED_L3),
    }
}

struct Ipv4Header {
    protocol: u8,
    saddr: Ipv4Addr,
    daddr: Ipv4Addr,
    l4: usize,
    frag: u16,
    total_len: u16,
}

/// `packet::ipv4_header`: version 4, IHL of at least 5 words, and the fields it reads.
fn ipv4_header(frame: &[u8], off: usize) -> Result<Ipv4Header, u8> {
    let version_ihl = load_u8(frame, off)?;
    if version_ihl >> 4 != 4 {
        return Err(drop::INVALID_PACKET);
    }
    let ihl = usize::from(version_ihl & 0x0f) * 4;
    if ihl < 20 {
        return Err(drop::INVALID_PACKET);
    }
    Ok(Ipv4Header {
        total_len: load_u16(frame, off + 2)?,
        frag: load_u16(frame, off + 6)?,
        protocol: load_u8(frame, off + 9)?,
        saddr: load_addr(frame, off + 12)?,
        daddr: load_addr(frame, off + 16)?,
        l4: off + ihl,
    })
}

/// `packet::parse_ipv4`: the total length must cover the header and fit in the frame; what
/// lies past it (Ethernet padding) is never read.
fn parse_ipv4(frame: &[u8], off: usize) -> Result<Packet, u8> {
    let h = ipv4_header(frame, off)?;
    let end = off + usize::from(h.total_len);
    if end < h.l4 || end > frame.len() {
        return Err(drop::INVALID_IP_LENGTH);
    }
    let frame = &frame[..end];
    if h.frag & (IP_MF | IP_OFFSET_MASK) != 0 {
        return Err(drop::FRAGMENTED);
    }
    let mut pkt = Packet {
        saddr: h.saddr,
        daddr: h.daddr,
        sport: 0,
        dport: 0,
        protocol: h.protocol,
        tcp_flags: 0,
        policy_port: 0,
        opens: true,
        related: false,
        outer_saddr: h.saddr,
        outer_daddr: h.daddr,
    };
    let l4 = h.l4;
    match h.protocol {
        proto::TCP => {
            pkt.sport = load_u16(frame, l4)?;
            pkt.dport = load_u16(frame, l4 + 2)?;
            pkt.tcp_flags = load_u8(frame, l4 + 13)?;
            pkt.policy_port = pkt.dport;
            pkt.opens = pkt.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
        }
        proto::UDP | proto::SCTP => {
            pkt.sport = load_u16(frame, l4)?;
            pkt.dport = load_u16(frame, l4 + 2)?;
            pkt.policy_port = pkt.dport;
        }
        proto::ICMP => {
            let icmp_type = load_u8(frame, l4)?;
            if matches!(
                icmp_type,
                ICMP_DEST_UNREACH | ICMP_TIME_EXCEEDED | ICMP_PARAMETER_PROBLEM
            ) {
                return parse_icmp_error(frame, l4 + 8, &pkt);
            }
            // The type as the port, for policy and conntrack; a query's identifier beside it.
            pkt.dport = u16::from(icmp_type);
            pkt.policy_port = pkt.dport;
            if icmp_counterpart(icmp_type) != icmp_type {
                pkt.sport = load_u16(frame, l4 + 4)?;
            }
            pkt.opens = icmp_is_request(icmp_type);
        }
        _ => {}
    }
    Ok(pkt)
}

/// `packet::parse_icmp_error`: the embedded packet's tuple (its fragment bits and total
/// length unchecked: only its start is quoted), read within the error's own total length.
fn parse_icmp_error(frame: &[u8], inner: usize, outer: &Packet) -> Result<Packet, u8> {
    let h = ipv4_header(frame, inner)?;
    let mut pkt = Packet {
        saddr: h.saddr,
        daddr: h.daddr,
        sport: 0,
        dport: 0,
        protocol: h.protocol,
        tcp_flags: 0,
        policy_port: 0,
        opens: false,
        related: true,
        outer_saddr: outer.outer_saddr,
        outer_daddr: outer.outer_daddr,
    };
    match h.protocol {
        proto::TCP | proto::UDP | proto::SCTP => {
            pkt.sport = load_u16(frame, h.l4)?;
            pkt.dport = load_u16(frame, h.l4 + 2)?;
        }
        proto::ICMP => {
            // An embedded query's key, as it was tracked.
            let icmp_type = load_u8(frame, h.l4)?;
            pkt.dport = u16::from(icmp_type);
            if icmp_counterpart(icmp_type) != icmp_type {
                pkt.sport = load_u16(frame, h.l4 + 4)?;
            }
        }
        _ => {}
    }
    Ok(pkt)
}

// ---- conntrack.rs ---------------------------------------------------------------------------

/// `conntrack::key_forward`.
fn key_forward(pkt: &Packet, scope: Direction) -> CtKey {
    CtKey {
        scope,
        protocol: pkt.protocol,
        saddr: pkt.saddr,
        sport: pkt.sport,
        daddr: pkt.daddr,
        dport: pkt.dport,
    }
}

/// `conntrack::reverse_in_place`: an ICMP key keeps its identifier and takes the counterpart
/// type, so only a reply finds its request's entry turned around.
fn reversed(key: CtKey, scope: Direction) -> CtKey {
    if key.protocol == proto::ICMP {
        return CtKey {
            scope,
            saddr: key.daddr,
            daddr: key.saddr,
            dport: u16::from(icmp_counterpart(u8::try_from(key.dport).unwrap_or(u8::MAX))),
            ..key
        };
    }
    CtKey {
        scope,
        saddr: key.daddr,
        sport: key.dport,
        daddr: key.saddr,
        dport: key.sport,
        protocol: key.protocol,
    }
}

/// `conntrack::update`: accounts the packet and advances TCP state; true on RST (the caller
/// removes the entry, after the packet is forwarded).
fn ct_update(e: &mut CtEntry, pkt: &Packet, is_reply: bool, len: u64) -> bool {
    e.packets += 1;
    e.bytes += len;
    if pkt.protocol == proto::TCP {
        if pkt.tcp_flags & TCP_RST != 0 {
            return true;
        }
        if is_reply {
            e.flags |= CT_FLAG_SEEN_REPLY;
        }
        if pkt.tcp_flags & TCP_FIN != 0 {
            e.flags |= if is_reply {
                CT_FLAG_FIN_REPLY
            } else {
                CT_FLAG_FIN_FORWARD
            };
        }
    }
    false
}

// ---- policy.rs ------------------------------------------------------------------------------

/// `policy::Decision`: `action` None when nothing matched and the direction is enforced;
/// `staged` the rule by which the policies in audit would deny what `action` allows
/// (`RuleId::NONE`: their default deny).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Decision {
    action: Option<Action>,
    rule: RuleId,
    staged: Option<RuleId>,
}

impl Decision {
    fn is_redirect(self) -> bool {
        matches!(self.action, Some(Action::Redirect { .. }))
    }

    fn proxy_port(self) -> u16 {
        match self.action {
            Some(Action::Redirect { proxy_port }) => proxy_port,
            _ => 0,
        }
    }
}

/// `policy::decide`: the best match across the peer's identity, the wildcard and the CIDR
/// alias (`MapState::best_match_staged`), else allow unless the direction is enforced; and
/// for what that allows (not redirects), whether the policies in audit would deny it: a
/// matching entry's staged deny, or else, when no entry matched at all, their default deny.
fn decide(
    maps: &MapState,
    id: EndpointId,
    ep: &EndpointEntry,
    dir: Direction,
    peer: &IpcacheEntry,
    protocol: u8,
    port: u16,
) -> Decision {
    let enforced = match dir {
        Direction::Ingress => ep.ingress_enforced,
        Direction::Egress => ep.egress_enforced,
    };
    let (best, staged_rule, any) = maps.best_match_staged(id, dir, peer, protocol, port);
    let mut decision = match best {
        Some((_, entry)) => Decision {
            action: Some(entry.action),
            rule: entry.rule,
            staged: None,
        },
        None => Decision {
            action: (!enforced).then_some(Action::Allow),
            rule: RuleId::NONE,
            staged: None,
        },
    };
    if decision.action == Some(Action::Allow) {
        decision.staged = staged_rule.or((!any && ep.staged.get(dir)).then_some(RuleId::NONE));
    }
    decision
}

// ---- judge.rs -------------------------------------------------------------------------------

/// `judge::Drop`, reduced to what the counters see.
type DropReason = u8;

/// `judge::deny_reason`.
fn deny_reason(action: Option<Action>) -> DropReason {
    if action == Some(Action::Deny) {
        drop::POLICY_DENY_RULE
    } else {
        drop::POLICY_DENIED
    }
}

/// `proxy::from_proxy_identity`.
fn from_proxy_identity(m: u32) -> Option<Identity> {
    (m & mark::MAGIC_MASK == mark::FROM_PROXY).then_some(Identity(m & mark::IDENTITY_MASK))
}

/// `proxy::redirect`: hands the packet to the proxy's socket for the connection or its
/// listener; either way the environment decides whether `bpf_sk_assign` works.
fn redirect(input: &Input<'_>, proxy_port: u16, mark_out: &mut u32) -> Result<(), DropReason> {
    if proxy_port == 0 || !input.proxy_listener {
        return Err(drop::PROXY_UNAVAILABLE);
    }
    *mark_out = mark::TO_PROXY;
    Ok(())
}

/// The kernel's `csum16_add`: one's complement addition of two 16-bit words.
fn csum16_add(sum: u16, addend: u16) -> u16 {
    let (r, carry) = sum.overflowing_add(addend);
    r + u16::from(carry)
}

/// The kernel's `csum_replace2`: a checksum updated for one 16-bit word changed (RFC 1624).
fn csum_replace2(sum: u16, old: u16, new: u16) -> u16 {
    !csum16_add(csum16_add(!sum, !old), new)
}

/// The endpoint an interface belongs to (the ENDPOINTS map is keyed by ifindex).
fn endpoint_at(maps: &MapState, ifindex: u32) -> Option<(EndpointId, EndpointEntry)> {
    maps.endpoints
        .iter()
        .find(|(_, e)| e.ifindex == ifindex)
        .map(|(id, e)| (*id, *e))
}

/// The endpoint a packet is judged for, as `judge` passes it down.
struct Ctx<'i, 'f> {
    input: &'i Input<'f>,
    id: EndpointId,
    ep: EndpointEntry,
    len: u64,
    mark: u32,
    changes: Vec<CtChange>,
}

impl DatapathModel {
    /// A datapath with config and maps, and empty conntrack.
    pub fn new(policy_revision: u32, maps: MapState) -> Self {
        Self {
            config: Some(Config {
                policy_revision,
                fast_path: false,
            }),
            maps,
            conntrack: BTreeMap::new(),
        }
    }

    /// `judge::run`: judges one frame, applying its conntrack changes; between two
    /// endpoints of the node with the fast path on, the destination's ingress too.
    pub fn judge(&mut self, input: &Input<'_>) -> Judgement {
        let mut changes = Vec::new();
        let mut mark_out = input.mark;
        let (step, result) = self.judge_inner(input, &mut changes, &mut mark_out, true);
        let outcome = match result {
            Ok(o) => o,
            Err(reason) => Outcome::Dropped(reason),
        };
        let mut fast_path = None;
        if input.program == Program::FromEndpoint
            && matches!(outcome, Outcome::Forwarded | Outcome::Audit)
            && let Some(peer) = self.local_destination(input)
        {
            // The destination's pipeline, on the frame as it is (readdressing comes after),
            // for a packet that did not come from the node's stack: no proxy mark counts.
            let at_peer = Input {
                program: Program::ToEndpoint,
                ifindex: peer,
                ..*input
            };
            let mut peer_mark = input.mark;
            let (peer_step, peer_result) =
                self.judge_inner(&at_peer, &mut changes, &mut peer_mark, false);
            fast_path = Some(FastPath {
                ifindex: peer,
                outcome: match peer_result {
                    Ok(o) => o,
                    Err(reason) => Outcome::Dropped(reason),
                },
                step: peer_step,
            });
        }
        Judgement {
            outcome,
            mark: mark_out,
            step,
            changes,
            fast_path,
        }
    }

    /// `fast_path::deliver`: the frame as the fast path hands it to the endpoint on
    /// `ifindex`: addressed to its MAC from its host side's, the TTL one less and the header
    /// checksum updated for it as `bpf_l3_csum_replace` does (incrementally, so a wrong
    /// checksum stays wrong). None when no endpoint is on `ifindex` or the frame is too short.
    pub fn delivered_frame(&self, frame: &[u8], ifindex: u32) -> Option<Vec<u8>> {
        let (_, ep) = endpoint_at(&self.maps, ifindex)?;
        let mut out = frame.to_vec();
        let ttl_at = ETH_HLEN + 8;
        let sum_at = ETH_HLEN + 10;
        out.get(..sum_at + 2)?;
        out[..6].copy_from_slice(&ep.link.mac);
        out[6..12].copy_from_slice(&ep.link.host_mac);
        let old = [out[ttl_at], out[ttl_at + 1]];
        let new = [old[0].checked_sub(1)?, old[1]];
        out[ttl_at] = new[0];
        let sum = u16::from_ne_bytes([out[sum_at], out[sum_at + 1]]);
        let replaced = csum_replace2(sum, u16::from_ne_bytes(old), u16::from_ne_bytes(new));
        out[sum_at..sum_at + 2].copy_from_slice(&replaced.to_ne_bytes());
        Some(out)
    }

    /// `fast_path::local_destination`: the host-side ifindex of the local endpoint an IPv4
    /// frame let out on `input.ifindex` is addressed to, when the fast path takes it. It reads
    /// the frame's own header fields (the outer ones of an ICMP error).
    fn local_destination(&self, input: &Input<'_>) -> Option<u32> {
        if !self.config?.fast_path {
            return None;
        }
        let frame = input.frame;
        if load_u16(frame, 12).ok()? != ETH_P_IP || load_u8(frame, ETH_HLEN + 8).ok()? <= 1 {
            return None;
        }
        let daddr = load_addr(frame, ETH_HLEN + 16).ok()?;
        // ENDPOINT_BY_ADDR, written from the endpoints map.
        let (_, dst) = self.maps.endpoints.iter().find(|(_, e)| e.ip == daddr)?;
        let (_, src) = endpoint_at(&self.maps, input.ifindex)?;
        let fits = |e: &EndpointEntry| {
            e.link.bridge.is_none() && e.link.mac != [0; 6] && e.link.host_mac != [0; 6]
        };
        (dst.ifindex != input.ifindex && fits(&src) && fits(dst)).then_some(dst.ifindex)
    }

    /// `judge::judge`.
    fn judge_inner(
        &mut self,
        input: &Input<'_>,
        changes: &mut Vec<CtChange>,
        mark_out: &mut u32,
        from_node: bool,
    ) -> (Step, Result<Outcome, DropReason>) {
        let Some(cfg) = self.config else {
            return (Step::NotInitialized, Err(drop::NOT_INITIALIZED));
        };
        let Some((id, ep)) = endpoint_at(&self.maps, input.ifindex) else {
            return (Step::UnknownEndpoint, Err(drop::UNKNOWN_ENDPOINT));
        };
        let pkt = match parse(input.frame) {
            Err(reason) => return (Step::Parse, Err(reason)),
            Ok(Parsed::Arp) => return (Step::Arp, Ok(Outcome::Forwarded)),
            Ok(Parsed::Ipv4(p)) => p,
        };
        let dir = input.program.direction();
        // By the IP header's own addresses, ICMP errors included.
        if dir == Direction::Egress && pkt.outer_saddr != ep.ip {
            return (Step::SourceCheck, Err(drop::INVALID_SOURCE_IP));
        }
        if dir == Direction::Ingress && pkt.outer_daddr != ep.ip {
            return (Step::DestinationCheck, Err(drop::INVALID_DESTINATION_IP));
        }
        let proxied_from = if dir == Direction::Ingress && from_node {
            from_proxy_identity(input.mark)
        } else {
            None
        };
        if pkt.related {
            return (Step::Related, self.related(&pkt, dir));
        }
        let mut ctx = Ctx {
            input,
            id,
            ep,
            len: u64::try_from(input.frame.len()).unwrap_or(u64::MAX),
            mark: *mark_out,
            changes: Vec::new(),
        };
        let key = key_forward(&pkt, dir);
        let (step, result) = if self.conntrack.contains_key(&key) {
            // The original direction of a connection this direction opened.
            match self.established(&mut ctx, cfg, key, &pkt, false) {
                Err(e) => (e.0, Err(e.1)),
                Ok((outcome, flags, proxy_port)) => {
                    let result = if dir == Direction::Egress && flags & CT_FLAG_PROXY_REDIRECT != 0
                    {
                        redirect(input, proxy_port, &mut ctx.mark).map(|()| Outcome::Redirected)
                    } else {
                        Ok(outcome)
                    };
                    (Step::Established { reply: false }, result)
                }
            }
        } else {
            let reply_key = reversed(key, opposite(dir));
            if self.conntrack.contains_key(&reply_key) {
                // A reply of a connection the opposite direction let in or out.
                match self.established(&mut ctx, cfg, reply_key, &pkt, true) {
                    Err(e) => (e.0, Err(e.1)),
                    Ok((outcome, _, _)) => (Step::Established { reply: true }, Ok(outcome)),
                }
            } else {
                (
                    Step::NewConnection,
                    self.new_connection(&mut ctx, cfg, key, &pkt, proxied_from),
                )
            }
        };
        *mark_out = ctx.mark;
        changes.append(&mut ctx.changes);
        (step, result)
    }

    /// `judge::related`: an ICMP error passes as part of the connection it reports on, in its
    /// reply direction only: the embedded packet is of the connection's original direction
    /// (tracked by the opposite direction of this endpoint), the error goes back to its
    /// source, and an endpoint sending one reports on a packet addressed to itself. Received,
    /// any outer source will do (routers). No update, no revalidation.
    fn related(&self, pkt: &Packet, dir: Direction) -> Result<Outcome, DropReason> {
        if pkt.outer_daddr != pkt.saddr
            || (dir == Direction::Egress && pkt.outer_saddr != pkt.daddr)
        {
            return Err(drop::ICMP_ERROR_MISMATCH);
        }
        if self
            .conntrack
            .contains_key(&key_forward(pkt, opposite(dir)))
        {
            Ok(Outcome::Forwarded)
        } else {
            Err(drop::CT_TRUNCATED_OR_INVALID)
        }
    }

    /// `judge::check_policy`: the decision for a connection as `scope` saw it open, and the
    /// peer identity it was judged as. The peer is the far end, or for the proxy's upstream
    /// leg the original client at `proxy_client`, judged as its own connection would be (by
    /// the ipcache's entry for its address, CIDR alias included); a redirect then counts as
    /// allow: the proxy enforced the HTTP rules already.
    fn check_policy(
        &self,
        ctx: &Ctx<'_, '_>,
        scope: Direction,
        key: &CtKey,
        port: u16,
        proxy_client: Option<Ipv4Addr>,
    ) -> (Decision, Identity) {
        let addr = proxy_client.unwrap_or(match scope {
            Direction::Egress => key.daddr,
            Direction::Ingress => key.saddr,
        });
        let peer = self.maps.ipcache_lookup(addr);
        let mut decision = decide(
            &self.maps,
            ctx.id,
            &ctx.ep,
            scope,
            &peer,
            key.protocol,
            port,
        );
        if proxy_client.is_some() && decision.is_redirect() {
            decision.action = Some(Action::Allow);
        }
        (decision, peer.identity)
    }

    /// `judge::proxy_port_needed`: the proxy port a TCP connection (`key`, as its scope
    /// opened it) must take, 0 for none: its own side's redirect, or on a client's egress the
    /// local destination's ingress HTTP rules (`MapState::proxy_port_needed`, which decides
    /// the own side again by address: the same decision whenever this is called on egress).
    fn proxy_port_needed(&self, ctx: &Ctx<'_, '_>, decision: Decision, key: &CtKey) -> u16 {
        if decision.is_redirect() {
            return decision.proxy_port();
        }
        if key.scope != Direction::Egress {
            return 0;
        }
        self.maps
            .proxy_port_needed(ctx.id, key.scope, key.saddr, key.daddr, key.dport)
            .map_or(0, |(port, _)| port)
    }

    /// `judge::established`: revalidates after a policy change, accounts the packet (RST ends
    /// the entry). Returns the outcome and the entry's flags and proxy port (the caller
    /// redirects the original direction of a proxied connection), or the step and reason of
    /// a drop.
    fn established(
        &mut self,
        ctx: &mut Ctx<'_, '_>,
        cfg: Config,
        key: CtKey,
        pkt: &Packet,
        is_reply: bool,
    ) -> Result<(Outcome, u16, u16), (Step, DropReason)> {
        let revision = self.conntrack[&key].policy_revision;
        if revision != cfg.policy_revision {
            self.revalidate(ctx, cfg, key)
                .map_err(|r| (Step::Revalidation, r))?;
        }
        let e = self
            .conntrack
            .get_mut(&key)
            .expect("present: checked above");
        let audit = e.flags & CT_FLAG_AUDIT != 0;
        let ended = ct_update(e, pkt, is_reply, ctx.len);
        let (flags, proxy_port) = (e.flags, e.proxy_port);
        if ended {
            self.conntrack.remove(&key);
            ctx.changes.push(CtChange::Removed(key));
        } else {
            ctx.changes.push(CtChange::Updated(key));
        }
        let outcome = if audit {
            Outcome::Audit
        } else {
            Outcome::Forwarded
        };
        Ok((outcome, flags, proxy_port))
    }

    /// `judge::revalidate`: policy changed since the entry was last checked, and it is checked
    /// as a new connection would be. One the new policy denies stops, or in audit mode goes on
    /// audited (and one allowed again is no longer audited); one it sends through the proxy
    /// stops: TCP, and UDP on the client's egress, with `PROXY_REQUIRED`, anything else with
    /// `PROXY_UNSUPPORTED_PROTOCOL`.
    fn revalidate(
        &mut self,
        ctx: &mut Ctx<'_, '_>,
        cfg: Config,
        key: CtKey,
    ) -> Result<(), DropReason> {
        let e = self.conntrack[&key];
        // The port policy saw when it opened (for ICMP: the request's type).
        let proxy_client = (e.flags & CT_FLAG_FROM_PROXY != 0).then_some(e.proxy_client);
        let (decision, peer_identity) =
            self.check_policy(ctx, key.scope, &key, key.dport, proxy_client);
        let allowed = matches!(
            decision.action,
            Some(Action::Allow | Action::Redirect { .. })
        );
        let stop = if !allowed && !ctx.ep.audit {
            Some(deny_reason(decision.action))
        } else if allowed && proxy_client.is_none() && e.flags & CT_FLAG_PROXY_REDIRECT == 0 {
            if key.protocol == proto::UDP
                && key.scope == Direction::Egress
                && decision.is_redirect()
            {
                // The proxy takes UDP (DNS) from the next datagram on.
                Some(drop::PROXY_REQUIRED)
            } else if key.protocol != proto::TCP && decision.is_redirect() {
                Some(drop::PROXY_UNSUPPORTED_PROTOCOL)
            } else if key.protocol == proto::TCP && self.proxy_port_needed(ctx, decision, &key) != 0
            {
                Some(drop::PROXY_REQUIRED)
            } else {
                None
            }
        } else {
            None
        };
        if let Some(reason) = stop {
            self.conntrack.remove(&key);
            ctx.changes.push(CtChange::Removed(key));
            return Err(reason);
        }
        let e = self.conntrack.get_mut(&key).expect("present: read above");
        // Allowed, but the policies in audit would stop it: it goes on audited (unless it
        // goes through the proxy), by their rule.
        let staged = decision
            .staged
            .filter(|_| allowed && e.flags & CT_FLAG_PROXY_REDIRECT == 0);
        if allowed && staged.is_none() {
            e.flags &= !CT_FLAG_AUDIT;
        } else {
            e.flags |= CT_FLAG_AUDIT;
        }
        e.policy_revision = cfg.policy_revision;
        e.rule = staged.unwrap_or(decision.rule);
        e.peer_identity = peer_identity;
        ctx.changes.push(CtChange::Revalidated(key));
        Ok(())
    }

    /// `judge::new_connection`: policy for a packet no entry knows. Deny beats redirect beats
    /// allow; audit mode forwards what policy denies; a redirect needs a TCP SYN on an
    /// endpoint's egress and the proxy; only a SYN (or any non-TCP packet) opens an entry.
    fn new_connection(
        &mut self,
        ctx: &mut Ctx<'_, '_>,
        cfg: Config,
        key: CtKey,
        pkt: &Packet,
        proxied_from: Option<Identity>,
    ) -> Result<Outcome, DropReason> {
        let dir = key.scope;
        let client = Ipv4Addr::from(ctx.input.priority);
        let proxy_client = proxied_from.map(|_| client);
        let (decision, peer_identity) =
            self.check_policy(ctx, dir, &key, pkt.policy_port, proxy_client);
        // The mark's identity must be the client address's.
        if proxied_from.is_some_and(|identity| identity != peer_identity) {
            return Err(drop::PROXY_CLIENT_MISMATCH);
        }
        let (mut outcome, mut flags) = match decision.action {
            Some(Action::Allow | Action::Redirect { .. }) => (Outcome::Forwarded, 0),
            denied => {
                if !ctx.ep.audit {
                    return Err(deny_reason(denied));
                }
                (Outcome::Audit, CT_FLAG_AUDIT)
            }
        };
        let proxy_port = if outcome == Outcome::Audit {
            0
        } else if decision.is_redirect() || pkt.protocol == proto::TCP {
            // Only TCP can be handed to the proxy; a redirect of anything else fails below.
            self.proxy_port_needed(ctx, decision, &key)
        } else {
            0
        };
        let is_syn = pkt.protocol == proto::TCP && pkt.opens;
        if proxy_port != 0 || decision.is_redirect() {
            // UDP (DNS) that the endpoint's own egress policy redirects goes to the proxy too.
            let udp =
                pkt.protocol == proto::UDP && decision.is_redirect() && dir == Direction::Egress;
            if pkt.protocol != proto::TCP && !udp {
                return Err(drop::PROXY_UNSUPPORTED_PROTOCOL);
            }
            if dir != Direction::Egress || !(is_syn || udp) {
                return Err(drop::PROXY_UNAVAILABLE);
            }
            outcome = Outcome::Redirected;
            flags |= CT_FLAG_PROXY_REDIRECT;
        }
        if proxied_from.is_some() {
            flags |= CT_FLAG_FROM_PROXY;
        }
        // Forwarded, but the policies in audit would drop it: audited, by their rule.
        let mut rule = decision.rule;
        if let Some(staged) = decision.staged
            && outcome == Outcome::Forwarded
        {
            outcome = Outcome::Audit;
            flags |= CT_FLAG_AUDIT;
            rule = staged;
        }
        if !pkt.opens {
            // A TCP segment other than a SYN, an ICMP reply, ICMP that is no query: forwarded
            // as policy says, opening nothing.
            return Ok(outcome);
        }
        self.conntrack.insert(
            key,
            CtEntry {
                endpoint: ctx.id,
                peer_identity,
                rule,
                policy_revision: cfg.policy_revision,
                flags,
                proxy_port,
                packets: 1,
                bytes: ctx.len,
                proxy_client: proxy_client.unwrap_or(Ipv4Addr::UNSPECIFIED),
            },
        );
        if flags & CT_FLAG_PROXY_REDIRECT != 0
            && let Err(reason) = redirect(ctx.input, proxy_port, &mut ctx.mark)
        {
            self.conntrack.remove(&key);
            return Err(reason);
        }
        ctx.changes.push(CtChange::Created(key));
        Ok(outcome)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mapstate::{PolicyEntry, PolicyKey, PortPrefix};

    const TCP: u8 = 6;
    const UDP: u8 = 17;
    const IF_A: u32 = 10;
    const IF_B: u32 = 11;
    const A: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 1);
    const B: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 2);
    const WORLD: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 7);
    const ID_A: Identity = Identity(256);
    const ID_B: Identity = Identity(257);
    const EP_A: EndpointId = EndpointId(1);
    const EP_B: EndpointId = EndpointId(2);
    const PROXY: u16 = 15001;
    /// The node's address, the source of the proxy's upstream leg.
    const NODE: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 254);

    /// Ethernet + IPv4 (20 bytes, DF) + `l4`.
    fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, protocol: u8, l4: &[u8]) -> Vec<u8> {
        let mut f = vec![2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2, 0x08, 0x00];
        let total = u16::try_from(20 + l4.len()).unwrap().to_be_bytes();
        f.extend_from_slice(&[
            0x45, 0, total[0], total[1], 0, 1, 0x40, 0, 64, protocol, 0, 0,
        ]);
        f.extend_from_slice(&src.octets());
        f.extend_from_slice(&dst.octets());
        f.extend_from_slice(l4);
        f
    }

    fn tcp_header(sport: u16, dport: u16, flags: u8) -> Vec<u8> {
        let mut h = vec![0u8; 20];
        h[0..2].copy_from_slice(&sport.to_be_bytes());
        h[2..4].copy_from_slice(&dport.to_be_bytes());
        h[12] = 0x50;
        h[13] = flags;
        h
    }

    fn tcp(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16, flags: u8) -> Vec<u8> {
        ipv4(src, dst, TCP, &tcp_header(sport, dport, flags))
    }

    fn udp(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16) -> Vec<u8> {
        let mut h = vec![0u8; 8];
        h[0..2].copy_from_slice(&sport.to_be_bytes());
        h[2..4].copy_from_slice(&dport.to_be_bytes());
        ipv4(src, dst, UDP, &h)
    }

    fn icmp_echo(src: Ipv4Addr, dst: Ipv4Addr, kind: u8, id: u16) -> Vec<u8> {
        let id = id.to_be_bytes();
        ipv4(src, dst, 1, &[kind, 0, 0, 0, id[0], id[1], 0, 1])
    }

    /// An ICMP error of `kind` from `src` to `dst` embedding `inner` (an IPv4 packet without
    /// its Ethernet header, of which the first 28 bytes are kept).
    fn icmp_error(src: Ipv4Addr, dst: Ipv4Addr, kind: u8, inner: &[u8]) -> Vec<u8> {
        let mut l4 = vec![kind, 0, 0, 0, 0, 0, 0, 0];
        l4.extend_from_slice(&inner[ETH_HLEN..(ETH_HLEN + 28).min(inner.len())]);
        ipv4(src, dst, 1, &l4)
    }

    fn endpoint(ifindex: u32, identity: Identity, ip: Ipv4Addr) -> EndpointEntry {
        EndpointEntry {
            ifindex,
            identity,
            ip,
            ingress_enforced: false,
            egress_enforced: false,
            audit: false,
            staged: crate::mapstate::StagedEnforcement::default(),
            link: crate::endpoint::LinkLayer::default(),
        }
    }

    /// Two endpoints, A and B, with ipcache entries; policy added by the tests.
    fn maps() -> MapState {
        let mut s = MapState::default();
        s.endpoints.insert(EP_A, endpoint(IF_A, ID_A, A));
        s.endpoints.insert(EP_B, endpoint(IF_B, ID_B, B));
        for (net, identity, endpoint) in [
            ("0.0.0.0/0", Identity::WORLD, None),
            ("10.200.0.1/32", ID_A, Some(EP_A)),
            ("10.200.0.2/32", ID_B, Some(EP_B)),
        ] {
            s.ipcache.insert(
                net.parse().unwrap(),
                IpcacheEntry {
                    identity,
                    endpoint,
                    cidr_identity: None,
                },
            );
        }
        s
    }

    /// A policy entry: `(endpoint, direction, peer identity)`, protocol and ports, action.
    fn rule(
        s: &mut MapState,
        (ep, direction, identity): (EndpointId, Direction, Identity),
        protocol: Option<u8>,
        port: PortPrefix,
        action: Action,
        rule: u32,
    ) {
        s.policy.insert(
            PolicyKey {
                endpoint: ep,
                identity,
                direction,
                protocol,
                port,
            },
            PolicyEntry {
                action,
                rule: RuleId(rule),
                staged: crate::mapstate::Staged::Same,
            },
        );
    }

    fn enforce(s: &mut MapState, ep: EndpointId, direction: Direction) {
        let e = s.endpoints.get_mut(&ep).unwrap();
        match direction {
            Direction::Ingress => e.ingress_enforced = true,
            Direction::Egress => e.egress_enforced = true,
        }
    }

    fn run(dp: &mut DatapathModel, program: Program, ifindex: u32, frame: &[u8]) -> Judgement {
        run_with(dp, program, ifindex, 0, true, frame)
    }

    fn run_with(
        dp: &mut DatapathModel,
        program: Program,
        ifindex: u32,
        mark: u32,
        proxy_listener: bool,
        frame: &[u8],
    ) -> Judgement {
        dp.judge(&Input {
            program,
            ifindex,
            mark,
            priority: 0,
            proxy_listener,
            frame,
        })
    }

    /// A packet of the proxy's upstream leg, from the node, for `client` as `identity`.
    fn run_proxied(
        dp: &mut DatapathModel,
        ifindex: u32,
        identity: Identity,
        client: Ipv4Addr,
        frame: &[u8],
    ) -> Judgement {
        dp.judge(&Input {
            program: Program::ToEndpoint,
            ifindex,
            mark: mark::from_proxy(identity.0),
            priority: mark::client_priority(client.octets()),
            proxy_listener: true,
            frame,
        })
    }

    fn out(dp: &mut DatapathModel, program: Program, ifindex: u32, frame: &[u8]) -> Outcome {
        run(dp, program, ifindex, frame).outcome
    }

    use Program::{FromEndpoint as Egress, ToEndpoint as Ingress};

    #[test]
    fn config_then_endpoint_then_parse_are_checked_first() {
        let frame = tcp(A, 40000, B, 80, TCP_SYN);
        let mut dp = DatapathModel {
            config: None,
            maps: maps(),
            conntrack: BTreeMap::new(),
        };
        assert_eq!(
            out(&mut dp, Egress, 99, &frame[..20]),
            Outcome::Dropped(drop::NOT_INITIALIZED)
        );
        dp.config = Some(Config {
            policy_revision: 1,
            fast_path: false,
        });
        assert_eq!(
            out(&mut dp, Egress, 99, &frame[..20]),
            Outcome::Dropped(drop::UNKNOWN_ENDPOINT)
        );
        assert_eq!(
            out(&mut dp, Egress, IF_A, &frame[..20]),
            Outcome::Dropped(drop::INVALID_PACKET)
        );
        assert_eq!(out(&mut dp, Egress, IF_A, &frame), Outcome::Forwarded);
    }

    #[test]
    fn every_truncation_of_a_header_is_an_invalid_packet() {
        let mut dp = DatapathModel::new(1, maps());
        // `frame` cut to `len` bytes, its total length saying so when it still has one: the
        // packet is short, not lying about its length.
        let cut = |frame: &[u8], len: usize| {
            let mut f = frame[..len].to_vec();
            if len >= ETH_HLEN + 4 {
                let total = u16::try_from(len - ETH_HLEN).unwrap().to_be_bytes();
                f[ETH_HLEN + 2..ETH_HLEN + 4].copy_from_slice(&total);
            }
            f
        };
        let frame = tcp(A, 40000, B, 80, TCP_ACK);
        // The TCP flags byte is the last the parser reads: at 14 + 20 + 13.
        for len in 0..ETH_HLEN + 20 + 14 {
            assert_eq!(
                out(&mut dp, Egress, IF_A, &cut(&frame, len)),
                Outcome::Dropped(drop::INVALID_PACKET),
                "truncated at {len}"
            );
        }
        assert_eq!(
            out(&mut dp, Egress, IF_A, &cut(&frame, ETH_HLEN + 20 + 14)),
            Outcome::Forwarded
        );
        // Cut without its total length saying so: a length the frame cannot hold.
        for len in ETH_HLEN + 20..frame.len() {
            assert_eq!(
                out(&mut dp, Egress, IF_A, &frame[..len]),
                Outcome::Dropped(drop::INVALID_IP_LENGTH),
                "truncated at {len}"
            );
        }
        let frame = udp(A, 5000, B, 53);
        for len in 14..ETH_HLEN + 24 {
            assert_eq!(
                out(&mut dp, Egress, IF_A, &cut(&frame, len)),
                Outcome::Dropped(drop::INVALID_PACKET)
            );
        }
        let frame = icmp_echo(A, B, ICMP_ECHO, 7);
        assert_eq!(
            out(&mut dp, Egress, IF_A, &cut(&frame, ETH_HLEN + 25)),
            Outcome::Dropped(drop::INVALID_PACKET)
        );
        assert_eq!(
            out(&mut dp, Egress, IF_A, &cut(&frame, ETH_HLEN + 26)),
            Outcome::Forwarded
        );
    }

    #[test]
    fn ip_header_shape_fragments_and_ethertypes() {
        let mut dp = DatapathModel::new(1, maps());
        let frame = tcp(A, 40000, B, 80, TCP_SYN);
        let with = |f: &dyn Fn(&mut Vec<u8>)| {
            let mut v = frame.clone();
            f(&mut v);
            v
        };
        let cases: Vec<(Vec<u8>, Outcome)> = vec![
            // IHL below 5 words, and version 6 in an IPv4 ethertype.
            (
                with(&|v| v[14] = 0x44),
                Outcome::Dropped(drop::INVALID_PACKET),
            ),
            (
                with(&|v| v[14] = 0x65),
                Outcome::Dropped(drop::INVALID_PACKET),
            ),
            // Fragments: more-fragments, an offset, both; DF alone is fine.
            (with(&|v| v[20] = 0x20), Outcome::Dropped(drop::FRAGMENTED)),
            (with(&|v| v[21] = 0x01), Outcome::Dropped(drop::FRAGMENTED)),
            (with(&|v| v[20] = 0x40), Outcome::Forwarded),
            // Total length: the header alone leaves the TCP header outside the packet (the
            // bytes after it are not read); shorter than the header, or longer than the
            // frame, is no IPv4 packet.
            (
                with(&|v| v[17] = 20),
                Outcome::Dropped(drop::INVALID_PACKET),
            ),
            (
                with(&|v| v[17] = 19),
                Outcome::Dropped(drop::INVALID_IP_LENGTH),
            ),
            (
                with(&|v| v[17] = 0),
                Outcome::Dropped(drop::INVALID_IP_LENGTH),
            ),
            (
                with(&|v| v[16] = 0xff),
                Outcome::Dropped(drop::INVALID_IP_LENGTH),
            ),
            (
                with(&|v| v[17] += 1),
                Outcome::Dropped(drop::INVALID_IP_LENGTH),
            ),
            // A frame longer than its packet (Ethernet padding) is fine.
            (with(&|v| v.extend_from_slice(&[0; 6])), Outcome::Forwarded),
            // IPv6, a VLAN tag, and ARP (forwarded unjudged, whatever it claims).
            (
                with(&|v| v[12..14].copy_from_slice(&[0x86, 0xdd])),
                Outcome::Dropped(drop::UNSUPPORTED_L3),
            ),
            (
                with(&|v| v[12..14].copy_from_slice(&[0x81, 0x00])),
                Outcome::Dropped(drop::UNSUPPORTED_L3),
            ),
            (
                with(&|v| v[12..14].copy_from_slice(&[0x08, 0x06])),
                Outcome::Forwarded,
            ),
        ];
        for (i, (f, want)) in cases.iter().enumerate() {
            assert_eq!(out(&mut dp, Egress, IF_A, f), *want, "case {i}");
        }
        // A fragment too short for its own header is invalid before it is a fragment.
        let frag = with(&|v| v[20] = 0x20);
        assert_eq!(
            out(&mut dp, Egress, IF_A, &frag[..ETH_HLEN + 19]),
            Outcome::Dropped(drop::INVALID_PACKET)
        );
        // IP options: the ports are read after them.
        let mut opts = frame[..ETH_HLEN + 20].to_vec();
        opts[14] = 0x46;
        opts.extend_from_slice(&[1, 1, 1, 0]);
        opts.extend_from_slice(&tcp_header(40000, 22, TCP_SYN));
        opts[ETH_HLEN + 3] += 4;
        let mut s = maps();
        enforce(&mut s, EP_A, Direction::Egress);
        rule(
            &mut s,
            (EP_A, Direction::Egress, ID_B),
            Some(TCP),
            PortPrefix::exact(22),
            Action::Allow,
            1,
        );
        let mut dp = DatapathModel::new(1, s);
        assert_eq!(out(&mut dp, Egress, IF_A, &opts), Outcome::Forwarded);
        assert_eq!(
            out(&mut dp, Egress, IF_A, &frame),
            Outcome::Dropped(drop::POLICY_DENIED)
        );
        // IHL pointing past the total length (and the frame).
        let mut far = frame.clone();
        far[14] = 0x4f;
        assert_eq!(
            out(&mut dp, Egress, IF_A, &far),
            Outcome::Dropped(drop::INVALID_IP_LENGTH)
        );
    }

    #[test]
    fn egress_from_another_address_is_spoofed_ingress_to_another_misdirected() {
        let mut dp = DatapathModel::new(1, maps());
        assert_eq!(
            out(&mut dp, Egress, IF_A, &tcp(B, 1, WORLD, 80, TCP_SYN)),
            Outcome::Dropped(drop::INVALID_SOURCE_IP)
        );
        // Ingress: any source, but the endpoint's own address as the destination.
        assert_eq!(
            out(&mut dp, Ingress, IF_A, &tcp(WORLD, 1, B, 80, TCP_SYN)),
            Outcome::Dropped(drop::INVALID_DESTINATION_IP)
        );
        assert_eq!(
            out(&mut dp, Ingress, IF_A, &tcp(B, 1, A, 80, TCP_SYN)),
            Outcome::Forwarded
        );
        assert!(dp.conntrack.len() == 1);
    }

    #[test]
    fn deny_beats_allow_across_identity_and_wildcard_and_default_deny() {
        let mut s = maps();
        enforce(&mut s, EP_B, Direction::Ingress);
        rule(
            &mut s,
            (EP_B, Direction::Ingress, ID_A),
            None,
            PortPrefix::ANY,
            Action::Allow,
            1,
        );
        rule(
            &mut s,
            (EP_B, Direction::Ingress, Identity::ANY),
            Some(TCP),
            PortPrefix::exact(22),
            Action::Deny,
            2,
        );
        let mut dp = DatapathModel::new(1, s);
        assert_eq!(
            out(&mut dp, Ingress, IF_B, &tcp(A, 1, B, 22, TCP_SYN)),
            Outcome::Dropped(drop::POLICY_DENY_RULE)
        );
        assert_eq!(
            out(&mut dp, Ingress, IF_B, &tcp(A, 1, B, 80, TCP_SYN)),
            Outcome::Forwarded
        );
        assert_eq!(
            out(&mut dp, Ingress, IF_B, &tcp(WORLD, 1, B, 80, TCP_SYN)),
            Outcome::Dropped(drop::POLICY_DENIED)
        );
        let key = CtKey {
            scope: Direction::Ingress,
            protocol: TCP,
            saddr: A,
            sport: 1,
            daddr: B,
            dport: 80,
        };
        assert_eq!(dp.conntrack[&key].rule, RuleId(1));
        assert_eq!(dp.conntrack[&key].peer_identity, ID_A);
    }

    #[test]
    fn tcp_opens_on_syn_replies_pass_and_rst_ends() {
        let mut s = maps();
        enforce(&mut s, EP_B, Direction::Ingress);
        enforce(&mut s, EP_B, Direction::Egress);
        rule(
            &mut s,
            (EP_B, Direction::Ingress, ID_A),
            Some(TCP),
            PortPrefix::exact(80),
            Action::Allow,
            1,
        );
        let mut dp = DatapathModel::new(1, s);
        // Mid-stream from A: allowed, but tracks nothing, so B's answer is not a reply.
        let j = run(&mut dp, Ingress, IF_B, &tcp(A, 1000, B, 80, TCP_ACK));
        assert_eq!((j.outcome, j.changes.len()), (Outcome::Forwarded, 0));
        assert_eq!(
            out(&mut dp, Egress, IF_B, &tcp(B, 80, A, 1000, TCP_ACK)),
            Outcome::Dropped(drop::POLICY_DENIED)
        );
        // A SYN opens; the SYN-ACK, data and the FINs pass as the connection.
        let j = run(&mut dp, Ingress, IF_B, &tcp(A, 1000, B, 80, TCP_SYN));
        assert_eq!(j.step, Step::NewConnection);
        let key = CtKey {
            scope: Direction::Ingress,
            protocol: TCP,
            saddr: A,
            sport: 1000,
            daddr: B,
            dport: 80,
        };
        assert_eq!(j.changes, vec![CtChange::Created(key)]);
        let j = run(
            &mut dp,
            Egress,
            IF_B,
            &tcp(B, 80, A, 1000, TCP_SYN | TCP_ACK),
        );
        assert_eq!(
            (j.outcome, j.step),
            (Outcome::Forwarded, Step::Established { reply: true })
        );
        assert_eq!(
            out(
                &mut dp,
                Ingress,
                IF_B,
                &tcp(A, 1000, B, 80, TCP_ACK | TCP_FIN)
            ),
            Outcome::Forwarded
        );
        assert_eq!(
            out(
                &mut dp,
                Egress,
                IF_B,
                &tcp(B, 80, A, 1000, TCP_ACK | TCP_FIN)
            ),
            Outcome::Forwarded
        );
        let e = dp.conntrack[&key];
        assert_eq!(
            e.flags,
            CT_FLAG_SEEN_REPLY | CT_FLAG_FIN_FORWARD | CT_FLAG_FIN_REPLY
        );
        assert_eq!(e.packets, 4);
        // RST: forwarded, and the entry is gone; the next reply is new (and denied).
        let j = run(&mut dp, Egress, IF_B, &tcp(B, 80, A, 1000, TCP_RST));
        assert_eq!(
            (j.outcome, j.changes),
            (Outcome::Forwarded, vec![CtChange::Removed(key)])
        );
        assert_eq!(
            out(&mut dp, Egress, IF_B, &tcp(B, 80, A, 1000, TCP_ACK)),
            Outcome::Dropped(drop::POLICY_DENIED)
        );
        // A SYN-ACK is no SYN: it opens nothing either.
        assert_eq!(
            out(
                &mut dp,
                Ingress,
                IF_B,
                &tcp(A, 1001, B, 80, TCP_SYN | TCP_ACK)
            ),
            Outcome::Forwarded
        );
        assert!(dp.conntrack.is_empty());
    }

    #[test]
    fn icmp_echo_replies_and_errors_about_tracked_connections() {
        let mut s = maps();
        enforce(&mut s, EP_A, Direction::Ingress);
        let mut dp = DatapathModel::new(1, s);
        assert_eq!(
            out(&mut dp, Egress, IF_A, &icmp_echo(A, WORLD, ICMP_ECHO, 9)),
            Outcome::Forwarded
        );
        assert_eq!(
            out(
                &mut dp,
                Ingress,
                IF_A,
                &icmp_echo(WORLD, A, ICMP_ECHO_REPLY, 9)
            ),
            Outcome::Forwarded
        );
        assert_eq!(
            out(
                &mut dp,
                Ingress,
                IF_A,
                &icmp_echo(WORLD, A, ICMP_ECHO_REPLY, 10)
            ),
            Outcome::Dropped(drop::POLICY_DENIED)
        );
        // A's UDP to the world is tracked; an ICMP error about it comes back in.
        let query = udp(A, 5353, WORLD, 53);
        assert_eq!(out(&mut dp, Egress, IF_A, &query), Outcome::Forwarded);
        let j = run(
            &mut dp,
            Ingress,
            IF_A,
            &icmp_error(WORLD, A, ICMP_DEST_UNREACH, &query),
        );
        assert_eq!((j.outcome, j.step), (Outcome::Forwarded, Step::Related));
        // About an untracked tuple: dropped, whatever policy would say.
        let other = udp(A, 5354, WORLD, 53);
        assert_eq!(
            out(
                &mut dp,
                Ingress,
                IF_A,
                &icmp_error(WORLD, A, ICMP_TIME_EXCEEDED, &other)
            ),
            Outcome::Dropped(drop::CT_TRUNCATED_OR_INVALID)
        );
        // The embedded header truncated: invalid.
        let short = icmp_error(WORLD, A, ICMP_DEST_UNREACH, &query[..query.len() - 5]);
        assert_eq!(
            out(&mut dp, Ingress, IF_A, &short),
            Outcome::Dropped(drop::INVALID_PACKET)
        );
    }

    #[test]
    fn icmp_errors_pass_only_back_to_the_source_of_a_tracked_packet() {
        const ROUTER: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
        let mut dp = DatapathModel::new(1, maps());
        // B's ingress lets the world in; B answers the packet with an ICMP error, from itself
        // back to the packet's source: related.
        let inbound = udp(WORLD, 53, B, 6000);
        assert_eq!(out(&mut dp, Ingress, IF_B, &inbound), Outcome::Forwarded);
        let j = run(
            &mut dp,
            Egress,
            IF_B,
            &icmp_error(B, WORLD, ICMP_DEST_UNREACH, &inbound),
        );
        assert_eq!((j.outcome, j.step), (Outcome::Forwarded, Step::Related));
        // Its own source spoofed: the source check holds for errors too.
        let j = run(
            &mut dp,
            Egress,
            IF_B,
            &icmp_error(A, ROUTER, ICMP_DEST_UNREACH, &inbound),
        );
        assert_eq!(
            (j.outcome, j.step),
            (Outcome::Dropped(drop::INVALID_SOURCE_IP), Step::SourceCheck)
        );
        // Sent anywhere but back to the packet's source.
        let j = run(
            &mut dp,
            Egress,
            IF_B,
            &icmp_error(B, ROUTER, ICMP_DEST_UNREACH, &inbound),
        );
        assert_eq!(
            (j.outcome, j.step),
            (Outcome::Dropped(drop::ICMP_ERROR_MISMATCH), Step::Related)
        );
        // About a packet that was addressed to A, not to B: not B's to report on.
        let to_a = udp(WORLD, 53, A, 7000);
        assert_eq!(out(&mut dp, Ingress, IF_A, &to_a), Outcome::Forwarded);
        assert_eq!(
            out(
                &mut dp,
                Egress,
                IF_B,
                &icmp_error(B, WORLD, ICMP_DEST_UNREACH, &to_a)
            ),
            Outcome::Dropped(drop::ICMP_ERROR_MISMATCH)
        );
        // An untracked tuple, and B's reply turned into an error about it (the error would
        // travel the connection's original direction): no connection to belong to.
        let untracked = udp(WORLD, 53, B, 6001);
        assert_eq!(
            out(
                &mut dp,
                Egress,
                IF_B,
                &icmp_error(B, WORLD, ICMP_DEST_UNREACH, &untracked)
            ),
            Outcome::Dropped(drop::CT_TRUNCATED_OR_INVALID)
        );
        let reply = udp(B, 6000, WORLD, 53);
        assert_eq!(
            out(
                &mut dp,
                Ingress,
                IF_B,
                &icmp_error(WORLD, B, ICMP_DEST_UNREACH, &reply)
            ),
            Outcome::Dropped(drop::CT_TRUNCATED_OR_INVALID)
        );
        // Received: A's query to the world; a router on the way reports on it, to A.
        let query = udp(A, 5353, WORLD, 53);
        assert_eq!(out(&mut dp, Egress, IF_A, &query), Outcome::Forwarded);
        let j = run(
            &mut dp,
            Ingress,
            IF_A,
            &icmp_error(ROUTER, A, ICMP_TIME_EXCEEDED, &query),
        );
        assert_eq!((j.outcome, j.step), (Outcome::Forwarded, Step::Related));
        // Addressed to A, but about B's packet (which B's egress tracks): not A's.
        let from_b = udp(B, 5353, WORLD, 53);
        assert_eq!(out(&mut dp, Egress, IF_B, &from_b), Outcome::Forwarded);
        assert_eq!(
            out(
                &mut dp,
                Ingress,
                IF_A,
                &icmp_error(ROUTER, A, ICMP_TIME_EXCEEDED, &from_b)
            ),
            Outcome::Dropped(drop::ICMP_ERROR_MISMATCH)
        );
        // About A's packet but addressed to B, at B's ingress and (misdirected) at A's.
        let to_b = icmp_error(ROUTER, B, ICMP_TIME_EXCEEDED, &query);
        assert_eq!(
            out(&mut dp, Ingress, IF_B, &to_b),
            Outcome::Dropped(drop::ICMP_ERROR_MISMATCH)
        );
        assert_eq!(
            out(&mut dp, Ingress, IF_A, &to_b),
            Outcome::Dropped(drop::INVALID_DESTINATION_IP)
        );
    }

    #[test]
    fn icmp_queries_pair_by_identifier_and_type_and_other_icmp_is_never_tracked() {
        const TIMESTAMP: u8 = 13;
        const TIMESTAMP_REPLY: u8 = 14;
        const REDIRECT: u8 = 5;
        let mut s = maps();
        // A receives nothing it did not ask for; B takes echo and timestamp requests from A.
        enforce(&mut s, EP_A, Direction::Ingress);
        enforce(&mut s, EP_B, Direction::Ingress);
        for (t, r) in [(ICMP_ECHO, 1), (TIMESTAMP, 2)] {
            rule(
                &mut s,
                (EP_B, Direction::Ingress, ID_A),
                Some(1),
                PortPrefix::exact(u16::from(t)),
                Action::Allow,
                r,
            );
        }
        let mut dp = DatapathModel::new(1, s.clone());
        let both = |dp: &mut DatapathModel, frame: &[u8], from_a: bool| {
            let (first, second) = if from_a { (IF_A, IF_B) } else { (IF_B, IF_A) };
            (
                out(dp, Egress, first, frame),
                out(dp, Ingress, second, frame),
            )
        };
        let fwd = (Outcome::Forwarded, Outcome::Forwarded);
        let denied = (Outcome::Forwarded, Outcome::Dropped(drop::POLICY_DENIED));
        // A's echo request and timestamp request, and their replies.
        assert_eq!(both(&mut dp, &icmp_echo(A, B, ICMP_ECHO, 9), true), fwd);
        assert_eq!(both(&mut dp, &icmp_echo(A, B, TIMESTAMP, 9), true), fwd);
        let key = |t: u8, scope| CtKey {
            scope,
            protocol: 1,
            saddr: A,
            sport: 9,
            daddr: B,
            dport: u16::from(t),
        };
        assert!(
            dp.conntrack
                .contains_key(&key(ICMP_ECHO, Direction::Egress))
        );
        assert!(
            dp.conntrack
                .contains_key(&key(TIMESTAMP, Direction::Ingress))
        );
        assert_eq!(dp.conntrack.len(), 4);
        assert_eq!(
            both(&mut dp, &icmp_echo(B, A, ICMP_ECHO_REPLY, 9), false),
            fwd
        );
        assert_eq!(
            both(&mut dp, &icmp_echo(B, A, TIMESTAMP_REPLY, 9), false),
            fwd
        );
        // A reply from A is no request (B asked nothing), nor B's own echo request with the
        // same identifier a reply: each side's ingress judges them.
        assert_eq!(
            both(&mut dp, &icmp_echo(A, B, ICMP_ECHO_REPLY, 9), true),
            denied
        );
        assert_eq!(both(&mut dp, &icmp_echo(B, A, ICMP_ECHO, 9), false), denied);
        // Nor is another ICMP type part of a query's connection.
        assert_eq!(both(&mut dp, &icmp_echo(B, A, REDIRECT, 0), false), denied);
        assert_eq!(both(&mut dp, &icmp_echo(A, B, 42, 9), true), denied);
        // What opens nothing tracks nothing: B's request (its egress is open) and what passed
        // A's open egress as replies and other types.
        assert_eq!(dp.conntrack.len(), 5);
        // A policy change keeps each query by its own type: echo stays allowed, timestamp
        // no longer is.
        s.policy.retain(|_, e| e.rule != RuleId(2));
        dp.maps = s;
        dp.config = Some(Config {
            policy_revision: 2,
            fast_path: false,
        });
        let j = run(&mut dp, Ingress, IF_B, &icmp_echo(A, B, TIMESTAMP, 9));
        assert_eq!(
            (j.outcome, j.step),
            (Outcome::Dropped(drop::POLICY_DENIED), Step::Revalidation)
        );
        assert_eq!(
            out(&mut dp, Ingress, IF_B, &icmp_echo(A, B, ICMP_ECHO, 9)),
            Outcome::Forwarded
        );
    }

    #[test]
    fn audit_mode_forwards_and_tracks_what_policy_denies() {
        let mut s = maps();
        enforce(&mut s, EP_B, Direction::Ingress);
        s.endpoints.get_mut(&EP_B).unwrap().audit = true;
        let mut dp = DatapathModel::new(1, s);
        let j = run(&mut dp, Ingress, IF_B, &tcp(A, 1, B, 80, TCP_SYN));
        assert_eq!(j.outcome, Outcome::Audit);
        assert_eq!(
            out(&mut dp, Egress, IF_B, &tcp(B, 80, A, 1, TCP_SYN | TCP_ACK)),
            Outcome::Audit
        );
        let e = dp.conntrack.values().next().unwrap();
        assert_eq!(e.flags & CT_FLAG_AUDIT, CT_FLAG_AUDIT);
    }

    #[test]
    fn redirects_need_an_egress_syn_and_the_proxy() {
        let mut s = maps();
        rule(
            &mut s,
            (EP_A, Direction::Egress, Identity::ANY),
            Some(TCP),
            PortPrefix::exact(80),
            Action::Redirect { proxy_port: PROXY },
            1,
        );
        let mut dp = DatapathModel::new(1, s);
        let syn = tcp(A, 1, WORLD, 80, TCP_SYN);
        let j = run(&mut dp, Egress, IF_A, &syn);
        assert_eq!((j.outcome, j.mark), (Outcome::Redirected, mark::TO_PROXY));
        let e = *dp.conntrack.values().next().unwrap();
        assert_eq!((e.flags, e.proxy_port), (CT_FLAG_PROXY_REDIRECT, PROXY));
        // Later packets of the connection go to the proxy too; replies come back plainly.
        assert_eq!(
            out(&mut dp, Egress, IF_A, &tcp(A, 1, WORLD, 80, TCP_ACK)),
            Outcome::Redirected
        );
        assert_eq!(
            out(&mut dp, Ingress, IF_A, &tcp(WORLD, 80, A, 1, TCP_ACK)),
            Outcome::Forwarded
        );
        // Without the proxy: nothing is tracked.
        let j = run_with(
            &mut dp,
            Egress,
            IF_A,
            0,
            false,
            &tcp(A, 2, WORLD, 80, TCP_SYN),
        );
        assert_eq!(j.outcome, Outcome::Dropped(drop::PROXY_UNAVAILABLE));
        assert_eq!(dp.conntrack.len(), 1);
        // Not a SYN: cannot be handed over.
        assert_eq!(
            out(&mut dp, Egress, IF_A, &tcp(A, 3, WORLD, 80, TCP_ACK)),
            Outcome::Dropped(drop::PROXY_UNAVAILABLE)
        );
        // An established redirected connection when the proxy is gone: accounted, dropped.
        let j = run_with(
            &mut dp,
            Egress,
            IF_A,
            0,
            false,
            &tcp(A, 1, WORLD, 80, TCP_ACK),
        );
        assert_eq!(j.outcome, Outcome::Dropped(drop::PROXY_UNAVAILABLE));
        assert_eq!(dp.conntrack.values().next().unwrap().packets, 4);
    }

    #[test]
    fn dns_over_udp_on_the_clients_egress_goes_to_the_proxy_and_its_answer_back() {
        let mut s = maps();
        rule(
            &mut s,
            (EP_A, Direction::Egress, Identity::ANY),
            Some(UDP),
            PortPrefix::exact(53),
            Action::Redirect { proxy_port: PROXY },
            1,
        );
        let mut dp = DatapathModel::new(1, s);
        let query = udp(A, 5000, WORLD, 53);
        let j = run(&mut dp, Egress, IF_A, &query);
        assert_eq!((j.outcome, j.mark), (Outcome::Redirected, mark::TO_PROXY));
        let e = *dp.conntrack.values().next().unwrap();
        assert_eq!((e.flags, e.proxy_port), (CT_FLAG_PROXY_REDIRECT, PROXY));
        // The next query of the flow too; the answer (sent as the server) comes back plainly.
        assert_eq!(out(&mut dp, Egress, IF_A, &query), Outcome::Redirected);
        assert_eq!(
            out(&mut dp, Ingress, IF_A, &udp(WORLD, 53, A, 5000)),
            Outcome::Forwarded
        );
        // Without the proxy's socket: dropped, failing closed.
        let j = run_with(&mut dp, Egress, IF_A, 0, false, &udp(A, 5001, WORLD, 53));
        assert_eq!(j.outcome, Outcome::Dropped(drop::PROXY_UNAVAILABLE));
    }

    #[test]
    fn the_destination_ingress_http_rules_redirect_at_the_client_egress() {
        let mut s = maps();
        rule(
            &mut s,
            (EP_B, Direction::Ingress, ID_A),
            Some(TCP),
            PortPrefix::exact(80),
            Action::Redirect { proxy_port: PROXY },
            1,
        );
        rule(
            &mut s,
            (EP_B, Direction::Ingress, Identity::ANY),
            None,
            PortPrefix::ANY,
            Action::Allow,
            2,
        );
        let mut dp = DatapathModel::new(1, s);
        assert_eq!(
            out(&mut dp, Egress, IF_A, &tcp(A, 1, B, 80, TCP_SYN)),
            Outcome::Redirected
        );
        // UDP is not redirected by the other side's rules; the server's own ingress would
        // drop a direct TCP connection (it cannot redirect there).
        assert_eq!(
            out(&mut dp, Egress, IF_A, &udp(A, 1, B, 80)),
            Outcome::Forwarded
        );
        assert_eq!(
            out(&mut dp, Ingress, IF_B, &tcp(A, 2, B, 80, TCP_SYN)),
            Outcome::Dropped(drop::PROXY_UNAVAILABLE)
        );
        // The proxy's upstream leg, marked with A's identity, is judged as A: allowed.
        let j = run_proxied(&mut dp, IF_B, ID_A, A, &tcp(NODE, 3, B, 80, TCP_SYN));
        assert_eq!(j.outcome, Outcome::Forwarded);
        let e = dp
            .conntrack
            .values()
            .find(|e| e.flags & CT_FLAG_FROM_PROXY != 0)
            .unwrap();
        assert_eq!((e.peer_identity, e.proxy_client), (ID_A, A));
    }

    #[test]
    fn the_proxys_upstream_leg_is_judged_by_the_clients_address_cidr_rules_included() {
        // A is inside a CIDR that B's ingress denies; C (another address, A's identity) is
        // inside one it allows, and nothing else lets A's identity in.
        const C: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 3);
        let deny_alias = Identity(palisade_common::identity::CIDR_ENDPOINT_SCOPE | 1);
        let allow_alias = Identity(palisade_common::identity::CIDR_ENDPOINT_SCOPE | 2);
        let mut s = maps();
        enforce(&mut s, EP_B, Direction::Ingress);
        s.ipcache
            .get_mut(&"10.200.0.1/32".parse().unwrap())
            .unwrap()
            .cidr_identity = Some(deny_alias);
        s.ipcache.insert(
            "10.200.0.3/32".parse().unwrap(),
            IpcacheEntry {
                identity: ID_A,
                endpoint: None,
                cidr_identity: Some(allow_alias),
            },
        );
        for (peer, action, r) in [
            (Identity::ANY, Action::Redirect { proxy_port: PROXY }, 1),
            (deny_alias, Action::Deny, 2),
            (allow_alias, Action::Allow, 3),
        ] {
            rule(
                &mut s,
                (EP_B, Direction::Ingress, peer),
                Some(TCP),
                PortPrefix::exact(80),
                action,
                r,
            );
        }
        let mut dp = DatapathModel::new(1, s.clone());
        // As a direct connection would be: A denied by its CIDR, C allowed by its own.
        let syn = |port| tcp(NODE, port, B, 80, TCP_SYN);
        let j = run_proxied(&mut dp, IF_B, ID_A, A, &syn(1));
        assert_eq!(j.outcome, Outcome::Dropped(drop::POLICY_DENY_RULE));
        let j = run_proxied(&mut dp, IF_B, ID_A, C, &syn(2));
        assert_eq!(j.outcome, Outcome::Forwarded);
        let key = CtKey {
            scope: Direction::Ingress,
            protocol: TCP,
            saddr: NODE,
            sport: 2,
            daddr: B,
            dport: 80,
        };
        // Its verdict is the redirect's (the proxy's HTTP rules), which the proxy enforced.
        assert_eq!(dp.conntrack[&key].proxy_client, C);
        assert_eq!(dp.conntrack[&key].rule, RuleId(1));
        // A mark whose identity is not the address's, or no address at all: refused.
        for (identity, client) in [(ID_B, C), (ID_A, Ipv4Addr::UNSPECIFIED)] {
            let j = run_proxied(&mut dp, IF_B, identity, client, &syn(3));
            assert_eq!(j.outcome, Outcome::Dropped(drop::PROXY_CLIENT_MISMATCH));
        }
        // After a change that moves C's address into the denied CIDR, the open upstream leg
        // is re-judged by C's address as it is now.
        s.ipcache
            .get_mut(&"10.200.0.3/32".parse().unwrap())
            .unwrap()
            .cidr_identity = Some(deny_alias);
        dp.maps = s;
        dp.config = Some(Config {
            policy_revision: 2,
            fast_path: false,
        });
        let j = run(&mut dp, Ingress, IF_B, &tcp(NODE, 2, B, 80, TCP_ACK));
        assert_eq!(
            (j.outcome, j.step),
            (Outcome::Dropped(drop::POLICY_DENY_RULE), Step::Revalidation)
        );
    }

    #[test]
    fn revalidation_after_a_policy_change() {
        let mut s = maps();
        enforce(&mut s, EP_B, Direction::Ingress);
        rule(
            &mut s,
            (EP_B, Direction::Ingress, ID_A),
            Some(TCP),
            PortPrefix::ANY,
            Action::Allow,
            1,
        );
        let mut dp = DatapathModel::new(1, s.clone());
        for port in [80, 81, 82] {
            assert_eq!(
                out(&mut dp, Ingress, IF_B, &tcp(A, port, B, port, TCP_SYN)),
                Outcome::Forwarded
            );
        }
        assert_eq!(
            out(&mut dp, Egress, IF_A, &tcp(A, 90, B, 80, TCP_SYN)),
            Outcome::Forwarded
        );
        // The new policy: port 81 denied, port 80 through the proxy.
        rule(
            &mut s,
            (EP_B, Direction::Ingress, ID_A),
            Some(TCP),
            PortPrefix::exact(81),
            Action::Deny,
            2,
        );
        rule(
            &mut s,
            (EP_B, Direction::Ingress, ID_A),
            Some(TCP),
            PortPrefix::exact(80),
            Action::Redirect { proxy_port: PROXY },
            3,
        );
        dp.maps = s;
        dp.config = Some(Config {
            policy_revision: 2,
            fast_path: false,
        });
        let j = run(&mut dp, Ingress, IF_B, &tcp(A, 81, B, 81, TCP_ACK));
        assert_eq!(
            (j.outcome, j.step),
            (Outcome::Dropped(drop::POLICY_DENY_RULE), Step::Revalidation)
        );
        let j = run(&mut dp, Egress, IF_B, &tcp(B, 80, A, 80, TCP_ACK));
        assert_eq!(j.outcome, Outcome::Dropped(drop::PROXY_REQUIRED));
        // The client's egress entry sees the destination's new HTTP rules too.
        assert_eq!(
            out(&mut dp, Egress, IF_A, &tcp(A, 90, B, 80, TCP_ACK)),
            Outcome::Dropped(drop::PROXY_REQUIRED)
        );
        let j = run(&mut dp, Ingress, IF_B, &tcp(A, 82, B, 82, TCP_ACK));
        assert_eq!(j.outcome, Outcome::Forwarded);
        assert!(
            j.changes
                .contains(&CtChange::Revalidated(j.changes[0].key()))
        );
        assert_eq!(dp.conntrack.len(), 1);
        assert_eq!(dp.conntrack.values().next().unwrap().policy_revision, 2);
    }

    #[test]
    fn revalidation_in_audit_mode_audits_what_is_now_denied_and_stops_auditing_what_is_allowed() {
        let mut s = maps();
        enforce(&mut s, EP_B, Direction::Ingress);
        s.endpoints.get_mut(&EP_B).unwrap().audit = true;
        let allow = |s: &mut MapState, port: u16, r: u32| {
            rule(
                s,
                (EP_B, Direction::Ingress, ID_A),
                Some(TCP),
                PortPrefix::exact(port),
                Action::Allow,
                r,
            );
        };
        let mut first = s.clone();
        allow(&mut first, 80, 1);
        let mut dp = DatapathModel::new(1, first);
        // Port 80 allowed, port 81 audited.
        assert_eq!(
            out(&mut dp, Ingress, IF_B, &tcp(A, 1, B, 80, TCP_SYN)),
            Outcome::Forwarded
        );
        assert_eq!(
            out(&mut dp, Ingress, IF_B, &tcp(A, 2, B, 81, TCP_SYN)),
            Outcome::Audit
        );
        let key = |sport, dport| CtKey {
            scope: Direction::Ingress,
            protocol: TCP,
            saddr: A,
            sport,
            daddr: B,
            dport,
        };
        // The change: 81 allowed, 80 no longer.
        let mut second = s;
        allow(&mut second, 81, 2);
        dp.maps = second;
        dp.config = Some(Config {
            policy_revision: 2,
            fast_path: false,
        });
        let j = run(&mut dp, Egress, IF_B, &tcp(B, 80, A, 1, TCP_SYN | TCP_ACK));
        assert_eq!(
            (j.outcome, j.changes[0]),
            (Outcome::Audit, CtChange::Revalidated(key(1, 80)))
        );
        assert_eq!(
            dp.conntrack[&key(1, 80)].flags & CT_FLAG_AUDIT,
            CT_FLAG_AUDIT
        );
        assert_eq!(
            out(&mut dp, Ingress, IF_B, &tcp(A, 1, B, 80, TCP_ACK)),
            Outcome::Audit
        );
        let j = run(&mut dp, Ingress, IF_B, &tcp(A, 2, B, 81, TCP_ACK));
        assert_eq!(j.outcome, Outcome::Forwarded);
        assert_eq!(dp.conntrack[&key(2, 81)].flags & CT_FLAG_AUDIT, 0);
        assert_eq!(dp.conntrack[&key(2, 81)].rule, RuleId(2));
    }

    #[test]
    fn a_flow_other_than_tcp_that_policy_now_sends_to_the_proxy_stops() {
        let mut s = maps();
        let mut dp = DatapathModel::new(1, s.clone());
        let query = udp(A, 5000, B, 53);
        assert_eq!(out(&mut dp, Egress, IF_A, &query), Outcome::Forwarded);
        assert_eq!(out(&mut dp, Ingress, IF_B, &query), Outcome::Forwarded);
        // HTTP rules on any protocol of port 53 at B's ingress: a redirect (also of UDP) the
        // proxy cannot take for UDP.
        rule(
            &mut s,
            (EP_B, Direction::Ingress, Identity::ANY),
            Some(UDP),
            PortPrefix::exact(53),
            Action::Redirect { proxy_port: PROXY },
            1,
        );
        dp.maps = s;
        dp.config = Some(Config {
            policy_revision: 2,
            fast_path: false,
        });
        // The client's side is not redirected (only TCP is, by the destination's rules).
        assert_eq!(out(&mut dp, Egress, IF_A, &query), Outcome::Forwarded);
        let j = run(&mut dp, Ingress, IF_B, &query);
        assert_eq!(
            (j.outcome, j.step),
            (
                Outcome::Dropped(drop::PROXY_UNSUPPORTED_PROTOCOL),
                Step::Revalidation
            )
        );
        assert_eq!(dp.conntrack.len(), 1);
        // And it stays stopped: a new flow gets the same verdict.
        let j = run(&mut dp, Ingress, IF_B, &query);
        assert_eq!(
            (j.outcome, j.step),
            (
                Outcome::Dropped(drop::PROXY_UNSUPPORTED_PROTOCOL),
                Step::NewConnection
            )
        );
    }

    impl CtChange {
        fn key(self) -> CtKey {
            match self {
                CtChange::Created(k)
                | CtChange::Updated(k)
                | CtChange::Revalidated(k)
                | CtChange::Removed(k) => k,
            }
        }
    }

    /// Maps where A and B have MACs (the fast path fits them), B enforcing ingress with
    /// TCP 80 from A allowed; the fast path on.
    fn fast_path_model() -> DatapathModel {
        let mut s = maps();
        for (id, n) in [(EP_A, 1u8), (EP_B, 2)] {
            let link = &mut s.endpoints.get_mut(&id).unwrap().link;
            link.mac = [2, 0, 0, 0, 0, n];
            link.host_mac = [2, 0, 0, 0, 1, n];
        }
        enforce(&mut s, EP_B, Direction::Ingress);
        rule(
            &mut s,
            (EP_B, Direction::Ingress, ID_A),
            Some(TCP),
            PortPrefix::exact(80),
            Action::Allow,
            1,
        );
        let mut dp = DatapathModel::new(1, s);
        dp.config = Some(Config {
            policy_revision: 1,
            fast_path: true,
        });
        dp
    }

    #[test]
    fn the_fast_path_judges_the_destinations_ingress_in_the_senders_program() {
        let mut dp = fast_path_model();
        let allowed = run(&mut dp, Egress, IF_A, &tcp(A, 40000, B, 80, TCP_SYN));
        assert_eq!(allowed.outcome, Outcome::Forwarded);
        assert_eq!(
            allowed.fast_path,
            Some(FastPath {
                ifindex: IF_B,
                outcome: Outcome::Forwarded,
                step: Step::NewConnection
            })
        );
        assert_eq!(allowed.tc_action(), TC_ACT_REDIRECT);
        // Both ends track the connection, as on the node's path.
        assert_eq!(allowed.changes.len(), 2);
        let denied = run(&mut dp, Egress, IF_A, &tcp(A, 40001, B, 81, TCP_SYN));
        assert_eq!(denied.outcome, Outcome::Forwarded);
        assert_eq!(
            denied.fast_path.map(|f| f.outcome),
            Some(Outcome::Dropped(drop::POLICY_DENIED))
        );
        assert_eq!(denied.tc_action(), TC_ACT_SHOT);
        // The reply comes back the same way, as the reply of both entries.
        let reply = run(
            &mut dp,
            Egress,
            IF_B,
            &tcp(B, 80, A, 40000, TCP_SYN | TCP_ACK),
        );
        assert_eq!(
            reply.fast_path.map(|f| (f.ifindex, f.step)),
            Some((IF_A, Step::Established { reply: true }))
        );
        assert_eq!(reply.tc_action(), TC_ACT_REDIRECT);
    }

    #[test]
    fn what_does_not_fit_the_fast_path_takes_the_nodes() {
        let syn = tcp(A, 40000, B, 80, TCP_SYN);
        // Switched off.
        let mut dp = fast_path_model();
        dp.config = Some(Config {
            policy_revision: 1,
            fast_path: false,
        });
        let j = run(&mut dp, Egress, IF_A, &syn);
        assert_eq!((j.fast_path, j.tc_action()), (None, TC_ACT_OK));
        // A TTL routing would expire.
        let mut dp = fast_path_model();
        let mut last_hop = syn.clone();
        last_hop[ETH_HLEN + 8] = 1;
        assert_eq!(run(&mut dp, Egress, IF_A, &last_hop).fast_path, None);
        // A destination without MACs, or a bridge port.
        let mut dp = fast_path_model();
        dp.maps.endpoints.get_mut(&EP_B).unwrap().link.mac = [0; 6];
        assert_eq!(run(&mut dp, Egress, IF_A, &syn).fast_path, None);
        let mut dp = fast_path_model();
        dp.maps.endpoints.get_mut(&EP_A).unwrap().link.bridge = Some(crate::endpoint::BridgeLink {
            ifindex: 3,
            mac: [2, 0, 0, 0, 2, 1],
        });
        assert_eq!(run(&mut dp, Egress, IF_A, &syn).fast_path, None);
        // Not an endpoint's address; an ARP frame; a drop at the sender.
        let mut dp = fast_path_model();
        assert_eq!(
            run(&mut dp, Egress, IF_A, &tcp(A, 40000, WORLD, 80, TCP_SYN)).fast_path,
            None
        );
        let mut arp = syn.clone();
        arp[12..14].copy_from_slice(&ETH_P_ARP.to_be_bytes());
        assert_eq!(run(&mut dp, Egress, IF_A, &arp).fast_path, None);
        let spoofed = tcp(WORLD, 40000, B, 80, TCP_SYN);
        assert_eq!(run(&mut dp, Egress, IF_A, &spoofed).fast_path, None);
        // The destination's own program never hands on.
        assert_eq!(run(&mut dp, Ingress, IF_B, &syn).fast_path, None);
    }

    #[test]
    fn a_proxy_mark_means_nothing_on_the_fast_path() {
        // B takes port 80 from its own identity only. A frame claiming, by mark and
        // priority, to be the proxy's leg for B would pass on the node's path; straight from
        // another endpoint its mark is the sender's, so it is judged as A's.
        let mut dp = fast_path_model();
        dp.maps.policy.clear();
        rule(
            &mut dp.maps,
            (EP_B, Direction::Ingress, ID_B),
            Some(TCP),
            PortPrefix::exact(80),
            Action::Allow,
            2,
        );
        let syn = tcp(A, 40000, B, 80, TCP_SYN);
        let claimed = Input {
            program: Egress,
            ifindex: IF_A,
            mark: mark::from_proxy(ID_B.0),
            priority: mark::client_priority(B.octets()),
            proxy_listener: true,
            frame: &syn,
        };
        assert_eq!(
            dp.judge(&claimed).fast_path.map(|f| f.outcome),
            Some(Outcome::Dropped(drop::POLICY_DENIED))
        );
        // The same claim from the node's stack, at B's own program, is the proxy's.
        let mut dp2 = fast_path_model();
        dp2.maps = dp.maps.clone();
        let from_node = Input {
            program: Ingress,
            ifindex: IF_B,
            ..claimed
        };
        assert_eq!(dp2.judge(&from_node).outcome, Outcome::Forwarded);
    }

    /// The one's complement sum of `frame`'s 20-byte IPv4 header, computed in full.
    fn header_sum(frame: &[u8]) -> u16 {
        let mut sum: u32 = frame[ETH_HLEN..ETH_HLEN + 20]
            .chunks(2)
            .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
            .sum();
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        u16::try_from(sum).unwrap()
    }

    fn header_checksum_ok(frame: &[u8]) -> bool {
        header_sum(frame) == 0xffff
    }

    #[test]
    fn the_delivered_frame_is_readdressed_with_its_ttl_and_checksum_updated() {
        let dp = fast_path_model();
        let mut syn = tcp(A, 40000, B, 80, TCP_SYN);
        // A valid header checksum to start from (the field is zero).
        let sum = !header_sum(&syn);
        syn[ETH_HLEN + 10..ETH_HLEN + 12].copy_from_slice(&sum.to_be_bytes());
        assert!(header_checksum_ok(&syn));
        let out = dp.delivered_frame(&syn, IF_B).unwrap();
        assert_eq!(out[..6], [2, 0, 0, 0, 0, 2]);
        assert_eq!(out[6..12], [2, 0, 0, 0, 1, 2]);
        assert_eq!(out[ETH_HLEN + 8], syn[ETH_HLEN + 8] - 1);
        assert!(header_checksum_ok(&out));
        assert_eq!(out[ETH_HLEN + 12..], syn[ETH_HLEN + 12..]);
        assert_eq!(dp.delivered_frame(&syn, 99), None);
    }
}
