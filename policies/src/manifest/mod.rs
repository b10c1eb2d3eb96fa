//! Manifests: multi-document YAML, as `kubectl apply -f` takes it, strictly validated and
//! translated into the internal policy model.
//!
//! - `k8s`: `networking.k8s.io/v1` NetworkPolicy, with upstream semantics;
//! - `cilium`: the CiliumNetworkPolicy rule language, as `palisade.io/v1` NetworkPolicy and
//!   ClusterwideNetworkPolicy and as `cilium.io/v2` CiliumNetworkPolicy and
//!   CiliumClusterwideNetworkPolicy;
//! - `meta`, `selector`, `cidr`, `ports`, `http`, `icmp`: the parts they share;
//! - `limits`: the bounds (size, nesting, documents) checked before any YAML is parsed, so a
//!   hostile manifest is refused in milliseconds.
//!
//! Parsing is all-or-nothing: the first invalid document fails the whole input, so a rejected
//! apply changes nothing.

mod cidr;
mod cilium;
mod error;
mod http;
mod icmp;
mod k8s;
pub mod limits;
mod meta;
mod ports;
mod selector;

use std::collections::HashMap;

use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_norway::{Mapping, Value};

pub use error::ManifestError;
use error::{FieldPath, Invalid, Problem};
use meta::{DEFAULT_NAMESPACE, Scope};

use crate::model::{Policy, PolicyRef};

/// Parses every document of `yaml` into policies, in document order. Empty documents are
/// skipped; any invalid document fails the whole parse.
pub fn parse_manifests(yaml: &str) -> Result<Vec<Policy>, ManifestError> {
    limits::check(yaml)
        .map_err(|e| Invalid::document(e.problem).into_manifest_error(e.document, None))?;
    let mut policies = Vec::new();
    let mut defined: HashMap<PolicyRef, usize> = HashMap::new();
    for (index, document) in serde_norway::Deserializer::from_str(yaml).enumerate() {
        let number = index + 1;
        // Returning at the first YAML error matters: after one, the document iterator repeats
        // it forever or panics.
        let value = Value::deserialize(document).map_err(|e| {
            Invalid::document(Problem::Yaml(e.to_string())).into_manifest_error(number, None)
        })?;
        let Some((policy, object)) = parse_document(value, number)? else {
            continue;
        };
        if let Some(first) = defined.get(&policy.id) {
            let problem = Problem::Duplicate {
                first: *first,
                object: format!("{} policy {}", policy.id.kind.short_name(), policy.id),
            };
            let field = FieldPath::root().key("metadata").key("name");
            return Err(field
                .invalid(problem)
                .into_manifest_error(number, Some(object)));
        }
        defined.insert(policy.id.clone(), number);
        policies.push(policy);
    }
    Ok(policies)
}

/// Which translator handles a document.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ObjectType {
    KubernetesNetworkPolicy,
    Cilium(Scope),
}

impl ObjectType {
    fn of(api_version: &str, kind: &str) -> Option<ObjectType> {
        Some(match (api_version, kind) {
            ("networking.k8s.io/v1", "NetworkPolicy") => ObjectType::KubernetesNetworkPolicy,
            ("palisade.io/v1", "NetworkPolicy") | ("cilium.io/v2", "CiliumNetworkPolicy") => {
                ObjectType::Cilium(Scope::Namespaced)
            }
            ("palisade.io/v1", "ClusterwideNetworkPolicy")
            | ("cilium.io/v2", "CiliumClusterwideNetworkPolicy") => {
                ObjectType::Cilium(Scope::Clusterwide)
            }
            _ => return None,
        })
    }

    fn scope(self) -> Scope {
        match self {
            ObjectType::KubernetesNetworkPolicy => Scope::Namespaced,
            ObjectType::Cilium(scope) => scope,
        }
    }
}

/// One document: None when empty, else the policy and the object's description for errors.
fn parse_document(value: Value, number: usize) -> Result<Option<(Policy, String)>, ManifestError> {
    let mapping = match value {
        Value::Null => return Ok(None),
        Value::Mapping(mapping) => mapping,
        other => {
            let problem = Problem::NotAMapping(value_type(&other));
            return Err(Invalid::document(problem).into_manifest_error(number, None));
        }
    };
    let kind = string_field(&mapping, "kind").map_err(|e| e.into_manifest_error(number, None))?;
    let object_type = string_field(&mapping, "apiVersion").and_then(|api_version| {
        ObjectType::of(&api_version, &kind).ok_or_else(|| {
            Invalid::document(Problem::UnknownObject {
                api_version,
                kind: kind.clone(),
            })
        })
    });
    let object = describe(
        &kind,
        object_type.as_ref().ok().map(|t| t.scope()),
        &mapping,
    );
    let fail = |e: Invalid| e.into_manifest_error(number, Some(object.clone()));
    let object_type = object_type.map_err(fail)?;
    let policy = match object_type {
        ObjectType::KubernetesNetworkPolicy => decode(mapping).and_then(k8s::translate),
        ObjectType::Cilium(scope) => decode(mapping).and_then(|doc| cilium::translate(doc, scope)),
    }
    .map_err(fail)?;
    Ok(Some((policy, object)))
}

/// Deserializes the typed document, reporting a failure at the path where it happened.
fn decode<T: DeserializeOwned>(mapping: Mapping) -> Result<T, Invalid> {
    Ok(serde_path_to_error::deserialize(Value::Mapping(mapping))?)
}

/// A required top-level string such as `kind`.
fn string_field(mapping: &Mapping, field: &'static str) -> Result<String, Invalid> {
    let path = FieldPath::root().key(field);
    match mapping.get(field) {
        None | Some(Value::Null) => Err(path.invalid(Problem::Required(field))),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(_) => Err(path.invalid(Problem::NotAString(field))),
    }
}

/// `<kind> <namespace>/<name>`, or `<kind> <name>` for clusterwide objects, from whatever the
/// metadata says before it is validated; namespaced objects show their effective namespace.
fn describe(kind: &str, scope: Option<Scope>, mapping: &Mapping) -> String {
    let metadata = mapping.get("metadata");
    let text = |field: &str| metadata.and_then(|m| m.get(field)).and_then(Value::as_str);
    let namespace = text("namespace").filter(|ns| !ns.is_empty());
    match (text("name"), scope, namespace) {
        (None, _, _) => kind.to_string(),
        (Some(name), Some(Scope::Clusterwide), _) | (Some(name), None, None) => {
            format!("{kind} {name}")
        }
        (Some(name), Some(Scope::Namespaced), ns) => {
            format!("{kind} {}/{name}", ns.unwrap_or(DEFAULT_NAMESPACE))
        }
        (Some(name), None, Some(ns)) => format!("{kind} {ns}/{name}"),
    }
}

fn value_type(value: &Value) -> &'static str {
    match value {
        Value::Null => "nothing",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Sequence(_) => "a sequence",
        Value::Mapping(_) => "a mapping",
        Value::Tagged(_) => "a tagged value",
    }
}

#[cfg(test)]
pub(crate) mod test_support {
    //! Helpers for the translators' tests.

    use super::*;
    use crate::labels::{LabelSelector, NAMESPACE_LABEL};
    use crate::model::{EndpointSelector, PolicySpec};

    /// The single policy `yaml` defines.
    #[track_caller]
    pub fn parse_one(yaml: &str) -> Policy {
        match parse_manifests(yaml) {
            Ok(mut policies) if policies.len() == 1 => policies.remove(0),
            other => panic!("expected exactly one policy, got {other:?}"),
        }
    }

    /// The single spec of the single policy `yaml` defines.
    #[track_caller]
    pub fn parse_spec(yaml: &str) -> PolicySpec {
        let mut policy = parse_one(yaml);
        assert_eq!(policy.specs.len(), 1, "{policy:?}");
        policy.specs.remove(0)
    }

    #[track_caller]
    pub fn parse_err(yaml: &str) -> ManifestError {
        match parse_manifests(yaml) {
            Err(e) => {
                assert!(!e.to_string().contains('\n'), "multi-line error: {e}");
                e
            }
            Ok(p) => panic!("expected an error, parsed {p:?}"),
        }
    }

    /// Asserts the error's document, field and that its reason contains `needle`.
    #[track_caller]
    pub fn assert_err(err: &ManifestError, document: usize, field: Option<&str>, needle: &str) {
        assert_eq!(err.document, document, "{err}");
        assert_eq!(err.field.as_deref(), field, "{err}");
        assert!(
            err.reason.contains(needle),
            "{err:?} does not mention {needle:?}"
        );
    }

    /// A selector from `key=value` pairs.
    pub fn labels(pairs: &[(&str, &str)]) -> LabelSelector {
        pairs
            .iter()
            .fold(LabelSelector::default(), |s, (k, v)| s.with_label(*k, *v))
    }

    /// A selector from `key=value` pairs, in namespace `ns`.
    pub fn labels_in(ns: &str, pairs: &[(&str, &str)]) -> EndpointSelector {
        EndpointSelector(labels(pairs).with_label(NAMESPACE_LABEL, ns))
    }
}

#[cfg(test)]
mod tests {
    use super::test_support::*;
    use super::*;
    use crate::model::PolicyKind;

    const K8S_DENY_ALL: &str = "apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny-all, namespace: demo}
spec:
  podSelector: {}
";

    fn k8s(name: &str) -> String {
        format!(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: {name}, namespace: demo}}\nspec: {{podSelector: {{}}}}\n"
        )
    }

    fn palisade(name: &str) -> String {
        format!(
            "apiVersion: palisade.io/v1\nkind: NetworkPolicy\nmetadata: {{name: {name}, namespace: demo}}\nspec: {{endpointSelector: {{}}}}\n"
        )
    }

    #[test]
    fn documents_become_policies_in_order() {
        let yaml = format!("{}---\n{}---\n{}", k8s("a"), palisade("b"), k8s("c"));
        let names: Vec<_> = parse_manifests(&yaml)
            .unwrap()
            .into_iter()
            .map(|p| (p.id.kind, p.id.name))
            .collect();
        assert_eq!(
            names,
            vec![
                (PolicyKind::KubernetesNetworkPolicy, "a".to_string()),
                (PolicyKind::NetworkPolicy, "b".to_string()),
                (PolicyKind::KubernetesNetworkPolicy, "c".to_string()),
            ]
        );
    }

    #[test]
    fn empty_documents_are_skipped() {
        let yaml = format!(
            "---\n{}---\n---\n# only a comment\n---\n{}---\n",
            k8s("a"),
            k8s("b")
        );
        assert_eq!(parse_manifests(&yaml).unwrap().len(), 2);
        assert_eq!(parse_manifests("").unwrap(), vec![]);
        assert_eq!(parse_manifests("---\n").unwrap(), vec![]);
    }

    #[test]
    fn document_numbers_count_empty_documents() {
        let yaml = format!("{}---\n---\nkind: Pod\napiVersion: v1\n", k8s("a"));
        let err = parse_err(&yaml);
        assert_eq!(err.document, 3);
    }

    #[test]
    fn any_invalid_document_fails_the_whole_input() {
        let yaml = format!("{}---\n{}---\n{}", k8s("a"), k8s("Bad_Name"), k8s("c"));
        let err = parse_err(&yaml);
        assert_err(&err, 2, Some("metadata.name"), "\"Bad_Name\"");
    }

    #[test]
    fn invalid_yaml_is_reported_with_its_document() {
        let yaml = format!("{}---\nspec: [unclosed\n---\n{}", k8s("a"), k8s("b"));
        let err = parse_err(&yaml);
        assert_err(&err, 2, None, "invalid YAML");
        assert_eq!(err.object, None);
    }

    #[test]
    fn duplicate_yaml_keys_are_invalid_yaml() {
        let yaml = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nkind: NetworkPolicy\n";
        let err = parse_err(yaml);
        assert_err(&err, 1, None, "duplicate entry");
    }

    #[test]
    fn a_document_that_is_not_a_mapping_is_rejected() {
        for (yaml, found) in [
            ("- a\n- b\n", "a sequence"),
            ("just text\n", "a string"),
            ("42\n", "a number"),
        ] {
            let err = parse_err(&format!("{}---\n{yaml}", k8s("a")));
            assert_err(&err, 2, None, found);
            assert!(err.reason.contains("must be a mapping"));
        }
    }

    #[test]
    fn a_document_without_kind_or_api_version_is_rejected() {
        let err = parse_err("apiVersion: networking.k8s.io/v1\nmetadata: {name: a}\n");
        assert_err(&err, 1, Some("kind"), "kind is required");
        assert_eq!(err.object, None);
        let err = parse_err("kind: NetworkPolicy\nmetadata: {name: a}\n");
        assert_err(&err, 1, Some("apiVersion"), "apiVersion is required");
        assert_eq!(err.object.as_deref(), Some("NetworkPolicy a"));
        let err = parse_err("apiVersion: 1\nkind: NetworkPolicy\n");
        assert_err(&err, 1, Some("apiVersion"), "must be a string");
    }

    #[test]
    fn unknown_api_version_and_kind_are_named() {
        let err = parse_err("apiVersion: v1\nkind: Pod\nmetadata: {name: web, namespace: demo}\n");
        assert_err(&err, 1, None, "apiVersion \"v1\", kind \"Pod\"");
        assert_eq!(err.object.as_deref(), Some("Pod demo/web"));
        // A known kind under the wrong group is just as unknown.
        let err = parse_err("apiVersion: cilium.io/v2\nkind: NetworkPolicy\nmetadata: {name: x}\n");
        assert_err(
            &err,
            1,
            None,
            "apiVersion \"cilium.io/v2\", kind \"NetworkPolicy\"",
        );
        let err = parse_err("apiVersion: networking.k8s.io/v1beta1\nkind: NetworkPolicy\n");
        assert!(
            err.reason
                .contains("expected networking.k8s.io/v1 NetworkPolicy"),
            "{err}"
        );
    }

    #[test]
    fn errors_name_the_object_with_its_effective_namespace() {
        let err = parse_err(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: a}\nspec: {}\n",
        );
        assert_eq!(err.object.as_deref(), Some("NetworkPolicy default/a"));
        let err = parse_err(
            "apiVersion: cilium.io/v2\nkind: CiliumClusterwideNetworkPolicy\nmetadata: {name: a}\nspec: {}\n",
        );
        assert_eq!(
            err.object.as_deref(),
            Some("CiliumClusterwideNetworkPolicy a")
        );
        let err = parse_err("apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nspec: {}\n");
        assert_eq!(err.object.as_deref(), Some("NetworkPolicy"));
    }

    #[test]
    fn error_display_is_one_line_with_document_object_field_and_reason() {
        let yaml = format!(
            "{}---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: allow-db, namespace: demo}}\nspec:\n  podSelector: {{}}\n  ingress:\n  - from:\n    - ipBlock: {{cidr: 10.0.0.0/33}}\n",
            k8s("a")
        );
        let err = parse_err(&yaml);
        assert!(
            err.to_string().starts_with(
                "document 2 (NetworkPolicy demo/allow-db): spec.ingress[0].from[0].ipBlock.cidr: invalid CIDR \"10.0.0.0/33\": "
            ),
            "{err}"
        );
    }

    #[test]
    fn unknown_top_level_field_is_rejected_with_its_path() {
        let err = parse_err(&format!("{}extra: 1\n", k8s("a")));
        assert_err(&err, 1, Some("extra"), "unknown field `extra`");
        let err = parse_err(&format!("{}extra: 1\n", palisade("a")));
        assert_err(&err, 1, Some("extra"), "unknown field `extra`");
    }

    #[test]
    fn status_and_standard_metadata_are_accepted_and_ignored() {
        let yaml = "apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: a
  namespace: demo
  labels: {app: x}
  annotations: {kubectl.kubernetes.io/last-applied-configuration: '{}'}
  uid: 0b6c5c5e-1111-2222-3333-444455556666
  resourceVersion: '123'
  generation: 2
  creationTimestamp: '2024-01-01T00:00:00Z'
  deletionTimestamp: null
  deletionGracePeriodSeconds: 30
  managedFields: [{manager: kubectl, operation: Apply}]
  ownerReferences: []
  finalizers: [x/y]
  generateName: a-
  selfLink: /apis/x
spec: {podSelector: {}}
status: {anything: [goes]}
";
        assert_eq!(parse_one(yaml), parse_one(&k8s("a")));
        let err = parse_err(&k8s("a").replace("namespace: demo", "namespace: demo, nmespace: x"));
        assert_err(
            &err,
            1,
            Some("metadata.nmespace"),
            "unknown field `nmespace`",
        );
    }

    #[test]
    fn the_same_policy_twice_is_an_error() {
        let err = parse_err(&format!("{}---\n{}", k8s("a"), k8s("a")));
        assert_err(
            &err,
            2,
            Some("metadata.name"),
            "document 1 already defines k8s policy demo/a",
        );
        // palisade.io and cilium.io namespaced policies are the same kind of policy.
        let cilium = palisade("a")
            .replace("palisade.io/v1", "cilium.io/v2")
            .replace("kind: NetworkPolicy", "kind: CiliumNetworkPolicy");
        let err = parse_err(&format!("{}---\n{cilium}", palisade("a")));
        assert_err(&err, 2, Some("metadata.name"), "document 1 already defines");
    }

    #[test]
    fn same_name_in_another_namespace_or_kind_is_a_different_policy() {
        let other_ns = k8s("a").replace("namespace: demo", "namespace: prod");
        let yaml = format!("{}---\n{other_ns}---\n{}", k8s("a"), palisade("a"));
        assert_eq!(parse_manifests(&yaml).unwrap().len(), 3);
    }

    #[test]
    fn deny_all_example_parses() {
        let policy = parse_one(K8S_DENY_ALL);
        assert_eq!(policy.id.name, "deny-all");
        assert!(policy.specs[0].ingress.default_deny);
    }

    /// Parses every manifest in a directory of this crate; returns how many there were.
    fn parse_all_in(dir: &str) -> usize {
        let mut checked = 0;
        for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{dir}: {e}")) {
            let path = entry.expect("readable directory entry").path();
            if !matches!(
                path.extension().and_then(|e| e.to_str()),
                Some("yaml" | "yml")
            ) {
                continue;
            }
            let text = std::fs::read_to_string(&path).expect("readable example");
            let policies =
                parse_manifests(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            assert!(!policies.is_empty(), "{} defines no policy", path.display());
            checked += 1;
        }
        checked
    }

    #[test]
    fn every_example_manifest_parses() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/examples");
        let checked = parse_all_in(dir);
        assert!(checked >= 7, "only {checked} examples found in {dir}");
    }

    #[test]
    fn every_demo_manifest_parses() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/demo");
        let checked = parse_all_in(dir);
        assert!(checked >= 4, "only {checked} demo manifests found in {dir}");
    }
}
