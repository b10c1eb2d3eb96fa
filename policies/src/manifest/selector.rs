//! Label selectors as written in manifests, validated as Kubernetes does, and the selector
//! algebra the translators need (AND, namespace restriction).

use std::collections::{BTreeMap, BTreeSet};

use serde::Deserialize;

use super::error::{FieldPath, Invalid, Problem};
use crate::labels::{
    LabelError, LabelSelector, NAMESPACE_LABEL, NAMESPACE_LABELS_PREFIX, Operator, Requirement,
    validate_key, validate_value,
};

/// `metav1.LabelSelector` as written in YAML.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct LabelSelectorDoc {
    pub match_labels: Option<BTreeMap<String, String>>,
    pub match_expressions: Option<Vec<RequirementDoc>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RequirementDoc {
    pub key: String,
    pub operator: String,
    pub values: Option<Vec<String>>,
}

/// How selector keys are spelled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum KeySyntax {
    /// Plain Kubernetes label keys.
    Kubernetes,
    /// Cilium keys: optionally prefixed by a label source (`k8s:`, `any:`), and possibly one
    /// of Cilium's derived keys such as `io.cilium.k8s.namespace.labels.<namespace label>`.
    Cilium,
}

impl LabelSelectorDoc {
    /// The validated selector; `path` is where this selector sits in the document.
    pub fn to_selector(
        &self,
        syntax: KeySyntax,
        path: &FieldPath,
    ) -> Result<LabelSelector, Invalid> {
        let mut selector = LabelSelector::default();
        let labels_path = path.key("matchLabels");
        for (raw_key, value) in self.match_labels.iter().flatten() {
            let at = labels_path.key(raw_key);
            let key = normalize_key(raw_key, syntax).map_err(|p| at.invalid(p))?;
            validate_value(&key, value).map_err(|e| at.invalid(e))?;
            // `k8s:app` and `app` are the same key to Cilium; two of them is ambiguous.
            if selector
                .match_labels
                .insert(key.clone(), value.clone())
                .is_some()
            {
                return Err(at.invalid(Problem::DuplicateKey(key)));
            }
        }
        let expressions_path = path.key("matchExpressions");
        for (i, doc) in self.match_expressions.iter().flatten().enumerate() {
            let requirement = doc.to_requirement(syntax, &expressions_path.index(i))?;
            selector.match_expressions.push(requirement);
        }
        Ok(selector)
    }
}

impl RequirementDoc {
    fn to_requirement(&self, syntax: KeySyntax, path: &FieldPath) -> Result<Requirement, Invalid> {
        let key = normalize_key(&self.key, syntax).map_err(|p| path.key("key").invalid(p))?;
        let operator = parse_operator(&self.operator).ok_or_else(|| {
            path.key("operator")
                .invalid(Problem::UnknownOperator(self.operator.clone()))
        })?;
        let values = self.values.as_deref().unwrap_or_default();
        let values_path = path.key("values");
        match operator {
            Operator::In | Operator::NotIn if values.is_empty() => {
                return Err(values_path.invalid(Problem::ValuesRequired(operator)));
            }
            Operator::Exists | Operator::DoesNotExist if !values.is_empty() => {
                return Err(values_path.invalid(Problem::ValuesForbidden(operator)));
            }
            _ => {}
        }
        for (i, value) in values.iter().enumerate() {
            validate_value(&key, value).map_err(|e| values_path.index(i).invalid(e))?;
        }
        Ok(Requirement {
            key,
            operator,
            values: values.iter().cloned().collect(),
        })
    }
}

fn parse_operator(text: &str) -> Option<Operator> {
    Some(match text {
        "In" => Operator::In,
        "NotIn" => Operator::NotIn,
        "Exists" => Operator::Exists,
        "DoesNotExist" => Operator::DoesNotExist,
        _ => return None,
    })
}

/// The key as identity labels spell it, validated.
fn normalize_key(raw: &str, syntax: KeySyntax) -> Result<String, Problem> {
    match syntax {
        KeySyntax::Kubernetes => {
            validate_key(raw)?;
            Ok(raw.to_string())
        }
        KeySyntax::Cilium => {
            let key = strip_label_source(raw)?;
            validate_cilium_key(key)?;
            Ok(key.to_string())
        }
    }
}

/// Removes Cilium's `k8s:`/`any:` source prefix. Other sources (`reserved:`, `cidr:`,
/// `container:`...) name identities an endpoint selector here can never match, so they are
/// rejected rather than silently selecting nothing. Kubernetes keys never contain ':', so the
/// first ':' always ends a source.
fn strip_label_source(raw: &str) -> Result<&str, Problem> {
    match raw.split_once(':') {
        None => Ok(raw),
        Some(("k8s" | "any", key)) => Ok(key),
        Some((label_source, _)) => Err(Problem::UnsupportedLabelSource {
            label_source: label_source.to_string(),
            key: raw.to_string(),
        }),
    }
}

/// Cilium's namespace-label keys (`io.cilium.k8s.namespace.labels.<key>`) are validated on the
/// namespace label they stand for: prepending the prefix may push a valid key's name part past
/// 63 characters.
fn validate_cilium_key(key: &str) -> Result<(), LabelError> {
    match key.strip_prefix(NAMESPACE_LABELS_PREFIX) {
        Some(namespace_key) => validate_key(namespace_key).map_err(|e| match e {
            LabelError::InvalidKey { why, .. } => LabelError::InvalidKey {
                key: key.to_string(),
                why,
            },
            other @ LabelError::InvalidValue { .. } => other,
        }),
        None => validate_key(key),
    }
}

/// Whether the selector constrains `key` at all.
pub(crate) fn mentions_key(selector: &LabelSelector, key: &str) -> bool {
    selector.match_labels.contains_key(key)
        || selector.match_expressions.iter().any(|r| r.key == key)
}

/// The selector matching what both `a` and `b` match. A key both require with different
/// values becomes an `In` requirement, so the result matches nothing, exactly as the AND does.
pub(crate) fn and(a: LabelSelector, b: LabelSelector) -> LabelSelector {
    let mut out = a;
    for (key, value) in b.match_labels {
        match out.match_labels.get(&key) {
            None => {
                out.match_labels.insert(key, value);
            }
            Some(existing) if *existing == value => {}
            Some(_) => out.match_expressions.push(Requirement {
                key,
                operator: Operator::In,
                values: BTreeSet::from([value]),
            }),
        }
    }
    out.match_expressions.extend(b.match_expressions);
    out
}

/// `selector` restricted to endpoints of `namespace`.
pub(crate) fn in_namespace(selector: LabelSelector, namespace: &str) -> LabelSelector {
    and(
        selector,
        LabelSelector::default().with_label(NAMESPACE_LABEL, namespace),
    )
}

/// `NAMESPACE_LABEL Exists`: restricts a selector to workloads that belong to a namespace.
pub(crate) fn in_some_namespace() -> Requirement {
    Requirement {
        key: NAMESPACE_LABEL.to_string(),
        operator: Operator::Exists,
        values: BTreeSet::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::labels::Labels;

    fn doc(yaml: &str) -> LabelSelectorDoc {
        serde_norway::from_str(yaml).expect("test selector YAML")
    }

    fn select(yaml: &str, syntax: KeySyntax) -> Result<LabelSelector, Invalid> {
        doc(yaml).to_selector(syntax, &FieldPath::root().key("sel"))
    }

    #[test]
    fn match_labels_and_expressions_become_a_selector() {
        let s = select(
            "matchLabels: {app: web}\nmatchExpressions:\n- {key: env, operator: In, values: [a, b]}\n- {key: legacy, operator: DoesNotExist}\n",
            KeySyntax::Kubernetes,
        )
        .unwrap();
        assert_eq!(s.to_string(), "app=web,env in (a,b),!legacy");
    }

    #[test]
    fn empty_selector_selects_everything() {
        assert_eq!(
            select("{}", KeySyntax::Kubernetes).unwrap(),
            LabelSelector::everything()
        );
        assert_eq!(
            select(
                "matchLabels: {}\nmatchExpressions: []",
                KeySyntax::Kubernetes
            )
            .unwrap(),
            LabelSelector::everything()
        );
    }

    #[test]
    fn invalid_label_key_is_rejected_at_its_path() {
        let err = select("matchLabels: {'-app': web}", KeySyntax::Kubernetes).unwrap_err();
        assert_eq!(err.field.as_deref(), Some("sel.matchLabels.-app"));
        assert!(matches!(
            err.problem,
            Problem::Label(LabelError::InvalidKey { .. })
        ));
    }

    #[test]
    fn invalid_label_value_is_rejected_at_its_path() {
        let err = select("matchLabels: {app: 'we b'}", KeySyntax::Kubernetes).unwrap_err();
        assert_eq!(err.field.as_deref(), Some("sel.matchLabels.app"));
        let err = select(
            "matchExpressions: [{key: app, operator: In, values: [ok, 'not ok']}]",
            KeySyntax::Kubernetes,
        )
        .unwrap_err();
        assert_eq!(
            err.field.as_deref(),
            Some("sel.matchExpressions[0].values[1]")
        );
    }

    #[test]
    fn unknown_operator_is_named() {
        let err = select(
            "matchExpressions: [{key: a, operator: Equals}]",
            KeySyntax::Kubernetes,
        )
        .unwrap_err();
        assert_eq!(
            err.field.as_deref(),
            Some("sel.matchExpressions[0].operator")
        );
        assert!(err.problem.to_string().contains("\"Equals\""));
    }

    #[test]
    fn in_and_not_in_need_values() {
        for op in ["In", "NotIn"] {
            for values in ["", ", values: []"] {
                let yaml = format!("matchExpressions: [{{key: a, operator: {op}{values}}}]");
                let err = select(&yaml, KeySyntax::Kubernetes).unwrap_err();
                assert_eq!(err.field.as_deref(), Some("sel.matchExpressions[0].values"));
                assert!(matches!(err.problem, Problem::ValuesRequired(_)));
            }
        }
    }

    #[test]
    fn exists_and_does_not_exist_take_no_values() {
        for op in ["Exists", "DoesNotExist"] {
            let yaml = format!("matchExpressions: [{{key: a, operator: {op}, values: [x]}}]");
            let err = select(&yaml, KeySyntax::Kubernetes).unwrap_err();
            assert!(matches!(err.problem, Problem::ValuesForbidden(_)));
        }
        let s = select(
            "matchExpressions: [{key: a, operator: Exists, values: []}]",
            KeySyntax::Kubernetes,
        );
        assert!(s.is_ok());
    }

    #[test]
    fn cilium_keys_lose_their_k8s_and_any_source_prefix() {
        let s = select(
            "matchLabels: {'k8s:app': web, 'any:tier': db}\nmatchExpressions: [{key: 'k8s:env', operator: Exists}]",
            KeySyntax::Cilium,
        )
        .unwrap();
        assert_eq!(s.to_string(), "app=web,tier=db,env");
    }

    #[test]
    fn reserved_and_other_label_sources_are_rejected_in_endpoint_selectors() {
        for key in ["reserved:host", "cidr:10.0.0.0/8", "container:app"] {
            let err =
                select(&format!("matchLabels: {{'{key}': ''}}"), KeySyntax::Cilium).unwrap_err();
            assert!(
                matches!(err.problem, Problem::UnsupportedLabelSource { .. }),
                "{key}"
            );
            assert!(err.problem.to_string().contains("fromEntities/toEntities"));
        }
        let err = select(
            "matchExpressions: [{key: 'reserved:world', operator: Exists}]",
            KeySyntax::Cilium,
        )
        .unwrap_err();
        assert_eq!(err.field.as_deref(), Some("sel.matchExpressions[0].key"));
    }

    #[test]
    fn kubernetes_keys_with_a_source_prefix_are_invalid_keys() {
        let err = select("matchLabels: {'k8s:app': web}", KeySyntax::Kubernetes).unwrap_err();
        assert!(matches!(err.problem, Problem::Label(_)));
    }

    #[test]
    fn cilium_special_keys_are_valid() {
        let s = select(
            "matchLabels:\n  io.kubernetes.pod.namespace: prod\n  io.cilium.k8s.namespace.labels.team: a\n  k8s:io.cilium.k8s.namespace.labels.kubernetes.io/metadata.name: prod\n  io.cilium.k8s.policy.serviceaccount: sa\n",
            KeySyntax::Cilium,
        )
        .unwrap();
        assert_eq!(s.match_labels.len(), 4);
        // The namespace label's own syntax still applies.
        assert!(
            select(
                "matchLabels: {io.cilium.k8s.namespace.labels.-x: a}",
                KeySyntax::Cilium
            )
            .is_err()
        );
    }

    #[test]
    fn a_key_given_with_and_without_source_prefix_is_ambiguous() {
        let err = select("matchLabels: {'k8s:app': a, app: a}", KeySyntax::Cilium).unwrap_err();
        assert_eq!(err.problem, Problem::DuplicateKey("app".into()));
    }

    #[test]
    fn and_of_conflicting_labels_matches_nothing() {
        let a = LabelSelector::default().with_label("k", "1");
        let b = LabelSelector::default()
            .with_label("k", "2")
            .with_label("x", "y");
        let both = and(a, b);
        let labels =
            |k: &str| Labels::from([("k".to_string(), k.to_string()), ("x".into(), "y".into())]);
        assert!(!both.matches(&labels("1")));
        assert!(!both.matches(&labels("2")));
        assert_eq!(both.match_labels.get("x").map(String::as_str), Some("y"));
    }

    #[test]
    fn in_namespace_adds_the_namespace_label() {
        let s = in_namespace(LabelSelector::default().with_label("app", "web"), "demo");
        assert_eq!(
            s.match_labels.get(NAMESPACE_LABEL).map(String::as_str),
            Some("demo")
        );
        assert!(mentions_key(&s, NAMESPACE_LABEL));
        let s = LabelSelector::default().with_requirement(in_some_namespace());
        assert!(mentions_key(&s, NAMESPACE_LABEL));
        assert!(!mentions_key(&LabelSelector::default(), NAMESPACE_LABEL));
    }
}
