//! Prometheus metrics and a health check on `--metrics-addr` (off by default).
//!
//! Gauges and datapath counters are read when scraped (from the engine and the BPF maps);
//! flow counts and policy compile durations accumulate in `Telemetry` as they happen.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::{
    Router, extract::State, http::StatusCode, http::header, response::IntoResponse, routing::get,
};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::{
    counter::Counter, family::Family, gauge::Gauge, histogram::Histogram,
};
use prometheus_client::registry::Registry;
use tokio::sync::{mpsc, oneshot};
use tracing::info;

use crate::api::Command;
use crate::api::types::StatusView;
use crate::flows::Flow;

type Labels = Vec<(String, String)>;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FlowLabels {
    verdict: &'static str,
    direction: &'static str,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    verdict: &'static str,
    status: &'static str,
}

/// What accumulates between scrapes.
#[derive(Clone, Debug)]
pub struct Telemetry {
    /// Flows the agent stored, by verdict, direction and drop reason.
    pub flows: Family<FlowLabels, Counter>,
    /// Time to compile policy into map state and diff it, per change.
    pub compile_seconds: Histogram,
    /// Requests the L7 proxy handled, by verdict and status class.
    pub proxy_requests: Family<RequestLabels, Counter>,
}

impl Default for Telemetry {
    fn default() -> Self {
        Self {
            flows: Family::default(),
            // 100µs .. ~1.6s
            compile_seconds: Histogram::new(
                prometheus_client::metrics::histogram::exponential_buckets(0.0001, 2.0, 15),
            ),
            proxy_requests: Family::default(),
        }
    }
}

impl Telemetry {
    pub fn count_request(&self, r: &crate::proxy::http::RequestRecord) {
        const CLASSES: [&str; 6] = ["0xx", "1xx", "2xx", "3xx", "4xx", "5xx"];
        self.proxy_requests
            .get_or_create(&RequestLabels {
                verdict: if r.allowed { "FORWARDED" } else { "DROPPED" },
                status: CLASSES[usize::from(r.status / 100).min(5)],
            })
            .inc();
    }

    pub fn count_flow(&self, f: &Flow) {
        // Static label values: bounded cardinality and no allocation per flow.
        let verdict = match f.verdict.as_str() {
            "FORWARDED" => "FORWARDED",
            "DROPPED" => "DROPPED",
            "AUDIT" => "AUDIT",
            "REDIRECTED" => "REDIRECTED",
            _ => "UNKNOWN",
        };
        let reason = match (f.drop_reason_code, &f.drop_reason, &f.http) {
            (Some(code), _, _) => palisade_common::reason::drop_reason_name(code),
            (None, Some(r), Some(_)) if r.starts_with("Invalid HTTP request") => {
                "Invalid HTTP request"
            }
            (None, Some(_), Some(_)) => "Policy denied (L7)",
            _ => "",
        };
        self.flows
            .get_or_create(&FlowLabels {
                verdict,
                direction: if f.direction == "ingress" {
                    "ingress"
                } else {
                    "egress"
                },
                reason,
            })
            .inc();
    }
}

#[derive(Clone)]
struct MetricsState {
    engine: mpsc::Sender<Command>,
    telemetry: Arc<Telemetry>,
}

async fn status(engine: &mpsc::Sender<Command>) -> Option<StatusView> {
    let (tx, rx) = oneshot::channel();
    engine.send(Command::Status(tx)).await.ok()?;
    tokio::time::timeout(Duration::from_secs(2), rx)
        .await
        .ok()?
        .ok()?
        .ok()
}

fn gauge(reg: &mut Registry, name: &str, help: &str, value: usize) {
    let g = Gauge::<i64>::default();
    g.set(i64::try_from(value).unwrap_or(i64::MAX));
    reg.register(name, help, g);
}

/// The exposition text for one scrape.
pub fn render(s: &StatusView, t: &Telemetry) -> String {
    let mut reg = Registry::with_prefix("palisade");
    gauge(&mut reg, "endpoints", "Endpoints on this node", s.endpoints);
    gauge(
        &mut reg,
        "identities",
        "Security identities in use (reserved, workload, CIDR)",
        s.identities,
    );
    gauge(&mut reg, "policies", "Policies in force", s.policies);
    gauge(
        &mut reg,
        "policy_map_entries",
        "Entries in the BPF policy map",
        s.policy_map_entries,
    );
    gauge(
        &mut reg,
        "ipcache_entries",
        "Entries in the BPF ipcache",
        s.ipcache_entries,
    );
    gauge(
        &mut reg,
        "conntrack_entries",
        "Entries in the BPF conntrack map",
        s.conntrack_entries,
    );
    gauge(
        &mut reg,
        "flows_stored",
        "Flows held in the agent's flow buffer",
        s.flows_stored,
    );
    let maps_in_sync = Gauge::<i64>::default();
    maps_in_sync.set(i64::from(s.maps_in_sync));
    reg.register(
        "maps_in_sync",
        "1 when the BPF maps hold exactly what the agent compiled",
        maps_in_sync,
    );

    let packets = Family::<Labels, Counter>::default();
    let bytes = Family::<Labels, Counter>::default();
    let lost = Family::<Labels, Counter>::default();
    for c in &s.counters {
        match c.outcome.as_str() {
            "EVENTS_LOST" => {
                lost.get_or_create(&vec![("reason".into(), "ring_buffer_full".into())])
                    .inc_by(c.packets);
            }
            "EVENTS_RATE_LIMITED" => {
                lost.get_or_create(&vec![("reason".into(), "rate_limited".into())])
                    .inc_by(c.packets);
            }
            outcome => {
                let labels = vec![
                    ("direction".to_string(), c.direction.clone()),
                    ("outcome".to_string(), outcome.to_string()),
                ];
                packets.get_or_create(&labels).inc_by(c.packets);
                bytes.get_or_create(&labels).inc_by(c.bytes);
            }
        }
    }
    reg.register(
        "datapath_packets",
        "Packets judged by the datapath, by direction and outcome (verdict or drop reason)",
        packets,
    );
    reg.register(
        "datapath_bytes",
        "Bytes judged by the datapath, by direction and outcome",
        bytes,
    );
    reg.register(
        "flow_events_lost",
        "Flow events the datapath could not deliver",
        lost,
    );
    reg.register(
        "flows",
        "Flows recorded, by verdict, direction and drop reason",
        t.flows.clone(),
    );
    reg.register(
        "proxy_requests",
        "HTTP requests the L7 proxy handled, by verdict and status class",
        t.proxy_requests.clone(),
    );
    reg.register(
        "policy_compile_seconds",
        "Time to compile policy into map state and diff it",
        t.compile_seconds.clone(),
    );
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = encode(&mut out, &reg);
    out
}

async fn metrics(State(s): State<MetricsState>) -> impl IntoResponse {
    match status(&s.engine).await {
        Some(st) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            render(&st, &s.telemetry),
        ),
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::CONTENT_TYPE, "text/plain")],
            "engine not responding\n".to_string(),
        ),
    }
}

/// 200 when the engine answers within two seconds and the maps hold what it compiled.
async fn healthz(State(s): State<MetricsState>) -> impl IntoResponse {
    match status(&s.engine).await {
        Some(st) if st.maps_in_sync => (StatusCode::OK, "ok\n"),
        Some(_) => (StatusCode::SERVICE_UNAVAILABLE, "maps out of sync\n"),
        None => (StatusCode::SERVICE_UNAVAILABLE, "engine not responding\n"),
    }
}

/// Serves on an already bound listener (bound by the caller, so a bad address fails the
/// agent's start rather than a background task).
pub async fn serve(
    listener: std::net::TcpListener,
    engine: mpsc::Sender<Command>,
    telemetry: Arc<Telemetry>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    listener.set_nonblocking(true)?;
    let listener = tokio::net::TcpListener::from_std(listener)?;
    let addr: SocketAddr = listener.local_addr()?;
    info!(%addr, "metrics listening");
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .with_state(MetricsState { engine, telemetry });
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::types::CounterView;

    fn status() -> StatusView {
        StatusView {
            version: "0".into(),
            mode: "local".into(),
            node_ip: std::net::Ipv4Addr::new(10, 200, 0, 1),
            pod_cidr: "10.200.0.0/16".into(),
            enforcement: "default".into(),
            endpoints: 3,
            identities: 11,
            policies: 2,
            policy_map_entries: 7,
            ipcache_entries: 5,
            maps_in_sync: true,
            conntrack_entries: 4,
            flows_stored: 9,
            counters: vec![
                CounterView {
                    direction: "ingress".into(),
                    outcome: "Policy denied".into(),
                    packets: 5,
                    bytes: 300,
                },
                CounterView {
                    direction: "datapath".into(),
                    outcome: "EVENTS_LOST".into(),
                    packets: 2,
                    bytes: 0,
                },
            ],
            namespaces: Default::default(),
        }
    }

    #[test]
    fn scrape_reports_gauges_counters_and_losses() {
        let t = Telemetry::default();
        t.compile_seconds.observe(0.002);
        let text = render(&status(), &t);
        assert!(text.contains("palisade_endpoints 3"), "{text}");
        assert!(text.contains("palisade_policy_map_entries 7"));
        assert!(
            text.contains(
                "palisade_datapath_packets_total{direction=\"ingress\",outcome=\"Policy denied\"} 5"
            ),
            "{text}"
        );
        assert!(
            text.contains("palisade_flow_events_lost_total{reason=\"ring_buffer_full\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("palisade_policy_compile_seconds_count 1"),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"));
    }
}
