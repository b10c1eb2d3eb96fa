//! The proxy's edge: a transparent listener in the node namespace that the datapath assigns
//! redirected connections to, the upstream leg (marked with the client's identity and address
//! so the destination's own policy still judges the client, and pooled per worker for later
//! connections of the same client), and a report per request and per tunnel to the
//! [`Observer`].

use std::cell::RefCell;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use palisade_common::mark;
use palisade_policies::l7::ProxyPolicy;
use socket2::{Domain, SockRef, Socket, Type};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::watch;
use tracing::{debug, warn};

use crate::http::{self, Record, RequestRecord, TunnelRecord, Upstreams};
use crate::policy::ConnectionJudge;
use crate::pool::{IdlePool, PoolLimits};

/// Who hears what the proxy did: once per connection, then once per request on it and twice
/// per tunnel.
pub trait Observer: Clone + Send + Sync + 'static {
    type Connection: ConnectionObserver;
    /// A redirected connection from `client`, originally addressed to `destination`.
    fn connection(&self, client: SocketAddrV4, destination: SocketAddrV4) -> Self::Connection;
}

/// What one connection reports.
pub trait ConnectionObserver: Send + 'static {
    /// A request was answered: forwarded, denied or refused as malformed.
    fn request(&mut self, record: RequestRecord);
    /// A 101 turned the connection into a tunnel ([`TunnelEvent::Opened`]), or that tunnel
    /// ended ([`TunnelEvent::Closed`], with the bytes it relayed each way).
    ///
    /// [`TunnelEvent::Opened`]: http::TunnelEvent::Opened
    /// [`TunnelEvent::Closed`]: http::TunnelEvent::Closed
    fn tunnel(&mut self, record: TunnelRecord);
}

/// Binds the transparent listener: IP_TRANSPARENT lets it accept connections addressed to
/// other hosts (the original destinations), which the datapath steers to it.
pub fn bind_transparent(port: u16) -> std::io::Result<std::net::TcpListener> {
    let sock = Socket::new(Domain::IPV4, Type::STREAM, None)?;
    sock.set_reuse_address(true)?;
    sock.set_ip_transparent_v4(true)?;
    sock.bind(&SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)).into())?;
    sock.listen(1024)?;
    sock.set_nonblocking(true)?;
    Ok(sock.into())
}

/// What a connection needs beyond its socket.
#[derive(Clone)]
pub struct ProxyContext<O: Observer> {
    pub policy: watch::Receiver<Arc<ProxyPolicy>>,
    pub observer: O,
    pub limits: Arc<http::Limits>,
}

fn v4(addr: SocketAddr) -> Option<SocketAddrV4> {
    match addr {
        SocketAddr::V4(a) => Some(a),
        SocketAddr::V6(_) => None,
    }
}

/// Single-threaded runtimes, one per CPU, that own proxied connections. A connection and its
/// upstream leg live on one thread, so their wakeups never cross threads (nginx's worker
/// model); connections are dealt out round-robin.
pub struct Workers {
    handles: Vec<tokio::runtime::Handle>,
}

impl Workers {
    pub fn start(count: usize) -> std::io::Result<Workers> {
        let mut handles = Vec::new();
        for i in 0..count.max(1) {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            handles.push(rt.handle().clone());
            rt.spawn(close_expired_upstreams());
            std::thread::Builder::new()
                .name(format!("proxy-{i}"))
                .spawn(move || rt.block_on(std::future::pending::<()>()))?;
        }
        Ok(Workers { handles })
    }
}

/// Accepts redirected connections until the listener fails.
pub async fn run<O: Observer>(listener: TcpListener, ctx: ProxyContext<O>, workers: Workers) {
    let mut next = 0usize;
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let ctx = ctx.clone();
                // Re-registered with the worker's own reactor.
                let Ok(stream) = stream.into_std() else {
                    continue;
                };
                let worker = &workers.handles[next % workers.handles.len()];
                next = next.wrapping_add(1);
                worker.spawn(async move {
                    let Ok(stream) = TcpStream::from_std(stream) else {
                        return;
                    };
                    if let Err(e) = handle(stream, ctx).await {
                        debug!(error = %e, "proxied connection ended with an error");
                    }
                });
            }
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                warn!(error = %e, "proxy accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

async fn handle<O: Observer>(
    client: TcpStream,
    ctx: ProxyContext<O>,
) -> Result<(), http::ProxyError> {
    let (Some(peer), Some(dst)) = (
        client.peer_addr().ok().and_then(v4),
        // Transparently accepted: the local address is where the client was going.
        client.local_addr().ok().and_then(v4),
    ) else {
        return Ok(());
    };
    let _ = client.set_nodelay(true);
    let client_identity = ctx.policy.borrow().peer(*peer.ip()).identity.0;
    let upstreams = PooledUpstreams {
        key: UpstreamKey {
            mark: mark::from_proxy(client_identity),
            priority: mark::client_priority(peer.ip().octets()),
            destination: dst,
        },
        policy: ctx.policy.clone(),
        opened_under: Weak::new(),
    };
    let judge = ConnectionJudge::new(ctx.policy.clone(), peer, dst);
    let mut observer = ctx.observer.connection(peer, dst);
    http::serve_connection(
        client,
        upstreams,
        |head| judge.judge(head),
        |record| match record {
            Record::Request(r) => observer.request(r),
            Record::Tunnel(t) => observer.tunnel(t),
        },
        &ctx.limits,
    )
    .await
}

/// Who may reuse an upstream connection: everything the destination's datapath judged it by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct UpstreamKey {
    /// The client's identity (see `mark::from_proxy`).
    mark: u32,
    /// The client's address (see `mark::client_priority`).
    priority: u32,
    destination: SocketAddrV4,
}

/// An idle upstream connection and the policy it was opened under.
struct IdleUpstream {
    stream: TcpStream,
    /// Held weakly: compared by address only, and the allocation (not the policy) stays
    /// while this does, so no later policy can take the address.
    opened_under: Weak<ProxyPolicy>,
}

thread_local! {
    /// The idle upstream connections of this worker, whose reactor they are registered with.
    /// Only touched between awaits, so never borrowed twice.
    static IDLE_UPSTREAMS: RefCell<IdlePool<UpstreamKey, IdleUpstream>> =
        RefCell::new(IdlePool::new(PoolLimits::default()));
}

/// How often a worker closes the upstream connections idle past the pool's timeout.
const IDLE_SWEEP: Duration = Duration::from_secs(1);

async fn close_expired_upstreams() {
    let mut tick = tokio::time::interval(IDLE_SWEEP);
    loop {
        tick.tick().await;
        let expired = IDLE_UPSTREAMS.with(|pool| pool.borrow_mut().expire(Instant::now()));
        drop(expired);
    }
}

/// The upstream connections of one client connection: taken from and given back to the
/// worker's pool. Only a connection opened under the policy current now is reused: any
/// policy change may change how the datapath judges it (its next packet is revalidated, and
/// a denied one would stall rather than fail), so the next request opens one that is judged
/// afresh.
struct PooledUpstreams {
    key: UpstreamKey,
    policy: watch::Receiver<Arc<ProxyPolicy>>,
    /// The policy the connection in use was opened under.
    opened_under: Weak<ProxyPolicy>,
}

impl PooledUpstreams {
    fn current_policy(&self) -> Arc<ProxyPolicy> {
        Arc::clone(&self.policy.borrow())
    }
}

impl Upstreams for PooledUpstreams {
    type Stream = TcpStream;

    fn take_idle(&mut self) -> Option<TcpStream> {
        let current = self.current_policy();
        let idle = IDLE_UPSTREAMS.with(|pool| {
            pool.borrow_mut().take(&self.key, Instant::now(), |idle| {
                std::ptr::eq(idle.opened_under.as_ptr(), Arc::as_ptr(&current))
            })
        })?;
        self.opened_under = idle.opened_under;
        Some(idle.stream)
    }

    fn connect(&mut self) -> impl Future<Output = std::io::Result<TcpStream>> + Send {
        self.opened_under = Arc::downgrade(&self.current_policy());
        let UpstreamKey {
            mark,
            priority,
            destination,
        } = self.key;
        async move {
            let sock = TcpSocket::new_v4()?;
            // The destination's datapath judges the client by these: its identity in the
            // mark, its address in the priority (for the CIDR rules that cover it).
            SockRef::from(&sock).set_mark(mark)?;
            SockRef::from(&sock).set_priority(priority)?;
            let stream = sock.connect(SocketAddr::V4(destination)).await?;
            stream.set_nodelay(true)?;
            Ok(stream)
        }
    }

    fn release(&mut self, stream: TcpStream) {
        let current = self.current_policy();
        if !std::ptr::eq(self.opened_under.as_ptr(), Arc::as_ptr(&current)) {
            return;
        }
        let idle = IdleUpstream {
            stream,
            opened_under: std::mem::take(&mut self.opened_under),
        };
        // No room: it is closed here.
        let _ = IDLE_UPSTREAMS.with(|pool| pool.borrow_mut().put(self.key, idle, Instant::now()));
    }
}
