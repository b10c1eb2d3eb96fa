//! Header parsing. Everything is read with `bpf_skb_load_bytes` (`TcContext::load`), within
//! the IPv4 packet as its total length says (which must fit in the frame); a short packet is an
//! `INVALID_PACKET` drop, a total length that does not fit `INVALID_IP_LENGTH`, never a guess.

use aya_ebpf::programs::TcContext;
use palisade_common::{proto, reason::drop};

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
pub const TCP_ACK: u8 = 0x10;

/// An ICMP query's counterpart type: a request's reply, a reply's request; any other type is
/// its own. As in Linux conntrack, only these four queries (echo, timestamp, information,
/// address mask) pair up into connections; conntrack turns an ICMP key around with it (see
/// `conntrack::reverse_in_place`).
#[inline(always)]
pub fn icmp_counterpart(icmp_type: u8) -> u8 {
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

#[inline(always)]
fn icmp_is_request(icmp_type: u8) -> bool {
    matches!(
        icmp_type,
        ICMP_ECHO | ICMP_TIMESTAMP | ICMP_INFO_REQUEST | ICMP_ADDRESS
    )
}

/// The connection tuple of a packet, in network byte order, plus what policy needs.
///
/// ICMP queries are keyed by their identifier (`sport_be`) and type (`dport_be`); their
/// replies carry the reply type, which conntrack turns back into the request's when it looks
/// for the connection, so a request never passes as a reply, nor a reply as a request.
#[derive(Clone, Copy)]
pub struct Packet {
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    pub sport_be: u16,
    pub dport_be: u16,
    pub protocol: u8,
    pub tcp_flags: u8,
    /// The "port" policy matches: the destination port, or the ICMP type.
    pub policy_port_be: u16,
    /// May open a connection: a TCP SYN, an ICMP query request, any packet of the other
    /// protocols. The rest pass only as part of a tracked connection, or (judged by policy)
    /// alone, tracking nothing.
    pub opens: bool,
    /// An ICMP error: the tuple above is the embedded (original) packet's, and the packet
    /// passes only as part of the connection it reports on.
    pub related: bool,
    /// The addresses of the IP header: the tuple's, or an ICMP error's own.
    pub outer_saddr: [u8; 16],
    pub outer_daddr: [u8; 16],
}

pub enum Parsed {
    /// ARP: needed for neighbour resolution between the endpoint and the node; not policy.
    Arp,
    Ipv4(Packet),
}

/// A `T` at `offset`, which must lie within the first `end` bytes of the frame: the end of the
/// IPv4 packet by its total length once that is known (bytes past it, such as Ethernet
/// padding, are not the packet's), the frame's length before.
#[inline(always)]
fn load<T>(ctx: &TcContext, offset: usize, end: usize) -> Result<T, u8> {
    if offset + size_of::<T>() > end {
        return Err(drop::INVALID_PACKET);
    }
    ctx.load::<T>(offset).map_err(|_| drop::INVALID_PACKET)
}

#[inline(always)]
fn frame_len(ctx: &TcContext) -> usize {
    usize::try_from(ctx.len()).unwrap_or(0)
}

#[inline(always)]
fn ipv4_addr(raw: [u8; 4]) -> [u8; 16] {
    let mut addr = [0u8; 16];
    addr[0] = raw[0];
    addr[1] = raw[1];
    addr[2] = raw[2];
    addr[3] = raw[3];
    addr
}

/// Inlined: a subprogram would return the packet through a pointer into the caller's stack,
/// and its own frame would sit on top of the judging path's.
#[inline(always)]
pub fn parse(ctx: &TcContext) -> Result<Parsed, u8> {
    let ethertype = u16::from_be(load::<u16>(ctx, 12, frame_len(ctx))?);
    match ethertype {
        ETH_P_IP => parse_ipv4(ctx, ETH_HLEN).map(Parsed::Ipv4),
        ETH_P_ARP => Ok(Parsed::Arp),
        // IPv6 and everything else: not supported yet, so not let through unjudged.
        _ => Err(drop::UNSUPPORTED_L3),
    }
}

/// The fields of an IPv4 header the datapath uses.
struct Ipv4Header {
    protocol: u8,
    saddr: [u8; 4],
    daddr: [u8; 4],
    /// Offset of the L4 header.
    l4: usize,
    /// Flags and fragment offset, host order.
    frag: u16,
    /// Total length, host order.
    total_len: u16,
}

/// IPv4 header at `off`, within the first `end` bytes.
#[inline(always)]
fn ipv4_header(ctx: &TcContext, off: usize, end: usize) -> Result<Ipv4Header, u8> {
    let version_ihl = load::<u8>(ctx, off, end)?;
    if version_ihl >> 4 != 4 {
        return Err(drop::INVALID_PACKET);
    }
    let ihl = ((version_ihl & 0x0f) as usize) * 4;
    if ihl < 20 {
        return Err(drop::INVALID_PACKET);
    }
    let total_len = u16::from_be(load::<u16>(ctx, off + 2, end)?);
    let frag = u16::from_be(load::<u16>(ctx, off + 6, end)?);
    let protocol = load::<u8>(ctx, off + 9, end)?;
    let saddr = load::<[u8; 4]>(ctx, off + 12, end)?;
    let daddr = load::<[u8; 4]>(ctx, off + 16, end)?;
    Ok(Ipv4Header {
        protocol,
        saddr,
        daddr,
        l4: off + ihl,
        frag,
        total_len,
    })
}

#[inline(always)]
fn parse_ipv4(ctx: &TcContext, off: usize) -> Result<Packet, u8> {
    let Ipv4Header {
        protocol,
        saddr,
        daddr,
        l4,
        frag,
        total_len,
    } = ipv4_header(ctx, off, frame_len(ctx))?;
    // The total length must cover the header and fit in the frame (which may be longer:
    // Ethernet pads short frames); from here on nothing past it is read.
    let end = off + usize::from(total_len);
    if end < l4 || end > frame_len(ctx) {
        return Err(drop::INVALID_IP_LENGTH);
    }
    // Fragments carry no (or partial) L4 headers; judging them by port is impossible without
    // reassembly state, so they are dropped and counted rather than guessed at.
    if frag & (IP_MF | IP_OFFSET_MASK) != 0 {
        return Err(drop::FRAGMENTED);
    }
    let mut pkt = Packet {
        saddr: ipv4_addr(saddr),
        daddr: ipv4_addr(daddr),
        sport_be: 0,
        dport_be: 0,
        protocol,
        tcp_flags: 0,
        policy_port_be: 0,
        opens: true,
        related: false,
        outer_saddr: ipv4_addr(saddr),
        outer_daddr: ipv4_addr(daddr),
    };
    match protocol {
        proto::TCP => {
            pkt.sport_be = load::<u16>(ctx, l4, end)?;
            pkt.dport_be = load::<u16>(ctx, l4 + 2, end)?;
            pkt.tcp_flags = load::<u8>(ctx, l4 + 13, end)?;
            pkt.policy_port_be = pkt.dport_be;
            pkt.opens = pkt.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
        }
        proto::UDP | proto::SCTP => {
            pkt.sport_be = load::<u16>(ctx, l4, end)?;
            pkt.dport_be = load::<u16>(ctx, l4 + 2, end)?;
            pkt.policy_port_be = pkt.dport_be;
        }
        proto::ICMP => {
            let icmp_type = load::<u8>(ctx, l4, end)?;
            if matches!(
                icmp_type,
                ICMP_DEST_UNREACH | ICMP_TIME_EXCEEDED | ICMP_PARAMETER_PROBLEM
            ) {
                return parse_icmp_error(ctx, l4 + 8, end, &pkt);
            }
            pkt.dport_be = u16::from(icmp_type).to_be();
            pkt.policy_port_be = pkt.dport_be;
            if icmp_counterpart(icmp_type) != icmp_type {
                // A query: its identifier.
                pkt.sport_be = load::<u16>(ctx, l4 + 4, end)?;
            }
            // Only a request opens; a reply is one only as its request's connection, and
            // a message that is no query at all (a redirect, a router advertisement...) is
            // judged by policy each time.
            pkt.opens = icmp_is_request(icmp_type);
        }
        _ => {}
    }
    Ok(pkt)
}

/// An ICMP error embeds the IP header and first 8 bytes of the packet it reports on; its tuple
/// is what conntrack must already know. The embedded header's total length is the original
/// packet's, of which only the start is quoted, so it is not checked; `end` is the error's.
/// `outer` is the error's own packet so far (its addresses).
#[inline(always)]
fn parse_icmp_error(
    ctx: &TcContext,
    inner: usize,
    end: usize,
    outer: &Packet,
) -> Result<Packet, u8> {
    let Ipv4Header {
        protocol,
        saddr,
        daddr,
        l4,
        ..
    } = ipv4_header(ctx, inner, end)?;
    let mut pkt = Packet {
        saddr: ipv4_addr(saddr),
        daddr: ipv4_addr(daddr),
        sport_be: 0,
        dport_be: 0,
        protocol,
        tcp_flags: 0,
        policy_port_be: 0,
        opens: false,
        related: true,
        outer_saddr: outer.outer_saddr,
        outer_daddr: outer.outer_daddr,
    };
    match protocol {
        proto::TCP | proto::UDP | proto::SCTP => {
            pkt.sport_be = load::<u16>(ctx, l4, end)?;
            pkt.dport_be = load::<u16>(ctx, l4 + 2, end)?;
        }
        proto::ICMP => {
            // The key of an embedded query, as it was tracked.
            let icmp_type = load::<u8>(ctx, l4, end)?;
            pkt.dport_be = u16::from(icmp_type).to_be();
            if icmp_counterpart(icmp_type) != icmp_type {
                pkt.sport_be = load::<u16>(ctx, l4 + 4, end)?;
            }
        }
        _ => {}
    }
    Ok(pkt)
}
