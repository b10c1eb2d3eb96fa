//! `cargo xtask bench l7-proxy`: HTTP through Palisade's L7 proxy, directly (L3/L4 only), and
//! through nginx configured as an equivalent filtering reverse proxy, in one run, interleaved;
//! requests/s with p50, p99 and p99.9 latency.

use std::process::Command;

use anyhow::{Context as _, bail};
use palisade_integration::Node;

use crate::bench::{tools, write_result};
use crate::build_binaries;

/// wrk's shape: one thread, 16 keep-alive connections (the figures of issue 12).
const WRK_THREADS: &str = "-t1";
const WRK_CONNECTIONS: &str = "-c16";
const WRK_SECONDS: &str = "-d10s";
const ROUNDS: usize = 3;

/// Prints the latency percentiles wrk's own report lacks (p99.9), in microseconds.
const WRK_SCRIPT: &str = "done = function(summary, latency, requests)\n  io.write(string.format(\"PALISADE-PCT %d %d %d\\n\", latency:percentile(50), latency:percentile(99), latency:percentile(99.9)))\nend\n";

/// One wrk run's figures.
#[derive(Clone, Copy, Debug)]
struct Run {
    rps: f64,
    p50_us: f64,
    p99_us: f64,
    p999_us: f64,
}

/// Reads wrk's report (with the percentile line `WRK_SCRIPT` prints).
fn parse_wrk(text: &str) -> Option<Run> {
    let rps = text
        .lines()
        .find(|l| l.starts_with("Requests/sec:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<f64>().ok())?;
    let pct: Vec<f64> = text
        .lines()
        .find_map(|l| l.strip_prefix("PALISADE-PCT "))?
        .split_whitespace()
        .map(str::parse)
        .collect::<Result<_, _>>()
        .ok()?;
    match pct[..] {
        [p50_us, p99_us, p999_us] => Some(Run {
            rps,
            p50_us,
            p99_us,
            p999_us,
        }),
        _ => None,
    }
}

fn wrk(netns: &str, url: &str, script: &std::path::Path) -> anyhow::Result<Run> {
    let out = Command::new("ip")
        .args(["netns", "exec", netns, "wrk"])
        .args([WRK_THREADS, WRK_CONNECTIONS, WRK_SECONDS, "-s"])
        .arg(script)
        .arg(url)
        .output()
        .context("running wrk")?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if text
        .lines()
        .any(|l| l.contains("Non-2xx") || l.contains("Socket errors"))
    {
        bail!("wrk saw errors for {url}:\n{text}");
    }
    parse_wrk(&text).with_context(|| format!("unexpected wrk output for {url}:\n{text}"))
}

/// The median of each figure, and the range of the request rate.
fn summarize(runs: &[Run]) -> (Run, f64, f64) {
    let median = |f: fn(&Run) -> f64| {
        let mut v: Vec<f64> = runs.iter().map(f).collect();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let rps: Vec<f64> = runs.iter().map(|r| r.rps).collect();
    (
        Run {
            rps: median(|r| r.rps),
            p50_us: median(|r| r.p50_us),
            p99_us: median(|r| r.p99_us),
            p999_us: median(|r| r.p999_us),
        },
        rps.iter().copied().fold(f64::INFINITY, f64::min),
        rps.iter().copied().fold(0.0, f64::max),
    )
}

pub(crate) fn run() -> anyhow::Result<()> {
    const L7_POLICY: &str = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: l7, namespace: x}\nspec:\n  endpointSelector: {matchLabels: {app: server}}\n  ingress:\n  - fromEndpoints: [{matchLabels: {app: client}}]\n    toPorts:\n    - ports: [{port: \"80\", protocol: TCP}]\n      rules:\n        http: [{method: GET, path: \"/public/.*\"}]\n";
    tools::ensure_packages()?;
    let bin_dir = build_binaries(true)?;
    // SAFETY: single-threaded here; the fixture reads it.
    unsafe { std::env::set_var("PALISADE_BIN_DIR", &bin_dir) };
    let node = Node::start_tagged("pal-bench", "l7", &[]);
    let client = node.add_endpoint("client", "x", "app=client");
    let server = node.add_endpoint("server", "x", "app=server");
    let gateway = node.add_endpoint("gateway", "x", "app=gateway");
    let _backend = tools::nginx(
        &server.name,
        &node.dir,
        "backend",
        2,
        "  server { listen 80; location / { return 200 \"ok\\n\"; } }",
    )?;
    let proxy_block = format!(
        "  upstream backend {{ server {}:80; keepalive 64; }}\n  server {{\n    listen 80;\n    location ~ ^/public/ {{\n      limit_except GET {{ deny all; }}\n      proxy_pass http://backend;\n      proxy_http_version 1.1;\n      proxy_set_header Connection \"\";\n    }}\n    location / {{ return 403; }}\n  }}",
        server.ip
    );
    let _gateway = tools::nginx(&gateway.name, &node.dir, "gateway", 2, &proxy_block)?;
    let script = node.dir.join("percentiles.lua");
    std::fs::write(&script, WRK_SCRIPT)?;
    let url = |ip: std::net::Ipv4Addr| format!("http://{ip}/public/index.html");

    // Interleaved rounds, medians reported: the two CPUs are shared with wrk and the backend,
    // so a single run of each would mostly measure whatever else the machine was doing.
    let (mut direct, mut nginx, mut palisade) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        direct.push(wrk(&client.name, &url(server.ip), &script)?);
        nginx.push(wrk(&client.name, &url(gateway.ip), &script)?);
        node.apply(L7_POLICY);
        palisade.push(wrk(&client.name, &url(server.ip), &script)?);
        let denied = palisade_integration::http::get(&client.name, server.ip, 80, "/private", "")
            .map(|r| r.status);
        if denied != Some(403) {
            bail!(
                "the L7 policy did not deny /private (got {denied:?}): the benchmark would measure nothing"
            );
        }
        node.palisade_ok(&["policy", "delete", "l7", "--namespace", "x"]);
    }
    let direct = summarize(&direct);
    let row = |name: &str, (r, lo, hi): (Run, f64, f64)| {
        format!(
            "| {name} | {:.0} ({lo:.0}–{hi:.0}) | {:.0} | {:.0} | {:.0} | {:+.0} |",
            r.rps,
            r.p50_us,
            r.p99_us,
            r.p999_us,
            r.p99_us - direct.0.p99_us
        )
    };
    let body = format!(
        "wrk {WRK_THREADS} {WRK_CONNECTIONS} {WRK_SECONDS} (keep-alive) against nginx returning a \
         fixed 200, from a client endpoint, on one node (release build; the two CPUs are shared by \
         wrk, the proxy and the backend; median of {ROUNDS} interleaved rounds, request rate also \
         as min–max). Rules: GET /public/.* allowed, everything else 403.\n\n\
         | path | requests/s (min–max) | p50 (µs) | p99 (µs) | p99.9 (µs) | p99 added vs direct (µs) |\n\
         |---|---|---|---|---|---|\n{}\n{}\n{}",
        row("direct (L3/L4 only, no proxy)", direct),
        row(
            "Palisade L7 proxy (transparent redirect)",
            summarize(&palisade)
        ),
        row("nginx as a filtering reverse proxy", summarize(&nginx)),
    );
    write_result("l7-proxy", "L7 proxy throughput and latency", &body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_rate_and_percentiles_from_wrk() {
        let text = "Running 10s test @ http://x/\n  1 threads and 16 connections\nRequests/sec:  76543.21\nTransfer/sec:      9.53MB\nPALISADE-PCT 180 1990 4100\n";
        let r = parse_wrk(text).expect("parsed");
        assert!((r.rps - 76543.21).abs() < 1e-6);
        assert!((r.p50_us - 180.0).abs() < 1e-9);
        assert!((r.p99_us - 1990.0).abs() < 1e-9);
        assert!((r.p999_us - 4100.0).abs() < 1e-9);
        assert!(parse_wrk("Requests/sec: 1\n").is_none());
    }
}
