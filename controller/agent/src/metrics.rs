//! Prometheus metrics and a health check on `--metrics-addr` (off by default).
//!
//! Gauges and datapath counters are read when scraped (the node's status: the engine's view
//! and the BPF maps); flow counts and policy compile durations accumulate in `Telemetry` as
//! they happen, fed by the flow reader, the proxy's observer and the engine.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::{
    Router, extract::State, http::StatusCode, http::header, response::IntoResponse, routing::get,
};
use palisade_common::{direction, flow::FlowEvent, metrics as outcome, reason};
use palisade_engine::EngineMetrics;
use palisade_proxy::http::RequestRecord;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::{
    counter::Counter, family::Family, gauge::Gauge, histogram::Histogram,
};
use prometheus_client::registry::Registry;
use tracing::info;

use crate::datapath::events::Flush;
use crate::status::{NodeStatus, StatusSource};

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

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DnsLabels {
    /// answered, refused, failed, malformed, overloaded.
    outcome: &'static str,
    /// UDP or TCP.
    protocol: &'static str,
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
    /// Queries the DNS proxy handled, by outcome and protocol.
    pub dns_queries: Family<DnsLabels, Counter>,
    /// Time the DNS proxy held an answer to learn its addresses (the engine's write).
    pub dns_learn_seconds: Histogram,
    /// Time from a query's arrival to its answer's release, server included.
    pub dns_latency_seconds: Histogram,
    /// Learned addresses evicted because a name had more than an endpoint keeps.
    pub fqdn_evicted: Counter,
    /// Where the engine's task spent its time on batches of learned answers, by stage.
    pub fqdn_learn_stage_seconds: Family<StageLabels, Histogram>,
    /// Answers learned in batches (the stage histograms' count is batches).
    pub fqdn_learned_answers: Counter,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StageLabels {
    /// learn, compile, write, publish, persist.
    stage: &'static str,
}

fn stage_histogram() -> Histogram {
    // 1µs .. ~0.5s
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        0.000_001, 2.0, 20,
    ))
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
            dns_queries: Family::default(),
            // 10µs .. ~160ms
            dns_learn_seconds: Histogram::new(
                prometheus_client::metrics::histogram::exponential_buckets(0.000_01, 2.0, 15),
            ),
            dns_latency_seconds: Histogram::new(
                prometheus_client::metrics::histogram::exponential_buckets(0.000_01, 2.0, 20),
            ),
            fqdn_evicted: Counter::default(),
            fqdn_learn_stage_seconds: Family::new_with_constructor(stage_histogram),
            fqdn_learned_answers: Counter::default(),
        }
    }
}

impl EngineMetrics for Telemetry {
    fn policy_compiled(&self, took: Duration) {
        self.compile_seconds.observe(took.as_secs_f64());
    }

    fn fqdn_evicted(&self, count: usize) {
        self.fqdn_evicted.inc_by(count as u64);
    }

    fn fqdn_learned(&self, stages: &palisade_engine::LearnStages) {
        self.fqdn_learned_answers.inc_by(stages.answers as u64);
        for (stage, took) in [
            ("learn", stages.learn),
            ("compile", stages.compile),
            ("write", stages.write),
            ("publish", stages.publish),
            ("persist", stages.persist),
        ] {
            self.fqdn_learn_stage_seconds
                .get_or_create(&StageLabels { stage })
                .observe(took.as_secs_f64());
        }
    }
}

impl Telemetry {
    /// A flow of the L7 proxy: one request, judged at `direction` (`ingress` or `egress`).
    pub fn count_request(&self, direction: &'static str, r: &RequestRecord) {
        const CLASSES: [&str; 6] = ["0xx", "1xx", "2xx", "3xx", "4xx", "5xx"];
        let verdict = match (r.allowed, r.audited) {
            (true, false) => "FORWARDED",
            (true, true) => "AUDIT",
            (false, _) => "DROPPED",
        };
        self.proxy_requests
            .get_or_create(&RequestLabels {
                verdict,
                status: CLASSES[usize::from(r.status / 100).min(5)],
            })
            .inc();
        let reason = match (r.allowed, &r.error) {
            (true, _) => "",
            _ if r.policy_denied() => "Policy denied (L7)",
            (false, Some(_)) => "Invalid HTTP request",
            (false, None) => "Policy denied (L7)",
        };
        self.flows
            .get_or_create(&FlowLabels {
                verdict,
                direction,
                reason,
            })
            .inc();
    }

    /// A query of the DNS proxy.
    pub fn count_dns(&self, r: &palisade_dns::server::QueryRecord) {
        use palisade_dns::server::Outcome;
        let outcome = match r.outcome {
            Outcome::Answered => "answered",
            Outcome::Refused => "refused",
            Outcome::Failed(_) => "failed",
            Outcome::Malformed(_) => "malformed",
            Outcome::Overloaded => "overloaded",
        };
        self.dns_queries
            .get_or_create(&DnsLabels {
                outcome,
                protocol: r.transport.as_str(),
            })
            .inc();
        if matches!(r.outcome, Outcome::Answered) {
            self.dns_latency_seconds.observe(r.took.as_secs_f64());
            if !r.answers.is_empty() {
                self.dns_learn_seconds.observe(r.learn_took.as_secs_f64());
            }
        }
        let (verdict, reason) = match r.outcome {
            Outcome::Answered => ("FORWARDED", ""),
            Outcome::Refused => ("DROPPED", "Policy denied (DNS)"),
            Outcome::Failed(_) => ("DROPPED", "DNS answer not usable"),
            Outcome::Malformed(_) => ("DROPPED", "Invalid DNS message"),
            Outcome::Overloaded => ("DROPPED", "DNS proxy overloaded"),
        };
        self.flows
            .get_or_create(&FlowLabels {
                verdict,
                direction: "egress",
                reason,
            })
            .inc();
    }

    /// A flow of the L7 proxy about a tunnel (opened or closed), judged at `direction`.
    pub fn count_tunnel(&self, direction: &'static str) {
        self.flows
            .get_or_create(&FlowLabels {
                verdict: "FORWARDED",
                direction,
                reason: "",
            })
            .inc();
    }

    /// A flow the datapath reported.
    pub fn count_event(&self, ev: &FlowEvent) {
        // Static label values: bounded cardinality and no allocation per flow.
        let dropped = ev.verdict == reason::verdict::DROPPED;
        self.flows
            .get_or_create(&FlowLabels {
                verdict: reason::verdict_name(ev.verdict),
                direction: if ev.direction == direction::INGRESS {
                    "ingress"
                } else {
                    "egress"
                },
                reason: if dropped {
                    reason::drop_reason_name(ev.drop_reason)
                } else {
                    ""
                },
            })
            .inc();
    }
}

#[derive(Clone)]
struct MetricsState {
    status: StatusSource,
    telemetry: Arc<Telemetry>,
    flush: Flush,
}

async fn status(source: &StatusSource) -> Option<NodeStatus> {
    tokio::time::timeout(Duration::from_secs(2), source.gather())
        .await
        .ok()?
        .ok()
}

fn gauge(reg: &mut Registry, name: &str, help: &str, value: usize) {
    let g = Gauge::<i64>::default();
    g.set(i64::try_from(value).unwrap_or(i64::MAX));
    reg.register(name, help, g);
}

/// The exposition text for one scrape.
pub fn render(s: &NodeStatus, t: &Telemetry) -> String {
    let mut reg = Registry::with_prefix("palisade");
    let e = &s.engine;
    gauge(&mut reg, "endpoints", "Endpoints on this node", e.endpoints);
    gauge(
        &mut reg,
        "identities",
        "Security identities in use (reserved, workload, CIDR)",
        e.identities,
    );
    gauge(&mut reg, "policies", "Policies in force", e.policies);
    gauge(
        &mut reg,
        "policy_map_entries",
        "Entries in the BPF policy map",
        e.policy_map_entries,
    );
    gauge(
        &mut reg,
        "ipcache_entries",
        "Entries in the BPF ipcache",
        e.ipcache_entries,
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
    maps_in_sync.set(i64::from(e.maps_in_sync));
    reg.register(
        "maps_in_sync",
        "1 when the BPF maps hold exactly what the agent compiled",
        maps_in_sync,
    );

    let packets = Family::<Labels, Counter>::default();
    let bytes = Family::<Labels, Counter>::default();
    let lost = Family::<Labels, Counter>::default();
    for c in &s.counters {
        match c.outcome {
            outcome::OUTCOME_EVENTS_LOST => {
                lost.get_or_create(&vec![("reason".into(), "ring_buffer_full".into())])
                    .inc_by(c.packets);
            }
            outcome::OUTCOME_EVENTS_RATE_LIMITED => {
                lost.get_or_create(&vec![("reason".into(), "rate_limited".into())])
                    .inc_by(c.packets);
            }
            code => {
                let labels = vec![
                    (
                        "direction".to_string(),
                        outcome::direction_name(c.direction).to_string(),
                    ),
                    (
                        "outcome".to_string(),
                        outcome::outcome_name(code).to_string(),
                    ),
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
    let violations = Family::<Labels, Counter>::default();
    for (ns, n) in &s.violations {
        violations
            .get_or_create(&vec![("namespace".into(), ns.clone())])
            .inc_by(*n);
    }
    reg.register(
        "policy_violations",
        "AUDIT flows (what policy would drop but audit let through) at endpoints of namespaces not in discover mode, by namespace",
        violations,
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
        "dns_queries",
        "DNS queries the DNS proxy handled, by outcome (answered, refused, failed, malformed, overloaded) and protocol",
        t.dns_queries.clone(),
    );
    reg.register(
        "dns_learn_seconds",
        "Time an answer was held until its addresses were in the maps",
        t.dns_learn_seconds.clone(),
    );
    reg.register(
        "dns_latency_seconds",
        "Time from a DNS query's arrival to its answer's release, the server's time included",
        t.dns_latency_seconds.clone(),
    );
    reg.register(
        "fqdn_evicted_addresses",
        "Learned addresses evicted because a name had more than an endpoint keeps",
        t.fqdn_evicted.clone(),
    );
    reg.register(
        "fqdn_learn_stage_seconds",
        "Time the engine spent on a batch of learned DNS answers before releasing them, by stage (learn, compile, write, publish, persist)",
        t.fqdn_learn_stage_seconds.clone(),
    );
    reg.register(
        "fqdn_learned_answers",
        "DNS answers with addresses the engine learned",
        t.fqdn_learned_answers.clone(),
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

/// The prefilter's families go before the exposition's closing `# EOF`.
fn with_prefilter(
    mut text: String,
    view: Option<&palisade_api::prefilter::PrefilterView>,
) -> String {
    if let Some(v) = view {
        let at = text.rfind("# EOF").unwrap_or(text.len());
        text.insert_str(at, &crate::prefilter::metrics_text(v));
    }
    text
}

async fn metrics(State(s): State<MetricsState>) -> impl IntoResponse {
    // The flow counters include every event written before the scrape.
    s.flush.wait().await;
    match status(&s.status).await {
        Some(st) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            with_prefilter(
                render(&st, &s.telemetry),
                crate::prefilter::api::view(Arc::clone(&s.status.prefilter))
                    .await
                    .as_ref(),
            ),
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
    match status(&s.status).await {
        Some(st) if st.engine.maps_in_sync => (StatusCode::OK, "ok\n"),
        Some(_) => (StatusCode::SERVICE_UNAVAILABLE, "maps out of sync\n"),
        None => (StatusCode::SERVICE_UNAVAILABLE, "engine not responding\n"),
    }
}

/// Serves on an already bound listener (bound by the caller, so a bad address fails the
/// agent's start rather than a background task).
pub async fn serve(
    listener: std::net::TcpListener,
    status: StatusSource,
    telemetry: Arc<Telemetry>,
    flush: Flush,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    listener.set_nonblocking(true)?;
    let listener = tokio::net::TcpListener::from_std(listener)?;
    let addr: SocketAddr = listener.local_addr()?;
    info!(%addr, "metrics listening");
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .with_state(MetricsState {
            status,
            telemetry,
            flush,
        });
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datapath::CounterSample;
    use palisade_engine::views::EngineStatus;

    fn status() -> NodeStatus {
        NodeStatus {
            engine: EngineStatus {
                node_ip: std::net::Ipv4Addr::new(10, 200, 0, 1),
                pod_cidr: "10.200.0.0/16".parse().unwrap(),
                enforcement: palisade_policies::compile::EnforcementMode::Default,
                endpoints: 3,
                identities: 11,
                policies: 2,
                policy_map_entries: 7,
                ipcache_entries: 5,
                maps_in_sync: true,
                namespaces: std::collections::BTreeMap::default(),
                audit: false,
                namespace_modes: std::collections::BTreeMap::default(),
                audit_endpoints: vec![],
                audit_policies: vec![],
            },
            conntrack_entries: 4,
            flows_stored: 9,
            counters: vec![
                CounterSample {
                    direction: direction::INGRESS,
                    outcome: reason::drop::POLICY_DENIED,
                    packets: 5,
                    bytes: 300,
                },
                CounterSample {
                    direction: 0,
                    outcome: outcome::OUTCOME_EVENTS_LOST,
                    packets: 2,
                    bytes: 0,
                },
            ],
            violations: [("shop".to_string(), 3)].into(),
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
        assert!(
            text.contains("palisade_policy_violations_total{namespace=\"shop\"} 3"),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"));
    }
}
