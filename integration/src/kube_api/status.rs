//! `Status` errors, worded as kube-apiserver words them (k8s.io/apimachinery's
//! `pkg/api/errors`), so that clients branching on `reason`, `code` or the message see what a
//! real server would send.

use std::fmt;

use serde_json::{Value, json};

/// A group and resource, displayed as the server names them in messages: `pods`,
/// `networkpolicies.networking.k8s.io`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GroupResource {
    pub group: String,
    pub resource: String,
}

impl GroupResource {
    pub fn new(group: &str, resource: &str) -> GroupResource {
        GroupResource {
            group: group.to_string(),
            resource: resource.to_string(),
        }
    }
}

impl fmt::Display for GroupResource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.group.is_empty() {
            f.write_str(&self.resource)
        } else {
            write!(f, "{}.{}", self.resource, self.group)
        }
    }
}

/// One field error of an `Invalid` status (`field.Error`).
#[derive(Clone, Debug)]
pub struct FieldError {
    /// `FieldValueRequired`, `FieldValueInvalid`, `FieldValueNotSupported`, ...
    pub reason: &'static str,
    pub field: String,
    /// The message without the field: `Required value: name or generateName is required`.
    pub message: String,
}

impl FieldError {
    pub fn required(field: &str, detail: &str) -> FieldError {
        FieldError {
            reason: "FieldValueRequired",
            field: field.to_string(),
            message: if detail.is_empty() {
                "Required value".to_string()
            } else {
                format!("Required value: {detail}")
            },
        }
    }

    /// `Invalid value: VALUE: DETAIL`, where VALUE is printed as Go's `%#v` would (strings
    /// quoted, numbers bare).
    pub fn invalid(field: &str, value: &Value, detail: &str) -> FieldError {
        let shown = match value {
            Value::String(s) => format!("{s:?}"),
            Value::Null => "null".to_string(),
            other => other.to_string(),
        };
        FieldError {
            reason: "FieldValueInvalid",
            field: field.to_string(),
            message: format!("Invalid value: {shown}: {detail}"),
        }
    }

    /// `Invalid value: SHOWN: DETAIL` with the value printed as given (`0x0`).
    pub fn invalid_shown(field: &str, shown: &str, detail: &str) -> FieldError {
        FieldError {
            reason: "FieldValueInvalid",
            field: field.to_string(),
            message: format!("Invalid value: {shown}: {detail}"),
        }
    }

    pub fn not_supported(field: &str, value: &Value, supported: &[String]) -> FieldError {
        let list: Vec<String> = supported.iter().map(|s| format!("{s:?}")).collect();
        FieldError {
            reason: "FieldValueNotSupported",
            field: field.to_string(),
            message: format!(
                "Unsupported value: {}: supported values: {}",
                value,
                list.join(", ")
            ),
        }
    }

    pub fn forbidden(field: &str, detail: &str) -> FieldError {
        FieldError {
            reason: "FieldValueForbidden",
            field: field.to_string(),
            message: format!("Forbidden: {detail}"),
        }
    }

    pub fn type_invalid(field: &str, value: &Value, detail: &str) -> FieldError {
        FieldError {
            reason: "FieldValueTypeInvalid",
            ..FieldError::invalid(field, value, detail)
        }
    }

    fn full(&self) -> String {
        format!("{}: {}", self.field, self.message)
    }
}

/// A failed request: the HTTP code and the `Status` body the server answers with.
#[derive(Clone, Debug)]
pub struct ApiError {
    pub code: u16,
    pub reason: String,
    pub message: String,
    pub details: Option<Value>,
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({}): {}", self.code, self.reason, self.message)
    }
}

impl std::error::Error for ApiError {}

impl ApiError {
    pub fn new(code: u16, reason: &str, message: impl Into<String>) -> ApiError {
        ApiError {
            code,
            reason: reason.to_string(),
            message: message.into(),
            details: None,
        }
    }

    fn with_details(mut self, details: Value) -> ApiError {
        self.details = Some(details);
        self
    }

    fn named(gr: &GroupResource, name: &str) -> Value {
        let mut d = json!({ "name": name, "kind": gr.resource });
        if !gr.group.is_empty() {
            d["group"] = json!(gr.group);
        }
        d
    }

    /// The `Status` object of this error.
    pub fn to_status(&self) -> Value {
        let mut s = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        });
        if let Some(d) = &self.details {
            s["details"] = d.clone();
        }
        s
    }

    /// `pods "x" not found`.
    pub fn not_found(gr: &GroupResource, name: &str) -> ApiError {
        ApiError::new(404, "NotFound", format!("{gr} {name:?} not found"))
            .with_details(Self::named(gr, name))
    }

    /// What a path that names no served resource gets.
    pub fn no_such_resource() -> ApiError {
        ApiError::new(
            404,
            "NotFound",
            "the server could not find the requested resource",
        )
        .with_details(json!({}))
    }

    pub fn already_exists(gr: &GroupResource, name: &str) -> ApiError {
        ApiError::new(
            409,
            "AlreadyExists",
            format!("{gr} {name:?} already exists"),
        )
        .with_details(Self::named(gr, name))
    }

    /// The optimistic-concurrency failure.
    pub fn conflict(gr: &GroupResource, name: &str) -> ApiError {
        Self::conflict_because(
            gr,
            name,
            "the object has been modified; please apply your changes to the latest version and try again",
        )
    }

    pub fn conflict_because(gr: &GroupResource, name: &str, why: &str) -> ApiError {
        ApiError::new(
            409,
            "Conflict",
            format!("Operation cannot be fulfilled on {gr} {name:?}: {why}"),
        )
        .with_details(Self::named(gr, name))
    }

    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(400, "BadRequest", message)
    }

    /// `Kind.group "name" is invalid: field: message` (several errors are bracketed, as
    /// `utilerrors.Aggregate` prints them).
    pub fn invalid(kind: &str, group: &str, name: &str, errors: &[FieldError]) -> ApiError {
        let qualified = if group.is_empty() {
            kind.to_string()
        } else {
            format!("{kind}.{group}")
        };
        let all = match errors {
            [one] => one.full(),
            many => format!(
                "[{}]",
                many.iter()
                    .map(FieldError::full)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        };
        let causes: Vec<Value> = errors
            .iter()
            .map(|e| json!({ "reason": e.reason, "message": e.message, "field": e.field }))
            .collect();
        let mut details = json!({ "name": name, "kind": kind, "causes": causes });
        if !group.is_empty() {
            details["group"] = json!(group);
        }
        ApiError::new(
            422,
            "Invalid",
            format!("{qualified} {name:?} is invalid: {all}"),
        )
        .with_details(details)
    }

    /// `410 Gone` with reason `Expired`: a watch or list from a compacted resourceVersion.
    pub fn expired(message: impl Into<String>) -> ApiError {
        ApiError::new(410, "Expired", message)
    }

    pub fn method_not_allowed() -> ApiError {
        ApiError::new(
            405,
            "MethodNotAllowed",
            "the server does not allow this method on the requested resource",
        )
        .with_details(json!({}))
    }

    pub fn unsupported_media_type(accepted: &[&str]) -> ApiError {
        ApiError::new(
            415,
            "UnsupportedMediaType",
            format!(
                "the body of the request was in an unknown format - accepted media types include: {}",
                accepted.join(", ")
            ),
        )
    }

    pub fn not_acceptable(accepted: &[&str]) -> ApiError {
        ApiError::new(
            406,
            "NotAcceptable",
            format!(
                "only the following media types are accepted: {}",
                accepted.join(", ")
            ),
        )
    }

    pub fn internal(message: impl Into<String>) -> ApiError {
        let message = message.into();
        ApiError::new(
            500,
            "InternalError",
            format!("Internal error occurred: {message}"),
        )
        .with_details(json!({ "causes": [{ "message": message }] }))
    }

    /// The RBAC denial: `pods is forbidden: User "u" cannot list resource "pods" in API group
    /// "" at the cluster scope`.
    pub fn forbidden(
        user: &str,
        verb: &str,
        gr: &GroupResource,
        subresource: &str,
        namespace: &str,
        name: &str,
    ) -> ApiError {
        let resource = if subresource.is_empty() {
            gr.resource.clone()
        } else {
            format!("{}/{subresource}", gr.resource)
        };
        let subject = if name.is_empty() {
            gr.to_string()
        } else {
            format!("{gr} {name:?}")
        };
        let scope = if namespace.is_empty() {
            "at the cluster scope".to_string()
        } else {
            format!("in the namespace {namespace:?}")
        };
        let message = format!(
            "{subject} is forbidden: User {user:?} cannot {verb} resource {resource:?} in API group {:?} {scope}",
            gr.group
        );
        ApiError::new(403, "Forbidden", message).with_details(Self::named(gr, name))
    }

    /// A list or watch from a resourceVersion the server has not reached yet.
    pub fn too_large_resource_version(asked: u64, current: u64) -> ApiError {
        ApiError::new(
            504,
            "Timeout",
            format!("Timeout: Too large resource version: {asked}, current: {current}"),
        )
        .with_details(json!({
            "causes": [{ "reason": "ResourceVersionTooLarge", "message": "Too large resource version" }],
            "retryAfterSeconds": 1,
        }))
    }
}

/// The `Status` a successful delete of a built-in object answers with.
pub fn deleted_status(gr: &GroupResource, name: &str, uid: &str) -> Value {
    let mut details = json!({ "name": name, "kind": gr.resource, "uid": uid });
    if !gr.group.is_empty() {
        details["group"] = json!(gr.group);
    }
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Success",
        "details": details,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_worded_as_the_real_server_words_them() {
        let pods = GroupResource::new("", "pods");
        assert_eq!(
            ApiError::not_found(&pods, "x").message,
            "pods \"x\" not found"
        );
        let np = GroupResource::new("networking.k8s.io", "networkpolicies");
        assert_eq!(
            ApiError::already_exists(&np, "deny").message,
            "networkpolicies.networking.k8s.io \"deny\" already exists"
        );
        assert_eq!(
            ApiError::forbidden(
                "system:serviceaccount:palisade:palisade",
                "list",
                &pods,
                "",
                "",
                ""
            )
            .message,
            "pods is forbidden: User \"system:serviceaccount:palisade:palisade\" cannot list resource \"pods\" in API group \"\" at the cluster scope"
        );
        assert_eq!(
            ApiError::forbidden("u", "patch", &pods, "status", "default", "web").message,
            "pods \"web\" is forbidden: User \"u\" cannot patch resource \"pods/status\" in API group \"\" in the namespace \"default\""
        );
        let inv = ApiError::invalid(
            "Pod",
            "",
            "",
            &[FieldError::required(
                "metadata.name",
                "name or generateName is required",
            )],
        );
        assert_eq!(
            inv.message,
            "Pod \"\" is invalid: metadata.name: Required value: name or generateName is required"
        );
        assert_eq!(
            inv.to_status()["details"]["causes"][0]["field"],
            "metadata.name"
        );
    }
}
