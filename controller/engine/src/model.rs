//! The engine's state as plain data: endpoints, namespaces, policies and identities, and the
//! requests that change them.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;

use palisade_policies::{
    audit::NamespaceMode,
    endpoint::{Endpoint, EndpointId, LinkLayer, NamedPort},
    identity::{Identity, IdentityAllocator},
    labels::Labels,
    model::{Policy, PolicyRef},
};
use serde::{Deserialize, Serialize};

/// An endpoint as the engine keeps it (and persists it).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EndpointRecord {
    pub id: EndpointId,
    pub name: String,
    pub namespace: String,
    pub labels: Labels,
    pub ip: Ipv4Addr,
    pub named_ports: Vec<NamedPort>,
    pub identity: Identity,
    pub host_ifname: String,
    pub ifindex: u32,
    /// Who made its namespace and veth.
    #[serde(default)]
    pub origin: EndpointOrigin,
    /// Its labels are not known yet (a container whose runtime has not told them): it holds
    /// the reserved `init` identity, and both its directions are enforced.
    #[serde(default)]
    pub pending_labels: bool,
    /// Put in audit on its own (`palisade endpoint audit`): what policy would drop at it is
    /// forwarded and reported as AUDIT.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub audit: bool,
    /// Kubernetes mode: its labels are known but the cluster has not numbered them yet; it
    /// holds `init` (and `pending_labels`) until it has.
    #[serde(default)]
    pub awaiting_identity: bool,
    /// Its veth's link layer, as last read from the interfaces (read again at every start).
    #[serde(default)]
    pub link: LinkLayer,
}

/// Who made an endpoint's namespace and veth.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum EndpointOrigin {
    /// Palisade did (`palisade endpoint add`): its namespace is the `ip netns` named after the
    /// endpoint, and removing the endpoint removes them.
    #[default]
    Local,
    /// A container runtime did, through the CNI plugin, which also removes them.
    Cni(CniAttachment),
}

/// A container's attachment, as CNI names it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CniAttachment {
    /// The network's `name` in the runtime's configuration; GC is scoped to it. (Absent from
    /// state kept before networks were recorded: those attachments are GC's of the unnamed
    /// network.)
    #[serde(default)]
    pub network: String,
    pub container_id: String,
    /// The interface inside the container (`CNI_IFNAME`).
    pub ifname: String,
    /// The container's network namespace (`CNI_NETNS`).
    pub netns: PathBuf,
    /// Another plugin (bridge, ptp) made the veth and its routes; palisade only judges it.
    pub chained: bool,
}

/// Where an endpoint's network namespace is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NetnsRef {
    /// An `ip netns` name.
    Named(String),
    /// A path to a namespace file.
    Path(PathBuf),
}

impl Model {
    /// A namespace's labels, the name label included.
    pub(crate) fn namespace_labels(&self, ns: &str) -> Labels {
        let mut l = self.namespaces.get(ns).cloned().unwrap_or_default();
        l.insert(
            palisade_policies::labels::NAMESPACE_NAME_LABEL.to_string(),
            ns.to_string(),
        );
        l
    }
}

impl EndpointRecord {
    /// The endpoint's network namespace.
    pub fn netns(&self) -> NetnsRef {
        match &self.origin {
            EndpointOrigin::Local => NetnsRef::Named(self.name.clone()),
            EndpointOrigin::Cni(c) => NetnsRef::Path(c.netns.clone()),
        }
    }

    /// Its interface inside its namespace: `eth0` for palisade's own, `CNI_IFNAME` for a
    /// container's.
    pub fn workload_ifname(&self) -> &str {
        match &self.origin {
            EndpointOrigin::Local => "eth0",
            EndpointOrigin::Cni(c) => &c.ifname,
        }
    }

    /// The CNI attachment, for endpoints a runtime made.
    pub fn attachment(&self) -> Option<&CniAttachment> {
        match &self.origin {
            EndpointOrigin::Local => None,
            EndpointOrigin::Cni(c) => Some(c),
        }
    }
}

impl EndpointRecord {
    /// The endpoint as the compiler sees it.
    pub fn to_endpoint(&self) -> Endpoint {
        Endpoint {
            id: self.id,
            name: self.name.clone(),
            namespace: self.namespace.clone(),
            identity: self.identity,
            ip: self.ip,
            ifindex: self.ifindex,
            named_ports: self.named_ports.clone(),
            link: self.link,
        }
    }

    /// `ns/name`, which is also its key in the model.
    pub fn qualified_name(&self) -> String {
        qualified(&self.namespace, &self.name)
    }
}

/// Where a policy came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PolicySource {
    Api,
    /// A file of `--policy-dir`.
    File(PathBuf),
    /// An object of the Kubernetes API (Kubernetes mode).
    Cluster,
}

impl std::fmt::Display for PolicySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PolicySource::Api => f.write_str("api"),
            PolicySource::File(p) => write!(f, "{}", p.display()),
            PolicySource::Cluster => f.write_str("kubernetes"),
        }
    }
}

/// A new endpoint, as asked for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointSpec {
    pub name: String,
    pub namespace: String,
    pub labels: Labels,
    /// None: the lowest free address of the pod CIDR.
    pub ip: Option<Ipv4Addr>,
    pub named_ports: Vec<NamedPort>,
}

/// An endpoint's key: `ns/name`.
pub fn qualified(namespace: &str, name: &str) -> String {
    format!("{namespace}/{name}")
}

/// A container a runtime attached through the CNI plugin, as the plugin registers it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AttachmentSpec {
    pub attachment: CniAttachment,
    /// The veth's host side, in the node's namespace.
    pub host_ifname: String,
    pub ip: Ipv4Addr,
    /// The endpoint's name (the pod's or the container's).
    pub name: String,
    pub namespace: String,
    /// None: not known yet (the runtime tells them later); the endpoint has the `init`
    /// identity until then.
    pub labels: Option<Labels>,
    pub named_ports: Vec<NamedPort>,
}

/// Labels to set and keys to remove.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LabelChange {
    pub set: Labels,
    pub remove: Vec<String>,
}

impl LabelChange {
    pub(crate) fn applied_to(&self, labels: &Labels) -> Labels {
        let mut out = labels.clone();
        for k in &self.remove {
            out.remove(k);
        }
        out.extend(self.set.clone());
        out
    }
}

/// Policies read from one file of the policy directory.
pub type FilePolicies = (PathBuf, Vec<Policy>);

/// Something of the cluster outside this node that policy must know by address.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum RemoteSpec {
    /// A pod of another node: peers see it by its workload identity.
    Pod {
        namespace: String,
        name: String,
        labels: Labels,
        ip: Ipv4Addr,
        node: String,
    },
    /// Another node: its addresses are `remote-node`.
    Node { name: String, ips: Vec<Ipv4Addr> },
}

impl RemoteSpec {
    pub fn ips(&self) -> Vec<Ipv4Addr> {
        match self {
            RemoteSpec::Pod { ip, .. } => vec![*ip],
            RemoteSpec::Node { ips, .. } => ips.clone(),
        }
    }
}

/// A remote pod or node as the engine keeps it (and persists it), with its identity.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoteRecord {
    pub spec: RemoteSpec,
    pub identity: Identity,
}

/// Changes to one kind of cluster state. `replace_all`: what is not upserted here is gone
/// (a relist, or the first sync after a start).
#[derive(Clone, Debug, PartialEq)]
pub struct Changes<K, V> {
    pub replace_all: bool,
    pub upsert: Vec<(K, V)>,
    pub delete: Vec<K>,
}

impl<K, V> Default for Changes<K, V> {
    fn default() -> Self {
        Self {
            replace_all: false,
            upsert: Vec::new(),
            delete: Vec::new(),
        }
    }
}

impl<K, V> Changes<K, V> {
    pub fn is_empty(&self) -> bool {
        !self.replace_all && self.upsert.is_empty() && self.delete.is_empty()
    }
}

/// What the cluster changed, applied together in one transaction (Kubernetes mode): the
/// watchers batch what arrives close together, so a relist of thousands of objects is one
/// compile, not thousands.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ClusterDelta {
    /// The cluster's identity numbers, replacing the ones known (None: unchanged).
    pub identities: Option<BTreeMap<Labels, Identity>>,
    /// Namespace labels as the cluster has them.
    pub namespaces: Changes<String, Labels>,
    /// Pods of other nodes and other nodes, by key (`pod/NS/NAME`, `node/NAME`).
    pub remotes: Changes<String, RemoteSpec>,
    /// Policy objects, already parsed and validated by the sender.
    pub policies: Changes<PolicyRef, Policy>,
    /// Labels of this node's pods (endpoint key `ns/name`), replacing what they had; a pod
    /// whose labels were pending leaves `init`.
    pub endpoint_labels: Vec<(String, Labels)>,
    /// Whether each of this node's pods (endpoint key `ns/name`) is in audit, from its
    /// `palisade.io/audit` annotation.
    pub endpoint_audit: Vec<(String, bool)>,
}

impl ClusterDelta {
    pub fn is_empty(&self) -> bool {
        self.identities.is_none()
            && self.namespaces.is_empty()
            && self.remotes.is_empty()
            && self.policies.is_empty()
            && self.endpoint_labels.is_empty()
            && self.endpoint_audit.is_empty()
    }
}

/// Everything a transaction may change.
#[derive(Clone)]
pub(crate) struct Model {
    /// By `ns/name`.
    pub endpoints: BTreeMap<String, EndpointRecord>,
    /// Labels set on namespaces by users (the name label is implicit).
    pub namespaces: BTreeMap<String, Labels>,
    /// Kept apart from their sources so compiling borrows them rather than copying them.
    pub policies: BTreeMap<PolicyRef, Policy>,
    pub policy_sources: BTreeMap<PolicyRef, PolicySource>,
    pub identities: IdentityAllocator,
    pub next_endpoint_id: u32,
    /// Namespaces not in protect mode (`palisade namespace mode`; in Kubernetes the
    /// `palisade.io/mode` label, which the adapter turns into the same command).
    pub namespace_modes: BTreeMap<String, NamespaceMode>,
    /// Kubernetes mode: other nodes' pods and the other nodes, by key.
    pub remotes: BTreeMap<String, RemoteRecord>,
    /// What DNS answers taught.
    pub fqdns: crate::fqdn::FqdnCache,
}
