//! Errors: the public `ManifestError`, and the typed problems the translators report before
//! they are tied to a document.

use std::fmt;

use ipnetwork::Ipv4Network;

use crate::labels::{LabelError, Operator};
use crate::model::Protocol;

/// Error for a document: which document (1-based index, and kind/namespace/name when known),
/// which field path (e.g. `spec.ingress[0].from[1].ipBlock.cidr`), and why. Plain data, so it
/// travels whole from the agent to the CLI (the API's error body carries it).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, serde::Serialize, serde::Deserialize)]
#[error(
    "document {document}{}{}: {reason}",
    object_part(.object.as_ref()),
    field_part(.field.as_ref())
)]
pub struct ManifestError {
    pub document: usize,
    /// `<kind> <namespace>/<name>` (or `<kind> <name>` for clusterwide objects).
    pub object: Option<String>,
    pub field: Option<String>,
    pub reason: String,
}

fn object_part(object: Option<&String>) -> String {
    object.map(|o| format!(" ({o})")).unwrap_or_default()
}

fn field_part(field: Option<&String>) -> String {
    field.map(|f| format!(": {f}")).unwrap_or_default()
}

pub(crate) const SUPPORTED_OBJECTS: &str = "networking.k8s.io/v1 NetworkPolicy, \
     palisade.io/v1 NetworkPolicy or ClusterwideNetworkPolicy, \
     cilium.io/v2 CiliumNetworkPolicy or CiliumClusterwideNetworkPolicy";

pub(crate) const ENTITY_NAMES: &str =
    "world, host, remote-node, cluster, init, health, unmanaged, kube-apiserver, ingress, all";

pub(crate) const ICMP_TYPE_NAMES: &str = "EchoReply, DestinationUnreachable, Redirect, \
     EchoRequest, TimeExceeded, ParameterProblem";

/// What is wrong with one field. Kept typed until the last moment so tests and callers inside
/// the crate can match on it; `ManifestError::reason` is its rendering.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum Problem {
    #[error("invalid YAML: {0}")]
    Yaml(String),
    #[error("the manifest is {bytes} bytes, more than the {limit} bytes accepted")]
    TooLarge { bytes: usize, limit: usize },
    #[error("collections are nested more than {limit} levels deep (line {line})")]
    TooDeep { line: usize, limit: usize },
    #[error("the manifest holds more than {limit} documents")]
    TooManyDocuments { limit: usize },
    #[error("a manifest must be a mapping, found {0}")]
    NotAMapping(&'static str),
    #[error("{0} is required")]
    Required(&'static str),
    #[error("{0} must be a string")]
    NotAString(&'static str),
    #[error(
        "unsupported object: apiVersion {api_version:?}, kind {kind:?}; expected {SUPPORTED_OBJECTS}"
    )]
    UnknownObject { api_version: String, kind: String },
    /// A message from the deserializer (wrong type, unknown or missing field).
    #[error("{0}")]
    Decode(String),
    #[error("invalid name {value:?}: {why}")]
    InvalidName { value: String, why: &'static str },
    #[error("a clusterwide policy has no namespace, but namespace {0:?} is set")]
    NamespaceOnClusterwide(String),
    #[error("document {first} already defines {object}")]
    Duplicate { first: usize, object: String },
    #[error(transparent)]
    Label(#[from] LabelError),
    #[error("label key {0:?} appears twice once source prefixes are removed")]
    DuplicateKey(String),
    #[error("unknown operator {0:?}; expected In, NotIn, Exists or DoesNotExist")]
    UnknownOperator(String),
    #[error("operator {0} needs at least one value")]
    ValuesRequired(Operator),
    #[error("operator {0} must not have values")]
    ValuesForbidden(Operator),
    #[error(
        "label source {label_source:?} (in key {key:?}) is not supported in endpoint selectors; \
         use fromEntities/toEntities to select reserved identities"
    )]
    UnsupportedLabelSource { label_source: String, key: String },
    #[error(
        "the endpointSelector of a namespaced policy always applies in the policy's namespace \
         {policy_namespace:?}; it cannot select namespace {selected:?}"
    )]
    NamespaceConflict {
        policy_namespace: String,
        selected: String,
    },
    #[error("unknown policy type {0:?}; expected Ingress or Egress")]
    UnknownPolicyType(String),
    #[error("a peer must set ipBlock, or podSelector and/or namespaceSelector")]
    EmptyPeer,
    #[error("ipBlock cannot be combined with podSelector or namespaceSelector in one peer")]
    IpBlockWithSelector,
    #[error("invalid CIDR {value:?}: {reason}")]
    InvalidCidr { value: String, reason: CidrError },
    /// Says what was IPv6: a quoted address, `family IPv6`, `protocol ICMPv6`.
    #[error("IPv6 is not supported yet: {0}")]
    Ipv6(String),
    #[error("except {except} is not strictly inside cidr {cidr}")]
    ExceptOutsideCidr {
        except: Ipv4Network,
        cidr: Ipv4Network,
    },
    #[error("unknown protocol {value:?}; expected {expected}")]
    UnknownProtocol {
        value: String,
        expected: &'static str,
    },
    #[error("port {0} is out of range 1-65535")]
    PortOutOfRange(String),
    #[error("invalid port {value:?}: {why}")]
    InvalidPortName { value: String, why: &'static str },
    #[error("endPort requires a numeric port")]
    EndPortWithoutNumericPort,
    #[error("endPort {end_port} must be between port {port} and 65535")]
    EndPortOutOfRange { port: u16, end_port: i64 },
    #[error("{0} is not supported by palisade")]
    Unsupported(&'static str),
    #[error("unknown entity {0:?}; expected one of {ENTITY_NAMES}")]
    UnknownEntity(String),
    #[error("{field} {value:?} is not a valid regular expression: {why}")]
    InvalidRegex {
        field: &'static str,
        value: String,
        why: String,
    },
    #[error("invalid header {value:?}: {why}")]
    InvalidHeader { value: String, why: &'static str },
    #[error("invalid upgrade protocol {value:?}: {why}")]
    InvalidUpgrade { value: String, why: &'static str },
    /// A palisade.io/v1 extension used in a cilium.io/v2 manifest.
    #[error(
        "unknown field `{0}`: cilium.io/v2 has no such field; it is a palisade.io/v1 extension"
    )]
    PalisadeOnlyField(&'static str),
    #[error("HTTP rules apply only to TCP, but this port's protocol is {0}")]
    HttpOnNonTcp(Protocol),
    #[error("L7 rules are not allowed in deny rules")]
    RulesInDeny,
    #[error("unknown ICMP type {0:?}; expected a number 0-255 or one of {ICMP_TYPE_NAMES}")]
    UnknownIcmpType(String),
    #[error("ICMP type {0} is out of range 0-255")]
    IcmpTypeOutOfRange(i64),
    #[error("unknown ICMP family {0:?}; expected IPv4 or IPv6")]
    UnknownIcmpFamily(String),
    #[error("fields must list at least one ICMP type")]
    NoIcmpFields,
    #[error("spec or specs must define at least one rule")]
    NoSpecs,
    #[error("must be the string \"true\" or \"false\", not {0}")]
    InvalidAuditAnnotation(String),
    #[error("every spec of a policy must agree on `audit` (a policy is in audit as a whole)")]
    AuditDisagrees,
}

/// Why a CIDR string does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum CidrError {
    #[error("expected an address with a /prefix, like 10.0.0.0/8")]
    MissingPrefix,
    #[error("{0:?} is not an IP address")]
    BadAddress(String),
    #[error("prefix length {0:?} is not a number from 0 to 32")]
    BadPrefix(String),
}

/// A problem at a field of the document being translated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Invalid {
    pub field: Option<String>,
    pub problem: Problem,
}

impl Invalid {
    /// A problem with the document as a whole rather than one of its fields.
    pub fn document(problem: Problem) -> Self {
        Invalid {
            field: None,
            problem,
        }
    }

    pub fn into_manifest_error(self, document: usize, object: Option<String>) -> ManifestError {
        ManifestError {
            document,
            object,
            field: self.field,
            reason: one_line(&self.problem.to_string()),
        }
    }
}

impl From<serde_path_to_error::Error<serde_norway::Error>> for Invalid {
    fn from(err: serde_path_to_error::Error<serde_norway::Error>) -> Self {
        let path = err.path().to_string();
        Invalid {
            // serde_path_to_error renders the document root as ".".
            field: (path != ".").then_some(path),
            problem: Problem::Decode(err.into_inner().to_string()),
        }
    }
}

/// The error contract is one line per error; some underlying messages (regex syntax errors)
/// span several.
pub(crate) fn one_line(text: &str) -> String {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

/// A field path in the same notation serde_path_to_error uses, e.g. `spec.ingress[0].from`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct FieldPath(String);

impl FieldPath {
    pub fn root() -> Self {
        FieldPath(String::new())
    }

    pub fn key(&self, key: &str) -> Self {
        if self.0.is_empty() {
            FieldPath(key.to_string())
        } else {
            FieldPath(format!("{}.{key}", self.0))
        }
    }

    pub fn index(&self, index: usize) -> Self {
        FieldPath(format!("{}[{index}]", self.0))
    }

    pub fn invalid(&self, problem: impl Into<Problem>) -> Invalid {
        Invalid {
            field: (!self.0.is_empty()).then(|| self.0.clone()),
            problem: problem.into(),
        }
    }
}

impl fmt::Display for FieldPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_names_document_object_field_and_reason_on_one_line() {
        let err = ManifestError {
            document: 2,
            object: Some("NetworkPolicy demo/allow-db".into()),
            field: Some("spec.ingress[0].from[0].ipBlock.cidr".into()),
            reason: "invalid CIDR \"10.0.0.0/33\": too long".into(),
        };
        assert_eq!(
            err.to_string(),
            "document 2 (NetworkPolicy demo/allow-db): spec.ingress[0].from[0].ipBlock.cidr: \
             invalid CIDR \"10.0.0.0/33\": too long"
        );
    }

    #[test]
    fn display_leaves_out_unknown_object_and_field() {
        let err = ManifestError {
            document: 1,
            object: None,
            field: None,
            reason: "invalid YAML: oops".into(),
        };
        assert_eq!(err.to_string(), "document 1: invalid YAML: oops");
    }

    #[test]
    fn field_paths_use_serde_path_to_error_notation() {
        let p = FieldPath::root()
            .key("spec")
            .key("ingress")
            .index(0)
            .key("from");
        assert_eq!(p.to_string(), "spec.ingress[0].from");
        assert_eq!(FieldPath::root().invalid(Problem::NoSpecs).field, None);
    }

    #[test]
    fn multi_line_reasons_are_joined_into_one_line() {
        assert_eq!(one_line("a\n   b\n\nc  "), "a b c");
    }
}
