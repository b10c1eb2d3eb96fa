//! `cargo xtask bench kubernetes-scale`: the release agent in Kubernetes mode against the API
//! stand-in holding 5,000 pods in 500 namespaces on 50 nodes, 1,000 NetworkPolicies, with 100
//! of the pods on the agent's own node (attached through palisade-cni as kubelet attaches
//! them): initial sync, a restart's resync, memory, API requests, and the time from a policy
//! created in the API to the agent enforcing it.
#![expect(
    clippy::cast_precision_loss,
    reason = "counts of at most thousands, shown as milliseconds and MiB"
)]

use std::io::{Read as _, Write as _};
use std::net::Ipv4Addr;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use palisade_integration::Node;
use palisade_integration::kube_api::ApiServer;
use serde_json::{Value, json};

use crate::{build_binaries, workspace_root};

const NAMESPACES: usize = 500;
const PODS_PER_NAMESPACE: usize = 10;
const NODES: usize = 50;
const POLICIES_PER_NAMESPACE: usize = 2;
const LATENCY_SAMPLES: usize = 30;

/// The agent's own status, straight from its socket (no CLI process in the measurement).
fn agent_status(socket: &Path) -> Option<Value> {
    let mut s = UnixStream::connect(socket).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(b"GET /v1/status HTTP/1.1\r\nHost: palisade\r\nConnection: close\r\n\r\n")
        .ok()?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).ok()?;
    let text = String::from_utf8_lossy(&out);
    let (_, body) = text.split_once("\r\n\r\n")?;
    serde_json::from_str(body).ok()
}

fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    kib / 1024.0
}

fn policy(ns: usize, n: usize) -> Value {
    let app = format!("app-{}", n % 3);
    json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": format!("pol-{n}"), "namespace": format!("ns-{ns}")},
        "spec": {
            "podSelector": {"matchLabels": {"app": app}},
            "policyTypes": ["Ingress"],
            "ingress": [{
                "from": [
                    {"podSelector": {"matchLabels": {"app": format!("app-{}", (n + 1) % 3)}}},
                    {"namespaceSelector": {"matchLabels": {"team": format!("t{}", n % 10)}},
                     "podSelector": {"matchLabels": {"tier": "front"}}},
                    {"ipBlock": {"cidr": format!("172.{}.0.0/16", 16 + n % 16), "except": [format!("172.{}.1.0/24", 16 + n % 16)]}},
                ],
                "ports": [{"port": 8080 + u16::try_from(n % 20).unwrap_or(0), "protocol": "TCP"}],
            }],
        },
    })
}

/// Namespaces, nodes, pods on other nodes, policies; returns the pods for this node.
fn populate(api: &ApiServer) -> Vec<(String, String)> {
    api.upsert(&json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "palisade"}}));
    for node in 0..NODES {
        let octet = u8::try_from(node + 1).unwrap_or(1);
        api.upsert(&json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": format!("node-{node}")},
            "spec": {"podCIDR": format!("10.220.{octet}.0/24")},
            "status": {"addresses": [{"type": "InternalIP", "address": format!("192.168.100.{octet}")}]},
        }));
    }
    let mut local = Vec::new();
    for ns in 0..NAMESPACES {
        api.upsert(&json!({
            "apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": format!("ns-{ns}"), "labels": {"team": format!("t{}", ns % 10), "kubernetes.io/metadata.name": format!("ns-{ns}")}},
        }));
        for p in 0..PODS_PER_NAMESPACE {
            let i = ns * PODS_PER_NAMESPACE + p;
            let node = i % NODES;
            let name = format!("pod-{p}");
            let labels = json!({"app": format!("app-{}", p % 3), "tier": if p % 2 == 0 { "front" } else { "back" }, "pod-template-hash": format!("h{i}")});
            let octet = u8::try_from(node + 1).unwrap_or(1);
            let ip = Ipv4Addr::new(10, 220, octet, u8::try_from(2 + i / NODES).unwrap_or(0));
            let mut pod = json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": name, "namespace": format!("ns-{ns}"), "labels": labels},
                "spec": {"nodeName": format!("node-{node}"), "containers": [{"name": "c", "image": "x"}]},
                "status": {"phase": "Running", "podIP": ip.to_string()},
            });
            if node == 0 {
                // This node's pods get their address from palisade-cni.
                pod["status"] = json!({"phase": "Pending"});
                local.push((format!("ns-{ns}"), name));
            }
            api.upsert(&pod);
        }
        for k in 0..POLICIES_PER_NAMESPACE {
            api.upsert(&policy(ns, ns * POLICIES_PER_NAMESPACE + k));
        }
    }
    local
}

fn wait_for(what: &str, limit: Duration, mut ok: impl FnMut() -> bool) -> anyhow::Result<Duration> {
    let started = Instant::now();
    while !ok() {
        if started.elapsed() > limit {
            bail!("{what}: not after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    Ok(started.elapsed())
}

/// The `pct`th percentile of sorted samples (nearest rank).
fn percentile(sorted: &[f64], pct: usize) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[(sorted.len() - 1) * pct / 100]
}

pub fn run() -> anyhow::Result<()> {
    let bin_dir = build_binaries(true)?;
    // SAFETY: set before any thread that reads the environment is started.
    unsafe { std::env::set_var("PALISADE_BIN_DIR", &bin_dir) };
    let load_before = crate::bench::tools::machine_load();
    let api = ApiServer::start();
    for f in std::fs::read_dir(workspace_root().join("policies/crds"))? {
        let path = f?.path();
        let crd: Value = serde_norway::from_str(&std::fs::read_to_string(&path)?)
            .with_context(|| format!("{}", path.display()))?;
        api.create(&crd)
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    }
    let filled = Instant::now();
    let local = populate(&api);
    println!(
        "stand-in: {NAMESPACES} namespaces, {} pods on {NODES} nodes, {} policies (filled in {:.1} s)",
        NAMESPACES * PODS_PER_NAMESPACE,
        NAMESPACES * POLICIES_PER_NAMESPACE,
        filled.elapsed().as_secs_f64()
    );

    let mut node = Node::prepare("k8s-scale", &[]);
    let addr = api.listen_in_netns(&node.netns);
    let kubeconfig = node.dir.join("kubeconfig");
    ApiServer::write_kubeconfig(addr, &kubeconfig)?;
    let conf_dir = node.dir.join("net.d");
    let args: Vec<String> = [
        "--kubernetes",
        "--node-name",
        "node-0",
        "--kubeconfig",
        &kubeconfig.display().to_string(),
        "--cni-conf-dir",
        &conf_dir.display().to_string(),
        "--cni-ipam-dir",
        &node.dir.join("ipam").display().to_string(),
        "--pod-cidr",
        "10.221.0.0/24",
    ]
    .iter()
    .map(ToString::to_string)
    .collect();
    node.set_agent_args(&args);
    let socket = node.api.clone();
    let policies = NAMESPACES * POLICIES_PER_NAMESPACE;
    let synced = |min_remote: u64| {
        agent_status(&socket).is_some_and(|s| {
            s["policies"].as_u64() == Some(policies as u64)
                && s["ipcache_entries"].as_u64().unwrap_or(0) >= min_remote
        })
    };
    api.reset_requests();
    let started = Instant::now();
    node.start_agent();
    let remote_pods = (NAMESPACES * PODS_PER_NAMESPACE - local.len()) as u64;
    let cold = started.elapsed()
        + wait_for("the first sync", Duration::from_mins(10), || {
            synced(remote_pods)
        })?;
    let cold_requests = api.requests();
    let identities = api.list("palisade.io/v1", "PalisadeIdentity").len();
    let pid = node.agent_pid().context("the agent runs")?;
    let rss_synced = rss_mib(pid);

    // This node's pods, attached as kubelet attaches them.
    let list: Value = loop {
        if let Ok(t) = std::fs::read_to_string(conf_dir.join("05-palisade.conflist")) {
            break serde_json::from_str(&t)?;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut conf = list["plugins"][0].clone();
    conf["cniVersion"] = list["cniVersion"].clone();
    conf["name"] = list["name"].clone();
    let attach_started = Instant::now();
    for (i, (ns, name)) in local.iter().enumerate() {
        let c = node.container(&format!("p{i}"));
        let args = format!("IgnoreUnknown=1;K8S_POD_NAMESPACE={ns};K8S_POD_NAME={name}");
        let r = node.run_plugin(
            "palisade-cni",
            "ADD",
            Some(&c),
            "eth0",
            &conf,
            &[("CNI_ARGS", &args)],
        );
        if r.code != 0 {
            bail!("CNI ADD of {ns}/{name}: {}", r.stdout);
        }
    }
    let attach = attach_started.elapsed();
    let entries =
        agent_status(&socket).map_or(0, |s| s["policy_map_entries"].as_u64().unwrap_or(0));
    let rss_attached = rss_mib(pid);

    // A policy created in the API -> in force in the agent's maps.
    let mut latencies = Vec::new();
    for n in 0..LATENCY_SAMPLES {
        let ns = n % NAMESPACES;
        let mut p = policy(ns, 10_000 + n);
        p["metadata"]["name"] = json!(format!("new-{n}"));
        let want = (policies + n + 1) as u64;
        let t = Instant::now();
        api.create(&p)
            .map_err(|e| anyhow::anyhow!("creating a policy: {e}"))?;
        wait_for("a new policy in force", Duration::from_secs(30), || {
            agent_status(&socket).is_some_and(|s| s["policies"].as_u64() == Some(want))
        })?;
        latencies.push(t.elapsed().as_secs_f64() * 1000.0);
        std::thread::sleep(Duration::from_millis(50));
    }
    latencies.sort_by(f64::total_cmp);

    // Idle API load: what the agent asks of the API server with nothing changing.
    api.reset_requests();
    std::thread::sleep(Duration::from_secs(10));
    let idle = api.requests();

    // A restart: the identities exist, the state directory holds the cluster.
    node.stop_agent();
    api.reset_requests();
    let started = Instant::now();
    node.start_agent();
    let total = (policies + LATENCY_SAMPLES) as u64;
    let warm = started.elapsed()
        + wait_for("the resync", Duration::from_mins(10), || {
            agent_status(&socket).is_some_and(|s| s["policies"].as_u64() == Some(total))
        })?;
    let warm_requests = api.requests();
    let rss_restarted = node.agent_pid().map_or(0.0, rss_mib);

    let load_after = crate::bench::tools::machine_load();
    let body = format!(
        "Cluster: {NAMESPACES} namespaces (10 team labels), {} pods on {NODES} nodes ({} on the agent's \
         node, attached through palisade-cni), {} NetworkPolicies (each: a pod selector, a \
         namespace+pod selector and an ipBlock with except); {identities} distinct identities. \
         The agent is the release build, in a node namespace, against the API stand-in over HTTP \
         (`integration/src/kube_api`). Before: {load_before}. After: {load_after}.\n\n\
         | measurement | value | target |\n|---|---|---|\n\
         | first sync, empty state (identities allocated by this agent) | {:.2} s | |\n\
         | API requests in the first sync | {} ({} identity creates, {} lists, {} watches) | |\n\
         | resync after a restart (identities exist, state kept) | {:.2} s | |\n\
         | API requests in the resync | {} ({} lists, {} watches) | |\n\
         | attaching the node's {} pods (CNI ADD each, sequential) | {:.2} s ({:.1} ms each) | |\n\
         | policy map entries for them | {entries} | |\n\
         | agent RSS after the first sync / with its pods / after a restart | {rss_synced:.0} / {rss_attached:.0} / {rss_restarted:.0} MiB | < 200 MiB |\n\
         | policy created in the API -> enforced, p50 / p90 / max ({LATENCY_SAMPLES} samples) | {:.1} / {:.1} / {:.1} ms | p50 < 100 ms |\n\
         | API requests in 10 s idle | {} | |\n",
        NAMESPACES * PODS_PER_NAMESPACE,
        local.len(),
        policies,
        cold.as_secs_f64(),
        cold_requests.total(),
        cold_requests.of("create", "palisadeidentities"),
        cold_requests.verb("list"),
        cold_requests.verb("watch"),
        warm.as_secs_f64(),
        warm_requests.total(),
        warm_requests.verb("list"),
        warm_requests.verb("watch"),
        local.len(),
        attach.as_secs_f64(),
        attach.as_secs_f64() * 1000.0 / local.len().max(1) as f64,
        percentile(&latencies, 50),
        percentile(&latencies, 90),
        latencies.last().copied().unwrap_or(0.0),
        idle.total(),
    );
    crate::bench::write_result("kubernetes-scale", "Kubernetes mode at scale", &body)
}
