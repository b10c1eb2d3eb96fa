//! What the server serves: the built-in resources and those that CustomResourceDefinitions
//! add, with the facts discovery publishes and the per-resource behaviour the real server's
//! REST strategies have (status subresource, generation, name rules, field selectors).

use std::collections::BTreeMap;
use std::sync::Arc;

use serde_json::{Map, Value, json};

use super::jsonpath::JsonPath;
use super::selectors::field_value;
use super::status::GroupResource;
use super::validation::NameRule;

/// The built-in resources, by what they are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Builtin {
    Namespace,
    Pod,
    Node,
    Event,
    Service,
    ConfigMap,
    ServiceAccount,
    NetworkPolicy,
    Lease,
    EventsV1,
    Crd,
    ClusterRole,
    ClusterRoleBinding,
    Role,
    RoleBinding,
    DaemonSet,
}

/// A printer column of a CRD version (`additionalPrinterColumns`).
#[derive(Clone, Debug)]
pub struct PrinterColumn {
    pub name: String,
    pub type_: String,
    pub format: String,
    pub description: String,
    pub priority: i64,
    pub path: JsonPath,
}

/// What a CRD version says beyond discovery.
#[derive(Clone, Debug)]
pub struct CustomInfo {
    pub storage_version: String,
    pub columns: Vec<PrinterColumn>,
    pub schema: Option<Value>,
    /// Field-selector names (the JSONPath without its leading dot) and their paths.
    pub selectable_fields: Vec<(String, JsonPath)>,
}

#[derive(Clone, Debug)]
pub enum Origin {
    Builtin(Builtin),
    Custom(Arc<CustomInfo>),
}

/// One served group/version/resource.
#[derive(Clone, Debug)]
pub struct ResourceDef {
    pub group: String,
    pub version: String,
    pub plural: String,
    pub singular: String,
    pub kind: String,
    pub namespaced: bool,
    pub short_names: Vec<String>,
    pub categories: Vec<String>,
    /// Has a `status` subresource.
    pub status: bool,
    /// Where its objects live; two views of one storage (core and events.k8s.io Events) share it.
    pub storage: GroupResource,
    pub origin: Origin,
}

impl ResourceDef {
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.clone()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// The group and resource messages name.
    pub fn gr(&self) -> GroupResource {
        GroupResource::new(&self.group, &self.plural)
    }

    pub fn builtin(&self) -> Option<Builtin> {
        match self.origin {
            Origin::Builtin(b) => Some(b),
            Origin::Custom(_) => None,
        }
    }

    pub fn custom(&self) -> Option<&CustomInfo> {
        match &self.origin {
            Origin::Custom(c) => Some(c),
            Origin::Builtin(_) => None,
        }
    }

    pub fn verbs(&self) -> Vec<&'static str> {
        let mut v = vec![
            "create",
            "delete",
            "deletecollection",
            "get",
            "list",
            "patch",
            "update",
            "watch",
        ];
        if self.builtin() == Some(Builtin::Namespace) {
            v.retain(|x| *x != "deletecollection");
        }
        v
    }

    /// `metadata.generation` is kept (1 on create, bumped when anything but metadata and
    /// status changes).
    pub fn tracks_generation(&self) -> bool {
        match self.origin {
            Origin::Custom(_) => true,
            Origin::Builtin(b) => matches!(
                b,
                Builtin::Pod | Builtin::NetworkPolicy | Builtin::DaemonSet | Builtin::Crd
            ),
        }
    }

    pub fn name_rule(&self) -> NameRule {
        match self.builtin() {
            Some(Builtin::Namespace | Builtin::Service) => NameRule::Label,
            Some(
                Builtin::ClusterRole
                | Builtin::ClusterRoleBinding
                | Builtin::Role
                | Builtin::RoleBinding
                | Builtin::Event
                | Builtin::EventsV1,
            ) => NameRule::PathSegment,
            _ => NameRule::Subdomain,
        }
    }

    /// A PUT without `metadata.resourceVersion` overwrites (built-ins) or is refused (custom
    /// resources).
    pub fn allow_unconditional_update(&self) -> bool {
        self.builtin().is_some()
    }

    /// A PUT of an absent object creates it (Events only, among these).
    pub fn allow_create_on_update(&self) -> bool {
        matches!(self.builtin(), Some(Builtin::Event | Builtin::EventsV1))
    }

    /// A delete answers with the deleted object rather than a `Status`.
    pub fn returns_deleted_object(&self) -> bool {
        match self.builtin() {
            None => true,
            Some(b) => matches!(
                b,
                Builtin::Pod | Builtin::Namespace | Builtin::Service | Builtin::Crd
            ),
        }
    }

    /// Field-selector names besides `metadata.name` and `metadata.namespace`.
    fn extra_fields(&self) -> Vec<String> {
        let names: &[&str] = match self.builtin() {
            Some(Builtin::Pod) => &[
                "spec.nodeName",
                "spec.restartPolicy",
                "spec.schedulerName",
                "spec.serviceAccountName",
                "spec.hostNetwork",
                "status.phase",
                "status.podIP",
                "status.nominatedNodeName",
            ],
            Some(Builtin::Node) => &["spec.unschedulable"],
            Some(Builtin::Namespace) => &["status.phase"],
            Some(Builtin::Service) => &["spec.clusterIP", "spec.type"],
            Some(Builtin::Event) => &[
                "involvedObject.kind",
                "involvedObject.namespace",
                "involvedObject.name",
                "involvedObject.uid",
                "involvedObject.apiVersion",
                "involvedObject.resourceVersion",
                "involvedObject.fieldPath",
                "reason",
                "reportingComponent",
                "source",
                "type",
            ],
            Some(Builtin::EventsV1) => &[
                "regarding.kind",
                "regarding.namespace",
                "regarding.name",
                "regarding.uid",
                "reason",
                "reportingController",
                "type",
            ],
            Some(_) => &[],
            None => {
                return self
                    .custom()
                    .map(|c| c.selectable_fields.iter().map(|(n, _)| n.clone()).collect())
                    .unwrap_or_default();
            }
        };
        names.iter().map(|s| (*s).to_string()).collect()
    }

    /// Checks every field of a field selector is one this resource supports; the error is the
    /// real server's message.
    pub fn check_field_selector<'a>(
        &self,
        fields: impl Iterator<Item = &'a str>,
    ) -> Result<(), String> {
        let extra = self.extra_fields();
        for f in fields {
            if f == "metadata.name" || f == "metadata.namespace" || extra.iter().any(|e| e == f) {
                continue;
            }
            if self.custom().is_some() {
                let mut known = vec![
                    "\"metadata.name\"".to_string(),
                    "\"metadata.namespace\"".to_string(),
                ];
                known.extend(extra.iter().map(|e| format!("{e:?}")));
                return Err(format!(
                    "{f:?} is not a known field selector: only {}",
                    known.join(", ")
                ));
            }
            return Err(format!("field label not supported: {f}"));
        }
        Ok(())
    }

    /// A field's value as the field selector compares it (`obj` is in this view's form).
    pub fn field(&self, obj: &Value, field: &str) -> String {
        match (self.builtin(), field) {
            (Some(Builtin::Pod), "spec.hostNetwork")
            | (Some(Builtin::Node), "spec.unschedulable") => {
                let v = field_value(obj, field);
                if v.is_empty() { "false".to_string() } else { v }
            }
            (Some(Builtin::Event), "source") => field_value(obj, "source.component"),
            (None, f) if f != "metadata.name" && f != "metadata.namespace" => self
                .custom()
                .and_then(|c| c.selectable_fields.iter().find(|(n, _)| n == f))
                .and_then(|(_, p)| {
                    p.find(obj).first().map(|v| match v {
                        Value::String(s) => s.clone(),
                        Value::Bool(b) => b.to_string(),
                        Value::Number(n) => n.to_string(),
                        _ => String::new(),
                    })
                })
                .unwrap_or_default(),
            _ => field_value(obj, field),
        }
    }

    /// The stored form of an object written through this view.
    pub fn stored_form(&self, mut obj: Value) -> Value {
        match &self.origin {
            Origin::Builtin(Builtin::EventsV1) => events_v1_to_core(&obj),
            Origin::Custom(c) => {
                obj["apiVersion"] = json!(format!("{}/{}", self.group, c.storage_version));
                obj
            }
            Origin::Builtin(_) => obj,
        }
    }

    /// An object in storage as this view shows it.
    pub fn view_form(&self, obj: &Value) -> Value {
        match &self.origin {
            Origin::Builtin(Builtin::EventsV1) => core_to_events_v1(obj),
            Origin::Custom(_) => {
                let mut o = obj.clone();
                o["apiVersion"] = json!(self.api_version());
                o
            }
            Origin::Builtin(_) => obj.clone(),
        }
    }
}

const EVENT_FIELDS: &[(&str, &str)] = &[
    ("involvedObject", "regarding"),
    ("message", "note"),
    ("source", "deprecatedSource"),
    ("firstTimestamp", "deprecatedFirstTimestamp"),
    ("lastTimestamp", "deprecatedLastTimestamp"),
    ("count", "deprecatedCount"),
    ("reportingComponent", "reportingController"),
    ("reportingInstance", "reportingInstance"),
    ("action", "action"),
    ("reason", "reason"),
    ("type", "type"),
    ("eventTime", "eventTime"),
    ("related", "related"),
    ("series", "series"),
    ("metadata", "metadata"),
];

fn rename(obj: &Value, to_v1: bool, api_version: &str) -> Value {
    let mut out = Map::new();
    out.insert("kind".into(), json!("Event"));
    out.insert("apiVersion".into(), json!(api_version));
    for (core, v1) in EVENT_FIELDS {
        let (from, to) = if to_v1 { (core, v1) } else { (v1, core) };
        if let Some(v) = obj.get(*from)
            && !v.is_null()
        {
            out.insert((*to).to_string(), v.clone());
        }
    }
    Value::Object(out)
}

/// events.k8s.io/v1 Event to the core/v1 Event both are stored as.
pub fn events_v1_to_core(obj: &Value) -> Value {
    rename(obj, false, "v1")
}

pub fn core_to_events_v1(obj: &Value) -> Value {
    rename(obj, true, "events.k8s.io/v1")
}

struct Spec {
    group: &'static str,
    version: &'static str,
    plural: &'static str,
    singular: &'static str,
    kind: &'static str,
    namespaced: bool,
    short: &'static [&'static str],
    categories: &'static [&'static str],
    status: bool,
    builtin: Builtin,
}

const BUILTINS: &[Spec] = &[
    Spec {
        group: "",
        version: "v1",
        plural: "configmaps",
        singular: "configmap",
        kind: "ConfigMap",
        namespaced: true,
        short: &["cm"],
        categories: &[],
        status: false,
        builtin: Builtin::ConfigMap,
    },
    Spec {
        group: "",
        version: "v1",
        plural: "events",
        singular: "event",
        kind: "Event",
        namespaced: true,
        short: &["ev"],
        categories: &[],
        status: false,
        builtin: Builtin::Event,
    },
    Spec {
        group: "",
        version: "v1",
        plural: "namespaces",
        singular: "namespace",
        kind: "Namespace",
        namespaced: false,
        short: &["ns"],
        categories: &[],
        status: true,
        builtin: Builtin::Namespace,
    },
    Spec {
        group: "",
        version: "v1",
        plural: "nodes",
        singular: "node",
        kind: "Node",
        namespaced: false,
        short: &["no"],
        categories: &[],
        status: true,
        builtin: Builtin::Node,
    },
    Spec {
        group: "",
        version: "v1",
        plural: "pods",
        singular: "pod",
        kind: "Pod",
        namespaced: true,
        short: &["po"],
        categories: &["all"],
        status: true,
        builtin: Builtin::Pod,
    },
    Spec {
        group: "",
        version: "v1",
        plural: "serviceaccounts",
        singular: "serviceaccount",
        kind: "ServiceAccount",
        namespaced: true,
        short: &["sa"],
        categories: &[],
        status: false,
        builtin: Builtin::ServiceAccount,
    },
    Spec {
        group: "",
        version: "v1",
        plural: "services",
        singular: "service",
        kind: "Service",
        namespaced: true,
        short: &["svc"],
        categories: &["all"],
        status: true,
        builtin: Builtin::Service,
    },
    Spec {
        group: "apps",
        version: "v1",
        plural: "daemonsets",
        singular: "daemonset",
        kind: "DaemonSet",
        namespaced: true,
        short: &["ds"],
        categories: &["all"],
        status: true,
        builtin: Builtin::DaemonSet,
    },
    Spec {
        group: "events.k8s.io",
        version: "v1",
        plural: "events",
        singular: "event",
        kind: "Event",
        namespaced: true,
        short: &["ev"],
        categories: &[],
        status: false,
        builtin: Builtin::EventsV1,
    },
    Spec {
        group: "networking.k8s.io",
        version: "v1",
        plural: "networkpolicies",
        singular: "networkpolicy",
        kind: "NetworkPolicy",
        namespaced: true,
        short: &["netpol"],
        categories: &[],
        status: false,
        builtin: Builtin::NetworkPolicy,
    },
    Spec {
        group: "rbac.authorization.k8s.io",
        version: "v1",
        plural: "clusterrolebindings",
        singular: "clusterrolebinding",
        kind: "ClusterRoleBinding",
        namespaced: false,
        short: &[],
        categories: &[],
        status: false,
        builtin: Builtin::ClusterRoleBinding,
    },
    Spec {
        group: "rbac.authorization.k8s.io",
        version: "v1",
        plural: "clusterroles",
        singular: "clusterrole",
        kind: "ClusterRole",
        namespaced: false,
        short: &[],
        categories: &[],
        status: false,
        builtin: Builtin::ClusterRole,
    },
    Spec {
        group: "rbac.authorization.k8s.io",
        version: "v1",
        plural: "rolebindings",
        singular: "rolebinding",
        kind: "RoleBinding",
        namespaced: true,
        short: &[],
        categories: &[],
        status: false,
        builtin: Builtin::RoleBinding,
    },
    Spec {
        group: "rbac.authorization.k8s.io",
        version: "v1",
        plural: "roles",
        singular: "role",
        kind: "Role",
        namespaced: true,
        short: &[],
        categories: &[],
        status: false,
        builtin: Builtin::Role,
    },
    Spec {
        group: "apiextensions.k8s.io",
        version: "v1",
        plural: "customresourcedefinitions",
        singular: "customresourcedefinition",
        kind: "CustomResourceDefinition",
        namespaced: false,
        short: &["crd", "crds"],
        categories: &["api-extensions"],
        status: true,
        builtin: Builtin::Crd,
    },
    Spec {
        group: "coordination.k8s.io",
        version: "v1",
        plural: "leases",
        singular: "lease",
        kind: "Lease",
        namespaced: true,
        short: &[],
        categories: &[],
        status: false,
        builtin: Builtin::Lease,
    },
];

/// The built-in groups in the order kube-apiserver lists them.
const GROUP_ORDER: &[&str] = &[
    "",
    "apps",
    "events.k8s.io",
    "networking.k8s.io",
    "rbac.authorization.k8s.io",
    "apiextensions.k8s.io",
    "coordination.k8s.io",
];

/// Everything served, rebuilt whenever a CRD changes.
#[derive(Clone, Debug)]
pub struct Registry {
    defs: Vec<ResourceDef>,
}

/// One group as discovery lists it: its versions, preferred first.
#[derive(Clone, Debug)]
pub struct GroupInfo {
    pub name: String,
    pub versions: Vec<String>,
}

impl Registry {
    /// The built-ins plus the resources of the given CRD objects.
    pub fn build<'a>(crds: impl Iterator<Item = &'a Value>) -> Registry {
        let mut defs: Vec<ResourceDef> = BUILTINS
            .iter()
            .map(|s| ResourceDef {
                group: s.group.to_string(),
                version: s.version.to_string(),
                plural: s.plural.to_string(),
                singular: s.singular.to_string(),
                kind: s.kind.to_string(),
                namespaced: s.namespaced,
                short_names: s.short.iter().map(|x| (*x).to_string()).collect(),
                categories: s.categories.iter().map(|x| (*x).to_string()).collect(),
                status: s.status,
                storage: if s.builtin == Builtin::EventsV1 {
                    GroupResource::new("", "events")
                } else {
                    GroupResource::new(s.group, s.plural)
                },
                origin: Origin::Builtin(s.builtin),
            })
            .collect();
        for crd in crds {
            // A CRD whose group/resource a built-in already serves is not accepted.
            for d in defs_of_crd(crd) {
                if !defs
                    .iter()
                    .any(|x| x.group == d.group && x.plural == d.plural && x.version == d.version)
                {
                    defs.push(d);
                }
            }
        }
        Registry { defs }
    }

    pub fn find(&self, group: &str, version: &str, plural: &str) -> Option<&ResourceDef> {
        self.defs
            .iter()
            .find(|d| d.group == group && d.version == version && d.plural == plural)
    }

    /// Whether `group/version` is served at all.
    pub fn serves_version(&self, group: &str, version: &str) -> bool {
        self.defs
            .iter()
            .any(|d| d.group == group && d.version == version)
    }

    pub fn find_kind(&self, api_version: &str, kind: &str) -> Option<&ResourceDef> {
        self.defs
            .iter()
            .find(|d| d.api_version() == api_version && d.kind == kind)
    }

    /// The resources of one group version, in name order.
    pub fn resources(&self, group: &str, version: &str) -> Vec<&ResourceDef> {
        let mut v: Vec<&ResourceDef> = self
            .defs
            .iter()
            .filter(|d| d.group == group && d.version == version)
            .collect();
        v.sort_by(|a, b| a.plural.cmp(&b.plural));
        v
    }

    /// The groups, built-ins in the real server's order then custom groups by name; the core
    /// group (named "") first.
    pub fn groups(&self) -> Vec<GroupInfo> {
        let mut by_group: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for d in &self.defs {
            let v = by_group.entry(&d.group).or_default();
            if !v.contains(&d.version.as_str()) {
                v.push(&d.version);
            }
        }
        let mut names: Vec<&str> = by_group.keys().copied().collect();
        names.sort_by_key(|g| {
            (
                GROUP_ORDER
                    .iter()
                    .position(|x| x == g)
                    .unwrap_or(GROUP_ORDER.len()),
                (*g).to_string(),
            )
        });
        names
            .into_iter()
            .map(|g| {
                let mut versions: Vec<String> =
                    by_group[g].iter().map(|v| (*v).to_string()).collect();
                versions.sort_by_key(|v| std::cmp::Reverse(version_priority(v)));
                GroupInfo {
                    name: g.to_string(),
                    versions,
                }
            })
            .collect()
    }
}

/// Kube-aware version ordering: GA over beta over alpha over anything else; higher numbers
/// first within each.
pub fn version_priority(v: &str) -> (u8, u64, u64, String) {
    let Some(rest) = v.strip_prefix('v') else {
        return (0, 0, 0, v.to_string());
    };
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    let Ok(major) = digits.parse::<u64>() else {
        return (0, 0, 0, v.to_string());
    };
    let tail = &rest[digits.len()..];
    if tail.is_empty() {
        return (3, major, 0, String::new());
    }
    for (prefix, rank) in [("beta", 2), ("alpha", 1)] {
        if let Some(n) = tail.strip_prefix(prefix)
            && let Ok(minor) = n.parse::<u64>()
        {
            return (rank, major, minor, String::new());
        }
    }
    (0, 0, 0, v.to_string())
}

fn str_at<'a>(v: &'a Value, path: &[&str]) -> &'a str {
    let mut cur = v;
    for p in path {
        match cur.get(p) {
            Some(x) => cur = x,
            None => return "",
        }
    }
    cur.as_str().unwrap_or("")
}

fn strings(v: Option<&Value>) -> Vec<String> {
    v.and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// The served versions of a CRD as resource definitions.
fn defs_of_crd(crd: &Value) -> Vec<ResourceDef> {
    let spec = &crd["spec"];
    let group = str_at(spec, &["group"]);
    let plural = str_at(spec, &["names", "plural"]);
    let kind = str_at(spec, &["names", "kind"]);
    if group.is_empty() || plural.is_empty() || kind.is_empty() {
        return Vec::new();
    }
    let singular = match str_at(spec, &["names", "singular"]) {
        "" => kind.to_lowercase(),
        s => s.to_string(),
    };
    let namespaced = str_at(spec, &["scope"]) != "Cluster";
    let versions = spec["versions"].as_array().cloned().unwrap_or_default();
    let storage_version = versions
        .iter()
        .find(|v| v["storage"].as_bool() == Some(true))
        .map(|v| str_at(v, &["name"]).to_string())
        .unwrap_or_default();
    versions
        .iter()
        .filter(|v| v["served"].as_bool().unwrap_or(false))
        .map(|v| {
            let mut columns: Vec<PrinterColumn> = v["additionalPrinterColumns"]
                .as_array()
                .map(|cols| {
                    cols.iter()
                        .filter_map(|c| {
                            Some(PrinterColumn {
                                name: str_at(c, &["name"]).to_string(),
                                type_: str_at(c, &["type"]).to_string(),
                                format: str_at(c, &["format"]).to_string(),
                                description: str_at(c, &["description"]).to_string(),
                                priority: c["priority"].as_i64().unwrap_or(0),
                                path: JsonPath::parse(str_at(c, &["jsonPath"])).ok()?,
                            })
                        })
                        .collect()
                })
                .unwrap_or_default();
            if columns.is_empty() {
                columns.push(PrinterColumn {
                    name: "Age".to_string(),
                    type_: "date".to_string(),
                    format: String::new(),
                    description: String::new(),
                    priority: 0,
                    path: JsonPath::parse(".metadata.creationTimestamp").expect("valid path"),
                });
            }
            let selectable_fields = v["selectableFields"]
                .as_array()
                .map(|fs| {
                    fs.iter()
                        .filter_map(|f| {
                            let p = str_at(f, &["jsonPath"]);
                            Some((
                                p.trim_start_matches('.').to_string(),
                                JsonPath::parse(p).ok()?,
                            ))
                        })
                        .collect()
                })
                .unwrap_or_default();
            ResourceDef {
                group: group.to_string(),
                version: str_at(v, &["name"]).to_string(),
                plural: plural.to_string(),
                singular: singular.clone(),
                kind: kind.to_string(),
                namespaced,
                short_names: strings(spec["names"].get("shortNames")),
                categories: strings(spec["names"].get("categories")),
                status: v
                    .get("subresources")
                    .and_then(|s| s.get("status"))
                    .is_some(),
                storage: GroupResource::new(group, plural),
                origin: Origin::Custom(Arc::new(CustomInfo {
                    storage_version: storage_version.clone(),
                    columns,
                    schema: v
                        .get("schema")
                        .and_then(|s| s.get("openAPIV3Schema"))
                        .cloned(),
                    selectable_fields,
                })),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_order_is_kube_aware() {
        let mut v = vec!["v1alpha1", "v2", "v1beta2", "v1", "foo", "v1beta1"];
        v.sort_by_key(|x| std::cmp::Reverse(version_priority(x)));
        assert_eq!(v, ["v2", "v1", "v1beta2", "v1beta1", "v1alpha1", "foo"]);
    }

    #[test]
    fn crds_add_served_versions() {
        let crd = json!({
            "metadata": {"name": "widgets.example.com"},
            "spec": {"group": "example.com", "scope": "Namespaced",
                "names": {"plural": "widgets", "kind": "Widget", "shortNames": ["wd"]},
                "versions": [
                    {"name": "v1", "served": true, "storage": true, "subresources": {"status": {}}},
                    {"name": "v1alpha1", "served": true, "storage": false},
                    {"name": "v0", "served": false, "storage": false}
                ]}
        });
        let r = Registry::build(std::iter::once(&crd));
        let d = r.find("example.com", "v1", "widgets").unwrap();
        assert!(d.status && d.namespaced);
        assert_eq!(d.singular, "widget");
        assert!(!r.find("example.com", "v1alpha1", "widgets").unwrap().status);
        assert!(r.find("example.com", "v0", "widgets").is_none());
        let g = r.groups();
        assert_eq!(g[0].name, "");
        assert_eq!(g.last().unwrap().versions, ["v1", "v1alpha1"]);
    }

    #[test]
    fn events_convert_both_ways() {
        let v1 = json!({"apiVersion": "events.k8s.io/v1", "kind": "Event", "metadata": {"name": "e"},
            "regarding": {"kind": "Pod", "name": "p"}, "note": "hello", "reason": "Started",
            "reportingController": "palisade.io/agent", "type": "Normal"});
        let core = events_v1_to_core(&v1);
        assert_eq!(core["message"], "hello");
        assert_eq!(core["involvedObject"]["name"], "p");
        assert_eq!(core["reportingComponent"], "palisade.io/agent");
        assert_eq!(core_to_events_v1(&core), v1);
    }
}
