//! The proxy's edge: a transparent listener in the node namespace that the datapath assigns
//! redirected connections to, the upstream leg (marked with the client's identity and address
//! so the destination's own policy still judges the client), and a report per request and per
//! tunnel to the [`Observer`].

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;

use palisade_common::mark;
use palisade_policies::l7::ProxyPolicy;
use socket2::{Domain, SockRef, Socket, Type};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::watch;
use tracing::{debug, warn};

use crate::http::{self, Record, RequestRecord, TunnelRecord};
use crate::policy::ConnectionJudge;

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
    let upstream_mark = mark::from_proxy(client_identity);
    let upstream_priority = mark::client_priority(peer.ip().octets());
    let connect = move || async move {
        let sock = TcpSocket::new_v4()?;
        // The destination's datapath judges the client by these: its identity in the mark,
        // its address in the priority (for the CIDR rules that cover it).
        SockRef::from(&sock).set_mark(upstream_mark)?;
        SockRef::from(&sock).set_priority(upstream_priority)?;
        let stream = sock.connect(SocketAddr::V4(dst)).await?;
        stream.set_nodelay(true)?;
        Ok(stream)
    };
    let judge = ConnectionJudge::new(ctx.policy.clone(), peer, dst);
    let mut observer = ctx.observer.connection(peer, dst);
    http::serve_connection(
        client,
        connect,
        |head| judge.judge(head),
        |record| match record {
            Record::Request(r) => observer.request(r),
            Record::Tunnel(t) => observer.tunnel(t),
        },
        &ctx.limits,
    )
    .await
}
