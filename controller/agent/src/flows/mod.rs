//! Flows: datapath events and the proxy's requests turned into named flow records, the
//! bounded store that keeps them for `palisade observe`, and the connection log that keeps
//! their aggregate for learning (`learn`).

pub mod dns;
pub mod learn;
pub mod proxy;
pub mod store;

use std::net::Ipv4Addr;
use std::time::{Duration, SystemTime};

use palisade_api::flow::{Flow, FlowIp, FlowL4, FlowPeer, FlowPolicy};
use palisade_common::{
    direction, flow as ev,
    flow::FlowEvent,
    proto,
    reason::{self, drop_reason_name, verdict_name},
};
use palisade_engine::catalog::{Catalog, CatalogEndpoint, CatalogRule};
use palisade_engine::revalidate::EndedConnection;
use palisade_policies::model::Direction;

/// Converts the datapath's monotonic timestamps to wall-clock time.
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    boot_wall: SystemTime,
}

impl Clock {
    pub fn now() -> Self {
        let mono = crate::datapath::monotonic_now_ns();
        Self {
            boot_wall: SystemTime::now() - Duration::from_nanos(mono),
        }
    }

    pub fn wall(&self, mono_ns: u64) -> SystemTime {
        self.boot_wall + Duration::from_nanos(mono_ns)
    }
}

pub fn protocol_name(p: u8) -> String {
    match p {
        proto::TCP => "TCP".into(),
        proto::UDP => "UDP".into(),
        proto::ICMP => "ICMP".into(),
        proto::SCTP => "SCTP".into(),
        other => other.to_string(),
    }
}

fn tcp_flag_words(flags: u8) -> Vec<String> {
    const NAMES: [(u8, &str); 6] = [
        (0x02, "SYN"),
        (0x10, "ACK"),
        (0x01, "FIN"),
        (0x04, "RST"),
        (0x08, "PSH"),
        (0x20, "URG"),
    ];
    NAMES
        .iter()
        .filter(|(bit, _)| flags & bit != 0)
        .map(|(_, n)| n.to_string())
        .collect()
}

fn v4(addr: &[u8; 16]) -> Ipv4Addr {
    Ipv4Addr::new(addr[0], addr[1], addr[2], addr[3])
}

/// The policy behind a flow, as the catalog names its rule.
pub fn flow_policy(r: &CatalogRule) -> FlowPolicy {
    FlowPolicy {
        name: r.policy.clone(),
        kind: r.kind.clone(),
        rule: r.rule.clone(),
    }
}

/// A flow end: the endpoint at `addr` (if any) with the labels of `identity`.
pub fn peer(catalog: &Catalog, identity: u32, addr: Ipv4Addr) -> FlowPeer {
    let (namespace, name) = catalog
        .endpoints_by_ip
        .get(&addr)
        .cloned()
        .unwrap_or_default();
    FlowPeer {
        identity,
        namespace,
        name,
        labels: catalog.identity_labels(identity),
    }
}

/// An AUDIT flow no rule decided: the default deny of the policies selecting the endpoint in
/// that direction would have dropped it.
fn audited_default_deny(event: &FlowEvent, catalog: &Catalog) -> Option<FlowPolicy> {
    if event.verdict != palisade_common::reason::verdict::AUDIT || event.rule_id != 0 {
        return None;
    }
    let by = catalog.default_deny.get(&event.endpoint_id)?;
    let (policies, direction) = if event.direction == direction::INGRESS {
        (&by.ingress, "ingress")
    } else {
        (&by.egress, "egress")
    };
    if policies.is_empty() {
        return None;
    }
    let names = policies.join(", ");
    Some(FlowPolicy {
        rule: format!("default deny ({direction}) of {names}"),
        name: names,
        kind: "default-deny".to_string(),
    })
}

/// Turns a raw datapath event into a flow record.
pub fn enrich(event: &FlowEvent, catalog: &Catalog, clock: &Clock, seq: u64) -> Flow {
    let src = v4(&event.src_addr);
    let dst = v4(&event.dst_addr);
    let CatalogEndpoint {
        namespace: ep_ns,
        name: ep_name,
        labels: ep_labels,
    } = catalog
        .endpoints_by_id
        .get(&event.endpoint_id)
        .cloned()
        .unwrap_or_default();
    let ep_identity = if event.kind == ev::EVENT_PREFILTER_DROP {
        // The node's XDP prefilter judged it, on a host-facing interface, not an endpoint.
        palisade_common::identity::HOST
    } else if event.direction == direction::EGRESS {
        event.src_identity
    } else {
        event.dst_identity
    };
    let is_drop = event.verdict == palisade_common::reason::verdict::DROPPED;
    let (sport, dport) = (
        u16::from_be(event.src_port_be),
        u16::from_be(event.dst_port_be),
    );
    Flow {
        seq,
        time: humantime::format_rfc3339_micros(clock.wall(event.timestamp_ns)).to_string(),
        verdict: verdict_name(event.verdict).to_string(),
        drop_reason: is_drop.then(|| drop_reason_name(event.drop_reason).to_string()),
        drop_reason_code: is_drop.then_some(event.drop_reason),
        event: match event.kind {
            ev::EVENT_NEW_CONNECTION => "new-connection",
            ev::EVENT_REVALIDATION_DROP => "revalidation-drop",
            ev::EVENT_REVALIDATION_AUDIT => "revalidation-audit",
            ev::EVENT_PREFILTER_DROP => "prefilter-drop",
            _ => "drop",
        }
        .to_string(),
        direction: if event.direction == direction::INGRESS {
            "ingress"
        } else {
            "egress"
        }
        .to_string(),
        endpoint: FlowPeer {
            identity: ep_identity,
            namespace: ep_ns,
            name: ep_name,
            labels: if event.kind == ev::EVENT_PREFILTER_DROP {
                catalog.identity_labels(ep_identity)
            } else {
                ep_labels
            },
        },
        source: peer(catalog, event.src_identity, src),
        destination: peer(catalog, event.dst_identity, dst),
        ip: FlowIp {
            source: src,
            destination: dst,
        },
        l4: FlowL4 {
            protocol: protocol_name(event.protocol),
            source_port: if event.protocol == proto::ICMP {
                0
            } else {
                sport
            },
            destination_port: if event.protocol == proto::ICMP {
                0
            } else {
                dport
            },
            tcp_flags: if event.protocol == proto::TCP {
                tcp_flag_words(event.tcp_flags)
            } else {
                Vec::new()
            },
        },
        policy: catalog
            .rules
            .get(&event.rule_id)
            .map(flow_policy)
            .or_else(|| audited_default_deny(event, catalog)),
        packet_bytes: event.packet_len,
        http: None,
        tunnel: None,
        dns: None,
    }
}

/// A connection the engine ended because policy now sends it through the L7 proxy: a flow
/// with event `connection-reset`, verdict DROPPED and the redirecting rule.
pub fn ended_connection(ended: &EndedConnection, catalog: &Catalog, now: SystemTime) -> Flow {
    let c = &ended.connection;
    let CatalogEndpoint {
        namespace,
        name,
        labels,
    } = catalog
        .endpoints_by_id
        .get(&c.endpoint.0)
        .cloned()
        .unwrap_or_default();
    let (src, dst) = (*c.source.ip(), *c.destination.ip());
    let (src_identity, dst_identity) = (ended.source_identity.0, ended.destination_identity.0);
    let endpoint_identity = match c.scope {
        Direction::Egress => src_identity,
        Direction::Ingress => dst_identity,
    };
    Flow {
        seq: 0,
        time: humantime::format_rfc3339_micros(now).to_string(),
        verdict: verdict_name(reason::verdict::DROPPED).to_string(),
        drop_reason: Some(drop_reason_name(reason::drop::PROXY_REQUIRED).to_string()),
        drop_reason_code: Some(reason::drop::PROXY_REQUIRED),
        event: "connection-reset".to_string(),
        direction: c.scope.to_string(),
        endpoint: FlowPeer {
            identity: endpoint_identity,
            namespace,
            name,
            labels,
        },
        source: peer(catalog, src_identity, src),
        destination: peer(catalog, dst_identity, dst),
        ip: FlowIp {
            source: src,
            destination: dst,
        },
        l4: FlowL4 {
            protocol: protocol_name(c.protocol),
            source_port: c.source.port(),
            destination_port: c.destination.port(),
            tcp_flags: Vec::new(),
        },
        policy: catalog.rules.get(&ended.rule.0).map(flow_policy),
        packet_bytes: 0,
        http: None,
        tunnel: None,
        dns: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use palisade_common::reason::{drop, verdict};

    fn event() -> FlowEvent {
        FlowEvent {
            timestamp_ns: 1_000,
            endpoint_id: 2,
            src_identity: 256,
            dst_identity: 257,
            rule_id: 0,
            packet_len: 60,
            ifindex: 5,
            src_addr: [10, 200, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            dst_addr: [10, 200, 0, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            src_port_be: 40000u16.to_be(),
            dst_port_be: 5432u16.to_be(),
            family: 4,
            protocol: proto::TCP,
            direction: direction::INGRESS,
            verdict: verdict::DROPPED,
            drop_reason: drop::POLICY_DENIED,
            tcp_flags: 0x02,
            kind: ev::EVENT_DROP,
            _pad: [0; 5],
        }
    }

    fn catalog() -> Catalog {
        let mut c = Catalog::default();
        c.endpoints_by_id.insert(
            2,
            CatalogEndpoint {
                namespace: "demo".into(),
                name: "db".into(),
                labels: vec!["k8s:app=db".into()],
            },
        );
        c.endpoints_by_ip.insert(
            Ipv4Addr::new(10, 200, 0, 2),
            ("demo".into(), "frontend".into()),
        );
        c.endpoints_by_ip
            .insert(Ipv4Addr::new(10, 200, 0, 3), ("demo".into(), "db".into()));
        let workload = |app: &str| palisade_policies::identity::IdentitySource::Workload {
            labels: [("app".to_string(), app.to_string())].into_iter().collect(),
        };
        c.identities = std::sync::Arc::new(
            [
                (
                    palisade_policies::identity::Identity(256),
                    workload("frontend"),
                ),
                (palisade_policies::identity::Identity(257), workload("db")),
            ]
            .into_iter()
            .collect(),
        );
        c.rules.insert(
            9,
            CatalogRule {
                policy: "demo/deny-db".into(),
                kind: "palisade".into(),
                rule: "demo/deny-db ingress deny rule 0".into(),
            },
        );
        c
    }

    #[test]
    fn drop_event_becomes_a_named_flow() {
        let f = enrich(&event(), &catalog(), &Clock::now(), 7);
        assert_eq!(f.seq, 7);
        assert_eq!(f.verdict, "DROPPED");
        assert_eq!(f.drop_reason.as_deref(), Some("Policy denied"));
        assert_eq!(
            (f.source.name.as_str(), f.destination.name.as_str()),
            ("frontend", "db")
        );
        assert_eq!(f.endpoint.name, "db");
        assert_eq!(f.l4.destination_port, 5432);
        assert_eq!(f.l4.tcp_flags, vec!["SYN"]);
        assert!(f.policy.is_none());
        let line = f.compact();
        assert!(
            line.contains("demo/frontend:40000 -> demo/db:5432 TCP SYN DROPPED (Policy denied)"),
            "{line}"
        );
        assert!(line.contains("default deny on demo/db ingress"), "{line}");
    }

    #[test]
    fn an_audited_default_deny_names_the_selecting_policies() {
        let mut e = event();
        e.verdict = reason::verdict::AUDIT;
        e.drop_reason = 0;
        let mut c = catalog();
        assert!(
            enrich(&e, &c, &Clock::now(), 1).policy.is_none(),
            "not known: none"
        );
        c.default_deny.insert(
            2,
            palisade_engine::catalog::DefaultDenyBy {
                ingress: vec!["demo/db-in".into()],
                egress: vec![],
            },
        );
        let f = enrich(&e, &c, &Clock::now(), 1);
        let p = f.policy.unwrap();
        assert_eq!(p.name, "demo/db-in");
        assert_eq!(p.rule, "default deny (ingress) of demo/db-in");
        // A drop is not an audit.
        e.verdict = reason::verdict::DROPPED;
        assert!(enrich(&e, &c, &Clock::now(), 1).policy.is_none());
    }

    #[test]
    fn deny_rule_flows_name_the_policy() {
        let mut e = event();
        e.rule_id = 9;
        e.drop_reason = drop::POLICY_DENY_RULE;
        let f = enrich(&e, &catalog(), &Clock::now(), 1);
        assert_eq!(f.policy.as_ref().unwrap().name, "demo/deny-db");
        assert!(f.compact().ends_with("by demo/deny-db ingress deny rule 0"));
    }

    #[test]
    fn unknown_peers_show_their_address() {
        let mut e = event();
        e.src_addr[0] = 192;
        e.src_identity = 2;
        let f = enrich(&e, &catalog(), &Clock::now(), 1);
        assert!(f.source.name.is_empty());
        assert!(f.compact().contains("192.200.0.2:40000 -> demo/db:5432"));
    }
}
