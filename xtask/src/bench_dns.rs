//! `cargo xtask bench dns`: the DNS proxy against asking dnsmasq directly, in one run.
//!
//! A client endpoint asks dnsmasq (in another endpoint) for one name, closed loop from four
//! sockets for a few seconds: once with no policy (direct), once with a DNS rule redirecting
//! the client's DNS through the proxy (which learns the answer into the maps before releasing
//! it). Interleaved rounds, medians reported. Then three bursts of `BURST` new names, each
//! answer learned (a compile and a map write) before it is released: paced at 1,000 lookups/s,
//! each followed at once by a TCP connection to the address it returned (no first connection
//! may be dropped: they are counted); closed loop (one lookup outstanding per socket); open
//! loop (a window of lookups outstanding per socket), timed until the client holds every
//! answer. The agent's metrics, scraped around each burst, say where a learned answer's time
//! went: the server, the wait for the engine, and each stage of the engine's task.

use std::net::{Ipv4Addr, TcpStream, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::bail;
use palisade_integration::Node;
use palisade_integration::dns::{build_query, paced_burst, read_reply, resolver, world_with};
use palisade_integration::traffic::{self, in_netns};

use crate::bench::write_result;
use crate::build_binaries;

const BURST: usize = 1_000;
const BURST_NET: &str = "198.18.0.0/16";
const WORKERS: usize = 4;
const ROUND: Duration = Duration::from_secs(4);

fn burst_name(i: usize) -> (String, Ipv4Addr) {
    let (hi, lo) = (i / 250, i % 250 + 1);
    (
        format!("b{i}.burst.example.test"),
        Ipv4Addr::new(
            198,
            18,
            u8::try_from(hi).unwrap_or(0),
            u8::try_from(lo).unwrap_or(0),
        ),
    )
}

/// The names of the open-loop burst: under the same pattern, other addresses.
fn learned_name(i: usize) -> (String, Ipv4Addr) {
    let (hi, lo) = (i / 250 + 8, i % 250 + 1);
    (
        format!("l{i}.burst.example.test"),
        Ipv4Addr::new(
            198,
            18,
            u8::try_from(hi).unwrap_or(0),
            u8::try_from(lo).unwrap_or(0),
        ),
    )
}

/// The names of the closed-loop burst (one lookup outstanding per socket).
fn closed_name(i: usize) -> (String, Ipv4Addr) {
    let (hi, lo) = (i / 250 + 16, i % 250 + 1);
    (
        format!("c{i}.burst.example.test"),
        Ipv4Addr::new(
            198,
            18,
            u8::try_from(hi).unwrap_or(0),
            u8::try_from(lo).unwrap_or(0),
        ),
    )
}

const METRICS_PORT: u16 = 9962;

/// The agent's metrics, as text.
fn metrics(node_netns: &str) -> anyhow::Result<Metrics> {
    let text = in_netns(node_netns, || -> std::io::Result<String> {
        use std::io::{Read, Write};
        let mut s = TcpStream::connect((Ipv4Addr::LOCALHOST, METRICS_PORT))?;
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: agent\r\nConnection: close\r\n\r\n")?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out)
    })?;
    let m = Metrics(text);
    if m.value("palisade_policy_compile_seconds_count").is_none() {
        bail!("the agent's metrics have no palisade_policy_compile_seconds");
    }
    Ok(m)
}

/// One scrape of the agent's metrics.
struct Metrics(String);

/// The stages of the engine's learn path, as `palisade_fqdn_learn_stage_seconds` names them.
const STAGES: [&str; 5] = ["learn", "compile", "write", "publish", "persist"];

impl Metrics {
    /// The sample `series` (a name with its labels, if any); 0 when absent.
    fn value(&self, series: &str) -> Option<f64> {
        self.0.lines().find_map(|l| {
            l.strip_prefix(series)
                .and_then(|rest| rest.strip_prefix(' '))
                .and_then(|v| v.trim().parse().ok())
        })
    }

    fn get(&self, series: &str) -> f64 {
        self.value(series).unwrap_or(0.0)
    }

    /// A histogram's (sum of seconds, count).
    fn histogram(&self, name: &str, labels: &str) -> (f64, f64) {
        (
            self.get(&format!("{name}_sum{labels}")),
            self.get(&format!("{name}_count{labels}")),
        )
    }
}

/// What the agent measured between two scrapes, per learned answer.
struct Breakdown {
    /// Batches the engine learned, and the answers in them.
    batches: f64,
    answers: f64,
    /// Mean per answer, in µs: arrival to release (the server included), held for learning
    /// (queue wait for the engine included), and each engine stage (per batch, spread over
    /// its answers).
    total_us: f64,
    held_us: f64,
    stages_us: Vec<(&'static str, f64)>,
    compile_per_batch_ms: f64,
}

fn breakdown(before: &Metrics, after: &Metrics) -> Breakdown {
    let delta = |name: &str, labels: &str| {
        let (s0, c0) = before.histogram(name, labels);
        let (s1, c1) = after.histogram(name, labels);
        (s1 - s0, c1 - c0)
    };
    let answers = after.get("palisade_fqdn_learned_answers_total")
        - before.get("palisade_fqdn_learned_answers_total");
    let per_answer = |sum: f64| 1e6 * sum / answers.max(1.0);
    let (held, held_n) = delta("palisade_dns_learn_seconds", "");
    let (total, total_n) = delta("palisade_dns_latency_seconds", "");
    let mut batches = 0.0;
    let mut compile_sum = 0.0;
    let stages_us = STAGES
        .iter()
        .map(|stage| {
            let (sum, n) = delta(
                "palisade_fqdn_learn_stage_seconds",
                &format!("{{stage=\"{stage}\"}}"),
            );
            batches = n;
            if *stage == "compile" {
                compile_sum = sum;
            }
            (*stage, per_answer(sum))
        })
        .collect();
    Breakdown {
        batches,
        answers,
        total_us: 1e6 * total / total_n.max(1.0),
        held_us: 1e6 * held / held_n.max(1.0),
        stages_us,
        compile_per_batch_ms: 1e3 * compile_sum / batches.max(1.0),
    }
}

impl Breakdown {
    /// A table row: answers, batches, then the means.
    fn row(&self, what: &str) -> String {
        let engine: f64 = self.stages_us.iter().map(|(_, v)| v).sum();
        let stages: Vec<String> = self
            .stages_us
            .iter()
            .map(|(_, v)| format!("{v:.0}"))
            .collect();
        format!(
            "| {what} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {} | {:.0} | {:.2} |",
            self.answers,
            self.batches,
            self.total_us,
            (self.total_us - self.held_us).max(0.0),
            self.held_us,
            stages.join(" | "),
            (self.held_us - engine).max(0.0),
            self.compile_per_batch_ms,
        )
    }
}

/// What the learned-answers burst measured.
struct Learned {
    seconds: f64,
    answered: usize,
    /// Queries sent again after `RETRY` without an answer (lost on the way, as UDP may be).
    retries: usize,
}

/// Lookups each socket keeps outstanding in the learned-answers burst.
const WINDOW: usize = 16;
/// How long a lookup waits for its answer before it is sent again (a stub resolver's timeout).
const RETRY: Duration = Duration::from_secs(5);
/// How long the learned-answers burst may take in all.
const LEARNED_DEADLINE: Duration = Duration::from_mins(2);

/// `BURST` new names (`name(i)`), asked from `WORKERS` sockets with `window` lookups
/// outstanding on each (as fast as answers come back): how long until every answer, with its
/// address, was received.
fn learned_burst(
    netns: &str,
    server: Ipv4Addr,
    window: usize,
    name: fn(usize) -> (String, Ipv4Addr),
) -> Learned {
    let started = Instant::now();
    let handles: Vec<_> = (0..WORKERS)
        .map(|w| {
            let netns = netns.to_string();
            std::thread::spawn(move || {
                in_netns(&netns, move || {
                    let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).expect("socket");
                    let _ = s.set_read_timeout(Some(Duration::from_millis(100)));
                    s.connect((server, 53)).expect("connect");
                    let mut todo = (w..BURST).step_by(WORKERS);
                    // id -> (name, address, last sent).
                    let mut waiting: std::collections::HashMap<u16, (String, Ipv4Addr, Instant)> =
                        std::collections::HashMap::new();
                    let (mut answered, mut retries) = (0usize, 0usize);
                    let mut buf = [0u8; 1500];
                    let end = Instant::now() + LEARNED_DEADLINE;
                    loop {
                        while waiting.len() < window {
                            let Some(i) = todo.next() else { break };
                            let (name, addr) = name(i);
                            let id = u16::try_from(i).unwrap_or(0);
                            let _ = s.send(&build_query(id, &name));
                            waiting.insert(id, (name, addr, Instant::now()));
                        }
                        if waiting.is_empty() || Instant::now() > end {
                            break;
                        }
                        if let Ok(n) = s.recv(&mut buf) {
                            let id = u16::from_be_bytes([buf[0], buf[1]]);
                            if let Some((_, addr, _)) = waiting.get(&id)
                                && read_reply(&buf[..n]).is_some_and(|r| r.addresses == [*addr])
                            {
                                waiting.remove(&id);
                                answered += 1;
                            }
                        }
                        for (id, (name, _, sent)) in &mut waiting {
                            if sent.elapsed() > RETRY {
                                let _ = s.send(&build_query(*id, name));
                                *sent = Instant::now();
                                retries += 1;
                            }
                        }
                    }
                    (answered, retries)
                })
            })
        })
        .collect();
    let (mut answered, mut retries) = (0, 0);
    for h in handles {
        let (a, r) = h.join().unwrap_or_default();
        answered += a;
        retries += r;
    }
    Learned {
        seconds: started.elapsed().as_secs_f64(),
        answered,
        retries,
    }
}

fn policy(dns_ns: &str) -> String {
    format!(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{name: dns-bench, namespace: x}}\nspec:\n  endpointSelector: {{matchLabels: {{app: client}}}}\n  egress:\n  - toEndpoints: [{{matchLabels: {{\"k8s:io.kubernetes.pod.namespace\": {dns_ns}}}}}]\n    toPorts:\n    - ports: [{{port: \"53\", protocol: ANY}}]\n      rules:\n        dns: [{{matchName: bench.example.test}}, {{matchPattern: \"*.burst.example.test\"}}]\n  - toFQDNs: [{{matchName: bench.example.test}}, {{matchPattern: \"*.burst.example.test\"}}]\n    toPorts: [{{ports: [{{port: \"8080\", protocol: TCP}}]}}]\n"
    )
}

/// The `permille`th of sorted durations, in microseconds (0 without any).
fn percentile_us(sorted: &[Duration], permille: usize) -> f64 {
    let i = (sorted.len() * permille / 1000).min(sorted.len().saturating_sub(1));
    sorted.get(i).map_or(0.0, |d| d.as_secs_f64() * 1e6)
}

/// Closed-loop queries for `name` from `WORKERS` sockets for `ROUND`: (queries/s, p50 µs,
/// p99 µs, lost).
fn closed_loop(netns: &str, server: Ipv4Addr, name: &str) -> (f64, f64, f64, u64) {
    let lost = Arc::new(AtomicU64::new(0));
    let handles: Vec<_> = (0..WORKERS)
        .map(|w| {
            let (netns, name, lost) = (netns.to_string(), name.to_string(), Arc::clone(&lost));
            std::thread::spawn(move || {
                in_netns(&netns, move || {
                    let mut lat = Vec::new();
                    let Ok(s) = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)) else {
                        return lat;
                    };
                    let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
                    if s.connect((server, 53)).is_err() {
                        return lat;
                    }
                    let mut buf = [0u8; 1500];
                    let mut id = u16::try_from(w * 10_000).unwrap_or(0);
                    let end = Instant::now() + ROUND;
                    while Instant::now() < end {
                        id = id.wrapping_add(1);
                        let q = build_query(id, &name);
                        let t = Instant::now();
                        if s.send(&q).is_err() {
                            lost.fetch_add(1, Ordering::Relaxed);
                            continue;
                        }
                        match s.recv(&mut buf) {
                            Ok(n) if n >= 2 && buf[..2] == q[..2] => lat.push(t.elapsed()),
                            _ => {
                                lost.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                    lat
                })
            })
        })
        .collect();
    let mut all: Vec<Duration> = handles
        .into_iter()
        .flat_map(|h| h.join().unwrap_or_default())
        .collect();
    all.sort();
    (
        all.len() as f64 / ROUND.as_secs_f64(),
        percentile_us(&all, 500),
        percentile_us(&all, 990),
        lost.load(Ordering::Relaxed),
    )
}

/// What the burst measured.
struct Burst {
    seconds: f64,
    answered: usize,
    first_connections_dropped: usize,
    lookup_p50_us: f64,
    lookup_p99_us: f64,
}

/// `BURST` new names at 1,000/s (paced from `WORKERS` threads), each connected to at once.
fn burst(netns: &str, server: Ipv4Addr) -> Burst {
    let names: Vec<(String, Ipv4Addr)> = (0..BURST).map(burst_name).collect();
    let run = paced_burst(netns, server, &names, 1_000, WORKERS, 8080);
    Burst {
        seconds: run.seconds,
        answered: run.answered,
        first_connections_dropped: run.first_connections_dropped,
        lookup_p50_us: percentile_us(&run.lookups, 500),
        lookup_p99_us: percentile_us(&run.lookups, 990),
    }
}

pub fn run() -> anyhow::Result<()> {
    let bin_dir = build_binaries(true)?;
    // SAFETY: single-threaded here; the fixture reads it.
    unsafe { std::env::set_var("PALISADE_BIN_DIR", &bin_dir) };
    let metrics_addr = format!("127.0.0.1:{METRICS_PORT}");
    let node = Node::start_tagged("pal-bdns", "dns", &["--metrics-addr", &metrics_addr]);
    let client = node.add_endpoint("client", "x", "app=client");
    let dns = node.add_endpoint("dns", "dnsbench", "k8s-app=kube-dns");
    let world = world_with(&node, &[BURST_NET]);
    let _server = traffic::tcp_server(&world, 8080);
    let names: Vec<(String, Ipv4Addr)> = (0..BURST)
        .map(burst_name)
        .chain((0..BURST).map(learned_name))
        .chain((0..BURST).map(closed_name))
        .collect();
    let mut records: Vec<(&str, Ipv4Addr)> =
        vec![("bench.example.test", Ipv4Addr::new(192, 0, 2, 10))];
    records.extend(names.iter().map(|(n, a)| (n.as_str(), *a)));
    let _resolver = resolver(&dns.name, dns.ip, 300, &records, &node.dir);
    let policy = policy("dnsbench");

    let (mut direct, mut proxied) = (Vec::new(), Vec::new());
    for _ in 0..3 {
        direct.push(closed_loop(&client.name, dns.ip, "bench.example.test"));
        node.apply(&policy);
        proxied.push(closed_loop(&client.name, dns.ip, "bench.example.test"));
        node.palisade_ok(&["policy", "delete", "dns-bench", "--namespace", "x"]);
    }
    let median = |mut runs: Vec<(f64, f64, f64, u64)>| {
        let mid = runs.len() / 2;
        let mut pick = |f: fn(&(f64, f64, f64, u64)) -> f64| {
            runs.sort_by(|a, b| f(a).total_cmp(&f(b)));
            f(&runs[mid])
        };
        (
            pick(|r| r.0),
            pick(|r| r.1),
            pick(|r| r.2),
            runs.iter().map(|r| r.3).sum::<u64>(),
        )
    };
    let (d, p) = (median(direct), median(proxied));
    if p.0 == 0.0 {
        bail!("no query was answered through the proxy: the benchmark would measure nothing");
    }

    node.apply(&policy);
    let load = || {
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    };
    let load_before = load();
    let m0 = metrics(&node.netns)?;
    let paced_run = burst(&client.name, dns.ip);
    let m1 = metrics(&node.netns)?;
    let learned = node.json(&["fqdn", "list"]).as_array().map_or(0, Vec::len);
    let m2 = metrics(&node.netns)?;
    let closed_run = learned_burst(&client.name, dns.ip, 1, closed_name);
    let m3 = metrics(&node.netns)?;
    let open_run = learned_burst(&client.name, dns.ip, WINDOW, learned_name);
    let m4 = metrics(&node.netns)?;
    let load_after = load();
    if open_run.answered == 0 || closed_run.answered == 0 {
        bail!(
            "no answer of a learned-answers burst came back: the benchmark would measure nothing"
        );
    }
    let (paced, closed, open) = (
        breakdown(&m0, &m1),
        breakdown(&m2, &m3),
        breakdown(&m3, &m4),
    );
    let per_answer_ms = |bd: &Breakdown| {
        bd.stages_us
            .iter()
            .find(|(s, _)| *s == "compile")
            .map_or(0.0, |(_, v)| v / 1e3)
    };
    let body = format!(
        "A client endpoint asks dnsmasq (in another endpoint, same node) for one name over UDP, \
         closed loop from {WORKERS} sockets for {}s per round, 3 interleaved rounds, medians \
         (release build; the two CPUs are shared by the client, the proxy, the agent and \
         dnsmasq). Through the proxy, each answer is judged by `rules.dns` and its address \
         learned (already known after the first: no compile) before release.\n\n\
         | path | queries/s | p50 (µs) | p99 (µs) | lost |\n|---|---|---|---|---|\n\
         | direct to dnsmasq (no policy) | {:.0} | {:.0} | {:.0} | {} |\n\
         | through the DNS proxy | {:.0} | {:.0} | {:.0} | {} |\n\n\
         Added by the proxy: p50 {:+.0} µs, p99 {:+.0} µs; throughput {:.0}% of direct.\n\n\
         New names, every answer a compile and a map write before its release (load average \
         {load_before} before, {load_after} after):\n\n\
         - **paced burst**: {BURST} lookups of new names (`b<i>.burst.example.test`, one \
         address each) paced at 1,000/s from {WORKERS} sockets, each lookup followed at once by \
         a TCP connection to the returned address (a socket's next lookup waits for both);\n\
         - **closed loop**: {BURST} more (`c<i>.burst.example.test`) from {WORKERS} sockets, \
         the next lookup sent when the answer came back;\n\
         - **open loop**: {BURST} more (`l<i>.burst.example.test`) from {WORKERS} sockets with \
         {WINDOW} lookups outstanding on each (a lookup unanswered after {}s is sent again), \
         timed until the client received every answer.\n\n\
         | burst | answers | took (s) | answers/s | first connections dropped | lookup p50 (µs) | lookup p99 (µs) | lookups sent again |\n|---|---|---|---|---|---|---|---|\n\
         | paced, connection after each | {} | {:.2} | {:.0} | {} | {:.0} | {:.0} | — |\n\
         | closed loop | {} | {:.2} | {:.0} | — | — | — | {} |\n\
         | open loop | {} | {:.2} | {:.0} | — | — | — | {} |\n\n\
         Names in the cache after the paced burst: {learned}.\n\n\
         Where a learned answer's time goes, from the agent's metrics over each burst (means per \
         answer, µs): the proxy's arrival-to-release time (`palisade_dns_latency_seconds`), of it \
         the server's (forward and answer) and the time the answer was held for learning \
         (`palisade_dns_learn_seconds`), and of that each stage of the engine's task \
         (`palisade_fqdn_learn_stage_seconds`, per batch, spread over its answers); the rest of \
         the hold is the wait for the engine (queued behind the batch before) and the hand-off. \
         `persist` hands the state to the writer thread; the disk is never waited on.\n\n\
         | burst | answers | batches | arrival to release | server | held for learning | learn | compile | write | publish | persist | waiting for the engine | compile per batch (ms) |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|\n\
         {}\n{}\n{}\n\n\
         Compile time per learned answer: {:.3} ms paced, {:.3} ms closed loop, {:.3} ms open \
         loop.",
        ROUND.as_secs(),
        d.0,
        d.1,
        d.2,
        d.3,
        p.0,
        p.1,
        p.2,
        p.3,
        p.1 - d.1,
        p.2 - d.2,
        100.0 * p.0 / d.0.max(1.0),
        RETRY.as_secs(),
        paced_run.answered,
        paced_run.seconds,
        paced_run.answered as f64 / paced_run.seconds,
        paced_run.first_connections_dropped,
        paced_run.lookup_p50_us,
        paced_run.lookup_p99_us,
        closed_run.answered,
        closed_run.seconds,
        closed_run.answered as f64 / closed_run.seconds,
        closed_run.retries,
        open_run.answered,
        open_run.seconds,
        open_run.answered as f64 / open_run.seconds,
        open_run.retries,
        paced.row("paced"),
        closed.row("closed loop"),
        open.row("open loop"),
        per_answer_ms(&paced),
        per_answer_ms(&closed),
        per_answer_ms(&open),
    );
    write_result(
        "dns",
        "DNS proxy: throughput, added latency, first connections",
        &body,
    )
}
