//! The engine's state as plain data: endpoints, namespaces, policies and identities, and the
//! requests that change them.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;

use palisade_policies::{
    endpoint::{Endpoint, EndpointId, NamedPort},
    identity::{Identity, IdentityAllocator},
    labels::{self, Labels},
    model::{Policy, PolicyRef},
};
use serde::{Deserialize, Serialize};

use crate::error::EngineError;

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

/// DNS-1123 label: what Kubernetes requires of namespace names, and what endpoint names must
/// be to serve as `ip netns` names.
pub(crate) fn validate_dns_label(what: &'static str, value: &str) -> Result<(), EngineError> {
    let bad = |why| EngineError::InvalidName {
        what,
        value: value.to_string(),
        why,
    };
    if value.is_empty() || value.len() > 63 {
        return Err(bad("must be 1-63 characters"));
    }
    let b = value.as_bytes();
    if !b
        .iter()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
    {
        return Err(bad("may contain only lowercase letters, digits and '-'"));
    }
    if !b[0].is_ascii_alphanumeric() || !b[b.len() - 1].is_ascii_alphanumeric() {
        return Err(bad("must start and end with a letter or digit"));
    }
    Ok(())
}

pub(crate) fn validate_labels(l: &Labels) -> Result<(), EngineError> {
    for (k, v) in l {
        labels::validate_key(k)?;
        labels::validate_value(k, v)?;
    }
    Ok(())
}
