//! `meta.k8s.io/v1` Table responses, which `kubectl get` asks for: the column sets of
//! kube-apiserver's printers for the built-ins served here, and for custom resources the
//! CRD version's `additionalPrinterColumns` (default: Age), evaluated as apiextensions does.

use serde_json::{Value, json};

use super::jsonpath;
use super::resources::{Builtin, ResourceDef};
use super::util;

/// The `includeObject` query parameter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Include {
    None,
    Metadata,
    Object,
}

impl Include {
    pub fn parse(s: Option<&str>) -> Result<Include, String> {
        match s {
            None | Some("" | "Metadata") => Ok(Include::Metadata),
            Some("None") => Ok(Include::None),
            Some("Object") => Ok(Include::Object),
            Some(other) => Err(format!(
                "includeObject: Unsupported value: {other:?}: supported values: \"Metadata\", \"None\", \"Object\""
            )),
        }
    }
}

struct Col {
    name: &'static str,
    type_: &'static str,
    format: &'static str,
    priority: i64,
    description: &'static str,
}

const fn col(
    name: &'static str,
    type_: &'static str,
    priority: i64,
    description: &'static str,
) -> Col {
    Col {
        name,
        type_,
        format: "",
        priority,
        description,
    }
}

const NAME: Col = Col {
    name: "Name",
    type_: "string",
    format: "name",
    priority: 0,
    description: "Name must be unique within a namespace. Is required when creating resources, although some resources may allow a client to request the generation of an appropriate name automatically. Name is primarily intended for creation idempotence and configuration definition. Cannot be updated. More info: https://kubernetes.io/docs/concepts/overview/working-with-objects/names#names",
};
const AGE: Col = col(
    "Age",
    "string",
    0,
    "CreationTimestamp is a timestamp representing the server time when this object was created. It is not guaranteed to be set in happens-before order across separate operations. Clients may not set this value. It is represented in RFC3339 form and is in UTC.",
);
const CREATED_AT: Col = col(
    "Created At",
    "date",
    0,
    "CreationTimestamp is a timestamp representing the server time when this object was created. It is not guaranteed to be set in happens-before order across separate operations. Clients may not set this value. It is represented in RFC3339 form and is in UTC.",
);

fn builtin_columns(b: Builtin) -> Vec<Col> {
    match b {
        Builtin::Namespace => vec![
            NAME,
            col("Status", "string", 0, "The status of the namespace"),
            AGE,
        ],
        Builtin::Pod => vec![
            NAME,
            col(
                "Ready",
                "string",
                0,
                "The aggregate readiness state of this pod for accepting traffic.",
            ),
            col(
                "Status",
                "string",
                0,
                "The aggregate status of the containers in this pod.",
            ),
            col(
                "Restarts",
                "string",
                0,
                "The number of times the containers in this pod have been restarted and when the last container in this pod has restarted.",
            ),
            AGE,
            col(
                "IP",
                "string",
                1,
                "IP address allocated to the pod. Routable at least within the cluster. Empty if not yet allocated.",
            ),
            col(
                "Node",
                "string",
                1,
                "NodeName is a request to schedule this pod onto a specific node. If it is non-empty, the scheduler simply schedules this pod onto that node, assuming that it fits resource requirements.",
            ),
            col(
                "Nominated Node",
                "string",
                1,
                "nominatedNodeName is set only when this pod preempts other pods on the node, but it cannot be scheduled right away as preemption victims receive their graceful termination periods.",
            ),
            col(
                "Readiness Gates",
                "string",
                1,
                "If specified, all readiness gates will be evaluated for pod readiness.",
            ),
        ],
        Builtin::Node => vec![
            NAME,
            col("Status", "string", 0, "The status of the node"),
            col("Roles", "string", 0, "The roles of the node"),
            AGE,
            col(
                "Version",
                "string",
                0,
                "Kubelet Version reported by the node.",
            ),
            col(
                "Internal-IP",
                "string",
                1,
                "List of addresses reachable to the node. Queried from cloud provider, if available.",
            ),
            col(
                "External-IP",
                "string",
                1,
                "List of addresses reachable to the node. Queried from cloud provider, if available.",
            ),
            col(
                "OS-Image",
                "string",
                1,
                "OS Image reported by the node from /etc/os-release (e.g. Debian GNU/Linux 7 (wheezy)).",
            ),
            col(
                "Kernel-Version",
                "string",
                1,
                "Kernel Version reported by the node from 'uname -r' (e.g. 3.16.0-0.bpo.4-amd64).",
            ),
            col(
                "Container-Runtime",
                "string",
                1,
                "ContainerRuntime Version reported by the node through runtime remote API (e.g. containerd://1.4.2).",
            ),
        ],
        Builtin::NetworkPolicy => vec![
            NAME,
            col(
                "Pod-Selector",
                "string",
                0,
                "Select the pods the policy applies to.",
            ),
            AGE,
        ],
        Builtin::ConfigMap => vec![
            NAME,
            col("Data", "string", 0, "Data contains the configuration data."),
            AGE,
        ],
        Builtin::Service => vec![
            NAME,
            col(
                "Type",
                "string",
                0,
                "type determines how the Service is exposed.",
            ),
            col(
                "Cluster-IP",
                "string",
                0,
                "clusterIP is the IP address of the service and is usually assigned randomly.",
            ),
            col(
                "External-IP",
                "string",
                0,
                "externalIPs is a list of IP addresses for which nodes in the cluster will also accept traffic for this service.",
            ),
            col(
                "Port(s)",
                "string",
                0,
                "The list of ports that are exposed by this service.",
            ),
            AGE,
            col(
                "Selector",
                "string",
                1,
                "Route service traffic to pods with label keys and values matching this selector.",
            ),
        ],
        Builtin::ServiceAccount => vec![
            NAME,
            col(
                "Secrets",
                "string",
                0,
                "Secrets is a list of the secrets in the same namespace that pods running using this ServiceAccount are allowed to use.",
            ),
            AGE,
        ],
        Builtin::Event | Builtin::EventsV1 => vec![
            col(
                "Last Seen",
                "string",
                0,
                "The time at which the most recent occurrence of this event was recorded.",
            ),
            col(
                "Type",
                "string",
                0,
                "Type of this event (Normal, Warning), new types could be added in the future.",
            ),
            col(
                "Reason",
                "string",
                0,
                "This should be a short, machine understandable string that gives the reason for the transition into the object's current status.",
            ),
            col(
                "Object",
                "string",
                0,
                "The object that this event is about.",
            ),
            col(
                "Subobject",
                "string",
                1,
                "The subobject (a field path) that this event is about.",
            ),
            col("Source", "string", 1, "The component reporting this event."),
            col(
                "Message",
                "string",
                0,
                "A human-readable description of the status of this operation.",
            ),
            col(
                "First Seen",
                "string",
                1,
                "The time at which the event was first recorded.",
            ),
            col(
                "Count",
                "string",
                1,
                "The number of times this event has occurred.",
            ),
            Col {
                priority: 1,
                ..NAME
            },
        ],
        Builtin::Lease => vec![
            NAME,
            col(
                "Holder",
                "string",
                0,
                "holderIdentity contains the identity of the holder of a current lease.",
            ),
            AGE,
        ],
        Builtin::ClusterRole | Builtin::Role | Builtin::Crd => vec![NAME, CREATED_AT],
        Builtin::ClusterRoleBinding | Builtin::RoleBinding => vec![
            NAME,
            col(
                "Role",
                "string",
                0,
                "RoleRef can reference a Role in the current namespace or a ClusterRole in the global namespace.",
            ),
            AGE,
            col("Users", "string", 1, "Users in the roleBinding"),
            col("Groups", "string", 1, "Groups in the roleBinding"),
            col(
                "ServiceAccounts",
                "string",
                1,
                "ServiceAccounts in the roleBinding",
            ),
        ],
        Builtin::DaemonSet => vec![
            NAME,
            col(
                "Desired",
                "integer",
                0,
                "The total number of nodes that should be running the daemon pod (including nodes correctly running the daemon pod).",
            ),
            col(
                "Current",
                "integer",
                0,
                "The number of nodes that are running at least 1 daemon pod and are supposed to run the daemon pod.",
            ),
            col(
                "Ready",
                "integer",
                0,
                "numberReady is the number of nodes that should be running the daemon pod and have one or more of the daemon pod running with a Ready Condition.",
            ),
            col(
                "Up-to-date",
                "integer",
                0,
                "The total number of nodes that are running updated daemon pod",
            ),
            col(
                "Available",
                "integer",
                0,
                "The number of nodes that should be running the daemon pod and have one or more of the daemon pod running and available (ready for at least spec.minReadySeconds)",
            ),
            col(
                "Node Selector",
                "string",
                0,
                "NodeSelector is a selector which must be true for the pod to fit on a node. Selector which must match a node's labels for the pod to be scheduled on that node.",
            ),
            AGE,
            col(
                "Containers",
                "string",
                1,
                "Names of each container in the template.",
            ),
            col(
                "Images",
                "string",
                1,
                "Images referenced by each container in the template.",
            ),
            col(
                "Selector",
                "string",
                1,
                "A label query over pods that are managed by the daemon set.",
            ),
        ],
    }
}

/// The `columnDefinitions` of a resource's tables.
pub fn column_definitions(def: &ResourceDef) -> Vec<Value> {
    match (def.builtin(), def.custom()) {
        (Some(b), _) => builtin_columns(b)
            .iter()
            .map(|c| json!({"name": c.name, "type": c.type_, "format": c.format, "description": c.description, "priority": c.priority}))
            .collect(),
        (None, Some(c)) => std::iter::once(json!({"name": NAME.name, "type": NAME.type_, "format": NAME.format, "description": NAME.description, "priority": 0}))
            .chain(c.columns.iter().map(|p| json!({"name": p.name, "type": p.type_, "format": p.format, "description": p.description, "priority": p.priority})))
            .collect(),
        (None, None) => Vec::new(),
    }
}

fn s(v: &Value) -> &str {
    v.as_str().unwrap_or("")
}

fn or_none(v: &str) -> String {
    if v.is_empty() {
        "<none>".to_string()
    } else {
        v.to_string()
    }
}

fn age(obj: &Value) -> String {
    util::seconds_since(util::meta_str(obj, "creationTimestamp"))
        .map_or_else(|| "<unknown>".to_string(), util::human_duration)
}

fn since(ts: &str) -> String {
    util::seconds_since(ts).map_or_else(|| "<unknown>".to_string(), util::human_duration)
}

/// `metav1.FormatLabelSelector`.
fn format_selector(sel: &Value) -> String {
    let mut parts = Vec::new();
    if let Some(m) = sel["matchLabels"].as_object() {
        let mut keys: Vec<&String> = m.keys().collect();
        keys.sort();
        parts.extend(keys.iter().map(|k| format!("{k}={}", s(&m[*k]))));
    }
    if let Some(exprs) = sel["matchExpressions"].as_array() {
        for e in exprs {
            let values: Vec<&str> = e["values"]
                .as_array()
                .map(|a| a.iter().map(s).collect())
                .unwrap_or_default();
            let key = s(&e["key"]);
            parts.push(match s(&e["operator"]) {
                "In" => format!("{key} in ({})", values.join(",")),
                "NotIn" => format!("{key} notin ({})", values.join(",")),
                "Exists" => key.to_string(),
                "DoesNotExist" => format!("!{key}"),
                other => format!("{key} {other} ({})", values.join(",")),
            });
        }
    }
    if parts.is_empty() {
        "<none>".to_string()
    } else {
        parts.join(",")
    }
}

fn map_selector(sel: &Value) -> String {
    sel.as_object().map_or_else(String::new, |m| {
        let mut keys: Vec<&String> = m.keys().collect();
        keys.sort();
        keys.iter()
            .map(|k| format!("{k}={}", s(&m[*k])))
            .collect::<Vec<_>>()
            .join(",")
    })
}

fn pod_status(pod: &Value) -> String {
    if !util::meta_str(pod, "deletionTimestamp").is_empty() {
        return "Terminating".to_string();
    }
    if let Some(r) = pod["status"]["reason"].as_str() {
        return r.to_string();
    }
    for cs in pod["status"]["containerStatuses"]
        .as_array()
        .into_iter()
        .flatten()
    {
        if let Some(r) = cs["state"]["waiting"]["reason"].as_str() {
            return r.to_string();
        }
        if let Some(r) = cs["state"]["terminated"]["reason"].as_str() {
            return r.to_string();
        }
    }
    or_none(s(&pod["status"]["phase"]))
}

fn builtin_cells(b: Builtin, o: &Value) -> Vec<Value> {
    let name = json!(util::meta_str(o, "name"));
    match b {
        Builtin::Namespace => vec![name, json!(s(&o["status"]["phase"])), json!(age(o))],
        Builtin::Pod => {
            let total = o["spec"]["containers"].as_array().map_or(0, Vec::len);
            let statuses = o["status"]["containerStatuses"].as_array();
            let ready = statuses.map_or(0, |cs| {
                cs.iter()
                    .filter(|c| c["ready"].as_bool() == Some(true))
                    .count()
            });
            let restarts: i64 = statuses.map_or(0, |cs| {
                cs.iter().filter_map(|c| c["restartCount"].as_i64()).sum()
            });
            vec![
                name,
                json!(format!("{ready}/{total}")),
                json!(pod_status(o)),
                json!(restarts),
                json!(age(o)),
                json!(or_none(s(&o["status"]["podIP"]))),
                json!(or_none(s(&o["spec"]["nodeName"]))),
                json!(or_none(s(&o["status"]["nominatedNodeName"]))),
                json!("<none>"),
            ]
        }
        Builtin::Node => {
            let ready = o["status"]["conditions"]
                .as_array()
                .and_then(|cs| cs.iter().find(|c| c["type"] == "Ready"));
            let mut status = match ready.map(|c| s(&c["status"])) {
                Some("True") => "Ready".to_string(),
                Some("False") => "NotReady".to_string(),
                _ => "Unknown".to_string(),
            };
            if o["spec"]["unschedulable"].as_bool() == Some(true) {
                status.push_str(",SchedulingDisabled");
            }
            let mut roles: Vec<String> = o["metadata"]["labels"]
                .as_object()
                .map(|l| {
                    l.keys()
                        .filter_map(|k| k.strip_prefix("node-role.kubernetes.io/"))
                        .map(str::to_string)
                        .collect()
                })
                .unwrap_or_default();
            roles.sort();
            let addr = |t: &str| {
                o["status"]["addresses"]
                    .as_array()
                    .and_then(|a| a.iter().find(|x| x["type"] == t))
                    .map_or("<none>".to_string(), |x| s(&x["address"]).to_string())
            };
            let info = &o["status"]["nodeInfo"];
            vec![
                name,
                json!(status),
                json!(if roles.is_empty() {
                    "<none>".to_string()
                } else {
                    roles.join(",")
                }),
                json!(age(o)),
                json!(s(&info["kubeletVersion"])),
                json!(addr("InternalIP")),
                json!(addr("ExternalIP")),
                json!(or_none(s(&info["osImage"]))),
                json!(or_none(s(&info["kernelVersion"]))),
                json!(or_none(s(&info["containerRuntimeVersion"]))),
            ]
        }
        Builtin::NetworkPolicy => vec![
            name,
            json!(format_selector(&o["spec"]["podSelector"])),
            json!(age(o)),
        ],
        Builtin::ConfigMap => {
            let n = o["data"].as_object().map_or(0, serde_json::Map::len)
                + o["binaryData"].as_object().map_or(0, serde_json::Map::len);
            vec![name, json!(n), json!(age(o))]
        }
        Builtin::Service => {
            let ports: Vec<String> = o["spec"]["ports"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|p| match p["nodePort"].as_i64() {
                    Some(np) => format!("{}:{np}/{}", p["port"], s(&p["protocol"])),
                    None => format!("{}/{}", p["port"], s(&p["protocol"])),
                })
                .collect();
            let ext: Vec<&str> = o["spec"]["externalIPs"]
                .as_array()
                .map(|a| a.iter().map(s).collect())
                .unwrap_or_default();
            vec![
                name,
                json!(s(&o["spec"]["type"])),
                json!(or_none(s(&o["spec"]["clusterIP"]))),
                json!(if ext.is_empty() {
                    "<none>".to_string()
                } else {
                    ext.join(",")
                }),
                json!(if ports.is_empty() {
                    "<none>".to_string()
                } else {
                    ports.join(",")
                }),
                json!(age(o)),
                json!(or_none(&map_selector(&o["spec"]["selector"]))),
            ]
        }
        Builtin::ServiceAccount => vec![
            name,
            json!(o["secrets"].as_array().map_or(0, Vec::len)),
            json!(age(o)),
        ],
        Builtin::Event | Builtin::EventsV1 => {
            let core = if b == Builtin::EventsV1 {
                super::resources::events_v1_to_core(o)
            } else {
                o.clone()
            };
            let last = [
                s(&core["series"]["lastObservedTime"]),
                s(&core["lastTimestamp"]),
                s(&core["eventTime"]),
            ]
            .into_iter()
            .find(|t| !t.is_empty())
            .unwrap_or("");
            let first = [s(&core["firstTimestamp"]), s(&core["eventTime"])]
                .into_iter()
                .find(|t| !t.is_empty())
                .unwrap_or("");
            let inv = &core["involvedObject"];
            let source = {
                let c = [
                    s(&core["source"]["component"]),
                    s(&core["reportingComponent"]),
                ]
                .into_iter()
                .find(|t| !t.is_empty())
                .unwrap_or("");
                let h = s(&core["source"]["host"]);
                if h.is_empty() {
                    c.to_string()
                } else {
                    format!("{c}, {h}")
                }
            };
            let count = core["series"]["count"]
                .as_i64()
                .or_else(|| core["count"].as_i64())
                .unwrap_or(1);
            vec![
                json!(if last.is_empty() {
                    "<unknown>".to_string()
                } else {
                    since(last)
                }),
                json!(s(&core["type"])),
                json!(s(&core["reason"])),
                json!(format!(
                    "{}/{}",
                    s(&inv["kind"]).to_lowercase(),
                    s(&inv["name"])
                )),
                json!(s(&inv["fieldPath"])),
                json!(source),
                json!(s(&core["message"]).trim()),
                json!(if first.is_empty() {
                    "<unknown>".to_string()
                } else {
                    since(first)
                }),
                json!(count),
                name,
            ]
        }
        Builtin::Lease => vec![
            name,
            json!(or_none(s(&o["spec"]["holderIdentity"]))),
            json!(age(o)),
        ],
        Builtin::ClusterRole | Builtin::Role | Builtin::Crd => {
            vec![name, json!(util::meta_str(o, "creationTimestamp"))]
        }
        Builtin::ClusterRoleBinding | Builtin::RoleBinding => {
            let subjects = o["subjects"].as_array().cloned().unwrap_or_default();
            let of = |k: &str| {
                let v: Vec<String> = subjects
                    .iter()
                    .filter(|x| x["kind"] == k)
                    .map(|x| {
                        if k == "ServiceAccount" {
                            format!("{}/{}", s(&x["namespace"]), s(&x["name"]))
                        } else {
                            s(&x["name"]).to_string()
                        }
                    })
                    .collect();
                v.join(", ")
            };
            vec![
                name,
                json!(format!(
                    "{}/{}",
                    s(&o["roleRef"]["kind"]),
                    s(&o["roleRef"]["name"])
                )),
                json!(age(o)),
                json!(of("User")),
                json!(of("Group")),
                json!(of("ServiceAccount")),
            ]
        }
        Builtin::DaemonSet => {
            let st = &o["status"];
            let n = |k: &str| json!(st[k].as_i64().unwrap_or(0));
            let containers = o["spec"]["template"]["spec"]["containers"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            let names: Vec<&str> = containers.iter().map(|c| s(&c["name"])).collect();
            let images: Vec<&str> = containers.iter().map(|c| s(&c["image"])).collect();
            vec![
                name,
                n("desiredNumberScheduled"),
                n("currentNumberScheduled"),
                n("numberReady"),
                n("updatedNumberScheduled"),
                n("numberAvailable"),
                json!(or_none(&map_selector(
                    &o["spec"]["template"]["spec"]["nodeSelector"]
                ))),
                json!(age(o)),
                json!(names.join(",")),
                json!(images.join(",")),
                json!(format_selector(&o["spec"]["selector"])),
            ]
        }
    }
}

/// apiextensions' `cellForJSONValue`.
fn custom_cell(type_: &str, v: &Value) -> Value {
    match type_ {
        "string" => json!(jsonpath::print(v)),
        "integer" => match v {
            Value::Number(n) if n.is_i64() || n.is_u64() => v.clone(),
            _ => Value::Null,
        },
        "number" => match v {
            Value::Number(_) => v.clone(),
            _ => Value::Null,
        },
        "boolean" => match v {
            Value::Bool(_) => v.clone(),
            _ => Value::Null,
        },
        "date" => match v.as_str() {
            Some(t) => match util::seconds_since(t) {
                Some(secs) => json!(util::human_duration(secs)),
                None => json!("<invalid>"),
            },
            None => Value::Null,
        },
        _ => json!(jsonpath::print(v)),
    }
}

/// One row's cells; `obj` is in the view's form.
pub fn cells(def: &ResourceDef, obj: &Value) -> Vec<Value> {
    match (def.builtin(), def.custom()) {
        (Some(b), _) => builtin_cells(b, obj),
        (None, Some(c)) => std::iter::once(json!(util::meta_str(obj, "name")))
            .chain(c.columns.iter().map(|col| {
                col.path
                    .find(obj)
                    .first()
                    .map_or(Value::Null, |v| custom_cell(&col.type_, v))
            }))
            .collect(),
        (None, None) => Vec::new(),
    }
}

/// `PartialObjectMetadata` of an object.
pub fn partial_metadata(obj: &Value) -> Value {
    json!({
        "kind": "PartialObjectMetadata",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": obj.get("metadata").cloned().unwrap_or_else(|| json!({})),
    })
}

/// A Table of `objs` (view form). Watch events after the first carry no column definitions,
/// as the real server sends them (kubectl reuses the last ones).
pub fn table(
    def: &ResourceDef,
    objs: &[Value],
    include: Include,
    with_columns: bool,
    list_meta: &Value,
) -> Value {
    let rows: Vec<Value> = objs
        .iter()
        .map(|o| {
            let mut row = json!({ "cells": cells(def, o) });
            match include {
                Include::None => {}
                Include::Metadata => row["object"] = partial_metadata(o),
                Include::Object => row["object"] = o.clone(),
            }
            row
        })
        .collect();
    let mut t = json!({
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": list_meta.clone(),
        "rows": rows,
    });
    t["columnDefinitions"] = if with_columns {
        Value::Array(column_definitions(def))
    } else {
        json!([])
    };
    t
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kube_api::resources::Registry;

    #[test]
    fn crd_printer_columns() {
        let crd = json!({
            "metadata": {"name": "widgets.example.com"},
            "spec": {"group": "example.com", "scope": "Namespaced", "names": {"plural": "widgets", "kind": "Widget"},
                "versions": [{"name": "v1", "served": true, "storage": true, "additionalPrinterColumns": [
                    {"name": "Valid", "type": "string", "jsonPath": ".status.conditions[?(@.type==\"Valid\")].status"},
                    {"name": "Size", "type": "integer", "jsonPath": ".spec.size"},
                    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}
                ]}]}
        });
        let reg = Registry::build(std::iter::once(&crd));
        let def = reg.find("example.com", "v1", "widgets").unwrap();
        let obj = json!({"metadata": {"name": "w", "creationTimestamp": util::now_rfc3339()},
            "spec": {"size": 3}, "status": {"conditions": [{"type": "Valid", "status": "True"}]}});
        assert_eq!(
            cells(def, &obj),
            vec![json!("w"), json!("True"), json!(3), json!("0s")]
        );
        let names: Vec<Value> = column_definitions(def)
            .iter()
            .map(|c| c["name"].clone())
            .collect();
        assert_eq!(
            names,
            vec![json!("Name"), json!("Valid"), json!("Size"), json!("Age")]
        );
        let missing = json!({"metadata": {"name": "x"}});
        assert_eq!(cells(def, &missing)[1], Value::Null);
    }

    #[test]
    fn network_policy_rows_show_the_pod_selector() {
        let reg = Registry::build(std::iter::empty());
        let def = reg
            .find("networking.k8s.io", "v1", "networkpolicies")
            .unwrap();
        let np = json!({"metadata": {"name": "n", "creationTimestamp": util::now_rfc3339()},
            "spec": {"podSelector": {"matchLabels": {"b": "2", "a": "1"}, "matchExpressions": [{"key": "t", "operator": "In", "values": ["x", "y"]}]}}});
        assert_eq!(cells(def, &np)[1], json!("a=1,b=2,t in (x,y)"));
        let empty = json!({"metadata": {"name": "n"}, "spec": {"podSelector": {}}});
        assert_eq!(cells(def, &empty)[1], json!("<none>"));
    }
}
