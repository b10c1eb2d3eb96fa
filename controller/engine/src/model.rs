//! The engine's state as plain data: endpoints, namespaces, policies and identities, and the
//! requests that change them.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;

use palisade_policies::{
    endpoint::{Endpoint, EndpointId, NamedPort},
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
        }
    }

    /// `ns/name`.
    pub fn qualified_name(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// Where a policy came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PolicySource {
    Api,
    /// A file of `--policy-dir`.
    File(PathBuf),
}

impl std::fmt::Display for PolicySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PolicySource::Api => f.write_str("api"),
            PolicySource::File(p) => write!(f, "{}", p.display()),
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

/// Everything a transaction may change.
#[derive(Clone)]
pub(crate) struct Model {
    pub endpoints: BTreeMap<String, EndpointRecord>,
    /// Labels set on namespaces by users (the name label is implicit).
    pub namespaces: BTreeMap<String, Labels>,
    /// Kept apart from their sources so compiling borrows them rather than copying them.
    pub policies: BTreeMap<PolicyRef, Policy>,
    pub policy_sources: BTreeMap<PolicyRef, PolicySource>,
    pub identities: IdentityAllocator,
    pub next_endpoint_id: u32,
}
