//! The custom resources against the policy parser, the repository's manifests, the generated
//! files and the API server's rules for schemas: the CRD types, the schema in policies/crds/
//! and `palisade_policies::manifest` must describe one language.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt as _;
use palisade_k8s::crd::{
    CRD_DIR, ClusterwideNetworkPolicy, GENERATE_COMMAND, NetworkPolicy, PalisadeIdentity,
    PalisadeIdentitySpec, Rule, crd_files, crds,
};
use palisade_policies::identity::{Identity, workload_identity_labels};
use palisade_policies::labels::Labels;
use palisade_policies::manifest::{ManifestError, parse_manifests};
use serde::Deserialize as _;
use serde_json::{Value, json};

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("the workspace root exists")
}

/// Every document of a YAML text, as JSON values (empty documents left out).
fn yaml_documents(text: &str) -> Result<Vec<Value>, String> {
    let mut out = Vec::new();
    for document in serde_norway::Deserializer::from_str(text) {
        let value = Value::deserialize(document).map_err(|e| e.to_string())?;
        if !value.is_null() {
            out.push(value);
        }
    }
    Ok(out)
}

/// A policy-language document found in the repository, and where.
struct Found {
    origin: String,
    document: Value,
}

/// Walks the repository (without target/ and hidden directories) for YAML files and the YAML
/// blocks of Markdown files; a document with an `apiVersion` of `groups` is collected, and
/// the strings of any other document that hold manifests themselves (the conformance cases'
/// `apply:` steps) are searched the same way.
fn find_documents(groups: &[&str]) -> Vec<Found> {
    let mut found = Vec::new();
    let mut stack = vec![workspace_root()];
    while let Some(dir) = stack.pop() {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("listing {}: {e}", dir.display()))
            .map(|e| e.expect("a directory entry").path())
            .collect();
        entries.sort();
        for path in entries {
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            if path.is_dir() {
                if !name.starts_with('.') && name != "target" {
                    stack.push(path);
                }
                continue;
            }
            let relative = path
                .strip_prefix(workspace_root())
                .unwrap()
                .display()
                .to_string();
            let Ok(text) = std::fs::read_to_string(&path) else {
                continue;
            };
            let extension = path
                .extension()
                .map(|e| e.to_string_lossy().to_ascii_lowercase());
            let markdown = extension.as_deref() == Some("md");
            let blocks: Vec<String> = match extension.as_deref() {
                Some("yaml" | "yml") => vec![text],
                Some("md") => markdown_yaml_blocks(&text),
                _ => continue,
            };
            for (i, block) in blocks.iter().enumerate() {
                let origin = if markdown {
                    format!("{relative} (YAML block {})", i + 1)
                } else {
                    relative.clone()
                };
                collect(block, &origin, groups, &mut found);
            }
        }
    }
    found
}

fn markdown_yaml_blocks(text: &str) -> Vec<String> {
    let mut blocks = Vec::new();
    let mut current: Option<String> = None;
    for line in text.lines() {
        match &mut current {
            None if line.trim_start().starts_with("```yaml")
                || line.trim_start().starts_with("```yml") =>
            {
                current = Some(String::new());
            }
            Some(block) if line.trim_start().starts_with("```") => {
                blocks.push(std::mem::take(block));
                current = None;
            }
            Some(block) => {
                block.push_str(line);
                block.push('\n');
            }
            None => {}
        }
    }
    blocks
}

fn collect(text: &str, origin: &str, groups: &[&str], found: &mut Vec<Found>) {
    let mentions = groups
        .iter()
        .any(|g| text.contains(&format!("apiVersion: {g}")));
    let documents = match yaml_documents(text) {
        Ok(documents) => documents,
        Err(e) if mentions => panic!("{origin}: a policy manifest that is not YAML: {e}"),
        Err(_) => return,
    };
    for (i, document) in documents.into_iter().enumerate() {
        let api_version = document.get("apiVersion").and_then(Value::as_str);
        if api_version.is_some_and(|v| groups.contains(&v)) {
            found.push(Found {
                origin: format!("{origin} document {}", i + 1),
                document,
            });
        } else if api_version.is_none() {
            let mut strings = Vec::new();
            strings_in(&document, &mut strings);
            for s in strings {
                if groups
                    .iter()
                    .any(|g| s.contains(&format!("apiVersion: {g}")))
                {
                    collect(s, &format!("{origin} (embedded)"), groups, found);
                }
            }
        }
    }
}

fn strings_in<'a>(value: &'a Value, out: &mut Vec<&'a String>) {
    match value {
        Value::String(s) => out.push(s),
        Value::Array(items) => items.iter().for_each(|v| strings_in(v, out)),
        Value::Object(map) => map.values().for_each(|v| strings_in(v, out)),
        _ => {}
    }
}

/// The document through the typed resource and back.
fn through_types(document: &Value) -> Result<Value, String> {
    let kind = document.get("kind").and_then(Value::as_str);
    let api_version = document.get("apiVersion").and_then(Value::as_str);
    match (api_version, kind) {
        (Some("palisade.io/v1"), Some("NetworkPolicy")) => {
            let typed: NetworkPolicy =
                serde_json::from_value(document.clone()).map_err(|e| e.to_string())?;
            serde_json::to_value(&typed).map_err(|e| e.to_string())
        }
        (Some("palisade.io/v1"), Some("ClusterwideNetworkPolicy")) => {
            let typed: ClusterwideNetworkPolicy =
                serde_json::from_value(document.clone()).map_err(|e| e.to_string())?;
            serde_json::to_value(&typed).map_err(|e| e.to_string())
        }
        // The same rule language: the spec types read Cilium's documents too.
        (Some("cilium.io/v2"), Some("CiliumNetworkPolicy" | "CiliumClusterwideNetworkPolicy")) => {
            let mut out = document.clone();
            for field in ["spec", "specs"] {
                let Some(value) = document.get(field) else {
                    continue;
                };
                let back = if field == "spec" {
                    let rule: Rule =
                        serde_json::from_value(value.clone()).map_err(|e| e.to_string())?;
                    serde_json::to_value(rule)
                } else {
                    let rules: Vec<Rule> =
                        serde_json::from_value(value.clone()).map_err(|e| e.to_string())?;
                    serde_json::to_value(rules)
                }
                .map_err(|e| e.to_string())?;
                out[field] = back;
            }
            Ok(out)
        }
        other => Err(format!("no Rust type for {other:?}")),
    }
}

fn json_text(value: &Value) -> String {
    serde_json::to_string(value).expect("JSON values serialize")
}

#[test]
fn every_policy_manifest_in_the_repository_round_trips_through_the_types() {
    let found = find_documents(&["palisade.io/v1", "cilium.io/v2"]);
    let mut failures = Vec::new();
    for f in &found {
        match through_types(&f.document) {
            Ok(back) if back == f.document => {}
            Ok(back) => failures.push(format!(
                "{}: changed by the types\n  before: {}\n  after:  {}",
                f.origin,
                json_text(&f.document),
                json_text(&back)
            )),
            Err(e) => failures.push(format!("{}: {e}", f.origin)),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // The places that hold such manifests today; a walk that found none of them is broken.
    let palisade: Vec<&Found> = found
        .iter()
        .filter(|f| f.document["apiVersion"] == "palisade.io/v1")
        .collect();
    for place in [
        "policies/examples/",
        "policies/demo/",
        "integration/conformance/",
        "docs/",
    ] {
        assert!(
            palisade.iter().any(|f| f.origin.starts_with(place)),
            "no palisade.io manifest found under {place}"
        );
    }
    assert!(palisade.len() >= 10, "only {} found", palisade.len());
}

/// Metadata as the API server returns it, and a status as the agents write it.
fn as_served(document: &Value) -> Value {
    let mut served = document.clone();
    let metadata = served["metadata"].as_object_mut().expect("metadata");
    metadata.extend(
        json!({
            "uid": "6d9a3e2c-0f5b-4d7e-9a51-3c1f0e2b8a77",
            "resourceVersion": "4711",
            "generation": 3,
            "creationTimestamp": "2025-06-01T12:00:00Z",
            "labels": {"team": "payments"},
            "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{}"},
            "finalizers": ["palisade.io/cleanup"],
            "ownerReferences": [{"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": "1"}],
            "managedFields": [{"manager": "kubectl", "operation": "Apply", "apiVersion": "palisade.io/v1",
                               "time": "2025-06-01T12:00:00Z", "fieldsType": "FieldsV1", "fieldsV1": {}}],
        })
        .as_object()
        .unwrap()
        .clone(),
    );
    served["status"] = json!({"conditions": [{
        "type": "Valid", "status": "True", "reason": "Accepted", "message": "",
        "lastTransitionTime": "2025-06-01T12:00:01Z", "observedGeneration": 3,
    }]});
    served
}

#[test]
fn the_parser_reads_typed_objects_as_served_like_their_manifests() {
    let found = find_documents(&["palisade.io/v1"]);
    assert!(!found.is_empty());
    for f in found {
        let expected = parse_manifests(&json_text(&f.document))
            .unwrap_or_else(|e| panic!("{}: the manifest itself is rejected: {e}", f.origin));
        let typed = through_types(&as_served(&f.document)).expect("typed");
        assert_eq!(
            parse_manifests(&json_text(&typed)),
            Ok(expected),
            "{}",
            f.origin
        );
    }
}

/// A palisade.io policy that sets every field the parser supports.
const EVERYTHING: &str = r#"
apiVersion: palisade.io/v1
kind: NetworkPolicy
metadata: {name: everything, namespace: shop}
spec:
  description: every supported field
  endpointSelector:
    matchLabels: {app: web}
    matchExpressions: [{key: tier, operator: In, values: [web, edge]}]
  labels: [{key: team, value: payments, source: k8s}]
  enableDefaultDeny: {ingress: true, egress: true}
  audit: false
  ingress:
  - fromEndpoints: [{matchLabels: {app: lb}, matchExpressions: [{key: env, operator: NotIn, values: [dev]}, {key: zone, operator: Exists}]}]
    fromCIDR: [10.0.0.0/8, 192.0.2.1]
    fromCIDRSet: [{cidr: 192.168.0.0/16, except: [192.168.1.0/24]}]
    fromEntities: [world, host]
    toPorts:
    - ports: [{port: "8000", endPort: 8099, protocol: TCP}, {port: 9000}]
      rules:
        http:
        - method: GET
          path: /api/.*
          host: shop.example.com
          headers: ["X-Team: a", X-Trace]
          headerMatches: [{name: X-Env, value: prod}, {name: X-Canary}]
          upgrades: [spdy/3.1]
    icmps: [{fields: [{type: 8, family: IPv4}, {type: EchoReply}]}]
  ingressDeny:
  - fromEndpoints: [{matchLabels: {tier: edge}, matchExpressions: [{key: app, operator: In, values: [intruder]}]}]
    fromCIDR: [203.0.113.0/24]
    fromCIDRSet: [{cidr: 198.51.100.0/24, except: [198.51.100.128/25]}]
    fromEntities: [remote-node]
    toPorts: [{ports: [{port: "22", endPort: 23, protocol: TCP}]}]
    icmps: [{fields: [{type: TimeExceeded, family: IPv4}]}]
  egress:
  - toEndpoints: [{matchLabels: {app: db}, matchExpressions: [{key: tier, operator: DoesNotExist}, {key: env, operator: In, values: [prod]}]}]
    toCIDR: [10.1.0.0/16]
    toCIDRSet: [{cidr: 172.16.0.0/12, except: [172.16.0.0/16]}]
    toEntities: [kube-apiserver]
    toPorts:
    - ports: [{port: postgres, protocol: TCP}]
    - ports: [{port: "8080", endPort: 8081, protocol: TCP}]
      rules:
        http:
        - {method: POST, path: /ledger, host: "ledger(:8080)?", headers: [X-Token], headerMatches: [{name: X-Env, value: prod}], upgrades: [websocket]}
    icmps: [{fields: [{type: EchoRequest, family: IPv4}]}]
  - toEndpoints: [{matchLabels: {k8s-app: kube-dns}}]
    toPorts:
    - ports: [{port: "53", protocol: ANY}]
      rules:
        dns: [{matchName: api.example.com}, {matchPattern: "*.cdn.example.com"}]
  - toFQDNs: [{matchName: api.example.com}, {matchPattern: "*.cdn.example.com"}]
    toPorts: [{ports: [{port: "443", protocol: TCP}]}]
  egressDeny:
  - toEndpoints: [{matchLabels: {tier: data}, matchExpressions: [{key: app, operator: In, values: [ledger]}]}]
    toCIDR: [169.254.169.254]
    toCIDRSet: [{cidr: 100.64.0.0/10, except: [100.64.0.0/16]}]
    toEntities: [world]
    toPorts: [{ports: [{port: "25", endPort: 26, protocol: ANY}]}]
    icmps: [{fields: [{type: 3, family: IPv4}]}]
specs:
- description: a second rule
  endpointSelector: {}
  egress: [{toEntities: [cluster]}]
status:
  conditions:
  - {type: Valid, status: "True", reason: Accepted, message: "", lastTransitionTime: "2025-06-01T12:00:00Z", observedGeneration: 1}
"#;

/// Every property path of a schema (`spec.ingress[].toPorts`), with its schema.
fn property_paths<'a>(schema: &'a Value, path: &str, out: &mut Vec<(String, &'a Value)>) {
    if let Some(properties) = schema.get("properties").and_then(Value::as_object) {
        for (name, sub) in properties {
            let sub_path = if path.is_empty() {
                name.clone()
            } else {
                format!("{path}.{name}")
            };
            out.push((sub_path.clone(), sub));
            property_paths(sub, &sub_path, out);
        }
    }
    if let Some(items) = schema.get("items") {
        property_paths(items, &format!("{path}[]"), out);
    }
}

/// The same paths of a value.
fn value_paths(value: &Value, path: &str, out: &mut BTreeSet<String>) {
    match value {
        Value::Object(map) => {
            for (name, sub) in map {
                let sub_path = if path.is_empty() {
                    name.clone()
                } else {
                    format!("{path}.{name}")
                };
                out.insert(sub_path.clone());
                value_paths(sub, &sub_path, out);
            }
        }
        Value::Array(items) => items
            .iter()
            .for_each(|v| value_paths(v, &format!("{path}[]"), out)),
        _ => {}
    }
}

fn openapi_schema(crd: &CustomResourceDefinition) -> Value {
    let schema = crd.spec.versions[0]
        .schema
        .as_ref()
        .and_then(|s| s.open_api_v3_schema.as_ref())
        .expect("a schema");
    serde_json::to_value(schema).unwrap()
}

fn is_opaque(schema: &Value) -> bool {
    schema.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true))
}

#[test]
fn the_parser_accepts_a_typed_policy_with_every_supported_field() {
    let document = yaml_documents(EVERYTHING).unwrap().remove(0);
    let typed: NetworkPolicy = serde_json::from_value(document.clone()).unwrap();
    let serialized = serde_json::to_value(&typed).unwrap();
    assert_eq!(serialized, document);
    let policies = parse_manifests(&json_text(&serialized)).expect("the parser accepts it");
    assert_eq!(policies, parse_manifests(EVERYTHING).unwrap());
    assert_eq!(policies[0].specs.len(), 2);
    assert_eq!(typed.spec.rules().count(), 2);
    assert_eq!(
        typed
            .status
            .as_ref()
            .and_then(|s| s.valid())
            .map(|c| c.status.as_str()),
        Some("True")
    );

    // The sample really sets every field, so a field added to the types must be added here.
    let mut present = BTreeSet::new();
    value_paths(&serialized, "", &mut present);
    let mut paths = Vec::new();
    let schema = openapi_schema(&NetworkPolicy::crd());
    property_paths(&schema, "", &mut paths);
    let missing: Vec<&String> = paths
        .iter()
        .filter(|(path, sub)| {
            // Rejected on purpose (their own test below), or what the parser refuses where the
            // types share a shape: L7 rules in deny rules, toFQDNs in egressDeny, DNS rules
            // on ingress.
            !is_opaque(sub)
                && !paths.iter().any(|(p, s)| is_opaque(s) && path.starts_with(&format!("{p}.")))
                && !(path.contains("Deny[].toPorts[].rules"))
                && !path.starts_with("spec.egressDeny[].toFQDNs")
                && !path.starts_with("spec.ingress[].toPorts[].rules.dns")
                && !present.contains(path)
                // A second rule need not repeat the first one's fields.
                && !path.starts_with("specs[].")
        })
        .map(|(path, _)| path)
        .collect();
    assert!(
        missing.is_empty(),
        "fields the sample leaves unset: {missing:?}"
    );

    let mut clusterwide = document;
    clusterwide["kind"] = json!("ClusterwideNetworkPolicy");
    clusterwide["metadata"] = json!({"name": "everything"});
    let typed: ClusterwideNetworkPolicy = serde_json::from_value(clusterwide.clone()).unwrap();
    assert_eq!(serde_json::to_value(&typed).unwrap(), clusterwide);
    let policies = parse_manifests(&json_text(&clusterwide)).expect("the parser accepts it");
    assert_eq!(policies[0].id.namespace, None);
}

/// A rule of the minimal policy with `value` at `field` of its path, as the parser names it.
fn with_unsupported(path: &[&str], value: Value) -> Value {
    let mut document = json!({
        "apiVersion": "palisade.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": "p", "namespace": "shop"},
        "spec": {
            "endpointSelector": {},
            "ingress": [{"fromCIDRSet": [{"cidr": "10.0.0.0/8"}],
                         "toPorts": [{"ports": [{"port": "80", "protocol": "TCP"}],
                                      "rules": {"http": [{"headerMatches": [{"name": "X"}]}]}}]}],
            "egress": [{"toEntities": ["world"]}],
        },
    });
    let mut at = &mut document;
    for step in &path[..path.len() - 1] {
        at = match step.parse::<usize>() {
            Ok(i) => &mut at[i],
            Err(_) => &mut at[*step],
        };
    }
    at[path[path.len() - 1]] = value;
    document
}

#[test]
fn unsupported_cilium_fields_reach_the_parser_and_are_rejected_by_name() {
    let fields: [&[&str]; 18] = [
        &["spec", "nodeSelector"],
        &["spec", "ingress", "0", "fromRequires"],
        &["spec", "ingress", "0", "fromGroups"],
        &["spec", "ingress", "0", "fromNodes"],
        &["spec", "ingress", "0", "authentication"],
        &["spec", "egress", "0", "toRequires"],
        &["spec", "egress", "0", "toServices"],
        &["spec", "egress", "0", "toGroups"],
        &["spec", "egress", "0", "toNodes"],
        &["spec", "egress", "0", "authentication"],
        &["spec", "ingress", "0", "fromCIDRSet", "0", "cidrGroupRef"],
        &[
            "spec",
            "ingress",
            "0",
            "fromCIDRSet",
            "0",
            "cidrGroupSelector",
        ],
        &["spec", "ingress", "0", "toPorts", "0", "terminatingTLS"],
        &["spec", "ingress", "0", "toPorts", "0", "originatingTLS"],
        &["spec", "ingress", "0", "toPorts", "0", "serverNames"],
        &["spec", "ingress", "0", "toPorts", "0", "listener"],
        &[
            "spec",
            "ingress",
            "0",
            "toPorts",
            "0",
            "rules",
            "http",
            "0",
            "headerMatches",
            "0",
            "mismatch",
        ],
        &[
            "spec",
            "ingress",
            "0",
            "toPorts",
            "0",
            "rules",
            "http",
            "0",
            "headerMatches",
            "0",
            "secret",
        ],
    ];
    let baseline = with_unsupported(&["spec", "description"], json!("fine"));
    parse_manifests(&json_text(&baseline)).expect("the baseline is valid");
    for path in fields {
        let document = with_unsupported(path, json!({"anything": ["Cilium", "allows"]}));
        let typed: NetworkPolicy = serde_json::from_value(document.clone()).unwrap();
        let serialized = serde_json::to_value(&typed).unwrap();
        assert_eq!(serialized, document, "{path:?} is lost by the types");
        let err = parse_manifests(&json_text(&serialized)).expect_err("rejected");
        let field = path
            .iter()
            .fold(String::new(), |acc, step| match step.parse::<usize>() {
                Ok(i) => format!("{acc}[{i}]"),
                Err(_) if acc.is_empty() => (*step).to_string(),
                Err(_) => format!("{acc}.{step}"),
            });
        assert_eq!(err.field.as_deref(), Some(field.as_str()), "{err}");
        assert!(err.reason.contains("not supported by palisade"), "{err}");
    }
}

/// A value of `schema`'s shape with only its required parts, for probing the parser.
fn skeleton(schema: &Value) -> Value {
    if schema.get("x-kubernetes-int-or-string") == Some(&Value::Bool(true)) {
        return json!("x");
    }
    match schema.get("type").and_then(Value::as_str) {
        Some("string") => json!("x"),
        Some("integer" | "number") => json!(0),
        Some("boolean") => json!(false),
        Some("array") => json!([]),
        _ => {
            let mut object = serde_json::Map::new();
            for name in schema
                .get("required")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                let name = name.as_str().unwrap();
                object.insert(name.to_string(), skeleton(&schema["properties"][name]));
            }
            Value::Object(object)
        }
    }
}

/// One step of a path through a schema.
#[derive(Clone, Debug)]
enum Step {
    Key(String),
    Item,
}

/// Every object node of a schema that lists properties, by path.
fn object_nodes<'a>(schema: &'a Value, path: &[Step], out: &mut Vec<(Vec<Step>, &'a Value)>) {
    if let Some(properties) = schema.get("properties").and_then(Value::as_object) {
        out.push((path.to_vec(), schema));
        for (name, sub) in properties {
            let mut sub_path = path.to_vec();
            sub_path.push(Step::Key(name.clone()));
            object_nodes(sub, &sub_path, out);
        }
    }
    if let Some(items) = schema.get("items") {
        let mut sub_path = path.to_vec();
        sub_path.push(Step::Item);
        object_nodes(items, &sub_path, out);
    }
}

/// A document that is the skeleton of every node along `path`, with `leaf` at its end.
fn probe_document(schema: &Value, path: &[Step], leaf: Value) -> Value {
    match path.split_first() {
        None => leaf,
        Some((Step::Item, rest)) => json!([probe_document(&schema["items"], rest, leaf)]),
        Some((Step::Key(name), rest)) => {
            let mut object = skeleton(schema);
            object[name.as_str()] = probe_document(&schema["properties"][name], rest, leaf);
            object
        }
    }
}

fn parser_path(path: &[Step]) -> String {
    path.iter().fold(String::new(), |acc, step| match step {
        Step::Item => format!("{acc}[0]"),
        Step::Key(k) if acc.is_empty() => k.clone(),
        Step::Key(k) => format!("{acc}.{k}"),
    })
}

/// The field names serde lists after "expected" in an unknown-field error.
fn expected_fields(reason: &str) -> BTreeSet<String> {
    let Some((_, list)) = reason.split_once("expected") else {
        return BTreeSet::new();
    };
    list.split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_string)
        .collect()
}

/// For every object of the schema, the parser's unknown-field error at that object lists the
/// fields it reads there: they must be the schema's properties, neither more nor fewer.
fn assert_schema_matches_parser(kind: &str, crd: &CustomResourceDefinition, metadata: &Value) {
    let schema = openapi_schema(crd);
    let mut nodes = Vec::new();
    object_nodes(&schema, &[], &mut nodes);
    let mut probed = 0;
    for (path, node) in nodes {
        let rendered = parser_path(&path);
        // The parser reads `status` and Cilium's rule `labels` as anything and ignores them.
        if rendered == "status"
            || rendered.starts_with("status.")
            || rendered.ends_with("labels[0]")
        {
            continue;
        }
        let mut leaf = skeleton(node);
        leaf["zzzUnknown"] = json!(1);
        let mut document = probe_document(&schema, &path, leaf);
        document["apiVersion"] = json!("palisade.io/v1");
        document["kind"] = json!(kind);
        document["metadata"] = metadata.clone();
        if document.get("spec").is_none() && document.get("specs").is_none() {
            document["spec"] = json!({"endpointSelector": {}});
        }
        let err: ManifestError = parse_manifests(&json_text(&document)).expect_err(&format!(
            "{kind}: the parser accepts an unknown field at {rendered}"
        ));
        let at = if rendered.is_empty() {
            "zzzUnknown".to_string()
        } else {
            format!("{rendered}.zzzUnknown")
        };
        assert_eq!(err.field.as_deref(), Some(at.as_str()), "{kind}: {err}");
        assert!(
            err.reason.starts_with("unknown field `zzzUnknown`"),
            "{kind}: {err}"
        );
        let mut in_schema: BTreeSet<String> = node["properties"]
            .as_object()
            .unwrap()
            .keys()
            .cloned()
            .collect();
        if path.is_empty() {
            // The API server's own fields, which every schema leaves out.
            in_schema.extend(["apiVersion", "kind", "metadata"].map(String::from));
        }
        assert_eq!(
            in_schema,
            expected_fields(&err.reason),
            "{kind}: the schema's properties at `{rendered}` (left) are not the parser's fields (right)"
        );
        probed += 1;
    }
    assert!(probed >= 15, "{kind}: only {probed} objects probed");
}

#[test]
fn the_schema_has_exactly_the_fields_the_parser_reads_at_every_level() {
    assert_schema_matches_parser(
        "NetworkPolicy",
        &NetworkPolicy::crd(),
        &json!({"name": "p", "namespace": "shop"}),
    );
    assert_schema_matches_parser(
        "ClusterwideNetworkPolicy",
        &ClusterwideNetworkPolicy::crd(),
        &json!({"name": "p"}),
    );
}

#[test]
fn both_policy_kinds_share_one_rule_schema() {
    let namespaced = openapi_schema(&NetworkPolicy::crd());
    let clusterwide = openapi_schema(&ClusterwideNetworkPolicy::crd());
    for field in ["spec", "specs", "status"] {
        assert_eq!(
            namespaced["properties"][field],
            clusterwide["properties"][field]
        );
    }
    let rule = &namespaced["properties"]["spec"];
    let mut in_specs = namespaced["properties"]["specs"]["items"].clone();
    let mut single = rule.clone();
    for schema in [&mut in_specs, &mut single] {
        let object = schema.as_object_mut().unwrap();
        object.remove("description");
        object.remove("nullable");
    }
    assert_eq!(single, in_specs);
    let properties = &rule["properties"];
    assert_eq!(
        properties["ingress"]["items"],
        properties["ingressDeny"]["items"]
    );
    assert_eq!(
        properties["egress"]["items"],
        properties["egressDeny"]["items"]
    );
}

/// The API server's rules for a structural schema (and the few other things it refuses),
/// checked the way apiextensions-apiserver validates a CRD.
fn structural_problems(schema: &Value, path: &str, problems: &mut Vec<String>) {
    let Some(object) = schema.as_object() else {
        problems.push(format!("{path}: not an object"));
        return;
    };
    for key in [
        "$ref",
        "$schema",
        "definitions",
        "$defs",
        "oneOf",
        "anyOf",
        "allOf",
        "not",
        "uniqueItems",
        "default",
    ] {
        if object.contains_key(key) {
            problems.push(format!("{path}: `{key}` is not allowed here"));
        }
    }
    let int_or_string = object.get("x-kubernetes-int-or-string") == Some(&Value::Bool(true));
    let preserve = is_opaque(schema);
    match object.get("type") {
        None if int_or_string || preserve => {}
        None => problems.push(format!("{path}: no type")),
        Some(_) if int_or_string => {
            problems.push(format!("{path}: an int-or-string has no type"));
        }
        Some(Value::String(t))
            if ["object", "array", "string", "integer", "number", "boolean"]
                .contains(&t.as_str()) => {}
        Some(other) => problems.push(format!("{path}: type {other} is not a single type")),
    }
    let properties = object.get("properties").and_then(Value::as_object);
    let additional = object.get("additionalProperties");
    if properties.is_some() && additional.is_some() {
        problems.push(format!("{path}: both properties and additionalProperties"));
    }
    if additional.is_some_and(|a| !a.is_object()) {
        problems.push(format!("{path}: additionalProperties must be a schema"));
    }
    match object.get("type").and_then(Value::as_str) {
        Some("array") if !object.contains_key("items") => {
            problems.push(format!("{path}: an array without items"));
        }
        Some("object") if properties.is_none() && additional.is_none() && !preserve => {
            problems.push(format!(
                "{path}: an object with no properties prunes everything"
            ));
        }
        _ => {}
    }
    let required: Vec<&str> = object
        .get("required")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    for name in &required {
        if !properties.is_some_and(|p| p.contains_key(*name)) {
            problems.push(format!("{path}: required `{name}` is not a property"));
        }
    }
    if object.get("x-kubernetes-list-type") == Some(&json!("map")) {
        let item_required: Vec<&Value> = object["items"]
            .get("required")
            .and_then(Value::as_array)
            .map(|r| r.iter().collect())
            .unwrap_or_default();
        for key in object
            .get("x-kubernetes-list-map-keys")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            if !item_required.contains(&key) {
                problems.push(format!("{path}: list-map key {key} is not required"));
            }
        }
    }
    for (name, sub) in properties.into_iter().flatten() {
        structural_problems(sub, &format!("{path}.{name}"), problems);
    }
    if let Some(items) = object.get("items") {
        structural_problems(items, &format!("{path}[]"), problems);
    }
    if let Some(additional) = additional.filter(|a| a.is_object()) {
        structural_problems(additional, &format!("{path}{{}}"), problems);
    }
}

#[test]
fn every_schema_is_structural() {
    for crd in crds() {
        let name = crd.metadata.name.clone().unwrap();
        let schema = openapi_schema(&crd);
        let mut problems = Vec::new();
        structural_problems(&schema, &name, &mut problems);
        if schema.get("type") != Some(&json!("object")) {
            problems.push(format!("{name}: the root is not an object"));
        }
        if schema["properties"].get("metadata").is_some() {
            problems.push(format!("{name}: the schema constrains metadata"));
        }
        assert!(problems.is_empty(), "{}", problems.join("\n"));
    }
}

#[test]
fn generated_crd_files_are_up_to_date() {
    let dir = workspace_root().join(CRD_DIR);
    let files = crd_files().expect("the CRDs render");
    let mut stale = Vec::new();
    for file in &files {
        let path = dir.join(&file.file_name);
        match std::fs::read_to_string(&path) {
            Ok(text) if text == file.contents => {}
            Ok(_) => stale.push(format!("{CRD_DIR}/{} is stale", file.file_name)),
            Err(e) => stale.push(format!("{CRD_DIR}/{} is missing ({e})", file.file_name)),
        }
    }
    for entry in std::fs::read_dir(&dir).expect("policies/crds exists") {
        let name = entry.unwrap().file_name().to_string_lossy().into_owned();
        if !files.iter().any(|f| f.file_name == name) {
            stale.push(format!("{CRD_DIR}/{name} is not generated from crd.rs"));
        }
    }
    assert!(
        stale.is_empty(),
        "{}; run `{GENERATE_COMMAND}`",
        stale.join("; ")
    );
}

#[test]
fn each_crd_fits_a_plain_kubectl_apply() {
    // A client-side apply keeps the whole object in the last-applied-configuration
    // annotation, and the API server refuses more than 256 KiB of annotations.
    for crd in crds() {
        let size = serde_json::to_vec(&crd).unwrap().len();
        assert!(
            size < 192 * 1024,
            "{:?} is {size} bytes of JSON: too close to the annotation limit",
            crd.metadata.name
        );
    }
}

#[test]
fn resource_names_keep_clear_of_networking_k8s_io() {
    let names: BTreeMap<String, (String, String, Vec<String>, String)> = crds()
        .into_iter()
        .map(|crd| {
            let n = crd.spec.names;
            (
                n.kind.clone(),
                (
                    n.plural,
                    n.singular.unwrap_or_default(),
                    n.short_names.unwrap_or_default(),
                    crd.spec.scope,
                ),
            )
        })
        .collect();
    let expect = |plural: &str, singular: &str, short: &[&str], scope: &str| {
        (
            plural.to_string(),
            singular.to_string(),
            short.iter().map(|s| (*s).to_string()).collect::<Vec<_>>(),
            scope.to_string(),
        )
    };
    assert_eq!(
        names["NetworkPolicy"],
        expect(
            "palisadenetworkpolicies",
            "palisadenetworkpolicy",
            &["pnp", "palisadenp"],
            "Namespaced"
        )
    );
    assert_eq!(
        names["ClusterwideNetworkPolicy"],
        expect(
            "palisadeclusterwidenetworkpolicies",
            "palisadeclusterwidenetworkpolicy",
            &["pcnp", "palisadecnp"],
            "Cluster"
        )
    );
    assert_eq!(
        names["PalisadeIdentity"],
        expect(
            "palisadeidentities",
            "palisadeidentity",
            &["palisadeid"],
            "Cluster"
        )
    );
    for crd in crds() {
        let version = &crd.spec.versions[0];
        assert_eq!(crd.spec.group, "palisade.io");
        assert_eq!(version.name, "v1");
        assert!(version.served && version.storage);
        let is_policy = crd.spec.names.kind != "PalisadeIdentity";
        assert_eq!(
            version
                .subresources
                .as_ref()
                .and_then(|s| s.status.as_ref())
                .is_some(),
            is_policy,
            "{:?}: a status subresource for the policies only",
            crd.metadata.name
        );
    }
}

/// `kubectl`, which must be on PATH: these checks would be worthless skipped.
fn kubectl() -> Command {
    let found = std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join("kubectl").is_file()));
    assert!(
        found,
        "kubectl is not on PATH; this test evaluates the printer columns with it (install kubectl)"
    );
    Command::new("kubectl")
}

/// Evaluates each printer column's JSONPath on `object` with kubectl's own JSONPath engine,
/// the one the API server prints tables with (`kubectl annotate --local` never contacts a
/// server).
fn columns_of(crd: &CustomResourceDefinition, object: &Value) -> BTreeMap<String, String> {
    let dir = std::env::temp_dir().join(format!("palisade-columns-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join(format!("{}.json", crd.spec.names.plural));
    std::fs::write(&file, json_text(object)).unwrap();
    let columns = crd.spec.versions[0]
        .additional_printer_columns
        .clone()
        .unwrap_or_default();
    let mut out = BTreeMap::new();
    for column in columns {
        let output = kubectl()
            .args(["annotate", "--local", "-f"])
            .arg(&file)
            .args(["palisade.io/probe=1", "-o"])
            .arg(format!("jsonpath={{{}}}", column.json_path))
            .output()
            .expect("kubectl runs");
        assert!(
            output.status.success(),
            "kubectl rejects the column {} ({}): {}",
            column.name,
            column.json_path,
            String::from_utf8_lossy(&output.stderr)
        );
        out.insert(
            column.name.to_uppercase(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
        );
    }
    std::fs::remove_dir_all(&dir).ok();
    out
}

#[test]
fn printer_columns_show_validity_reason_and_age() {
    let mut policy = as_served(&yaml_documents(EVERYTHING).unwrap().remove(0));
    policy["status"]["conditions"] = json!([
        {"type": "Other", "status": "False", "reason": "Unrelated", "message": "x",
         "lastTransitionTime": "2025-06-01T12:00:01Z"},
        {"type": "Valid", "status": "False", "reason": "InvalidField",
         "message": "spec.ingress[0].fromCIDR[0]: invalid CIDR", "lastTransitionTime": "2025-06-01T12:00:01Z"},
    ]);
    let columns = columns_of(&NetworkPolicy::crd(), &policy);
    assert_eq!(
        columns,
        BTreeMap::from([
            ("VALID".to_string(), "False".to_string()),
            ("REASON".to_string(), "InvalidField".to_string()),
            (
                "MESSAGE".to_string(),
                "spec.ingress[0].fromCIDR[0]: invalid CIDR".to_string()
            ),
            ("AGE".to_string(), "2025-06-01T12:00:00Z".to_string()),
        ])
    );
    let mut clusterwide = policy;
    clusterwide["kind"] = json!("ClusterwideNetworkPolicy");
    clusterwide["metadata"]
        .as_object_mut()
        .unwrap()
        .remove("namespace");
    assert_eq!(
        columns_of(&ClusterwideNetworkPolicy::crd(), &clusterwide)["VALID"],
        "False"
    );

    let labels = workload_identity_labels(
        "shop",
        &Labels::from([("team".to_string(), "payments".to_string())]),
        &Labels::from([("app".to_string(), "web".to_string())]),
    );
    let mut identity =
        serde_json::to_value(PalisadeIdentity::for_identity(Identity(256), labels)).unwrap();
    identity["metadata"]["creationTimestamp"] = json!("2025-06-01T12:00:00Z");
    assert_eq!(
        columns_of(&PalisadeIdentity::crd(), &identity),
        BTreeMap::from([
            ("NAMESPACE".to_string(), "shop".to_string()),
            ("AGE".to_string(), "2025-06-01T12:00:00Z".to_string()),
        ])
    );
}

#[test]
fn an_identity_object_is_named_by_its_number_and_holds_its_labels() {
    let labels = workload_identity_labels(
        "shop",
        &Labels::from([(
            "kubernetes.io/metadata.name".to_string(),
            "shop".to_string(),
        )]),
        &Labels::from([
            ("app".to_string(), "web".to_string()),
            ("pod-template-hash".to_string(), "5d8f7c".to_string()),
        ]),
    );
    let object = PalisadeIdentity::for_identity(Identity(4711), labels.clone());
    assert_eq!(object.metadata.name.as_deref(), Some("4711"));
    assert_eq!(object.identity(), Ok(Identity(4711)));
    let value = serde_json::to_value(&object).unwrap();
    assert_eq!(
        value,
        json!({
            "apiVersion": "palisade.io/v1",
            "kind": "PalisadeIdentity",
            "metadata": {"name": "4711"},
            "spec": {"labels": {
                "app": "web",
                "io.cilium.k8s.namespace.labels.kubernetes.io/metadata.name": "shop",
                "io.kubernetes.pod.namespace": "shop",
            }},
        })
    );
    let back: PalisadeIdentity = serde_json::from_value(value).unwrap();
    assert_eq!(back, object);
    assert_eq!(back.spec, PalisadeIdentitySpec { labels });
}

#[test]
fn an_identity_name_must_be_a_canonical_number() {
    let named = |name: Option<&str>| PalisadeIdentity {
        metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
            name: name.map(str::to_string),
            ..Default::default()
        },
        spec: PalisadeIdentitySpec::default(),
    };
    assert_eq!(named(Some("256")).identity(), Ok(Identity(256)));
    assert_eq!(named(Some("16777215")).identity(), Ok(Identity(16_777_215)));
    for bad in ["", "0256", "+256", "-1", "2a", "4294967296", "web"] {
        let err = named(Some(bad)).identity().expect_err(bad);
        assert!(err.to_string().contains(&format!("{bad:?}")), "{err}");
    }
    // Reserved and CIDR identities are never PalisadeIdentity objects.
    for out_of_scope in ["0", "2", "255", "16777216"] {
        let err = named(Some(out_of_scope))
            .identity()
            .expect_err(out_of_scope);
        assert!(
            err.to_string()
                .contains("outside the label-derived identities"),
            "{err}"
        );
    }
    assert!(named(None).identity().is_err());
}

/// Fields the types share between directions, which the parser refuses where Cilium does:
/// they keep their value through the types and are rejected by name.
#[test]
fn dns_rules_on_ingress_and_to_fqdns_in_egress_deny_are_rejected_by_name() {
    let cases = [
        (
            json!({"ingress": [{"toPorts": [{"ports": [{"port": "53", "protocol": "UDP"}],
                                            "rules": {"dns": [{"matchPattern": "*"}]}}]}]}),
            "spec.ingress[0].toPorts[0].rules.dns",
            "rules.dns on ingress",
        ),
        (
            json!({"egressDeny": [{"toFQDNs": [{"matchName": "a.example.com"}]}]}),
            "spec.egressDeny[0].toFQDNs",
            "toFQDNs in egressDeny",
        ),
    ];
    for (rules, field, reason) in cases {
        let mut document = json!({
            "apiVersion": "palisade.io/v1",
            "kind": "NetworkPolicy",
            "metadata": {"name": "p", "namespace": "shop"},
            "spec": {"endpointSelector": {}},
        });
        for (k, v) in rules.as_object().unwrap() {
            document["spec"][k] = v.clone();
        }
        let typed: NetworkPolicy = serde_json::from_value(document.clone()).unwrap();
        let serialized = serde_json::to_value(&typed).unwrap();
        assert_eq!(serialized, document, "{field} is lost by the types");
        let err = parse_manifests(&json_text(&serialized)).expect_err("rejected");
        assert_eq!(err.field.as_deref(), Some(field), "{err}");
        assert!(err.reason.contains(reason), "{err}");
    }
}
