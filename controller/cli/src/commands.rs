//! The commands: each is one API call, printed as a table, a line or JSON.

use std::io::Read as _;
use std::net::Ipv4Addr;
use std::path::PathBuf;

use anyhow::{Context as _, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use palisade_policies::endpoint::NamedPort;
use palisade_policies::labels::{Labels, parse_label_list};
use serde::Serialize;

use palisade_api::client::Client;
use palisade_api::filter::{Criterion, Field, FlowFilter};
use palisade_api::flow::Flow;
use palisade_api::types::{
    ConnectionsView, ConntrackView, EndpointAddRequest, EndpointAuditRequest, EndpointView,
    FlowQuery, FqdnTraceRequest, FqdnTraceResult, IdentityView, LabelChange, NamespaceModeRequest,
    NamespaceModeView, PolicyApplyRequest, PolicyApplyResult, PolicyDeleteResult, PolicyView,
    StatusView, TraceRequest, TraceResult, WhatIfRequest, WhatIfResult,
};
use palisade_policies::learn::map::{ServiceMap, workload_group};
use palisade_policies::learn::suggest::{self, Format as SuggestFormat};
use palisade_policies::learn::time::rfc3339;

use crate::output::table;

#[derive(Debug, Parser)]
#[command(
    name = "palisade",
    version,
    about = "Palisade: identity-aware network policy. Talks to palisade-agent."
)]
pub struct Cli {
    /// The agent's API socket.
    #[arg(
        long,
        global = true,
        default_value = "/run/palisade/agent.sock",
        env = "PALISADE_API"
    )]
    pub api: PathBuf,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum Output {
    #[default]
    Table,
    Json,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum FlowOutput {
    #[default]
    Compact,
    Json,
    Table,
}

#[derive(Debug, Subcommand)]
#[expect(
    clippy::large_enum_variant,
    reason = "parsed once per process; boxing buys nothing"
)]
pub enum Command {
    /// Agent and datapath status.
    Status {
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
    /// Workloads: network namespaces joined to the node.
    #[command(subcommand)]
    Endpoint(EndpointCmd),
    /// Namespace labels (namespaceSelector input).
    #[command(subcommand)]
    Namespace(NamespaceCmd),
    /// Security identities.
    #[command(subcommand)]
    Identity(IdentityCmd),
    /// Network policies.
    #[command(subcommand)]
    Policy(PolicyCmd),
    /// Watch flows: what the datapath forwarded and dropped, and why.
    Observe(ObserveArgs),
    /// Connection tracking entries in the datapath.
    #[command(subcommand)]
    Conntrack(ConntrackCmd),
    /// Names the DNS proxy learned for toFQDNs, with their addresses and lifetimes.
    #[command(subcommand)]
    Fqdn(FqdnCmd),
    /// The XDP prefilter: a CIDR deny list on the node's host-facing interfaces.
    #[command(subcommand)]
    Prefilter(crate::prefilter::PrefilterCmd),
    /// The service map: workloads and the connections observed between them, coloured by
    /// verdict, as SVG (opens in a browser) or Graphviz dot, on stdout.
    Map {
        /// Only connections with either end in this namespace.
        #[arg(long, short = 'n')]
        namespace: Option<String>,
        /// Only connections seen within this long (e.g. 1h, 2d).
        #[arg(long)]
        since: Option<String>,
        #[arg(short, long, value_enum, default_value_t)]
        output: MapOutput,
    },
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum MapOutput {
    #[default]
    Svg,
    Dot,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum SuggestOutput {
    /// palisade.io/v1 NetworkPolicy (HTTP rules, entities).
    #[default]
    Palisade,
    /// networking.k8s.io/v1 NetworkPolicy.
    K8s,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// Everything is allowed and learned (policy evaluated in audit, AUDIT flows are learning).
    Discover,
    /// Policy is evaluated in audit: what it would drop passes, as AUDIT flows (violations).
    Monitor,
    /// Policy is enforced.
    Protect,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum OnOff {
    On,
    Off,
}

#[derive(Debug, Subcommand)]
pub enum FqdnCmd {
    List {
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
}

#[derive(Debug, Subcommand)]
pub enum ConntrackCmd {
    List {
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
}

#[derive(Debug, Subcommand)]
pub enum EndpointCmd {
    /// Create network namespace NAME joined to the node, with an identity from its labels.
    Add {
        name: String,
        #[arg(long)]
        namespace: String,
        /// k=v[,k=v...]
        #[arg(long, default_value = "")]
        labels: String,
        #[arg(long)]
        ip: Option<Ipv4Addr>,
        /// Named container port NAME=NUMBER[/PROTO] (repeatable).
        #[arg(long = "port")]
        ports: Vec<String>,
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
    /// Set or remove labels; the endpoint moves to the identity of its new labels.
    Label {
        name: String,
        #[arg(long)]
        set: Vec<String>,
        #[arg(long)]
        remove: Vec<String>,
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
    Delete {
        name: String,
    },
    List {
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
    /// Put one endpoint in audit (what policy would drop at it passes, as AUDIT flows), or
    /// take it out.
    Audit {
        name: String,
        #[arg(value_enum)]
        state: OnOff,
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
}

#[derive(Debug, Subcommand)]
pub enum NamespaceCmd {
    Label {
        namespace: String,
        #[arg(long)]
        set: Vec<String>,
        #[arg(long)]
        remove: Vec<String>,
    },
    /// Set a namespace's mode: discover, monitor or protect (in Kubernetes: the namespace
    /// label palisade.io/mode).
    Mode {
        namespace: String,
        #[arg(value_enum)]
        mode: Mode,
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
}

#[derive(Debug, Subcommand)]
pub enum IdentityCmd {
    List {
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
}

#[derive(Debug, Subcommand)]
pub enum PolicyCmd {
    /// Apply manifests (multi-document YAML; `-` reads stdin). Returns once enforced.
    Apply {
        #[arg(short = 'f', long = "filename")]
        file: PathBuf,
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
    /// Delete a policy by name (namespace "default" unless given; --clusterwide for
    /// clusterwide policies).
    Delete {
        name: String,
        #[arg(long, short = 'n', conflicts_with = "clusterwide")]
        namespace: Option<String>,
        #[arg(long)]
        clusterwide: bool,
    },
    List {
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
    /// Least-privilege policies from the connections observed (one per workload group), as
    /// YAML on stdout that `policy apply -f` takes as it is.
    Suggest {
        /// Only policies for workloads of this namespace.
        #[arg(long, short = 'n')]
        namespace: Option<String>,
        /// Only connections seen within this long (e.g. 1h, 2d).
        #[arg(long)]
        since: Option<String>,
        #[arg(long, value_enum, default_value_t)]
        format: SuggestOutput,
    },
    /// Replay the connections observed against the policies in force plus those of FILE
    /// (nothing is applied) and report what would change. Exit code 0: nothing changes;
    /// 2: something does; 1: an error.
    WhatIf {
        #[arg(short = 'f', long = "filename")]
        file: PathBuf,
        /// Only connections seen within this long (e.g. 1h, 2d).
        #[arg(long)]
        since: Option<String>,
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
    /// Explain the verdict for a connection between two endpoints, or from an endpoint to a
    /// DNS name (`--to-fqdn`).
    Trace {
        #[arg(long)]
        from: String,
        /// The destination endpoint, NS/NAME.
        #[arg(long, required_unless_present = "to_fqdn", conflicts_with = "to_fqdn")]
        to: Option<String>,
        /// A DNS name: which toFQDNs selectors select it, whether the DNS proxy answers the
        /// source's lookups of it, and the verdict for every address learned for it.
        #[arg(long, value_name = "NAME")]
        to_fqdn: Option<String>,
        /// PORT or PORT/PROTO (TCP, UDP, SCTP, ICMP).
        #[arg(long)]
        port: String,
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
}

#[derive(Debug, Args)]
pub struct ObserveArgs {
    /// Flows from pods whose name starts with this: [NAMESPACE/]POD, namespace `default`
    /// when none is given (`shop/web-` is every pod of Deployment web, `shop/` the namespace).
    #[arg(long, value_name = "[NS/]POD")]
    from_pod: Vec<String>,
    /// Flows to pods whose name starts with this ([NAMESPACE/]POD).
    #[arg(long, value_name = "[NS/]POD")]
    to_pod: Vec<String>,
    /// Flows from or to pods whose name starts with this ([NAMESPACE/]POD), as hubble's --pod.
    #[arg(long, value_name = "[NS/]POD")]
    pod: Vec<String>,
    /// Source identity label (`key=value` or `key`).
    #[arg(long)]
    from_label: Vec<String>,
    /// Destination identity label.
    #[arg(long)]
    to_label: Vec<String>,
    /// Identity label on either side.
    #[arg(long)]
    label: Vec<String>,
    /// Source security identity (number).
    #[arg(long)]
    from_identity: Vec<String>,
    /// Destination security identity.
    #[arg(long)]
    to_identity: Vec<String>,
    /// Security identity on either side.
    #[arg(long)]
    identity: Vec<String>,
    /// Source IPv4 address.
    #[arg(long)]
    from_ip: Vec<String>,
    /// Destination IPv4 address.
    #[arg(long)]
    to_ip: Vec<String>,
    /// Address on either side.
    #[arg(long)]
    ip: Vec<String>,
    /// Source port.
    #[arg(long)]
    from_port: Vec<String>,
    /// Destination port.
    #[arg(long)]
    to_port: Vec<String>,
    /// Port on either side.
    #[arg(long)]
    port: Vec<String>,
    /// tcp, udp, icmp, sctp, http (flows of the L7 proxy) or dns (of the DNS proxy).
    #[arg(long)]
    protocol: Vec<String>,
    /// FORWARDED, DROPPED, AUDIT, REDIRECTED.
    #[arg(long)]
    verdict: Vec<String>,
    /// Either side in this namespace.
    #[arg(long)]
    namespace: Vec<String>,
    /// Drop reason (words or code).
    #[arg(long)]
    drop_reason: Vec<String>,
    /// HTTP method of L7 flows.
    #[arg(long)]
    http_method: Vec<String>,
    /// HTTP status of L7 flows: 403, or a class such as 4xx.
    #[arg(long)]
    http_status: Vec<String>,
    /// Regular expression over the (normalized) HTTP path of L7 flows.
    #[arg(long)]
    http_path: Vec<String>,
    /// DNS flows whose query is this name, or matches this pattern (`*.example.com`).
    #[arg(long)]
    fqdn: Vec<String>,
    /// Negate the filter flag that follows, as hubble does (`--not --pod shop/db`).
    #[arg(long, action = clap::ArgAction::Count)]
    not: u8,
    /// Keep streaming new flows.
    #[arg(short, long)]
    follow: bool,
    /// Newest N stored flows.
    #[arg(long)]
    last: Option<usize>,
    /// Only flows newer than this (e.g. 30s, 5m).
    #[arg(long)]
    since: Option<String>,
    #[arg(short, long, value_enum, default_value_t)]
    output: FlowOutput,
}

/// Reads a manifest file (`-`: stdin), refusing one larger than the agent accepts before it is
/// read whole.
fn read_manifest(file: &std::path::Path) -> anyhow::Result<String> {
    let limit = palisade_policies::manifest::limits::MAX_MANIFEST_BYTES;
    let what = if file.as_os_str() == "-" {
        "stdin".to_string()
    } else {
        file.display().to_string()
    };
    let reader: Box<dyn std::io::Read> = if file.as_os_str() == "-" {
        Box::new(std::io::stdin())
    } else {
        Box::new(std::fs::File::open(file).with_context(|| format!("reading {what}"))?)
    };
    let mut text = String::new();
    reader
        .take(limit as u64 + 1)
        .read_to_string(&mut text)
        .with_context(|| format!("reading {what}"))?;
    if text.len() > limit {
        bail!("the manifest in {what} is larger than the {limit} bytes the agent accepts");
    }
    Ok(text)
}

pub(crate) fn print_json<T: Serialize>(v: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

fn label_change(set: &[String], remove: &[String]) -> anyhow::Result<LabelChange> {
    let mut labels = Labels::new();
    for s in set {
        labels.extend(parse_label_list(s).map_err(anyhow::Error::msg)?);
    }
    if labels.is_empty() && remove.is_empty() {
        bail!("nothing to do: give --set k=v and/or --remove k");
    }
    Ok(LabelChange {
        set: labels,
        remove: remove.to_vec(),
    })
}

fn labels_text(l: &Labels) -> String {
    l.iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

fn print_endpoints(eps: &[EndpointView]) {
    let rows: Vec<Vec<String>> = eps
        .iter()
        .map(|e| {
            let enf = |b: bool| if b { "enforced" } else { "allow-all" };
            vec![
                e.id.to_string(),
                e.namespace.clone(),
                e.name.clone(),
                e.ip.to_string(),
                e.identity.to_string(),
                enf(e.ingress_enforced).to_string(),
                enf(e.egress_enforced).to_string(),
                e.audit
                    .as_deref()
                    .map_or("-".to_string(), |why| format!("audit ({why})")),
                labels_text(&e.labels),
            ]
        })
        .collect();
    println!(
        "{}",
        table(
            &[
                "ID",
                "NAMESPACE",
                "NAME",
                "IP",
                "IDENTITY",
                "INGRESS",
                "EGRESS",
                "AUDIT",
                "LABELS"
            ],
            &rows
        )
    );
}

fn print_trace(t: &TraceResult) {
    let elsewhere = [&t.egress, &t.ingress]
        .iter()
        .any(|s| s.judged_on.is_some());
    println!(
        "{} {} -> {} on {}/{}{}",
        t.verdict,
        t.egress.endpoint,
        t.ingress.endpoint,
        t.port,
        t.protocol,
        if elsewhere { " (this node's side)" } else { "" }
    );
    println!(
        "  identities: source {} -> destination {}",
        t.source_identity, t.destination_identity
    );
    for side in [&t.egress, &t.ingress] {
        if let Some(node) = &side.judged_on {
            println!(
                "  {} of {}: judged on node {node} — {}",
                side.direction, side.endpoint, side.reason
            );
            continue;
        }
        println!(
            "  {} of {}: {} — {}",
            side.direction, side.endpoint, side.verdict, side.reason
        );
        if !side.enforcing_policies.is_empty() {
            println!("    selected by: {}", side.enforcing_policies.join(", "));
        }
        println!(
            "    peer identity {} [{}]",
            side.peer_identity,
            side.peer_labels.join(" ")
        );
    }
}

fn print_fqdn_trace(t: &FqdnTraceResult) {
    println!(
        "{} {} -> {} on {}/{}",
        t.verdict, t.endpoint, t.name, t.port, t.protocol
    );
    println!("  {}", t.reason);
    println!("  source identity {}", t.source_identity);
    if t.selected_by.is_empty() {
        println!("  toFQDNs: no selector selects {}", t.name);
    } else {
        println!("  toFQDNs: selected by {}", t.selected_by.join(", "));
    }
    let lookup = match t.lookup.as_str() {
        "ANSWERED" => format!("answered, by {}", t.lookup_rules.join(", ")),
        "REFUSED" => format!(
            "REFUSED by the DNS proxy: no rules.dns selector of {} matches it",
            t.lookup_rules.join(", ")
        ),
        _ => {
            "not proxied (no rule selecting the endpoint has rules.dns): its lookups teach nothing"
                .to_string()
        }
    };
    println!("  lookups of {}: {lookup}", t.name);
    if t.addresses.is_empty() {
        println!("  learned addresses: none");
    } else {
        println!("  learned addresses ({}):", t.addresses.len());
    }
    for a in &t.addresses {
        let ttl = if a.held_by_connections {
            "expired, held by open connections".to_string()
        } else {
            format!("ttl {}s", a.ttl_remaining)
        };
        println!(
            "    {:<15} {:<8} {ttl} — {}",
            a.address.to_string(),
            a.egress.verdict,
            a.egress.reason
        );
    }
}

/// Filter flags of `observe`, by clap argument id.
const FILTER_FLAGS: [(&str, Field); 23] = [
    ("from_pod", Field::FromPod),
    ("to_pod", Field::ToPod),
    ("pod", Field::Pod),
    ("from_label", Field::FromLabel),
    ("to_label", Field::ToLabel),
    ("label", Field::Label),
    ("from_identity", Field::FromIdentity),
    ("to_identity", Field::ToIdentity),
    ("identity", Field::Identity),
    ("from_ip", Field::FromIp),
    ("to_ip", Field::ToIp),
    ("ip", Field::Ip),
    ("from_port", Field::FromPort),
    ("to_port", Field::ToPort),
    ("port", Field::Port),
    ("protocol", Field::Protocol),
    ("verdict", Field::Verdict),
    ("namespace", Field::Namespace),
    ("drop_reason", Field::DropReason),
    ("http_method", Field::HttpMethod),
    ("http_status", Field::HttpStatus),
    ("http_path", Field::HttpPath),
    ("fqdn", Field::Fqdn),
];

/// Hubble's semantics: values of the same flag are alternatives; different flags must all
/// hold; `--not` negates the one filter flag that follows it.
pub fn build_filter(mut occurrences: Vec<(usize, Field, String)>, nots: &[usize]) -> FlowFilter {
    occurrences.sort_by_key(|(i, _, _)| *i);
    let negated: Vec<bool> = occurrences
        .iter()
        .enumerate()
        .map(|(k, (i, _, _))| {
            let prev = if k == 0 { 0 } else { occurrences[k - 1].0 };
            nots.iter().any(|n| *n < *i && (k == 0 || *n > prev))
        })
        .collect();
    let mut criteria: Vec<Criterion> = Vec::new();
    for ((_, field, value), negate) in occurrences.into_iter().zip(negated) {
        if negate {
            // Each negated value excludes on its own.
            criteria.push(Criterion {
                field,
                values: vec![value],
                negate,
            });
        } else if let Some(c) = criteria.iter_mut().find(|c| c.field == field && !c.negate) {
            c.values.push(value);
        } else {
            criteria.push(Criterion {
                field,
                values: vec![value],
                negate,
            });
        }
    }
    FlowFilter { criteria }
}

fn observe_filter(m: &clap::ArgMatches) -> FlowFilter {
    let mut occurrences = Vec::new();
    for (id, field) in FILTER_FLAGS {
        if let (Some(values), Some(indices)) = (m.get_many::<String>(id), m.indices_of(id)) {
            occurrences.extend(indices.zip(values).map(|(i, v)| (i, field, v.clone())));
        }
    }
    let nots: Vec<usize> = m
        .indices_of("not")
        .map(Iterator::collect)
        .unwrap_or_default();
    build_filter(occurrences, &nots)
}

async fn observe(client: &Client, a: ObserveArgs, m: &clap::ArgMatches) -> anyhow::Result<()> {
    let since_seconds = match &a.since {
        Some(s) => Some(
            humantime::parse_duration(s)
                .with_context(|| format!("--since {s:?}"))?
                .as_secs(),
        ),
        None => None,
    };
    let query = FlowQuery {
        filter: observe_filter(m),
        last: a.last,
        since_seconds,
        follow: a.follow,
    };
    let output = a.output;
    let mut rows: Vec<Vec<String>> = Vec::new();
    client
        .post_lines("/v1/flows", &query, |line| {
            match serde_json::from_str::<Flow>(line) {
                Ok(f) => match output {
                    FlowOutput::Json => println!("{line}"),
                    FlowOutput::Compact => println!("{}", f.compact()),
                    FlowOutput::Table => rows.push(vec![
                        f.time.clone(),
                        format!("{}/{}", f.source.namespace, f.source.name)
                            .trim_matches('/')
                            .to_string()
                            + &format!(" {}:{}", f.ip.source, f.l4.source_port),
                        format!("{}/{}", f.destination.namespace, f.destination.name)
                            .trim_matches('/')
                            .to_string()
                            + &format!(" {}:{}", f.ip.destination, f.l4.destination_port),
                        f.l4.protocol.clone(),
                        f.verdict.clone(),
                        f.drop_reason.clone().unwrap_or_default(),
                        f.policy
                            .as_ref()
                            .map(|p| p.rule.clone())
                            .unwrap_or_default(),
                    ]),
                },
                // `{"lost_flows":N}` notes from a lagging follow.
                Err(_) => eprintln!("palisade: {line}"),
            }
            true
        })
        .await?;
    if output == FlowOutput::Table {
        println!(
            "{}",
            table(
                &[
                    "TIME",
                    "SOURCE",
                    "DESTINATION",
                    "PROTO",
                    "VERDICT",
                    "REASON",
                    "POLICY RULE"
                ],
                &rows
            )
        );
    }
    Ok(())
}

/// `--since 2h` in seconds.
fn since_seconds(since: Option<&str>) -> anyhow::Result<Option<u64>> {
    since
        .map(|s| {
            humantime::parse_duration(s)
                .map(|d| d.as_secs())
                .with_context(|| format!("--since {s:?}"))
        })
        .transpose()
}

/// A query string value, percent-encoded.
fn query_value(v: &str) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    for b in v.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// The agent's aggregate of connections.
async fn connections(
    client: &Client,
    namespace: Option<&str>,
    since: Option<&str>,
) -> anyhow::Result<ConnectionsView> {
    let mut query = Vec::new();
    if let Some(ns) = namespace {
        query.push(format!("namespace={}", query_value(ns)));
    }
    if let Some(secs) = since_seconds(since)? {
        query.push(format!("since_seconds={secs}"));
    }
    let path = if query.is_empty() {
        "/v1/connections".to_string()
    } else {
        format!("/v1/connections?{}", query.join("&"))
    };
    Ok(client.get(&path).await?)
}

/// `policy what-if` in words: the changes grouped by source and destination.
pub fn what_if_text(r: &WhatIfResult) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "replayed {} recorded connections and requests ({} flows){}",
        r.replayed,
        r.flows,
        if r.skipped > 0 {
            format!("; {} skipped (their endpoint is gone)", r.skipped)
        } else {
            String::new()
        }
    );
    if !r.changes_anything() {
        out.push_str("nothing would change\n");
        return out;
    }
    let _ = writeln!(
        out,
        "would change {}: {} newly denied, {} newly allowed, {} newly audited",
        r.changes.len(),
        r.newly_denied,
        r.newly_allowed,
        r.newly_audited
    );
    let mut last: Option<(&str, &str)> = None;
    for c in &r.changes {
        if last != Some((&c.source, &c.destination)) {
            let _ = writeln!(out, "{} -> {}", c.source, c.destination);
            last = Some((&c.source, &c.destination));
        }
        let what = match &c.http {
            Some(h) => format!("{}/{} {h}", c.port, c.protocol),
            None => format!("{}/{}", c.port, c.protocol),
        };
        let audit = if c.endpoint_in_audit && c.change == "newly-denied" {
            " (reported as AUDIT while the endpoint is in audit)"
        } else {
            ""
        };
        let _ = writeln!(
            out,
            "  {what} {}{audit}: {} flow{} ({} -> {}), last seen {}",
            c.change.to_uppercase(),
            c.flows,
            if c.flows == 1 { "" } else { "s" },
            c.source_sample,
            c.destination_sample,
            rfc3339(c.last_seen)
        );
        let _ = writeln!(out, "    at {}: {} -> {}", c.side, c.before, c.after);
    }
    out
}

/// Exit code of `policy what-if` when something would change.
pub const WHAT_IF_CHANGES: u8 = 2;

async fn what_if(
    client: &Client,
    file: &std::path::Path,
    since: Option<&str>,
    output: Output,
) -> anyhow::Result<u8> {
    let manifest = read_manifest(file)?;
    let r: WhatIfResult = client
        .post(
            "/v1/policies/what-if",
            &WhatIfRequest {
                manifest,
                since_seconds: since_seconds(since)?,
            },
        )
        .await?;
    if output == Output::Json {
        print_json(&r)?;
    } else {
        print!("{}", what_if_text(&r));
    }
    Ok(if r.changes_anything() {
        WHAT_IF_CHANGES
    } else {
        0
    })
}

/// The service map of the agent's connections, every endpoint (of the namespace) on it.
async fn service_map(
    client: &Client,
    namespace: Option<&str>,
    since: Option<&str>,
) -> anyhow::Result<ServiceMap> {
    let log = connections(client, namespace, since).await?;
    let mut map = ServiceMap::from_log(&log.log, namespace);
    let eps: Vec<EndpointView> = client.get("/v1/endpoints").await?;
    for e in eps
        .iter()
        .filter(|e| namespace.is_none_or(|ns| ns == e.namespace) && !e.pending_labels)
    {
        map.add_endpoint(
            workload_group(&e.namespace, &e.labels),
            &format!("{}/{}", e.namespace, e.name),
        );
    }
    Ok(map)
}

fn print_status(s: &StatusView) {
    println!("Palisade {} ({} mode)", s.version, s.mode);
    println!("  node ip:       {}  (pod CIDR {})", s.node_ip, s.pod_cidr);
    println!("  enforcement:   {}", s.enforcement);
    println!("  endpoints:     {}", s.endpoints);
    println!("  identities:    {}", s.identities);
    println!("  policies:      {}", s.policies);
    println!(
        "  maps:          {} policy entries, {} ipcache entries, {} conntrack entries ({})",
        s.policy_map_entries,
        s.ipcache_entries,
        s.conntrack_entries,
        if s.maps_in_sync {
            "in sync"
        } else {
            "OUT OF SYNC"
        }
    );
    println!("  flows stored:  {}", s.flows_stored);
    let a = &s.audit;
    let list = |v: &[String]| {
        if v.is_empty() {
            "none".to_string()
        } else {
            v.join(", ")
        }
    };
    let modes: Vec<String> = a
        .namespace_modes
        .iter()
        .map(|(ns, m)| format!("{ns} ({m})"))
        .collect();
    println!(
        "  audit:         agent {}; namespaces {}; endpoints {}; policies {}",
        if a.agent { "on" } else { "off" },
        list(&modes),
        list(&a.endpoints),
        list(&a.policies)
    );
    if !a.violations.is_empty() {
        let v: Vec<String> = a
            .violations
            .iter()
            .map(|(ns, n)| format!("{ns} {n}"))
            .collect();
        println!(
            "  violations:    {} (AUDIT flows outside discover mode)",
            v.join(", ")
        );
    }
    if !s.counters.is_empty() {
        let rows: Vec<Vec<String>> = s
            .counters
            .iter()
            .map(|c| {
                vec![
                    c.direction.clone(),
                    c.outcome.clone(),
                    c.packets.to_string(),
                    c.bytes.to_string(),
                ]
            })
            .collect();
        println!(
            "{}",
            table(&["DIRECTION", "OUTCOME", "PACKETS", "BYTES"], &rows)
        );
    }
}

/// Runs a parsed command line; `matches` keeps the order of flags (for `observe --not`).
/// Returns the exit code (`policy what-if` says with it whether anything changes).
pub async fn run(cli: Cli, matches: &clap::ArgMatches) -> anyhow::Result<u8> {
    if let Command::Policy(PolicyCmd::WhatIf {
        file,
        since,
        output,
    }) = &cli.command
    {
        return what_if(&Client::new(&cli.api), file, since.as_deref(), *output).await;
    }
    run_command(cli, matches).await.map(|()| 0)
}

async fn run_command(cli: Cli, matches: &clap::ArgMatches) -> anyhow::Result<()> {
    let client = Client::new(&cli.api);
    match cli.command {
        Command::Status { output } => {
            let s: StatusView = client.get("/v1/status").await?;
            if output == Output::Json {
                return print_json(&s);
            }
            print_status(&s);
        }
        Command::Endpoint(EndpointCmd::Add {
            name,
            namespace,
            labels,
            ip,
            ports,
            output,
        }) => {
            let named_ports = ports
                .iter()
                .map(|p| NamedPort::parse(p).map_err(anyhow::Error::msg))
                .collect::<anyhow::Result<Vec<_>>>()?;
            let req = EndpointAddRequest {
                name,
                namespace,
                labels: parse_label_list(&labels).map_err(anyhow::Error::msg)?,
                ip,
                named_ports,
            };
            let e: EndpointView = client.post("/v1/endpoints", &req).await?;
            if output == Output::Json {
                return print_json(&e);
            }
            println!(
                "endpoint {}/{} added: id {} ip {} identity {} (netns {}, interface {})",
                e.namespace, e.name, e.id, e.ip, e.identity, e.netns, e.interface
            );
        }
        Command::Endpoint(EndpointCmd::Label {
            name,
            set,
            remove,
            output,
        }) => {
            let e: EndpointView = client
                .post(
                    &format!("/v1/endpoints/{name}/labels"),
                    &label_change(&set, &remove)?,
                )
                .await?;
            if output == Output::Json {
                return print_json(&e);
            }
            println!(
                "endpoint {}/{} labels {} -> identity {}",
                e.namespace,
                e.name,
                labels_text(&e.labels),
                e.identity
            );
        }
        Command::Endpoint(EndpointCmd::Delete { name }) => {
            let () = client.delete(&format!("/v1/endpoints/{name}")).await?;
            println!("endpoint {name} deleted");
        }
        Command::Endpoint(EndpointCmd::List { output }) => {
            let eps: Vec<EndpointView> = client.get("/v1/endpoints").await?;
            if output == Output::Json {
                return print_json(&eps);
            }
            print_endpoints(&eps);
        }
        Command::Namespace(NamespaceCmd::Label {
            namespace,
            set,
            remove,
        }) => {
            let labels: Labels = client
                .post(
                    &format!("/v1/namespaces/{namespace}/labels"),
                    &label_change(&set, &remove)?,
                )
                .await?;
            println!("namespace {namespace} labels {}", labels_text(&labels));
        }
        Command::Fqdn(FqdnCmd::List { output }) => {
            let list: Vec<palisade_api::types::FqdnView> = client.get("/v1/fqdns").await?;
            if output == Output::Json {
                return print_json(&list);
            }
            let rows: Vec<Vec<String>> = list
                .iter()
                .map(|f| {
                    vec![
                        f.endpoint.clone(),
                        f.name.clone(),
                        f.address.to_string(),
                        if f.held_by_connections {
                            "expired (held by connections)".to_string()
                        } else {
                            format!("{}s", f.ttl_remaining)
                        },
                        f.identity.map(|i| i.to_string()).unwrap_or_default(),
                    ]
                })
                .collect();
            println!(
                "{}",
                table(&["ENDPOINT", "NAME", "ADDRESS", "TTL", "IDENTITY"], &rows)
            );
        }
        Command::Identity(IdentityCmd::List { output }) => {
            let ids: Vec<IdentityView> = client.get("/v1/identities").await?;
            if output == Output::Json {
                return print_json(&ids);
            }
            let rows: Vec<Vec<String>> = ids
                .iter()
                .map(|i| {
                    vec![
                        i.id.to_string(),
                        i.kind.clone(),
                        i.endpoints.join(","),
                        i.labels.join(" "),
                    ]
                })
                .collect();
            println!("{}", table(&["ID", "KIND", "ENDPOINTS", "LABELS"], &rows));
        }
        Command::Policy(PolicyCmd::Apply { file, output }) => {
            let manifest = read_manifest(&file)?;
            let r: PolicyApplyResult = client
                .post("/v1/policies", &PolicyApplyRequest { manifest })
                .await?;
            if output == Output::Json {
                return print_json(&r);
            }
            for p in &r.policies {
                let scope = p
                    .namespace
                    .as_ref()
                    .map(|n| format!("{n}/"))
                    .unwrap_or_default();
                println!("{} policy {scope}{} {}", p.kind, p.name, p.action);
            }
            println!("enforced ({} map updates)", r.map_operations);
        }
        Command::Policy(PolicyCmd::Delete {
            name,
            namespace,
            clusterwide,
        }) => {
            let path = if clusterwide {
                format!("/v1/policies/{name}")
            } else {
                format!(
                    "/v1/policies/{name}?namespace={}",
                    namespace.as_deref().unwrap_or("default")
                )
            };
            let r: PolicyDeleteResult = client.delete(&path).await?;
            for p in &r.deleted {
                let scope = p
                    .namespace
                    .as_ref()
                    .map(|n| format!("{n}/"))
                    .unwrap_or_default();
                println!("{} policy {scope}{} deleted", p.kind, p.name);
            }
            println!("enforced ({} map updates)", r.map_operations);
        }
        Command::Policy(PolicyCmd::List { output }) => {
            let ps: Vec<PolicyView> = client.get("/v1/policies").await?;
            if output == Output::Json {
                return print_json(&ps);
            }
            let rows: Vec<Vec<String>> = ps
                .iter()
                .map(|p| {
                    vec![
                        p.kind.clone(),
                        p.namespace.clone().unwrap_or_else(|| "-".into()),
                        p.name.clone(),
                        format!("{}/{}", p.ingress_rules, p.ingress_deny_rules),
                        format!("{}/{}", p.egress_rules, p.egress_deny_rules),
                        p.selects.join(","),
                        if p.audit { "audit" } else { "enforced" }.to_string(),
                        p.source.clone(),
                    ]
                })
                .collect();
            println!(
                "{}",
                table(
                    &[
                        "KIND",
                        "NAMESPACE",
                        "NAME",
                        "INGRESS(allow/deny)",
                        "EGRESS(allow/deny)",
                        "SELECTS",
                        "MODE",
                        "SOURCE"
                    ],
                    &rows
                )
            );
        }
        Command::Policy(PolicyCmd::Trace {
            from,
            to,
            to_fqdn,
            port,
            output,
        }) => {
            let (port, protocol) = match port.split_once('/') {
                Some((p, proto)) => (p, Some(proto.to_string())),
                None => (port.as_str(), None),
            };
            let port: u16 = port
                .parse()
                .with_context(|| format!("--port {port:?} is not a port number"))?;
            if let Some(name) = to_fqdn {
                let t: FqdnTraceResult = client
                    .post(
                        "/v1/trace/fqdn",
                        &FqdnTraceRequest {
                            from,
                            name,
                            port,
                            protocol,
                        },
                    )
                    .await?;
                if output == Output::Json {
                    return print_json(&t);
                }
                print_fqdn_trace(&t);
                return Ok(());
            }
            // clap requires one of --to and --to-fqdn.
            let to = to.unwrap_or_default();
            let t: TraceResult = client
                .post(
                    "/v1/trace",
                    &TraceRequest {
                        from,
                        to,
                        port,
                        protocol,
                    },
                )
                .await?;
            if output == Output::Json {
                return print_json(&t);
            }
            print_trace(&t);
        }
        Command::Prefilter(cmd) => crate::prefilter::run(&client, cmd).await?,
        Command::Observe(args) => {
            let sub = matches.subcommand_matches("observe").unwrap_or(matches);
            observe(&client, args, sub).await?;
        }
        Command::Endpoint(EndpointCmd::Audit {
            name,
            state,
            output,
        }) => {
            let e: EndpointView = client
                .post(
                    &format!("/v1/endpoints/{name}/audit"),
                    &EndpointAuditRequest {
                        audit: state == OnOff::On,
                    },
                )
                .await?;
            if output == Output::Json {
                return print_json(&e);
            }
            println!(
                "endpoint {}/{}: {}",
                e.namespace,
                e.name,
                e.audit
                    .as_deref()
                    .map_or("enforced".to_string(), |why| format!("in audit ({why})"))
            );
        }
        Command::Namespace(NamespaceCmd::Mode {
            namespace,
            mode,
            output,
        }) => {
            let mode = match mode {
                Mode::Discover => "discover",
                Mode::Monitor => "monitor",
                Mode::Protect => "protect",
            };
            let v: NamespaceModeView = client
                .post(
                    &format!("/v1/namespaces/{namespace}/mode"),
                    &NamespaceModeRequest { mode: mode.into() },
                )
                .await?;
            if output == Output::Json {
                return print_json(&v);
            }
            println!(
                "namespace {} mode {} (was {}; {} endpoints, {} map updates)",
                v.namespace, v.mode, v.previous, v.endpoints, v.map_operations
            );
        }
        Command::Policy(PolicyCmd::Suggest {
            namespace,
            since,
            format,
        }) => {
            let log = connections(&client, namespace.as_deref(), since.as_deref()).await?;
            let s = suggest::suggest(
                &log.log,
                &suggest::Options {
                    namespace,
                    format: match format {
                        SuggestOutput::Palisade => SuggestFormat::Palisade,
                        SuggestOutput::K8s => SuggestFormat::Kubernetes,
                    },
                },
            );
            print!("{}", s.yaml);
            eprintln!(
                "palisade: {} policies, {} rules, from {} flows",
                s.policies, s.rules, s.flows
            );
        }
        Command::Policy(PolicyCmd::WhatIf { .. }) => {
            unreachable!("`run` answers policy what-if itself")
        }
        Command::Map {
            namespace,
            since,
            output,
        } => {
            let map = service_map(&client, namespace.as_deref(), since.as_deref()).await?;
            match output {
                MapOutput::Svg => print!("{}", map.to_svg()),
                MapOutput::Dot => print!("{}", map.to_dot()),
            }
        }
        Command::Conntrack(ConntrackCmd::List { output }) => {
            let entries: Vec<ConntrackView> = client.get("/v1/conntrack").await?;
            if output == Output::Json {
                return print_json(&entries);
            }
            let rows: Vec<Vec<String>> = entries
                .iter()
                .map(|c| {
                    vec![
                        c.endpoint.clone(),
                        c.scope.clone(),
                        c.protocol.clone(),
                        format!("{}:{}", c.source, c.source_port),
                        format!("{}:{}", c.destination, c.destination_port),
                        c.flags.join(","),
                        format!("{}s", c.expires_in_seconds),
                        c.packets.to_string(),
                        c.rule.clone(),
                    ]
                })
                .collect();
            println!(
                "{}",
                table(
                    &[
                        "ENDPOINT",
                        "SCOPE",
                        "PROTO",
                        "SOURCE",
                        "DESTINATION",
                        "STATE",
                        "EXPIRES",
                        "PACKETS",
                        "RULE"
                    ],
                    &rows
                )
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_if_groups_changes_by_source_and_destination() {
        use palisade_api::types::WhatIfChange;
        let change = |src: &str, port: u16| WhatIfChange {
            source: src.into(),
            destination: "shop/app=db".into(),
            source_sample: format!("{src}-1"),
            destination_sample: "shop/db-1".into(),
            side: "ingress of shop/db-1".into(),
            protocol: "TCP".into(),
            port,
            http: None,
            change: "newly-denied".into(),
            before: "allowed (no policy restricts it)".into(),
            after: "default deny (ingress)".into(),
            endpoint_in_audit: false,
            flows: 1,
            first_seen: 0,
            last_seen: 0,
        };
        let r = WhatIfResult {
            replayed: 5,
            flows: 9,
            skipped: 0,
            newly_denied: 3,
            newly_allowed: 0,
            newly_audited: 0,
            changes: vec![
                change("shop/app=a", 5432),
                change("shop/app=a", 22),
                change("shop/app=b", 5432),
            ],
        };
        let text = what_if_text(&r);
        assert_eq!(
            text.matches("shop/app=a -> shop/app=db").count(),
            1,
            "{text}"
        );
        assert!(text.contains("shop/app=b -> shop/app=db"), "{text}");
        assert!(text.contains("  22/TCP NEWLY-DENIED: 1 flow (shop/app=a-1 -> shop/db-1), last seen 1970-01-01T00:00:00Z"), "{text}");
        assert!(text.contains("would change 3: 3 newly denied"), "{text}");
        let none = what_if_text(&WhatIfResult::default());
        assert!(none.ends_with("nothing would change\n"), "{none}");
        assert_eq!(query_value("a b&c"), "a%20b%26c");
    }

    #[test]
    fn not_negates_only_the_next_filter() {
        // observe --pod a/x --not --verdict DROPPED --verdict AUDIT
        let f = build_filter(
            vec![
                (2, Field::Pod, "a/x".into()),
                (5, Field::Verdict, "DROPPED".into()),
                (7, Field::Verdict, "AUDIT".into()),
            ],
            &[3],
        );
        assert_eq!(f.criteria.len(), 3);
        assert!(!f.criteria[0].negate && f.criteria[0].field == Field::Pod);
        assert!(f.criteria[1].negate && f.criteria[1].values == vec!["DROPPED".to_string()]);
        assert!(!f.criteria[2].negate && f.criteria[2].values == vec!["AUDIT".to_string()]);
    }

    #[test]
    fn repeated_flags_are_alternatives() {
        let f = build_filter(
            vec![
                (2, Field::ToPod, "a/x".into()),
                (4, Field::ToPod, "a/y".into()),
            ],
            &[],
        );
        assert_eq!(f.criteria.len(), 1);
        assert_eq!(f.criteria[0].values.len(), 2);
    }

    #[test]
    fn pod_flag_filters_either_side() {
        use clap::CommandFactory as _;
        let m = Cli::command()
            .try_get_matches_from(["palisade", "observe", "--pod", "shop/web-", "--pod", "db"])
            .unwrap();
        let f = observe_filter(m.subcommand_matches("observe").unwrap());
        assert_eq!(
            f.criteria,
            vec![Criterion {
                field: Field::Pod,
                values: vec!["shop/web-".into(), "db".into()],
                negate: false,
            }]
        );
        assert!(f.validate().is_ok());
    }

    #[test]
    fn cli_indices_reach_the_filter() {
        use clap::{CommandFactory as _, FromArgMatches as _};
        let m = Cli::command()
            .try_get_matches_from([
                "palisade",
                "observe",
                "--not",
                "--verdict",
                "DROPPED",
                "--to-port",
                "80",
            ])
            .unwrap();
        let sub = m.subcommand_matches("observe").unwrap();
        let f = observe_filter(sub);
        assert!(Cli::from_arg_matches(&m).is_ok());
        assert_eq!(f.criteria.len(), 2);
        let verdict = f
            .criteria
            .iter()
            .find(|c| c.field == Field::Verdict)
            .unwrap();
        assert!(verdict.negate);
        let port = f
            .criteria
            .iter()
            .find(|c| c.field == Field::ToPort)
            .unwrap();
        assert!(!port.negate);
    }
}
