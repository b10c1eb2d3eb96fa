//! The DNS proxy's edges in the agent: its reports as `dns-request` flows (one per query:
//! name, type, response code, answers, verdict and the rule behind it), and its learner,
//! which hands an answer's addresses to the engine and returns once the maps hold them.

use std::sync::Arc;
use std::time::SystemTime;

use palisade_api::flow::{Flow, FlowDns, FlowIp, FlowL4};
use palisade_dns::server::{LearnError, Learned, Learner, Observer, Outcome, QueryRecord};
use palisade_engine::catalog::Catalog;
use palisade_engine::{AskError, Command, LearnRequest};
use palisade_policies::l7::DnsPolicy;
use tokio::sync::{mpsc, oneshot, watch};

use super::store::FlowStore;
use super::{flow_policy, peer};
use crate::metrics::Telemetry;

/// Turns the DNS proxy's reports into flows in the store, and counts them.
#[derive(Clone)]
pub struct DnsFlows {
    pub policy: watch::Receiver<Arc<DnsPolicy>>,
    pub catalog: watch::Receiver<Arc<Catalog>>,
    pub flows: Arc<FlowStore>,
    pub telemetry: Arc<Telemetry>,
}

/// The flow of one query, judged at the client's egress.
pub fn dns_flow(r: &QueryRecord, policy: &DnsPolicy, catalog: &Catalog) -> Flow {
    let client = policy.peer(*r.client.ip());
    let server = policy.peer(*r.server.ip());
    let source = peer(catalog, client.identity.0, *r.client.ip());
    let destination = peer(catalog, server.identity.0, *r.server.ip());
    let (verdict, drop_reason, error) = match &r.outcome {
        Outcome::Answered => ("FORWARDED", None, None),
        Outcome::Refused => ("DROPPED", Some("Policy denied (DNS)".to_string()), None),
        Outcome::Failed(why) => (
            "DROPPED",
            Some("DNS answer not usable".to_string()),
            Some(why.clone()),
        ),
        Outcome::Malformed(e) => (
            "DROPPED",
            Some("Invalid DNS message".to_string()),
            Some(e.to_string()),
        ),
        Outcome::Overloaded => ("DROPPED", Some("DNS proxy overloaded".to_string()), None),
    };
    Flow {
        seq: 0,
        time: humantime::format_rfc3339_micros(SystemTime::now()).to_string(),
        verdict: verdict.to_string(),
        drop_reason,
        drop_reason_code: None,
        event: "dns-request".to_string(),
        direction: "egress".to_string(),
        endpoint: source.clone(),
        source,
        destination,
        ip: FlowIp {
            source: *r.client.ip(),
            destination: *r.server.ip(),
        },
        l4: FlowL4 {
            protocol: r.transport.as_str().to_string(),
            source_port: r.client.port(),
            destination_port: r.server.port(),
            tcp_flags: Vec::new(),
        },
        policy: catalog.rules.get(&r.rule.0).map(flow_policy),
        packet_bytes: 0,
        http: None,
        tunnel: None,
        dns: Some(FlowDns {
            query: r.name.clone(),
            qtype: r.qtype.clone(),
            rcode: r.rcode.clone(),
            answers: r.answers.clone(),
            ttl: r.ttl,
            error,
            latency_us: u64::try_from(r.took.as_micros()).unwrap_or(u64::MAX),
        }),
    }
}

impl Observer for DnsFlows {
    fn query(&self, r: QueryRecord) {
        self.telemetry.count_dns(&r);
        let flow = dns_flow(&r, &self.policy.borrow(), &self.catalog.borrow());
        self.flows.push(SystemTime::now(), flow);
    }
}

/// Learns through the engine's task.
#[derive(Clone)]
pub struct EngineLearner {
    pub engine: mpsc::Sender<Command>,
}

impl Learner for EngineLearner {
    async fn learn(&self, learned: Learned) -> Result<(), LearnError> {
        let (tx, rx) = oneshot::channel();
        let req = LearnRequest {
            client: learned.client,
            names: learned.names,
            addresses: learned.addresses,
            ttl: learned.ttl,
        };
        self.engine
            .send(Command::FqdnLearn(req, tx))
            .await
            .map_err(|_| LearnError::Gone)?;
        let outcome = rx.await.map_err(|_| LearnError::Gone)?;
        // The name is saved soon after (the engine flushes lifetimes every second); the
        // answer does not wait for the disk.
        outcome
            .result
            .map(|_| ())
            .map_err(|e| LearnError::Refused(AskError::Engine(e).to_string()))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use palisade_dns::server::Transport;
    use palisade_policies::mapstate::RuleId;

    use super::*;

    #[test]
    fn a_refused_query_is_a_dropped_dns_flow_with_its_name() {
        let r = QueryRecord {
            client: "10.200.0.2:4000".parse().unwrap(),
            server: "10.200.0.3:53".parse().unwrap(),
            transport: Transport::Udp,
            name: "evil.test".into(),
            qtype: "A".into(),
            outcome: Outcome::Refused,
            rcode: Some("Refused".into()),
            answers: vec![],
            ttl: 0,
            rule: RuleId::NONE,
            took: Duration::from_micros(30),
            learn_took: Duration::ZERO,
        };
        let f = dns_flow(&r, &DnsPolicy::default(), &Catalog::default());
        assert_eq!(f.verdict, "DROPPED");
        assert_eq!(f.event, "dns-request");
        assert_eq!(f.l4.protocol, "UDP");
        let d = f.dns.as_ref().unwrap();
        assert_eq!(
            (d.query.as_str(), d.rcode.as_deref()),
            ("evil.test", Some("Refused"))
        );
        assert!(
            f.compact()
                .contains("DNS UDP A evil.test -> Refused DROPPED"),
            "{}",
            f.compact()
        );
    }
}
