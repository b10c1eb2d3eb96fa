//! Benchmark (not a test): the agent's engine at scale, with in-memory maps and plumbing so
//! it measures the agent's own work. Two scenarios: one policy allowing 10,000 CIDR peers
//! (apply, then one-rule changes), and 5,000 endpoints x 1,000 policies (endpoints joining,
//! the full apply, one policy change, one more endpoint joining, the process's memory).
//! Prints markdown tables. Run with `cargo xtask bench policy-scale` (release build).
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

const ENDPOINTS: usize = 5_000;
const NAMESPACES: usize = 20;
const POLICIES: usize = 1_000;
const APPS: usize = 50;
const CIDR_PEERS: usize = 10_000;

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

async fn engine() -> anyhow::Result<Engine<MemoryDatapath, MemoryPlumbing>> {
    Ok(Engine::start(
        EngineConfig {
            pod_cidr: "10.200.0.0/16".parse()?,
            node_ip: "10.200.0.1".parse()?,
            settings: Settings::default(),
            cluster_identities: false,
            file_policies: Vec::new(),
            fqdn: palisade_engine::fqdn::FqdnLimits::default(),
        },
        MemoryDatapath::default(),
        MemoryPlumbing::default(),
        None,
        Outputs::default(),
    )
    .await?)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// `n` distinct /24s outside the pod range.
fn cidr_list(n: usize, skip: usize) -> String {
    let mut out = String::new();
    for i in skip..skip + n {
        let _ = writeln!(
            out,
            "    - ipBlock: {{cidr: 20.{}.{}.0/24}}",
            i / 256,
            i % 256
        );
    }
    out
}

/// A server's ingress from 10,000 CIDR peers on port 80, and a second rule on `port`.
fn cidr_policy(skip: usize, port: u16) -> String {
    format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: big, namespace: x}}\nspec:\n  podSelector: {{matchLabels: {{app: server}}}}\n  ingress:\n  - from:\n{}    ports: [{{port: 80}}]\n  - from:\n    - ipBlock: {{cidr: 192.168.0.0/16}}\n    ports: [{{port: {port}}}]\n",
        cidr_list(CIDR_PEERS, skip)
    )
}

/// One policy with 10,000 CIDR peers, on a node with a client and a server.
async fn cidr_scenario(out: &mut String) -> anyhow::Result<()> {
    let mut engine = engine().await?;
    for (name, app) in [("client", "client"), ("server", "server")] {
        engine
            .endpoint_add(EndpointSpec {
                name: name.into(),
                namespace: "x".into(),
                labels: parse_label_list(&format!("app={app}")).map_err(anyhow::Error::msg)?,
                ip: None,
                named_ports: vec![],
            })
            .await?;
    }
    let manifest = cidr_policy(0, 443);
    let t = Instant::now();
    let parsed = parse_manifests(&manifest)?;
    let parse = t.elapsed();
    let t = Instant::now();
    let applied = engine.policy_apply(parsed)?;
    let apply = t.elapsed();
    // One rule changed (the second rule's port), the manifest re-applied whole.
    let mut rule_change = Vec::new();
    for k in 0..10u16 {
        let parsed = parse_manifests(&cidr_policy(0, 8443 + k))?;
        let t = Instant::now();
        engine.policy_apply(parsed)?;
        rule_change.push(t.elapsed());
    }
    rule_change.sort();
    // One CIDR peer replaced by another.
    let mut peer_change = Vec::new();
    for k in 1..=10 {
        let parsed = parse_manifests(&cidr_policy(k, 8443))?;
        let t = Instant::now();
        engine.policy_apply(parsed)?;
        peer_change.push(t.elapsed());
    }
    peer_change.sort();
    let status = engine.status();
    writeln!(out, "| measure | value |")?;
    writeln!(out, "|---|---|")?;
    writeln!(
        out,
        "| identities / policy map entries / ipcache entries | {} / {} / {} |",
        status.identities, status.policy_map_entries, status.ipcache_entries
    )?;
    writeln!(
        out,
        "| parsing the manifest (off the engine) | {:.1} ms |",
        ms(parse)
    )?;
    writeln!(
        out,
        "| applying it (compile + diff + write {} map ops) | {:.1} ms |",
        applied.map_operations,
        ms(apply)
    )?;
    writeln!(
        out,
        "| one rule changed (its port): median / max | {:.2} / {:.2} ms |",
        ms(percentile(&rule_change, 0.5)),
        ms(*rule_change.last().expect("ten samples"))
    )?;
    writeln!(
        out,
        "| one CIDR peer replaced: median / max | {:.2} / {:.2} ms |",
        ms(percentile(&peer_change, 0.5)),
        ms(*peer_change.last().expect("ten samples"))
    )?;
    Ok(())
}

fn endpoint(i: usize) -> anyhow::Result<EndpointSpec> {
    let tiers = ["web", "api", "db"];
    Ok(EndpointSpec {
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
}

/// 5,000 endpoints x 1,000 policies.
async fn cluster_scenario(out: &mut String) -> anyhow::Result<()> {
    let rss_start = rss_kib();
    let mut engine = engine().await?;
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
    let started = Instant::now();
    for i in 0..ENDPOINTS {
        engine.endpoint_add(endpoint(i)?).await?;
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
    let mut joins = Vec::new();
    for i in 0..10 {
        let t = Instant::now();
        engine.endpoint_add(endpoint(ENDPOINTS + i)?).await?;
        joins.push(t.elapsed());
    }
    joins.sort();
    let rss_end = rss_kib();

    // BPF map memory estimate: LPM trie nodes carry ~48 bytes of kernel overhead besides the
    // key and value; hash entries ~40.
    let policy_bytes = status.policy_map_entries * (16 + 8 + 48);
    let ipcache_bytes = status.ipcache_entries * (24 + 16 + 48);

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
        "| estimated BPF map memory (policy + ipcache, kernel side) | {:.1} MiB |",
        (policy_bytes + ipcache_bytes) as f64 / 1_048_576.0
    )?;
    writeln!(
        out,
        "| {ENDPOINTS} endpoints joining one by one (no policies yet) | {:.0} ms |",
        ms(endpoints_time)
    )?;
    writeln!(
        out,
        "| apply {POLICIES} policies at once (parse + compile + diff + write {} map ops) | {:.1} ms |",
        applied.map_operations,
        ms(full_apply)
    )?;
    writeln!(
        out,
        "| one policy change: median / p95 / max ({} map ops each) | {:.2} / {:.2} / {:.2} ms |",
        ops[ops.len() / 2],
        ms(percentile(&samples, 0.5)),
        ms(percentile(&samples, 0.95)),
        samples.last().map_or(0.0, |d| ms(*d))
    )?;
    writeln!(
        out,
        "| one endpoint joining ({}th and on): median / max | {:.2} / {:.2} ms |",
        ENDPOINTS + 1,
        ms(percentile(&joins, 0.5)),
        joins.last().map_or(0.0, |d| ms(*d))
    )?;
    writeln!(
        out,
        "| engine process memory (RSS) at start / at the end | {:.1} / {:.1} MiB |",
        rss_start as f64 / 1024.0,
        rss_end as f64 / 1024.0
    )?;
    Ok(())
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let which = std::env::args().nth(1).unwrap_or_default();
    let mut out = String::new();
    if which.is_empty() || which == "cidr" {
        writeln!(out, "### One policy allowing {CIDR_PEERS} CIDR peers\n")?;
        cidr_scenario(&mut out).await?;
        writeln!(out)?;
    }
    if which.is_empty() || which == "cluster" {
        writeln!(out, "### {ENDPOINTS} endpoints x {POLICIES} policies\n")?;
        cluster_scenario(&mut out).await?;
    }
    print!("{out}");
    Ok(())
}
