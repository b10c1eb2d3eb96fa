//! Labels and label selectors, with Kubernetes semantics.
//!
//! Identities carry one flat label map: the pod's own labels, plus the namespace as
//! `io.kubernetes.pod.namespace=<ns>`, plus each namespace label as
//! `io.cilium.k8s.namespace.labels.<key>=<value>` (Cilium's convention, so Cilium selectors
//! that name these keys work unchanged). Kubernetes podSelector/namespaceSelector pairs are
//! translated into selectors over that flat map.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::{Deserialize, Serialize};

/// Label key holding an endpoint's namespace name in identity labels.
pub const NAMESPACE_LABEL: &str = "io.kubernetes.pod.namespace";
/// Prefix under which namespace labels appear in identity labels.
pub const NAMESPACE_LABELS_PREFIX: &str = "io.cilium.k8s.namespace.labels.";
/// The label every namespace carries with its own name, as in Kubernetes.
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

pub type Labels = BTreeMap<String, String>;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Operator {
    In,
    NotIn,
    Exists,
    DoesNotExist,
}

impl fmt::Display for Operator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            Operator::In => "In",
            Operator::NotIn => "NotIn",
            Operator::Exists => "Exists",
            Operator::DoesNotExist => "DoesNotExist",
        };
        f.write_str(s)
    }
}

/// One `matchExpressions` entry.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Requirement {
    pub key: String,
    pub operator: Operator,
    pub values: BTreeSet<String>,
}

impl Requirement {
    pub fn matches(&self, labels: &Labels) -> bool {
        let value = labels.get(&self.key);
        match self.operator {
            Operator::In => value.is_some_and(|v| self.values.contains(v)),
            // Kubernetes: NotIn also matches when the key is absent.
            Operator::NotIn => value.is_none_or(|v| !self.values.contains(v)),
            Operator::Exists => value.is_some(),
            Operator::DoesNotExist => value.is_none(),
        }
    }
}

/// A label selector: all of `match_labels` and all of `match_expressions` must hold. The empty
/// selector matches everything.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct LabelSelector {
    pub match_labels: BTreeMap<String, String>,
    pub match_expressions: Vec<Requirement>,
}

impl LabelSelector {
    pub fn everything() -> Self {
        Self::default()
    }

    pub fn is_empty(&self) -> bool {
        self.match_labels.is_empty() && self.match_expressions.is_empty()
    }

    pub fn matches(&self, labels: &Labels) -> bool {
        self.match_labels
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v))
            && self.match_expressions.iter().all(|r| r.matches(labels))
    }

    /// Adds `key=value` to `match_labels` (builder style).
    pub fn with_label(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.match_labels.insert(key.into(), value.into());
        self
    }

    pub fn with_requirement(mut self, requirement: Requirement) -> Self {
        self.match_expressions.push(requirement);
        self
    }

    /// The same selector with every key moved under `prefix` (used to turn a Kubernetes
    /// namespaceSelector into a selector over identity labels).
    pub fn prefixed(&self, prefix: &str) -> Self {
        Self {
            match_labels: self
                .match_labels
                .iter()
                .map(|(k, v)| (format!("{prefix}{k}"), v.clone()))
                .collect(),
            match_expressions: self
                .match_expressions
                .iter()
                .map(|r| Requirement {
                    key: format!("{prefix}{}", r.key),
                    operator: r.operator,
                    values: r.values.clone(),
                })
                .collect(),
        }
    }
}

impl fmt::Display for LabelSelector {
    /// kubectl-style: `app=web,tier in (a,b),!legacy`; the empty selector prints as `{}`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_empty() {
            return f.write_str("{}");
        }
        let mut parts: Vec<String> = self
            .match_labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        for r in &self.match_expressions {
            let values = r.values.iter().cloned().collect::<Vec<_>>().join(",");
            parts.push(match r.operator {
                Operator::In => format!("{} in ({values})", r.key),
                Operator::NotIn => format!("{} notin ({values})", r.key),
                Operator::Exists => r.key.clone(),
                Operator::DoesNotExist => format!("!{}", r.key),
            });
        }
        f.write_str(&parts.join(","))
    }
}

/// Why a label key or value is not valid Kubernetes syntax.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LabelError {
    #[error("label key {key:?} is invalid: {why}")]
    InvalidKey { key: String, why: &'static str },
    #[error("label value {value:?} (key {key:?}) is invalid: {why}")]
    InvalidValue {
        key: String,
        value: String,
        why: &'static str,
    },
}

fn valid_name_segment(s: &str, max: usize) -> Result<(), &'static str> {
    if s.is_empty() {
        return Err("name part must not be empty");
    }
    if s.len() > max {
        return Err("name part must be 63 characters or less");
    }
    let bytes = s.as_bytes();
    if !bytes[0].is_ascii_alphanumeric() || !bytes[bytes.len() - 1].is_ascii_alphanumeric() {
        return Err("must start and end with an alphanumeric character");
    }
    if !bytes
        .iter()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        return Err("may contain only alphanumerics, '-', '_' and '.'");
    }
    Ok(())
}

fn valid_dns_subdomain(s: &str) -> Result<(), &'static str> {
    if s.is_empty() || s.len() > 253 {
        return Err("prefix must be a DNS subdomain of at most 253 characters");
    }
    for part in s.split('.') {
        let b = part.as_bytes();
        if b.is_empty()
            || !b[0].is_ascii_alphanumeric()
            || !b[b.len() - 1].is_ascii_alphanumeric()
            || !b
                .iter()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        {
            return Err("prefix must be a lowercase DNS subdomain");
        }
    }
    Ok(())
}

/// Validates a label key: `[prefix/]name` as Kubernetes defines it.
pub fn validate_key(key: &str) -> Result<(), LabelError> {
    let invalid = |why| LabelError::InvalidKey {
        key: key.to_string(),
        why,
    };
    let (prefix, name) = match key.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    if let Some(p) = prefix {
        valid_dns_subdomain(p).map_err(invalid)?;
    }
    valid_name_segment(name, 63).map_err(invalid)
}

/// Validates a label value: empty, or a name segment of at most 63 characters.
pub fn validate_value(key: &str, value: &str) -> Result<(), LabelError> {
    if value.is_empty() {
        return Ok(());
    }
    valid_name_segment(value, 63).map_err(|why| LabelError::InvalidValue {
        key: key.to_string(),
        value: value.to_string(),
        why,
    })
}

/// Parses `k=v[,k=v...]` as used on the command line.
pub fn parse_label_list(s: &str) -> Result<Labels, String> {
    let mut labels = Labels::new();
    for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        let (k, v) = item
            .split_once('=')
            .ok_or_else(|| format!("label {item:?} is not of the form key=value"))?;
        validate_key(k).map_err(|e| e.to_string())?;
        validate_value(k, v).map_err(|e| e.to_string())?;
        labels.insert(k.to_string(), v.to_string());
    }
    Ok(labels)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn req(key: &str, op: Operator, values: &[&str]) -> Requirement {
        Requirement {
            key: key.into(),
            operator: op,
            values: values
                .iter()
                .map(std::string::ToString::to_string)
                .collect(),
        }
    }

    #[test]
    fn empty_selector_matches_everything() {
        assert!(LabelSelector::everything().matches(&Labels::new()));
        assert!(LabelSelector::everything().matches(&labels(&[("a", "b")])));
    }

    #[test]
    fn match_labels_needs_every_pair() {
        let s = LabelSelector::default()
            .with_label("app", "web")
            .with_label("tier", "front");
        assert!(s.matches(&labels(&[("app", "web"), ("tier", "front"), ("x", "y")])));
        assert!(!s.matches(&labels(&[("app", "web")])));
        assert!(!s.matches(&labels(&[("app", "db"), ("tier", "front")])));
    }

    #[test]
    fn in_requires_key_with_listed_value() {
        let r = req("env", Operator::In, &["prod", "staging"]);
        assert!(r.matches(&labels(&[("env", "prod")])));
        assert!(!r.matches(&labels(&[("env", "dev")])));
        assert!(!r.matches(&Labels::new()));
    }

    #[test]
    fn not_in_matches_when_key_absent() {
        let r = req("env", Operator::NotIn, &["prod"]);
        assert!(r.matches(&Labels::new()));
        assert!(r.matches(&labels(&[("env", "dev")])));
        assert!(!r.matches(&labels(&[("env", "prod")])));
    }

    #[test]
    fn exists_and_does_not_exist_look_at_the_key_only() {
        let l = labels(&[("legacy", "")]);
        assert!(req("legacy", Operator::Exists, &[]).matches(&l));
        assert!(!req("legacy", Operator::DoesNotExist, &[]).matches(&l));
        assert!(req("other", Operator::DoesNotExist, &[]).matches(&l));
    }

    #[test]
    fn prefixed_selector_moves_every_key() {
        let s = LabelSelector::default()
            .with_label("team", "a")
            .with_requirement(req("env", Operator::Exists, &[]));
        let p = s.prefixed(NAMESPACE_LABELS_PREFIX);
        let flat = labels(&[
            ("io.cilium.k8s.namespace.labels.team", "a"),
            ("io.cilium.k8s.namespace.labels.env", "x"),
        ]);
        assert!(p.matches(&flat));
        assert!(!s.matches(&flat));
    }

    #[test]
    fn label_keys_and_values_follow_kubernetes_syntax() {
        assert!(validate_key("app").is_ok());
        assert!(validate_key("app.kubernetes.io/name").is_ok());
        assert!(validate_key("").is_err());
        assert!(validate_key("-bad").is_err());
        assert!(validate_key("Bad.Prefix/name").is_err());
        assert!(validate_key(&"x".repeat(64)).is_err());
        assert!(validate_value("k", "").is_ok());
        assert!(validate_value("k", "v1.2_3-a").is_ok());
        assert!(validate_value("k", "no spaces").is_err());
    }

    #[test]
    fn label_list_parses_and_rejects_junk() {
        assert_eq!(
            parse_label_list("app=web, tier=front").unwrap(),
            labels(&[("app", "web"), ("tier", "front")])
        );
        assert!(parse_label_list("app").is_err());
        assert!(parse_label_list("app=we b").is_err());
    }

    #[test]
    fn selector_display_reads_like_kubectl() {
        let s = LabelSelector::default()
            .with_label("app", "web")
            .with_requirement(req("env", Operator::In, &["a", "b"]))
            .with_requirement(req("legacy", Operator::DoesNotExist, &[]));
        assert_eq!(s.to_string(), "app=web,env in (a,b),!legacy");
        assert_eq!(LabelSelector::everything().to_string(), "{}");
    }
}
