//! The DNS proxy's edge: one transparent UDP socket and one transparent TCP listener on the
//! proxy port in the node namespace, which the datapath assigns redirected DNS to. For each
//! query: read it, judge its name by the client's `rules.dns`, answer REFUSED or forward it
//! to the server the client asked (marked with the client's identity and address, as the
//! HTTP proxy's upstream leg is), read the answer, hand its addresses to the [`Learner`] and
//! wait for it (the engine writes them into the ipcache and policy maps), and only then send
//! the answer on. The UDP answer leaves with the server's address and port as its source, so
//! to the client it is the server's own.
//!
//! Fails closed: a query that cannot be read is dropped; an answer that cannot be read, or
//! whose addresses cannot be learned, becomes SERVFAIL, so the client never holds an address
//! its policy would not let it reach.

use std::future::Future;
use std::io::IoSliceMut;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::socket::{ControlMessageOwned, MsgFlags, SockaddrIn, recvmsg, setsockopt, sockopt};
use palisade_common::mark;
use palisade_policies::l7::DnsPolicy;
use palisade_policies::mapstate::RuleId;
use socket2::{Domain, SockRef, Socket, Type};
use tokio::io::Interest;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream, UdpSocket};
use tokio::sync::{Semaphore, watch};
use tracing::{debug, warn};

use crate::message::{self, DnsError, MAX_TCP_MESSAGE, MAX_UDP_MESSAGE, Query};

/// How a query came.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    Udp,
    Tcp,
}

impl Transport {
    pub fn protocol(self) -> u8 {
        match self {
            Transport::Udp => 17,
            Transport::Tcp => 6,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Udp => "UDP",
            Transport::Tcp => "TCP",
        }
    }
}

/// What the proxy did with a query.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Forwarded; the answer (with its addresses learned) was released.
    Answered,
    /// Its name is not allowed: answered REFUSED.
    Refused,
    /// Forwarded, but the answer never came or could not be used: answered SERVFAIL.
    Failed(String),
    /// Not a query the proxy can judge: dropped.
    Malformed(DnsError),
    /// Too many queries in flight: dropped.
    Overloaded,
}

/// One query's report.
#[derive(Clone, Debug)]
pub struct QueryRecord {
    pub client: SocketAddrV4,
    pub server: SocketAddrV4,
    pub transport: Transport,
    /// Empty when the query could not be read.
    pub name: String,
    pub qtype: String,
    pub outcome: Outcome,
    /// The server's response code (or the proxy's own: `Refused`, `ServFail`).
    pub rcode: Option<String>,
    pub answers: Vec<Ipv4Addr>,
    pub ttl: u32,
    pub rule: RuleId,
    /// From the query's arrival to its answer's release (learning included).
    pub took: Duration,
    /// Of that, the time the learner took.
    pub learn_took: Duration,
}

/// Who hears what the proxy did.
pub trait Observer: Clone + Send + Sync + 'static {
    fn query(&self, record: QueryRecord);
}

/// Addresses an answer vouches for, for the engine to learn.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Learned {
    /// The endpoint that asked.
    pub client: Ipv4Addr,
    /// The question's name and its CNAME chain.
    pub names: Vec<String>,
    pub addresses: Vec<Ipv4Addr>,
    pub ttl: u32,
}

/// Why a learner did not take an answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LearnError {
    #[error("the agent is shutting down")]
    Gone,
    #[error("the engine did not take the addresses: {0}")]
    Refused(String),
}

/// Who writes learned addresses where the datapath sees them. `learn` returns once the
/// datapath enforces them.
pub trait Learner: Clone + Send + Sync + 'static {
    fn learn(&self, learned: Learned) -> impl Future<Output = Result<(), LearnError>> + Send;
}

/// Bounds of the proxy.
#[derive(Clone, Debug)]
pub struct Limits {
    /// How long a server has to answer.
    pub upstream_timeout: Duration,
    /// Queries handled at once; beyond it they are dropped (and counted).
    pub in_flight: usize,
    /// How long a TCP connection may sit idle between queries.
    pub tcp_idle: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            upstream_timeout: Duration::from_secs(5),
            in_flight: 4_096,
            tcp_idle: Duration::from_secs(10),
        }
    }
}

/// What every query is handled with.
#[derive(Clone)]
pub struct DnsContext<L: Learner, O: Observer> {
    pub policy: watch::Receiver<Arc<DnsPolicy>>,
    pub learner: L,
    pub observer: O,
    pub limits: Arc<Limits>,
}

fn transparent_socket(ty: Type, port: u16) -> std::io::Result<Socket> {
    let sock = Socket::new(Domain::IPV4, ty, None)?;
    sock.set_reuse_address(true)?;
    sock.set_ip_transparent_v4(true)?;
    sock.bind(&SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)).into())?;
    sock.set_nonblocking(true)?;
    Ok(sock)
}

/// The UDP socket: transparent (it receives datagrams addressed to other hosts, and answers
/// as them), and told each datagram's original destination.
pub fn bind_udp(port: u16) -> std::io::Result<std::net::UdpSocket> {
    let sock = transparent_socket(Type::DGRAM, port)?;
    setsockopt(&sock, sockopt::Ipv4OrigDstAddr, &true)?;
    Ok(sock.into())
}

/// The TCP listener, transparent as the HTTP proxy's.
pub fn bind_tcp(port: u16) -> std::io::Result<std::net::TcpListener> {
    let sock = transparent_socket(Type::STREAM, port)?;
    sock.listen(1024)?;
    Ok(sock.into())
}

/// The mark and priority of the upstream leg: the server's datapath judges the client by them.
fn upstream_marks(policy: &DnsPolicy, client: Ipv4Addr) -> (u32, u32) {
    let identity = policy.peer(client).identity.0;
    (
        mark::from_proxy(identity),
        mark::client_priority(client.octets()),
    )
}

/// Everything one query goes through, whatever its transport; `forward` sends the query to
/// the server and returns its answer. Returns what to send the client, if anything.
async fn handle<L: Learner, O: Observer, F, Fut>(
    ctx: &DnsContext<L, O>,
    client: SocketAddrV4,
    server: SocketAddrV4,
    transport: Transport,
    bytes: &[u8],
    forward: F,
) -> Option<Vec<u8>>
where
    F: FnOnce(Vec<u8>) -> Fut,
    Fut: Future<Output = std::io::Result<Vec<u8>>>,
{
    let started = Instant::now();
    let mut record = QueryRecord {
        client,
        server,
        transport,
        name: String::new(),
        qtype: String::new(),
        outcome: Outcome::Answered,
        rcode: None,
        answers: Vec::new(),
        ttl: 0,
        rule: RuleId::NONE,
        took: Duration::ZERO,
        learn_took: Duration::ZERO,
    };
    let query = match message::parse_query(bytes) {
        Ok(q) => q,
        Err(e) => {
            record.outcome = Outcome::Malformed(e);
            record.took = started.elapsed();
            ctx.observer.query(record);
            return None;
        }
    };
    record.name.clone_from(&query.question.name);
    record.qtype = query.question.type_name();
    let verdict = ctx.policy.borrow().judge(
        *client.ip(),
        server,
        transport.protocol(),
        &query.question.name,
    );
    record.rule = verdict.rule;
    let reply = if verdict.allowed {
        resolve(ctx, &query, &mut record, bytes, forward).await
    } else {
        record.outcome = Outcome::Refused;
        record.rcode = Some("Refused".into());
        query.refused().ok()
    };
    record.took = started.elapsed();
    ctx.observer.query(record);
    reply
}

/// Forwards an allowed query and learns its answer before handing it back.
async fn resolve<L: Learner, O: Observer, F, Fut>(
    ctx: &DnsContext<L, O>,
    query: &Query,
    record: &mut QueryRecord,
    bytes: &[u8],
    forward: F,
) -> Option<Vec<u8>>
where
    F: FnOnce(Vec<u8>) -> Fut,
    Fut: Future<Output = std::io::Result<Vec<u8>>>,
{
    let fail = |record: &mut QueryRecord, why: String| {
        record.outcome = Outcome::Failed(why);
        record.rcode = Some("ServFail".into());
        query.servfail().ok()
    };
    let answer_bytes =
        match tokio::time::timeout(ctx.limits.upstream_timeout, forward(bytes.to_vec())).await {
            Ok(Ok(b)) => b,
            Ok(Err(e)) => return fail(record, format!("the server did not answer: {e}")),
            Err(_) => return fail(record, "the server did not answer in time".into()),
        };
    let answer = match message::parse_answer(&answer_bytes, &query.question) {
        Ok(a) => a,
        Err(e) => return fail(record, format!("the server's answer was refused: {e}")),
    };
    record.rcode = Some(answer.rcode.clone());
    record.answers.clone_from(&answer.addresses);
    record.ttl = answer.ttl;
    if !answer.addresses.is_empty() {
        let learn_started = Instant::now();
        let learned = ctx
            .learner
            .learn(Learned {
                client: *record.client.ip(),
                names: answer.names,
                addresses: answer.addresses,
                ttl: answer.ttl,
            })
            .await;
        record.learn_took = learn_started.elapsed();
        if let Err(e) = learned {
            return fail(
                record,
                format!("the answer's addresses were not learned: {e}"),
            );
        }
    }
    record.outcome = Outcome::Answered;
    Some(answer_bytes)
}

/// One datagram as the transparent socket received it.
struct Datagram {
    len: usize,
    client: SocketAddrV4,
    /// Where the client sent it.
    server: SocketAddrV4,
}

fn recv_datagram(sock: &UdpSocket, buf: &mut [u8]) -> std::io::Result<Datagram> {
    let mut iov = [IoSliceMut::new(buf)];
    let mut cmsg = nix::cmsg_space!(libc::sockaddr_in);
    let msg = recvmsg::<SockaddrIn>(
        sock.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::MSG_TRUNC,
    )?;
    let client = msg
        .address
        .map(|a| SocketAddrV4::new(a.ip(), a.port()))
        .ok_or_else(|| std::io::Error::other("datagram without a source"))?;
    let mut server = None;
    for c in msg.cmsgs()? {
        if let ControlMessageOwned::Ipv4OrigDstAddr(a) = c {
            let a = SockaddrIn::from(a);
            server = Some(SocketAddrV4::new(a.ip(), a.port()));
        }
    }
    let server = server.ok_or_else(|| std::io::Error::other("datagram without its destination"))?;
    Ok(Datagram {
        len: msg.bytes,
        client,
        server,
    })
}

/// Sends `bytes` to `client` from `server`'s address and port, so the answer is the
/// server's own to the client (and to conntrack): a transparent socket bound to it, just for
/// this datagram.
fn send_as(bytes: &[u8], server: SocketAddrV4, client: SocketAddrV4) -> std::io::Result<usize> {
    let sock = Socket::new(Domain::IPV4, Type::DGRAM, None)?;
    sock.set_reuse_address(true)?;
    sock.set_ip_transparent_v4(true)?;
    sock.bind(&SocketAddr::V4(server).into())?;
    sock.send_to(bytes, &SocketAddr::V4(client).into())
}

/// Asks `server` over UDP from a fresh socket (a random port, so answers cannot be guessed),
/// keeping only a datagram from the server that carries the query's id.
async fn ask_udp(
    server: SocketAddrV4,
    marks: (u32, u32),
    query: Vec<u8>,
) -> std::io::Result<Vec<u8>> {
    let sock = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).await?;
    SockRef::from(&sock).set_mark(marks.0)?;
    SockRef::from(&sock).set_priority(marks.1)?;
    sock.connect(server).await?;
    sock.send(&query).await?;
    let mut buf = vec![0u8; MAX_TCP_MESSAGE];
    loop {
        let n = sock.recv(&mut buf).await?;
        if n >= 2 && buf[..2] == query[..2] {
            buf.truncate(n);
            return Ok(buf);
        }
    }
}

/// Serves the UDP socket until it fails.
pub async fn run_udp<L: Learner, O: Observer>(sock: UdpSocket, ctx: DnsContext<L, O>) {
    let sock = Arc::new(sock);
    let permits = Arc::new(Semaphore::new(ctx.limits.in_flight));
    let mut buf = vec![0u8; MAX_UDP_MESSAGE + 1];
    loop {
        let got = sock
            .async_io(Interest::READABLE, || recv_datagram(&sock, &mut buf))
            .await;
        let d = match got {
            Ok(d) => d,
            Err(e) => {
                warn!(error = %e, "DNS proxy: receiving failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        // A datagram longer than the buffer is no DNS the proxy takes; its length says so.
        let bytes = buf[..d.len.min(buf.len())].to_vec();
        let oversized = d.len > MAX_UDP_MESSAGE;
        let Ok(permit) = Arc::clone(&permits).try_acquire_owned() else {
            ctx.observer.query(QueryRecord {
                client: d.client,
                server: d.server,
                transport: Transport::Udp,
                name: String::new(),
                qtype: String::new(),
                outcome: Outcome::Overloaded,
                rcode: None,
                answers: Vec::new(),
                ttl: 0,
                rule: RuleId::NONE,
                took: Duration::ZERO,
                learn_took: Duration::ZERO,
            });
            continue;
        };
        let ctx = ctx.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let bytes = if oversized { vec![0u8; d.len] } else { bytes };
            let marks = upstream_marks(&ctx.policy.borrow(), *d.client.ip());
            let reply = handle(&ctx, d.client, d.server, Transport::Udp, &bytes, |q| {
                ask_udp(d.server, marks, q)
            })
            .await;
            if let Some(reply) = reply
                && let Err(e) = send_as(&reply, d.server, d.client)
            {
                debug!(client = %d.client, error = %e, "DNS proxy: answer not sent");
            }
        });
    }
}

async fn read_frame(stream: &mut TcpStream) -> std::io::Result<Option<Vec<u8>>> {
    let mut len = [0u8; 2];
    match stream.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let mut buf = vec![0u8; usize::from(u16::from_be_bytes(len))];
    stream.read_exact(&mut buf).await?;
    Ok(Some(buf))
}

async fn write_frame(stream: &mut TcpStream, bytes: &[u8]) -> std::io::Result<()> {
    let len = u16::try_from(bytes.len())
        .map_err(|_| std::io::Error::other("a DNS message longer than TCP can frame"))?;
    let mut out = Vec::with_capacity(bytes.len() + 2);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(bytes);
    stream.write_all(&out).await
}

/// One redirected TCP connection: queries one after another, each forwarded on one
/// upstream connection to the server, opened at the first allowed query.
async fn serve_tcp<L: Learner, O: Observer>(
    mut client: TcpStream,
    ctx: DnsContext<L, O>,
) -> std::io::Result<()> {
    let (SocketAddr::V4(peer), SocketAddr::V4(server)) =
        (client.peer_addr()?, client.local_addr()?)
    else {
        return Ok(());
    };
    let marks = upstream_marks(&ctx.policy.borrow(), *peer.ip());
    let mut upstream: Option<TcpStream> = None;
    loop {
        let frame = match tokio::time::timeout(ctx.limits.tcp_idle, read_frame(&mut client)).await {
            Ok(Ok(Some(f))) => f,
            Ok(Ok(None)) | Err(_) => return Ok(()),
            Ok(Err(e)) => return Err(e),
        };
        let up = &mut upstream;
        let reply = handle(&ctx, peer, server, Transport::Tcp, &frame, |q| async move {
            if up.is_none() {
                let sock = TcpSocket::new_v4()?;
                SockRef::from(&sock).set_mark(marks.0)?;
                SockRef::from(&sock).set_priority(marks.1)?;
                *up = Some(sock.connect(SocketAddr::V4(server)).await?);
            }
            let stream = up
                .as_mut()
                .ok_or_else(|| std::io::Error::other("no upstream"))?;
            write_frame(stream, &q).await?;
            read_frame(stream)
                .await?
                .ok_or_else(|| std::io::Error::other("the server closed the connection"))
        })
        .await;
        match reply {
            Some(r) => write_frame(&mut client, &r).await?,
            // What cannot be read ends the connection: its framing cannot be trusted either.
            None => return Ok(()),
        }
    }
}

/// Accepts redirected TCP connections until the listener fails.
pub async fn run_tcp<L: Learner, O: Observer>(listener: TcpListener, ctx: DnsContext<L, O>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let ctx = ctx.clone();
                tokio::spawn(async move {
                    if let Err(e) = serve_tcp(stream, ctx).await {
                        debug!(error = %e, "DNS proxy: TCP connection ended with an error");
                    }
                });
            }
            Err(e) => {
                warn!(error = %e, "DNS proxy: accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use hickory_proto::rr::RecordType;
    use palisade_policies::compile::{DnsRule, L7Policy};
    use palisade_policies::endpoint::EndpointId;
    use palisade_policies::fqdn::FqdnSelector;
    use palisade_policies::identity::Identity;
    use palisade_policies::mapstate::{IpcacheEntry, MapState, PortPrefix};

    use super::*;
    use crate::message::tests::{answer_bytes, query_bytes};

    #[derive(Clone, Default)]
    struct Recorder {
        learned: Arc<Mutex<Vec<Learned>>>,
        records: Arc<Mutex<Vec<QueryRecord>>>,
        refuse_learning: bool,
    }

    impl Learner for Recorder {
        async fn learn(&self, learned: Learned) -> Result<(), LearnError> {
            if self.refuse_learning {
                return Err(LearnError::Refused("full".into()));
            }
            self.learned.lock().unwrap().push(learned);
            Ok(())
        }
    }

    impl Observer for Recorder {
        fn query(&self, record: QueryRecord) {
            self.records.lock().unwrap().push(record);
        }
    }

    const CLIENT: &str = "10.0.0.2:4000";
    const SERVER: &str = "10.0.0.53:53";

    fn ctx(rec: Recorder) -> DnsContext<Recorder, Recorder> {
        let mut l7 = L7Policy::default();
        l7.dns.insert(
            EndpointId(1),
            vec![DnsRule {
                keys: vec![(Identity::ANY, Some(17), PortPrefix::exact(53))],
                names: Some(vec![FqdnSelector::name("api.example.test").unwrap()]),
                rule: RuleId(4),
            }],
        );
        let mut state = MapState::default();
        state.ipcache.insert(
            "10.0.0.2/32".parse().unwrap(),
            IpcacheEntry {
                identity: Identity(256),
                endpoint: Some(EndpointId(1)),
                cidr_identity: None,
            },
        );
        let (_tx, policy) = watch::channel(Arc::new(DnsPolicy::new(&l7, &state)));
        DnsContext {
            policy,
            learner: rec.clone(),
            observer: rec,
            limits: Arc::new(Limits::default()),
        }
    }

    fn a_record(name: &str, ip: [u8; 4], ttl: u32) -> hickory_proto::rr::Record {
        hickory_proto::rr::Record::from_rdata(
            std::str::FromStr::from_str(name).unwrap(),
            ttl,
            hickory_proto::rr::RData::A(hickory_proto::rr::rdata::A(ip.into())),
        )
    }

    async fn run_query(
        rec: &Recorder,
        name: &str,
        upstream: std::io::Result<Vec<u8>>,
    ) -> Option<hickory_proto::op::Message> {
        let ctx = ctx(rec.clone());
        let q = query_bytes(11, name, RecordType::A);
        let reply = handle(
            &ctx,
            CLIENT.parse().unwrap(),
            SERVER.parse().unwrap(),
            Transport::Udp,
            &q,
            |_| async move { upstream },
        )
        .await?;
        Some(hickory_proto::op::Message::from_vec(&reply).unwrap())
    }

    #[tokio::test]
    async fn an_allowed_answer_is_learned_before_it_is_released() {
        let rec = Recorder::default();
        let answer = answer_bytes(
            11,
            "api.example.test.",
            vec![a_record("api.example.test.", [192, 0, 2, 7], 30)],
        );
        let reply = run_query(&rec, "api.example.test.", Ok(answer))
            .await
            .unwrap();
        assert_eq!(reply.answers.len(), 1);
        let learned = rec.learned.lock().unwrap().clone();
        assert_eq!(
            learned,
            vec![Learned {
                client: Ipv4Addr::new(10, 0, 0, 2),
                names: vec!["api.example.test".into()],
                addresses: vec![Ipv4Addr::new(192, 0, 2, 7)],
                ttl: 30,
            }]
        );
        let r = rec.records.lock().unwrap()[0].clone();
        assert_eq!((r.outcome, r.rule), (Outcome::Answered, RuleId(4)));
    }

    #[tokio::test]
    async fn a_name_no_rule_allows_is_refused_without_asking_the_server() {
        let rec = Recorder::default();
        let reply = run_query(&rec, "evil.test.", Err(std::io::Error::other("not asked")))
            .await
            .unwrap();
        assert_eq!(
            reply.metadata.response_code,
            hickory_proto::op::ResponseCode::Refused
        );
        let r = rec.records.lock().unwrap()[0].clone();
        assert_eq!(r.outcome, Outcome::Refused);
        assert_eq!(r.name, "evil.test");
        assert!(rec.learned.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn an_answer_that_cannot_be_learned_becomes_servfail() {
        let rec = Recorder {
            refuse_learning: true,
            ..Recorder::default()
        };
        let answer = answer_bytes(
            11,
            "api.example.test.",
            vec![a_record("api.example.test.", [192, 0, 2, 7], 30)],
        );
        let reply = run_query(&rec, "api.example.test.", Ok(answer))
            .await
            .unwrap();
        assert_eq!(
            reply.metadata.response_code,
            hickory_proto::op::ResponseCode::ServFail
        );
        assert!(
            reply.answers.is_empty(),
            "the addresses never reach the client"
        );
    }

    #[tokio::test]
    async fn a_garbled_answer_becomes_servfail_and_a_garbled_query_is_dropped() {
        let rec = Recorder::default();
        let reply = run_query(&rec, "api.example.test.", Ok(vec![1, 2, 3]))
            .await
            .unwrap();
        assert_eq!(
            reply.metadata.response_code,
            hickory_proto::op::ResponseCode::ServFail
        );
        let ctx = ctx(rec.clone());
        let dropped = handle(
            &ctx,
            CLIENT.parse().unwrap(),
            SERVER.parse().unwrap(),
            Transport::Udp,
            &[0xff; 7],
            |_| async { Ok(vec![]) },
        )
        .await;
        assert!(dropped.is_none());
        assert!(matches!(
            rec.records.lock().unwrap().last().unwrap().outcome,
            Outcome::Malformed(_)
        ));
    }
}
