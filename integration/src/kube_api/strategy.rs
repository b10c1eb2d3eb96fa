//! What the real server's REST strategies and decoding do to an object on the way in:
//! decoding into the resource's type (unknown fields pruned, and refused with
//! `fieldValidation=Strict`), defaulting, system metadata, status reset on create, status
//! kept apart from the main resource, generation, validation.

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value, json};

use super::resources::{Builtin, ResourceDef};
use super::schema;
use super::status::{ApiError, FieldError};
use super::util;
use super::validation;

/// The `fieldValidation` query parameter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FieldValidation {
    Ignore,
    Warn,
    Strict,
}

impl FieldValidation {
    pub fn parse(s: Option<&str>) -> Result<FieldValidation, ApiError> {
        match s {
            None | Some("" | "Warn") => Ok(FieldValidation::Warn),
            Some("Ignore") => Ok(FieldValidation::Ignore),
            Some("Strict") => Ok(FieldValidation::Strict),
            Some(other) => Err(ApiError::bad_request(format!(
                "fieldValidation parameter unsupported: {other:?}. Must be one of \"Ignore\", \"Warn\", or \"Strict\""
            ))),
        }
    }
}

fn roundtrip<T: DeserializeOwned + Serialize>(
    v: &Value,
) -> Result<Value, serde_path_to_error::Error<serde_json::Error>> {
    let t: T = serde_path_to_error::deserialize(v)?;
    Ok(serde_json::to_value(t).expect("a typed object serializes"))
}

fn roundtrip_builtin(
    b: Builtin,
    v: &Value,
) -> Result<Value, serde_path_to_error::Error<serde_json::Error>> {
    use k8s_openapi::api::{apps, coordination, core, events, networking, rbac};
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1 as apiext;
    match b {
        Builtin::Namespace => roundtrip::<core::v1::Namespace>(v),
        Builtin::Pod => roundtrip::<core::v1::Pod>(v),
        Builtin::Node => roundtrip::<core::v1::Node>(v),
        Builtin::Event => roundtrip::<core::v1::Event>(v),
        Builtin::Service => roundtrip::<core::v1::Service>(v),
        Builtin::ConfigMap => roundtrip::<core::v1::ConfigMap>(v),
        Builtin::ServiceAccount => roundtrip::<core::v1::ServiceAccount>(v),
        Builtin::NetworkPolicy => roundtrip::<networking::v1::NetworkPolicy>(v),
        Builtin::Lease => roundtrip::<coordination::v1::Lease>(v),
        Builtin::EventsV1 => roundtrip::<events::v1::Event>(v),
        Builtin::Crd => roundtrip::<apiext::CustomResourceDefinition>(v),
        Builtin::ClusterRole => roundtrip::<rbac::v1::ClusterRole>(v),
        Builtin::ClusterRoleBinding => roundtrip::<rbac::v1::ClusterRoleBinding>(v),
        Builtin::Role => roundtrip::<rbac::v1::Role>(v),
        Builtin::RoleBinding => roundtrip::<rbac::v1::RoleBinding>(v),
        Builtin::DaemonSet => roundtrip::<apps::v1::DaemonSet>(v),
    }
}

/// Fields of `input` that decoding dropped (`null`s do not count).
fn dropped_fields(input: &Value, output: &Value, path: &str, out: &mut Vec<String>) {
    match (input, output) {
        (Value::Object(i), Value::Object(o)) => {
            for (k, v) in i {
                if v.is_null() {
                    continue;
                }
                let child = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                match o.get(k) {
                    Some(ov) => dropped_fields(v, ov, &child, out),
                    None => out.push(child),
                }
            }
        }
        (Value::Array(i), Value::Array(o)) => {
            for (n, (iv, ov)) in i.iter().zip(o).enumerate() {
                dropped_fields(iv, ov, &format!("{path}[{n}]"), out);
            }
        }
        _ => {}
    }
}

fn decode_error(def: &ResourceDef, e: &serde_path_to_error::Error<serde_json::Error>) -> ApiError {
    let path = e.path().to_string();
    let inner = e.inner().to_string();
    if let Some(field) = inner
        .strip_prefix("missing field `")
        .and_then(|r| r.split('`').next())
    {
        let full = if path == "." || path.is_empty() {
            field.to_string()
        } else {
            format!("{path}.{field}")
        };
        return ApiError::invalid(
            &def.kind,
            &def.group,
            "",
            &[FieldError::required(&full, "")],
        );
    }
    ApiError::bad_request(format!(
        "{kind} in version {v:?} cannot be handled as a {kind}: {path}: {inner}",
        kind = def.kind,
        v = def.version
    ))
}

/// Decodes a request body's object for `def`: kind and apiVersion defaulted or checked,
/// unknown fields pruned (warned about, or refused under `Strict`). Returns the object in
/// the view's form and the warnings.
pub fn decode(
    def: &ResourceDef,
    mut obj: Value,
    fv: FieldValidation,
) -> Result<(Value, Vec<String>), ApiError> {
    let Some(map) = obj.as_object_mut() else {
        return Err(ApiError::bad_request(format!(
            "the object provided is unrecognized (must be of type {}): json: cannot unmarshal {} into Go value of type struct",
            def.kind,
            match &obj {
                Value::Array(_) => "array",
                Value::String(_) => "string",
                Value::Number(_) => "number",
                Value::Bool(_) => "bool",
                _ => "null",
            }
        )));
    };
    let av = def.api_version();
    match map.get("apiVersion").and_then(Value::as_str) {
        None | Some("") => {
            map.insert("apiVersion".into(), json!(av));
        }
        Some(got) if got != av => {
            return Err(ApiError::bad_request(format!(
                "the API version in the data ({got}) does not match the expected API version ({av})"
            )));
        }
        Some(_) => {}
    }
    match map.get("kind").and_then(Value::as_str) {
        None | Some("") => {
            map.insert("kind".into(), json!(def.kind));
        }
        Some(got) if got != def.kind => {
            return Err(ApiError::bad_request(format!(
                "the kind in the data ({got}) does not match the expected kind ({})",
                def.kind
            )));
        }
        Some(_) => {}
    }
    let mut unknown = Vec::new();
    let out = if let Some(b) = def.builtin() {
        let typed = roundtrip_builtin(b, &obj).map_err(|e| decode_error(def, &e))?;
        dropped_fields(&obj, &typed, "", &mut unknown);
        typed
    } else {
        let mut o = obj.clone();
        if let Some(meta) = o.get("metadata") {
            let typed =
                roundtrip::<k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta>(meta)
                    .map_err(|e| decode_error(def, &e))?;
            dropped_fields(meta, &typed, "metadata", &mut unknown);
            o["metadata"] = typed;
        }
        if let Some(s) = def.custom().and_then(|c| c.schema.as_ref()) {
            let checked = schema::check(s, &mut o);
            unknown.extend(checked.unknown);
            if !checked.errors.is_empty() {
                return Err(ApiError::invalid(
                    &def.kind,
                    &def.group,
                    util::meta_str(&o, "name"),
                    &checked.errors,
                ));
            }
        }
        o
    };
    let warnings: Vec<String> = unknown
        .iter()
        .map(|f| format!("unknown field {f:?}"))
        .collect();
    match fv {
        FieldValidation::Strict if !warnings.is_empty() => Err(ApiError::bad_request(format!(
            "strict decoding error: {}",
            warnings.join(", ")
        ))),
        FieldValidation::Ignore => Ok((out, Vec::new())),
        _ => Ok((out, warnings)),
    }
}

/// Validation beyond decoding: metadata, and what the served types require.
pub fn validate(def: &ResourceDef, obj: &Value, creating: bool) -> Result<(), ApiError> {
    let mut errs = validation::object_meta(obj, def.name_rule(), creating);
    match def.builtin() {
        Some(Builtin::Crd) => errs.extend(validate_crd(obj)),
        Some(Builtin::Pod) => errs.extend(validate_pod(obj)),
        _ => {}
    }
    if errs.is_empty() {
        Ok(())
    } else {
        Err(ApiError::invalid(
            &def.kind,
            &def.group,
            util::meta_str(obj, "name"),
            &errs,
        ))
    }
}

fn validate_pod(pod: &Value) -> Vec<FieldError> {
    let mut errs = Vec::new();
    let containers = pod["spec"]["containers"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    if containers.is_empty() {
        errs.push(FieldError::required("spec.containers", ""));
    }
    for (i, c) in containers.iter().enumerate() {
        for f in ["name", "image"] {
            if c[f].as_str().is_none_or(str::is_empty) {
                errs.push(FieldError::required(
                    &format!("spec.containers[{i}].{f}"),
                    "",
                ));
            }
        }
    }
    errs
}

fn validate_crd(crd: &Value) -> Vec<FieldError> {
    let mut errs = Vec::new();
    let spec = &crd["spec"];
    let s = |v: &Value| v.as_str().unwrap_or("").to_string();
    let group = s(&spec["group"]);
    let plural = s(&spec["names"]["plural"]);
    if group.is_empty() {
        errs.push(FieldError::required("spec.group", ""));
    } else if group.split('.').count() < 2 {
        errs.push(FieldError::invalid(
            "spec.group",
            &spec["group"],
            "should be a domain with at least one dot",
        ));
    }
    if plural.is_empty() {
        errs.push(FieldError::required("spec.names.plural", ""));
    }
    if s(&spec["names"]["kind"]).is_empty() {
        errs.push(FieldError::required("spec.names.kind", ""));
    }
    let scope = s(&spec["scope"]);
    if scope != "Namespaced" && scope != "Cluster" {
        errs.push(FieldError::not_supported(
            "spec.scope",
            &spec["scope"],
            &["Cluster".to_string(), "Namespaced".to_string()],
        ));
    }
    let name = util::meta_str(crd, "name");
    if !group.is_empty() && !plural.is_empty() && name != format!("{plural}.{group}") {
        errs.push(FieldError::invalid(
            "metadata.name",
            &json!(name),
            "must be spec.names.plural+\".\"+spec.group",
        ));
    }
    let versions = spec["versions"].as_array().cloned().unwrap_or_default();
    if versions.is_empty() {
        errs.push(FieldError::invalid(
            "spec.versions",
            &json!(null),
            "must have exactly one version marked as storage version",
        ));
    } else if versions
        .iter()
        .filter(|v| v["storage"].as_bool() == Some(true))
        .count()
        != 1
    {
        errs.push(FieldError::invalid(
            "spec.versions",
            &spec["versions"],
            "must have exactly one version marked as storage version",
        ));
    }
    errs
}

fn pod_defaults(pod: &mut Value) {
    let Some(spec) = pod.get_mut("spec").and_then(Value::as_object_mut) else {
        return;
    };
    for (k, v) in [
        ("restartPolicy", json!("Always")),
        ("dnsPolicy", json!("ClusterFirst")),
        ("schedulerName", json!("default-scheduler")),
        ("terminationGracePeriodSeconds", json!(30)),
        ("securityContext", json!({})),
        ("enableServiceLinks", json!(true)),
        ("preemptionPolicy", json!("PreemptLowerPriority")),
        ("priority", json!(0)),
        ("serviceAccountName", json!("default")),
    ] {
        spec.entry(k).or_insert(v);
    }
    let sa = spec["serviceAccountName"].clone();
    spec.entry("serviceAccount").or_insert(sa);
    for list in ["initContainers", "containers"] {
        if let Some(cs) = spec.get_mut(list).and_then(Value::as_array_mut) {
            for c in cs.iter_mut().filter_map(Value::as_object_mut) {
                let image = c
                    .get("image")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string();
                let last = image.rsplit('/').next().unwrap_or("");
                let policy = if !last.contains(':') || last.ends_with(":latest") {
                    "Always"
                } else {
                    "IfNotPresent"
                };
                c.entry("imagePullPolicy").or_insert(json!(policy));
                c.entry("terminationMessagePath")
                    .or_insert(json!("/dev/termination-log"));
                c.entry("terminationMessagePolicy").or_insert(json!("File"));
                c.entry("resources").or_insert(json!({}));
                protocol_defaults(c.get_mut("ports"));
            }
        }
    }
}

fn qos_class(pod: &Value) -> &'static str {
    let has_resources = pod["spec"]["containers"].as_array().is_some_and(|cs| {
        cs.iter().any(|c| {
            ["requests", "limits"]
                .iter()
                .any(|k| c["resources"][k].as_object().is_some_and(|m| !m.is_empty()))
        })
    });
    if has_resources {
        "Burstable"
    } else {
        "BestEffort"
    }
}

fn protocol_defaults(ports: Option<&mut Value>) {
    if let Some(ps) = ports.and_then(Value::as_array_mut) {
        for p in ps.iter_mut().filter_map(Value::as_object_mut) {
            p.entry("protocol").or_insert(json!("TCP"));
        }
    }
}

fn network_policy_defaults(np: &mut Value) {
    let Some(spec) = np.get_mut("spec").and_then(Value::as_object_mut) else {
        return;
    };
    for dir in ["ingress", "egress"] {
        if let Some(rules) = spec.get_mut(dir).and_then(Value::as_array_mut) {
            for r in rules {
                protocol_defaults(r.get_mut("ports"));
            }
        }
    }
    let no_types = spec
        .get("policyTypes")
        .and_then(Value::as_array)
        .is_none_or(Vec::is_empty);
    if no_types {
        let mut types = vec![json!("Ingress")];
        if spec
            .get("egress")
            .and_then(Value::as_array)
            .is_some_and(|e| !e.is_empty())
        {
            types.push(json!("Egress"));
        }
        spec.insert("policyTypes".into(), Value::Array(types));
    }
}

fn service_defaults(svc: &mut Value, allocate: &mut dyn FnMut() -> String) {
    let Some(spec) = svc.get_mut("spec").and_then(Value::as_object_mut) else {
        return;
    };
    spec.entry("type").or_insert(json!("ClusterIP"));
    spec.entry("sessionAffinity").or_insert(json!("None"));
    spec.entry("internalTrafficPolicy")
        .or_insert(json!("Cluster"));
    if let Some(ports) = spec.get_mut("ports").and_then(Value::as_array_mut) {
        for p in ports.iter_mut().filter_map(Value::as_object_mut) {
            p.entry("protocol").or_insert(json!("TCP"));
            if let Some(port) = p.get("port").cloned() {
                p.entry("targetPort").or_insert(port);
            }
        }
    }
    let ip = match spec.get("clusterIP").and_then(Value::as_str) {
        Some(ip) if !ip.is_empty() => ip.to_string(),
        _ => allocate(),
    };
    spec.insert("clusterIP".into(), json!(ip));
    spec.entry("clusterIPs").or_insert(json!([ip]));
    if ip != "None" {
        spec.entry("ipFamilies").or_insert(json!(["IPv4"]));
    }
    spec.entry("ipFamilyPolicy").or_insert(json!("SingleStack"));
}

/// Defaulting, which the real server does on every decode (create and update alike).
pub fn defaults(def: &ResourceDef, obj: &mut Value, allocate_ip: &mut dyn FnMut() -> String) {
    match def.builtin() {
        Some(Builtin::Pod) => pod_defaults(obj),
        Some(Builtin::NetworkPolicy) => network_policy_defaults(obj),
        Some(Builtin::Service) => service_defaults(obj, allocate_ip),
        Some(Builtin::Namespace) => {
            let name = util::meta_str(obj, "name").to_string();
            let meta = util::meta_mut(obj);
            let labels = meta.entry("labels").or_insert_with(|| json!({}));
            if let Some(l) = labels.as_object_mut() {
                l.insert("kubernetes.io/metadata.name".into(), json!(name));
            }
            let spec = obj
                .as_object_mut()
                .expect("objects are maps")
                .entry("spec")
                .or_insert_with(|| json!({}));
            if let Some(s) = spec.as_object_mut() {
                s.entry("finalizers").or_insert(json!(["kubernetes"]));
            }
        }
        Some(Builtin::DaemonSet) => {
            if let Some(spec) = obj.get_mut("spec").and_then(Value::as_object_mut) {
                spec.entry("revisionHistoryLimit").or_insert(json!(10));
                spec.entry("updateStrategy").or_insert(json!({
                    "type": "RollingUpdate",
                    "rollingUpdate": {"maxUnavailable": 1, "maxSurge": 0}
                }));
            }
        }
        Some(Builtin::Crd) => {
            if let Some(spec) = obj.get_mut("spec").and_then(Value::as_object_mut) {
                spec.entry("conversion")
                    .or_insert(json!({"strategy": "None"}));
                if let Some(n) = spec.get_mut("names").and_then(Value::as_object_mut) {
                    let kind = n
                        .get("kind")
                        .and_then(Value::as_str)
                        .unwrap_or("")
                        .to_string();
                    n.entry("singular").or_insert(json!(kind.to_lowercase()));
                    n.entry("listKind").or_insert(json!(format!("{kind}List")));
                }
            }
        }
        _ => {}
    }
}

/// The status an object is created with when the resource has a status subresource (what
/// the client sent is dropped, except for Nodes, whose kubelet registers them whole).
fn initial_status(def: &ResourceDef, obj: &Value) -> Option<Value> {
    match def.builtin() {
        Some(Builtin::Pod) => Some(json!({"phase": "Pending", "qosClass": qos_class(obj)})),
        Some(Builtin::Namespace) => Some(json!({"phase": "Active"})),
        Some(Builtin::Service) => Some(json!({"loadBalancer": {}})),
        Some(Builtin::DaemonSet) => Some(json!({
            "currentNumberScheduled": 0, "numberMisscheduled": 0,
            "desiredNumberScheduled": 0, "numberReady": 0
        })),
        Some(Builtin::Crd) => {
            let storage: Vec<Value> = obj["spec"]["versions"]
                .as_array()
                .map(|vs| {
                    vs.iter()
                        .filter(|v| v["storage"].as_bool() == Some(true))
                        .map(|v| v["name"].clone())
                        .collect()
                })
                .unwrap_or_default();
            Some(json!({"acceptedNames": {"plural": "", "kind": ""}, "storedVersions": storage}))
        }
        _ => None,
    }
}

/// System metadata and status of a new object; `namespace` is the request's.
pub fn prepare_create(def: &ResourceDef, obj: &mut Value, namespace: &str) {
    let meta = util::meta_mut(obj);
    for k in [
        "uid",
        "resourceVersion",
        "selfLink",
        "deletionTimestamp",
        "deletionGracePeriodSeconds",
        "managedFields",
        "generation",
        "creationTimestamp",
    ] {
        meta.remove(k);
    }
    meta.insert("uid".into(), json!(util::new_uid()));
    meta.insert("creationTimestamp".into(), json!(util::now_rfc3339()));
    if def.namespaced {
        meta.insert("namespace".into(), json!(namespace));
    } else {
        meta.remove("namespace");
    }
    if def.tracks_generation() {
        meta.insert("generation".into(), json!(1));
    }
    if def.status && def.builtin() != Some(Builtin::Node) {
        let map = obj.as_object_mut().expect("objects are maps");
        match initial_status(def, &Value::Object(map.clone())) {
            Some(s) => {
                map.insert("status".into(), s);
            }
            None => {
                map.remove("status");
            }
        }
    }
}

/// Which part of an object a write targets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    Main,
    Status,
}

fn without(obj: &Value, keys: &[&str]) -> Map<String, Value> {
    let mut m = obj.as_object().cloned().unwrap_or_default();
    for k in keys {
        m.remove(*k);
    }
    m
}

/// Carries over what an update may not change: system metadata; the status on a main write
/// (when there is a status subresource) and everything but the status on a status write;
/// bumps the generation when the spec changed.
pub fn prepare_update(def: &ResourceDef, old: &Value, new: &mut Value, target: Target) {
    if target == Target::Status {
        let status = new.get("status").cloned();
        let mut merged = old.clone();
        let map = merged.as_object_mut().expect("objects are maps");
        match status {
            Some(s) => {
                map.insert("status".into(), s);
            }
            None => {
                map.remove("status");
            }
        }
        *new = merged;
        return;
    }
    if def.status {
        let map = new.as_object_mut().expect("objects are maps");
        match old.get("status") {
            Some(s) => {
                map.insert("status".into(), s.clone());
            }
            None => {
                map.remove("status");
            }
        }
    }
    let keep: Vec<(&str, Option<Value>)> = [
        "uid",
        "creationTimestamp",
        "deletionTimestamp",
        "deletionGracePeriodSeconds",
        "namespace",
        "name",
        "generation",
        "selfLink",
    ]
    .iter()
    .map(|k| (*k, old.get("metadata").and_then(|m| m.get(*k)).cloned()))
    .collect();
    let meta = util::meta_mut(new);
    meta.remove("managedFields");
    for (k, v) in keep {
        match v {
            Some(v) => {
                meta.insert(k.into(), v);
            }
            None => {
                meta.remove(k);
            }
        }
    }
    if def.tracks_generation() {
        let skip: &[&str] = if def.status {
            &["metadata", "status"]
        } else {
            &["metadata"]
        };
        if without(old, skip) != without(new, skip) {
            let g = old["metadata"]["generation"].as_i64().unwrap_or(0) + 1;
            util::meta_mut(new).insert("generation".into(), json!(g));
        }
    }
    if def.builtin() == Some(Builtin::Service)
        && let (Some(ip), Some(spec)) = (
            old["spec"].get("clusterIP").cloned(),
            new.get_mut("spec").and_then(Value::as_object_mut),
        )
    {
        spec.insert("clusterIP".into(), ip.clone());
        spec.insert("clusterIPs".into(), json!([ip]));
    }
}

/// The real server's rule for Pod updates: the spec is immutable but for container images,
/// `activeDeadlineSeconds`, additions to `tolerations` and scheduling gates.
pub fn check_pod_update(def: &ResourceDef, old: &Value, new: &Value) -> Result<(), ApiError> {
    if def.builtin() != Some(Builtin::Pod) {
        return Ok(());
    }
    let normalize = |spec: &Value| {
        let mut s = spec.clone();
        if let Some(m) = s.as_object_mut() {
            for k in ["activeDeadlineSeconds", "tolerations", "schedulingGates"] {
                m.remove(k);
            }
            for list in ["containers", "initContainers"] {
                if let Some(cs) = m.get_mut(list).and_then(Value::as_array_mut) {
                    for c in cs.iter_mut().filter_map(Value::as_object_mut) {
                        c.remove("image");
                    }
                }
            }
        }
        s
    };
    if normalize(&old["spec"]) == normalize(&new["spec"]) {
        return Ok(());
    }
    Err(ApiError::invalid(
        "Pod",
        "",
        util::meta_str(old, "name"),
        &[FieldError::forbidden(
            "spec",
            "pod updates may not change fields other than `spec.containers[*].image`,`spec.initContainers[*].image`,`spec.activeDeadlineSeconds`,`spec.tolerations` (only additions to existing tolerations),`spec.terminationGracePeriodSeconds` (allow it to be set to 1 if it was previously negative)",
        )],
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kube_api::resources::Registry;

    fn def(group: &str, plural: &str) -> ResourceDef {
        Registry::build(std::iter::empty())
            .find(group, "v1", plural)
            .unwrap()
            .clone()
    }

    #[test]
    fn decoding_prunes_unknown_fields_and_strict_refuses_them() {
        let np = def("networking.k8s.io", "networkpolicies");
        let obj = json!({"metadata": {"name": "x", "bogus": 1}, "spec": {"podSelector": {}, "extra": true}});
        let (out, warnings) = decode(&np, obj.clone(), FieldValidation::Warn).unwrap();
        assert_eq!(out["kind"], "NetworkPolicy");
        assert!(out["spec"].get("extra").is_none());
        assert_eq!(
            warnings,
            [
                "unknown field \"metadata.bogus\"",
                "unknown field \"spec.extra\""
            ]
        );
        let err = decode(&np, obj, FieldValidation::Strict).unwrap_err();
        assert_eq!(err.code, 400);
        assert!(
            err.message
                .starts_with("strict decoding error: unknown field"),
            "{}",
            err.message
        );
    }

    #[test]
    fn decoding_reports_type_errors_and_missing_fields() {
        let pod = def("", "pods");
        let err = decode(
            &pod,
            json!({"metadata": {"name": "p"}, "spec": {"containers": "x"}}),
            FieldValidation::Warn,
        )
        .unwrap_err();
        assert_eq!(err.code, 400, "{}", err.message);
        assert!(
            err.message
                .starts_with("Pod in version \"v1\" cannot be handled as a Pod: spec.containers"),
            "{}",
            err.message
        );
        let (empty, _) = decode(
            &pod,
            json!({"metadata": {"name": "p"}, "spec": {}}),
            FieldValidation::Warn,
        )
        .unwrap();
        let err = validate(&pod, &empty, true).unwrap_err();
        assert_eq!(err.code, 422, "{}", err.message);
        assert_eq!(
            err.message,
            "Pod \"p\" is invalid: spec.containers: Required value"
        );
        let err = decode(
            &pod,
            json!({"apiVersion": "apps/v1", "kind": "Pod"}),
            FieldValidation::Warn,
        )
        .unwrap_err();
        assert_eq!(
            err.message,
            "the API version in the data (apps/v1) does not match the expected API version (v1)"
        );
    }

    #[test]
    fn network_policies_get_their_defaults() {
        let np = def("networking.k8s.io", "networkpolicies");
        let mut obj = json!({"spec": {"podSelector": {}, "egress": [{"ports": [{"port": 53}]}]}});
        defaults(&np, &mut obj, &mut String::new);
        assert_eq!(obj["spec"]["policyTypes"], json!(["Ingress", "Egress"]));
        assert_eq!(obj["spec"]["egress"][0]["ports"][0]["protocol"], "TCP");
    }

    #[test]
    fn updates_keep_status_apart_and_bump_generation_on_spec_changes() {
        let np = def("", "pods");
        let old = json!({"metadata": {"name": "p", "uid": "u", "generation": 1}, "spec": {"a": 1}, "status": {"phase": "Running"}});
        let mut new = json!({"metadata": {"name": "p", "labels": {"x": "y"}}, "spec": {"a": 1}, "status": {"phase": "Failed"}});
        prepare_update(&np, &old, &mut new, Target::Main);
        assert_eq!(new["status"]["phase"], "Running");
        assert_eq!(new["metadata"]["generation"], 1);
        assert_eq!(new["metadata"]["uid"], "u");
        let mut new = json!({"metadata": {"name": "p"}, "spec": {"a": 2}});
        prepare_update(&np, &old, &mut new, Target::Main);
        assert_eq!(new["metadata"]["generation"], 2);
        let mut new = json!({"metadata": {"name": "p", "labels": {"x": "y"}}, "spec": {"a": 9}, "status": {"phase": "Failed"}});
        prepare_update(&np, &old, &mut new, Target::Status);
        assert_eq!(new["status"]["phase"], "Failed");
        assert_eq!(new["spec"]["a"], 1);
        assert!(new["metadata"].get("labels").is_none());
    }
}
