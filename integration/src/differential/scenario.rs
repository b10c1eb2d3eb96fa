//! What the differential test generates: a small cluster (endpoints with labels, namespaces,
//! addresses, audit flags, named ports), policies as manifest text (Kubernetes NetworkPolicy,
//! cilium.io/v2 CiliumNetworkPolicy and CiliumClusterwideNetworkPolicy, some of them in audit,
//! which the datapath sees as staged entry and endpoint flags), compiler settings,
//! an optional policy change, flows between endpoints, the world and the node, and the steps
//! that send packets of those flows through the programs. Everything is a proptest strategy
//! over small indices, so a failing case shrinks to a readable one.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::Ipv4Addr;

use palisade_policies::audit::{self, AuditScopes};
use palisade_policies::compile::{self, CompileInput, EnforcementMode, RuleTable, Settings};
use palisade_policies::endpoint::{Endpoint, EndpointId, NamedPort};
use palisade_policies::identity::{Identity, IdentityAllocator, workload_identity_labels};
use palisade_policies::labels::Labels;
use palisade_policies::manifest::parse_manifests;
use palisade_policies::mapstate::MapState;
use palisade_policies::model::{Policy, PolicyRef, Protocol};
use proptest::prelude::*;
use proptest::sample::{Index, subsequence};
use serde_json::{Map, Value, json};

use super::frames::Mutation;

/// Addresses endpoints may have: two /30s of the endpoint range, another /24, and one inside a
/// world range the policies name (so CIDR rules and the endpoint alias meet).
pub const ENDPOINT_IPS: [Ipv4Addr; 7] = [
    Ipv4Addr::new(10, 200, 0, 1),
    Ipv4Addr::new(10, 200, 0, 2),
    Ipv4Addr::new(10, 200, 0, 5),
    Ipv4Addr::new(10, 200, 0, 6),
    Ipv4Addr::new(10, 200, 1, 9),
    Ipv4Addr::new(192, 0, 2, 130),
    Ipv4Addr::new(10, 200, 0, 3),
];
/// Addresses outside the cluster (documentation ranges, and an unused cluster address).
pub const WORLD_IPS: [Ipv4Addr; 5] = [
    Ipv4Addr::new(192, 0, 2, 1),
    Ipv4Addr::new(192, 0, 2, 200),
    Ipv4Addr::new(198, 51, 100, 7),
    Ipv4Addr::new(203, 0, 113, 9),
    Ipv4Addr::new(10, 200, 0, 99),
];
/// The node's own address (identity `host`).
pub const HOST_IP: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 254);
/// The L7 proxy's port when the compiler is told it runs.
pub const PROXY_PORT: u16 = 15001;

/// Prefixes policies name; `except` entries are taken from those inside the chosen one.
const CIDRS: [&str; 10] = [
    "10.200.0.0/16",
    "10.200.0.0/24",
    "10.200.0.0/30",
    "10.200.0.5/32",
    "192.0.2.0/24",
    "192.0.2.128/25",
    "198.51.100.0/24",
    "0.0.0.0/0",
    "10.0.0.0/8",
    "203.0.113.9/32",
];
const APPS: [&str; 3] = ["a", "b", "c"];
const TIERS: [&str; 2] = ["web", "db"];
const NAMESPACES: [&str; 2] = ["x", "y"];
/// Ports single-port rules name, and (first, last) of port ranges (endPort).
const PORTS: [u16; 6] = [53, 80, 81, 443, 8080, 5432];
const RANGES: [(u16, u16); 5] = [
    (80, 81),
    (8000, 8100),
    (1, 1023),
    (1024, 65535),
    (8080, 8090),
];
/// Destination ports packets use: every rule port and range boundary, and beside them.
pub const DPORTS: [u16; 19] = [
    22, 53, 79, 80, 81, 82, 443, 1023, 1024, 5432, 8000, 8079, 8080, 8081, 8090, 8091, 8100, 8101,
    65535,
];
/// The named port endpoints may declare (`web`), and its possible numbers.
const NAMED_PORT: &str = "web";
const NAMED_PORT_NUMBERS: [u16; 2] = [80, 8080];

fn namespace_labels(ns: &str) -> Labels {
    let team = if ns == "x" { "blue" } else { "red" };
    [
        ("kubernetes.io/metadata.name".to_string(), ns.to_string()),
        ("team".to_string(), team.to_string()),
    ]
    .into()
}

/// One endpoint of the cluster.
#[derive(Clone, Debug)]
pub struct EndpointGen {
    pub namespace: usize,
    pub app: usize,
    pub tier: Option<usize>,
    pub audit: bool,
    pub named_port: Option<usize>,
}

impl EndpointGen {
    pub fn labels(&self) -> Labels {
        let mut l: Labels = [("app".to_string(), APPS[self.app].to_string())].into();
        if let Some(t) = self.tier {
            l.insert("tier".to_string(), TIERS[t].to_string());
        }
        l
    }

    pub fn namespace(&self) -> &'static str {
        NAMESPACES[self.namespace]
    }
}

fn endpoint_gen() -> impl Strategy<Value = EndpointGen> {
    (
        0..NAMESPACES.len(),
        0..APPS.len(),
        proptest::option::of(0..TIERS.len()),
        proptest::bool::weighted(0.15),
        proptest::option::weighted(0.3, 0..NAMED_PORT_NUMBERS.len()),
    )
        .prop_map(|(namespace, app, tier, audit, named_port)| EndpointGen {
            namespace,
            app,
            tier,
            audit,
            named_port,
        })
}

/// A label selector: `app`, `tier` and (Cilium) namespace constraints, or an expression.
#[derive(Clone, Debug)]
pub struct SelectorGen {
    pub app: Option<usize>,
    pub tier: Option<usize>,
    pub namespace: Option<usize>,
    /// `app NotIn [..]` / `tier Exists` instead of labels.
    pub expression: Option<(bool, usize)>,
}

fn selector_gen() -> impl Strategy<Value = SelectorGen> {
    (
        proptest::option::weighted(0.7, 0..APPS.len()),
        proptest::option::weighted(0.2, 0..TIERS.len()),
        proptest::option::weighted(0.3, 0..NAMESPACES.len()),
        proptest::option::weighted(0.1, (any::<bool>(), 0..APPS.len())),
    )
        .prop_map(|(app, tier, namespace, expression)| SelectorGen {
            app,
            tier,
            namespace,
            expression,
        })
}

impl SelectorGen {
    /// `namespace_key`: the key a namespace constraint is written under (Cilium only).
    fn render(&self, namespace_key: Option<&str>) -> Value {
        let mut labels = Map::new();
        if let Some(a) = self.app {
            labels.insert("app".into(), json!(APPS[a]));
        }
        if let Some(t) = self.tier {
            labels.insert("tier".into(), json!(TIERS[t]));
        }
        if let (Some(ns), Some(key)) = (self.namespace, namespace_key) {
            labels.insert(key.into(), json!(NAMESPACES[ns]));
        }
        let mut sel = Map::new();
        if !labels.is_empty() {
            sel.insert("matchLabels".into(), Value::Object(labels));
        }
        if let Some((not_in, a)) = self.expression {
            let expr = if not_in {
                json!({"key": "app", "operator": "NotIn", "values": [APPS[a]]})
            } else {
                json!({"key": "tier", "operator": "Exists"})
            };
            sel.insert("matchExpressions".into(), json!([expr]));
        }
        Value::Object(sel)
    }
}

/// A namespaceSelector (Kubernetes): every namespace, a team, or a namespace by name.
#[derive(Clone, Debug)]
pub enum NamespaceSelectorGen {
    All,
    Team(bool),
    Name(usize),
}

fn namespace_selector_gen() -> impl Strategy<Value = NamespaceSelectorGen> {
    prop_oneof![
        Just(NamespaceSelectorGen::All),
        any::<bool>().prop_map(NamespaceSelectorGen::Team),
        (0..NAMESPACES.len()).prop_map(NamespaceSelectorGen::Name),
    ]
}

impl NamespaceSelectorGen {
    fn render(&self) -> Value {
        match self {
            NamespaceSelectorGen::All => json!({}),
            NamespaceSelectorGen::Team(blue) => {
                json!({"matchLabels": {"team": if *blue { "blue" } else { "red" }}})
            }
            NamespaceSelectorGen::Name(n) => {
                json!({"matchLabels": {"kubernetes.io/metadata.name": NAMESPACES[*n]}})
            }
        }
    }
}

/// A prefix from `CIDRS` and exceptions inside it (indices into the prefixes it contains).
#[derive(Clone, Debug)]
pub struct CidrGen {
    pub cidr: usize,
    pub except: Vec<Index>,
}

fn cidr_gen() -> impl Strategy<Value = CidrGen> {
    (
        0..CIDRS.len(),
        proptest::collection::vec(any::<Index>(), 0..=2),
    )
        .prop_map(|(cidr, except)| CidrGen { cidr, except })
}

impl CidrGen {
    fn render(&self) -> (String, Vec<String>) {
        let outer: ipnetwork::Ipv4Network = CIDRS[self.cidr].parse().expect("valid CIDR");
        let inside: Vec<&str> = CIDRS
            .iter()
            .copied()
            .filter(|c| {
                let n: ipnetwork::Ipv4Network = c.parse().expect("valid CIDR");
                n.prefix() > outer.prefix() && outer.contains(n.network())
            })
            .collect();
        let mut except: Vec<String> = Vec::new();
        if !inside.is_empty() {
            for i in &self.except {
                let e = i.get(&inside).to_string();
                if !except.contains(&e) {
                    except.push(e);
                }
            }
        }
        (CIDRS[self.cidr].to_string(), except)
    }
}

/// One port clause.
#[derive(Clone, Debug)]
pub struct PortGen {
    /// 0: unset, 1: TCP, 2: UDP, 3: SCTP, 4: ANY (Cilium only; TCP for Kubernetes).
    pub protocol: u8,
    pub port: PortChoice,
}

#[derive(Clone, Debug)]
pub enum PortChoice {
    /// Every port of the protocol.
    Any,
    Single(usize),
    Range(usize),
    Named,
}

fn port_gen() -> impl Strategy<Value = PortGen> {
    (
        prop_oneof![3 => Just(1u8), 1 => Just(0u8), 2 => Just(2u8), 1 => Just(3u8), 1 => Just(4u8)],
        prop_oneof![
            1 => Just(PortChoice::Any),
            4 => (0..PORTS.len()).prop_map(PortChoice::Single),
            2 => (0..RANGES.len()).prop_map(PortChoice::Range),
            1 => Just(PortChoice::Named),
        ],
    )
        .prop_map(|(protocol, port)| PortGen { protocol, port })
}

impl PortGen {
    fn is_tcp_or_any(&self) -> bool {
        matches!(self.protocol, 0 | 1 | 4)
    }

    fn render_k8s(&self) -> Value {
        let mut m = Map::new();
        let protocol = match self.protocol {
            2 => Some("UDP"),
            3 => Some("SCTP"),
            0 => None,
            _ => Some("TCP"),
        };
        if let Some(p) = protocol {
            m.insert("protocol".into(), json!(p));
        }
        match self.port {
            PortChoice::Any => {}
            PortChoice::Single(i) => {
                m.insert("port".into(), json!(PORTS[i]));
            }
            PortChoice::Range(i) => {
                m.insert("port".into(), json!(RANGES[i].0));
                m.insert("endPort".into(), json!(RANGES[i].1));
            }
            PortChoice::Named => {
                m.insert("port".into(), json!(NAMED_PORT));
            }
        }
        Value::Object(m)
    }

    fn render_cilium(&self) -> Value {
        let mut m = Map::new();
        let protocol = match self.protocol {
            1 => Some("TCP"),
            2 => Some("UDP"),
            3 => Some("SCTP"),
            4 => Some("ANY"),
            _ => None,
        };
        if let Some(p) = protocol {
            m.insert("protocol".into(), json!(p));
        }
        match self.port {
            PortChoice::Any => {
                m.insert("port".into(), json!("0"));
            }
            PortChoice::Single(i) => {
                m.insert("port".into(), json!(PORTS[i].to_string()));
            }
            PortChoice::Range(i) => {
                m.insert("port".into(), json!(RANGES[i].0.to_string()));
                m.insert("endPort".into(), json!(RANGES[i].1));
            }
            PortChoice::Named => {
                m.insert("port".into(), json!(NAMED_PORT));
            }
        }
        Value::Object(m)
    }
}

/// A Kubernetes peer.
#[derive(Clone, Debug)]
pub enum K8sPeerGen {
    Pods(SelectorGen),
    Namespaces(NamespaceSelectorGen),
    PodsInNamespaces(SelectorGen, NamespaceSelectorGen),
    IpBlock(CidrGen),
}

fn k8s_peer_gen() -> impl Strategy<Value = K8sPeerGen> {
    prop_oneof![
        3 => selector_gen().prop_map(K8sPeerGen::Pods),
        1 => namespace_selector_gen().prop_map(K8sPeerGen::Namespaces),
        1 => (selector_gen(), namespace_selector_gen())
            .prop_map(|(p, n)| K8sPeerGen::PodsInNamespaces(p, n)),
        2 => cidr_gen().prop_map(K8sPeerGen::IpBlock),
    ]
}

#[derive(Clone, Debug)]
pub struct K8sRuleGen {
    pub peers: Vec<K8sPeerGen>,
    pub ports: Vec<PortGen>,
}

fn k8s_rule_gen() -> impl Strategy<Value = K8sRuleGen> {
    (
        proptest::collection::vec(k8s_peer_gen(), 0..=2),
        proptest::collection::vec(port_gen(), 0..=2),
    )
        .prop_map(|(peers, ports)| K8sRuleGen { peers, ports })
}

impl K8sRuleGen {
    fn render(&self, peers_key: &str) -> Value {
        let mut m = Map::new();
        if !self.peers.is_empty() {
            let peers: Vec<Value> = self
                .peers
                .iter()
                .map(|p| match p {
                    K8sPeerGen::Pods(s) => json!({"podSelector": s.render(None)}),
                    K8sPeerGen::Namespaces(n) => json!({"namespaceSelector": n.render()}),
                    K8sPeerGen::PodsInNamespaces(s, n) => {
                        json!({"podSelector": s.render(None), "namespaceSelector": n.render()})
                    }
                    K8sPeerGen::IpBlock(c) => {
                        let (cidr, except) = c.render();
                        let mut b = Map::new();
                        b.insert("cidr".into(), json!(cidr));
                        if !except.is_empty() {
                            b.insert("except".into(), json!(except));
                        }
                        json!({"ipBlock": b})
                    }
                })
                .collect();
            m.insert(peers_key.into(), Value::Array(peers));
        }
        if !self.ports.is_empty() {
            let ports: Vec<Value> = self.ports.iter().map(PortGen::render_k8s).collect();
            m.insert("ports".into(), Value::Array(ports));
        }
        Value::Object(m)
    }
}

/// A Cilium rule (ingress, ingressDeny, egress or egressDeny).
#[derive(Clone, Debug)]
pub struct CiliumRuleGen {
    pub endpoints: Vec<SelectorGen>,
    pub cidrs: Vec<usize>,
    pub cidr_sets: Vec<CidrGen>,
    /// Indices into world, cluster, host, all.
    pub entities: Vec<usize>,
    /// toPorts entries: ports and whether they carry HTTP rules (allow rules only).
    pub to_ports: Vec<(Vec<PortGen>, bool)>,
    /// An `icmps` entry: EchoRequest, or a numeric type (13: timestamp).
    pub icmp: Option<bool>,
}

const ENTITIES: [&str; 4] = ["world", "cluster", "host", "all"];

fn cilium_rule_gen() -> impl Strategy<Value = CiliumRuleGen> {
    (
        proptest::collection::vec(selector_gen(), 0..=2),
        proptest::collection::vec(0..CIDRS.len(), 0..=1),
        proptest::collection::vec(cidr_gen(), 0..=1),
        proptest::collection::vec(0..ENTITIES.len(), 0..=1),
        proptest::collection::vec(
            (
                proptest::collection::vec(port_gen(), 0..=2),
                proptest::bool::weighted(0.4),
            ),
            0..=2,
        ),
        proptest::option::weighted(0.15, any::<bool>()),
    )
        .prop_map(
            |(endpoints, cidrs, cidr_sets, entities, to_ports, icmp)| CiliumRuleGen {
                endpoints,
                cidrs,
                cidr_sets,
                entities,
                to_ports,
                icmp,
            },
        )
}

impl CiliumRuleGen {
    fn render(&self, ingress: bool, deny: bool) -> Value {
        let (ep_key, cidr_key, set_key, ent_key) = if ingress {
            ("fromEndpoints", "fromCIDR", "fromCIDRSet", "fromEntities")
        } else {
            ("toEndpoints", "toCIDR", "toCIDRSet", "toEntities")
        };
        let mut m = Map::new();
        if !self.endpoints.is_empty() {
            let sels: Vec<Value> = self
                .endpoints
                .iter()
                .map(|s| s.render(Some("k8s:io.kubernetes.pod.namespace")))
                .collect();
            m.insert(ep_key.into(), Value::Array(sels));
        }
        if !self.cidrs.is_empty() {
            let cidrs: Vec<Value> = self.cidrs.iter().map(|c| json!(CIDRS[*c])).collect();
            m.insert(cidr_key.into(), Value::Array(cidrs));
        }
        if !self.cidr_sets.is_empty() {
            let sets: Vec<Value> = self
                .cidr_sets
                .iter()
                .map(|c| {
                    let (cidr, except) = c.render();
                    if except.is_empty() {
                        json!({"cidr": cidr})
                    } else {
                        json!({"cidr": cidr, "except": except})
                    }
                })
                .collect();
            m.insert(set_key.into(), Value::Array(sets));
        }
        if !self.entities.is_empty() {
            let ents: Vec<Value> = self.entities.iter().map(|e| json!(ENTITIES[*e])).collect();
            m.insert(ent_key.into(), Value::Array(ents));
        }
        if !self.to_ports.is_empty() {
            let tps: Vec<Value> = self
                .to_ports
                .iter()
                .map(|(ports, http)| {
                    let mut tp = Map::new();
                    if !ports.is_empty() {
                        let ps: Vec<Value> = ports.iter().map(PortGen::render_cilium).collect();
                        tp.insert("ports".into(), Value::Array(ps));
                    }
                    if *http && !deny && ports.iter().all(PortGen::is_tcp_or_any) {
                        tp.insert(
                            "rules".into(),
                            json!({"http": [{"method": "GET", "path": "/public/.*"}]}),
                        );
                    }
                    Value::Object(tp)
                })
                .collect();
            m.insert("toPorts".into(), Value::Array(tps));
        }
        if let Some(echo) = self.icmp {
            let t = if echo {
                json!("EchoRequest")
            } else {
                json!(13)
            };
            m.insert(
                "icmps".into(),
                json!([{"fields": [{"type": t, "family": "IPv4"}]}]),
            );
        }
        Value::Object(m)
    }
}

/// One policy document.
#[derive(Clone, Debug)]
pub enum PolicyGen {
    Kubernetes {
        namespace: usize,
        subject: SelectorGen,
        /// policyTypes: None (defaulted), or (Ingress, Egress).
        types: Option<(bool, bool)>,
        ingress: Vec<K8sRuleGen>,
        egress: Vec<K8sRuleGen>,
    },
    Cilium {
        /// None: CiliumClusterwideNetworkPolicy.
        namespace: Option<usize>,
        subject: SelectorGen,
        ingress: Vec<CiliumRuleGen>,
        ingress_deny: Vec<CiliumRuleGen>,
        egress: Vec<CiliumRuleGen>,
        egress_deny: Vec<CiliumRuleGen>,
        /// enableDefaultDeny: (ingress, egress), each unset or a value.
        default_deny: (Option<bool>, Option<bool>),
    },
    /// The policy in audit (`palisade.io/audit: "true"`): staged, reported, not enforced.
    Staged(Box<PolicyGen>),
}

fn policy_gen() -> impl Strategy<Value = PolicyGen> {
    let k8s = (
        0..NAMESPACES.len(),
        selector_gen(),
        proptest::option::of((any::<bool>(), any::<bool>())),
        proptest::collection::vec(k8s_rule_gen(), 0..=2),
        proptest::collection::vec(k8s_rule_gen(), 0..=2),
    )
        .prop_map(
            |(namespace, subject, types, ingress, egress)| PolicyGen::Kubernetes {
                namespace,
                subject,
                types,
                ingress,
                egress,
            },
        );
    let rules = || proptest::collection::vec(cilium_rule_gen(), 0..=2);
    let cilium = (
        proptest::option::weighted(0.8, 0..NAMESPACES.len()),
        selector_gen(),
        rules(),
        proptest::collection::vec(cilium_rule_gen(), 0..=1),
        rules(),
        proptest::collection::vec(cilium_rule_gen(), 0..=1),
        (
            proptest::option::weighted(0.2, any::<bool>()),
            proptest::option::weighted(0.2, any::<bool>()),
        ),
    )
        .prop_map(
            |(namespace, subject, ingress, ingress_deny, egress, egress_deny, default_deny)| {
                PolicyGen::Cilium {
                    namespace,
                    subject,
                    ingress,
                    ingress_deny,
                    egress,
                    egress_deny,
                    default_deny,
                }
            },
        );
    // HTTP rules on one port of one app's ingress or egress: what sends connections (and,
    // after a policy change, open ones) to the proxy.
    let http = (
        proptest::option::weighted(0.8, 0..NAMESPACES.len()),
        0..APPS.len(),
        any::<bool>(),
        proptest::option::weighted(0.4, selector_gen()),
        prop_oneof![3 => Just(1usize), 2 => Just(4usize), 1 => 0..PORTS.len()],
        proptest::bool::weighted(0.3),
        (
            proptest::option::weighted(0.3, any::<bool>()),
            proptest::option::weighted(0.3, any::<bool>()),
        ),
    )
        .prop_map(
            |(namespace, app, ingress, peer, port, any_protocol, default_deny)| {
                let rule = CiliumRuleGen {
                    endpoints: peer.into_iter().collect(),
                    cidrs: vec![],
                    cidr_sets: vec![],
                    entities: vec![],
                    to_ports: vec![(
                        vec![PortGen {
                            protocol: if any_protocol { 4 } else { 1 },
                            port: PortChoice::Single(port),
                        }],
                        true,
                    )],
                    icmp: None,
                };
                let (ingress, egress) = if ingress {
                    (vec![rule], vec![])
                } else {
                    (vec![], vec![rule])
                };
                PolicyGen::Cilium {
                    namespace,
                    subject: SelectorGen {
                        app: Some(app),
                        tier: None,
                        namespace: None,
                        expression: None,
                    },
                    ingress,
                    ingress_deny: vec![],
                    egress,
                    egress_deny: vec![],
                    default_deny,
                }
            },
        );
    (
        prop_oneof![2 => k8s, 3 => cilium, 1 => http],
        proptest::bool::weighted(0.25),
    )
        .prop_map(|(p, staged)| {
            if staged {
                PolicyGen::Staged(Box::new(p))
            } else {
                p
            }
        })
}

impl PolicyGen {
    fn render(&self, name: &str) -> Value {
        match self {
            PolicyGen::Staged(inner) => {
                let mut doc = inner.render(name);
                doc["metadata"]["annotations"] = json!({"palisade.io/audit": "true"});
                doc
            }
            PolicyGen::Kubernetes {
                namespace,
                subject,
                types,
                ingress,
                egress,
            } => {
                let mut spec = Map::new();
                spec.insert("podSelector".into(), subject.render(None));
                if let Some((i, e)) = types {
                    let mut t = Vec::new();
                    if *i {
                        t.push(json!("Ingress"));
                    }
                    if *e {
                        t.push(json!("Egress"));
                    }
                    if !t.is_empty() {
                        spec.insert("policyTypes".into(), Value::Array(t));
                    }
                }
                if !ingress.is_empty() {
                    let r: Vec<Value> = ingress.iter().map(|r| r.render("from")).collect();
                    spec.insert("ingress".into(), Value::Array(r));
                }
                if !egress.is_empty() {
                    let r: Vec<Value> = egress.iter().map(|r| r.render("to")).collect();
                    spec.insert("egress".into(), Value::Array(r));
                }
                json!({
                    "apiVersion": "networking.k8s.io/v1",
                    "kind": "NetworkPolicy",
                    "metadata": {"name": name, "namespace": NAMESPACES[*namespace]},
                    "spec": spec,
                })
            }
            PolicyGen::Cilium {
                namespace,
                subject,
                ingress,
                ingress_deny,
                egress,
                egress_deny,
                default_deny,
            } => {
                let mut spec = Map::new();
                spec.insert(
                    "endpointSelector".into(),
                    subject.render(
                        namespace
                            .is_none()
                            .then_some("k8s:io.kubernetes.pod.namespace"),
                    ),
                );
                for (key, rules, is_ingress, deny) in [
                    ("ingress", ingress, true, false),
                    ("ingressDeny", ingress_deny, true, true),
                    ("egress", egress, false, false),
                    ("egressDeny", egress_deny, false, true),
                ] {
                    if !rules.is_empty() {
                        let r: Vec<Value> =
                            rules.iter().map(|r| r.render(is_ingress, deny)).collect();
                        spec.insert(key.into(), Value::Array(r));
                    }
                }
                let mut dd = Map::new();
                if let Some(i) = default_deny.0 {
                    dd.insert("ingress".into(), json!(i));
                }
                if let Some(e) = default_deny.1 {
                    dd.insert("egress".into(), json!(e));
                }
                if !dd.is_empty() {
                    spec.insert("enableDefaultDeny".into(), Value::Object(dd));
                }
                match namespace {
                    Some(ns) => json!({
                        "apiVersion": "cilium.io/v2",
                        "kind": "CiliumNetworkPolicy",
                        "metadata": {"name": name, "namespace": NAMESPACES[*ns]},
                        "spec": spec,
                    }),
                    None => json!({
                        "apiVersion": "cilium.io/v2",
                        "kind": "CiliumClusterwideNetworkPolicy",
                        "metadata": {"name": name},
                        "spec": spec,
                    }),
                }
            }
        }
    }
}

/// The policies as one multi-document YAML text (`prefix` names them apart).
pub fn render_policies(policies: &[PolicyGen], prefix: &str) -> String {
    policies
        .iter()
        .enumerate()
        .map(|(i, p)| {
            serde_norway::to_string(&p.render(&format!("{prefix}{i}")))
                .expect("JSON values render as YAML")
        })
        .collect::<Vec<_>>()
        .join("---\n")
}

/// The compiler's settings for a case.
#[derive(Clone, Debug)]
pub struct SettingsGen {
    pub enforcement: EnforcementMode,
    pub proxy_running: bool,
    pub allow_host_ingress: bool,
    /// The fast path between endpoints (the agent's default): the sender's program judges
    /// the destination's ingress and hands the frame to it.
    pub fast_path: bool,
}

fn settings_gen() -> impl Strategy<Value = SettingsGen> {
    (
        prop_oneof![
            8 => Just(EnforcementMode::Default),
            1 => Just(EnforcementMode::Always),
            1 => Just(EnforcementMode::Never),
        ],
        proptest::bool::weighted(0.85),
        proptest::bool::weighted(0.8),
        proptest::bool::weighted(0.7),
    )
        .prop_map(
            |(enforcement, proxy_running, allow_host_ingress, fast_path)| SettingsGen {
                enforcement,
                proxy_running,
                allow_host_ingress,
                fast_path,
            },
        )
}

impl SettingsGen {
    pub fn settings(&self) -> Settings {
        Settings {
            enforcement: self.enforcement,
            allow_host_ingress: self.allow_host_ingress,
            audit: false,
            proxy_port: self.proxy_running.then_some(PROXY_PORT),
            dns_proxy_port: None,
        }
    }
}

/// An address of a packet: an endpoint (index modulo their number), a world address, the node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AddrGen {
    Endpoint(usize),
    World(usize),
    Host,
}

fn addr_gen() -> impl Strategy<Value = AddrGen> {
    prop_oneof![
        6 => (0..4usize).prop_map(AddrGen::Endpoint),
        2 => (0..WORLD_IPS.len()).prop_map(AddrGen::World),
        1 => Just(AddrGen::Host),
    ]
}

/// A flow's protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlowProto {
    Tcp,
    Udp,
    Sctp,
    IcmpEcho,
    /// ICMP that is neither echo nor an error (13: timestamp, 5: redirect, 42: extended echo).
    IcmpOther(u8),
    /// A protocol without ports (47: GRE).
    Other(u8),
}

fn flow_proto_gen() -> impl Strategy<Value = FlowProto> {
    prop_oneof![
        6 => Just(FlowProto::Tcp),
        3 => Just(FlowProto::Udp),
        1 => Just(FlowProto::Sctp),
        2 => Just(FlowProto::IcmpEcho),
        1 => prop_oneof![Just(13u8), Just(5u8), Just(42u8)].prop_map(FlowProto::IcmpOther),
        1 => Just(FlowProto::Other(47)),
    ]
}

/// A conversation between a client and a server.
#[derive(Clone, Debug)]
pub struct FlowGen {
    pub client: AddrGen,
    pub server: AddrGen,
    pub proto: FlowProto,
    pub client_port: u16,
    pub server_port: u16,
}

fn flow_gen() -> impl Strategy<Value = FlowGen> {
    (
        addr_gen(),
        addr_gen(),
        flow_proto_gen(),
        prop_oneof![
            Just(40000u16),
            Just(40001),
            Just(53),
            Just(80),
            1024..=65535u16
        ],
        prop_oneof![
            5 => (0..PORTS.len()).prop_map(|i| PORTS[i]),
            4 => (0..DPORTS.len()).prop_map(|i| DPORTS[i]),
            1 => any::<u16>(),
        ],
    )
        .prop_map(
            |(client, server, proto, client_port, server_port)| FlowGen {
                client,
                server,
                proto,
                client_port,
                server_port,
            },
        )
}

/// Where a packet is judged: the sender's egress, the receiver's ingress, or (misdirected,
/// as routing never would) some endpoint's program, or an interface no endpoint has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HopGen {
    SenderEgress,
    ReceiverIngress,
    Elsewhere(usize, bool),
    UnknownInterface(bool),
}

fn hop_gen() -> impl Strategy<Value = HopGen> {
    prop_oneof![
        10 => Just(HopGen::SenderEgress),
        10 => Just(HopGen::ReceiverIngress),
        1 => (0..4usize, any::<bool>()).prop_map(|(i, e)| HopGen::Elsewhere(i, e)),
        1 => any::<bool>().prop_map(HopGen::UnknownInterface),
    ]
}

/// The skb mark (and priority) a packet carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MarkGen {
    None,
    /// The proxy's upstream leg for this endpoint (index) as the client: its identity in the
    /// mark, its address in the priority.
    FromProxyAs(usize),
    /// The proxy's mark with this endpoint's identity, but another client address.
    FromProxyClaiming(usize, AddrGen),
    /// FROM_PROXY with an arbitrary identity, and no client address.
    FromProxyRaw(u32),
    ToProxy,
    Other(u32),
}

fn mark_gen() -> impl Strategy<Value = MarkGen> {
    prop_oneof![
        20 => Just(MarkGen::None),
        3 => (0..4usize).prop_map(MarkGen::FromProxyAs),
        1 => (0..4usize, addr_gen()).prop_map(|(i, a)| MarkGen::FromProxyClaiming(i, a)),
        1 => (0..0x0100_0000u32).prop_map(MarkGen::FromProxyRaw),
        1 => Just(MarkGen::ToProxy),
        1 => any::<u32>().prop_map(MarkGen::Other),
    ]
}

/// How a handshake ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Close {
    Open,
    Fin,
    Rst,
    ServerRst,
}

/// TCP flag combinations single packets carry.
pub const FLAGS: [u8; 11] = [
    0x02, // SYN
    0x12, // SYN|ACK
    0x10, // ACK
    0x18, // PSH|ACK
    0x11, // FIN|ACK
    0x04, // RST
    0x14, // RST|ACK
    0x00, // none
    0x03, // SYN|FIN
    0x01, // FIN
    0x06, // SYN|RST
];

/// One step of a case.
#[derive(Clone, Debug)]
pub enum StepGen {
    /// One packet of a flow (original direction or reply) at one hop.
    Packet {
        flow: usize,
        reply: bool,
        hop: HopGen,
        /// TCP flags (index into FLAGS, or raw).
        flags: Result<usize, u8>,
        mark: MarkGen,
        mutation: Option<Mutation>,
    },
    /// A whole exchange of a flow, every packet at each local hop it crosses.
    Exchange { flow: usize, close: Close },
    /// An ICMP error about a flow's packet (or its reply), sent back to its sender.
    IcmpError {
        flow: usize,
        about_reply: bool,
        kind: u8,
        hop: HopGen,
        /// A spoofed outer source / destination instead of the realistic ones.
        outer_src: Option<AddrGen>,
        outer_dst: Option<AddrGen>,
        inner_len: Option<usize>,
    },
    /// Arbitrary bytes (an IPv4 ethertype most of the time).
    Raw {
        endpoint: usize,
        egress: bool,
        bytes: Vec<u8>,
        ipv4: bool,
    },
    /// ARP from an endpoint (any sender address).
    Arp { endpoint: usize, egress: bool },
    /// Conntrack as if the proxy had taken this TCP flow over (test run cannot assign
    /// sockets, see the test's doc comment): a redirected entry on the client's egress.
    SeedRedirected { flow: usize },
    /// The case's policy change (or, without one, a bare revision bump): switches between the
    /// first and the second policy set.
    PolicyChange,
    /// A policy change that adds HTTP rules on a flow's port to its server's ingress (or its
    /// client's egress): what makes open connections of the flow need the proxy.
    HttpRulesFor { flow: usize, egress: bool },
}

/// A CiliumNetworkPolicy named `name` giving endpoint `e` HTTP rules on TCP `port`, for
/// every peer, on its ingress or egress.
pub fn http_rules_for(e: &EndpointGen, port: u16, egress: bool, name: &str) -> String {
    let rule = json!([{
        "toPorts": [{
            "ports": [{"port": port.to_string(), "protocol": "TCP"}],
            "rules": {"http": [{"method": "GET", "path": "/public/.*"}]},
        }],
    }]);
    let mut spec = Map::new();
    spec.insert(
        "endpointSelector".into(),
        json!({"matchLabels": {"app": APPS[e.app]}}),
    );
    spec.insert((if egress { "egress" } else { "ingress" }).into(), rule);
    let doc = json!({
        "apiVersion": "cilium.io/v2",
        "kind": "CiliumNetworkPolicy",
        "metadata": {"name": name, "namespace": e.namespace()},
        "spec": spec,
    });
    serde_norway::to_string(&doc).expect("JSON values render as YAML")
}

fn mutation_gen() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        4 => prop_oneof![
            Just(14usize), Just(33), Just(34), Just(35),
            Just(36), Just(38), Just(40), Just(42), Just(46), Just(47), Just(48), Just(49),
            Just(50), Just(53), Just(54), Just(61), Just(62), 34..=80usize,
        ].prop_map(Mutation::Truncate),
        2 => prop_oneof![Just(0x44u8), Just(0x40), Just(0x46), Just(0x4f), Just(0x65), Just(0x35), any::<u8>()]
            .prop_map(Mutation::VersionIhl),
        2 => (1u8..=10).prop_map(Mutation::Options),
        3 => prop_oneof![Just(0x2000u16), Just(0x0001), Just(0x2001), Just(0x1fff), Just(0x4000), Just(0x8000), Just(0x6000), any::<u16>()]
            .prop_map(Mutation::Fragment),
        2 => prop_oneof![Just(0u16), Just(20), Just(40), Just(1500), any::<u16>()]
            .prop_map(Mutation::TotalLength),
        2 => prop_oneof![Just(0x86ddu16), Just(0x0806), Just(0x88cc), Just(0x0000), Just(0x8100), any::<u16>()]
            .prop_map(Mutation::Ethertype),
        1 => Just(Mutation::VlanTag),
        1 => (1u8..=64).prop_map(Mutation::Pad),
        2 => (any::<usize>(), any::<u8>()).prop_map(|(i, v)| Mutation::Byte(i, v)),
    ]
}

fn step_gen() -> impl Strategy<Value = StepGen> {
    let packet = (
        0..8usize,
        proptest::bool::weighted(0.3),
        hop_gen(),
        prop_oneof![
            9 => (0..FLAGS.len()).prop_map(Ok),
            1 => any::<u8>().prop_map(Err),
        ],
        mark_gen(),
        proptest::option::weighted(0.25, mutation_gen()),
    )
        .prop_map(
            |(flow, reply, hop, flags, mark, mutation)| StepGen::Packet {
                flow,
                reply,
                hop,
                flags,
                mark,
                mutation,
            },
        );
    let exchange = (
        0..8usize,
        prop_oneof![
            Just(Close::Open),
            Just(Close::Fin),
            Just(Close::Rst),
            Just(Close::ServerRst)
        ],
    )
        .prop_map(|(flow, close)| StepGen::Exchange { flow, close });
    let icmp_error = (
        0..8usize,
        any::<bool>(),
        prop_oneof![Just(3u8), Just(11), Just(12)],
        hop_gen(),
        proptest::option::weighted(0.2, addr_gen()),
        proptest::option::weighted(0.2, addr_gen()),
        proptest::option::weighted(0.2, 0..40usize),
    )
        .prop_map(
            |(flow, about_reply, kind, hop, outer_src, outer_dst, inner_len)| StepGen::IcmpError {
                flow,
                about_reply,
                kind,
                hop,
                outer_src,
                outer_dst,
                inner_len,
            },
        );
    let raw = (
        0..4usize,
        any::<bool>(),
        proptest::collection::vec(any::<u8>(), 14..=72),
        proptest::bool::weighted(0.8),
    )
        .prop_map(|(endpoint, egress, bytes, ipv4)| StepGen::Raw {
            endpoint,
            egress,
            bytes,
            ipv4,
        });
    prop_oneof![
        10 => packet,
        8 => exchange,
        2 => icmp_error,
        1 => raw,
        1 => (0..4usize, any::<bool>()).prop_map(|(endpoint, egress)| StepGen::Arp { endpoint, egress }),
        1 => (0..8usize).prop_map(|flow| StepGen::SeedRedirected { flow }),
        1 => (0..8usize, any::<bool>()).prop_map(|(flow, egress)| StepGen::HttpRulesFor { flow, egress }),
        2 => Just(StepGen::PolicyChange),
    ]
}

/// A policy change: another policy set (the first one's policies too, when `keep`), and
/// maybe an endpoint relabelled.
#[derive(Clone, Debug)]
pub struct ChangeGen {
    pub keep: bool,
    pub policies: Vec<PolicyGen>,
    pub relabel: Option<(usize, usize)>,
}

/// One generated case.
#[derive(Clone, Debug)]
pub struct Scenario {
    pub endpoints: Vec<EndpointGen>,
    /// Indices into `ENDPOINT_IPS`, one per endpoint, distinct.
    pub ips: Vec<usize>,
    pub policies: Vec<PolicyGen>,
    pub settings: SettingsGen,
    pub change: Option<ChangeGen>,
    pub flows: Vec<FlowGen>,
    pub steps: Vec<StepGen>,
}

/// Every case: 2 to 4 endpoints, up to 3 policies, up to 6 flows and `max_steps` steps.
pub fn scenario(max_steps: usize) -> impl Strategy<Value = Scenario> {
    (2..=4usize)
        .prop_flat_map(|n| {
            (
                proptest::collection::vec(endpoint_gen(), n),
                subsequence((0..ENDPOINT_IPS.len()).collect::<Vec<_>>(), n),
            )
        })
        .prop_flat_map(move |(endpoints, ips)| {
            (
                Just(endpoints),
                Just(ips).prop_shuffle(),
                proptest::collection::vec(policy_gen(), 0..=3),
                settings_gen(),
                proptest::option::weighted(
                    0.5,
                    (
                        proptest::bool::weighted(0.6),
                        proptest::collection::vec(policy_gen(), 0..=3),
                        proptest::option::weighted(0.3, (0..4usize, 0..APPS.len())),
                    )
                        .prop_map(|(keep, policies, relabel)| ChangeGen {
                            keep,
                            policies,
                            relabel,
                        }),
                ),
                proptest::collection::vec(flow_gen(), 1..=6),
                proptest::collection::vec(step_gen(), 1..=max_steps),
            )
        })
        .prop_map(
            |(endpoints, ips, policies, settings, change, flows, steps)| Scenario {
                endpoints,
                ips,
                policies,
                settings,
                change,
                flows,
                steps,
            },
        )
}

impl Scenario {
    pub fn ip(&self, endpoint: usize) -> Ipv4Addr {
        ENDPOINT_IPS[self.ips[endpoint]]
    }

    pub fn addr(&self, a: AddrGen) -> Ipv4Addr {
        match a {
            AddrGen::Endpoint(i) => self.ip(i % self.endpoints.len()),
            AddrGen::World(i) => WORLD_IPS[i],
            AddrGen::Host => HOST_IP,
        }
    }

    /// The second policy set's manifests (the first set's names are `p0..`, its own `q0..`).
    pub fn second_policies(&self) -> Option<String> {
        let c = self.change.as_ref()?;
        let own = render_policies(&c.policies, "q");
        Some(if c.keep && !self.policies.is_empty() {
            let first = render_policies(&self.policies, "p");
            if own.is_empty() {
                first
            } else {
                format!("{first}---\n{own}")
            }
        } else {
            own
        })
    }

    /// The endpoint behind an address, if it is one.
    pub fn local(&self, a: AddrGen) -> Option<usize> {
        match a {
            AddrGen::Endpoint(i) => Some(i % self.endpoints.len()),
            _ => None,
        }
    }

    pub fn flow(&self, i: usize) -> &FlowGen {
        &self.flows[i % self.flows.len()]
    }

    pub fn endpoint_name(i: usize) -> String {
        format!("ep{i}")
    }

    /// The cluster in words: endpoints with their addresses, labels and flags.
    pub fn describe_cluster(&self, identities: &[Identity]) -> String {
        let mut out = String::new();
        for (i, e) in self.endpoints.iter().enumerate() {
            let labels: Vec<String> = e.labels().iter().map(|(k, v)| format!("{k}={v}")).collect();
            let _ = writeln!(
                out,
                "  {} id {} {} in {} [{}] identity {}{}{}",
                Self::endpoint_name(i),
                i + 1,
                self.ip(i),
                e.namespace(),
                labels.join(","),
                identities.get(i).map_or(0, |id| id.0),
                if e.audit { " AUDIT" } else { "" },
                e.named_port
                    .map(|p| format!(" port {NAMED_PORT}={}", NAMED_PORT_NUMBERS[p]))
                    .unwrap_or_default(),
            );
        }
        let s = &self.settings;
        let _ = writeln!(
            out,
            "  settings: enforcement {}, proxy {}, host ingress {}, fast path {}",
            s.enforcement.as_str(),
            if s.proxy_running {
                format!("on {PROXY_PORT}")
            } else {
                "not running".to_string()
            },
            if s.allow_host_ingress {
                "allowed"
            } else {
                "not allowed"
            },
            if s.fast_path { "on" } else { "off" },
        );
        out
    }
}

/// The cluster as the engine holds it: identities allocated from labels, the rule table, and
/// the compiler's input, so policy changes and relabels compile as the agent would.
pub struct Cluster {
    alloc: IdentityAllocator,
    rules: RuleTable,
    pub endpoints: BTreeMap<EndpointId, Endpoint>,
    labels: Vec<Labels>,
    audit: Vec<bool>,
    settings: Settings,
}

impl Cluster {
    pub fn new(s: &Scenario, ifindexes: &[u32]) -> Self {
        let mut alloc = IdentityAllocator::default();
        let mut endpoints = BTreeMap::new();
        let mut labels = Vec::new();
        for (i, e) in s.endpoints.iter().enumerate() {
            let ns = e.namespace();
            let l = workload_identity_labels(ns, &namespace_labels(ns), &e.labels());
            let identity = alloc.acquire(&l).expect("identity");
            labels.push(l);
            let id = EndpointId(u32::try_from(i + 1).expect("few endpoints"));
            endpoints.insert(
                id,
                Endpoint {
                    id,
                    name: Scenario::endpoint_name(i),
                    namespace: ns.to_string(),
                    identity,
                    ip: s.ip(i),
                    ifindex: ifindexes[i],
                    named_ports: e
                        .named_port
                        .map(|p| NamedPort {
                            name: NAMED_PORT.to_string(),
                            protocol: Protocol::Tcp,
                            port: NAMED_PORT_NUMBERS[p],
                        })
                        .into_iter()
                        .collect(),
                    link: Self::link(i),
                },
            );
        }
        Self {
            alloc,
            rules: RuleTable::default(),
            endpoints,
            labels,
            audit: s.endpoints.iter().map(|e| e.audit).collect(),
            settings: s.settings.settings(),
        }
    }

    /// Endpoint `i`'s MACs, as the agent's plumbing records them (the fast path needs both).
    pub fn link(i: usize) -> palisade_policies::endpoint::LinkLayer {
        let n = u8::try_from(i).expect("few endpoints");
        palisade_policies::endpoint::LinkLayer {
            mac: [2, 0x50, 0, 0, 0, n],
            host_mac: [2, 0x50, 0, 0, 1, n],
            bridge: None,
        }
    }

    pub fn identities(&self) -> Vec<Identity> {
        self.endpoints.values().map(|e| e.identity).collect()
    }

    /// Gives endpoint `i` a new `app` label (and so, maybe, a new identity).
    pub fn relabel(&mut self, i: usize, app: usize) {
        let id = EndpointId(u32::try_from(i + 1).expect("few endpoints"));
        let Some(ep) = self.endpoints.get_mut(&id) else {
            return;
        };
        let mut l = self.labels[i].clone();
        l.insert("app".to_string(), APPS[app].to_string());
        let new = self.alloc.acquire(&l).expect("identity");
        self.alloc.release(ep.identity).expect("release");
        ep.identity = new;
        self.labels[i] = l;
    }

    /// Parses and compiles `yaml`, as the engine's sync does (policies in audit merged in as
    /// staged flags); endpoints marked for audit get the audit flag.
    pub fn compile(&mut self, yaml: &str) -> Result<MapState, String> {
        let parsed = parse_manifests(yaml).map_err(|e| format!("{e}"))?;
        let policies: BTreeMap<PolicyRef, Policy> =
            parsed.into_iter().map(|p| (p.id.clone(), p)).collect();
        let cidrs: BTreeSet<_> = compile::policy_cidrs(policies.values());
        self.alloc
            .sync_cidrs(&cidrs)
            .map_err(|e| format!("CIDR identities: {e}"))?;
        let table = self.alloc.table();
        let host = [HOST_IP];
        let input = CompileInput {
            endpoints: &self.endpoints,
            identities: table,
            policies: &policies,
            host_addresses: &host,
            remote: &BTreeMap::new(),
            fqdns: &palisade_policies::fqdn::LearnedNames::new(),
            settings: self.settings,
        };
        let (no_modes, no_endpoints) = (BTreeMap::new(), BTreeSet::new());
        let scopes = AuditScopes {
            namespaces: &no_modes,
            endpoints: &no_endpoints,
        };
        let (mut state, l7) = audit::compile(&input, &scopes, &mut self.rules);
        self.rules.retain_used_with(&state, &l7);
        for (i, e) in state.endpoints.values_mut().enumerate() {
            e.audit = self.audit.get(i).copied().unwrap_or(false);
        }
        Ok(state)
    }
}
