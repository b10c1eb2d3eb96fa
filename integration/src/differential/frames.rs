//! Crafted frames: Ethernet + IPv4 + TCP/UDP/SCTP/ICMP built from a tuple, the ways to
//! damage them, and a decoder that prints any frame the way a person reads it.

use std::fmt::Write as _;
use std::net::Ipv4Addr;

use palisade_common::proto;
use palisade_policies::datapath_model::{TCP_ACK, TCP_FIN, TCP_PSH, TCP_RST, TCP_SYN};

pub const ETH_HLEN: usize = 14;

/// Whether BPF_PROG_TEST_RUN takes the frame for a TC program. Found here (6.18): it refuses
/// (EINVAL) anything shorter than the Ethernet header, an IPv4 ethertype without a whole
/// 20-byte IPv4 header, and an IPv6 ethertype without a whole 40-byte IPv6 header; so IPv4
/// headers cut short are the model's unit tests' business, not the differential test's.
pub fn runnable(frame: &[u8]) -> bool {
    let need = match frame.get(12..14) {
        Some([0x08, 0x00]) => ETH_HLEN + 20,
        Some([0x86, 0xdd]) => ETH_HLEN + 40,
        Some(_) => ETH_HLEN,
        None => return false,
    };
    frame.len() >= need
}
pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_ARP: u16 = 0x0806;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const ETH_P_8021Q: u16 = 0x8100;

/// A packet's addresses, protocol and ports (for ICMP echo: the id in both ports; for other
/// ICMP: the type in `sport` and the code in `dport`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tuple {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub protocol: u8,
    pub sport: u16,
    pub dport: u16,
}

/// What a frame carries above IPv4.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum L4 {
    Tcp {
        flags: u8,
    },
    Udp,
    Sctp,
    /// ICMP echo request (8) or reply (0) with the tuple's port as id.
    IcmpEcho {
        reply: bool,
    },
    /// Any other ICMP message without an embedded packet.
    IcmpOther {
        kind: u8,
    },
    /// A protocol the datapath has no ports for (GRE, IGMP, ...): 8 bytes of payload.
    Other,
}

fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for chunk in data.chunks(2) {
        let hi = u32::from(chunk[0]) << 8;
        let lo = chunk.get(1).map_or(0, |b| u32::from(*b));
        sum += hi | lo;
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !u16::try_from(sum).expect("folded into 16 bits")
}

/// An IPv4 packet (no Ethernet header): 20-byte header, DF, TTL 64, valid checksum.
pub fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, protocol: u8, l4: &[u8]) -> Vec<u8> {
    let total = u16::try_from(20 + l4.len())
        .expect("small packets")
        .to_be_bytes();
    let mut h = vec![
        0x45, 0, total[0], total[1], 0x12, 0x34, 0x40, 0, 64, protocol, 0, 0,
    ];
    h.extend_from_slice(&src.octets());
    h.extend_from_slice(&dst.octets());
    let c = checksum(&h).to_be_bytes();
    h[10] = c[0];
    h[11] = c[1];
    h.extend_from_slice(l4);
    h
}

/// An Ethernet frame (locally administered MACs) around `payload`.
pub fn ethernet(ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![0x02, 0, 0, 0, 0, 0x02, 0x02, 0, 0, 0, 0, 0x01];
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

fn l4_bytes(t: &Tuple, l4: L4) -> Vec<u8> {
    let (sp, dp) = (t.sport.to_be_bytes(), t.dport.to_be_bytes());
    match l4 {
        L4::Tcp { flags } => {
            let mut h = vec![
                sp[0], sp[1], dp[0], dp[1], 0, 0, 0, 1, 0, 0, 0, 0, 0x50, flags, 0xff, 0xff, 0, 0,
                0, 0,
            ];
            h.extend_from_slice(b"ping");
            h
        }
        L4::Udp => {
            let mut h = vec![sp[0], sp[1], dp[0], dp[1], 0, 12, 0, 0];
            h.extend_from_slice(b"ping");
            h
        }
        L4::Sctp => vec![sp[0], sp[1], dp[0], dp[1], 0, 0, 0, 1, 0, 0, 0, 0],
        L4::IcmpEcho { reply } => {
            let mut h = vec![if reply { 0 } else { 8 }, 0, 0, 0, sp[0], sp[1], 0, 1];
            h.extend_from_slice(b"palisade");
            let c = checksum(&h).to_be_bytes();
            h[2] = c[0];
            h[3] = c[1];
            h
        }
        L4::IcmpOther { kind } => vec![kind, 0, 0, 0, 0, 0, 0, 0],
        L4::Other => vec![0; 8],
    }
}

/// The IPv4 packet (no Ethernet header) of `t` carrying `l4`.
pub fn ip_packet(t: &Tuple, l4: L4) -> Vec<u8> {
    ipv4(t.src, t.dst, t.protocol, &l4_bytes(t, l4))
}

/// The Ethernet frame of `t` carrying `l4`.
pub fn frame(t: &Tuple, l4: L4) -> Vec<u8> {
    ethernet(ETH_P_IP, &ip_packet(t, l4))
}

/// An ICMP error (`kind`: 3, 11 or 12) from `src` to `dst` about `inner` (an IPv4 packet of
/// which the header and 8 bytes are embedded, as routers do), cut to `inner_len` bytes.
pub fn icmp_error(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    kind: u8,
    inner: &[u8],
    inner_len: Option<usize>,
) -> Vec<u8> {
    let ihl = usize::from(inner.first().copied().unwrap_or(0x45) & 0x0f) * 4;
    let keep = inner_len.unwrap_or(ihl + 8).min(inner.len());
    let mut l4 = vec![kind, 0, 0, 0, 0, 0, 0, 0];
    l4.extend_from_slice(&inner[..keep]);
    let c = checksum(&l4).to_be_bytes();
    l4[2] = c[0];
    l4[3] = c[1];
    ethernet(ETH_P_IP, &ipv4(src, dst, proto::ICMP, &l4))
}

/// An ARP request from `sender` for `target`.
pub fn arp(sender: Ipv4Addr, target: Ipv4Addr) -> Vec<u8> {
    let mut p = vec![0, 1, 0x08, 0, 6, 4, 0, 1, 0x02, 0, 0, 0, 0, 0x01];
    p.extend_from_slice(&sender.octets());
    p.extend_from_slice(&[0; 6]);
    p.extend_from_slice(&target.octets());
    let mut f = ethernet(ETH_P_ARP, &p);
    f[..6].copy_from_slice(&[0xff; 6]);
    f
}

/// Ways to damage or reshape a frame, each at a place the parser looks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mutation {
    /// Cut the frame to this many bytes (never below the Ethernet header).
    Truncate(usize),
    /// Set the IPv4 version/IHL byte.
    VersionIhl(u8),
    /// Insert this many 32-bit words of IP options (NOPs, then EOL) and raise the IHL.
    Options(u8),
    /// Set flags and fragment offset (host order: 0x2000 is MF, 0x1fff the offset).
    Fragment(u16),
    /// Set the IPv4 total length.
    TotalLength(u16),
    /// Replace the ethertype.
    Ethertype(u16),
    /// Insert an 802.1Q tag before the ethertype.
    VlanTag,
    /// Append bytes after the packet.
    Pad(u8),
    /// Overwrite one byte (index taken modulo the length).
    Byte(usize, u8),
}

/// Applies `m` to a frame whose IPv4 header (if any) starts at 14.
pub fn mutate(frame: &mut Vec<u8>, m: Mutation) {
    let ip = ETH_HLEN;
    match m {
        Mutation::Truncate(n) => frame.truncate(n.max(ETH_HLEN)),
        Mutation::VersionIhl(v) => {
            if let Some(b) = frame.get_mut(ip) {
                *b = v;
            }
        }
        Mutation::Options(words) => {
            if frame.len() >= ip + 20 {
                let words = words.clamp(1, 10);
                let ihl = (frame[ip] & 0x0f) + words;
                frame[ip] = (frame[ip] & 0xf0) | ihl.min(15);
                let mut opts = vec![1u8; usize::from(words) * 4];
                *opts.last_mut().expect("at least one word") = 0;
                let at = ip + 20;
                frame.splice(at..at, opts);
                let total = u16::from_be_bytes([frame[ip + 2], frame[ip + 3]])
                    .wrapping_add(u16::from(words) * 4);
                frame[ip + 2..ip + 4].copy_from_slice(&total.to_be_bytes());
            }
        }
        Mutation::Fragment(v) => {
            if frame.len() >= ip + 8 {
                frame[ip + 6..ip + 8].copy_from_slice(&v.to_be_bytes());
            }
        }
        Mutation::TotalLength(v) => {
            if frame.len() >= ip + 4 {
                frame[ip + 2..ip + 4].copy_from_slice(&v.to_be_bytes());
            }
        }
        Mutation::Ethertype(t) => frame[12..14].copy_from_slice(&t.to_be_bytes()),
        Mutation::VlanTag => {
            frame.splice(12..12, [0x81, 0x00, 0x00, 0x64]);
        }
        Mutation::Pad(n) => frame.extend(std::iter::repeat_n(0xa5, usize::from(n))),
        Mutation::Byte(i, v) => {
            let n = frame.len();
            frame[i % n] = v;
        }
    }
}

fn tcp_flags(flags: u8) -> String {
    let names = [
        (TCP_SYN, "SYN"),
        (TCP_ACK, "ACK"),
        (TCP_FIN, "FIN"),
        (TCP_RST, "RST"),
        (TCP_PSH, "PSH"),
        (0x20, "URG"),
        (0x40, "ECE"),
        (0x80, "CWR"),
    ];
    let set: Vec<&str> = names
        .iter()
        .filter(|(bit, _)| flags & bit != 0)
        .map(|(_, n)| *n)
        .collect();
    if set.is_empty() {
        "no flags".to_string()
    } else {
        set.join("|")
    }
}

fn be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?]))
}

fn addr(b: &[u8], at: usize) -> Option<Ipv4Addr> {
    let s = b.get(at..at + 4)?;
    Some(Ipv4Addr::new(s[0], s[1], s[2], s[3]))
}

/// The IPv4 header at `off` and what follows, in words; `inner` marks an embedded packet.
fn describe_ipv4(f: &[u8], off: usize, out: &mut String, inner: bool) {
    let Some(&vi) = f.get(off) else {
        out.push_str(" | IPv4 header missing");
        return;
    };
    let ihl = usize::from(vi & 0x0f) * 4;
    let (Some(total), Some(frag), Some(&protocol), Some(src), Some(dst)) = (
        be16(f, off + 2),
        be16(f, off + 6),
        f.get(off + 9),
        addr(f, off + 12),
        addr(f, off + 16),
    ) else {
        let _ = write!(
            out,
            " | IPv4 header cut after {} of 20 bytes (version {} ihl {ihl})",
            f.len() - off,
            vi >> 4
        );
        return;
    };
    let _ = write!(out, " | {src} -> {dst} proto {protocol}");
    if vi >> 4 != 4 || ihl != 20 {
        let _ = write!(out, " version {} ihl {ihl}", vi >> 4);
    }
    if frag & 0x3fff != 0 {
        let _ = write!(
            out,
            " fragment (MF {}, offset {})",
            u8::from(frag & 0x2000 != 0),
            frag & 0x1fff
        );
    }
    if !inner && usize::from(total) != f.len() - off {
        let _ = write!(out, " total length {total} (frame has {})", f.len() - off);
    }
    let l4 = off + ihl;
    let rest = f.len().saturating_sub(l4);
    match protocol {
        proto::TCP | proto::UDP | proto::SCTP => {
            let name = match protocol {
                proto::TCP => "TCP",
                proto::UDP => "UDP",
                _ => "SCTP",
            };
            match (be16(f, l4), be16(f, l4 + 2)) {
                (Some(s), Some(d)) => {
                    let _ = write!(out, " | {name} {s} -> {d}");
                    if protocol == proto::TCP {
                        match f.get(l4 + 13) {
                            Some(flags) => {
                                let _ = write!(out, " {}", tcp_flags(*flags));
                            }
                            None if !inner => {
                                let _ = write!(out, " (header cut at {rest} bytes)");
                            }
                            None => {}
                        }
                    }
                }
                _ => {
                    let _ = write!(out, " | {name} header cut at {rest} bytes");
                }
            }
        }
        proto::ICMP => match f.get(l4) {
            None => out.push_str(" | ICMP header missing"),
            Some(&kind @ (0 | 8)) => match be16(f, l4 + 4) {
                Some(id) => {
                    let what = if kind == 8 { "request" } else { "reply" };
                    let _ = write!(out, " | ICMP echo {what} id {id}");
                }
                None => {
                    let _ = write!(out, " | ICMP echo cut at {rest} bytes");
                }
            },
            Some(&kind @ (3 | 11 | 12)) if !inner => {
                let _ = write!(out, " | ICMP error type {kind} about [");
                let mut embedded = String::new();
                describe_ipv4(f, l4 + 8, &mut embedded, true);
                out.push_str(embedded.trim_start_matches(" | "));
                out.push(']');
            }
            Some(kind) => {
                let _ = write!(out, " | ICMP type {kind}");
            }
        },
        _ => {}
    }
}

/// One line saying what a frame is, as the datapath's parser would see it.
pub fn describe(f: &[u8]) -> String {
    let mut out = format!("{} bytes", f.len());
    let Some(ethertype) = be16(f, 12) else {
        out.push_str(" | no ethertype");
        return out;
    };
    match ethertype {
        ETH_P_IP => describe_ipv4(f, ETH_HLEN, &mut out, false),
        ETH_P_ARP => out.push_str(" | ARP"),
        ETH_P_IPV6 => out.push_str(" | IPv6"),
        ETH_P_8021Q => out.push_str(" | 802.1Q VLAN tag"),
        other => {
            let _ = write!(out, " | ethertype {other:#06x}");
        }
    }
    out
}
