//! Ending TCP connections from outside their process: the kernel's `SOCK_DESTROY` over
//! `NETLINK_SOCK_DIAG` (what `ss -K` does), inside the endpoint's network namespace. The
//! socket is aborted: its owner's next call fails with ECONNABORTED (a blocked read returns at
//! once), and the kernel sends a reset to the peer.

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

/// `SOCK_DESTROY`, from linux/sock_diag.h.
const SOCK_DESTROY: u16 = 21;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLMSG_ERROR: u16 = 0x2;
const AF_INET: u8 = 2;
const IPPROTO_TCP: u8 = 6;
/// Every TCP state (`idiag_states` is a bit mask of them).
const ALL_STATES: u32 = u32::MAX;
/// `INET_DIAG_NOCOOKIE`: match by address and port, not by cookie.
const NO_COOKIE: u32 = u32::MAX;
/// nlmsghdr (16 bytes) + inet_diag_req_v2 (56 bytes).
const REQUEST_LEN: usize = 72;

/// The netlink request that destroys the socket `pair` (struct nlmsghdr followed by struct
/// inet_diag_req_v2, in host byte order but for the ports and addresses).
pub fn destroy_request(pair: &SocketPair, seq: u32) -> [u8; REQUEST_LEN] {
    let mut m = [0u8; REQUEST_LEN];
    // nlmsghdr
    m[0..4].copy_from_slice(&u32::try_from(REQUEST_LEN).unwrap_or(0).to_ne_bytes());
    m[4..6].copy_from_slice(&SOCK_DESTROY.to_ne_bytes());
    m[6..8].copy_from_slice(&(NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
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
    m[64..68].copy_from_slice(&NO_COOKIE.to_ne_bytes());
    m[68..72].copy_from_slice(&NO_COOKIE.to_ne_bytes());
    m
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

/// Destroys the sockets `pairs` inside the namespace at `netns_path`; returns how many
/// existed. ENOENT (the socket is gone already) is not an error.
pub fn destroy(netns_path: &Path, pairs: Vec<SocketPair>) -> io::Result<usize> {
    netns::run_in(netns_path, move || {
        let fd = socket(
            AddressFamily::Netlink,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC,
            SockProtocol::NetlinkSockDiag,
        )?;
        let kernel = NetlinkAddr::new(0, 0);
        let mut destroyed = 0;
        let mut buf = [0u8; 512];
        for (seq, pair) in (1u32..).zip(&pairs) {
            sendto(
                std::os::fd::AsRawFd::as_raw_fd(&fd),
                &destroy_request(pair, seq),
                &kernel,
                MsgFlags::empty(),
            )?;
            let n = recv(
                std::os::fd::AsRawFd::as_raw_fd(&fd),
                &mut buf,
                MsgFlags::empty(),
            )?;
            match ack_errno(&buf[..n]) {
                Some(0) => destroyed += 1,
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

    #[test]
    fn request_layout_is_the_kernels() {
        let req = destroy_request(
            &pair(
                "10.200.0.2:40000".parse().unwrap(),
                "10.200.0.3:8080".parse().unwrap(),
            ),
            7,
        );
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
