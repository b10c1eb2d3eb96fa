//! Kubernetes object metadata: which fields are accepted, and name/namespace validation.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde::de::IgnoredAny;

use super::error::{FieldPath, Invalid, Problem};

/// Namespace of namespaced objects that do not name one, as with `kubectl apply` in the
/// default context.
pub(crate) const DEFAULT_NAMESPACE: &str = "default";

/// Kubernetes ObjectMeta. Name, namespace and the `palisade.io/audit` annotation matter; the
/// other standard fields (and other annotations) are accepted, unread, so that manifests
/// exported from a cluster (`kubectl get -o yaml`) apply unchanged. Anything else is a typo
/// worth reporting.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct ObjectMeta {
    pub name: Option<String>,
    pub namespace: Option<String>,
    #[serde(rename = "labels")]
    _labels: Option<IgnoredAny>,
    pub annotations: Option<BTreeMap<String, serde_norway::Value>>,
    #[serde(rename = "uid")]
    _uid: Option<IgnoredAny>,
    #[serde(rename = "resourceVersion")]
    _resource_version: Option<IgnoredAny>,
    #[serde(rename = "generation")]
    _generation: Option<IgnoredAny>,
    #[serde(rename = "creationTimestamp")]
    _creation_timestamp: Option<IgnoredAny>,
    #[serde(rename = "deletionTimestamp")]
    _deletion_timestamp: Option<IgnoredAny>,
    #[serde(rename = "deletionGracePeriodSeconds")]
    _deletion_grace_period_seconds: Option<IgnoredAny>,
    #[serde(rename = "managedFields")]
    _managed_fields: Option<IgnoredAny>,
    #[serde(rename = "ownerReferences")]
    _owner_references: Option<IgnoredAny>,
    #[serde(rename = "finalizers")]
    _finalizers: Option<IgnoredAny>,
    #[serde(rename = "generateName")]
    _generate_name: Option<IgnoredAny>,
    #[serde(rename = "selfLink")]
    _self_link: Option<IgnoredAny>,
}

/// Whether an object lives in a namespace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Scope {
    Namespaced,
    Clusterwide,
}

/// The validated identity of an object: its namespace (None for clusterwide objects) and name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ObjectId {
    pub namespace: Option<String>,
    pub name: String,
    /// `metadata.annotations["palisade.io/audit"]` is `"true"`.
    pub audit: bool,
}

/// Validates metadata.name and metadata.namespace for an object of `scope`.
pub(crate) fn object_id(meta: Option<ObjectMeta>, scope: Scope) -> Result<ObjectId, Invalid> {
    let path = FieldPath::root().key("metadata");
    let meta = meta.unwrap_or_default();
    let name = meta
        .name
        .ok_or_else(|| path.key("name").invalid(Problem::Required("name")))?;
    validate_name(&name).map_err(|p| path.key("name").invalid(p))?;
    // Kubernetes treats an empty namespace as unset.
    let namespace = meta.namespace.filter(|ns| !ns.is_empty());
    let namespace = match (scope, namespace) {
        (Scope::Namespaced, None) => Some(DEFAULT_NAMESPACE.to_string()),
        (Scope::Namespaced, Some(ns)) => {
            validate_namespace(&ns).map_err(|p| path.key("namespace").invalid(p))?;
            Some(ns)
        }
        (Scope::Clusterwide, None) => None,
        (Scope::Clusterwide, Some(ns)) => {
            return Err(path
                .key("namespace")
                .invalid(Problem::NamespaceOnClusterwide(ns)));
        }
    };
    let audit = match meta
        .annotations
        .as_ref()
        .and_then(|a| a.get(crate::audit::AUDIT_ANNOTATION))
    {
        None => false,
        Some(serde_norway::Value::String(v)) if v == "true" => true,
        Some(serde_norway::Value::String(v)) if v == "false" => false,
        Some(other) => {
            return Err(path
                .key("annotations")
                .key(crate::audit::AUDIT_ANNOTATION)
                .invalid(Problem::InvalidAuditAnnotation(
                    serde_norway::to_string(other)
                        .unwrap_or_default()
                        .trim()
                        .to_string(),
                )));
        }
    };
    Ok(ObjectId {
        namespace,
        name,
        audit,
    })
}

/// metadata.name: a DNS-1123 subdomain.
pub(crate) fn validate_name(name: &str) -> Result<(), Problem> {
    let invalid = |why| Problem::InvalidName {
        value: name.to_string(),
        why,
    };
    if name.is_empty() || name.len() > 253 {
        return Err(invalid("must be 1 to 253 characters long"));
    }
    if !name.split('.').all(is_dns_label_syntax) {
        return Err(invalid(
            "must be a DNS-1123 subdomain: lowercase letters, digits, '-' and '.', \
             each '.'-separated part starting and ending with a letter or digit",
        ));
    }
    Ok(())
}

/// metadata.namespace: a DNS-1123 label.
pub(crate) fn validate_namespace(namespace: &str) -> Result<(), Problem> {
    let invalid = |why| Problem::InvalidName {
        value: namespace.to_string(),
        why,
    };
    if namespace.is_empty() || namespace.len() > 63 {
        return Err(invalid("a namespace must be 1 to 63 characters long"));
    }
    if !is_dns_label_syntax(namespace) {
        return Err(invalid(
            "a namespace must be a DNS-1123 label: lowercase letters, digits and '-', \
             starting and ending with a letter or digit",
        ));
    }
    Ok(())
}

/// `[a-z0-9]([-a-z0-9]*[a-z0-9])?`, without a length limit (callers apply theirs).
fn is_dns_label_syntax(part: &str) -> bool {
    let bytes = part.as_bytes();
    let alnum = |b: &u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    match (bytes.first(), bytes.last()) {
        (Some(first), Some(last)) => {
            alnum(first) && alnum(last) && bytes.iter().all(|b| alnum(b) || *b == b'-')
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(name: Option<&str>, namespace: Option<&str>) -> ObjectMeta {
        ObjectMeta {
            name: name.map(String::from),
            namespace: namespace.map(String::from),
            ..ObjectMeta::default()
        }
    }

    #[test]
    fn names_must_be_dns_subdomains() {
        assert!(validate_name("allow-frontend").is_ok());
        assert!(validate_name("a.b-c.d1").is_ok());
        assert!(validate_name(&"a".repeat(253)).is_ok());
        for bad in [
            "",
            "Upper",
            "-lead",
            "trail-",
            "a..b",
            ".a",
            "under_score",
            "sp ace",
        ] {
            assert!(validate_name(bad).is_err(), "{bad:?} accepted");
        }
        assert!(validate_name(&"a".repeat(254)).is_err());
    }

    #[test]
    fn namespaces_must_be_dns_labels() {
        assert!(validate_namespace("kube-system").is_ok());
        assert!(validate_namespace(&"a".repeat(63)).is_ok());
        assert!(validate_namespace(&"a".repeat(64)).is_err());
        assert!(validate_namespace("a.b").is_err());
        assert!(validate_namespace("Demo").is_err());
    }

    #[test]
    fn namespaced_objects_default_to_the_default_namespace() {
        let id = object_id(Some(meta(Some("p"), None)), Scope::Namespaced).unwrap();
        assert_eq!(id.namespace.as_deref(), Some("default"));
        let id = object_id(Some(meta(Some("p"), Some(""))), Scope::Namespaced).unwrap();
        assert_eq!(id.namespace.as_deref(), Some("default"));
    }

    #[test]
    fn clusterwide_objects_have_no_namespace() {
        let id = object_id(Some(meta(Some("p"), None)), Scope::Clusterwide).unwrap();
        assert_eq!(id.namespace, None);
        let err = object_id(Some(meta(Some("p"), Some("demo"))), Scope::Clusterwide).unwrap_err();
        assert_eq!(err.field.as_deref(), Some("metadata.namespace"));
        assert_eq!(err.problem, Problem::NamespaceOnClusterwide("demo".into()));
    }

    #[test]
    fn the_audit_annotation_is_the_string_true_or_false() {
        let with = |value: serde_norway::Value| ObjectMeta {
            annotations: Some(BTreeMap::from([
                ("palisade.io/audit".to_string(), value),
                (
                    "kubectl.kubernetes.io/last-applied-configuration".to_string(),
                    serde_norway::Value::Bool(true),
                ),
            ])),
            ..meta(Some("p"), Some("demo"))
        };
        let s = |v: &str| serde_norway::Value::String(v.to_string());
        assert!(
            object_id(Some(with(s("true"))), Scope::Namespaced)
                .unwrap()
                .audit
        );
        assert!(
            !object_id(Some(with(s("false"))), Scope::Namespaced)
                .unwrap()
                .audit
        );
        assert!(
            !object_id(Some(meta(Some("p"), None)), Scope::Namespaced)
                .unwrap()
                .audit
        );
        for bad in [s("yes"), serde_norway::Value::Bool(true)] {
            let err = object_id(Some(with(bad)), Scope::Namespaced).unwrap_err();
            assert_eq!(
                err.field.as_deref(),
                Some("metadata.annotations.palisade.io/audit")
            );
        }
    }

    #[test]
    fn missing_name_or_metadata_is_reported_at_metadata_name() {
        for m in [None, Some(meta(None, Some("demo")))] {
            let err = object_id(m, Scope::Namespaced).unwrap_err();
            assert_eq!(err.field.as_deref(), Some("metadata.name"));
            assert_eq!(err.problem, Problem::Required("name"));
        }
    }
}
