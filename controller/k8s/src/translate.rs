//! Kubernetes objects into plain data: what of a Pod, Namespace or Node policy needs, and a
//! policy object into the policy crate's model through the same parser local mode uses.
//! Pure: no client, no I/O.

use std::net::Ipv4Addr;

use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use palisade_policies::endpoint::NamedPort;
use palisade_policies::labels::Labels;
use palisade_policies::manifest::{self, ManifestError};
use palisade_policies::model::{Policy, Protocol};
use serde_json::Value;

/// What policy needs of a Pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodInfo {
    pub namespace: String,
    pub name: String,
    pub node: Option<String>,
    pub ip: Option<Ipv4Addr>,
    /// A host-network pod has the node's address and no endpoint of its own.
    pub host_network: bool,
    /// Succeeded or Failed: its address may already be another pod's.
    pub finished: bool,
    pub labels: Labels,
    pub named_ports: Vec<NamedPort>,
    /// The pod's own `palisade.io/audit` annotation: `"true"` puts its endpoint in audit,
    /// absent or `"false"` not; any other value is kept here (Err) to be reported, and the
    /// endpoint stays enforced.
    pub audit: Result<bool, String>,
}

/// A pod's audit annotation (`palisade.io/audit`), as `PodInfo::audit` holds it.
pub fn pod_audit(p: &Pod) -> Result<bool, String> {
    let value = p
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(palisade_policies::audit::AUDIT_ANNOTATION));
    match value.map(String::as_str) {
        None | Some("false") => Ok(false),
        Some("true") => Ok(true),
        Some(other) => Err(other.to_string()),
    }
}

impl PodInfo {
    /// Whether the pod is a workload with an address of its own that policy should know.
    pub fn has_own_address(&self) -> bool {
        self.ip.is_some() && !self.host_network && !self.finished
    }
}

pub fn pod_info(p: &Pod) -> Option<PodInfo> {
    let name = p.metadata.name.clone()?;
    let namespace = p.metadata.namespace.clone()?;
    let spec = p.spec.as_ref();
    let status = p.status.as_ref();
    let ip = status
        .and_then(|s| s.pod_ip.as_deref())
        .and_then(|ip| ip.parse::<Ipv4Addr>().ok());
    let phase = status.and_then(|s| s.phase.as_deref()).unwrap_or_default();
    let mut named_ports = Vec::new();
    for c in spec.map(|s| s.containers.as_slice()).unwrap_or_default() {
        for port in c.ports.as_deref().unwrap_or_default() {
            let Some(port_name) = &port.name else {
                continue;
            };
            let Ok(number) = u16::try_from(port.container_port) else {
                continue;
            };
            let protocol = match port.protocol.as_deref().unwrap_or("TCP") {
                "UDP" => Protocol::Udp,
                "SCTP" => Protocol::Sctp,
                _ => Protocol::Tcp,
            };
            named_ports.push(NamedPort {
                name: port_name.clone(),
                protocol,
                port: number,
            });
        }
    }
    Some(PodInfo {
        namespace,
        name,
        node: spec.and_then(|s| s.node_name.clone()),
        ip,
        host_network: spec.and_then(|s| s.host_network).unwrap_or(false),
        finished: matches!(phase, "Succeeded" | "Failed"),
        labels: p.metadata.labels.clone().unwrap_or_default(),
        named_ports,
        audit: pod_audit(p),
    })
}

pub fn namespace_labels(n: &Namespace) -> Option<(String, Labels)> {
    Some((
        n.metadata.name.clone()?,
        n.metadata.labels.clone().unwrap_or_default(),
    ))
}

/// What policy needs of a Node: its addresses (`remote-node` when it is another node) and
/// its pod CIDR (routes to it, and this node's CNI configuration).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeInfo {
    pub name: String,
    pub addresses: Vec<Ipv4Addr>,
    /// The first address that routes pod traffic to it: InternalIP, else ExternalIP.
    pub internal_ip: Option<Ipv4Addr>,
    pub pod_cidr: Option<ipnetwork::Ipv4Network>,
}

pub fn node_info(n: &Node) -> Option<NodeInfo> {
    let name = n.metadata.name.clone()?;
    let addrs = n
        .status
        .as_ref()
        .and_then(|s| s.addresses.as_deref())
        .unwrap_or_default();
    let parsed = |kind: &str| {
        addrs
            .iter()
            .filter(|a| a.type_ == kind)
            .filter_map(|a| a.address.parse::<Ipv4Addr>().ok())
            .collect::<Vec<_>>()
    };
    let internal = parsed("InternalIP");
    let external = parsed("ExternalIP");
    let spec = n.spec.as_ref();
    let pod_cidr = spec
        .and_then(|s| s.pod_cidr.as_deref())
        .into_iter()
        .chain(
            spec.and_then(|s| s.pod_cidrs.as_deref())
                .unwrap_or_default()
                .iter()
                .map(String::as_str),
        )
        .find_map(|c| c.parse::<ipnetwork::Ipv4Network>().ok());
    let mut addresses = internal.clone();
    addresses.extend(external.iter().copied());
    addresses.sort();
    addresses.dedup();
    Some(NodeInfo {
        name,
        internal_ip: internal.first().or(external.first()).copied(),
        addresses,
        pod_cidr,
    })
}

/// The kinds of policy object the agent watches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PolicyObjectKind {
    /// networking.k8s.io/v1 NetworkPolicy
    Kubernetes,
    /// palisade.io/v1 NetworkPolicy
    Palisade,
    /// palisade.io/v1 ClusterwideNetworkPolicy
    PalisadeClusterwide,
    /// cilium.io/v2 CiliumNetworkPolicy
    Cilium,
    /// cilium.io/v2 CiliumClusterwideNetworkPolicy
    CiliumClusterwide,
}

impl PolicyObjectKind {
    pub const ALL: [PolicyObjectKind; 5] = [
        PolicyObjectKind::Kubernetes,
        PolicyObjectKind::Palisade,
        PolicyObjectKind::PalisadeClusterwide,
        PolicyObjectKind::Cilium,
        PolicyObjectKind::CiliumClusterwide,
    ];

    pub fn api_version(self) -> &'static str {
        match self {
            PolicyObjectKind::Kubernetes => "networking.k8s.io/v1",
            PolicyObjectKind::Palisade | PolicyObjectKind::PalisadeClusterwide => "palisade.io/v1",
            PolicyObjectKind::Cilium | PolicyObjectKind::CiliumClusterwide => "cilium.io/v2",
        }
    }

    pub fn kind(self) -> &'static str {
        match self {
            PolicyObjectKind::Kubernetes | PolicyObjectKind::Palisade => "NetworkPolicy",
            PolicyObjectKind::PalisadeClusterwide => "ClusterwideNetworkPolicy",
            PolicyObjectKind::Cilium => "CiliumNetworkPolicy",
            PolicyObjectKind::CiliumClusterwide => "CiliumClusterwideNetworkPolicy",
        }
    }

    /// The resource's plural, as its CRD (or the built-in API) names it.
    pub fn plural(self) -> &'static str {
        match self {
            PolicyObjectKind::Kubernetes => "networkpolicies",
            PolicyObjectKind::Palisade => "palisadenetworkpolicies",
            PolicyObjectKind::PalisadeClusterwide => "palisadeclusterwidenetworkpolicies",
            PolicyObjectKind::Cilium => "ciliumnetworkpolicies",
            PolicyObjectKind::CiliumClusterwide => "ciliumclusterwidenetworkpolicies",
        }
    }

    pub fn namespaced(self) -> bool {
        matches!(
            self,
            PolicyObjectKind::Kubernetes | PolicyObjectKind::Palisade | PolicyObjectKind::Cilium
        )
    }

    /// Whether the agent writes the object's status (its own kinds only).
    pub fn has_status(self) -> bool {
        matches!(
            self,
            PolicyObjectKind::Palisade | PolicyObjectKind::PalisadeClusterwide
        )
    }

    /// The CRD that serves the kind (None: built into Kubernetes).
    pub fn crd_name(self) -> Option<String> {
        let group = self.api_version().split('/').next().unwrap_or_default();
        (self != PolicyObjectKind::Kubernetes).then(|| format!("{}.{group}", self.plural()))
    }
}

/// A policy object as the API holds it (any kind, as JSON), parsed by the manifest parser
/// exactly as `palisade policy apply` parses it: what the server adds (status, managed
/// fields) is left out first, and the apiVersion and kind are set, since list items carry
/// none.
pub fn parse_policy_object(
    kind: PolicyObjectKind,
    object: &Value,
) -> Result<Vec<Policy>, ManifestError> {
    let mut doc = object.clone();
    if let Some(map) = doc.as_object_mut() {
        map.remove("status");
        map.insert("apiVersion".into(), Value::from(kind.api_version()));
        map.insert("kind".into(), Value::from(kind.kind()));
        if let Some(meta) = map.get_mut("metadata").and_then(Value::as_object_mut) {
            meta.remove("managedFields");
        }
    }
    // JSON is YAML; the parser's limits and errors apply unchanged.
    manifest::parse_manifests(&doc.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_pod_gives_its_address_labels_and_named_ports() {
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": "web-1", "namespace": "shop", "labels": {"app": "web", "pod-template-hash": "abc"}},
            "spec": {"nodeName": "n1", "containers": [{"name": "c", "ports": [
                {"name": "http", "containerPort": 8080},
                {"name": "dns", "containerPort": 53, "protocol": "UDP"},
                {"containerPort": 9000}
            ]}]},
            "status": {"podIP": "10.1.0.5", "phase": "Running"}
        }))
        .unwrap();
        let p = pod_info(&pod).unwrap();
        assert_eq!(p.node.as_deref(), Some("n1"));
        assert_eq!(p.ip, Some(Ipv4Addr::new(10, 1, 0, 5)));
        assert!(p.has_own_address());
        assert_eq!(
            p.labels.len(),
            2,
            "identity labels drop rollout noise later, not here"
        );
        assert_eq!(
            p.named_ports,
            vec![
                NamedPort {
                    name: "http".into(),
                    protocol: Protocol::Tcp,
                    port: 8080
                },
                NamedPort {
                    name: "dns".into(),
                    protocol: Protocol::Udp,
                    port: 53
                },
            ]
        );
    }

    #[test]
    fn host_network_finished_and_unscheduled_pods_have_no_address_of_their_own() {
        let base = json!({"metadata": {"name": "a", "namespace": "x"}, "spec": {"containers": []}});
        let mut host = base.clone();
        host["spec"]["hostNetwork"] = json!(true);
        host["status"] = json!({"podIP": "192.168.0.2"});
        let mut done = base.clone();
        done["status"] = json!({"podIP": "10.1.0.9", "phase": "Succeeded"});
        for v in [base, host, done] {
            let p = pod_info(&serde_json::from_value(v).unwrap()).unwrap();
            assert!(!p.has_own_address(), "{p:?}");
        }
    }

    #[test]
    fn a_pods_audit_annotation_is_read_and_a_malformed_one_kept_to_be_reported() {
        let with = |value: Option<&str>| {
            let mut p =
                json!({"metadata": {"name": "a", "namespace": "x"}, "spec": {"containers": []}});
            if let Some(v) = value {
                p["metadata"]["annotations"] = json!({"palisade.io/audit": v});
            }
            pod_info(&serde_json::from_value(p).unwrap()).unwrap().audit
        };
        assert_eq!(with(None), Ok(false));
        assert_eq!(with(Some("true")), Ok(true));
        assert_eq!(with(Some("false")), Ok(false));
        assert_eq!(with(Some("yes")), Err("yes".to_string()));
        assert_eq!(
            with(Some("True")),
            Err("True".to_string()),
            "exactly as for policies"
        );
    }

    #[test]
    fn a_node_gives_its_addresses_and_pod_cidr() {
        let node: Node = serde_json::from_value(json!({
            "metadata": {"name": "n2"},
            "spec": {"podCIDR": "10.2.0.0/24"},
            "status": {"addresses": [
                {"type": "Hostname", "address": "n2"},
                {"type": "InternalIP", "address": "192.168.0.2"},
                {"type": "InternalIP", "address": "fd00::2"},
                {"type": "ExternalIP", "address": "203.0.113.9"}
            ]}
        }))
        .unwrap();
        let n = node_info(&node).unwrap();
        assert_eq!(n.internal_ip, Some(Ipv4Addr::new(192, 168, 0, 2)));
        assert_eq!(n.addresses.len(), 2);
        assert_eq!(n.pod_cidr, Some("10.2.0.0/24".parse().unwrap()));
    }

    #[test]
    fn a_policy_object_from_the_api_parses_as_its_manifest_would() {
        let object = json!({
            "metadata": {"name": "web", "namespace": "shop", "uid": "u1", "resourceVersion": "7",
                         "generation": 2, "managedFields": [{"manager": "kubectl"}]},
            "spec": {"podSelector": {"matchLabels": {"app": "web"}}, "policyTypes": ["Ingress"],
                     "ingress": [{"from": [{"podSelector": {}}], "ports": [{"port": 80, "protocol": "TCP"}]}]},
            "status": {}
        });
        let p = parse_policy_object(PolicyObjectKind::Kubernetes, &object).unwrap();
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].id.name, "web");
        assert_eq!(p[0].id.namespace.as_deref(), Some("shop"));
    }

    #[test]
    fn a_bad_policy_object_names_the_field() {
        let object = json!({
            "metadata": {"name": "bad", "namespace": "shop"},
            "spec": {"endpointSelector": {}, "ingress": [{"fromCIDR": ["10.0.0.0/33"]}]}
        });
        let err = parse_policy_object(PolicyObjectKind::Palisade, &object).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("fromCIDR"), "{text}");
        assert!(text.contains("10.0.0.0/33"), "{text}");
    }
}
