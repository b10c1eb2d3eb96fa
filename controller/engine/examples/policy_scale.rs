//! Benchmark (not a test): the agent's engine at scale, with in-memory maps and plumbing so
//! it measures the agent's own work: compiling 500 policies for 1,000 endpoints into map
//! state, the map entries that produces, the agent's memory, and the time one policy change
//! takes to recompile and diff. Run with `cargo xtask bench` (release build).
#![expect(
    clippy::print_stdout,
    reason = "a benchmark: its report is what it prints"
)]

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use palisade_engine::datapath::memory::MemoryDatapath;
use palisade_engine::model::{EndpointSpec, LabelChange};
use palisade_engine::plumbing::memory::MemoryPlumbing;
use palisade_engine::{Engine, EngineConfig, Outputs};
use palisade_policies::compile::Settings;
use palisade_policies::labels::parse_label_list;
use palisade_policies::manifest::parse_manifests;

const ENDPOINTS: usize = 1_000;
const NAMESPACES: usize = 20;
const POLICIES: usize = 500;
const APPS: usize = 50;

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// One of five policy shapes, in rotation, so the mix covers pod, namespace and CIDR peers,
/// port ranges, deny rules and clusterwide entities.
fn policy(j: usize, port: u16) -> String {
    let ns = format!("ns-{}", j % NAMESPACES);
    let app = format!("app-{}", j % APPS);
    match j % 5 {
        0 | 1 => format!(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: p{j}, namespace: {ns}}}\nspec:\n  podSelector: {{matchLabels: {{app: {app}}}}}\n  ingress:\n  - from:\n    - podSelector:\n        matchExpressions: [{{key: tier, operator: In, values: [web, api]}}]\n    ports: [{{port: {port}, endPort: {}}}, {{port: 443}}]\n",
            port + 10
        ),
        2 => format!(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: p{j}, namespace: {ns}}}\nspec:\n  podSelector: {{matchLabels: {{app: {app}}}}}\n  ingress:\n  - from:\n    - namespaceSelector: {{matchLabels: {{team: t{}}}}}\n      podSelector: {{matchLabels: {{tier: web}}}}\n    ports: [{{port: {port}}}]\n",
            j % 5
        ),
        3 => format!(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: p{j}, namespace: {ns}}}\nspec:\n  podSelector: {{matchLabels: {{app: {app}}}}}\n  policyTypes: [Egress]\n  egress:\n  - to:\n    - ipBlock: {{cidr: 10.{}.0.0/16, except: [10.{}.1.0/24]}}\n    ports: [{{port: {port}, protocol: UDP}}]\n",
            j % 200,
            j % 200
        ),
        _ => format!(
            "apiVersion: palisade.io/v1\nkind: NetworkPolicy\nmetadata: {{name: p{j}, namespace: {ns}}}\nspec:\n  endpointSelector: {{matchLabels: {{app: {app}}}}}\n  ingressDeny:\n  - fromEndpoints: [{{matchLabels: {{tier: db}}}}]\n    toPorts: [{{ports: [{{port: \"22\"}}]}}]\n  egress:\n  - toEntities: [world]\n  - toEndpoints: [{{matchLabels: {{\"io.kubernetes.pod.namespace\": ns-{}}}}}]\n",
            (j + 1) % NAMESPACES
        ),
    }
}

#[expect(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    reason = "p is a fraction in 0..=1, so the rounded index is non-negative and in bounds"
)]
fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let rss_start = rss_kib();
    let mut engine = Engine::start(
        EngineConfig {
            pod_cidr: "10.200.0.0/16".parse()?,
            node_ip: "10.200.0.1".parse()?,
            settings: Settings::default(),
            cluster_identities: false,
            file_policies: Vec::new(),
        },
        MemoryDatapath::default(),
        MemoryPlumbing::default(),
        None,
        Outputs::default(),
    )
    .await?;

    for n in 0..NAMESPACES {
        let change = LabelChange {
            set: parse_label_list(&format!(
                "team=t{},env={}",
                n % 5,
                if n % 2 == 0 { "prod" } else { "dev" }
            ))
            .map_err(anyhow::Error::msg)?,
            remove: vec![],
        };
        engine.namespace_label(&format!("ns-{n}"), &change)?;
    }
    let tiers = ["web", "api", "db"];
    let started = Instant::now();
    for i in 0..ENDPOINTS {
        engine
            .endpoint_add(EndpointSpec {
                name: format!("ep-{i}"),
                namespace: format!("ns-{}", i % NAMESPACES),
                labels: parse_label_list(&format!(
                    "app=app-{},tier={},version=v{}",
                    i % APPS,
                    tiers[i % 3],
                    i % 2
                ))
                .map_err(anyhow::Error::msg)?,
                ip: None,
                named_ports: vec![],
            })
            .await?;
    }
    let endpoints_time = started.elapsed();

    let manifest: String = (0..POLICIES)
        .map(|j| policy(j, 8000 + u16::try_from(j % 100).expect("below 100")))
        .collect::<Vec<_>>()
        .join("---\n");
    let started = Instant::now();
    // Parsing is timed too: the agent parses each manifest before the engine applies it.
    let applied = engine.policy_apply(parse_manifests(&manifest)?)?;
    let full_apply = started.elapsed();
    let status = engine.status();

    // One policy change at this size: recompile, diff, write.
    let mut samples = Vec::new();
    let mut ops = Vec::new();
    for k in 0..30u16 {
        let one = policy(7, 9000 + k);
        let t = Instant::now();
        let r = engine.policy_apply(parse_manifests(&one)?)?;
        samples.push(t.elapsed());
        ops.push(r.map_operations);
    }
    samples.sort();
    // One endpoint joining at this size.
    let t = Instant::now();
    engine
        .endpoint_add(EndpointSpec {
            name: "ep-new".into(),
            namespace: "ns-3".into(),
            labels: parse_label_list("app=app-3,tier=web,version=v1")
                .map_err(anyhow::Error::msg)?,
            ip: None,
            named_ports: vec![],
        })
        .await?;
    let endpoint_join = t.elapsed();
    let rss_end = rss_kib();

    // BPF map memory estimate: LPM trie nodes carry ~48 bytes of kernel overhead besides the
    // key and value; hash entries ~40.
    let policy_bytes = status.policy_map_entries * (16 + 8 + 48);
    let ipcache_bytes = status.ipcache_entries * (24 + 16 + 48);

    let mut out = String::new();
    writeln!(out, "| measure | value |")?;
    writeln!(out, "|---|---|")?;
    writeln!(
        out,
        "| endpoints / namespaces / policies | {ENDPOINTS} / {NAMESPACES} / {POLICIES} |"
    )?;
    writeln!(out, "| identities | {} |", status.identities)?;
    writeln!(
        out,
        "| policy map entries | {} |",
        status.policy_map_entries
    )?;
    writeln!(out, "| ipcache entries | {} |", status.ipcache_entries)?;
    writeln!(
        out,
        "| estimated BPF map memory (policy + ipcache) | {:.1} MiB |",
        (policy_bytes + ipcache_bytes) as f64 / 1_048_576.0
    )?;
    writeln!(
        out,
        "| apply 500 policies at once (compile + diff + write {} map ops) | {:.1} ms |",
        applied.map_operations,
        full_apply.as_secs_f64() * 1e3
    )?;
    writeln!(
        out,
        "| one policy change: median / p95 / max ({} map ops each) | {:.2} / {:.2} / {:.2} ms |",
        ops[ops.len() / 2],
        percentile(&samples, 0.5).as_secs_f64() * 1e3,
        percentile(&samples, 0.95).as_secs_f64() * 1e3,
        samples.last().map_or(0.0, |d| d.as_secs_f64() * 1e3)
    )?;
    writeln!(
        out,
        "| one endpoint joining (1,001st) | {:.2} ms |",
        endpoint_join.as_secs_f64() * 1e3
    )?;
    writeln!(
        out,
        "| adding 1,000 endpoints one by one (no policies yet) | {:.0} ms |",
        endpoints_time.as_secs_f64() * 1e3
    )?;
    writeln!(
        out,
        "| agent memory (RSS) at start / at the end | {rss_start} / {rss_end} KiB |"
    )?;
    print!("{out}");
    Ok(())
}
