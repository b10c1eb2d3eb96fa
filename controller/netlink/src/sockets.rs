//! Ending TCP connections from outside their process: the kernel's `SOCK_DESTROY` over
//! `NETLINK_SOCK_DIAG` (what `ss -K` does), inside the endpoint's network namespace. The
//! socket is aborted: its owner's next call fails with ECONNABORTED (a blocked read returns at
//! once), and the kernel sends a reset to the peer.
//!
//! The kernel finds the socket of an address pair the way it finds the socket of an arriving
//! packet: the connected socket, or else the *listening* socket of the local port. A
//! connection that has already closed on this side (its conntrack entry outlives it) would
//! name the server's listener, and destroying that stops the server accepting. So each socket
//! is first looked up (`SOCK_DIAG_BY_FAMILY`), and destroyed by the cookie of what the lookup
//! found only when that is the connection itself: neither a listener nor another pair.

use std::io;
use std::path::Path;

use nix::sys::socket::{
    AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType, recv, sendto, socket,
};

use super::netns;

/// One end of a TCP connection, as the socket inside a namespace sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct SocketPair {
    pub local: std::net::SocketAddrV4,
    pub remote: std::net::SocketAddrV4,
}

/// The kernel's identifier of one socket (`idiag_cookie`), as it reports it: a request that
/// carries it matches that socket and no other.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SocketCookie([u8; 8]);

impl SocketCookie {
    /// `INET_DIAG_NOCOOKIE`: match by address and port alone.
    const NONE: SocketCookie = SocketCookie([0xff; 8]);
}

/// What looking a pair up found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lookup {
    /// The pair's own socket.
    Connection(SocketCookie),
    /// A socket that is not this connection: the listener of the local port, which the kernel
    /// falls back on when the connection is gone. Never to be destroyed for the pair.
    Other,
    /// No socket at all.
    Gone,
}

/// `SOCK_DIAG_BY_FAMILY` and `SOCK_DESTROY`, from linux/sock_diag.h.
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const SOCK_DESTROY: u16 = 21;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLMSG_ERROR: u16 = 0x2;
const AF_INET: u8 = 2;
const IPPROTO_TCP: u8 = 6;
/// `TCP_LISTEN`, from include/net/tcp_states.h.
const TCP_LISTEN: u8 = 10;
/// Every TCP state (`idiag_states` is a bit mask of them).
const ALL_STATES: u32 = u32::MAX;
/// nlmsghdr (16 bytes) + inet_diag_req_v2 (56 bytes).
const REQUEST_LEN: usize = 72;
/// nlmsghdr (16 bytes) + inet_diag_msg (72 bytes), before any attribute.
const ANSWER_LEN: usize = 88;

/// A `kind` request about the socket `pair` (struct nlmsghdr followed by struct
/// inet_diag_req_v2, in host byte order but for the ports and addresses).
fn request(
    kind: u16,
    flags: u16,
    pair: &SocketPair,
    cookie: SocketCookie,
    seq: u32,
) -> [u8; REQUEST_LEN] {
    let mut m = [0u8; REQUEST_LEN];
    // nlmsghdr
    m[0..4].copy_from_slice(&u32::try_from(REQUEST_LEN).unwrap_or(0).to_ne_bytes());
    m[4..6].copy_from_slice(&kind.to_ne_bytes());
    m[6..8].copy_from_slice(&flags.to_ne_bytes());
    m[8..12].copy_from_slice(&seq.to_ne_bytes());
    // m[12..16]: port id 0, the kernel.
    // inet_diag_req_v2
    m[16] = AF_INET;
    m[17] = IPPROTO_TCP;
    // m[18]: idiag_ext, m[19]: pad.
    m[20..24].copy_from_slice(&ALL_STATES.to_ne_bytes());
    // inet_diag_sockid at 24: sport, dport (network order), src[4], dst[4] (network order;
    // IPv4 in the first word), interface, cookie[2].
    m[24..26].copy_from_slice(&pair.local.port().to_be_bytes());
    m[26..28].copy_from_slice(&pair.remote.port().to_be_bytes());
    m[28..32].copy_from_slice(&pair.local.ip().octets());
    m[44..48].copy_from_slice(&pair.remote.ip().octets());
    // m[60..64]: any interface.
    m[64..72].copy_from_slice(&cookie.0);
    m
}

/// The netlink request that looks up the socket of `pair` (answered with its
/// inet_diag_msg, or an error).
pub fn lookup_request(pair: &SocketPair, seq: u32) -> [u8; REQUEST_LEN] {
    request(
        SOCK_DIAG_BY_FAMILY,
        NLM_F_REQUEST,
        pair,
        SocketCookie::NONE,
        seq,
    )
}

/// The netlink request that destroys the socket `cookie` of `pair` (acknowledged).
pub fn destroy_request(pair: &SocketPair, cookie: SocketCookie, seq: u32) -> [u8; REQUEST_LEN] {
    request(SOCK_DESTROY, NLM_F_REQUEST | NLM_F_ACK, pair, cookie, seq)
}

/// The errno of a netlink acknowledgement (0: done), or None when `ack` is not one.
fn ack_errno(ack: &[u8]) -> Option<i32> {
    let kind = u16::from_ne_bytes(ack.get(4..6)?.try_into().ok()?);
    if kind != NLMSG_ERROR {
        return None;
    }
    let error = i32::from_ne_bytes(ack.get(16..20)?.try_into().ok()?);
    Some(-error)
}

/// Reads the kernel's answer to [`lookup_request`] for `pair`: the socket it found is the
/// connection only if it is not listening and its addresses and ports are the pair's.
pub fn read_lookup(answer: &[u8], pair: &SocketPair) -> io::Result<Lookup> {
    let unexpected = || {
        io::Error::other(format!(
            "looking up socket {} -> {}: unexpected netlink answer",
            pair.local, pair.remote
        ))
    };
    match ack_errno(answer) {
        Some(libc::ENOENT) => return Ok(Lookup::Gone),
        Some(0) => return Err(unexpected()),
        Some(errno) => {
            return Err(io::Error::new(
                io::Error::from_raw_os_error(errno).kind(),
                format!(
                    "looking up socket {} -> {}: {}",
                    pair.local,
                    pair.remote,
                    io::Error::from_raw_os_error(errno)
                ),
            ));
        }
        None => {}
    }
    let kind = answer.get(4..6).map(|k| u16::from_ne_bytes([k[0], k[1]]));
    if kind != Some(SOCK_DIAG_BY_FAMILY) || answer.len() < ANSWER_LEN {
        return Err(unexpected());
    }
    // inet_diag_msg at 16: family, state, timer, retrans, then inet_diag_sockid.
    let m = &answer[16..ANSWER_LEN];
    let port = |at: usize| u16::from_be_bytes([m[at], m[at + 1]]);
    let ip = |at: usize| std::net::Ipv4Addr::new(m[at], m[at + 1], m[at + 2], m[at + 3]);
    let found = SocketPair {
        local: std::net::SocketAddrV4::new(ip(8), port(4)),
        remote: std::net::SocketAddrV4::new(ip(24), port(6)),
    };
    if m[1] == TCP_LISTEN || found != *pair {
        return Ok(Lookup::Other);
    }
    let mut cookie = [0u8; 8];
    cookie.copy_from_slice(&m[44..52]);
    Ok(Lookup::Connection(SocketCookie(cookie)))
}

/// Sends `req` and reads the answer into `buf`.
fn ask<'b>(fd: &std::os::fd::OwnedFd, req: &[u8], buf: &'b mut [u8]) -> io::Result<&'b [u8]> {
    let raw = std::os::fd::AsRawFd::as_raw_fd(fd);
    sendto(raw, req, &NetlinkAddr::new(0, 0), MsgFlags::empty())?;
    let n = recv(raw, buf, MsgFlags::empty())?;
    Ok(&buf[..n])
}

/// Destroys the sockets `pairs` inside the namespace at `netns_path`; returns how many
/// existed. A pair whose socket is gone already (ENOENT, or only the port's listener left)
/// is not an error, and nothing but the pair's own socket is ever destroyed.
pub fn destroy(netns_path: &Path, pairs: Vec<SocketPair>) -> io::Result<usize> {
    netns::run_in(netns_path, move || {
        let fd = socket(
            AddressFamily::Netlink,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC,
            SockProtocol::NetlinkSockDiag,
        )?;
        let mut destroyed = 0;
        // Room for the answer's attributes too (a truncated answer still holds its head).
        let mut buf = [0u8; 4096];
        let mut seq = 0u32;
        for pair in &pairs {
            seq = seq.wrapping_add(1);
            let cookie = match read_lookup(ask(&fd, &lookup_request(pair, seq), &mut buf)?, pair)? {
                Lookup::Connection(cookie) => cookie,
                Lookup::Other | Lookup::Gone => continue,
            };
            seq = seq.wrapping_add(1);
            match ack_errno(ask(&fd, &destroy_request(pair, cookie, seq), &mut buf)?) {
                Some(0) => destroyed += 1,
                // Gone since the lookup (a cookie matches no other socket).
                Some(libc::ENOENT) => {}
                Some(errno) => {
                    return Err(io::Error::new(
                        io::Error::from_raw_os_error(errno).kind(),
                        format!(
                            "destroying socket {} -> {}: {}",
                            pair.local,
                            pair.remote,
                            io::Error::from_raw_os_error(errno)
                        ),
                    ));
                }
                None => {
                    return Err(io::Error::other(format!(
                        "destroying socket {} -> {}: unexpected netlink answer",
                        pair.local, pair.remote
                    )));
                }
            }
        }
        Ok(destroyed)
    })
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddrV4;

    use super::*;

    fn pair(local: SocketAddrV4, remote: SocketAddrV4) -> SocketPair {
        SocketPair { local, remote }
    }

    fn a_pair() -> SocketPair {
        pair(
            "10.200.0.2:40000".parse().unwrap(),
            "10.200.0.3:8080".parse().unwrap(),
        )
    }

    /// The kernel's inet_diag_msg for a socket in `state` with these ends.
    fn answer(state: u8, found: &SocketPair, cookie: [u8; 8]) -> Vec<u8> {
        let len = ANSWER_LEN + 8;
        let mut m = vec![0u8; len];
        m[0..4].copy_from_slice(&u32::try_from(len).unwrap().to_ne_bytes());
        m[4..6].copy_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
        m[16] = AF_INET;
        m[17] = state;
        m[20..22].copy_from_slice(&found.local.port().to_be_bytes());
        m[22..24].copy_from_slice(&found.remote.port().to_be_bytes());
        m[24..28].copy_from_slice(&found.local.ip().octets());
        m[40..44].copy_from_slice(&found.remote.ip().octets());
        m[60..68].copy_from_slice(&cookie);
        m
    }

    #[test]
    fn request_layout_is_the_kernels() {
        let req = destroy_request(&a_pair(), SocketCookie::NONE, 7);
        assert_eq!(u32::from_ne_bytes(req[0..4].try_into().unwrap()), 72);
        assert_eq!(u16::from_ne_bytes(req[4..6].try_into().unwrap()), 21);
        assert_eq!(u16::from_ne_bytes(req[6..8].try_into().unwrap()), 0x5);
        assert_eq!(u32::from_ne_bytes(req[8..12].try_into().unwrap()), 7);
        assert_eq!((req[16], req[17]), (2, 6));
        assert_eq!(
            &req[24..28],
            &[0x9c, 0x40, 0x1f, 0x90],
            "ports in network order"
        );
        assert_eq!(&req[28..32], &[10, 200, 0, 2]);
        assert_eq!(&req[44..48], &[10, 200, 0, 3]);
        assert_eq!(&req[64..72], &[0xff; 8], "no cookie");

        let cookie = SocketCookie([1, 2, 3, 4, 5, 6, 7, 8]);
        let req = destroy_request(&a_pair(), cookie, 8);
        assert_eq!(
            &req[64..72],
            &[1, 2, 3, 4, 5, 6, 7, 8],
            "the socket's cookie"
        );
        let lookup = lookup_request(&a_pair(), 9);
        assert_eq!(u16::from_ne_bytes(lookup[4..6].try_into().unwrap()), 20);
        assert_eq!(
            u16::from_ne_bytes(lookup[6..8].try_into().unwrap()),
            0x1,
            "a lookup of one socket, not a dump, and no acknowledgement besides the answer"
        );
        assert_eq!(&lookup[16..64], &req[16..64], "the same pair");
        assert_eq!(&lookup[64..72], &[0xff; 8], "found by address and port");
    }

    #[test]
    fn the_pairs_own_socket_is_found_with_its_cookie() {
        const ESTABLISHED: u8 = 1;
        const TIME_WAIT: u8 = 6;
        let cookie = [9, 8, 7, 6, 5, 4, 3, 2];
        for state in [ESTABLISHED, TIME_WAIT] {
            assert_eq!(
                read_lookup(&answer(state, &a_pair(), cookie), &a_pair()).unwrap(),
                Lookup::Connection(SocketCookie(cookie))
            );
        }
    }

    #[test]
    fn the_listener_the_kernel_falls_back_on_is_never_the_connection() {
        // What the kernel answers once the connection is closed on this side: the socket
        // listening on the local port.
        let listener = pair(
            "0.0.0.0:8080".parse().unwrap(),
            "0.0.0.0:0".parse().unwrap(),
        );
        assert_eq!(
            read_lookup(&answer(TCP_LISTEN, &listener, [1; 8]), &a_pair()).unwrap(),
            Lookup::Other
        );
        // Even one bound to the pair's own address, and whatever its state says.
        let bound = pair(
            "10.200.0.3:8080".parse().unwrap(),
            "0.0.0.0:0".parse().unwrap(),
        );
        assert_eq!(
            read_lookup(&answer(1, &bound, [1; 8]), &a_pair()).unwrap(),
            Lookup::Other
        );
        assert_eq!(
            read_lookup(&answer(TCP_LISTEN, &a_pair(), [1; 8]), &a_pair()).unwrap(),
            Lookup::Other
        );
    }

    #[test]
    fn a_missing_socket_is_gone_and_other_answers_are_errors() {
        let mut err = [0u8; 36];
        err[4..6].copy_from_slice(&NLMSG_ERROR.to_ne_bytes());
        err[16..20].copy_from_slice(&(-libc::ENOENT).to_ne_bytes());
        assert_eq!(read_lookup(&err, &a_pair()).unwrap(), Lookup::Gone);
        err[16..20].copy_from_slice(&(-libc::EPERM).to_ne_bytes());
        assert_eq!(
            read_lookup(&err, &a_pair()).unwrap_err().kind(),
            io::ErrorKind::PermissionDenied
        );
        let short = &answer(1, &a_pair(), [0; 8])[..40];
        assert!(read_lookup(short, &a_pair()).is_err());
        assert!(read_lookup(&[], &a_pair()).is_err());
    }

    #[test]
    fn acknowledgements_are_read() {
        let mut ack = [0u8; 36];
        ack[4..6].copy_from_slice(&NLMSG_ERROR.to_ne_bytes());
        assert_eq!(ack_errno(&ack), Some(0));
        ack[16..20].copy_from_slice(&(-libc::ENOENT).to_ne_bytes());
        assert_eq!(ack_errno(&ack), Some(libc::ENOENT));
        assert_eq!(ack_errno(&ack[..10]), None);
    }
}
