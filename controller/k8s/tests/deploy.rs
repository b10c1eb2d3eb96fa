//! The manifests an operator applies (policies/deploy/ and policies/crds/): each document is a
//! Kubernetes object its typed form holds whole, the RBAC grants exactly
//! `palisade_k8s::rbac::AGENT_ACCESS`, and the DaemonSet's parts refer to each other correctly.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{ConfigMap, Container, Namespace, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use palisade_k8s::crd::crds;
use palisade_k8s::rbac::{AGENT_ACCESS, AGENT_NAMESPACE, AGENT_SERVICE_ACCOUNT, Scope};
use serde::Deserialize as _;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

const IMAGE: &str = "ghcr.io/palisade/palisade:0.1.0";

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Every document of every YAML file under the two directories, with its origin.
fn documents() -> Vec<(String, Value)> {
    let mut out = Vec::new();
    for dir in ["policies/deploy", "policies/crds"] {
        let mut files: Vec<PathBuf> = std::fs::read_dir(workspace_root().join(dir))
            .unwrap_or_else(|e| panic!("listing {dir}: {e}"))
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
            .collect();
        files.sort();
        assert!(!files.is_empty(), "no YAML in {dir}");
        for file in files {
            let text = std::fs::read_to_string(&file).unwrap();
            let name = format!("{dir}/{}", file.file_name().unwrap().to_string_lossy());
            for (i, document) in serde_norway::Deserializer::from_str(&text).enumerate() {
                let value = Value::deserialize(document)
                    .unwrap_or_else(|e| panic!("{name} document {}: not YAML: {e}", i + 1));
                if !value.is_null() {
                    out.push((format!("{name} document {}", i + 1), value));
                }
            }
        }
    }
    out
}

/// The document through `T` and back: a field `T` does not know is lost on the way.
fn through<T: DeserializeOwned + Serialize>(value: &Value) -> Result<Value, String> {
    let typed: T = serde_json::from_value(value.clone()).map_err(|e| e.to_string())?;
    serde_json::to_value(&typed).map_err(|e| e.to_string())
}

fn typed_round_trip(value: &Value) -> Result<Value, String> {
    let api_version = value.get("apiVersion").and_then(Value::as_str);
    let kind = value.get("kind").and_then(Value::as_str);
    match (api_version, kind) {
        (Some("v1"), Some("Namespace")) => through::<Namespace>(value),
        (Some("v1"), Some("ServiceAccount")) => through::<ServiceAccount>(value),
        (Some("v1"), Some("ConfigMap")) => through::<ConfigMap>(value),
        (Some("rbac.authorization.k8s.io/v1"), Some("ClusterRole")) => {
            through::<ClusterRole>(value)
        }
        (Some("rbac.authorization.k8s.io/v1"), Some("ClusterRoleBinding")) => {
            through::<ClusterRoleBinding>(value)
        }
        (Some("rbac.authorization.k8s.io/v1"), Some("Role")) => through::<Role>(value),
        (Some("rbac.authorization.k8s.io/v1"), Some("RoleBinding")) => {
            through::<RoleBinding>(value)
        }
        (Some("apps/v1"), Some("DaemonSet")) => through::<DaemonSet>(value),
        (Some("apiextensions.k8s.io/v1"), Some("CustomResourceDefinition")) => {
            through::<CustomResourceDefinition>(value)
        }
        other => Err(format!("no Kubernetes type is mapped for {other:?}")),
    }
}

/// The first key path where two values differ.
fn first_difference(before: &Value, after: &Value, path: &str) -> Option<String> {
    match (before, after) {
        (Value::Object(old), Value::Object(new)) => old
            .iter()
            .find_map(|(key, was)| match new.get(key) {
                Some(is) => first_difference(was, is, &format!("{path}.{key}")),
                None => Some(format!("{path}.{key} (unknown to the type)")),
            })
            .or_else(|| {
                new.keys()
                    .find(|key| !old.contains_key(*key))
                    .map(|key| format!("{path}.{key} (added by the type)"))
            }),
        (Value::Array(old), Value::Array(new)) if old.len() == new.len() => old
            .iter()
            .zip(new)
            .enumerate()
            .find_map(|(i, (was, is))| first_difference(was, is, &format!("{path}[{i}]"))),
        _ if before == after => None,
        _ => Some(format!("{path}: {before} became {after}")),
    }
}

#[test]
fn every_document_is_an_object_its_kubernetes_type_holds_whole() {
    let mut problems = Vec::new();
    let documents = documents();
    for (origin, value) in &documents {
        match typed_round_trip(value) {
            Ok(back) => {
                if let Some(diff) = first_difference(value, &back, "") {
                    problems.push(format!("{origin}: {diff}"));
                }
            }
            Err(e) => problems.push(format!("{origin}: {e}")),
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    let crds_found = documents
        .iter()
        .filter(|(_, v)| v["kind"] == "CustomResourceDefinition")
        .count();
    assert_eq!(crds_found, crds().len());
}

/// The single object of `kind`.
fn one<T: DeserializeOwned>(kind: &str) -> T {
    let mut found: Vec<Value> = documents()
        .into_iter()
        .filter(|(_, v)| v["kind"] == kind)
        .map(|(_, v)| v)
        .collect();
    assert_eq!(found.len(), 1, "expected exactly one {kind}");
    serde_json::from_value(found.remove(0)).unwrap()
}

/// (group, resource, verb, scope) of every grant.
type Grant = (String, String, String, Scope);

fn grants_of(rules: &[PolicyRule], scope: Scope, problems: &mut Vec<String>) -> BTreeSet<Grant> {
    let mut out = BTreeSet::new();
    for rule in rules {
        if rule.resource_names.is_some() || rule.non_resource_urls.is_some() {
            problems.push(format!(
                "{rule:?}: resourceNames/nonResourceURLs are not expected"
            ));
        }
        let groups = rule.api_groups.clone().unwrap_or_default();
        let resources = rule.resources.clone().unwrap_or_default();
        for group in &groups {
            for resource in &resources {
                for verb in &rule.verbs {
                    if [group, resource, verb].iter().any(|s| s.contains('*')) {
                        problems.push(format!("wildcard in {rule:?}"));
                    }
                    out.insert((group.clone(), resource.clone(), verb.clone(), scope));
                }
            }
        }
    }
    out
}

#[test]
fn rbac_grants_exactly_what_the_agent_needs() {
    let mut problems = Vec::new();
    let cluster_role: ClusterRole = one("ClusterRole");
    let role: Role = one("Role");
    assert!(cluster_role.aggregation_rule.is_none());
    assert_eq!(role.metadata.namespace.as_deref(), Some(AGENT_NAMESPACE));
    let mut granted = grants_of(
        cluster_role.rules.as_deref().unwrap_or_default(),
        Scope::Cluster,
        &mut problems,
    );
    granted.extend(grants_of(
        role.rules.as_deref().unwrap_or_default(),
        Scope::AgentNamespace,
        &mut problems,
    ));
    let needed: BTreeSet<Grant> = AGENT_ACCESS
        .iter()
        .flat_map(|a| {
            a.verbs.iter().map(|verb| {
                (
                    a.group.to_string(),
                    a.resource.to_string(),
                    (*verb).to_string(),
                    a.scope,
                )
            })
        })
        .collect();
    let missing: Vec<&Grant> = needed.difference(&granted).collect();
    let extra: Vec<&Grant> = granted.difference(&needed).collect();
    assert!(
        missing.is_empty() && extra.is_empty() && problems.is_empty(),
        "missing from policies/deploy: {missing:?}\nnot in rbac::AGENT_ACCESS: {extra:?}\n{}",
        problems.join("\n")
    );

    // Both roles are bound to the agent's ServiceAccount, and only to it.
    let account: ServiceAccount = one("ServiceAccount");
    assert_eq!(
        account.metadata.name.as_deref(),
        Some(AGENT_SERVICE_ACCOUNT)
    );
    assert_eq!(account.metadata.namespace.as_deref(), Some(AGENT_NAMESPACE));
    let cluster_binding: ClusterRoleBinding = one("ClusterRoleBinding");
    let binding: RoleBinding = one("RoleBinding");
    assert_eq!(binding.metadata.namespace.as_deref(), Some(AGENT_NAMESPACE));
    for (role_ref, subjects, kind, name) in [
        (
            &cluster_binding.role_ref,
            &cluster_binding.subjects,
            "ClusterRole",
            &cluster_role.metadata.name,
        ),
        (
            &binding.role_ref,
            &binding.subjects,
            "Role",
            &role.metadata.name,
        ),
    ] {
        assert_eq!(role_ref.kind, kind);
        assert_eq!(Some(&role_ref.name), name.as_ref());
        assert_eq!(role_ref.api_group, "rbac.authorization.k8s.io");
        let subjects = subjects.as_deref().unwrap_or_default();
        assert_eq!(subjects.len(), 1, "{kind} binding");
        assert_eq!(subjects[0].kind, "ServiceAccount");
        assert_eq!(subjects[0].name, AGENT_SERVICE_ACCOUNT);
        assert_eq!(subjects[0].namespace.as_deref(), Some(AGENT_NAMESPACE));
    }
}

/// `$(NAME)` references in a string, as the kubelet expands them.
fn references(text: &str) -> Vec<&str> {
    text.split("$(")
        .skip(1)
        .filter_map(|rest| rest.split_once(')').map(|(name, _)| name))
        .collect()
}

fn agent_container(ds: &DaemonSet) -> Container {
    let pod = ds.spec.as_ref().unwrap().template.spec.clone().unwrap();
    let mut agents: Vec<Container> = pod
        .containers
        .into_iter()
        .filter(|c| c.name == "agent")
        .collect();
    assert_eq!(agents.len(), 1, "one container named agent");
    agents.remove(0)
}

#[test]
fn the_daemonset_runs_the_agent_in_kubernetes_mode_on_every_node() {
    let ds: DaemonSet = one("DaemonSet");
    assert_eq!(ds.metadata.namespace.as_deref(), Some(AGENT_NAMESPACE));
    let namespace: Namespace = one("Namespace");
    assert_eq!(namespace.metadata.name.as_deref(), Some(AGENT_NAMESPACE));
    let spec = ds.spec.as_ref().unwrap();
    let selector = spec.selector.match_labels.clone().unwrap_or_default();
    let labels = spec
        .template
        .metadata
        .as_ref()
        .and_then(|m| m.labels.clone())
        .unwrap_or_default();
    assert!(
        !selector.is_empty() && selector.iter().all(|(k, v)| labels.get(k) == Some(v)),
        "the selector matches the pod template"
    );
    let strategy = spec.update_strategy.as_ref().unwrap();
    assert_eq!(strategy.type_.as_deref(), Some("RollingUpdate"));
    let pod = spec.template.spec.as_ref().unwrap();
    assert_eq!(pod.host_network, Some(true));
    assert_eq!(pod.dns_policy.as_deref(), Some("ClusterFirstWithHostNet"));
    assert_eq!(
        pod.priority_class_name.as_deref(),
        Some("system-node-critical")
    );
    assert_eq!(
        pod.service_account_name.as_deref(),
        Some(AGENT_SERVICE_ACCOUNT)
    );
    let tolerations = pod.tolerations.as_deref().unwrap_or_default();
    assert!(
        tolerations
            .iter()
            .any(|t| t.operator.as_deref() == Some("Exists")
                && t.key.is_none()
                && t.effect.is_none()),
        "tolerates every taint"
    );

    let agent = agent_container(&ds);
    let command: Vec<String> = agent
        .command
        .clone()
        .unwrap_or_default()
        .into_iter()
        .chain(agent.args.clone().unwrap_or_default())
        .collect();
    assert_eq!(command[0], "/usr/local/bin/palisade-agent");
    let joined = command.join(" ");
    for expected in [
        " --kubernetes ",
        " --node-name $(NODE_NAME) ",
        " --k8s-namespace $(POD_NAMESPACE) ",
        " --cni-conf-dir /etc/cni/net.d ",
        " --metrics-addr 127.0.0.1:9962 ",
    ] {
        assert!(
            format!("{joined} ").contains(expected),
            "{expected} in {joined}"
        );
    }
    let node_name = agent
        .env
        .iter()
        .flatten()
        .find(|e| e.name == "NODE_NAME")
        .and_then(|e| e.value_from.as_ref())
        .and_then(|v| v.field_ref.as_ref())
        .map(|f| f.field_path.clone());
    assert_eq!(node_name.as_deref(), Some("spec.nodeName"));
    let namespace_of_pod = agent
        .env
        .iter()
        .flatten()
        .find(|e| e.name == "POD_NAMESPACE")
        .and_then(|e| e.value_from.as_ref())
        .and_then(|v| v.field_ref.as_ref())
        .map(|f| f.field_path.clone());
    assert_eq!(namespace_of_pod.as_deref(), Some("metadata.namespace"));

    // Each probe asks the agent's /healthz where --metrics-addr serves it.
    for (name, probe) in [
        ("startup", &agent.startup_probe),
        ("liveness", &agent.liveness_probe),
        ("readiness", &agent.readiness_probe),
    ] {
        let get = probe
            .as_ref()
            .and_then(|p| p.http_get.as_ref())
            .unwrap_or_else(|| panic!("an httpGet {name} probe"));
        let port = serde_json::to_value(&get.port).unwrap();
        assert_eq!(
            (get.host.as_deref(), port, get.path.as_deref()),
            (Some("127.0.0.1"), serde_json::json!(9962), Some("/healthz")),
            "{name} probe"
        );
    }

    let security = agent.security_context.as_ref().unwrap();
    assert_eq!(security.privileged, Some(true));
    for container in pod
        .containers
        .iter()
        .chain(pod.init_containers.iter().flatten())
    {
        assert_eq!(
            container.image.as_deref(),
            Some(IMAGE),
            "{}",
            container.name
        );
        let privileged = container
            .security_context
            .as_ref()
            .and_then(|s| s.privileged)
            .unwrap_or(false);
        for mount in container.volume_mounts.iter().flatten() {
            if mount.mount_propagation.as_deref() == Some("Bidirectional") {
                assert!(
                    privileged,
                    "{}: Bidirectional needs privileged",
                    container.name
                );
            }
        }
    }
    let init = pod.init_containers.as_deref().unwrap_or_default();
    assert_eq!(init.len(), 1);
    let install = init[0].args.clone().unwrap_or_default().join(" ");
    assert!(
        install.contains("/usr/local/bin/palisade-cni")
            && install.contains("/host/opt/cni/bin/palisade-cni"),
        "the init container installs palisade-cni: {install}"
    );
}

#[test]
fn the_daemonset_mounts_what_the_agent_and_the_plugin_share_with_the_node() {
    let ds: DaemonSet = one("DaemonSet");
    let pod = ds.spec.unwrap().template.spec.unwrap();
    let host_paths: BTreeMap<String, String> = pod
        .volumes
        .iter()
        .flatten()
        .filter_map(|v| Some((v.name.clone(), v.host_path.as_ref()?.path.clone())))
        .collect();
    assert_eq!(
        host_paths.len(),
        pod.volumes.as_ref().map_or(0, Vec::len),
        "hostPath volumes only"
    );
    let mut used = BTreeSet::new();
    let mut mounts = BTreeMap::new();
    for container in pod
        .containers
        .iter()
        .chain(pod.init_containers.iter().flatten())
    {
        for mount in container.volume_mounts.iter().flatten() {
            let host = host_paths
                .get(&mount.name)
                .unwrap_or_else(|| panic!("{}: no volume {}", container.name, mount.name));
            used.insert(mount.name.clone());
            mounts.insert(
                (container.name.clone(), host.clone()),
                (mount.mount_path.clone(), mount.mount_propagation.clone()),
            );
        }
    }
    let unused: Vec<&String> = host_paths.keys().filter(|n| !used.contains(*n)).collect();
    assert!(unused.is_empty(), "volumes nothing mounts: {unused:?}");
    let mount = |container: &str, host: &str| {
        mounts
            .get(&(container.to_string(), host.to_string()))
            .cloned()
            .unwrap_or_else(|| panic!("{container} does not mount {host}"))
    };
    assert_eq!(
        mount("agent", "/sys/fs/bpf"),
        ("/sys/fs/bpf".to_string(), Some("Bidirectional".to_string()))
    );
    // The same paths inside as outside: the plugin and the CLI on the node use them.
    for path in ["/run/palisade", "/var/lib/palisade", "/etc/cni/net.d"] {
        assert_eq!(mount("agent", path).0, path);
    }
    assert_eq!(
        mount("agent", "/run/netns"),
        (
            "/run/netns".to_string(),
            Some("HostToContainer".to_string())
        )
    );
    assert_eq!(mount("install-cni", "/opt/cni/bin").0, "/host/opt/cni/bin");
}

#[test]
fn every_setting_of_the_configmap_reaches_the_agent_and_every_reference_resolves() {
    let ds: DaemonSet = one("DaemonSet");
    let config: ConfigMap = one("ConfigMap");
    assert_eq!(config.metadata.namespace, ds.metadata.namespace);
    let config_name = config.metadata.name.clone().unwrap();
    let data = config.data.clone().unwrap_or_default();
    let agent = agent_container(&ds);
    let env = agent.env.clone().unwrap_or_default();
    let mut keys_used = BTreeSet::new();
    for var in &env {
        if let Some(key_ref) = var
            .value_from
            .as_ref()
            .and_then(|v| v.config_map_key_ref.as_ref())
        {
            assert_eq!(key_ref.name, config_name, "{}", var.name);
            assert!(
                data.contains_key(&key_ref.key),
                "{} reads key {} the ConfigMap does not have",
                var.name,
                key_ref.key
            );
            assert_ne!(
                key_ref.optional,
                Some(true),
                "{}: a setting is never optional",
                var.name
            );
            keys_used.insert(key_ref.key.clone());
        }
    }
    let unused: Vec<&String> = data.keys().filter(|k| !keys_used.contains(*k)).collect();
    assert!(
        unused.is_empty(),
        "ConfigMap keys the agent never gets: {unused:?}"
    );
    let args = agent.args.clone().unwrap_or_default();
    let defined: BTreeSet<&str> = env.iter().map(|e| e.name.as_str()).collect();
    let mut referenced = BTreeSet::new();
    for arg in agent.command.iter().flatten().chain(&args) {
        for name in references(arg) {
            assert!(
                defined.contains(name),
                "$({name}) is not in the agent's env"
            );
            referenced.insert(name);
        }
    }
    let unreferenced: Vec<&&str> = defined
        .iter()
        .filter(|n| !referenced.contains(*n))
        .collect();
    assert!(
        unreferenced.is_empty(),
        "env vars no argument uses: {unreferenced:?}"
    );
    // Each key is the flag it sets.
    for (i, arg) in args.iter().enumerate() {
        if let [name] = references(arg).as_slice() {
            let var = env.iter().find(|e| e.name == *name).unwrap();
            if let Some(key_ref) = var
                .value_from
                .as_ref()
                .and_then(|v| v.config_map_key_ref.as_ref())
            {
                assert_eq!(args[i - 1], format!("--{}", key_ref.key));
            }
        }
    }
}

#[test]
fn the_namespace_admits_privileged_pods() {
    let namespace: Namespace = one("Namespace");
    let labels = namespace.metadata.labels.unwrap_or_default();
    assert_eq!(
        labels
            .get("pod-security.kubernetes.io/enforce")
            .map(String::as_str),
        Some("privileged")
    );
}
