//! Flows as learning material: each stored flow that says something about a connection
//! becomes an observation of the connection log (`palisade_policies::learn`), which keeps
//! the aggregate for days in bounded memory and is saved in the state directory; and what
//! `policy what-if` asks of the engine is built from that log and put back together here.
//! Pure functions, but for the file.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use palisade_api::flow::{Flow, FlowPeer};
use palisade_api::types::{WhatIfChange, WhatIfResult};
use palisade_engine::whatif::{HttpQuery, ReplayQuery, Replayed};
use palisade_policies::learn::{
    DnsObservation, FlowVerdict, Group, LogSnapshot, Observation, Sample, Seen,
};
use palisade_policies::model::Direction;

/// The IP protocol number of a flow's `l4.protocol`.
pub fn protocol_number(name: &str) -> Option<u8> {
    match name {
        "TCP" => Some(6),
        "UDP" => Some(17),
        "ICMP" => Some(1),
        "SCTP" => Some(132),
        other => other.parse().ok(),
    }
}

fn qualified(p: &FlowPeer) -> String {
    if p.name.is_empty() {
        String::new()
    } else {
        format!("{}/{}", p.namespace, p.name)
    }
}

/// What a flow teaches: new connections and what policy did to them (drops of a connection's
/// first packet, not of stray segments), connections a policy change stopped or audited, and
/// HTTP requests. Tunnels and resets add nothing a connection did not say already.
pub fn observation(f: &Flow) -> Option<Observation> {
    let verdict = FlowVerdict::parse(&f.verdict)?;
    let http = match f.event.as_str() {
        "new-connection" | "revalidation-drop" | "revalidation-audit" => None,
        "drop" => {
            let opening = f.l4.protocol != "TCP"
                || (f.l4.tcp_flags.iter().any(|t| t == "SYN")
                    && !f.l4.tcp_flags.iter().any(|t| t == "ACK"));
            if !opening {
                return None;
            }
            None
        }
        "http-request" => {
            let h = f.http.as_ref()?;
            if h.method.is_empty() {
                return None;
            }
            Some((h.method.clone(), h.path.clone()))
        }
        _ => return None,
    };
    let direction = match f.direction.as_str() {
        "ingress" => Direction::Ingress,
        "egress" => Direction::Egress,
        _ => return None,
    };
    let (own_ip, peer, peer_ip) = match direction {
        Direction::Egress => (f.ip.source, &f.destination, f.ip.destination),
        Direction::Ingress => (f.ip.destination, &f.source, f.ip.source),
    };
    let endpoint = Group::of_peer(f.endpoint.identity, &f.endpoint.labels, own_ip);
    if !endpoint.is_workload() || f.endpoint.name.is_empty() {
        return None;
    }
    Some(Observation {
        endpoint,
        direction,
        peer: Group::of_peer(peer.identity, &peer.labels, peer_ip),
        protocol: protocol_number(&f.l4.protocol)?,
        port: f.l4.destination_port,
        verdict,
        http,
        sample: Sample {
            endpoint: qualified(&f.endpoint),
            peer_address: peer_ip,
            peer: qualified(peer),
            rule: f
                .policy
                .as_ref()
                .map(|p| p.rule.clone())
                .unwrap_or_default(),
        },
    })
}

/// What a `dns-request` flow teaches: the name a workload looked up through the DNS proxy,
/// at which server, and the addresses answered (refused or failed lookups too, as drops,
/// never learned as something to allow).
pub fn dns_observation(f: &Flow) -> Option<DnsObservation> {
    if f.event != "dns-request" {
        return None;
    }
    let dns = f.dns.as_ref()?;
    if dns.query.is_empty() {
        return None;
    }
    let verdict = FlowVerdict::parse(&f.verdict)?;
    let endpoint = Group::of_peer(f.endpoint.identity, &f.endpoint.labels, f.ip.source);
    if !endpoint.is_workload() || f.endpoint.name.is_empty() {
        return None;
    }
    Some(DnsObservation {
        endpoint,
        server: Group::of_peer(
            f.destination.identity,
            &f.destination.labels,
            f.ip.destination,
        ),
        protocol: protocol_number(&f.l4.protocol)?,
        port: f.l4.destination_port,
        name: dns.query.clone(),
        answers: dns.answers.clone(),
        verdict,
        sample: Sample {
            endpoint: qualified(&f.endpoint),
            peer_address: f.ip.destination,
            peer: qualified(&f.destination),
            rule: f
                .policy
                .as_ref()
                .map(|p| p.rule.clone())
                .unwrap_or_default(),
        },
    })
}

/// Whether an aggregate is about `namespace` (either end in it).
pub fn touches(namespace: Option<&str>, a: &Group, b: &Group) -> bool {
    namespace.is_none_or(|ns| a.namespace() == Some(ns) || b.namespace() == Some(ns))
}

/// What one replay query stands for.
#[derive(Clone, Debug)]
pub struct QueryMeta {
    source: String,
    destination: String,
    source_sample: String,
    destination_sample: String,
    protocol: u8,
    http: Option<String>,
    flows: u64,
    first_seen: u64,
    last_seen: u64,
}

fn add_seen(meta: &mut QueryMeta, seen: &Seen) {
    meta.flows += seen.count;
    meta.first_seen = meta.first_seen.min(seen.first_seen);
    meta.last_seen = meta.last_seen.max(seen.last_seen);
}

fn samples(direction: Direction, s: &Sample) -> (String, String) {
    let peer = if s.peer.is_empty() {
        s.peer_address.to_string()
    } else {
        s.peer.clone()
    };
    match direction {
        Direction::Egress => (s.endpoint.clone(), peer),
        Direction::Ingress => (peer, s.endpoint.clone()),
    }
}

/// What tells replay queries apart: endpoint, direction, peer, protocol, port, request.
type QueryKey = (
    String,
    Direction,
    Ipv4Addr,
    u8,
    u16,
    Option<(String, String)>,
);

/// The queries `policy what-if` replays: one per distinct (endpoint, direction, peer
/// address, protocol, port, request) among the aggregates, whatever verdicts they had.
pub fn replay_queries(log: &LogSnapshot) -> Vec<(ReplayQuery, QueryMeta)> {
    let mut out: BTreeMap<QueryKey, (ReplayQuery, QueryMeta)> = BTreeMap::new();
    let mut add = |query: ReplayQuery, meta: QueryMeta, seen: &Seen| {
        let key = (
            query.endpoint.clone(),
            query.direction,
            query.peer,
            query.protocol,
            query.port,
            query
                .http
                .as_ref()
                .map(|h| (h.method.clone(), h.path.clone())),
        );
        let entry = out.entry(key).or_insert((query, meta));
        add_seen(&mut entry.1, seen);
    };
    for r in &log.connections {
        let (src, dst) = r.ends();
        let (source_sample, destination_sample) = samples(r.direction, &r.seen.sample);
        add(
            ReplayQuery {
                endpoint: r.seen.sample.endpoint.clone(),
                direction: r.direction,
                peer: r.seen.sample.peer_address,
                protocol: r.protocol,
                port: r.port,
                http: None,
            },
            QueryMeta {
                source: src.to_string(),
                destination: dst.to_string(),
                source_sample,
                destination_sample,
                protocol: r.protocol,
                http: None,
                flows: 0,
                first_seen: u64::MAX,
                last_seen: 0,
            },
            &r.seen,
        );
    }
    for r in &log.http {
        let (src, dst) = r.ends();
        let (source_sample, destination_sample) = samples(r.direction, &r.seen.sample);
        add(
            ReplayQuery {
                endpoint: r.seen.sample.endpoint.clone(),
                direction: r.direction,
                peer: r.seen.sample.peer_address,
                protocol: 6,
                port: r.port,
                http: Some(HttpQuery {
                    method: r.method.clone(),
                    path: r.path.clone(),
                    host: None,
                }),
            },
            QueryMeta {
                source: src.to_string(),
                destination: dst.to_string(),
                source_sample,
                destination_sample,
                protocol: 6,
                http: Some(format!("{} {}", r.method, r.path)),
                flows: 0,
                first_seen: u64::MAX,
                last_seen: 0,
            },
            &r.seen,
        );
    }
    out.into_values().collect()
}

/// The engine's judgements of `queries`, as the report `policy what-if` prints: what would
/// change, sorted by source, destination and what.
pub fn what_if_result(
    queries: &[(ReplayQuery, QueryMeta)],
    judged: &[Option<Replayed>],
) -> WhatIfResult {
    let mut result = WhatIfResult::default();
    for ((query, meta), replayed) in queries.iter().zip(judged) {
        let Some(r) = replayed else {
            result.skipped += 1;
            continue;
        };
        result.replayed += 1;
        result.flows += meta.flows;
        let (b, a) = (&r.before, &r.after);
        let change = match (b.allowed, a.allowed) {
            (true, false) => "newly-denied",
            (false, true) => "newly-allowed",
            (true, true) if !b.staged_deny && a.staged_deny => "newly-audited",
            (true, true) if b.staged_deny && !a.staged_deny => "no-longer-audited",
            _ => continue,
        };
        match change {
            "newly-denied" => result.newly_denied += 1,
            "newly-allowed" => result.newly_allowed += 1,
            "newly-audited" => result.newly_audited += 1,
            _ => {}
        }
        result.changes.push(WhatIfChange {
            source: meta.source.clone(),
            destination: meta.destination.clone(),
            source_sample: meta.source_sample.clone(),
            destination_sample: meta.destination_sample.clone(),
            side: format!("{} of {}", query.direction, query.endpoint),
            protocol: crate::flows::protocol_name(meta.protocol),
            port: query.port,
            http: meta.http.clone(),
            change: change.to_string(),
            before: b.reason.clone(),
            after: a.reason.clone(),
            endpoint_in_audit: a.endpoint_audit,
            flows: meta.flows,
            first_seen: meta.first_seen,
            last_seen: meta.last_seen,
        });
    }
    result.changes.sort_by(|x, y| {
        (&x.source, &x.destination, x.port, &x.http, &x.side).cmp(&(
            &y.source,
            &y.destination,
            y.port,
            &y.http,
            &y.side,
        ))
    });
    result
}

/// Why the connection log could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum LogFileError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a connection log: {source}")]
    Decode {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("writing {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The connection log's file in the state directory (`connections.json`), written whole
/// to a temporary file and renamed over the old one.
#[derive(Clone, Debug)]
pub struct LogFile {
    path: PathBuf,
}

impl LogFile {
    pub const NAME: &'static str = "connections.json";

    pub fn in_dir(dir: &Path) -> Self {
        Self {
            path: dir.join(Self::NAME),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The log kept by an earlier agent; None when there is none.
    pub fn load(&self) -> Result<Option<LogSnapshot>, LogFileError> {
        let bytes = match std::fs::read(&self.path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(LogFileError::Read {
                    path: self.path.clone(),
                    source,
                });
            }
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|source| LogFileError::Decode {
                path: self.path.clone(),
                source,
            })
    }

    pub fn save(&self, log: &LogSnapshot) -> Result<(), LogFileError> {
        let write = |source| LogFileError::Write {
            path: self.path.clone(),
            source,
        };
        let tmp = self.path.with_extension("json.tmp");
        let bytes = serde_json::to_vec(log).map_err(|e| write(std::io::Error::other(e)))?;
        std::fs::write(&tmp, bytes).map_err(write)?;
        std::fs::rename(&tmp, &self.path).map_err(write)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use palisade_api::flow::{FlowHttp, FlowIp, FlowL4, FlowPolicy};

    fn peer(ns: &str, name: &str, app: &str) -> FlowPeer {
        FlowPeer {
            identity: 300,
            namespace: ns.into(),
            name: name.into(),
            labels: vec![
                format!("k8s:app={app}"),
                format!("k8s:io.kubernetes.pod.namespace={ns}"),
            ],
        }
    }

    fn flow(event: &str, verdict: &str, flags: &[&str]) -> Flow {
        Flow {
            seq: 1,
            time: String::new(),
            verdict: verdict.into(),
            drop_reason: None,
            drop_reason_code: None,
            event: event.into(),
            direction: "ingress".into(),
            endpoint: peer("shop", "db-1", "db"),
            source: peer("shop", "api-1", "api"),
            destination: peer("shop", "db-1", "db"),
            ip: FlowIp {
                source: Ipv4Addr::new(10, 200, 0, 4),
                destination: Ipv4Addr::new(10, 200, 0, 5),
            },
            l4: FlowL4 {
                protocol: "TCP".into(),
                source_port: 40000,
                destination_port: 5432,
                tcp_flags: flags.iter().map(ToString::to_string).collect(),
            },
            policy: Some(FlowPolicy {
                name: "shop/db".into(),
                kind: "palisade".into(),
                rule: "shop/db ingress rule 0".into(),
            }),
            packet_bytes: 60,
            http: None,
            tunnel: None,
            dns: None,
        }
    }

    #[test]
    fn connections_and_requests_are_observed_from_the_judging_side() {
        let o = observation(&flow("new-connection", "FORWARDED", &["SYN"])).unwrap();
        assert_eq!(o.direction, Direction::Ingress);
        assert_eq!(o.endpoint.to_string(), "shop/app=db");
        assert_eq!(o.peer.to_string(), "shop/app=api");
        assert_eq!(
            (o.protocol, o.port, o.verdict),
            (6, 5432, FlowVerdict::Forwarded)
        );
        assert_eq!(o.sample.endpoint, "shop/db-1");
        assert_eq!(o.sample.peer, "shop/api-1");
        assert_eq!(o.sample.peer_address, Ipv4Addr::new(10, 200, 0, 4));
        assert_eq!(o.sample.rule, "shop/db ingress rule 0");
        // A dropped SYN is a connection attempt; a dropped stray ACK is not.
        assert!(observation(&flow("drop", "DROPPED", &["SYN"])).is_some());
        assert!(observation(&flow("drop", "DROPPED", &["ACK"])).is_none());
        assert!(observation(&flow("tunnel-opened", "FORWARDED", &[])).is_none());
        let mut h = flow("http-request", "AUDIT", &[]);
        h.http = Some(FlowHttp {
            method: "GET".into(),
            path: "/api/x".into(),
            host: None,
            status: 200,
            latency_us: 5,
        });
        let o = observation(&h).unwrap();
        assert_eq!(o.http, Some(("GET".into(), "/api/x".into())));
        assert_eq!(o.verdict, FlowVerdict::Audit);
        // Flows at something that is no endpoint teach nothing.
        let mut world = flow("new-connection", "FORWARDED", &["SYN"]);
        world.endpoint = FlowPeer::default();
        assert!(observation(&world).is_none());
    }

    #[test]
    fn a_dns_request_flow_is_a_lookup_of_the_asking_endpoint() {
        let mut f = flow("dns-request", "FORWARDED", &[]);
        f.direction = "egress".into();
        f.endpoint = peer("shop", "api-1", "api");
        f.source = peer("shop", "api-1", "api");
        f.destination = peer("kube-system", "dns-1", "kube-dns");
        f.ip = FlowIp {
            source: Ipv4Addr::new(10, 200, 0, 4),
            destination: Ipv4Addr::new(10, 200, 0, 53),
        };
        f.l4.protocol = "UDP".into();
        f.l4.destination_port = 53;
        f.dns = Some(palisade_api::flow::FlowDns {
            query: "api.example.test".into(),
            qtype: "A".into(),
            rcode: Some("NoError".into()),
            answers: vec![Ipv4Addr::new(192, 0, 2, 10)],
            ttl: 300,
            error: None,
            latency_us: 9,
        });
        assert!(observation(&f).is_none(), "a lookup is no connection");
        let o = dns_observation(&f).unwrap();
        assert_eq!(o.endpoint.to_string(), "shop/app=api");
        assert_eq!(o.server.to_string(), "kube-system/app=kube-dns");
        assert_eq!((o.protocol, o.port), (17, 53));
        assert_eq!(o.name, "api.example.test");
        assert_eq!(o.answers, vec![Ipv4Addr::new(192, 0, 2, 10)]);
        assert_eq!(o.sample.peer, "kube-system/dns-1");
        // A query that could not be read names nothing.
        f.dns.as_mut().unwrap().query.clear();
        assert!(dns_observation(&f).is_none());
        assert!(dns_observation(&flow("new-connection", "FORWARDED", &["SYN"])).is_none());
    }

    #[test]
    fn the_log_file_round_trips_and_a_missing_one_is_empty() {
        let dir = std::env::temp_dir().join(format!("palisade-logfile-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = LogFile::in_dir(&dir);
        let _ = std::fs::remove_file(file.path());
        assert!(file.load().unwrap().is_none());
        let mut log = palisade_policies::learn::ConnectionLog::new(
            palisade_policies::learn::LogLimits::default(),
        );
        log.record(
            observation(&flow("new-connection", "FORWARDED", &["SYN"])).unwrap(),
            7,
        );
        file.save(&log.snapshot()).unwrap();
        assert_eq!(file.load().unwrap().unwrap(), log.snapshot());
        std::fs::write(file.path(), b"{not json").unwrap();
        assert!(matches!(file.load(), Err(LogFileError::Decode { .. })));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
