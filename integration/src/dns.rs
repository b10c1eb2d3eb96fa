//! DNS fixtures: dnsmasq as a real resolver inside an endpoint's namespace, a "world" namespace
//! outside the cluster that owns a whole /24 (so any address a DNS answer names there is a
//! reachable server), and a small DNS client that asks from inside an endpoint's namespace.

use std::io::{Read as _, Write as _};
use std::net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::str::FromStr;
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, MessageType, OpCode, Query};
use hickory_proto::rr::{Name, RData, RecordType};

use crate::node::{Node, ip};
use crate::traffic::{PROBE_TIMEOUT, in_netns};

/// The prefix the world namespace answers for.
pub const WORLD_NET: &str = "192.0.2.0/24";

/// dnsmasq serving fixed answers inside a namespace, until dropped.
pub struct Resolver {
    child: Child,
}

impl Drop for Resolver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts dnsmasq in `netns` on `addr`:53 (UDP and TCP), answering each `(name, address)`
/// with that A record and TTL `ttl`, and nothing else (REFUSED is the proxy's; unknown names
/// get NXDOMAIN from dnsmasq).
pub fn resolver(
    netns: &str,
    addr: Ipv4Addr,
    ttl: u32,
    records: &[(&str, Ipv4Addr)],
    dir: &Path,
) -> Resolver {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", netns, "dnsmasq", "--keep-in-foreground"])
        .arg("--conf-file=/dev/null")
        .arg("--no-resolv")
        .arg("--no-hosts")
        .arg("--bind-interfaces")
        .arg(format!("--listen-address={addr}"))
        .arg("--port=53")
        .arg("--user=root")
        .arg(format!("--pid-file={}", dir.join("dnsmasq.pid").display()))
        .arg(format!("--local-ttl={ttl}"))
        .arg("--log-facility=-");
    for (name, a) in records {
        cmd.arg(format!("--host-record={name},{a}"));
    }
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("starting dnsmasq (apt-get install dnsmasq-base): {e}"));
    let r = Resolver { child };
    // Ready once it answers (directly, from its own namespace).
    let deadline = Instant::now() + Duration::from_secs(10);
    let probe = records.first().map_or("localhost", |(n, _)| n).to_string();
    while Instant::now() < deadline {
        if query(netns, addr, &probe, false).is_some() {
            return r;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("dnsmasq did not come up in {netns}");
}

/// A namespace outside the cluster, joined to the node by a veth, that takes every address
/// of `WORLD_NET` as its own.
pub fn world(node: &Node) -> String {
    world_with(node, &[WORLD_NET])
}

/// Like `world`, taking `extra` prefixes too (each routed there by the node).
pub fn world_with(node: &Node, prefixes: &[&str]) -> String {
    let netns = format!("{}-world", node.tag);
    let (outer, inner) = (format!("{}-wo", node.tag), format!("{}-wi", node.tag));
    let run = |args: &[&str]| {
        let out = ip(args);
        assert!(
            out.status.success(),
            "ip {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(&["netns", "add", &netns]);
    node.track_netns(&netns);
    run(&[
        "-n",
        &node.netns,
        "link",
        "add",
        &outer,
        "type",
        "veth",
        "peer",
        "name",
        &inner,
        "netns",
        &netns,
    ]);
    // The link has addresses of its own, so that the prefixes the namespace takes as its own
    // never include its gateway.
    run(&[
        "-n",
        &node.netns,
        "addr",
        "add",
        "172.31.255.1/30",
        "dev",
        &outer,
    ]);
    run(&["-n", &node.netns, "link", "set", &outer, "up"]);
    run(&["-n", &netns, "link", "set", "lo", "up"]);
    run(&["-n", &netns, "link", "set", &inner, "up"]);
    run(&[
        "-n",
        &netns,
        "addr",
        "add",
        "172.31.255.2/30",
        "dev",
        &inner,
    ]);
    run(&[
        "-n",
        &netns,
        "route",
        "add",
        "default",
        "via",
        "172.31.255.1",
    ]);
    // Every address of the prefixes is local there: one server on 0.0.0.0 answers them all.
    for prefix in prefixes {
        run(&[
            "-n", &netns, "route", "add", "local", prefix, "dev", "lo", "table", "local",
        ]);
        run(&[
            "-n",
            &node.netns,
            "route",
            "add",
            prefix,
            "via",
            "172.31.255.2",
        ]);
    }
    netns
}

/// What an answer said: its response code and A records.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    pub rcode: String,
    pub addresses: Vec<Ipv4Addr>,
}

/// A standard query for `name`'s A records.
pub fn build_query(id: u16, name: &str) -> Vec<u8> {
    let mut m = Message::new(id, MessageType::Query, OpCode::Query);
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(
        Name::from_str(&format!("{name}.")).expect("name"),
        RecordType::A,
    ));
    m.to_vec().expect("encode")
}

/// The response code and A records of an answer.
pub fn read_reply(bytes: &[u8]) -> Option<Reply> {
    let m = Message::from_vec(bytes).ok()?;
    Some(Reply {
        rcode: format!("{:?}", m.metadata.response_code),
        addresses: m
            .answers
            .iter()
            .filter_map(|r| match &r.data {
                RData::A(a) => Some(a.0),
                _ => None,
            })
            .collect(),
    })
}

/// Asks `server` for `name`'s A records from inside `netns`, over UDP or TCP; None when no
/// answer came.
pub fn query(netns: &str, server: Ipv4Addr, name: &str, tcp: bool) -> Option<Reply> {
    let name = name.to_string();
    in_netns(netns, move || {
        let id = u16::try_from(std::process::id() % 60_000).unwrap_or(1) + 1;
        let q = build_query(id, &name);
        let addr = SocketAddr::from((server, 53));
        if tcp {
            let mut s = TcpStream::connect_timeout(&addr, PROBE_TIMEOUT).ok()?;
            s.set_read_timeout(Some(PROBE_TIMEOUT)).ok()?;
            let mut framed = u16::try_from(q.len()).ok()?.to_be_bytes().to_vec();
            framed.extend_from_slice(&q);
            s.write_all(&framed).ok()?;
            let mut len = [0u8; 2];
            s.read_exact(&mut len).ok()?;
            let mut buf = vec![0u8; usize::from(u16::from_be_bytes(len))];
            s.read_exact(&mut buf).ok()?;
            read_reply(&buf)
        } else {
            let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).ok()?;
            s.set_read_timeout(Some(PROBE_TIMEOUT)).ok()?;
            s.send_to(&q, addr).ok()?;
            let mut buf = [0u8; 4096];
            let (n, from) = s.recv_from(&mut buf).ok()?;
            // The answer must come from the server itself, port 53: the proxy is transparent.
            (from == addr).then(|| read_reply(&buf[..n])).flatten()
        }
    })
}

/// Sends raw bytes to `server`:53 over UDP from inside `netns`; whether anything came back.
pub fn udp_raw_answered(netns: &str, server: Ipv4Addr, bytes: Vec<u8>) -> bool {
    in_netns(netns, move || {
        let Ok(s) = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_millis(700)));
        if s.send_to(&bytes, (server, 53)).is_err() {
            return false;
        }
        let mut buf = [0u8; 512];
        s.recv_from(&mut buf).is_ok()
    })
}

/// What a paced burst of lookups saw.
#[derive(Clone, Debug, Default)]
pub struct PacedBurst {
    /// From the first lookup to the last connection.
    pub seconds: f64,
    /// Lookups answered with exactly the address their name has.
    pub answered: usize,
    /// Of those, connections to the answered address not made within a second (a dropped
    /// first SYN is retransmitted only after one).
    pub first_connections_dropped: usize,
    /// Each answered lookup's time, sorted.
    pub lookups: Vec<Duration>,
}

/// Looks `names` up from `netns` at `server`, paced at `per_second` lookups in all from
/// `workers` UDP sockets (one thread each), each lookup followed at once by a TCP connection
/// to the address it returned on `port`; a socket's next lookup waits for both. Each name's
/// expected address comes with it: another answer counts as unanswered.
pub fn paced_burst(
    netns: &str,
    server: Ipv4Addr,
    names: &[(String, Ipv4Addr)],
    per_second: u32,
    workers: usize,
    port: u16,
) -> PacedBurst {
    let started = Instant::now();
    let every = Duration::from_secs(1) / per_second.max(1);
    let handles: Vec<_> = (0..workers.max(1))
        .map(|w| {
            let netns = netns.to_string();
            let mine: Vec<(usize, String, Ipv4Addr)> = names
                .iter()
                .enumerate()
                .skip(w)
                .step_by(workers.max(1))
                .map(|(i, (n, a))| (i, n.clone(), *a))
                .collect();
            std::thread::spawn(move || {
                in_netns(&netns, move || {
                    let mut out = PacedBurst::default();
                    let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).expect("socket");
                    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                    s.connect((server, 53)).expect("connect");
                    let mut buf = [0u8; 1500];
                    let t0 = Instant::now();
                    for (i, name, addr) in mine {
                        let due = t0 + every * u32::try_from(i).unwrap_or(u32::MAX);
                        if let Some(wait) = due.checked_duration_since(Instant::now()) {
                            std::thread::sleep(wait);
                        }
                        let q = build_query(u16::try_from(i % 65_000).unwrap_or(0), &name);
                        let t = Instant::now();
                        let reply = s
                            .send(&q)
                            .ok()
                            .and_then(|_| s.recv(&mut buf).ok())
                            .and_then(|n| read_reply(&buf[..n]));
                        if reply.is_none_or(|r| r.addresses != [addr]) {
                            continue;
                        }
                        out.lookups.push(t.elapsed());
                        out.answered += 1;
                        if TcpStream::connect_timeout(
                            &SocketAddr::from((addr, port)),
                            Duration::from_secs(1),
                        )
                        .is_err()
                        {
                            out.first_connections_dropped += 1;
                        }
                    }
                    out
                })
            })
        })
        .collect();
    let mut all = PacedBurst::default();
    for h in handles {
        let part = h.join().unwrap_or_default();
        all.answered += part.answered;
        all.first_connections_dropped += part.first_connections_dropped;
        all.lookups.extend(part.lookups);
    }
    all.lookups.sort();
    all.seconds = started.elapsed().as_secs_f64();
    all
}
