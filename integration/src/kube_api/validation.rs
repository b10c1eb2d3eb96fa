//! Name and label validation with apimachinery's messages (`validation.IsDNS1123Subdomain`,
//! `IsQualifiedName`, `IsValidLabelValue`, `path.IsValidPathSegmentName`).

use std::sync::LazyLock;

use regex::Regex;
use serde_json::Value;

use super::status::FieldError;

const DNS1123_LABEL: &str = "[a-z0-9]([-a-z0-9]*[a-z0-9])?";
const DNS1123_SUBDOMAIN: &str = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*";
const QUALIFIED_NAME: &str = "([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]";
const LABEL_VALUE: &str = "(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?";

fn anchored(re: &str) -> Regex {
    Regex::new(&format!("^(?:{re})$")).expect("valid regex")
}

static LABEL_RE: LazyLock<Regex> = LazyLock::new(|| anchored(DNS1123_LABEL));
static SUBDOMAIN_RE: LazyLock<Regex> = LazyLock::new(|| anchored(DNS1123_SUBDOMAIN));
static QUALIFIED_RE: LazyLock<Regex> = LazyLock::new(|| anchored(QUALIFIED_NAME));
static VALUE_RE: LazyLock<Regex> = LazyLock::new(|| anchored(LABEL_VALUE));

/// How a resource's object names are validated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NameRule {
    /// RFC 1123 subdomain (most resources).
    Subdomain,
    /// RFC 1123 label (namespaces, services).
    Label,
    /// Anything that is a valid path segment (RBAC objects, events).
    PathSegment,
}

/// Problems with a name, as the messages of `metadata.name: Invalid value: ...` (without the
/// field and value).
pub fn name(rule: NameRule, name: &str) -> Vec<String> {
    match rule {
        NameRule::Subdomain => dns1123_subdomain(name),
        NameRule::Label => dns1123_label(name),
        NameRule::PathSegment => path_segment(name),
    }
}

fn dns1123_label(s: &str) -> Vec<String> {
    let mut errs = Vec::new();
    if s.len() > 63 {
        errs.push("must be no more than 63 characters".to_string());
    }
    if !LABEL_RE.is_match(s) {
        errs.push(format!(
            "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex used for validation is '{DNS1123_LABEL}')"
        ));
    }
    errs
}

fn dns1123_subdomain(s: &str) -> Vec<String> {
    let mut errs = Vec::new();
    if s.len() > 253 {
        errs.push("must be no more than 253 characters".to_string());
    }
    if !SUBDOMAIN_RE.is_match(s) {
        errs.push(format!(
            "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used for validation is '{DNS1123_SUBDOMAIN}')"
        ));
    }
    errs
}

fn path_segment(s: &str) -> Vec<String> {
    if s == "." || s == ".." {
        return vec![format!("may not be '{s}'")];
    }
    ["/", "%"]
        .iter()
        .filter(|bad| s.contains(**bad))
        .map(|bad| format!("may not contain '{bad}'"))
        .collect()
}

/// A label (or annotation) key: an optional DNS subdomain prefix, `/`, and a qualified name.
pub fn label_key(key: &str) -> Result<(), String> {
    let (prefix, name) = match key.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    if let Some(p) = prefix {
        if p.is_empty() {
            return Err(format!("{key:?}: prefix part must be non-empty"));
        }
        if let Some(e) = dns1123_subdomain(p).into_iter().next() {
            return Err(format!("{key:?}: prefix part {e}"));
        }
    }
    if name.is_empty() {
        return Err(format!("{key:?}: name part must be non-empty"));
    }
    if name.len() > 63 {
        return Err(format!(
            "{key:?}: name part must be no more than 63 characters"
        ));
    }
    if !QUALIFIED_RE.is_match(name) || name.contains('/') {
        return Err(format!(
            "{key:?}: name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (e.g. 'MyName',  or 'my.name',  or '123-abc', regex used for validation is '{QUALIFIED_NAME}')"
        ));
    }
    Ok(())
}

pub fn label_value(v: &str) -> Result<(), String> {
    if v.len() > 63 {
        return Err(format!("{v:?}: must be no more than 63 characters"));
    }
    if !VALUE_RE.is_match(v) {
        return Err(format!(
            "{v:?}: a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (e.g. 'MyValue',  or 'my_value',  or '12345', regex used for validation is '{LABEL_VALUE}')"
        ));
    }
    Ok(())
}

/// Validates the metadata every object has: name (or generateName), labels, annotation keys.
pub fn object_meta(obj: &Value, rule: NameRule, name_required: bool) -> Vec<FieldError> {
    let mut errs = Vec::new();
    let meta = obj.get("metadata");
    let name_v = meta
        .and_then(|m| m.get("name"))
        .and_then(Value::as_str)
        .unwrap_or("");
    let generate = meta
        .and_then(|m| m.get("generateName"))
        .and_then(Value::as_str)
        .unwrap_or("");
    if name_v.is_empty() {
        if name_required && generate.is_empty() {
            errs.push(FieldError::required(
                "metadata.name",
                "name or generateName is required",
            ));
        }
    } else {
        for e in name(rule, name_v) {
            errs.push(FieldError::invalid(
                "metadata.name",
                &Value::String(name_v.to_string()),
                &e,
            ));
        }
    }
    if let Some(labels) = meta.and_then(|m| m.get("labels")) {
        match labels.as_object() {
            Some(map) => {
                for (k, v) in map {
                    if let Err(e) = label_key(k) {
                        errs.push(FieldError::invalid(
                            "metadata.labels",
                            &Value::String(k.clone()),
                            e.split_once(": ").map_or(&*e, |(_, r)| r),
                        ));
                    }
                    match v.as_str() {
                        Some(s) => {
                            if let Err(e) = label_value(s) {
                                errs.push(FieldError::invalid(
                                    "metadata.labels",
                                    v,
                                    e.split_once(": ").map_or(&*e, |(_, r)| r),
                                ));
                            }
                        }
                        None => errs.push(FieldError::type_invalid(
                            &format!("metadata.labels.{k}"),
                            v,
                            "must be a string",
                        )),
                    }
                }
            }
            None if !labels.is_null() => errs.push(FieldError::type_invalid(
                "metadata.labels",
                labels,
                "must be a map of strings",
            )),
            None => {}
        }
    }
    if let Some(ann) = meta
        .and_then(|m| m.get("annotations"))
        .and_then(Value::as_object)
    {
        for (k, v) in ann {
            if let Err(e) = label_key(k) {
                errs.push(FieldError::invalid(
                    "metadata.annotations",
                    &Value::String(k.clone()),
                    e.split_once(": ").map_or(&*e, |(_, r)| r),
                ));
            }
            if !v.is_string() {
                errs.push(FieldError::type_invalid(
                    &format!("metadata.annotations.{k}"),
                    v,
                    "must be a string",
                ));
            }
        }
    }
    errs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(name(NameRule::Subdomain, "web.shop-1").is_empty());
        assert!(!name(NameRule::Subdomain, "Web").is_empty());
        assert!(!name(NameRule::Label, "a.b").is_empty());
        assert!(name(NameRule::PathSegment, "system:controller:x").is_empty());
        assert!(!name(NameRule::PathSegment, "a/b").is_empty());
    }

    #[test]
    fn labels() {
        assert!(label_key("app.kubernetes.io/name").is_ok());
        assert!(label_key("app").is_ok());
        assert!(label_key("/x").is_err());
        assert!(label_key("a/b/c").is_err());
        assert!(label_value("").is_ok());
        assert!(label_value("my_value-1").is_ok());
        assert!(label_value("bad value").is_err());
    }
}
