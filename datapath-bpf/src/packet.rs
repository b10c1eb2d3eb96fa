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

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// The connection tuple of a packet, in network byte order, plus what policy needs.
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
    /// An ICMP error: the tuple above is the embedded (original) packet's, and the packet
    /// passes only as part of the connection it reports on.
    pub related: bool,
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
        related: false,
    };
    match protocol {
        proto::TCP => {
            pkt.sport_be = load::<u16>(ctx, l4, end)?;
            pkt.dport_be = load::<u16>(ctx, l4 + 2, end)?;
            pkt.tcp_flags = load::<u8>(ctx, l4 + 13, end)?;
            pkt.policy_port_be = pkt.dport_be;
        }
        proto::UDP | proto::SCTP => {
            pkt.sport_be = load::<u16>(ctx, l4, end)?;
            pkt.dport_be = load::<u16>(ctx, l4 + 2, end)?;
            pkt.policy_port_be = pkt.dport_be;
        }
        proto::ICMP => {
            let icmp_type = load::<u8>(ctx, l4, end)?;
            match icmp_type {
                ICMP_ECHO | ICMP_ECHO_REPLY => {
                    // Echo id in both port slots: the reply's reversed tuple equals the request's.
                    let id = load::<u16>(ctx, l4 + 4, end)?;
                    pkt.sport_be = id;
                    pkt.dport_be = id;
                    // Policy sees the request type for both, so an allowed echo's reply matches.
                    pkt.policy_port_be = u16::from(ICMP_ECHO).to_be();
                }
                ICMP_DEST_UNREACH | ICMP_TIME_EXCEEDED | ICMP_PARAMETER_PROBLEM => {
                    return parse_icmp_error(ctx, l4 + 8, end);
                }
                other => {
                    pkt.policy_port_be = u16::from(other).to_be();
                }
            }
        }
        _ => {}
    }
    Ok(pkt)
}

/// An ICMP error embeds the IP header and first 8 bytes of the packet it reports on; its tuple
/// is what conntrack must already know. The embedded header's total length is the original
/// packet's, of which only the start is quoted, so it is not checked; `end` is the error's.
#[inline(always)]
fn parse_icmp_error(ctx: &TcContext, inner: usize, end: usize) -> Result<Packet, u8> {
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
        related: true,
    };
    match protocol {
        proto::TCP | proto::UDP | proto::SCTP => {
            pkt.sport_be = load::<u16>(ctx, l4, end)?;
            pkt.dport_be = load::<u16>(ctx, l4 + 2, end)?;
        }
        proto::ICMP => {
            let id = load::<u16>(ctx, l4 + 4, end)?;
            pkt.sport_be = id;
            pkt.dport_be = id;
        }
        _ => {}
    }
    Ok(pkt)
}
