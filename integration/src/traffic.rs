//! Real traffic from inside endpoint namespaces: a thread enters the namespace, and the
//! sockets it opens live there.

use std::fs::File;
use std::io::{Read as _, Write as _};
use std::mem::MaybeUninit;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsFd as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::sched::{CloneFlags, setns};
use socket2::{Domain, Protocol, Socket, Type};

/// How long a probe waits before calling the path blocked.
pub const PROBE_TIMEOUT: Duration = Duration::from_millis(1500);

fn enter(netns: &str) {
    let f = File::open(format!("/run/netns/{netns}"))
        .unwrap_or_else(|e| panic!("open netns {netns}: {e}"));
    setns(f.as_fd(), CloneFlags::CLONE_NEWNET).unwrap_or_else(|e| panic!("setns {netns}: {e}"));
}

/// Runs `f` on a thread inside `netns`.
pub fn in_netns<T: Send + 'static>(netns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let netns = netns.to_string();
    std::thread::spawn(move || {
        enter(&netns);
        f()
    })
    .join()
    .expect("netns thread panicked")
}

/// A TCP or UDP server answering `pong` to anything, until dropped.
pub struct Server {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn spawn_server(netns: &str, port: u16, udp: bool) -> Server {
    let stop = Arc::new(AtomicBool::new(false));
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let netns = netns.to_string();
    let flag = Arc::clone(&stop);
    let thread = std::thread::spawn(move || {
        enter(&netns);
        let addr = SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port);
        if udp {
            let sock =
                UdpSocket::bind(addr).unwrap_or_else(|e| panic!("udp bind {port} in {netns}: {e}"));
            sock.set_read_timeout(Some(Duration::from_millis(50)))
                .expect("timeout");
            ready_tx.send(()).expect("ready");
            let mut buf = [0u8; 2048];
            while !flag.load(Ordering::SeqCst) {
                if let Ok((_, from)) = sock.recv_from(&mut buf) {
                    let _ = sock.send_to(b"pong", from);
                }
            }
        } else {
            let listener = TcpListener::bind(addr)
                .unwrap_or_else(|e| panic!("tcp bind {port} in {netns}: {e}"));
            listener.set_nonblocking(true).expect("nonblocking");
            ready_tx.send(()).expect("ready");
            while !flag.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((mut s, _)) => {
                        let _ = s.set_nonblocking(false);
                        // Serve until the client closes: tests hold connections open across
                        // policy changes, and a server-side close would change what they test.
                        std::thread::spawn(move || {
                            let mut buf = [0u8; 64];
                            while let Ok(n) = s.read(&mut buf) {
                                if n == 0 || s.write_all(b"pong").is_err() {
                                    break;
                                }
                            }
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        }
    });
    ready_rx
        .recv_timeout(Duration::from_secs(5))
        .expect("server did not start");
    Server {
        stop,
        thread: Some(thread),
    }
}

pub fn tcp_server(netns: &str, port: u16) -> Server {
    spawn_server(netns, port, false)
}

pub fn udp_server(netns: &str, port: u16) -> Server {
    spawn_server(netns, port, true)
}

/// TCP connect, send, and read the answer: proves both directions.
pub fn tcp_connects(netns: &str, dst: Ipv4Addr, port: u16) -> bool {
    in_netns(netns, move || {
        let addr = SocketAddr::from((dst, port));
        let Ok(mut s) = TcpStream::connect_timeout(&addr, PROBE_TIMEOUT) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(PROBE_TIMEOUT));
        let mut buf = [0u8; 4];
        s.write_all(b"ping").is_ok() && s.read_exact(&mut buf).is_ok() && &buf == b"pong"
    })
}

/// An open TCP connection held inside a namespace, to test what happens to it over time.
pub struct OpenConnection {
    stream: TcpStream,
}

impl OpenConnection {
    pub fn open(netns: &str, dst: Ipv4Addr, port: u16) -> Option<OpenConnection> {
        in_netns(netns, move || {
            let s =
                TcpStream::connect_timeout(&SocketAddr::from((dst, port)), PROBE_TIMEOUT).ok()?;
            s.set_read_timeout(Some(PROBE_TIMEOUT)).ok()?;
            Some(OpenConnection { stream: s })
        })
    }

    pub fn local_port(&self) -> u16 {
        self.stream.local_addr().map_or(0, |a| a.port())
    }

    /// One request/answer round trip on the existing connection.
    pub fn round_trip(&mut self) -> bool {
        let mut buf = [0u8; 4];
        self.stream.write_all(b"ping").is_ok()
            && self.stream.read_exact(&mut buf).is_ok()
            && &buf == b"pong"
    }

    /// Closes with RST (SO_LINGER 0) instead of FIN.
    pub fn reset(self) {
        let sock = Socket::from(self.stream);
        let _ = sock.set_linger(Some(Duration::ZERO));
        drop(sock);
    }
}

/// UDP datagram to `dst:port` and wait for the answer.
pub fn udp_reaches(netns: &str, dst: Ipv4Addr, port: u16) -> bool {
    udp_send_from(netns, 0, dst, port)
}

/// UDP from a given local port (0: any), so a test can then send to that port from the other
/// side; true when the answer came back.
pub fn udp_send_from(netns: &str, local_port: u16, dst: Ipv4Addr, port: u16) -> bool {
    in_netns(netns, move || {
        let Ok(s) = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, local_port)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(PROBE_TIMEOUT));
        if s.send_to(b"ping", (dst, port)).is_err() {
            return false;
        }
        let mut buf = [0u8; 16];
        matches!(s.recv_from(&mut buf), Ok((4, _)))
    })
}

/// The Internet checksum (RFC 1071).
pub fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for chunk in data.chunks(2) {
        let word = if chunk.len() == 2 {
            u16::from_be_bytes([chunk[0], chunk[1]])
        } else {
            u16::from(chunk[0]) << 8
        };
        sum += u32::from(word);
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !u16::try_from(sum).expect("folded into 16 bits")
}

/// ICMP echo request, waiting for the matching reply.
pub fn ping(netns: &str, dst: Ipv4Addr) -> bool {
    // The low 16 bits of the pid.
    let [.., pid_hi, pid_lo] = std::process::id().to_be_bytes();
    let id = u16::from_be_bytes([pid_hi, pid_lo]) ^ 0x5a5a;
    icmp_query(netns, dst, ICMP_ECHO, ICMP_ECHO_REPLY, id)
}

pub const ICMP_ECHO_REPLY: u8 = 0;
pub const ICMP_ECHO: u8 = 8;
pub const ICMP_TIMESTAMP: u8 = 13;
pub const ICMP_TIMESTAMP_REPLY: u8 = 14;

/// What a raw socket read: the IP header and what follows.
fn received(buf: &[MaybeUninit<u8>], n: usize) -> Vec<u8> {
    buf[..n]
        .iter()
        .map(|b| {
            // SAFETY: recv_from initialised the first n bytes.
            unsafe { b.assume_init() }
        })
        .collect()
}

/// An ICMP query of type `kind` (echo, timestamp) with identifier `id` from inside `netns`,
/// waiting for a message of type `reply_kind` with the same identifier.
pub fn icmp_query(netns: &str, dst: Ipv4Addr, kind: u8, reply_kind: u8, id: u16) -> bool {
    in_netns(netns, move || {
        let Ok(sock) = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::ICMPV4)) else {
            return false;
        };
        let [id_hi, id_lo] = id.to_be_bytes();
        let mut pkt = vec![kind, 0, 0, 0, id_hi, id_lo, 0, 1];
        if kind == ICMP_TIMESTAMP {
            // Originate, receive and transmit timestamps.
            pkt.extend_from_slice(&[0; 12]);
        } else {
            pkt.extend_from_slice(b"palisade");
        }
        let c = checksum(&pkt);
        pkt[2..4].copy_from_slice(&c.to_be_bytes());
        if sock
            .send_to(&pkt, &SocketAddr::from((dst, 0)).into())
            .is_err()
        {
            return false;
        }
        let deadline = Instant::now() + PROBE_TIMEOUT;
        let mut buf = [MaybeUninit::<u8>::uninit(); 1500];
        while Instant::now() < deadline {
            let _ = sock.set_read_timeout(Some(
                deadline
                    .saturating_duration_since(Instant::now())
                    .max(Duration::from_millis(1)),
            ));
            let Ok((n, _)) = sock.recv_from(&mut buf) else {
                return false;
            };
            let data = received(&buf, n);
            let ihl = usize::from(data.first().copied().unwrap_or(0) & 0x0f) * 4;
            if data.len() >= ihl + 8
                && data[ihl] == reply_kind
                && u16::from_be_bytes([data[ihl + 4], data[ihl + 5]]) == id
            {
                return true;
            }
        }
        false
    })
}

/// A UDP datagram from `local_port` to `dst:port`, where nothing listens: true when the
/// destination's ICMP port unreachable came back (the socket reports the refusal).
pub fn udp_refused(netns: &str, local_port: u16, dst: Ipv4Addr, port: u16) -> bool {
    in_netns(netns, move || {
        let Ok(s) = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, local_port)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(PROBE_TIMEOUT));
        if s.connect((dst, port)).is_err() || s.send(b"ping").is_err() {
            return false;
        }
        let mut buf = [0u8; 16];
        matches!(s.recv(&mut buf), Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused)
    })
}

/// Sends a whole IPv4 packet (header included, addresses as given; the kernel fills in the
/// header checksum) from inside `netns`.
pub fn send_raw_ipv4(netns: &str, packet: Vec<u8>) -> std::io::Result<()> {
    in_netns(netns, move || {
        // IPPROTO_RAW: the header is ours.
        let sock = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::from(255)))?;
        let dst = Ipv4Addr::new(packet[16], packet[17], packet[18], packet[19]);
        sock.send_to(&packet, &SocketAddr::from((dst, 0)).into())
            .map(|_| ())
    })
}

/// Every ICMP packet (IP header included) that arrives in a namespace while the capture runs.
pub struct IcmpCapture {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Vec<Vec<u8>>>>,
}

impl IcmpCapture {
    pub fn start(netns: &str) -> IcmpCapture {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let netns = netns.to_string();
        let thread = std::thread::spawn(move || {
            enter(&netns);
            let sock = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::ICMPV4))
                .unwrap_or_else(|e| panic!("raw ICMP socket in {netns}: {e}"));
            sock.set_read_timeout(Some(Duration::from_millis(50)))
                .expect("timeout");
            ready_tx.send(()).expect("ready");
            let mut seen = Vec::new();
            let mut buf = [MaybeUninit::<u8>::uninit(); 1500];
            while !flag.load(Ordering::SeqCst) {
                if let Ok((n, _)) = sock.recv_from(&mut buf) {
                    seen.push(received(&buf, n));
                }
            }
            seen
        });
        ready_rx
            .recv_timeout(Duration::from_secs(5))
            .expect("capture did not start");
        IcmpCapture {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops the capture (after a moment for what is in flight) and returns what it saw.
    pub fn finish(mut self) -> Vec<Vec<u8>> {
        std::thread::sleep(Duration::from_millis(300));
        self.stop.store(true, Ordering::SeqCst);
        self.thread
            .take()
            .map(|t| t.join().expect("capture thread panicked"))
            .unwrap_or_default()
    }
}

impl Drop for IcmpCapture {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Runs probes concurrently (blocked paths cost a timeout each) and returns their results.
pub fn all<F>(probes: Vec<F>) -> Vec<bool>
where
    F: FnOnce() -> bool + Send + 'static,
{
    let handles: Vec<_> = probes.into_iter().map(std::thread::spawn).collect();
    handles
        .into_iter()
        .map(|h| h.join().expect("probe panicked"))
        .collect()
}

/// A TCP counter of `netns`, as `nstat` names it (`TcpExtTCPSynRetrans`, `TcpActiveOpens`):
/// from /proc/net/netstat and /proc/net/snmp as a thread inside the namespace sees them.
pub fn tcp_counter(netns: &str, name: &str) -> u64 {
    let (name, ns) = (name.to_string(), netns.to_string());
    in_netns(netns, move || {
        // thread-self: /proc/self/net would be the main thread's namespace.
        ["netstat", "snmp"]
            .iter()
            .filter_map(|f| std::fs::read_to_string(format!("/proc/thread-self/net/{f}")).ok())
            .find_map(|text| counter_in(&text, &name))
            .unwrap_or_else(|| panic!("no counter {name} in {ns}"))
    })
}

/// `name` in a /proc/net/{netstat,snmp} text: pairs of lines `Group: names...` and
/// `Group: values...`; `name` is the group followed by the field.
fn counter_in(text: &str, name: &str) -> Option<u64> {
    let lines: Vec<&str> = text.lines().collect();
    lines.chunks(2).find_map(|pair| {
        let [names, values] = pair else { return None };
        let (group, names) = names.split_once(": ")?;
        let (_, values) = values.split_once(": ")?;
        let field = name.strip_prefix(group)?;
        let at = names.split_whitespace().position(|n| n == field)?;
        values.split_whitespace().nth(at)?.parse().ok()
    })
}

/// The TCP sockets of `netns` in TIME_WAIT, as (local, remote) addresses.
pub fn time_wait_sockets(netns: &str) -> Vec<(SocketAddrV4, SocketAddrV4)> {
    in_netns(netns, || {
        let text = std::fs::read_to_string("/proc/thread-self/net/tcp").expect("/proc/net/tcp");
        text.lines().skip(1).filter_map(time_wait_entry).collect()
    })
}

/// One line of /proc/net/tcp (`sl local rem st ...`, addresses as host-order hex `IP:PORT`)
/// if its socket is in TIME_WAIT (state 06).
fn time_wait_entry(line: &str) -> Option<(SocketAddrV4, SocketAddrV4)> {
    let mut fields = line.split_whitespace().skip(1);
    let addr = |field: &str| {
        let (ip, port) = field.split_once(':')?;
        let ip = u32::from_str_radix(ip, 16).ok()?;
        let port = u16::from_str_radix(port, 16).ok()?;
        Some(SocketAddrV4::new(Ipv4Addr::from(ip.to_le_bytes()), port))
    };
    let local = addr(fields.next()?)?;
    let remote = addr(fields.next()?)?;
    (fields.next()? == "06").then_some((local, remote))
}

#[cfg(test)]
mod proc_net_tests {
    use super::*;

    #[test]
    fn counters_are_found_by_group_and_field() {
        let text =
            "TcpExt: SyncookiesSent TCPSynRetrans\nTcpExt: 0 17\nIpExt: InNoRoutes\nIpExt: 3\n";
        assert_eq!(counter_in(text, "TcpExtTCPSynRetrans"), Some(17));
        assert_eq!(counter_in(text, "IpExtInNoRoutes"), Some(3));
        assert_eq!(counter_in(text, "TcpExtNope"), None);
    }

    #[test]
    fn time_wait_lines_are_read_with_their_addresses() {
        let tw = "   0: 0300C80A:0050 0200C80A:9C40 06 00000000:00000000 03:00000F2A 00000000     0        0 0 3 0000000000000000";
        let listen = "   1: 00000000:3A98 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0000000000000000 100 0 0 10 0";
        assert_eq!(
            time_wait_entry(tw),
            Some((
                "10.200.0.3:80".parse().unwrap(),
                "10.200.0.2:40000".parse().unwrap()
            ))
        );
        assert_eq!(time_wait_entry(listen), None);
    }
}
