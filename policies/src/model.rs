//! The one internal form every accepted manifest kind becomes. The compiler reads only this.

use std::fmt;

use ipnetwork::Ipv4Network;
use serde::{Deserialize, Serialize};

use crate::labels::LabelSelector;

/// Which API object a policy came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum PolicyKind {
    /// networking.k8s.io/v1 NetworkPolicy
    KubernetesNetworkPolicy,
    /// palisade.io/v1 NetworkPolicy or cilium.io/v2 CiliumNetworkPolicy (namespaced)
    NetworkPolicy,
    /// palisade.io/v1 ClusterwideNetworkPolicy or cilium.io/v2 CiliumClusterwideNetworkPolicy
    ClusterwideNetworkPolicy,
}

impl PolicyKind {
    pub fn short_name(self) -> &'static str {
        match self {
            PolicyKind::KubernetesNetworkPolicy => "k8s",
            PolicyKind::NetworkPolicy => "palisade",
            PolicyKind::ClusterwideNetworkPolicy => "clusterwide",
        }
    }
}

/// Identifies a policy: kind, namespace (None for clusterwide) and name.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PolicyRef {
    pub kind: PolicyKind,
    pub namespace: Option<String>,
    pub name: String,
}

impl fmt::Display for PolicyRef {
    /// `ns/name` for namespaced policies, `name` for clusterwide ones.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.namespace {
            Some(ns) => write!(f, "{ns}/{}", self.name),
            None => f.write_str(&self.name),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Direction {
    Ingress,
    Egress,
}

impl Direction {
    pub const BOTH: [Direction; 2] = [Direction::Ingress, Direction::Egress];

    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Ingress => "ingress",
            Direction::Egress => "egress",
        }
    }
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Selects workload identities by their flat identity labels (see `labels`).
/// Reserved and CIDR identities are never selected by an endpoint selector.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct EndpointSelector(pub LabelSelector);

/// Cilium's entities: named groups of reserved identities.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Entity {
    /// Everything outside the cluster (unknown addresses and CIDR identities).
    World,
    /// The local node.
    Host,
    RemoteNode,
    /// Every identity inside the cluster: workloads, host, remote nodes, health, init, unmanaged.
    Cluster,
    Init,
    Health,
    Unmanaged,
    KubeApiserver,
    Ingress,
    /// Everything.
    All,
}

impl Entity {
    pub fn parse(s: &str) -> Option<Entity> {
        Some(match s {
            "world" => Entity::World,
            "host" => Entity::Host,
            "remote-node" => Entity::RemoteNode,
            "cluster" => Entity::Cluster,
            "init" => Entity::Init,
            "health" => Entity::Health,
            "unmanaged" => Entity::Unmanaged,
            "kube-apiserver" => Entity::KubeApiserver,
            "ingress" => Entity::Ingress,
            "all" => Entity::All,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Entity::World => "world",
            Entity::Host => "host",
            Entity::RemoteNode => "remote-node",
            Entity::Cluster => "cluster",
            Entity::Init => "init",
            Entity::Health => "health",
            Entity::Unmanaged => "unmanaged",
            Entity::KubeApiserver => "kube-apiserver",
            Entity::Ingress => "ingress",
            Entity::All => "all",
        }
    }
}

/// One peer clause of a rule.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Peer {
    /// Workloads whose identity labels match.
    Endpoints(EndpointSelector),
    /// Addresses in `cidr` but in none of `except` (applies to endpoint addresses too).
    Cidr {
        cidr: Ipv4Network,
        except: Vec<Ipv4Network>,
    },
    Entity(Entity),
}

/// Which peers a rule covers.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Peers {
    /// Every peer, whatever its identity (Kubernetes: `from`/`to` absent or empty).
    All,
    /// The union of these clauses; an empty list selects nothing.
    Some(Vec<Peer>),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
    Icmp,
    /// Cilium's `ANY`: every protocol.
    Any,
}

impl Protocol {
    pub fn parse(s: &str) -> Option<Protocol> {
        Some(match s.to_ascii_uppercase().as_str() {
            "TCP" => Protocol::Tcp,
            "UDP" => Protocol::Udp,
            "SCTP" => Protocol::Sctp,
            "ICMP" => Protocol::Icmp,
            "ANY" => Protocol::Any,
            _ => return None,
        })
    }

    /// IP protocol number, None for `Any`.
    pub fn number(self) -> Option<u8> {
        match self {
            Protocol::Tcp => Some(6),
            Protocol::Udp => Some(17),
            Protocol::Sctp => Some(132),
            Protocol::Icmp => Some(1),
            Protocol::Any => None,
        }
    }

    pub fn from_number(n: u8) -> Option<Protocol> {
        Some(match n {
            6 => Protocol::Tcp,
            17 => Protocol::Udp,
            132 => Protocol::Sctp,
            1 => Protocol::Icmp,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Sctp => "SCTP",
            Protocol::Icmp => "ICMP",
            Protocol::Any => "ANY",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The port part of a port clause.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Port {
    /// Every port of the protocol.
    Any,
    /// `port` through `end` inclusive (`end == port` for a single port).
    Range { port: u16, end: u16 },
    /// A named container port, resolved against the endpoints that declare it.
    Named(String),
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PortSpec {
    pub protocol: Protocol,
    pub port: Port,
}

/// One HTTP rule (Cilium `rules.http` entry); all present fields must match.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct HttpRule {
    /// Anchored regular expression over the method.
    pub method: Option<String>,
    /// Anchored regular expression over the normalized path.
    pub path: Option<String>,
    /// Anchored regular expression over the host.
    pub host: Option<String>,
    /// Headers that must be present (`name`) or equal (`name: value`).
    pub headers: Vec<HeaderMatch>,
    /// Upgrade protocols (lower-case, `name` or `name/version`) besides `websocket` that a
    /// matching request may ask for (palisade.io/v1 `upgrades`). A request asking to upgrade
    /// to a protocol other than `websocket` that is not listed here does not match the rule.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub upgrades: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct HeaderMatch {
    pub name: String,
    /// None: the header must be present with any value.
    pub value: Option<String>,
}

/// A rule: these peers, on these ports, optionally only these HTTP requests.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Rule {
    pub peers: Peers,
    /// Empty: every port of every protocol.
    pub ports: Vec<PortSpec>,
    /// Some: the ports above carry L7 rules and their traffic goes through the proxy.
    pub http: Option<Vec<HttpRule>>,
}

/// Everything a policy says about one direction.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct DirectionPolicy {
    /// The policy puts selected endpoints into default-deny for this direction.
    pub default_deny: bool,
    pub allow: Vec<Rule>,
    pub deny: Vec<Rule>,
}

/// One rule set of a policy with its own subject (Cilium's `specs` can carry several; the
/// other kinds carry exactly one).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PolicySpec {
    /// Which endpoints this spec applies to (already restricted to the policy's namespace for
    /// namespaced kinds).
    pub subject: EndpointSelector,
    pub ingress: DirectionPolicy,
    pub egress: DirectionPolicy,
    pub description: Option<String>,
}

impl PolicySpec {
    pub fn direction(&self, d: Direction) -> &DirectionPolicy {
        match d {
            Direction::Ingress => &self.ingress,
            Direction::Egress => &self.egress,
        }
    }
}

/// A policy in internal form.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Policy {
    pub id: PolicyRef,
    pub specs: Vec<PolicySpec>,
    /// In audit: evaluated, never enforced. What it would drop that the policies in force let
    /// through is forwarded and reported as AUDIT, naming its rule (`palisade.io/audit: "true"`
    /// or palisade.io/v1 `spec.audit: true`; see `audit`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub audit: bool,
}
