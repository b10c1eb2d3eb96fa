//! The agent API's JSON shapes. These are what `-o json` prints, so they are a stable,
//! documented contract (docs/api.md); add fields, never rename them.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use palisade_policies::endpoint::NamedPort;
use palisade_policies::labels::Labels;
use palisade_policies::manifest::ManifestError;
use serde::{Deserialize, Serialize};

use crate::filter::FlowFilter;

/// The body of every error answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// One line, naming what failed and with which input.
    pub error: String,
    /// For a rejected manifest: which document, object and field, and why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manifest: Option<ManifestError>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointAddRequest {
    pub name: String,
    pub namespace: String,
    #[serde(default)]
    pub labels: Labels,
    #[serde(default)]
    pub ip: Option<Ipv4Addr>,
    #[serde(default)]
    pub named_ports: Vec<NamedPort>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LabelChange {
    #[serde(default)]
    pub set: Labels,
    #[serde(default)]
    pub remove: Vec<String>,
}

/// Policies selecting an endpoint, per direction, as `ns/name` (or `name` if clusterwide).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SelectingPolicies {
    pub ingress: Vec<String>,
    pub egress: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointView {
    pub id: u32,
    pub name: String,
    pub namespace: String,
    pub labels: Labels,
    pub ip: Ipv4Addr,
    pub identity: u32,
    /// Host-side interface in the node namespace.
    pub interface: String,
    pub ifindex: u32,
    /// `ip netns` name of the endpoint's namespace.
    pub netns: String,
    pub named_ports: Vec<NamedPort>,
    pub ingress_enforced: bool,
    pub egress_enforced: bool,
    pub policies: SelectingPolicies,
    /// For a container a runtime attached through the CNI plugin: its container id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_id: Option<String>,
    /// Its labels are not known yet: it holds the reserved `init` identity (5).
    #[serde(default)]
    pub pending_labels: bool,
    /// In audit (what policy would drop at it is forwarded, as AUDIT flows), and why: `agent`,
    /// `namespace (discover)`, `namespace (monitor)` or `endpoint`. Absent when enforced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audit: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdentityView {
    pub id: u32,
    /// `reserved`, `workload`, `cidr` or `cidr-endpoint-alias`.
    pub kind: String,
    /// Cilium-style labels: `k8s:app=web`, `reserved:host`, `cidr:10.0.0.0/8`.
    pub labels: Vec<String>,
    /// Endpoints (`ns/name`) holding this identity.
    pub endpoints: Vec<String>,
}

/// One address a DNS answer taught an endpoint (`palisade fqdn list`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FqdnView {
    /// `ns/name` of the endpoint that asked.
    pub endpoint: String,
    pub name: String,
    pub address: std::net::Ipv4Addr,
    /// Unix time (seconds) at which the answer's lifetime (its TTL, at least the agent's
    /// minimum) ends.
    pub expires: u64,
    /// Seconds left of that lifetime; 0 once it has ended.
    pub ttl_remaining: u64,
    /// Its lifetime has ended, but the endpoint still has connections to it, so it stays
    /// allowed until they close.
    pub held_by_connections: bool,
    /// The address's CIDR identity, while some `toFQDNs` selects it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<u32>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyApplyRequest {
    /// Multi-document YAML, as `kubectl apply -f` takes.
    pub manifest: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyApplied {
    pub kind: String,
    pub namespace: Option<String>,
    pub name: String,
    /// `created`, `configured` or `unchanged`.
    pub action: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyApplyResult {
    pub policies: Vec<PolicyApplied>,
    /// Map writes it took; the datapath enforces the result when this returns.
    pub map_operations: usize,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyDeleteResult {
    pub deleted: Vec<PolicyApplied>,
    pub map_operations: usize,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyView {
    pub kind: String,
    pub namespace: Option<String>,
    pub name: String,
    /// `api` or the file it was read from (`--policy-dir`).
    pub source: String,
    /// Endpoints (`ns/name`) the policy selects.
    pub selects: Vec<String>,
    pub ingress_rules: usize,
    pub ingress_deny_rules: usize,
    pub egress_rules: usize,
    pub egress_deny_rules: usize,
    pub ingress_default_deny: bool,
    pub egress_default_deny: bool,
    /// In audit (`palisade.io/audit: "true"` or `spec.audit`): evaluated and reported as
    /// AUDIT flows, never enforced.
    #[serde(default)]
    pub audit: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TraceRequest {
    /// `NS/NAME` of the source endpoint.
    pub from: String,
    /// `NS/NAME` of the destination endpoint.
    pub to: String,
    pub port: u16,
    /// TCP (default), UDP, SCTP or ICMP.
    #[serde(default)]
    pub protocol: Option<String>,
}

/// One side's check (source egress or destination ingress).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TraceSide {
    pub endpoint: String,
    pub direction: String,
    pub enforced: bool,
    /// Policies selecting this endpoint that put this direction in default deny.
    pub enforcing_policies: Vec<String>,
    pub peer_identity: u32,
    pub peer_labels: Vec<String>,
    /// `ALLOWED` or `DENIED`.
    pub verdict: String,
    /// Why, in words.
    pub reason: String,
    /// The rule that decided it, when one did.
    pub rule: Option<String>,
    pub policy: Option<String>,
    /// Kubernetes mode: the side is a pod of that node, which judges it (not this one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub judged_on: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TraceResult {
    /// `ALLOWED` or `DENIED`.
    pub verdict: String,
    pub protocol: String,
    pub port: u16,
    pub source_identity: u32,
    pub destination_identity: u32,
    pub egress: TraceSide,
    pub ingress: TraceSide,
}

/// `policy trace --to-fqdn`: an endpoint's egress to a DNS name.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FqdnTraceRequest {
    /// `NS/NAME` of the source endpoint.
    pub from: String,
    /// The DNS name.
    pub name: String,
    pub port: u16,
    /// TCP (default), UDP, SCTP or ICMP.
    #[serde(default)]
    pub protocol: Option<String>,
}

/// One address the name's answers taught, with the datapath's verdict on it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FqdnTraceAddress {
    pub address: Ipv4Addr,
    pub ttl_remaining: u64,
    /// Expired, but kept while connections to it are open.
    pub held_by_connections: bool,
    pub egress: TraceSide,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FqdnTraceResult {
    /// `ALLOWED` or `DENIED`.
    pub verdict: String,
    pub endpoint: String,
    /// The name, normalized (lower case, no trailing dot).
    pub name: String,
    pub protocol: String,
    pub port: u16,
    pub source_identity: u32,
    /// The endpoint's egress is in default deny.
    pub enforced: bool,
    /// The `toFQDNs` selectors that select the name, with the rules holding them.
    pub selected_by: Vec<String>,
    /// `ANSWERED`, `REFUSED` (by the DNS proxy) or `NOT-PROXIED`.
    pub lookup: String,
    /// The rules whose `rules.dns` answer the lookup, or (refused) the rules with DNS rules.
    pub lookup_rules: Vec<String>,
    pub addresses: Vec<FqdnTraceAddress>,
    /// Why, in words.
    pub reason: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CounterView {
    /// `ingress`, `egress` or `datapath`.
    pub direction: String,
    /// `FORWARDED`, `REDIRECTED`, `AUDIT`, `EVENTS_LOST`, `EVENTS_RATE_LIMITED`, or a drop
    /// reason in words.
    pub outcome: String,
    pub packets: u64,
    pub bytes: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusView {
    pub version: String,
    pub mode: String,
    pub node_ip: Ipv4Addr,
    pub pod_cidr: String,
    pub enforcement: String,
    pub endpoints: usize,
    pub identities: usize,
    pub policies: usize,
    pub policy_map_entries: usize,
    pub ipcache_entries: usize,
    /// True when the maps hold exactly what the agent compiled.
    pub maps_in_sync: bool,
    pub conntrack_entries: usize,
    pub flows_stored: usize,
    pub counters: Vec<CounterView>,
    pub namespaces: BTreeMap<String, Labels>,
    /// Which scopes are in audit.
    #[serde(default)]
    pub audit: AuditView,
}

/// The audit scopes in force (`palisade status`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditView {
    /// Agent-wide audit (`--audit`).
    pub agent: bool,
    /// Every namespace known, with its mode: `discover`, `monitor` or `protect`.
    pub namespace_modes: BTreeMap<String, String>,
    /// Endpoints (`ns/name`) in audit on their own.
    pub endpoints: Vec<String>,
    /// Policies in audit (`ns/name`, or `name` for clusterwide ones).
    pub policies: Vec<String>,
    /// AUDIT flows at endpoints of namespaces not in discover mode, by namespace, since the
    /// agent started (`palisade_policy_violations_total`).
    pub violations: BTreeMap<String, u64>,
}

/// Body of `POST /v1/namespaces/{ns}/mode`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NamespaceModeRequest {
    /// `discover`, `monitor` or `protect`.
    pub mode: String,
}

/// A namespace's mode after a change.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NamespaceModeView {
    pub namespace: String,
    pub mode: String,
    pub previous: String,
    /// Endpoints of the namespace.
    pub endpoints: usize,
    /// Map writes it took; the datapath enforces the mode when this returns.
    pub map_operations: usize,
}

/// Body of `POST /v1/endpoints/{name}/audit`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointAuditRequest {
    pub audit: bool,
}

/// `GET /v1/connections?namespace=NS&since_seconds=N`: the aggregate of connections and
/// HTTP requests the agent keeps for learning (either end in `namespace`, last seen within
/// `since_seconds`), as `palisade policy suggest` and `palisade map` read it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectionsView {
    #[serde(flatten)]
    pub log: palisade_policies::learn::LogSnapshot,
    /// Unix seconds when the agent answered.
    pub now: u64,
    /// How long aggregates are kept since last seen, in seconds.
    pub retention_seconds: u64,
}

/// Body of `POST /v1/policies/what-if`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WhatIfRequest {
    /// The proposed policies, multi-document YAML as `policy apply` takes it.
    pub manifest: String,
    /// Replay what was seen within this many seconds (default: everything kept).
    #[serde(default)]
    pub since_seconds: Option<u64>,
}

/// One recorded aggregate whose verdict the proposed policies change.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WhatIfChange {
    /// The connection's source and destination (group in words: `ns/k=v,...`, an address,
    /// `host`), and their sample endpoints or addresses.
    pub source: String,
    pub destination: String,
    pub source_sample: String,
    pub destination_sample: String,
    /// Whose side judges it: `egress of ns/name` or `ingress of ns/name`.
    pub side: String,
    pub protocol: String,
    pub port: u16,
    /// For an HTTP request: `METHOD path`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<String>,
    /// `newly-denied`, `newly-allowed`, `newly-audited` (a policy in audit would deny it) or
    /// `no-longer-audited`.
    pub change: String,
    /// The verdict now and with the proposed policies, in words.
    pub before: String,
    pub after: String,
    /// The endpoint is in audit: a new denial is reported as AUDIT, not dropped, until its
    /// namespace (or itself) is protected.
    pub endpoint_in_audit: bool,
    /// How many flows the aggregate holds, and when they were seen (Unix seconds).
    pub flows: u64,
    pub first_seen: u64,
    pub last_seen: u64,
}

/// `policy what-if`'s answer: what would change, grouped by source and destination (sorted).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WhatIfResult {
    /// Aggregates replayed (connections and HTTP requests), and the flows behind them.
    pub replayed: usize,
    pub flows: u64,
    /// Aggregates whose endpoint no longer exists (not replayed).
    pub skipped: usize,
    pub newly_denied: usize,
    pub newly_allowed: usize,
    pub newly_audited: usize,
    pub changes: Vec<WhatIfChange>,
}

impl WhatIfResult {
    /// Whether applying the proposed policies changes any recorded verdict.
    pub fn changes_anything(&self) -> bool {
        !self.changes.is_empty()
    }
}

/// One conntrack entry (`palisade conntrack list`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConntrackView {
    pub source: Ipv4Addr,
    pub destination: Ipv4Addr,
    pub source_port: u16,
    pub destination_port: u16,
    pub protocol: String,
    /// Which check created it: `egress` of the source endpoint or `ingress` of the
    /// destination endpoint.
    pub scope: String,
    /// `ns/name` of the endpoint whose check created it.
    pub endpoint: String,
    pub peer_identity: u32,
    /// The rule that allowed the connection, in words (empty when no policy applied).
    pub rule: String,
    pub packets: u64,
    pub bytes: u64,
    pub expires_in_seconds: u64,
    /// `established`, `fin-forward`, `fin-reply`, `proxy`, `audit`.
    pub flags: Vec<String>,
}

/// Body of `POST /v1/flows`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FlowQuery {
    #[serde(default)]
    pub filter: FlowFilter,
    /// Newest N stored flows (default: all stored when not following, none when following).
    #[serde(default)]
    pub last: Option<usize>,
    /// Only flows newer than this many seconds.
    #[serde(default)]
    pub since_seconds: Option<u64>,
    #[serde(default)]
    pub follow: bool,
}

/// Body of `POST /v1/attachments`: a container the CNI plugin attached.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttachmentRequest {
    /// The network configuration's `name` (GC is per network).
    #[serde(default)]
    pub network: String,
    pub container_id: String,
    /// The interface inside the container (`CNI_IFNAME`).
    pub ifname: String,
    /// The container's network namespace (`CNI_NETNS`).
    pub netns: String,
    /// The veth's host side, in the node.
    pub host_ifname: String,
    pub ip: Ipv4Addr,
    /// Another plugin (bridge, ptp) made the veth and routes it.
    #[serde(default)]
    pub chained: bool,
    /// The endpoint's name: the pod's, or the container's.
    pub name: String,
    pub namespace: String,
    /// Absent: not known yet; the agent asks the container's runtime, and the endpoint holds
    /// the `init` identity until it knows.
    #[serde(default)]
    pub labels: Option<Labels>,
    #[serde(default)]
    pub named_ports: Vec<NamedPort>,
}

/// `GET /v1/attachments/{container_id}/{ifname}`: whether the attachment is whole.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttachmentStatusView {
    pub endpoint: EndpointView,
    /// The host-side interface exists with the index the datapath knows.
    pub interface_present: bool,
    /// Both classifiers are attached to it.
    pub programs_attached: bool,
    /// The maps hold its endpoint entry.
    pub in_datapath: bool,
}

/// `DELETE /v1/attachments/{container_id}/{ifname}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttachmentDeleteResult {
    /// False when there was no such attachment (a repeated DEL).
    pub deleted: bool,
}

/// An attachment, as CNI names one.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttachmentRef {
    pub container_id: String,
    pub ifname: String,
}

/// Body of `POST /v1/attachments/gc`: the attachments the runtime still has.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttachmentGcRequest {
    /// The network being collected: attachments of other networks are left alone.
    #[serde(default)]
    pub network: String,
    pub valid: Vec<AttachmentRef>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttachmentGcResult {
    /// Endpoints (`ns/name`) removed.
    pub removed: Vec<String>,
}
