//! The proxy's edge: a transparent listener in the node namespace that the datapath assigns
//! redirected connections to, the upstream leg (marked with the client's identity so the
//! destination's own policy still judges the client), and a flow per request.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::time::SystemTime;

use palisade_common::mark;
use palisade_policies::l7::RequestView;
use socket2::{Domain, SockRef, Socket, Type};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::watch;
use tracing::{debug, warn};

use super::http::{self, Decision, RequestHead, RequestRecord};
use super::policy::{Ends, ProxyPolicy};
use crate::flows::store::FlowStore;
use crate::flows::{self, Catalog, Flow, FlowHttp, FlowIp, FlowL4, FlowPolicy};
use crate::metrics::Telemetry;

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

struct HeadView<'a>(&'a RequestHead);

impl RequestView for HeadView<'_> {
    fn method(&self) -> &str {
        &self.0.method
    }
    fn path(&self) -> &str {
        &self.0.path
    }
    fn host(&self) -> Option<&str> {
        self.0.host.as_deref()
    }
    fn header(&self, name: &str) -> Option<&[u8]> {
        self.0.header(name)
    }
}

/// What a connection needs beyond its socket.
#[derive(Clone)]
pub struct ProxyContext {
    pub policy: watch::Receiver<Arc<ProxyPolicy>>,
    pub catalog: watch::Receiver<Arc<Catalog>>,
    pub flows: Arc<FlowStore>,
    pub telemetry: Arc<Telemetry>,
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
pub async fn run(listener: TcpListener, ctx: ProxyContext, workers: Workers) {
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

/// What every flow of one connection shares, built once per connection (and again only when
/// the policy or the names change).
struct FlowBase {
    policy: Arc<ProxyPolicy>,
    catalog: Arc<Catalog>,
    flow: Flow,
}

impl FlowBase {
    fn new(
        client: SocketAddrV4,
        dst: SocketAddrV4,
        policy: Arc<ProxyPolicy>,
        catalog: Arc<Catalog>,
    ) -> Self {
        let ends = policy.ends(client, dst);
        let source = flows::peer(&catalog, ends.client.identity.0, *client.ip());
        let destination = flows::peer(&catalog, ends.destination.identity.0, *dst.ip());
        // The check belongs to the destination's ingress when it is a local endpoint.
        let (endpoint, direction) = if ends.destination.endpoint.is_some() {
            (destination.clone(), "ingress")
        } else {
            (source.clone(), "egress")
        };
        let flow = Flow {
            seq: 0,
            time: String::new(),
            verdict: String::new(),
            drop_reason: None,
            drop_reason_code: None,
            event: "http-request".to_string(),
            direction: direction.to_string(),
            endpoint,
            source,
            destination,
            ip: FlowIp {
                source: *client.ip(),
                destination: *dst.ip(),
            },
            l4: FlowL4 {
                protocol: "TCP".to_string(),
                source_port: client.port(),
                destination_port: dst.port(),
                tcp_flags: Vec::new(),
            },
            policy: None,
            packet_bytes: 0,
            http: None,
        };
        Self {
            policy,
            catalog,
            flow,
        }
    }

    fn flow(&self, r: &RequestRecord) -> Flow {
        let mut flow = self.flow.clone();
        flow.time = humantime::format_rfc3339_micros(SystemTime::now()).to_string();
        flow.verdict = if r.allowed { "FORWARDED" } else { "DROPPED" }.to_string();
        flow.drop_reason = (!r.allowed).then(|| match &r.error {
            Some(e) => format!("Invalid HTTP request: {e}"),
            None => "Policy denied (L7)".to_string(),
        });
        flow.policy = self
            .catalog
            .rules
            .get(&r.rule)
            .map(|(name, kind, rule)| FlowPolicy {
                name: name.clone(),
                kind: kind.clone(),
                rule: rule.clone(),
            });
        flow.http = Some(FlowHttp {
            method: r.method.clone(),
            path: r.path.clone(),
            host: r.host.clone(),
            status: r.status,
            latency_us: u64::try_from(r.latency.as_micros()).unwrap_or(u64::MAX),
        });
        flow
    }
}

async fn handle(client: TcpStream, ctx: ProxyContext) -> Result<(), http::ProxyError> {
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
    let connect = move || async move {
        let sock = TcpSocket::new_v4()?;
        // The destination's datapath reads the client's identity from this mark.
        SockRef::from(&sock).set_mark(upstream_mark)?;
        let stream = sock.connect(SocketAddr::V4(dst)).await?;
        stream.set_nodelay(true)?;
        Ok(stream)
    };
    // Every request is judged by the policy current when it arrives; who the two ends are is
    // looked up again only when a new policy was published.
    let policy_rx = ctx.policy.clone();
    let ends_cache: std::sync::Mutex<Option<(Arc<ProxyPolicy>, Ends)>> =
        std::sync::Mutex::new(None);
    let judge = move |head: &RequestHead| {
        let policy = Arc::clone(&policy_rx.borrow());
        let mut cache = ends_cache.lock().unwrap_or_else(|p| p.into_inner());
        let ends = match &*cache {
            Some((p, ends)) if Arc::ptr_eq(p, &policy) => *ends,
            _ => {
                let ends = policy.ends(peer, dst);
                *cache = Some((Arc::clone(&policy), ends));
                ends
            }
        };
        let verdict = policy.judge_ends(&ends, &HeadView(head));
        if verdict.allowed {
            Decision::Allow {
                rule: verdict.rule.0,
            }
        } else {
            Decision::Deny {
                rule: verdict.rule.0,
            }
        }
    };
    let (flows, telemetry, catalog_rx, policy_rx) = (
        ctx.flows.clone(),
        ctx.telemetry.clone(),
        ctx.catalog.clone(),
        ctx.policy.clone(),
    );
    let mut base: Option<FlowBase> = None;
    let record = move |r: RequestRecord| {
        let (policy, catalog) = (
            Arc::clone(&policy_rx.borrow()),
            Arc::clone(&catalog_rx.borrow()),
        );
        let fresh = base
            .as_ref()
            .is_some_and(|b| Arc::ptr_eq(&b.policy, &policy) && Arc::ptr_eq(&b.catalog, &catalog));
        if !fresh {
            base = Some(FlowBase::new(peer, dst, policy, catalog));
        }
        let Some(b) = &base else { return };
        let flow = b.flow(&r);
        telemetry.count_flow(&flow);
        telemetry.count_request(&r);
        flows.push(SystemTime::now(), flow);
    };
    http::serve_connection(client, connect, judge, record, &ctx.limits).await
}
