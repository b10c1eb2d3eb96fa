//! The proxy's reports as flows: the agent's [`Observer`] for the L7 proxy. What every flow of
//! a connection shares is built once per connection, and again only when the policy or the
//! names change.

use std::net::SocketAddrV4;
use std::sync::Arc;
use std::time::SystemTime;

use palisade_api::flow::{Flow, FlowHttp, FlowIp, FlowL4};
use palisade_engine::catalog::Catalog;
use palisade_policies::l7::ProxyPolicy;
use palisade_proxy::http::RequestRecord;
use palisade_proxy::listener::{ConnectionObserver, Observer};
use tokio::sync::watch;

use super::store::FlowStore;
use super::{flow_policy, peer};
use crate::metrics::Telemetry;

/// Turns the proxy's reports into flows in the store, and counts them.
#[derive(Clone)]
pub struct ProxyFlows {
    pub policy: watch::Receiver<Arc<ProxyPolicy>>,
    pub catalog: watch::Receiver<Arc<Catalog>>,
    pub flows: Arc<FlowStore>,
    pub telemetry: Arc<Telemetry>,
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
    base: Option<FlowBase>,
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
        };
        Self {
            policy,
            catalog,
            direction,
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
}

impl ConnectionObserver for ConnectionFlows {
    fn request(&mut self, r: RequestRecord) {
        let (policy, catalog) = (
            Arc::clone(&self.shared.policy.borrow()),
            Arc::clone(&self.shared.catalog.borrow()),
        );
        let fresh = self
            .base
            .as_ref()
            .is_some_and(|b| Arc::ptr_eq(&b.policy, &policy) && Arc::ptr_eq(&b.catalog, &catalog));
        if !fresh {
            self.base = Some(FlowBase::new(
                self.client,
                self.destination,
                policy,
                catalog,
            ));
        }
        let Some(b) = &self.base else { return };
        let flow = b.flow(&r);
        self.shared.telemetry.count_request(b.direction, &r);
        self.shared.flows.push(SystemTime::now(), flow);
    }
}
