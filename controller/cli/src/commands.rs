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
    ConntrackView, EndpointAddRequest, EndpointView, FlowQuery, IdentityView, LabelChange,
    PolicyApplyRequest, PolicyApplyResult, PolicyDeleteResult, PolicyView, StatusView,
    TraceRequest, TraceResult,
};

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
    /// Explain the verdict for a connection between two endpoints.
    Trace {
        #[arg(long)]
        from: String,
        #[arg(long)]
        to: String,
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
    /// tcp, udp, icmp, sctp, or http (flows of the L7 proxy).
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

fn print_json<T: Serialize>(v: &T) -> anyhow::Result<()> {
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

/// Filter flags of `observe`, by clap argument id.
const FILTER_FLAGS: [(&str, Field); 22] = [
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

/// Runs a parsed command line; `matches` keeps the order of flags (for `observe --not`).
pub async fn run(cli: Cli, matches: &clap::ArgMatches) -> anyhow::Result<()> {
    let client = Client::new(&cli.api);
    match cli.command {
        Command::Status { output } => {
            let s: StatusView = client.get("/v1/status").await?;
            if output == Output::Json {
                return print_json(&s);
            }
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
                        "SOURCE"
                    ],
                    &rows
                )
            );
        }
        Command::Policy(PolicyCmd::Trace {
            from,
            to,
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
        Command::Observe(args) => {
            let sub = matches.subcommand_matches("observe").unwrap_or(matches);
            observe(&client, args, sub).await?;
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
