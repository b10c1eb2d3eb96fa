//! Flows: datapath events enriched with names, labels and the policy behind the verdict; the
//! bounded store that keeps them; and the filters `palisade observe` applies.

pub mod filter;
pub mod store;

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::time::{Duration, SystemTime};

use palisade_common::{
    direction, flow as ev,
    flow::FlowEvent,
    proto,
    reason::{drop_reason_name, verdict_name},
};
use serde::{Deserialize, Serialize};

/// One side of a flow.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowPeer {
    pub identity: u32,
    /// Empty for peers that are not endpoints.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub namespace: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    pub labels: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowIp {
    pub source: Ipv4Addr,
    pub destination: Ipv4Addr,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowL4 {
    /// TCP, UDP, ICMP, SCTP or the protocol number.
    pub protocol: String,
    pub source_port: u16,
    pub destination_port: u16,
    /// TCP flags as words (`SYN`, `ACK`...), empty otherwise.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tcp_flags: Vec<String>,
}

/// The policy rule behind a verdict.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowPolicy {
    /// `ns/name` or `name` (clusterwide); empty for agent settings such as host access.
    pub name: String,
    pub kind: String,
    /// The rule in words, e.g. `demo/allow-frontend ingress rule 0`.
    pub rule: String,
}

/// The HTTP request behind an L7 flow.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowHttp {
    pub method: String,
    /// Normalized path (what policy matched), without the query.
    pub path: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// Status sent to the client (403 when policy denied, 400 for malformed requests).
    pub status: u16,
    /// From the complete request head to the response head, in microseconds.
    pub latency_us: u64,
}

/// A flow record (`palisade observe -o json` prints one per line; schema in docs/flows.md).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Flow {
    /// Position in the agent's flow buffer (monotonic).
    pub seq: u64,
    /// RFC 3339, microseconds, UTC.
    pub time: String,
    /// FORWARDED, DROPPED, AUDIT or REDIRECTED.
    pub verdict: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drop_reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drop_reason_code: Option<u8>,
    /// `new-connection`, `drop` or `revalidation-drop` (an established connection stopped
    /// because a policy change no longer allows it).
    pub event: String,
    /// Relative to `endpoint`: `ingress` (to it) or `egress` (from it).
    pub direction: String,
    /// The endpoint whose datapath judged the packet.
    pub endpoint: FlowPeer,
    pub source: FlowPeer,
    pub destination: FlowPeer,
    pub ip: FlowIp,
    pub l4: FlowL4,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<FlowPolicy>,
    pub packet_bytes: u32,
    /// Present for requests the L7 proxy handled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<FlowHttp>,
}

/// What the flow reader needs to turn numbers into names; the engine publishes a fresh one
/// after every change.
#[derive(Clone, Debug, Default)]
pub struct Catalog {
    pub endpoints_by_id: BTreeMap<u32, (String, String, Vec<String>)>,
    pub endpoints_by_ip: BTreeMap<Ipv4Addr, (String, String)>,
    pub identities: BTreeMap<u32, Vec<String>>,
    /// rule id -> (policy name, policy kind, rule in words)
    pub rules: BTreeMap<u32, (String, String, String)>,
}

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
        labels: catalog
            .identities
            .get(&identity)
            .cloned()
            .unwrap_or_default(),
    }
}

/// Turns a raw datapath event into a flow record.
pub fn enrich(event: &FlowEvent, catalog: &Catalog, clock: &Clock, seq: u64) -> Flow {
    let src = v4(&event.src_addr);
    let dst = v4(&event.dst_addr);
    let (ep_ns, ep_name, ep_labels) = catalog
        .endpoints_by_id
        .get(&event.endpoint_id)
        .cloned()
        .unwrap_or_default();
    let ep_identity = if event.direction == direction::EGRESS {
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
            labels: ep_labels,
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
            .map(|(name, kind, rule)| FlowPolicy {
                name: name.clone(),
                kind: kind.clone(),
                rule: rule.clone(),
            }),
        packet_bytes: event.packet_len,
        http: None,
    }
}

impl Flow {
    fn side(p: &FlowPeer, ip: Ipv4Addr, port: u16) -> String {
        let who = if p.name.is_empty() {
            ip.to_string()
        } else {
            format!("{}/{}", p.namespace, p.name)
        };
        if port == 0 {
            who
        } else {
            format!("{who}:{port}")
        }
    }

    /// One readable line, like `hubble observe`:
    /// `16:04:05.123 demo/frontend:41234 -> demo/db:5432 TCP SYN DROPPED (Policy denied)`.
    pub fn compact(&self) -> String {
        let time = self.time.get(11..23).unwrap_or(&self.time);
        let mut line = format!(
            "{time} {} -> {} {}",
            Self::side(&self.source, self.ip.source, self.l4.source_port),
            Self::side(
                &self.destination,
                self.ip.destination,
                self.l4.destination_port
            ),
            self.l4.protocol
        );
        if let Some(h) = &self.http {
            line = format!(
                "{time} {} -> {} HTTP {} {} -> {}",
                Self::side(&self.source, self.ip.source, 0),
                Self::side(
                    &self.destination,
                    self.ip.destination,
                    self.l4.destination_port
                ),
                h.method,
                h.path,
                h.status
            );
        } else if !self.l4.tcp_flags.is_empty() {
            line.push(' ');
            line.push_str(&self.l4.tcp_flags.join(","));
        }
        line.push(' ');
        line.push_str(&self.verdict);
        if let Some(reason) = &self.drop_reason {
            line.push_str(&format!(" ({reason})"));
        }
        match &self.policy {
            Some(p) => line.push_str(&format!(" by {}", p.rule)),
            None if self.verdict == "DROPPED"
                && self.drop_reason_code == Some(palisade_common::reason::drop::POLICY_DENIED) =>
            {
                line.push_str(&format!(
                    " by default deny on {} {}",
                    Self::side(&self.endpoint, Ipv4Addr::UNSPECIFIED, 0),
                    self.direction
                ));
            }
            None => {}
        }
        line
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
        c.endpoints_by_id
            .insert(2, ("demo".into(), "db".into(), vec!["k8s:app=db".into()]));
        c.endpoints_by_ip.insert(
            Ipv4Addr::new(10, 200, 0, 2),
            ("demo".into(), "frontend".into()),
        );
        c.endpoints_by_ip
            .insert(Ipv4Addr::new(10, 200, 0, 3), ("demo".into(), "db".into()));
        c.identities.insert(256, vec!["k8s:app=frontend".into()]);
        c.identities.insert(257, vec!["k8s:app=db".into()]);
        c.rules.insert(
            9,
            (
                "demo/deny-db".into(),
                "palisade".into(),
                "demo/deny-db ingress deny rule 0".into(),
            ),
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
