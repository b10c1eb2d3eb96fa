//! Header parsing. Every header is read in one piece (the IPv4 header's fixed part, the TCP
//! header up to its flags, the UDP ports), straight from the packet where the program can see
//! it, else with `bpf_skb_load_bytes` (`read`); each read lies within the IPv4 packet as its
//! total length says (which must fit in the frame). A short packet is an `INVALID_PACKET`
//! drop, a total length that does not fit `INVALID_IP_LENGTH`, never a guess.

use core::mem::MaybeUninit;

use aya_ebpf::programs::TcContext;
use palisade_common::{proto, reason::drop};

pub const ETH_HLEN: usize = 14;
pub const ETH_P_IP: u16 = 0x0800;
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
///
/// Laid out for the BPF target: the addresses first and the whole 8-byte aligned, so LLVM
/// zeroes and copies it in 8-byte words. Left to byte alignment, every zeroing (of an
/// address's unused 12 bytes, of the whole when `run` starts) became a call to a
/// byte-at-a-time `memset` loop: some 600 instructions per packet.
#[derive(Clone, Copy)]
#[repr(C, align(8))]
pub struct Packet {
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    /// The addresses of the IP header: the tuple's, or an ICMP error's own.
    pub outer_saddr: [u8; 16],
    pub outer_daddr: [u8; 16],
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
}

impl Packet {
    /// No packet: what `Parsed` holds until an IPv4 header is read.
    pub const NONE: Self = Self {
        saddr: [0; 16],
        daddr: [0; 16],
        sport_be: 0,
        dport_be: 0,
        protocol: 0,
        tcp_flags: 0,
        policy_port_be: 0,
        opens: false,
        related: false,
        outer_saddr: [0; 16],
        outer_daddr: [0; 16],
    };
}

/// What a frame is.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Frame {
    /// ARP: needed for neighbour resolution between the endpoint and the node; not policy.
    Arp,
    /// IPv4: the packet is in `Parsed::pkt`.
    Ipv4,
}

/// A frame as `parse` read it: what it is (or the drop reason it cannot be judged for), and
/// for IPv4 its packet. Plain fields rather than one enum: the verifier refuses a copy of an
/// enum whose unused payload bytes were never set. The packet is left unwritten until an
/// IPv4 header is read (zeroing it cost a byte-at-a-time `memset` per packet, see `Packet`).
pub struct Parsed {
    frame: Result<Frame, u8>,
    pkt: MaybeUninit<Packet>,
}

impl Parsed {
    /// Nothing parsed yet.
    #[inline(always)]
    pub const fn new() -> Self {
        Self {
            frame: Err(drop::INVALID_PACKET),
            pkt: MaybeUninit::uninit(),
        }
    }

    /// Parses the frame of `ctx` in place: returned by value, a second copy would take stack
    /// the judging path needs.
    #[inline(always)]
    pub fn parse(&mut self, ctx: &TcContext) {
        self.frame = parse(ctx, &mut self.pkt);
    }

    /// What the frame is, or why it cannot be judged.
    #[inline(always)]
    pub fn frame(&self) -> Result<Frame, u8> {
        self.frame
    }

    /// The IPv4 packet, when the frame is one.
    #[inline(always)]
    pub fn ipv4(&self) -> Option<&Packet> {
        // SAFETY: `parse` writes the packet before it reports an IPv4 frame, and nothing
        // changes either afterwards (the fields are private).
        (self.frame == Ok(Frame::Ipv4)).then(|| unsafe { self.pkt.assume_init_ref() })
    }
}

/// A `T` at `offset`, which must lie within the first `end` bytes of the frame: the end of the
/// IPv4 packet by its total length once that is known (bytes past it, such as Ethernet
/// padding, are not the packet's), the frame's length before.
#[inline(always)]
fn load<T: Copy>(ctx: &TcContext, offset: usize, end: usize) -> Result<T, u8> {
    if offset + size_of::<T>() > end {
        return Err(drop::INVALID_PACKET);
    }
    read(ctx, offset).ok_or(drop::INVALID_PACKET)
}

/// `load` with `bpf_skb_load_bytes` only, for what only a short frame or message needs (a
/// lone byte or two): the verifier cannot prove a direct read that small in bounds from the
/// comparison LLVM makes of it (`p < data_end`, which grants no bytes).
#[inline(always)]
fn load_by_helper<T>(ctx: &TcContext, offset: usize, end: usize) -> Result<T, u8> {
    if offset + size_of::<T>() > end {
        return Err(drop::INVALID_PACKET);
    }
    ctx.load::<T>(offset).map_err(|_| drop::INVALID_PACKET)
}

/// A `T` at `offset` in the frame, or None past its end. Read straight from the packet when
/// it lies in the linear part the program can see (headers a socket wrote always do), else
/// with `bpf_skb_load_bytes`, which also reaches paged data: a helper call per header was
/// most of the parser's cost (`docs/benchmarks/datapath-micro.md`).
#[inline(always)]
pub fn read<T: Copy>(ctx: &TcContext, offset: usize) -> Option<T> {
    let at = ctx.data() + offset;
    if at + size_of::<T>() <= ctx.data_end() {
        // SAFETY: [at, at + size_of::<T>()) lies within [data, data_end), checked just above,
        // and the wire types are plain bytes read unaligned.
        return Some(unsafe { core::ptr::read_unaligned(at as *const T) });
    }
    ctx.load::<T>(offset).ok()
}

#[inline(always)]
fn frame_len(ctx: &TcContext) -> usize {
    usize::try_from(ctx.len()).unwrap_or(0)
}

/// An IPv4 address in the 16 bytes the maps key by: the address, then zeroes. Built as one
/// 128-bit value, which LLVM stores in two words; zeroing the array and then setting four
/// bytes became a call to a byte-at-a-time `memset`.
#[inline(always)]
fn ipv4_addr(raw: [u8; 4]) -> [u8; 16] {
    u128::from(u32::from_le_bytes(raw)).to_le_bytes()
}

/// What the frame is, and for IPv4 its packet, written to `pkt` (left alone otherwise). Out
/// of line, so the parser's temporaries leave the stack before judging starts (both would
/// not fit in its 512 bytes); what it returns fits in a register, as a BPF function's result
/// must.
#[inline(never)]
fn parse(ctx: &TcContext, pkt: &mut MaybeUninit<Packet>) -> Result<Frame, u8> {
    let len = frame_len(ctx);
    let (ethertype, ip) = match load::<Ipv4FrameWire>(ctx, ETHERTYPE_OFFSET, len) {
        Ok(frame) => (u16::from_be(frame.ethertype_be), Some(frame.ip)),
        // Too short for an IPv4 header: what it is decides how it is refused.
        Err(_) => (
            u16::from_be(load_by_helper::<u16>(ctx, ETHERTYPE_OFFSET, len)?),
            None,
        ),
    };
    match (ethertype, ip) {
        (ETH_P_IP, Some(ip)) => {
            pkt.write(parse_ipv4(ctx, &ip, ETH_HLEN)?);
            Ok(Frame::Ipv4)
        }
        (ETH_P_IP, None) => Err(drop::INVALID_PACKET),
        (ETH_P_ARP, _) => Ok(Frame::Arp),
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

/// The fixed part of an IPv4 header, as on the wire.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Ipv4Wire {
    version_ihl: u8,
    _tos: u8,
    total_len_be: u16,
    _id_be: u16,
    frag_be: u16,
    pub ttl: u8,
    protocol: u8,
    _checksum_be: u16,
    saddr: [u8; 4],
    pub daddr: [u8; 4],
}

/// An IPv4 frame from its Ethernet type on: what every judged packet starts with, read in
/// one call (a shorter frame is read again for its type alone, see `parse`).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Ipv4FrameWire {
    pub ethertype_be: u16,
    pub ip: Ipv4Wire,
}

/// Where `Ipv4FrameWire` starts in the frame.
pub const ETHERTYPE_OFFSET: usize = 12;

/// A TCP header up to its flags, as on the wire.
#[repr(C)]
#[derive(Clone, Copy)]
struct TcpWire {
    sport_be: u16,
    dport_be: u16,
    _seq_be: u32,
    _ack_be: u32,
    _data_offset: u8,
    flags: u8,
}

/// An ICMP header up to a query's identifier, as on the wire.
#[repr(C)]
#[derive(Clone, Copy)]
struct IcmpWire {
    icmp_type: u8,
    _code: u8,
    _checksum_be: u16,
    ident_be: u16,
}

/// An ICMP message's type, and its identifier when it is long enough to have one (every
/// query is; `INVALID_PACKET` for one that is not); a shorter message is read again for its
/// type alone. Plain values out, every byte set: an `Option` left partly unwritten is
/// refused by the verifier.
#[inline(always)]
fn icmp_header(ctx: &TcContext, off: usize, end: usize) -> Result<(u8, Result<u16, u8>), u8> {
    match load::<IcmpWire>(ctx, off, end) {
        Ok(icmp) => Ok((icmp.icmp_type, Ok(icmp.ident_be))),
        Err(_) => Ok((
            load_by_helper::<u8>(ctx, off, end)?,
            Err(drop::INVALID_PACKET),
        )),
    }
}

/// The ports that open a TCP, UDP or SCTP header.
#[repr(C)]
#[derive(Clone, Copy)]
struct PortsWire {
    sport_be: u16,
    dport_be: u16,
}

/// IPv4 header at `off`, within the first `end` bytes.
#[inline(always)]
fn ipv4_header(ctx: &TcContext, off: usize, end: usize) -> Result<Ipv4Header, u8> {
    ipv4_fields(&load::<Ipv4Wire>(ctx, off, end)?, off)
}

/// The fields of the IPv4 header `ip`, read at `off`, once it is known to be one.
#[inline(always)]
fn ipv4_fields(ip: &Ipv4Wire, off: usize) -> Result<Ipv4Header, u8> {
    if ip.version_ihl >> 4 != 4 {
        return Err(drop::INVALID_PACKET);
    }
    let ihl = ((ip.version_ihl & 0x0f) as usize) * 4;
    if ihl < 20 {
        return Err(drop::INVALID_PACKET);
    }
    Ok(Ipv4Header {
        protocol: ip.protocol,
        saddr: ip.saddr,
        daddr: ip.daddr,
        l4: off + ihl,
        frag: u16::from_be(ip.frag_be),
        total_len: u16::from_be(ip.total_len_be),
    })
}

#[inline(always)]
fn parse_ipv4(ctx: &TcContext, ip: &Ipv4Wire, off: usize) -> Result<Packet, u8> {
    let Ipv4Header {
        protocol,
        saddr,
        daddr,
        l4,
        frag,
        total_len,
    } = ipv4_fields(ip, off)?;
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
            let tcp = load::<TcpWire>(ctx, l4, end)?;
            pkt.sport_be = tcp.sport_be;
            pkt.dport_be = tcp.dport_be;
            pkt.tcp_flags = tcp.flags;
            pkt.policy_port_be = pkt.dport_be;
            pkt.opens = pkt.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
        }
        proto::UDP | proto::SCTP => {
            let p = load::<PortsWire>(ctx, l4, end)?;
            pkt.sport_be = p.sport_be;
            pkt.dport_be = p.dport_be;
            pkt.policy_port_be = pkt.dport_be;
        }
        proto::ICMP => {
            let (icmp_type, ident_be) = icmp_header(ctx, l4, end)?;
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
                pkt.sport_be = ident_be?;
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
            let p = load::<PortsWire>(ctx, l4, end)?;
            pkt.sport_be = p.sport_be;
            pkt.dport_be = p.dport_be;
        }
        proto::ICMP => {
            // The key of an embedded query, as it was tracked.
            let (icmp_type, ident_be) = icmp_header(ctx, l4, end)?;
            pkt.dport_be = u16::from(icmp_type).to_be();
            if icmp_counterpart(icmp_type) != icmp_type {
                pkt.sport_be = ident_be?;
            }
        }
        _ => {}
    }
    Ok(pkt)
}
