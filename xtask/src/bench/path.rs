//! Two endpoints routed through a node namespace, side by side: the plain path (no filtering
//! at all), iptables and nftables filters on it, and Palisade with and without policy and its
//! fast path. Each scenario is measured for keep-alive requests/s (wrk against nginx), new
//! connections/s (wrk, a connection per request) and TCP throughput (iperf3, one stream), in
//! interleaved rounds: every round measures every scenario once, so what the rest of the
//! machine does lands on all of them alike.

use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::process::Command;
use std::time::Instant;

use anyhow::{Context as _, bail};
use palisade_integration::Node;

use super::stats::Summary;
use super::svg::{self, Bar};
use super::tools::{self, Daemon};

/// Client and server addresses of the plain topology (Palisade's come from its pod CIDR).
const PLAIN_CLIENT: Ipv4Addr = Ipv4Addr::new(10, 210, 0, 2);
const PLAIN_SERVER: Ipv4Addr = Ipv4Addr::new(10, 210, 0, 3);
const IPERF_PORT: u16 = 5201;

fn sh(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .with_context(|| format!("running {args:?}"))?;
    if !out.status.success() {
        bail!(
            "{args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `ip netns exec NS` + a command, reading its script from `input`.
fn in_ns_with_input(netns: &str, args: &[&str], input: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    let mut child = Command::new("ip")
        .args(["netns", "exec", netns])
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("running {args:?} in {netns}"))?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(input.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "{args:?} in {netns} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// The plain path: a node namespace and two endpoint namespaces joined to it exactly as
/// Palisade joins its own (a /32 each, a default route via the link-local gateway pinned to
/// the host side's MAC, a /32 route per endpoint in the node), with nothing filtering.
struct PlainNode {
    node: String,
    client: String,
    server: String,
}

impl PlainNode {
    fn create(tag: &str) -> anyhow::Result<PlainNode> {
        let p = PlainNode {
            node: format!("{tag}-node"),
            client: format!("{tag}-client"),
            server: format!("{tag}-server"),
        };
        for ns in [&p.node, &p.client, &p.server] {
            let _ = sh(&["ip", "netns", "del", ns]);
            sh(&["ip", "netns", "add", ns])?;
            sh(&["ip", "-n", ns, "link", "set", "lo", "up"])?;
            let _ = sh(&[
                "ip",
                "netns",
                "exec",
                ns,
                "sysctl",
                "-qw",
                "net.ipv6.conf.all.disable_ipv6=1",
            ]);
        }
        sh(&[
            "ip",
            "netns",
            "exec",
            &p.node,
            "sysctl",
            "-qw",
            "net.ipv4.ip_forward=1",
        ])?;
        for (ns, ip, host) in [
            (&p.client, PLAIN_CLIENT, "plh1"),
            (&p.server, PLAIN_SERVER, "plh2"),
        ] {
            sh(&[
                "ip", "-n", &p.node, "link", "add", host, "type", "veth", "peer", "name", "eth0",
                "netns", ns,
            ])?;
            let mac = sh(&["ip", "-n", &p.node, "-j", "link", "show", host])?;
            let mac: serde_json::Value = serde_json::from_str(&mac)?;
            let mac = mac[0]["address"].as_str().context("host MAC")?.to_string();
            let addr = format!("{ip}/32");
            for args in [
                vec!["ip", "-n", ns, "addr", "add", &addr, "dev", "eth0"],
                vec!["ip", "-n", ns, "link", "set", "eth0", "up"],
                vec![
                    "ip",
                    "-n",
                    ns,
                    "route",
                    "add",
                    "169.254.1.1",
                    "dev",
                    "eth0",
                    "scope",
                    "link",
                ],
                vec![
                    "ip",
                    "-n",
                    ns,
                    "route",
                    "add",
                    "default",
                    "via",
                    "169.254.1.1",
                    "dev",
                    "eth0",
                ],
                vec![
                    "ip",
                    "-n",
                    ns,
                    "neigh",
                    "add",
                    "169.254.1.1",
                    "lladdr",
                    &mac,
                    "dev",
                    "eth0",
                    "nud",
                    "permanent",
                ],
                vec!["ip", "-n", &p.node, "link", "set", host, "up"],
                vec![
                    "ip", "-n", &p.node, "route", "add", &addr, "dev", host, "scope", "link",
                ],
            ] {
                sh(&args)?;
            }
        }
        Ok(p)
    }
}

impl Drop for PlainNode {
    fn drop(&mut self) {
        for ns in [&self.node, &self.client, &self.server] {
            let _ = sh(&["ip", "netns", "del", ns]);
        }
    }
}

/// `n` peer addresses that are not the client's: CIDR peers of the filters.
fn peers(n: usize) -> Vec<Ipv4Addr> {
    (0..n)
        .map(|k| {
            let index = u32::try_from(k).expect("few peers");
            let [_, hi, mid, lo] = index.to_be_bytes();
            Ipv4Addr::new(172, 16 + hi, mid, lo)
        })
        .collect()
}

/// The iptables filters on the plain node's FORWARD chain. `linear`: every packet of the
/// client's direction walks the peer rules (the client's is last), replies are accepted by
/// the first rule; `established`: a conntrack ESTABLISHED rule first, so only new connections
/// walk them.
fn iptables_rules(n: usize, established: bool, client: Ipv4Addr, server: Ipv4Addr) -> String {
    let mut r =
        String::from("*filter\n:INPUT ACCEPT [0:0]\n:FORWARD DROP [0:0]\n:OUTPUT ACCEPT [0:0]\n");
    if established {
        r.push_str("-A FORWARD -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT\n");
    } else {
        let _ = writeln!(r, "-A FORWARD -s {server}/32 -j ACCEPT");
    }
    for p in peers(n.saturating_sub(1)).into_iter().chain([client]) {
        let _ = writeln!(
            r,
            "-A FORWARD -s {p}/32 -d {server}/32 -p tcp -m multiport --dports 80,{IPERF_PORT} -j ACCEPT"
        );
    }
    r.push_str("COMMIT\n");
    r
}

/// The nftables filter: established connections accepted by conntrack, new ones by a lookup
/// in a hash set of peers.
fn nft_rules(n: usize, client: Ipv4Addr, server: Ipv4Addr) -> String {
    let elements: Vec<String> = peers(n.saturating_sub(1))
        .into_iter()
        .chain([client])
        .map(|p| p.to_string())
        .collect();
    format!(
        "table inet palbench {{\n  set peers {{ type ipv4_addr; elements = {{ {} }} }}\n  chain forward {{\n    type filter hook forward priority 0; policy drop;\n    ct state established,related accept\n    ip saddr @peers ip daddr {server} tcp dport {{ 80, {IPERF_PORT} }} accept\n  }}\n}}\n",
        elements.join(", ")
    )
}

/// A CiliumNetworkPolicy on the server allowing `n` CIDR peers (the client's /32 among them)
/// to its ports.
fn cidr_policy(n: usize, client: Ipv4Addr) -> String {
    let mut y = String::from(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: bench-peers, namespace: bench}\nspec:\n  endpointSelector: {matchLabels: {app: server}}\n  ingress:\n  - fromCIDRSet:\n",
    );
    for p in peers(n.saturating_sub(1)).into_iter().chain([client]) {
        let _ = writeln!(y, "    - cidr: {p}/32");
    }
    let _ = writeln!(
        y,
        "    toPorts: [{{ports: [{{port: \"80\", protocol: TCP}}, {{port: \"{IPERF_PORT}\", protocol: TCP}}]}}]"
    );
    y
}

/// A policy on the server allowing the endpoints labelled `within<n>: "yes"`: the client and
/// `n - 1` label peers, each its own identity, matched by one selector.
fn label_policy(n: usize) -> String {
    format!(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{name: bench-peers, namespace: bench}}\nspec:\n  endpointSelector: {{matchLabels: {{app: server}}}}\n  ingress:\n  - fromEndpoints: [{{matchLabels: {{within{n}: \"yes\"}}}}]\n    toPorts: [{{ports: [{{port: \"80\", protocol: TCP}}, {{port: \"{IPERF_PORT}\", protocol: TCP}}]}}]\n"
    )
}

/// The labels of label peer `k` (0 is the client): `within<n>=yes` for every `n` above `k`.
fn peer_labels(k: usize, counts: &[usize]) -> String {
    let mut l = if k == 0 {
        "app=client".to_string()
    } else {
        format!("role=peer,n=p{k}")
    };
    for n in counts.iter().filter(|n| k < **n) {
        let _ = write!(l, ",within{n}=yes");
    }
    l
}

/// How a scenario is put in place on its node, and taken away.
#[derive(Clone, Debug)]
enum Setup {
    Plain,
    Iptables {
        peers: usize,
        established: bool,
    },
    Nftables {
        peers: usize,
    },
    /// Palisade node 0 (the defaults), 1 (`--no-fast-path`) or 2 (also
    /// `--conntrack-accounting`), with no policy or one of these.
    Palisade {
        node: usize,
        policy: Option<PeerPolicy>,
    },
}

#[derive(Clone, Copy, Debug)]
enum PeerPolicy {
    Cidr(usize),
    /// The client and this many label peers minus one, all matched by one selector.
    Labels(usize),
}

struct Scenario {
    name: String,
    setup: Setup,
}

/// One round's measures of one scenario.
#[derive(Clone, Copy, Debug, Default)]
struct Sample {
    rps: f64,
    cps: f64,
    gbps: f64,
}

/// A node the scenarios run on: where the client and server are, and what serves.
struct Pair {
    client_ns: String,
    server_ip: Ipv4Addr,
    _nginx: Daemon,
    _iperf: Daemon,
}

fn serve(server_ns: &str, dir: &std::path::Path, name: &str) -> anyhow::Result<(Daemon, Daemon)> {
    let nginx = tools::nginx_ok(server_ns, dir, name)?;
    let iperf = Daemon::spawn(server_ns, &["iperf3", "-s", "-p", "5201"])?;
    std::thread::sleep(std::time::Duration::from_millis(300));
    Ok((nginx, iperf))
}

/// What `cargo xtask bench datapath` measures, and how long each measure runs.
pub struct Options {
    pub rounds: usize,
    pub seconds: u32,
    /// Peer counts of Palisade's CIDR policies.
    pub peer_counts: Vec<usize>,
    /// Peer counts of the iptables and nftables scenarios.
    pub filter_peers: Vec<usize>,
    /// Label peers (each an endpoint) up to this many.
    pub label_peers: Vec<usize>,
    /// Also measure an agent with `--no-fast-path`.
    pub without_fast_path: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            rounds: 3,
            seconds: 3,
            peer_counts: vec![10, 1_000, 10_000],
            filter_peers: vec![10_000],
            label_peers: vec![10, 100],
            without_fast_path: true,
        }
    }
}

impl Options {
    /// The defaults, or what `PALISADE_BENCH_ROUNDS`, `_SECONDS`, `_PEERS`, `_FILTER_PEERS`
    /// and `_LABEL_PEERS` (comma-separated counts) say, for shorter or longer runs.
    pub fn from_env() -> anyhow::Result<Options> {
        let mut o = Options::default();
        let var = |name: &str| std::env::var(format!("PALISADE_BENCH_{name}")).ok();
        let list = |v: String| -> anyhow::Result<Vec<usize>> {
            v.split(',')
                .filter(|s| !s.is_empty())
                .map(|s| {
                    s.trim()
                        .parse()
                        .with_context(|| format!("{s:?} is not a count"))
                })
                .collect()
        };
        if let Some(v) = var("ROUNDS") {
            o.rounds = v.parse().context("PALISADE_BENCH_ROUNDS")?;
        }
        if let Some(v) = var("SECONDS") {
            o.seconds = v.parse().context("PALISADE_BENCH_SECONDS")?;
        }
        if let Some(v) = var("PEERS") {
            o.peer_counts = list(v)?;
        }
        if let Some(v) = var("FILTER_PEERS") {
            o.filter_peers = list(v)?;
        }
        if let Some(v) = var("LABEL_PEERS") {
            o.label_peers = list(v)?;
        }
        Ok(o)
    }
}

fn measure(pair: &Pair, seconds: u32) -> anyhow::Result<Sample> {
    let url = format!("http://{}/", pair.server_ip);
    let keep_alive = tools::wrk(&pair.client_ns, &url, 1, 16, seconds, false)?;
    let cps = tools::wrk(&pair.client_ns, &url, 1, 16, seconds, true)?.requests_per_second;
    let gbps = tools::iperf3(&pair.client_ns, pair.server_ip, seconds)?;
    let rps = keep_alive.requests_per_second;
    eprintln!(
        "xtask:   {rps:.0} req/s (p50 {:.0} µs, p99 {:.0} µs, p99.9 {:.0} µs), {cps:.0} conn/s, {gbps:.1} Gbit/s",
        keep_alive.p50_us, keep_alive.p99_us, keep_alive.p999_us
    );
    Ok(Sample { rps, cps, gbps })
}

/// The scenarios, side by side; returns the markdown body and the SVG plot.
pub fn run(opts: &Options, dir: &std::path::Path) -> anyhow::Result<(String, String)> {
    let load_before = tools::machine_load();
    let started = Instant::now();
    let plain = PlainNode::create("plb")?;
    let scratch = std::env::temp_dir().join("palisade-bench-path");
    std::fs::create_dir_all(&scratch)?;
    let (n1, i1) = serve(&plain.server, &scratch, "plain")?;
    let plain_pair = Pair {
        client_ns: plain.client.clone(),
        server_ip: PLAIN_SERVER,
        _nginx: n1,
        _iperf: i1,
    };

    let mut nodes = Vec::new();
    let mut pal_pairs = Vec::new();
    let variants: &[(usize, &[&str])] = if opts.without_fast_path {
        &[
            (0, &[]),
            (1, &["--no-fast-path"]),
            (2, &["--no-fast-path", "--conntrack-accounting"]),
        ]
    } else {
        &[(0, &[])]
    };
    for (k, args) in variants {
        let node = Node::start_tagged(&format!("pb{k}"), "bench-path", args);
        let client = node.add_endpoint("client", "bench", &peer_labels(0, &opts.label_peers));
        let server = node.add_endpoint("server", "bench", "app=server");
        let (n, i) = serve(&server.name, &scratch, &format!("pal{k}"))?;
        pal_pairs.push(Pair {
            client_ns: client.name.clone(),
            server_ip: server.ip,
            _nginx: n,
            _iperf: i,
        });
        nodes.push((node, client));
    }
    // Label peers on node 0: endpoints of their own identities that the selector matches.
    let most_labels = opts.label_peers.iter().copied().max().unwrap_or(0);
    let made = Instant::now();
    for k in 1..most_labels {
        nodes[0].0.add_endpoint(
            &format!("p{k}"),
            "bench",
            &peer_labels(k, &opts.label_peers),
        );
    }
    let label_setup = made.elapsed();

    let mut scenarios = vec![Scenario {
        name: "plain veth path, no filtering".into(),
        setup: Setup::Plain,
    }];
    for &n in &opts.filter_peers {
        scenarios.push(Scenario {
            name: format!("iptables, {n} rules, linear"),
            setup: Setup::Iptables {
                peers: n,
                established: false,
            },
        });
        scenarios.push(Scenario {
            name: format!("iptables, ESTABLISHED first, then {n} rules"),
            setup: Setup::Iptables {
                peers: n,
                established: true,
            },
        });
        scenarios.push(Scenario {
            name: format!("nftables, hash set of {n} peers"),
            setup: Setup::Nftables { peers: n },
        });
    }
    scenarios.push(Scenario {
        name: "Palisade, no policy".into(),
        setup: Setup::Palisade {
            node: 0,
            policy: None,
        },
    });
    for &n in &opts.peer_counts {
        scenarios.push(Scenario {
            name: format!("Palisade, {n} CIDR peers"),
            setup: Setup::Palisade {
                node: 0,
                policy: Some(PeerPolicy::Cidr(n)),
            },
        });
    }
    for &n in &opts.label_peers {
        scenarios.push(Scenario {
            name: format!("Palisade, {n} label peers"),
            setup: Setup::Palisade {
                node: 0,
                policy: Some(PeerPolicy::Labels(n)),
            },
        });
    }
    if let Some(&n) = opts
        .peer_counts
        .iter()
        .max()
        .filter(|_| opts.without_fast_path)
    {
        scenarios.push(Scenario {
            name: format!("Palisade --no-fast-path, {n} CIDR peers"),
            setup: Setup::Palisade {
                node: 1,
                policy: Some(PeerPolicy::Cidr(n)),
            },
        });
        scenarios.push(Scenario {
            name: format!(
                "Palisade --no-fast-path --conntrack-accounting (as before this change), {n} CIDR peers"
            ),
            setup: Setup::Palisade {
                node: 2,
                policy: Some(PeerPolicy::Cidr(n)),
            },
        });
    }

    let mut samples: Vec<Vec<Sample>> = vec![Vec::new(); scenarios.len()];
    for round in 0..opts.rounds {
        for (sc, out) in scenarios.iter().zip(&mut samples) {
            eprintln!("xtask: round {}/{}: {}", round + 1, opts.rounds, sc.name);
            let pair = match &sc.setup {
                Setup::Plain => &plain_pair,
                Setup::Iptables { peers, established } => {
                    in_ns_with_input(
                        &plain.node,
                        &["iptables-restore"],
                        &iptables_rules(*peers, *established, PLAIN_CLIENT, PLAIN_SERVER),
                    )?;
                    &plain_pair
                }
                Setup::Nftables { peers } => {
                    in_ns_with_input(
                        &plain.node,
                        &["nft", "-f", "-"],
                        &nft_rules(*peers, PLAIN_CLIENT, PLAIN_SERVER),
                    )?;
                    &plain_pair
                }
                Setup::Palisade { node, policy } => {
                    let (n, client) = &nodes[*node];
                    match policy {
                        None => {}
                        Some(PeerPolicy::Cidr(k)) => n.apply(&cidr_policy(*k, client.ip)),
                        Some(PeerPolicy::Labels(k)) => n.apply(&label_policy(*k)),
                    }
                    &pal_pairs[*node]
                }
            };
            let s = measure(pair, opts.seconds);
            // Taken away before the result is looked at, so a failure leaves no filter behind.
            match &sc.setup {
                Setup::Plain => {}
                Setup::Iptables { .. } => {
                    in_ns_with_input(
                        &plain.node,
                        &["iptables-restore"],
                        "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n",
                    )?;
                    // conntrack entries made under the ESTABLISHED rule would speed up the next.
                    let _ = sh(&[
                        "ip",
                        "netns",
                        "exec",
                        &plain.node,
                        "sh",
                        "-c",
                        "command -v conntrack >/dev/null && conntrack -F",
                    ]);
                }
                Setup::Nftables { .. } => {
                    let _ = sh(&[
                        "ip",
                        "netns",
                        "exec",
                        &plain.node,
                        "nft",
                        "delete",
                        "table",
                        "inet",
                        "palbench",
                    ]);
                }
                Setup::Palisade { node, policy } => {
                    if policy.is_some() {
                        nodes[*node].0.palisade_ok(&[
                            "policy",
                            "delete",
                            "bench-peers",
                            "--namespace",
                            "bench",
                        ]);
                    }
                }
            }
            out.push(s.with_context(|| format!("measuring {}", sc.name))?);
        }
    }
    let load_after = tools::machine_load();

    let summaries: Vec<[Summary; 3]> = samples
        .iter()
        .map(|s| {
            let pick = |f: fn(&Sample) -> f64| Summary::of(&s.iter().map(f).collect::<Vec<_>>());
            [pick(|x| x.rps), pick(|x| x.cps), pick(|x| x.gbps)]
        })
        .collect();
    let base = summaries[0];
    let ratio = |v: f64, b: f64| if b > 0.0 { 100.0 * v / b } else { 0.0 };
    let mut table = String::from(
        "| path | keep-alive requests/s | % of plain | new connections/s | % of plain | TCP Gbit/s | % of plain |\n|---|---|---|---|---|---|---|\n",
    );
    let mut bars = Vec::new();
    for (sc, s) in scenarios.iter().zip(&summaries) {
        let _ = writeln!(
            table,
            "| {} | {} | {:.0}% | {} | {:.0}% | {} | {:.0}% |",
            sc.name,
            s[0].show(1e-3, 1).replace(" (", "k ("),
            ratio(s[0].median, base[0].median),
            s[1].show(1e-3, 1).replace(" (", "k ("),
            ratio(s[1].median, base[1].median),
            s[2].show(1.0, 1),
            ratio(s[2].median, base[2].median),
        );
        bars.push(Bar {
            label: sc.name.clone(),
            values: vec![
                ratio(s[0].median, base[0].median),
                ratio(s[1].median, base[1].median),
                ratio(s[2].median, base[2].median),
            ],
        });
    }
    let plot = svg::bars(
        "Throughput as % of the plain veth path (median of interleaved rounds)",
        &[
            "keep-alive requests/s",
            "new connections/s",
            "TCP throughput",
        ],
        &bars,
    );
    let body = format!(
        "Two endpoints routed through a node namespace (the layout Palisade makes: a /32 per \
         endpoint, a link-local gateway, a /32 route per endpoint in the node). Keep-alive \
         requests: wrk -t1 -c16 against nginx (one worker, a fixed 200); new connections: the \
         same with `Connection: close`, so every request is a connection of its own; TCP \
         throughput: iperf3, one stream. {rounds} interleaved rounds of {secs} s per measure; \
         median (min–max). Release agent. Filters allow the client's address among N peers on \
         ports 80 and 5201: iptables in the node's FORWARD chain (linear: every forward packet \
         walks the rules, the client's last; or behind an ESTABLISHED rule), nftables with a \
         hash set behind `ct state established`, Palisade with one policy on the server. Label \
         peers are endpoints of their own (one identity each) matched by one selector (the \
         {most_labels} of them took {label_setup:.1?} to create); 10,000 label identities \
         would need 10,000 endpoints on this node, so that row is the policy-scale \
         benchmark's.\n\n{table}\n![ratio to the plain path](datapath.svg)\n\n\
         The machine meanwhile (it is shared with other work, which is why the rounds are \
         interleaved): before: {load_before}; after: {load_after}. The run took {took:.0?}.\n",
        rounds = opts.rounds,
        secs = opts.seconds,
        took = started.elapsed(),
    );
    drop(nodes);
    let _ = dir;
    Ok((body, plot))
}
