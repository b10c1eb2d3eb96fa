//! `cargo xtask bench l7-proxy`: HTTP through Palisade's L7 proxy, directly (L3/L4 only), and
//! through nginx configured as an equivalent filtering reverse proxy, in one run, interleaved;
//! requests/s with p50, p99 and p99.9 latency, over keep-alive connections and with a new
//! connection per request; and where the proxy's own share of a request's time goes, from the
//! latency it reports in its flows.

use anyhow::{Context as _, bail};
use palisade_integration::Node;
use palisade_integration::traffic::tcp_counter;

use crate::bench::stats::Summary;
use crate::bench::tools::{self, WrkResult};
use crate::bench::write_result;
use crate::build_binaries;

/// wrk's shape: one thread, 16 connections (the figures of issue 12).
const WRK_THREADS: u32 = 1;
const WRK_CONNECTIONS: u32 = 16;
const WRK_SECONDS: u32 = 10;
const ROUNDS: usize = 3;

/// HTTP rules for the client (GET /public/.* only); the gateway (nginx, the comparison) may
/// reach the server on L3/L4 alone, so its pooled upstream connections are not the proxy's.
const L7_POLICY: &str = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: l7, namespace: x}\nspec:\n  endpointSelector: {matchLabels: {app: server}}\n  ingress:\n  - fromEndpoints: [{matchLabels: {app: client}}]\n    toPorts:\n    - ports: [{port: \"80\", protocol: TCP}]\n      rules:\n        http: [{method: GET, path: \"/public/.*\"}]\n  - fromEndpoints: [{matchLabels: {app: gateway}}]\n    toPorts:\n    - ports: [{port: \"80\", protocol: TCP}]\n";

/// The paths measured, in the order of the table.
const PATHS: [&str; 3] = [
    "direct (L3/L4 only, no proxy)",
    "Palisade L7 proxy (transparent redirect)",
    "nginx as a filtering reverse proxy",
];
const DIRECT: usize = 0;
const PALISADE: usize = 1;
const NGINX: usize = 2;

/// Keep-alive, then a new connection per request.
const MODES: [(&str, bool); 2] = [("keep-alive", false), ("new connection per request", true)];

/// The quantile of `sorted` at `permille` (500: the median), nearest rank.
fn quantile(sorted: &[f64], permille: usize) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (permille * sorted.len()).div_ceil(1000);
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// The latency the proxy reports for each request of its recent flows (judged to response head
/// relayed, µs), sorted.
fn proxy_latencies(flows: &[serde_json::Value]) -> Vec<f64> {
    let mut v: Vec<f64> = flows
        .iter()
        .filter(|f| f["http"]["status"] == 200)
        .filter_map(|f| f["http"]["latency_us"].as_f64())
        .collect();
    v.sort_by(f64::total_cmp);
    v
}

/// One wrk run and the share of the client's connection attempts whose SYN had to be sent
/// again (nstat's TcpExtTCPSynRetrans over TcpActiveOpens in the client's namespace).
struct Run {
    wrk: WrkResult,
    syn_retransmitted_pct: f64,
}

/// The client's connection attempts and SYN retransmissions so far.
fn syn_counters(netns: &str) -> (u64, u64) {
    (
        tcp_counter(netns, "TcpActiveOpens"),
        tcp_counter(netns, "TcpExtTCPSynRetrans"),
    )
}

/// Percent of `opened` connection attempts whose SYN was retransmitted.
#[expect(
    clippy::cast_precision_loss,
    reason = "counts of one benchmark round, far below 2^52"
)]
fn retransmitted_pct((opens_before, syns_before): (u64, u64), (opens, syns): (u64, u64)) -> f64 {
    let opened = opens.saturating_sub(opens_before);
    if opened == 0 {
        return 0.0;
    }
    100.0 * syns.saturating_sub(syns_before) as f64 / opened as f64
}

/// One table row: medians over the rounds (the request rate also as min–max), the p99 added
/// to the direct path's in the same mode, and the SYNs retransmitted.
fn row(name: &str, runs: &[Run], direct_p99: f64) -> String {
    let of =
        |f: fn(&WrkResult) -> f64| Summary::of(&runs.iter().map(|r| f(&r.wrk)).collect::<Vec<_>>());
    let p99 = of(|r| r.p99_us).median;
    let retransmitted = Summary::of(
        &runs
            .iter()
            .map(|r| r.syn_retransmitted_pct)
            .collect::<Vec<_>>(),
    )
    .median;
    format!(
        "| {name} | {} | {:.0} | {p99:.0} | {:.0} | {:+.0} | {retransmitted:.1} |",
        of(|r| r.requests_per_second).show(1.0, 0),
        of(|r| r.p50_us).median,
        of(|r| r.p999_us).median,
        p99 - direct_p99
    )
}

pub(crate) fn run() -> anyhow::Result<()> {
    tools::ensure_packages()?;
    let bin_dir = build_binaries(true)?;
    // SAFETY: single-threaded here; the fixture reads it.
    unsafe { std::env::set_var("PALISADE_BIN_DIR", &bin_dir) };
    // For comparisons (say `--proxy-workers 1`): agent arguments, split on spaces.
    let extra = std::env::var("PALISADE_BENCH_AGENT_ARGS").unwrap_or_default();
    let agent_args: Vec<&str> = extra.split_whitespace().collect();
    let node = Node::start_tagged("pal-bench", "l7", &agent_args);
    let client = node.add_endpoint("client", "x", "app=client");
    let server = node.add_endpoint("server", "x", "app=server");
    let gateway = node.add_endpoint("gateway", "x", "app=gateway");
    let _backend = tools::nginx(
        &server.name,
        &node.dir,
        "backend",
        2,
        "  server { listen 80 backlog=4096; location / { return 200 \"ok\\n\"; } }",
    )?;
    let proxy_block = format!(
        "  upstream backend {{ server {}:80; keepalive 64; }}\n  server {{\n    listen 80 backlog=4096;\n    location ~ ^/public/ {{\n      limit_except GET {{ deny all; }}\n      proxy_pass http://backend;\n      proxy_http_version 1.1;\n      proxy_set_header Connection \"\";\n    }}\n    location / {{ return 403; }}\n  }}",
        server.ip
    );
    let _gateway = tools::nginx(&gateway.name, &node.dir, "gateway", 2, &proxy_block)?;
    let url = |ip: std::net::Ipv4Addr| format!("http://{ip}/public/index.html");
    let wrk = |path: usize, (mode, close): (&str, bool)| {
        let ip = if path == NGINX { gateway.ip } else { server.ip };
        let before = syn_counters(&client.name);
        let wrk = tools::wrk(
            &client.name,
            &url(ip),
            WRK_THREADS,
            WRK_CONNECTIONS,
            WRK_SECONDS,
            close,
        )
        .with_context(|| format!("the row {:?}, {mode}", PATHS[path]))?;
        let syn_retransmitted_pct = retransmitted_pct(before, syn_counters(&client.name));
        anyhow::Ok(Run {
            wrk,
            syn_retransmitted_pct,
        })
    };
    let load_before = tools::machine_load();

    // Interleaved rounds, medians reported: the two CPUs are shared with wrk and the backend,
    // so a single run of each would mostly measure whatever else the machine was doing.
    // runs[mode][path]: one result per round.
    let mut runs: [[Vec<Run>; 3]; 2] = Default::default();
    let mut inside = Vec::new();
    for _ in 0..ROUNDS {
        for (m, &mode) in MODES.iter().enumerate() {
            runs[m][DIRECT].push(wrk(DIRECT, mode)?);
            runs[m][NGINX].push(wrk(NGINX, mode)?);
        }
        node.apply(L7_POLICY);
        for (m, &mode) in MODES.iter().enumerate() {
            runs[m][PALISADE].push(wrk(PALISADE, mode)?);
            if m == 0 {
                // The keep-alive run's requests, as the proxy timed them.
                inside.push(proxy_latencies(&node.flows(&[
                    "--protocol",
                    "http",
                    "--last",
                    "20000",
                ])));
            }
        }
        let denied = palisade_integration::http::get(&client.name, server.ip, 80, "/private", "")
            .map(|r| r.status);
        if denied != Some(403) {
            bail!(
                "the L7 policy did not deny /private (got {denied:?}): the benchmark would measure nothing"
            );
        }
        node.palisade_ok(&["policy", "delete", "l7", "--namespace", "x"]);
    }
    let load_after = tools::machine_load();

    let mut tables = Vec::new();
    for (m, (mode, _)) in MODES.iter().enumerate() {
        let direct_p99 = Summary::of(
            &runs[m][DIRECT]
                .iter()
                .map(|r| r.wrk.p99_us)
                .collect::<Vec<_>>(),
        )
        .median;
        let rows: Vec<String> = [DIRECT, PALISADE, NGINX]
            .iter()
            .map(|&p| row(PATHS[p], &runs[m][p], direct_p99))
            .collect();
        tables.push(format!(
            "**{mode}**\n\n\
             | path | requests/s (min–max) | p50 (µs) | p99 (µs) | p99.9 (µs) | p99 added vs direct (µs) | SYN retransmitted (% of connects) |\n\
             |---|---|---|---|---|---|---|\n{}",
            rows.join("\n")
        ));
    }
    let inside_row = |permille: usize| {
        Summary::of(
            &inside
                .iter()
                .map(|l| quantile(l, permille))
                .collect::<Vec<_>>(),
        )
        .median
    };
    let wrk_ka = |f: fn(&WrkResult) -> f64| {
        Summary::of(
            &runs[0][PALISADE]
                .iter()
                .map(|r| f(&r.wrk))
                .collect::<Vec<_>>(),
        )
        .median
    };
    let direct_ka = |f: fn(&WrkResult) -> f64| {
        Summary::of(
            &runs[0][DIRECT]
                .iter()
                .map(|r| f(&r.wrk))
                .collect::<Vec<_>>(),
        )
        .median
    };
    let samples = inside.iter().map(Vec::len).min().unwrap_or(0);
    let split = format!(
        "Where a keep-alive request through the proxy spends its time (medians over the rounds; \
         the proxy's own figure is the latency it reports in each request's flow, from the head \
         judged to the response head relayed, over the last {samples}+ requests of each round):\n\n\
         | | p50 (µs) | p99 (µs) | p99.9 (µs) |\n|---|---|---|---|\n\
         | wrk, through the proxy | {:.0} | {:.0} | {:.0} |\n\
         | proxy: judge + upstream exchange + response head relayed | {:.0} | {:.0} | {:.0} |\n\
         | wrk, direct (the backend and the network alone) | {:.0} | {:.0} | {:.0} |",
        wrk_ka(|r| r.p50_us),
        wrk_ka(|r| r.p99_us),
        wrk_ka(|r| r.p999_us),
        inside_row(500),
        inside_row(990),
        inside_row(999),
        direct_ka(|r| r.p50_us),
        direct_ka(|r| r.p99_us),
        direct_ka(|r| r.p999_us),
    );
    let body = format!(
        "wrk -t{WRK_THREADS} -c{WRK_CONNECTIONS} -d{WRK_SECONDS}s against nginx returning a fixed \
         200, from a client endpoint, on one node (release build; the two CPUs are shared by wrk, \
         the proxy and the backend; median of {ROUNDS} interleaved rounds, request rate also as \
         min–max). Rules: GET /public/.* allowed, everything else 403. Every answer measured is a \
         200 (a run with any other answer fails the benchmark).\n\n\
         Agent arguments beyond the defaults: {}. \
         Before: {load_before}.\n\nAfter: {load_after}.\n\n{}\n\n{split}",
        if agent_args.is_empty() {
            "none".to_string()
        } else {
            format!("`{extra}`")
        },
        tables.join("\n\n"),
    );
    write_result("l7-proxy", "L7 proxy throughput and latency", &body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_are_nearest_rank() {
        let v: Vec<f64> = (1..=1000).map(f64::from).collect();
        assert!((quantile(&v, 500) - 500.0).abs() < 1e-9);
        assert!((quantile(&v, 990) - 990.0).abs() < 1e-9);
        assert!((quantile(&v, 999) - 999.0).abs() < 1e-9);
        assert!((quantile(&v[..1], 990) - 1.0).abs() < 1e-9);
        assert!(quantile(&[], 500).abs() < 1e-9);
    }

    #[test]
    fn the_proxys_latencies_are_read_from_its_flows_of_answered_requests() {
        let flows: Vec<serde_json::Value> = [
            r#"{"http":{"status":200,"latency_us":30}}"#,
            r#"{"http":{"status":403,"latency_us":1}}"#,
            r#"{"http":{"status":200,"latency_us":10}}"#,
            r#"{"event":"drop"}"#,
        ]
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
        assert_eq!(proxy_latencies(&flows), [10.0, 30.0]);
    }
}
