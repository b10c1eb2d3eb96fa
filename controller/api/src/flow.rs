//! Flow records: what `palisade observe -o json` prints, one per line (schema in
//! docs/flows.md), and the one-line form `palisade observe` shows by default.

use std::fmt::Write as _;
use std::net::Ipv4Addr;

use palisade_common::reason::drop::POLICY_DENIED;
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

/// The DNS query behind a `dns-request` flow (the DNS proxy's).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowDns {
    /// The question's name, normalized (lower case, no trailing dot); empty when the query
    /// could not be read.
    pub query: String,
    /// The question's type: `A`, `AAAA`, ...
    pub qtype: String,
    /// The response code the client got: the server's (`NoError`, `NXDomain`...) or the
    /// proxy's own (`Refused` for a name policy does not allow, `ServFail` when the server's
    /// answer could not be used); absent when nothing was answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rcode: Option<String>,
    /// The IPv4 addresses of the answer, learned for `toFQDNs`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub answers: Vec<Ipv4Addr>,
    /// The answer's TTL, in seconds.
    #[serde(default)]
    pub ttl: u32,
    /// Why the proxy answered or dropped it itself, when it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// From the query's arrival to the answer's release, in microseconds.
    pub latency_us: u64,
}

/// A tunnel the L7 proxy relays after a 101 (`tunnel-opened` and `tunnel-closed` flows).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowTunnel {
    /// The protocol the server switched to (its 101's Upgrade), e.g. `websocket`.
    pub protocol: String,
    /// Bytes relayed from the client to the server; 0 when the tunnel opens.
    pub bytes_to_server: u64,
    /// Bytes relayed from the server to the client; 0 when the tunnel opens.
    pub bytes_to_client: u64,
    /// How long the tunnel was open, in microseconds (`tunnel-closed` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_us: Option<u64>,
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
    /// `new-connection`, `drop`, `revalidation-drop` (an established connection stopped
    /// because a policy change no longer allows it) or `revalidation-audit` (one that audit
    /// mode keeps although the change no longer allows it); from the L7 proxy `http-request`,
    /// `tunnel-opened` and `tunnel-closed`.
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
    /// Present for tunnels the L7 proxy relays after a 101.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tunnel: Option<FlowTunnel>,
    /// Present for queries the DNS proxy handled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns: Option<FlowDns>,
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
        if let Some(t) = &self.tunnel {
            line = format!(
                "{time} {} -> {} TUNNEL {} {}",
                Self::side(&self.source, self.ip.source, self.l4.source_port),
                Self::side(
                    &self.destination,
                    self.ip.destination,
                    self.l4.destination_port
                ),
                t.protocol,
                self.event.strip_prefix("tunnel-").unwrap_or(&self.event),
            );
            if self.event == "tunnel-closed" {
                let _ = write!(
                    line,
                    " ({} B to server, {} B to client)",
                    t.bytes_to_server, t.bytes_to_client
                );
            }
        } else if let Some(d) = &self.dns {
            line = format!(
                "{time} {} -> {} DNS {} {} {}",
                Self::side(&self.source, self.ip.source, self.l4.source_port),
                Self::side(
                    &self.destination,
                    self.ip.destination,
                    self.l4.destination_port
                ),
                self.l4.protocol,
                d.qtype,
                if d.query.is_empty() { "?" } else { &d.query },
            );
            if let Some(rcode) = &d.rcode {
                let _ = write!(line, " -> {rcode}");
            }
            if !d.answers.is_empty() {
                let list: Vec<String> = d.answers.iter().map(ToString::to_string).collect();
                let _ = write!(line, " [{}] TTL {}", list.join(","), d.ttl);
            }
        } else if let Some(h) = &self.http {
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
        // Writing into a String cannot fail.
        if let Some(reason) = &self.drop_reason {
            let _ = write!(line, " ({reason})");
        }
        match &self.policy {
            Some(p) => {
                let _ = write!(line, " by {}", p.rule);
            }
            None if self.verdict == "DROPPED" && self.drop_reason_code == Some(POLICY_DENIED) => {
                let _ = write!(
                    line,
                    " by default deny on {} {}",
                    Self::side(&self.endpoint, Ipv4Addr::UNSPECIFIED, 0),
                    self.direction
                );
            }
            None => {}
        }
        line
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tunnel_flow(event: &str, tunnel: FlowTunnel) -> Flow {
        let peer = |name: &str, identity| FlowPeer {
            identity,
            namespace: "x".into(),
            name: name.into(),
            labels: vec![],
        };
        Flow {
            seq: 7,
            time: "2026-11-28T16:00:00.123456Z".into(),
            verdict: "FORWARDED".into(),
            drop_reason: None,
            drop_reason_code: None,
            event: event.into(),
            direction: "ingress".into(),
            endpoint: peer("api", 257),
            source: peer("client", 256),
            destination: peer("api", 257),
            ip: FlowIp {
                source: Ipv4Addr::new(10, 200, 0, 2),
                destination: Ipv4Addr::new(10, 200, 0, 3),
            },
            l4: FlowL4 {
                protocol: "TCP".into(),
                source_port: 40000,
                destination_port: 80,
                tcp_flags: vec![],
            },
            policy: Some(FlowPolicy {
                name: "x/api-l7".into(),
                kind: "palisade".into(),
                rule: "x/api-l7 ingress rule 0".into(),
            }),
            packet_bytes: 0,
            http: None,
            tunnel: Some(tunnel),
            dns: None,
        }
    }

    #[test]
    fn tunnel_flows_say_what_the_tunnel_carried() {
        let opened = tunnel_flow(
            "tunnel-opened",
            FlowTunnel {
                protocol: "websocket".into(),
                bytes_to_server: 0,
                bytes_to_client: 0,
                duration_us: None,
            },
        );
        assert_eq!(
            opened.compact(),
            "16:00:00.123 x/client:40000 -> x/api:80 TUNNEL websocket opened FORWARDED by x/api-l7 ingress rule 0"
        );
        let closed = tunnel_flow(
            "tunnel-closed",
            FlowTunnel {
                protocol: "websocket".into(),
                bytes_to_server: 12,
                bytes_to_client: 3456,
                duration_us: Some(1_500_000),
            },
        );
        assert_eq!(
            closed.compact(),
            "16:00:00.123 x/client:40000 -> x/api:80 TUNNEL websocket closed (12 B to server, 3456 B to client) FORWARDED by x/api-l7 ingress rule 0"
        );
        let json = serde_json::to_value(&closed).unwrap();
        assert_eq!(
            json["tunnel"],
            serde_json::json!({
                "protocol": "websocket",
                "bytes_to_server": 12,
                "bytes_to_client": 3456,
                "duration_us": 1_500_000,
            })
        );
        assert!(json.get("http").is_none());
        let back: Flow = serde_json::from_value(json).unwrap();
        assert_eq!(back, closed);
    }

    #[test]
    fn flows_without_a_tunnel_serialize_as_before() {
        let mut flow = tunnel_flow(
            "http-request",
            FlowTunnel {
                protocol: String::new(),
                bytes_to_server: 0,
                bytes_to_client: 0,
                duration_us: None,
            },
        );
        flow.tunnel = None;
        let json = serde_json::to_value(&flow).unwrap();
        assert!(json.get("tunnel").is_none(), "{json}");
        // Records written before the field existed still read.
        let back: Flow = serde_json::from_value(json).unwrap();
        assert_eq!(back.tunnel, None);
    }
}
