//! Policy learning: what the flows say workloads do, kept as an aggregate of connections, and
//! the policies that allow exactly that.
//!
//! - this module: workload groups ([`Group`], from the identity labels flows carry, without the
//!   labels that change with every rollout or name one pod), and [`ConnectionLog`], a bounded
//!   aggregate of observed connections and HTTP requests (who, to whom, port, protocol,
//!   verdict, counts, first and last seen) that outlives the ring of individual flows, and
//!   the DNS lookups each group made through the DNS proxy (name, server, the addresses
//!   answered);
//! - `suggest`: least-privilege policies from the aggregate, as deterministic YAML;
//! - `time`: the timestamps the aggregate keeps, in words.
//!
//! Plain data and plain functions: the agent feeds the log and persists its snapshot, the CLI
//! turns records into policies and maps.

pub mod map;
pub mod suggest;
pub mod time;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt;
use std::net::Ipv4Addr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::labels::{Labels, NAMESPACE_LABEL, NAMESPACE_LABELS_PREFIX};
use crate::model::Direction;

/// Pod labels that change with every rollout or name a single pod: never part of a group, so
/// never in a suggested selector (Kubernetes' and Cilium's own lists).
pub const UNSTABLE_LABELS: [&str; 9] = [
    "pod-template-hash",
    "controller-revision-hash",
    "pod-template-generation",
    "controller-uid",
    "batch.kubernetes.io/controller-uid",
    "statefulset.kubernetes.io/pod-name",
    "apps.kubernetes.io/pod-index",
    "batch.kubernetes.io/job-completion-index",
    "io.kubernetes.pod.name",
];

/// At most this many labels describe a group (the first, in key order).
pub const MAX_GROUP_LABELS: usize = 16;
/// HTTP paths longer than this are kept as their first bytes, marked truncated.
pub const MAX_PATH_BYTES: usize = 256;
/// HTTP methods longer than this are not learned (no real method is).
pub const MAX_METHOD_BYTES: usize = 16;
/// DNS names longer than this are not learned (no valid name is).
pub const MAX_DNS_NAME_BYTES: usize = 253;
/// A lookup keeps at most this many answered addresses (those of the newest answer first).
pub const MAX_DNS_ANSWERS: usize = 16;
/// Endpoint and peer names of samples are cut to this (namespace and name are 63 each).
const MAX_NAME_BYTES: usize = 128;

/// Who is at one end of a connection, as policy can name it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Group {
    /// Workloads of a namespace with these stable pod labels.
    Workload { namespace: String, labels: Labels },
    /// An address outside the cluster.
    World { address: Ipv4Addr },
    /// The node itself.
    Host,
    /// Another reserved identity (`init`, `unmanaged`, `health`, ...).
    Reserved { name: String },
}

impl Group {
    /// The group of a flow peer: its identity's labels (Cilium style, `k8s:app=web`,
    /// `reserved:host`, `cidr:10.0.0.0/8`) and its address.
    pub fn of_peer(identity: u32, labels: &[String], address: Ipv4Addr) -> Group {
        let mut namespace = None;
        let mut pod = Labels::new();
        let mut reserved = None;
        for l in labels {
            if let Some(kv) = l.strip_prefix("k8s:") {
                let Some((k, v)) = kv.split_once('=') else {
                    continue;
                };
                if k == NAMESPACE_LABEL {
                    namespace = Some(v.to_string());
                } else if !k.starts_with(NAMESPACE_LABELS_PREFIX)
                    && !UNSTABLE_LABELS.contains(&k)
                    && pod.len() < MAX_GROUP_LABELS
                {
                    pod.insert(k.to_string(), v.to_string());
                }
            } else if let Some(name) = l.strip_prefix("reserved:") {
                reserved.get_or_insert(name.to_string());
            }
        }
        if let Some(namespace) = namespace {
            return Group::Workload {
                namespace,
                labels: pod,
            };
        }
        match (identity, reserved.as_deref()) {
            (palisade_common::identity::HOST, _) | (_, Some("host")) => Group::Host,
            (palisade_common::identity::WORLD, _) | (_, Some("world")) => Group::World { address },
            // A CIDR identity is an address outside the cluster, named by a policy.
            _ if labels.iter().any(|l| l.starts_with("cidr:")) => Group::World { address },
            (_, Some(name)) => Group::Reserved {
                name: name.to_string(),
            },
            _ => Group::World { address },
        }
    }

    pub fn namespace(&self) -> Option<&str> {
        match self {
            Group::Workload { namespace, .. } => Some(namespace),
            _ => None,
        }
    }

    pub fn is_workload(&self) -> bool {
        matches!(self, Group::Workload { .. })
    }
}

impl fmt::Display for Group {
    /// `shop/app=web,tier=front`, `192.0.2.7`, `host`, `reserved:init`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Group::Workload { namespace, labels } => {
                let l: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
                if l.is_empty() {
                    write!(f, "{namespace}/(no labels)")
                } else {
                    write!(f, "{namespace}/{}", l.join(","))
                }
            }
            Group::World { address } => write!(f, "{address}"),
            Group::Host => f.write_str("host"),
            Group::Reserved { name } => write!(f, "reserved:{name}"),
        }
    }
}

/// A flow's verdict.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum FlowVerdict {
    Forwarded,
    Redirected,
    Audit,
    Dropped,
}

impl FlowVerdict {
    pub fn parse(s: &str) -> Option<FlowVerdict> {
        Some(match s {
            "FORWARDED" => FlowVerdict::Forwarded,
            "REDIRECTED" => FlowVerdict::Redirected,
            "AUDIT" => FlowVerdict::Audit,
            "DROPPED" => FlowVerdict::Dropped,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            FlowVerdict::Forwarded => "FORWARDED",
            FlowVerdict::Redirected => "REDIRECTED",
            FlowVerdict::Audit => "AUDIT",
            FlowVerdict::Dropped => "DROPPED",
        }
    }

    /// The connection happened (or would have, but for audit): policy should allow it.
    pub fn observed(self) -> bool {
        self != FlowVerdict::Dropped
    }
}

/// What one flow says, reduced to what the log keeps.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Observation {
    /// The endpoint whose side judged it.
    pub endpoint: Group,
    pub direction: Direction,
    pub peer: Group,
    /// IP protocol number.
    pub protocol: u8,
    /// Destination port (0 for ICMP).
    pub port: u16,
    pub verdict: FlowVerdict,
    /// For an HTTP request: method and normalized path.
    pub http: Option<(String, String)>,
    pub sample: Sample,
}

/// One concrete flow behind an aggregate, the newest seen: what `policy what-if` replays and
/// what names it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Sample {
    /// `ns/name` of the endpoint that judged it.
    pub endpoint: String,
    /// The far end's address.
    pub peer_address: Ipv4Addr,
    /// The far end's `ns/name`, empty when it is no endpoint.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub peer: String,
    /// The rule behind the verdict in words, empty when none.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub rule: String,
}

/// Counts and times (Unix seconds) of one aggregate.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Seen {
    pub count: u64,
    pub first_seen: u64,
    pub last_seen: u64,
    pub sample: Sample,
}

/// One aggregate of connections: the unit of learning, and of the service map.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectionRecord {
    pub endpoint: Group,
    pub direction: Direction,
    pub peer: Group,
    pub protocol: u8,
    pub port: u16,
    pub verdict: FlowVerdict,
    #[serde(flatten)]
    pub seen: Seen,
}

impl ConnectionRecord {
    /// (source, destination) of the connection.
    pub fn ends(&self) -> (&Group, &Group) {
        match self.direction {
            Direction::Egress => (&self.endpoint, &self.peer),
            Direction::Ingress => (&self.peer, &self.endpoint),
        }
    }
}

/// What one `dns-request` flow says: a workload group asked a DNS server for a name through
/// the DNS proxy, and what it was answered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DnsObservation {
    /// The group that asked.
    pub endpoint: Group,
    /// The DNS server it asked (its original destination).
    pub server: Group,
    /// IP protocol number (UDP or TCP).
    pub protocol: u8,
    /// The server's port.
    pub port: u16,
    /// The question's name, normalized (lower case, no trailing dot).
    pub name: String,
    /// The IPv4 addresses of the answer.
    pub answers: Vec<Ipv4Addr>,
    pub verdict: FlowVerdict,
    pub sample: Sample,
}

/// One aggregate of DNS lookups of one name by one group at one server.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DnsRecord {
    pub endpoint: Group,
    pub server: Group,
    pub protocol: u8,
    pub port: u16,
    pub name: String,
    /// Addresses the answers held (at most `MAX_DNS_ANSWERS`, sorted).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub answers: Vec<Ipv4Addr>,
    pub verdict: FlowVerdict,
    #[serde(flatten)]
    pub seen: Seen,
}

/// One aggregate of HTTP requests, as the L7 proxy judged them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HttpRecord {
    pub endpoint: Group,
    pub direction: Direction,
    pub peer: Group,
    pub port: u16,
    pub method: String,
    pub path: String,
    /// The path was longer than `MAX_PATH_BYTES` and is its beginning only.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub path_truncated: bool,
    pub verdict: FlowVerdict,
    #[serde(flatten)]
    pub seen: Seen,
}

impl HttpRecord {
    pub fn ends(&self) -> (&Group, &Group) {
        match self.direction {
            Direction::Egress => (&self.endpoint, &self.peer),
            Direction::Ingress => (&self.peer, &self.endpoint),
        }
    }
}

/// The log as plain data: what the agent persists and the API serves.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogSnapshot {
    pub connections: Vec<ConnectionRecord>,
    pub http: Vec<HttpRecord>,
    /// DNS lookups through the DNS proxy (absent in logs of older agents).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dns: Vec<DnsRecord>,
    /// Flows the log could not keep (its group table full even after eviction).
    #[serde(default)]
    pub not_kept: u64,
}

/// How much the log keeps, and for how long.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LogLimits {
    pub max_connections: usize,
    pub max_http: usize,
    /// DNS lookup aggregates.
    pub max_dns: usize,
    /// Distinct groups (both ends, all aggregates).
    pub max_groups: usize,
    /// Aggregates not seen for this long are forgotten.
    pub retention_secs: u64,
}

impl Default for LogLimits {
    fn default() -> Self {
        Self {
            max_connections: 16_384,
            max_http: 16_384,
            max_dns: 8_192,
            max_groups: 4_096,
            retention_secs: 7 * 24 * 3600,
        }
    }
}

impl LogLimits {
    /// An upper bound on the log's heap use, in bytes, whatever the flows: every aggregate
    /// at its largest (a sample with names of `MAX_NAME_BYTES`, a path of `MAX_PATH_BYTES`,
    /// hash-table overhead included; a DNS lookup with a name of `MAX_DNS_NAME_BYTES` and
    /// `MAX_DNS_ANSWERS` addresses) and every group with `MAX_GROUP_LABELS` labels of the
    /// longest valid key (317 bytes) and value (63).
    pub fn memory_bound(&self) -> usize {
        const ENTRY: usize = 96 + 2 * MAX_NAME_BYTES + 160 + 64;
        const HTTP_EXTRA: usize = MAX_PATH_BYTES + MAX_METHOD_BYTES + 48;
        const DNS_EXTRA: usize = MAX_DNS_NAME_BYTES + MAX_DNS_ANSWERS * 16 + 96;
        const GROUP: usize = 96 + MAX_GROUP_LABELS * (317 + 63 + 64);
        self.max_connections * ENTRY
            + self.max_http * (ENTRY + HTTP_EXTRA)
            + self.max_dns * (ENTRY + DNS_EXTRA)
            + self.max_groups * GROUP
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct ConnKey {
    endpoint: Arc<Group>,
    direction: Direction,
    peer: Arc<Group>,
    protocol: u8,
    port: u16,
    verdict: FlowVerdict,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct HttpKey {
    endpoint: Arc<Group>,
    direction: Direction,
    peer: Arc<Group>,
    port: u16,
    method: String,
    path: String,
    truncated: bool,
    verdict: FlowVerdict,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct DnsKey {
    endpoint: Arc<Group>,
    server: Arc<Group>,
    protocol: u8,
    port: u16,
    name: String,
    verdict: FlowVerdict,
}

/// What a DNS aggregate holds besides its key.
#[derive(Clone, Debug, PartialEq, Eq)]
struct DnsSeen {
    seen: Seen,
    answers: BTreeSet<Ipv4Addr>,
}

/// `answers` with `new` added, at most `MAX_DNS_ANSWERS`: the newest answer's addresses
/// stay, the lowest of the older ones go first.
fn add_answers(answers: &mut BTreeSet<Ipv4Addr>, new: &[Ipv4Addr]) {
    let newest: BTreeSet<Ipv4Addr> = new.iter().copied().take(MAX_DNS_ANSWERS).collect();
    answers.extend(newest.iter().copied());
    while answers.len() > MAX_DNS_ANSWERS {
        let Some(old) = answers.iter().find(|a| !newest.contains(a)).copied() else {
            break;
        };
        answers.remove(&old);
    }
}

fn cut(s: &str, max: usize) -> (String, bool) {
    if s.len() <= max {
        return (s.to_string(), false);
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    (s[..end].to_string(), true)
}

/// The aggregate of connections and HTTP requests, bounded by `LogLimits`: groups are shared
/// between aggregates, and when a table is full the least recently seen eighth of it goes.
#[derive(Debug, Default)]
pub struct ConnectionLog {
    limits: LogLimits,
    groups: HashSet<Arc<Group>>,
    connections: HashMap<ConnKey, Seen>,
    http: HashMap<HttpKey, Seen>,
    dns: HashMap<DnsKey, DnsSeen>,
    not_kept: u64,
    changed: bool,
}

impl ConnectionLog {
    pub fn new(limits: LogLimits) -> Self {
        Self {
            limits,
            ..Self::default()
        }
    }

    pub fn limits(&self) -> LogLimits {
        self.limits
    }

    /// Aggregates kept: (connections, HTTP requests, groups).
    pub fn len(&self) -> (usize, usize, usize) {
        (self.connections.len(), self.http.len(), self.groups.len())
    }

    /// DNS lookup aggregates kept.
    pub fn dns_len(&self) -> usize {
        self.dns.len()
    }

    pub fn is_empty(&self) -> bool {
        self.connections.is_empty() && self.http.is_empty() && self.dns.is_empty()
    }

    /// Whether anything changed since the last `take_changed`.
    pub fn take_changed(&mut self) -> bool {
        std::mem::take(&mut self.changed)
    }

    fn intern(&mut self, g: Group) -> Option<Arc<Group>> {
        if let Some(found) = self.groups.get(&g) {
            return Some(Arc::clone(found));
        }
        if self.groups.len() >= self.limits.max_groups {
            self.evict_connections();
            self.evict_http();
            self.evict_dns();
            self.purge_groups();
            if self.groups.len() >= self.limits.max_groups {
                return None;
            }
        }
        let g = Arc::new(g);
        self.groups.insert(Arc::clone(&g));
        Some(g)
    }

    /// Forgets groups no aggregate refers to.
    fn purge_groups(&mut self) {
        self.groups.retain(|g| Arc::strong_count(g) > 1);
    }

    fn oldest_eighth<K: Clone>(table: &HashMap<K, Seen>) -> Vec<K> {
        let mut by_age: Vec<(u64, &K)> = table.iter().map(|(k, s)| (s.last_seen, k)).collect();
        by_age.sort_unstable_by_key(|(t, _)| *t);
        let n = table.len().div_ceil(8).max(1);
        by_age.into_iter().take(n).map(|(_, k)| k.clone()).collect()
    }

    fn evict_connections(&mut self) {
        for k in Self::oldest_eighth(&self.connections) {
            self.connections.remove(&k);
        }
    }

    fn evict_http(&mut self) {
        for k in Self::oldest_eighth(&self.http) {
            self.http.remove(&k);
        }
    }

    fn evict_dns(&mut self) {
        let mut by_age: Vec<(u64, &DnsKey)> = self
            .dns
            .iter()
            .map(|(k, s)| (s.seen.last_seen, k))
            .collect();
        by_age.sort_unstable_by_key(|(t, _)| *t);
        let n = self.dns.len().div_ceil(8).max(1);
        let old: Vec<DnsKey> = by_age.into_iter().take(n).map(|(_, k)| k.clone()).collect();
        for k in old {
            self.dns.remove(&k);
        }
    }

    fn bump(seen: &mut Seen, sample: Sample, now: u64) {
        seen.count = seen.count.saturating_add(1);
        seen.first_seen = seen.first_seen.min(now);
        seen.last_seen = seen.last_seen.max(now);
        seen.sample = sample;
    }

    fn fresh(sample: Sample, now: u64, count: u64) -> Seen {
        Seen {
            count,
            first_seen: now,
            last_seen: now,
            sample,
        }
    }

    /// Adds one flow, seen at `now` (Unix seconds).
    pub fn record(&mut self, obs: Observation, now: u64) {
        let mut sample = obs.sample;
        sample.endpoint = cut(&sample.endpoint, MAX_NAME_BYTES).0;
        sample.peer = cut(&sample.peer, MAX_NAME_BYTES).0;
        sample.rule = cut(&sample.rule, MAX_NAME_BYTES * 2).0;
        let (Some(endpoint), Some(peer)) = (self.intern(obs.endpoint), self.intern(obs.peer))
        else {
            self.not_kept += 1;
            return;
        };
        self.changed = true;
        match obs.http {
            None => {
                let key = ConnKey {
                    endpoint,
                    direction: obs.direction,
                    peer,
                    protocol: obs.protocol,
                    port: obs.port,
                    verdict: obs.verdict,
                };
                if let Some(seen) = self.connections.get_mut(&key) {
                    Self::bump(seen, sample, now);
                    return;
                }
                if self.connections.len() >= self.limits.max_connections {
                    self.evict_connections();
                }
                self.connections.insert(key, Self::fresh(sample, now, 1));
            }
            Some((method, path)) => {
                if method.len() > MAX_METHOD_BYTES {
                    self.not_kept += 1;
                    return;
                }
                let (path, truncated) = cut(&path, MAX_PATH_BYTES);
                let key = HttpKey {
                    endpoint,
                    direction: obs.direction,
                    peer,
                    port: obs.port,
                    method,
                    path,
                    truncated,
                    verdict: obs.verdict,
                };
                if let Some(seen) = self.http.get_mut(&key) {
                    Self::bump(seen, sample, now);
                    return;
                }
                if self.http.len() >= self.limits.max_http {
                    self.evict_http();
                }
                self.http.insert(key, Self::fresh(sample, now, 1));
            }
        }
    }

    /// Adds one DNS lookup, seen at `now` (Unix seconds).
    pub fn record_dns(&mut self, obs: DnsObservation, now: u64) {
        if obs.name.is_empty() || obs.name.len() > MAX_DNS_NAME_BYTES {
            self.not_kept += 1;
            return;
        }
        let mut sample = obs.sample;
        sample.endpoint = cut(&sample.endpoint, MAX_NAME_BYTES).0;
        sample.peer = cut(&sample.peer, MAX_NAME_BYTES).0;
        sample.rule = cut(&sample.rule, MAX_NAME_BYTES * 2).0;
        let (Some(endpoint), Some(server)) = (self.intern(obs.endpoint), self.intern(obs.server))
        else {
            self.not_kept += 1;
            return;
        };
        self.changed = true;
        let key = DnsKey {
            endpoint,
            server,
            protocol: obs.protocol,
            port: obs.port,
            name: obs.name,
            verdict: obs.verdict,
        };
        if let Some(d) = self.dns.get_mut(&key) {
            Self::bump(&mut d.seen, sample, now);
            add_answers(&mut d.answers, &obs.answers);
            return;
        }
        if self.dns.len() >= self.limits.max_dns {
            self.evict_dns();
        }
        let mut answers = BTreeSet::new();
        add_answers(&mut answers, &obs.answers);
        self.dns.insert(
            key,
            DnsSeen {
                seen: Self::fresh(sample, now, 1),
                answers,
            },
        );
    }

    /// Forgets what was last seen before `now - retention`.
    pub fn expire(&mut self, now: u64) {
        let horizon = now.saturating_sub(self.limits.retention_secs);
        let before = (self.connections.len(), self.http.len(), self.dns.len());
        self.connections.retain(|_, s| s.last_seen >= horizon);
        self.http.retain(|_, s| s.last_seen >= horizon);
        self.dns.retain(|_, d| d.seen.last_seen >= horizon);
        if before != (self.connections.len(), self.http.len(), self.dns.len()) {
            self.changed = true;
            self.purge_groups();
        }
    }

    /// Everything kept, sorted (the same log gives the same snapshot). `keep` selects
    /// aggregates by their two ends and last sighting.
    pub fn snapshot_where(&self, keep: impl Fn(&Group, &Group, u64) -> bool) -> LogSnapshot {
        let mut connections: Vec<ConnectionRecord> = self
            .connections
            .iter()
            .filter(|(k, s)| keep(&k.endpoint, &k.peer, s.last_seen))
            .map(|(k, s)| ConnectionRecord {
                endpoint: (*k.endpoint).clone(),
                direction: k.direction,
                peer: (*k.peer).clone(),
                protocol: k.protocol,
                port: k.port,
                verdict: k.verdict,
                seen: s.clone(),
            })
            .collect();
        connections.sort_by(|a, b| {
            (
                &a.endpoint,
                a.direction,
                &a.peer,
                a.protocol,
                a.port,
                a.verdict,
            )
                .cmp(&(
                    &b.endpoint,
                    b.direction,
                    &b.peer,
                    b.protocol,
                    b.port,
                    b.verdict,
                ))
        });
        let mut http: Vec<HttpRecord> = self
            .http
            .iter()
            .filter(|(k, s)| keep(&k.endpoint, &k.peer, s.last_seen))
            .map(|(k, s)| HttpRecord {
                endpoint: (*k.endpoint).clone(),
                direction: k.direction,
                peer: (*k.peer).clone(),
                port: k.port,
                method: k.method.clone(),
                path: k.path.clone(),
                path_truncated: k.truncated,
                verdict: k.verdict,
                seen: s.clone(),
            })
            .collect();
        http.sort_by(|a, b| {
            (
                &a.endpoint,
                a.direction,
                &a.peer,
                a.port,
                &a.method,
                &a.path,
                a.verdict,
            )
                .cmp(&(
                    &b.endpoint,
                    b.direction,
                    &b.peer,
                    b.port,
                    &b.method,
                    &b.path,
                    b.verdict,
                ))
        });
        let mut dns: Vec<DnsRecord> = self
            .dns
            .iter()
            .filter(|(k, d)| keep(&k.endpoint, &k.server, d.seen.last_seen))
            .map(|(k, d)| DnsRecord {
                endpoint: (*k.endpoint).clone(),
                server: (*k.server).clone(),
                protocol: k.protocol,
                port: k.port,
                name: k.name.clone(),
                answers: d.answers.iter().copied().collect(),
                verdict: k.verdict,
                seen: d.seen.clone(),
            })
            .collect();
        dns.sort_by(|a, b| {
            (
                &a.endpoint,
                &a.server,
                a.protocol,
                a.port,
                &a.name,
                a.verdict,
            )
                .cmp(&(
                    &b.endpoint,
                    &b.server,
                    b.protocol,
                    b.port,
                    &b.name,
                    b.verdict,
                ))
        });
        LogSnapshot {
            connections,
            http,
            dns,
            not_kept: self.not_kept,
        }
    }

    pub fn snapshot(&self) -> LogSnapshot {
        self.snapshot_where(|_, _, _| true)
    }

    /// A log holding `snapshot` (as far as `limits` allow: the newest first).
    pub fn restore(snapshot: LogSnapshot, limits: LogLimits) -> Self {
        let mut log = Self::new(limits);
        log.not_kept = snapshot.not_kept;
        let mut connections = snapshot.connections;
        connections.sort_by_key(|r| std::cmp::Reverse(r.seen.last_seen));
        for r in connections.into_iter().take(limits.max_connections) {
            let (Some(endpoint), Some(peer)) = (log.intern(r.endpoint), log.intern(r.peer)) else {
                continue;
            };
            log.connections.insert(
                ConnKey {
                    endpoint,
                    direction: r.direction,
                    peer,
                    protocol: r.protocol,
                    port: r.port,
                    verdict: r.verdict,
                },
                r.seen,
            );
        }
        let mut http = snapshot.http;
        http.sort_by_key(|r| std::cmp::Reverse(r.seen.last_seen));
        for r in http.into_iter().take(limits.max_http) {
            let (Some(endpoint), Some(peer)) = (log.intern(r.endpoint), log.intern(r.peer)) else {
                continue;
            };
            let (path, cut_now) = cut(&r.path, MAX_PATH_BYTES);
            log.http.insert(
                HttpKey {
                    endpoint,
                    direction: r.direction,
                    peer,
                    port: r.port,
                    method: r.method,
                    path,
                    truncated: r.path_truncated || cut_now,
                    verdict: r.verdict,
                },
                r.seen,
            );
        }
        let mut dns = snapshot.dns;
        dns.sort_by_key(|r| std::cmp::Reverse(r.seen.last_seen));
        for r in dns.into_iter().take(limits.max_dns) {
            if r.name.is_empty() || r.name.len() > MAX_DNS_NAME_BYTES {
                continue;
            }
            let (Some(endpoint), Some(server)) = (log.intern(r.endpoint), log.intern(r.server))
            else {
                continue;
            };
            let mut answers = BTreeSet::new();
            add_answers(&mut answers, &r.answers);
            log.dns.insert(
                DnsKey {
                    endpoint,
                    server,
                    protocol: r.protocol,
                    port: r.port,
                    name: r.name,
                    verdict: r.verdict,
                },
                DnsSeen {
                    seen: r.seen,
                    answers,
                },
            );
        }
        log
    }
}

/// Groups by namespace, for choosing selectors that tell a namespace's workloads apart.
pub fn workloads_by_namespace<'a>(
    groups: impl IntoIterator<Item = &'a Group>,
) -> BTreeMap<&'a str, Vec<&'a Labels>> {
    let mut out: BTreeMap<&str, Vec<&Labels>> = BTreeMap::new();
    for g in groups {
        if let Group::Workload { namespace, labels } = g {
            let v = out.entry(namespace.as_str()).or_default();
            if !v.contains(&labels) {
                v.push(labels);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn workload(ns: &str, labels: &[(&str, &str)]) -> Group {
        Group::Workload {
            namespace: ns.into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    fn obs(from: &str, to: u16, verdict: FlowVerdict) -> Observation {
        Observation {
            endpoint: workload("shop", &[("app", from)]),
            direction: Direction::Egress,
            peer: workload("shop", &[("app", "db")]),
            protocol: 6,
            port: to,
            verdict,
            http: None,
            sample: Sample {
                endpoint: format!("shop/{from}-1"),
                peer_address: Ipv4Addr::new(10, 200, 0, 9),
                peer: "shop/db-1".into(),
                rule: String::new(),
            },
        }
    }

    #[test]
    fn groups_keep_stable_pod_labels_only() {
        let labels: Vec<String> = [
            "k8s:app=web",
            "k8s:pod-template-hash=5d8f7c",
            "k8s:statefulset.kubernetes.io/pod-name=web-0",
            "k8s:io.kubernetes.pod.namespace=shop",
            "k8s:io.cilium.k8s.namespace.labels.team=blue",
            "k8s:tier=front",
        ]
        .iter()
        .map(ToString::to_string)
        .collect();
        let g = Group::of_peer(300, &labels, Ipv4Addr::new(10, 200, 0, 2));
        assert_eq!(g, workload("shop", &[("app", "web"), ("tier", "front")]));
        assert_eq!(g.to_string(), "shop/app=web,tier=front");
        let world = Group::of_peer(2, &["reserved:world".into()], Ipv4Addr::new(192, 0, 2, 7));
        assert_eq!(world.to_string(), "192.0.2.7");
        let cidr = Group::of_peer(
            (1 << 24) | 3,
            &["cidr:192.0.2.0/24".into(), "reserved:world".into()],
            Ipv4Addr::new(192, 0, 2, 8),
        );
        assert_eq!(
            cidr,
            Group::World {
                address: Ipv4Addr::new(192, 0, 2, 8)
            }
        );
        assert_eq!(
            Group::of_peer(1, &["reserved:host".into()], Ipv4Addr::LOCALHOST),
            Group::Host
        );
        assert_eq!(
            Group::of_peer(5, &["reserved:init".into()], Ipv4Addr::LOCALHOST).to_string(),
            "reserved:init"
        );
    }

    #[test]
    fn the_log_counts_each_connection_kind_once_with_first_and_last_seen() {
        let mut log = ConnectionLog::new(LogLimits::default());
        log.record(obs("api", 5432, FlowVerdict::Forwarded), 100);
        log.record(obs("api", 5432, FlowVerdict::Forwarded), 160);
        log.record(obs("api", 5432, FlowVerdict::Dropped), 170);
        log.record(obs("web", 5432, FlowVerdict::Forwarded), 120);
        let s = log.snapshot();
        assert_eq!(s.connections.len(), 3);
        let api = &s.connections[0];
        assert_eq!(
            (
                api.seen.count,
                api.seen.first_seen,
                api.seen.last_seen,
                api.verdict
            ),
            (2, 100, 160, FlowVerdict::Forwarded)
        );
        assert_eq!(log.len().2, 3, "web, api and db: groups are shared");
        // A restored log is the same log.
        let back = ConnectionLog::restore(s.clone(), LogLimits::default());
        assert_eq!(back.snapshot(), s);
        let json = serde_json::to_string(&s).unwrap();
        assert_eq!(serde_json::from_str::<LogSnapshot>(&json).unwrap(), s);
    }

    #[test]
    fn the_log_stays_within_its_limits_and_forgets_the_oldest() {
        let limits = LogLimits {
            max_connections: 64,
            max_http: 8,
            max_dns: 8,
            max_groups: 16,
            retention_secs: 1000,
        };
        let mut log = ConnectionLog::new(limits);
        for i in 0..10_000u16 {
            let mut o = obs(&format!("w{}", i % 40), i, FlowVerdict::Forwarded);
            if i % 3 == 0 {
                o.http = Some(("GET".into(), format!("/p/{i}/{}", "x".repeat(400))));
            }
            log.record(o, u64::from(i));
        }
        let (c, h, g) = log.len();
        assert!(c <= 64 && h <= 8 && g <= 16, "{c} {h} {g}");
        let s = log.snapshot();
        // The newest survived, the oldest went.
        assert!(s.connections.iter().any(|r| r.port == 9_998));
        assert!(s.connections.iter().all(|r| r.seen.last_seen > 9_000));
        assert!(
            s.http
                .iter()
                .all(|r| r.path.len() <= MAX_PATH_BYTES && r.path_truncated)
        );
        log.expire(10_000 + 995);
        assert!(
            log.snapshot()
                .connections
                .iter()
                .all(|r| r.seen.last_seen >= 9_995)
        );
        log.expire(100_000);
        assert!(log.is_empty());
        assert_eq!(log.len().2, 0, "no aggregate, no group");
    }

    fn lookup(name: &str, answers: &[[u8; 4]]) -> DnsObservation {
        DnsObservation {
            endpoint: workload("shop", &[("app", "api")]),
            server: workload("kube-system", &[("k8s-app", "kube-dns")]),
            protocol: 17,
            port: 53,
            name: name.into(),
            answers: answers.iter().map(|a| Ipv4Addr::from(*a)).collect(),
            verdict: FlowVerdict::Forwarded,
            sample: Sample {
                endpoint: "shop/api-1".into(),
                peer_address: Ipv4Addr::new(10, 200, 0, 53),
                peer: "kube-system/dns-1".into(),
                rule: String::new(),
            },
        }
    }

    #[test]
    fn dns_lookups_are_counted_per_name_with_their_answers_bounded_and_restored() {
        let mut log = ConnectionLog::new(LogLimits::default());
        log.record_dns(lookup("api.example.test", &[[192, 0, 2, 10]]), 100);
        log.record_dns(lookup("api.example.test", &[[192, 0, 2, 11]]), 130);
        log.record_dns(lookup("cdn.example.test", &[]), 120);
        // Many rotating answers: at most MAX_DNS_ANSWERS kept, the newest answer among them.
        for i in 0..40u8 {
            log.record_dns(lookup("rotating.example.test", &[[198, 51, 100, i]]), 200);
        }
        log.record_dns(lookup(&"a".repeat(300), &[]), 200);
        let s = log.snapshot();
        assert_eq!(s.dns.len(), 3);
        assert_eq!(s.not_kept, 1, "an overlong name is not kept");
        let api = &s.dns[0];
        assert_eq!(api.name, "api.example.test");
        assert_eq!(
            (api.seen.count, api.seen.first_seen, api.seen.last_seen),
            (2, 100, 130)
        );
        assert_eq!(
            api.answers,
            vec![Ipv4Addr::new(192, 0, 2, 10), Ipv4Addr::new(192, 0, 2, 11)]
        );
        let rotating = &s.dns[2];
        assert_eq!(rotating.answers.len(), MAX_DNS_ANSWERS);
        assert!(rotating.answers.contains(&Ipv4Addr::new(198, 51, 100, 39)));
        assert_eq!(log.len().2, 2, "groups are shared with connections");
        // Persisted and restored with the rest of the log.
        let json = serde_json::to_string(&s).unwrap();
        let back: LogSnapshot = serde_json::from_str(&json).unwrap();
        assert_eq!(back, s);
        assert_eq!(
            ConnectionLog::restore(back, LogLimits::default()).snapshot(),
            s
        );
        // A log written before lookups were kept still reads.
        let old: LogSnapshot = serde_json::from_str(r#"{"connections":[],"http":[]}"#).unwrap();
        assert!(old.dns.is_empty());
        // Expired like the rest.
        log.expire(150 + LogLimits::default().retention_secs);
        assert_eq!(log.dns_len(), 1);
        log.expire(10_000 + LogLimits::default().retention_secs);
        assert!(log.is_empty());
        assert_eq!(log.len().2, 0);
    }

    #[test]
    fn the_dns_table_stays_within_its_limit() {
        let limits = LogLimits {
            max_dns: 32,
            ..LogLimits::default()
        };
        let mut log = ConnectionLog::new(limits);
        for i in 0..1000u64 {
            log.record_dns(lookup(&format!("n{i}.example.test"), &[[192, 0, 2, 1]]), i);
        }
        assert!(log.dns_len() <= 32);
        assert!(
            log.snapshot()
                .dns
                .iter()
                .any(|r| r.name == "n999.example.test")
        );
        assert!(log.snapshot().dns.iter().all(|r| r.seen.last_seen > 900));
    }

    #[test]
    fn the_memory_bound_of_the_default_limits() {
        let bound = LogLimits::default().memory_bound();
        assert!(bound < 64 << 20, "{bound}");
        assert!(bound > 8 << 20, "{bound}");
    }
}
