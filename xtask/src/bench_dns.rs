//! `cargo xtask bench dns`: the DNS proxy against asking dnsmasq directly, in one run.
//!
//! A client endpoint asks dnsmasq (in another endpoint) for one name, closed loop from four
//! sockets for a few seconds: once with no policy (direct), once with a DNS rule redirecting
//! the client's DNS through the proxy (which learns the answer into the maps before releasing
//! it). Interleaved rounds, medians reported. Then a burst: 1,000 lookups of new names at
//! 1,000/s, each followed at once by a TCP connection to the address it returned; every
//! answer must be learned (a compile and a map write) before it is released, so no first
//! connection may be dropped. They are counted. Last, learned answers per second: another
//! `BURST` new names asked as fast as answers come back (a window of lookups outstanding per
//! socket), timed until the client holds every answer, each released only once the maps
//! allow its address; the agent's compile-time histogram says what each cost the engine.

use std::net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::bail;
use palisade_integration::Node;
use palisade_integration::dns::{build_query, read_reply, resolver, world_with};
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

const METRICS_PORT: u16 = 9962;

/// The agent's compile-time histogram: (sum of seconds, count).
fn compile_seconds(node_netns: &str) -> anyhow::Result<(f64, u64)> {
    let text = in_netns(node_netns, || -> std::io::Result<String> {
        use std::io::{Read, Write};
        let mut s = TcpStream::connect((Ipv4Addr::LOCALHOST, METRICS_PORT))?;
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: agent\r\nConnection: close\r\n\r\n")?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out)
    })?;
    let value = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name).map(str::trim))
            .map(str::to_string)
    };
    let sum = value("palisade_policy_compile_seconds_sum ").and_then(|v| v.parse::<f64>().ok());
    let count = value("palisade_policy_compile_seconds_count ").and_then(|v| v.parse::<u64>().ok());
    match (sum, count) {
        (Some(sum), Some(count)) => Ok((sum, count)),
        _ => bail!("the agent's metrics have no palisade_policy_compile_seconds"),
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

/// `BURST` new names (`learned_name`), asked from `WORKERS` sockets with `WINDOW` lookups
/// outstanding on each (as fast as answers come back): how long until every answer, with its
/// address, was received.
fn learned_burst(netns: &str, server: Ipv4Addr) -> Learned {
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
                        while waiting.len() < WINDOW {
                            let Some(i) = todo.next() else { break };
                            let (name, addr) = learned_name(i);
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
    let started = Instant::now();
    let handles: Vec<_> = (0..WORKERS)
        .map(|w| {
            let netns = netns.to_string();
            std::thread::spawn(move || {
                in_netns(&netns, move || {
                    let (mut lat, mut answered, mut dropped) = (Vec::new(), 0usize, 0usize);
                    let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).expect("socket");
                    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                    s.connect((server, 53)).expect("connect");
                    let mut buf = [0u8; 1500];
                    let t0 = Instant::now();
                    for i in (w..BURST).step_by(WORKERS) {
                        // One lookup per millisecond in all.
                        let due = t0 + Duration::from_millis(u64::try_from(i).unwrap_or(0));
                        if let Some(wait) = due.checked_duration_since(Instant::now()) {
                            std::thread::sleep(wait);
                        }
                        let (name, addr) = burst_name(i);
                        let q = build_query(u16::try_from(i).unwrap_or(0), &name);
                        let t = Instant::now();
                        let reply = s
                            .send(&q)
                            .ok()
                            .and_then(|_| s.recv(&mut buf).ok())
                            .and_then(|n| read_reply(&buf[..n]));
                        let Some(reply) = reply.filter(|r| r.addresses == [addr]) else {
                            continue;
                        };
                        lat.push(t.elapsed());
                        answered += 1;
                        if TcpStream::connect_timeout(
                            &SocketAddr::from((addr, 8080)),
                            Duration::from_secs(1),
                        )
                        .is_err()
                        {
                            dropped += 1;
                        }
                        drop(reply);
                    }
                    (lat, answered, dropped)
                })
            })
        })
        .collect();
    let (mut lat, mut answered, mut dropped) = (Vec::new(), 0, 0);
    for h in handles {
        let (l, a, d) = h.join().unwrap_or_default();
        lat.extend(l);
        answered += a;
        dropped += d;
    }
    lat.sort();
    Burst {
        seconds: started.elapsed().as_secs_f64(),
        answered,
        first_connections_dropped: dropped,
        lookup_p50_us: percentile_us(&lat, 500),
        lookup_p99_us: percentile_us(&lat, 990),
    }
}

pub fn run() -> anyhow::Result<()> {
    let bin_dir = build_binaries(true)?;
    // SAFETY: single-threaded here; the fixture reads it.
    unsafe { std::env::set_var("PALISADE_BIN_DIR", &bin_dir) };
    let metrics = format!("127.0.0.1:{METRICS_PORT}");
    let node = Node::start_tagged("pal-bdns", "dns", &["--metrics-addr", &metrics]);
    let client = node.add_endpoint("client", "x", "app=client");
    let dns = node.add_endpoint("dns", "dnsbench", "k8s-app=kube-dns");
    let world = world_with(&node, &[BURST_NET]);
    let _server = traffic::tcp_server(&world, 8080);
    let names: Vec<(String, Ipv4Addr)> = (0..BURST)
        .map(burst_name)
        .chain((0..BURST).map(learned_name))
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
    let b = burst(&client.name, dns.ip);
    let learned = node.json(&["fqdn", "list"]).as_array().map_or(0, Vec::len);
    let uptime = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let (sum0, count0) = compile_seconds(&node.netns)?;
    let l = learned_burst(&client.name, dns.ip);
    let (sum1, count1) = compile_seconds(&node.netns)?;
    if l.answered == 0 {
        bail!("no answer of the open-loop burst came back: the benchmark would measure nothing");
    }
    let compiles = count1.saturating_sub(count0);
    let per_answer_ms = 1e3 * (sum1 - sum0) / l.answered as f64;
    let per_compile_ms = 1e3 * (sum1 - sum0) / compiles.max(1) as f64;
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
         Burst: {BURST} lookups of new names (`*.burst.example.test`, one address each) paced at \
         1,000/s, each followed at once by a TCP connection to the returned address. Every \
         answer means a compile and a map write before release.\n\n\
         | lookups answered | took (s) | first connections dropped | lookup p50 (µs) | lookup p99 (µs) | names in the cache after |\n|---|---|---|---|---|---|\n\
         | {} | {:.2} | {} | {:.0} | {:.0} | {} |\n\n\
         Learned answers per second: {BURST} more new names under the same `matchPattern` \
         (`l<i>.burst.example.test`, one new address each) asked from {WORKERS} sockets with \
         {WINDOW} lookups outstanding on each (a lookup unanswered after {}s is sent again); \
         timed until the client received every answer, each held by the proxy until the maps \
         allowed its address. Compile time is the agent's \
         `palisade_policy_compile_seconds` over the burst (compile and diff, not the map \
         write). Load average before: {}.\n\n\
         | answers received | took (s) | learned answers/s | lookups sent again | compiles | compile time per learned answer (ms) | per compile (ms) |\n|---|---|---|---|---|---|---|\n\
         | {} | {:.2} | {:.0} | {} | {} | {:.3} | {:.3} |",
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
        b.answered,
        b.seconds,
        b.first_connections_dropped,
        b.lookup_p50_us,
        b.lookup_p99_us,
        learned,
        RETRY.as_secs(),
        uptime
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" "),
        l.answered,
        l.seconds,
        l.answered as f64 / l.seconds,
        l.retries,
        compiles,
        per_answer_ms,
        per_compile_ms,
    );
    write_result(
        "dns",
        "DNS proxy: throughput, added latency, first connections",
        &body,
    )
}
