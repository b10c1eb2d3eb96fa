//! The proxy's reports as flows: the agent's [`Observer`] for the L7 proxy. What every flow of
//! a connection shares is built once per connection, and again only when the policy or the
//! names change. A request is an `http-request` flow; a tunnel a 101 opened is a flow of its
//! own when it opens (`tunnel-opened`) and when it closes (`tunnel-closed`, with the bytes it
//! relayed each way).
//!
//! Off the request's path: a proxy worker hands each report (its time, the connection's shared
//! part, the record) to the [`Recorder`], which builds the flow, counts it and stores it on its
//! own task. A worker never formats a flow, takes the store's lock or a metric family's lock.
//! When the recorder falls behind by a full queue, the worker records the flow itself (slower,
//! but no flow is lost).

use std::net::SocketAddrV4;
use std::sync::Arc;
use std::time::SystemTime;

use tokio::sync::{mpsc, oneshot};

use palisade_api::flow::{Flow, FlowHttp, FlowIp, FlowL4, FlowTunnel};
use palisade_engine::catalog::Catalog;
use palisade_policies::l7::ProxyPolicy;
use palisade_proxy::http::{RequestRecord, TunnelEvent, TunnelRecord};
use palisade_proxy::listener::{ConnectionObserver, Observer};
use tokio::sync::watch;

use super::store::FlowStore;
use super::{flow_policy, peer};
use crate::metrics::Telemetry;

/// Reports queued for the recorder before a worker records a flow itself.
const RECORDER_QUEUE: usize = 16_384;

/// Turns the proxy's reports into flows in the store, and counts them.
#[derive(Clone)]
pub struct ProxyFlows {
    pub policy: watch::Receiver<Arc<ProxyPolicy>>,
    pub catalog: watch::Receiver<Arc<Catalog>>,
    sink: Sink,
}

/// Where reports go: the recorder's queue, and what a worker needs to record one itself.
#[derive(Clone)]
struct Sink {
    queue: mpsc::Sender<Report>,
    flows: Arc<FlowStore>,
    telemetry: Arc<Telemetry>,
}

/// One report of a proxy worker, as it hands it over.
enum Report {
    Request(SystemTime, Arc<FlowBase>, RequestRecord),
    Tunnel(SystemTime, Arc<FlowBase>, TunnelRecord),
}

impl Sink {
    fn record(&self, report: Report) {
        match self.queue.try_send(report) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(r) | mpsc::error::TrySendError::Closed(r)) => {
                record(&self.flows, &self.telemetry, r);
            }
        }
    }
}

/// Builds, counts and stores the flow of one report.
fn record(flows: &FlowStore, telemetry: &Telemetry, report: Report) {
    match report {
        Report::Request(at, base, r) => {
            telemetry.count_request(base.direction, &r);
            flows.push(at, base.flow(at, &r));
        }
        Report::Tunnel(at, base, t) => {
            telemetry.count_tunnel(base.direction);
            flows.push(at, base.tunnel_flow(at, &t));
        }
    }
}

/// Records what the proxy's workers report, on its own task.
pub struct Recorder {
    queue: mpsc::Receiver<Report>,
    /// Readers of the flow store asking for what is queued to be stored (see `Flush`).
    flushes: mpsc::Receiver<oneshot::Sender<()>>,
    flows: Arc<FlowStore>,
    telemetry: Arc<Telemetry>,
}

impl Recorder {
    /// Runs until every `ProxyFlows` is gone.
    pub async fn run(mut self) {
        loop {
            tokio::select! {
                report = self.queue.recv() => match report {
                    Some(report) => record(&self.flows, &self.telemetry, report),
                    None => return,
                },
                Some(done) = self.flushes.recv() => {
                    // Every report a worker handed over before the flush was asked for is
                    // queued by now (handing over does not wait).
                    self.drain();
                    let _ = done.send(());
                }
            }
        }
    }

    /// Records everything queued now.
    fn drain(&mut self) {
        while let Ok(report) = self.queue.try_recv() {
            record(&self.flows, &self.telemetry, report);
        }
    }
}

impl ProxyFlows {
    /// The observer for the proxy, and the recorder that must run for its flows to be stored
    /// (answering `flushes` once what was queued before each is stored).
    pub fn new(
        policy: watch::Receiver<Arc<ProxyPolicy>>,
        catalog: watch::Receiver<Arc<Catalog>>,
        flows: Arc<FlowStore>,
        telemetry: Arc<Telemetry>,
        flushes: mpsc::Receiver<oneshot::Sender<()>>,
    ) -> (ProxyFlows, Recorder) {
        let (queue, rx) = mpsc::channel(RECORDER_QUEUE);
        (
            ProxyFlows {
                policy,
                catalog,
                sink: Sink {
                    queue,
                    flows: Arc::clone(&flows),
                    telemetry: Arc::clone(&telemetry),
                },
            },
            Recorder {
                queue: rx,
                flushes,
                flows,
                telemetry,
            },
        )
    }
}

impl Observer for ProxyFlows {
    type Connection = ConnectionFlows;

    fn connection(&self, client: SocketAddrV4, destination: SocketAddrV4) -> ConnectionFlows {
        ConnectionFlows {
            shared: self.clone(),
            client,
            destination,
            base: None,
        }
    }
}

pub struct ConnectionFlows {
    shared: ProxyFlows,
    client: SocketAddrV4,
    destination: SocketAddrV4,
    base: Option<Arc<FlowBase>>,
}

/// The part of a connection's flows that does not change from request to request.
struct FlowBase {
    policy: Arc<ProxyPolicy>,
    catalog: Arc<Catalog>,
    /// Where the request was judged: the destination's ingress, or the client's egress.
    direction: &'static str,
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
        let source = peer(&catalog, ends.client.identity.0, *client.ip());
        let destination = peer(&catalog, ends.destination.identity.0, *dst.ip());
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
            tunnel: None,
            dns: None,
        };
        Self {
            policy,
            catalog,
            direction,
            flow,
        }
    }

    fn flow(&self, at: SystemTime, r: &RequestRecord) -> Flow {
        let mut flow = self.flow.clone();
        flow.time = humantime::format_rfc3339_micros(at).to_string();
        flow.verdict = match (r.allowed, r.audited) {
            (true, false) => "FORWARDED",
            // Forwarded by audit mode: `rule` is the one that denies it.
            (true, true) => "AUDIT",
            (false, _) => "DROPPED",
        }
        .to_string();
        // A policy denial may carry an explanation (a refused upgrade names its protocol);
        // it is still a policy denial.
        flow.drop_reason = (!r.allowed).then(|| match &r.error {
            _ if r.policy_denied() => "Policy denied (L7)".to_string(),
            Some(e) => format!("Invalid HTTP request: {e}"),
            None => "Policy denied (L7)".to_string(),
        });
        flow.policy = self.catalog.rules.get(&r.rule).map(flow_policy);
        flow.http = Some(FlowHttp {
            method: r.method.clone(),
            path: r.path.clone(),
            host: r.host.clone(),
            status: r.status,
            latency_us: u64::try_from(r.latency.as_micros()).unwrap_or(u64::MAX),
        });
        flow
    }

    fn tunnel_flow(&self, at: SystemTime, t: &TunnelRecord) -> Flow {
        let mut flow = self.flow.clone();
        flow.time = humantime::format_rfc3339_micros(at).to_string();
        // The tunnel exists because its request was allowed.
        flow.verdict = "FORWARDED".to_string();
        let closed = t.event == TunnelEvent::Closed;
        flow.event = if closed {
            "tunnel-closed"
        } else {
            "tunnel-opened"
        }
        .to_string();
        flow.policy = self.catalog.rules.get(&t.rule).map(flow_policy);
        flow.tunnel = Some(FlowTunnel {
            protocol: t.protocol.clone(),
            bytes_to_server: t.bytes_to_server,
            bytes_to_client: t.bytes_to_client,
            duration_us: closed.then(|| u64::try_from(t.duration.as_micros()).unwrap_or(u64::MAX)),
        });
        flow
    }
}

impl ConnectionFlows {
    /// The connection's shared flow part, rebuilt when the policy or the names changed.
    fn base(&mut self) -> Arc<FlowBase> {
        let (policy, catalog) = (
            Arc::clone(&self.shared.policy.borrow()),
            Arc::clone(&self.shared.catalog.borrow()),
        );
        let fresh = self
            .base
            .as_ref()
            .is_some_and(|b| Arc::ptr_eq(&b.policy, &policy) && Arc::ptr_eq(&b.catalog, &catalog));
        if !fresh {
            self.base = None;
        }
        let (client, destination) = (self.client, self.destination);
        Arc::clone(
            self.base.get_or_insert_with(|| {
                Arc::new(FlowBase::new(client, destination, policy, catalog))
            }),
        )
    }
}

impl ConnectionObserver for ConnectionFlows {
    fn request(&mut self, r: RequestRecord) {
        let base = self.base();
        self.shared
            .sink
            .record(Report::Request(SystemTime::now(), base, r));
    }

    fn tunnel(&mut self, t: TunnelRecord) {
        let base = self.base();
        self.shared
            .sink
            .record(Report::Tunnel(SystemTime::now(), base, t));
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use palisade_engine::catalog::CatalogRule;

    use super::*;
    use crate::datapath::events::Flush;

    fn observer() -> (ConnectionFlows, Recorder, Arc<FlowStore>, Flush) {
        let mut catalog = Catalog::default();
        catalog.rules.insert(
            5,
            CatalogRule {
                policy: "x/api-l7".into(),
                kind: "palisade".into(),
                rule: "x/api-l7 ingress rule 0".into(),
            },
        );
        let flows = Arc::new(FlowStore::new(4096));
        // No ring reader: a flush asks only the recorder.
        let (mut flush, _ring) = Flush::new();
        let (shared, recorder) = ProxyFlows::new(
            watch::channel(Arc::new(ProxyPolicy::default())).1,
            watch::channel(Arc::new(catalog)).1,
            Arc::clone(&flows),
            Arc::new(Telemetry::default()),
            flush.source(),
        );
        let connection = shared.connection(
            "10.200.0.2:40000".parse().unwrap(),
            "10.200.0.3:80".parse().unwrap(),
        );
        (connection, recorder, flows, flush)
    }

    fn stored(flows: &FlowStore) -> Vec<Flow> {
        flows
            .snapshot(None, None, |_| true)
            .iter()
            .map(|f| (**f).clone())
            .collect()
    }

    fn denied(path: &str) -> RequestRecord {
        RequestRecord {
            method: "GET".into(),
            path: path.into(),
            host: Some("api".into()),
            status: 403,
            allowed: false,
            audited: false,
            rule: 5,
            latency: Duration::from_micros(3),
            error: None,
        }
    }

    // Two threads, so the test reads the store while the recorder may still be storing.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_flush_returns_once_every_report_handed_over_before_it_is_stored() {
        let (mut connection, recorder, flows, flush) = observer();
        let running = tokio::spawn(recorder.run());
        for k in 0..2000 {
            connection.request(denied(&format!("/private/{k}")));
        }
        flush.wait().await;
        let paths: Vec<String> = stored(&flows)
            .iter()
            .filter_map(|f| f.http.as_ref().map(|h| h.path.clone()))
            .collect();
        assert_eq!(paths.len(), 2000, "every report before the flush");
        drop(connection);
        running.abort();
    }

    #[test]
    fn a_refused_upgrade_is_a_policy_denial() {
        let (mut connection, mut recorder, flows, _flush) = observer();
        assert!(stored(&flows).is_empty());
        connection.request(RequestRecord {
            error: Some("upgrade to \"spdy/3.1\" is not allowed by any HTTP rule".into()),
            ..denied("/public/x")
        });
        assert!(
            stored(&flows).is_empty(),
            "the worker hands the report over; the recorder stores it"
        );
        recorder.drain();
        let flow = &stored(&flows)[0];
        assert_eq!(flow.event, "http-request");
        assert_eq!(flow.verdict, "DROPPED");
        assert_eq!(flow.drop_reason.as_deref(), Some("Policy denied (L7)"));
        assert_eq!(
            flow.policy.as_ref().map(|p| p.name.as_str()),
            Some("x/api-l7")
        );
    }

    #[test]
    fn tunnels_are_flows_of_their_own() {
        let (mut connection, mut recorder, flows, _flush) = observer();
        let record = |event, bytes_to_server, bytes_to_client, duration| TunnelRecord {
            event,
            protocol: "websocket".into(),
            rule: 5,
            bytes_to_server,
            bytes_to_client,
            duration,
            error: None,
        };
        connection.tunnel(record(TunnelEvent::Opened, 0, 0, Duration::ZERO));
        connection.tunnel(record(
            TunnelEvent::Closed,
            12,
            3456,
            Duration::from_millis(7),
        ));
        recorder.drain();
        let stored = stored(&flows);
        let events: Vec<&str> = stored.iter().map(|f| f.event.as_str()).collect();
        assert_eq!(events, ["tunnel-opened", "tunnel-closed"]);
        for flow in &stored {
            assert_eq!(flow.verdict, "FORWARDED");
            assert_eq!(flow.http, None);
            assert_eq!(flow.l4.destination_port, 80);
            assert_eq!(
                flow.policy.as_ref().map(|p| p.name.as_str()),
                Some("x/api-l7")
            );
        }
        assert_eq!(
            stored[0].tunnel,
            Some(FlowTunnel {
                protocol: "websocket".into(),
                bytes_to_server: 0,
                bytes_to_client: 0,
                duration_us: None,
            })
        );
        assert_eq!(
            stored[1].tunnel,
            Some(FlowTunnel {
                protocol: "websocket".into(),
                bytes_to_server: 12,
                bytes_to_client: 3456,
                duration_us: Some(7000),
            })
        );
    }
}
