//! What can go wrong in the engine, typed, and how a caller should read each failure.

use std::net::Ipv4Addr;

use ipnetwork::Ipv4Network;
use palisade_policies::identity::IdentityError;
use palisade_policies::l7::L7Error;
use palisade_policies::labels::LabelError;
use palisade_policies::manifest::ManifestError;

use crate::datapath::{ApplyError, DatapathError};
use crate::plumbing::PlumbingError;
use crate::store::PersistError;

/// Who holds an address an endpoint asked for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AddressOwner {
    Endpoint { namespace: String, name: String },
    Node,
}

impl std::fmt::Display for AddressOwner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AddressOwner::Endpoint { namespace, name } => write!(f, "endpoint {namespace}/{name}"),
            AddressOwner::Node => f.write_str("the node"),
        }
    }
}

fn scope(namespace: Option<&str>) -> String {
    namespace.map_or_else(
        || "the cluster-wide scope".to_string(),
        |n| format!("namespace {n:?}"),
    )
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("invalid {what} {value:?}: {why}")]
    InvalidName {
        what: &'static str,
        value: String,
        why: &'static str,
    },
    #[error("endpoint {name:?} already exists")]
    EndpointExists { name: String },
    #[error(
        "network namespace {name:?} already exists on this node (not created by palisade); pick another endpoint name"
    )]
    NetnsExists { name: String },
    #[error("no endpoint named {name:?}")]
    NoSuchEndpoint { name: String },
    #[error("more than one endpoint is named {name:?} (in namespaces {}); say NAMESPACE/NAME", namespaces.join(", "))]
    AmbiguousEndpoint {
        name: String,
        namespaces: Vec<String>,
    },
    #[error("container {container_id} already has an attachment on {ifname}")]
    AttachmentExists {
        container_id: String,
        ifname: String,
    },
    #[error("interface {ifname} not found on the node")]
    NoSuchInterface { ifname: String },
    #[error("no attachment of container {container_id} on {ifname}")]
    NoSuchAttachment {
        container_id: String,
        ifname: String,
    },
    #[error("endpoint {name:?} has its labels already; change them with `palisade endpoint label`")]
    LabelsKnown { name: String },
    #[error("endpoint {name:?} is not in the datapath yet")]
    EndpointNotInDatapath { name: String },
    #[error("endpoint {name:?} is in namespace {actual:?}, not {asked:?}")]
    WrongNamespace {
        name: String,
        actual: String,
        asked: String,
    },
    #[error("{value:?} is not NAMESPACE/NAME")]
    NotNamespacedName { value: String },
    #[error("address {ip} is already used by {owner}")]
    AddressInUse { ip: Ipv4Addr, owner: AddressOwner },
    #[error("no free address left in {pool}")]
    AddressPoolExhausted { pool: Ipv4Network },
    #[error(transparent)]
    Label(#[from] LabelError),
    #[error("label {key} is set by palisade to the namespace name and cannot be changed")]
    ReservedNamespaceLabel { key: &'static str },
    #[error("named port {name:?} is declared twice")]
    DuplicateNamedPort { name: String },
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error("the manifest holds no documents")]
    EmptyManifest,
    #[error("no policy {name:?} in {}", scope(.namespace.as_deref()))]
    NoSuchPolicy {
        name: String,
        namespace: Option<String>,
    },
    #[error("protocol {value:?} is not TCP, UDP, SCTP or ICMP")]
    UnsupportedTraceProtocol { value: String },
    #[error("{name:?} is not a DNS name: {reason}")]
    InvalidDnsName {
        name: String,
        reason: palisade_policies::fqdn::NameError,
    },
    /// HTTP rules the proxy cannot enforce (a regular expression that does not compile).
    #[error(transparent)]
    L7Policy(#[from] L7Error),
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error("datapath: {0}")]
    Datapath(#[from] DatapathError),
    /// A map write failed part way and the maps were restored to what they held.
    #[error("datapath update failed, nothing changed: {0}")]
    RolledBack(#[source] ApplyError),
    /// The maps were written but the policy revision did not move, so established
    /// connections would not have been re-checked; the write was undone.
    #[error(
        "datapath update failed, nothing changed: the policy revision could not be bumped: {0}"
    )]
    RevisionNotBumped(#[source] DatapathError),
    #[error("plumbing: {0}")]
    Plumbing(#[from] PlumbingError),
    /// The endpoint is out of the datapath and the model, but its namespace or interface
    /// could not be removed.
    #[error(
        "endpoint {name:?} was removed from policy, but its network plumbing was not: {source}"
    )]
    EndpointLeftBehind {
        name: String,
        #[source]
        source: PlumbingError,
    },
    #[error(transparent)]
    Persist(#[from] PersistError),
    /// Kubernetes mode: policies come from the API server.
    #[error(
        "policy {policy} comes from the Kubernetes API: change it there (kubectl apply / delete)"
    )]
    ClusterManaged { policy: String },
    /// Kubernetes mode: a trace between two pods of other nodes.
    #[error("neither {from} nor {to} runs on this node: trace on the node of either")]
    NotOnThisNode { from: String, to: String },
    /// Kubernetes mode: namespace labels come from the API server.
    #[error(
        "namespace {namespace:?} is a Kubernetes namespace: change its labels there (kubectl label namespace)"
    )]
    ClusterNamespace { namespace: String },
    /// Kubernetes mode: a namespace's mode is its `palisade.io/mode` label.
    #[error(
        "namespace {namespace:?} is a Kubernetes namespace: its mode is its label (kubectl label namespace {namespace} palisade.io/mode={mode})"
    )]
    ClusterNamespaceMode {
        namespace: String,
        mode: &'static str,
    },
    /// Local mode: the mode label is not a label (`palisade namespace mode` sets the mode).
    #[error("label {key} is a namespace's mode, not a label: use `palisade namespace mode`")]
    ModeLabel { key: &'static str },
}

/// How a caller should read an error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorClass {
    /// The request was wrong: a name, label, manifest or address the caller must change.
    Invalid,
    /// The request named an endpoint or policy that does not exist.
    NotFound,
    /// The node failed (datapath, plumbing, persistence, identities): not the caller's doing.
    Internal,
}

impl EngineError {
    /// Decided for every variant, without a catch-all: a new variant does not compile until it
    /// is classed, so it cannot silently become a server error.
    pub fn class(&self) -> ErrorClass {
        match self {
            EngineError::InvalidName { .. }
            | EngineError::EndpointExists { .. }
            | EngineError::NetnsExists { .. }
            | EngineError::WrongNamespace { .. }
            | EngineError::AmbiguousEndpoint { .. }
            | EngineError::AttachmentExists { .. }
            | EngineError::LabelsKnown { .. }
            | EngineError::NoSuchInterface { .. }
            | EngineError::NotNamespacedName { .. }
            | EngineError::AddressInUse { .. }
            | EngineError::AddressPoolExhausted { .. }
            | EngineError::Label(_)
            | EngineError::ReservedNamespaceLabel { .. }
            | EngineError::DuplicateNamedPort { .. }
            | EngineError::Manifest(_)
            | EngineError::EmptyManifest
            | EngineError::UnsupportedTraceProtocol { .. }
            | EngineError::InvalidDnsName { .. }
            | EngineError::ClusterManaged { .. }
            | EngineError::ClusterNamespace { .. }
            | EngineError::ClusterNamespaceMode { .. }
            | EngineError::ModeLabel { .. }
            | EngineError::NotOnThisNode { .. }
            | EngineError::L7Policy(_) => ErrorClass::Invalid,
            EngineError::NoSuchEndpoint { .. }
            | EngineError::NoSuchAttachment { .. }
            | EngineError::EndpointNotInDatapath { .. }
            | EngineError::NoSuchPolicy { .. } => ErrorClass::NotFound,
            EngineError::Identity(_)
            | EngineError::Datapath(_)
            | EngineError::RolledBack(_)
            | EngineError::RevisionNotBumped(_)
            | EngineError::Plumbing(_)
            | EngineError::EndpointLeftBehind { .. }
            | EngineError::Persist(_) => ErrorClass::Internal,
        }
    }

    /// The manifest problem behind a rejected apply, for callers that show it field by field.
    pub fn manifest(&self) -> Option<&ManifestError> {
        match self {
            EngineError::Manifest(m) => Some(m),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caller_mistakes_and_node_failures_are_told_apart() {
        assert_eq!(EngineError::EmptyManifest.class(), ErrorClass::Invalid);
        assert_eq!(
            EngineError::NoSuchPolicy {
                name: "p".into(),
                namespace: None
            }
            .class(),
            ErrorClass::NotFound
        );
        assert_eq!(
            EngineError::Datapath(DatapathError::new(std::io::Error::other("boom"))).class(),
            ErrorClass::Internal
        );
    }

    #[test]
    fn messages_name_the_input() {
        let e = EngineError::NoSuchPolicy {
            name: "web".into(),
            namespace: Some("shop".into()),
        };
        assert_eq!(e.to_string(), "no policy \"web\" in namespace \"shop\"");
        let e = EngineError::NoSuchPolicy {
            name: "all".into(),
            namespace: None,
        };
        assert_eq!(e.to_string(), "no policy \"all\" in the cluster-wide scope");
        let e = EngineError::AddressInUse {
            ip: Ipv4Addr::new(10, 0, 0, 2),
            owner: AddressOwner::Endpoint {
                namespace: "a".into(),
                name: "b".into(),
            },
        };
        assert_eq!(
            e.to_string(),
            "address 10.0.0.2 is already used by endpoint a/b"
        );
    }
}
