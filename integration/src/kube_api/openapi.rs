//! `/openapi/v3`: the root index of group-version documents, and each document's paths with
//! their operations and parameters, as kube-apiserver publishes them. No schemas
//! (`components.schemas` is empty): the documents say which operations and query parameters
//! exist, which is what kubectl reads before it writes (it checks that PATCH takes
//! `fieldValidation` and then leaves validation to the server). `kubectl explain` and
//! client-side validation against schemas do not work.

use std::hash::{DefaultHasher, Hash as _, Hasher as _};

use serde_json::{Map, Value, json};

use super::discovery;
use super::resources::{Registry, ResourceDef};

fn gv_path(group: &str, version: &str) -> String {
    if group.is_empty() {
        format!("api/{version}")
    } else {
        format!("apis/{group}/{version}")
    }
}

fn query(name: &str, description: &str) -> Value {
    json!({"name": name, "in": "query", "description": description, "schema": {"type": "string", "uniqueItems": true}})
}

fn path_param(name: &str) -> Value {
    json!({"name": name, "in": "path", "required": true, "description": format!("{name} of the resource"), "schema": {"type": "string", "uniqueItems": true}})
}

fn write_params() -> Vec<Value> {
    vec![
        query(
            "dryRun",
            "When present, indicates that modifications should not be persisted.",
        ),
        query(
            "fieldManager",
            "fieldManager is a name associated with the actor or entity that is making these changes.",
        ),
        query(
            "fieldValidation",
            "fieldValidation instructs the server on how to handle objects in the request containing unknown or duplicate fields. Valid values are: Ignore, Warn (the default), Strict.",
        ),
    ]
}

fn list_params() -> Vec<Value> {
    [
        "allowWatchBookmarks",
        "continue",
        "fieldSelector",
        "labelSelector",
        "limit",
        "resourceVersion",
        "resourceVersionMatch",
        "sendInitialEvents",
        "timeoutSeconds",
        "watch",
    ]
    .iter()
    .map(|p| query(p, ""))
    .collect()
}

fn op(def: &ResourceDef, action: &str, verb: &str, params: &[Value]) -> Value {
    let kind = def.kind.as_str();
    json!({
        "operationId": format!("{verb}{kind}"),
        "parameters": params,
        "responses": {"200": {"description": "OK"}, "401": {"description": "Unauthorized"}},
        "x-kubernetes-action": action,
        "x-kubernetes-group-version-kind": {"group": def.group, "version": def.version, "kind": kind},
    })
}

fn paths_of(def: &ResourceDef) -> Vec<(String, Value)> {
    let prefix = format!("/{}", gv_path(&def.group, &def.version));
    let (collection, scope_params) = if def.namespaced {
        (
            format!("{prefix}/namespaces/{{namespace}}/{}", def.plural),
            vec![path_param("namespace")],
        )
    } else {
        (format!("{prefix}/{}", def.plural), Vec::new())
    };
    let mut with_name = scope_params.clone();
    with_name.insert(0, path_param("name"));
    let mut patch_params = write_params();
    patch_params.push(query(
        "force",
        "Force is going to \"force\" Apply requests.",
    ));
    let mut out = vec![
        (
            collection.clone(),
            json!({
                "parameters": scope_params,
                "get": op(def, "list", "list", &list_params()),
                "post": op(def, "post", "create", &write_params()),
                "delete": op(def, "deletecollection", "deletecollection", &list_params()),
            }),
        ),
        (
            format!("{collection}/{{name}}"),
            json!({
                "parameters": with_name.clone(),
                "get": op(def, "get", "read", &[]),
                "put": op(def, "put", "replace", &write_params()),
                "patch": op(def, "patch", "patch", &patch_params),
                "delete": op(def, "delete", "delete", &[query("dryRun", ""), query("gracePeriodSeconds", "")]),
            }),
        ),
    ];
    if def.status {
        out.push((
            format!("{collection}/{{name}}/status"),
            json!({
                "parameters": with_name,
                "get": op(def, "get", "read", &[]),
                "put": op(def, "put", "replace", &write_params()),
                "patch": op(def, "patch", "patch", &patch_params),
            }),
        ));
    }
    out
}

/// The document of one group version, if served.
pub fn document(reg: &Registry, group: &str, version: &str) -> Option<Value> {
    if !reg.serves_version(group, version) {
        return None;
    }
    let mut paths = Map::new();
    for def in reg.resources(group, version) {
        for (p, v) in paths_of(def) {
            paths.insert(p, v);
        }
    }
    Some(json!({
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes", "version": format!("v{}.{}.0", discovery::MAJOR, discovery::MINOR)},
        "paths": paths,
        "components": {"schemas": {}},
    }))
}

/// `/openapi/v3`: every group version with the URL of its document; the `hash` changes when
/// the document does, as clients cache by it.
pub fn root(reg: &Registry) -> Value {
    let mut paths = Map::new();
    for g in reg.groups() {
        for v in &g.versions {
            let doc = document(reg, &g.name, v).unwrap_or(Value::Null);
            let mut h = DefaultHasher::new();
            doc.to_string().hash(&mut h);
            let p = gv_path(&g.name, v);
            paths.insert(
                p.clone(),
                json!({"serverRelativeURL": format!("/openapi/v3/{p}?hash={:016X}", h.finish())}),
            );
        }
    }
    json!({"paths": paths})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patch_operations_take_field_validation() {
        let reg = Registry::build(std::iter::empty());
        let root = root(&reg);
        assert!(
            root["paths"]["apis/networking.k8s.io/v1"]["serverRelativeURL"]
                .as_str()
                .unwrap()
                .starts_with("/openapi/v3/apis/networking.k8s.io/v1?hash=")
        );
        let doc = document(&reg, "networking.k8s.io", "v1").unwrap();
        let item = &doc["paths"]["/apis/networking.k8s.io/v1/namespaces/{namespace}/networkpolicies/{name}"];
        assert_eq!(
            item["patch"]["x-kubernetes-group-version-kind"]["kind"],
            "NetworkPolicy"
        );
        assert!(
            item["patch"]["parameters"]
                .as_array()
                .unwrap()
                .iter()
                .any(|p| p["name"] == "fieldValidation")
        );
        assert!(document(&reg, "example.com", "v1").is_none());
    }
}
