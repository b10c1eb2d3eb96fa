//! `cargo xtask bench`: benchmarks (never timed tests). Results are printed and written to
//! docs/benchmarks/<name>.md.

use std::net::{Ipv4Addr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use palisade_integration::Node;
use palisade_integration::traffic;

use crate::{build_binaries, workspace_root};

mod micro;
mod path;
pub(crate) mod stats;
pub(crate) mod svg;
pub(crate) mod tools;
pub(crate) mod xdp_gen;

pub(crate) fn write_result(name: &str, title: &str, body: &str) -> anyhow::Result<()> {
    let dir = workspace_root().join("docs/benchmarks");
    std::fs::create_dir_all(&dir)?;
    let machine = format!(
        "{} CPUs, kernel {}",
        std::thread::available_parallelism().map_or(0, std::num::NonZero::get),
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
    );
    let path = dir.join(format!("{name}.md"));
    let text =
        format!("# {title}\n\nMeasured by `cargo xtask bench {name}` on {machine}.\n\n{body}\n");
    let previous = std::fs::read_to_string(&path).unwrap_or_default();
    std::fs::write(&path, keep_hand_written(text, &previous))?;
    println!("\n{body}\n(written to docs/benchmarks/{name}.md)");
    Ok(())
}

/// The line below which a results file is written by hand: a rerun replaces what is above it
/// and keeps the rest.
pub(crate) const HAND_WRITTEN_MARKER: &str =
    "<!-- Written by hand below this line: `cargo xtask bench` keeps it. -->";

/// `generated`, followed by the hand-written part of `previous` (the marker line and what
/// follows it), if it has one.
fn keep_hand_written(generated: String, previous: &str) -> String {
    match previous.find(HAND_WRITTEN_MARKER) {
        Some(at) => format!("{generated}\n{}", &previous[at..]),
        None => generated,
    }
}

fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may contain spaces) start after the last ')'.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let get = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    get(11) + get(12) // utime + stime
}

fn counter(node: &Node, outcome: &str) -> u64 {
    node.json(&["status"])["counters"]
        .as_array()
        .map_or(0, |cs| {
            cs.iter()
                .filter(|c| c["outcome"] == outcome)
                .filter_map(|c| c["packets"].as_u64())
                .sum()
        })
}

fn flows_total(node: &Node) -> u64 {
    // The newest flow's sequence number counts every flow ever ingested.
    node.flows(&["--last", "1"])
        .first()
        .and_then(|f| f["seq"].as_u64())
        .unwrap_or(0)
}

/// A denied UDP flood from one endpoint; how many flow events the agent ingests.
fn flow_ingest_run(events_per_second: u32, seconds: u64) -> anyhow::Result<String> {
    let rate = events_per_second.to_string();
    let node = Node::start_tagged("pal-bench", "flow-ingest", &["--events-per-second", &rate]);
    let attacker = node.add_endpoint("attacker", "x", "app=attacker");
    let server = node.add_endpoint("server", "x", "app=server");
    node.apply(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: lock, namespace: x}\nspec:\n  podSelector: {matchLabels: {app: server}}\n  policyTypes: [Ingress]\n",
    );
    let pid = node.agent_pid().context("agent pid")?;
    let (flows0, ticks0) = (flows_total(&node), cpu_ticks(pid));
    let (denied0, lost0, limited0) = (
        counter(&node, "Policy denied"),
        counter(&node, "EVENTS_LOST"),
        counter(&node, "EVENTS_RATE_LIMITED"),
    );
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let senders: Vec<_> = (0..2)
        .map(|k| {
            let (stop, sent, name, dst) = (
                Arc::clone(&stop),
                Arc::clone(&sent),
                attacker.name.clone(),
                server.ip,
            );
            std::thread::spawn(move || {
                traffic::in_netns(&name, move || {
                    let sock = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).expect("bind");
                    let mut port = 1000u16 + k * 20_000;
                    let mut n = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        port = port.wrapping_add(1).max(1000);
                        if sock.send_to(b"flood", (dst, port)).is_ok() {
                            n += 1;
                        }
                    }
                    sent.fetch_add(n, Ordering::Relaxed);
                });
            })
        })
        .collect();
    let started = Instant::now();
    std::thread::sleep(Duration::from_secs(seconds));
    stop.store(true, Ordering::Relaxed);
    for s in senders {
        let _ = s.join();
    }
    let elapsed = started.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_millis(500));
    let ticks = cpu_ticks(pid) - ticks0;
    let clk = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64;
    let flows = flows_total(&node) - flows0;
    let denied = counter(&node, "Policy denied") - denied0;
    let lost = counter(&node, "EVENTS_LOST") - lost0;
    let limited = counter(&node, "EVENTS_RATE_LIMITED") - limited0;
    let limit = if events_per_second == 0 {
        "unlimited".to_string()
    } else {
        format!("{events_per_second}/s per endpoint per CPU")
    };
    Ok(format!(
        "| {limit} | {:.0} | {:.0} | {:.0} | {:.0}% | {} | {} |",
        sent.load(Ordering::Relaxed) as f64 / elapsed,
        denied as f64 / elapsed,
        flows as f64 / elapsed,
        100.0 * ticks as f64 / clk / elapsed,
        lost,
        limited
    ))
}

fn flow_ingest() -> anyhow::Result<()> {
    let bin_dir = build_binaries(true)?;
    // SAFETY: single-threaded here; the fixture reads it.
    unsafe { std::env::set_var("PALISADE_BIN_DIR", &bin_dir) };
    let mut rows = Vec::new();
    for rate in [1_000, 0] {
        rows.push(flow_ingest_run(rate, 5)?);
    }
    let body = format!(
        "A denied UDP flood (two sender threads, 5 s per row) from one endpoint to another that \
         policy locks down; every dropped packet is a flow event. Release build.\n\n\
         | event rate limit | packets sent/s | drops counted/s | flows ingested/s | agent CPU | events lost (ring full) | events suppressed (rate limit) |\n\
         |---|---|---|---|---|---|---|\n{}",
        rows.join("\n")
    );
    write_result(
        "flow-ingest",
        "Flow event ingestion under a denied flood",
        &body,
    )
}

/// Every benchmark `cargo xtask bench NAME` runs (none named: all of them, in this order).
pub const BENCHMARKS: [&str; 9] = [
    "policy-scale",
    "flow-ingest",
    "l7-proxy",
    "prefilter",
    "datapath",
    "datapath-baseline",
    "datapath-micro",
    "kubernetes-scale",
    "dns",
];

pub fn run(which: Option<String>) -> anyhow::Result<()> {
    if let Some(name) = &which
        && !BENCHMARKS.contains(&name.as_str())
    {
        bail!(
            "no benchmark named {name:?}; the benchmarks are {}",
            BENCHMARKS.join(", ")
        );
    }
    if !nix::unistd::geteuid().is_root() {
        bail!("benchmarks need root (BPF, namespaces); run `cargo xtask bench` as root");
    }
    let all = which.is_none();
    let which = which.unwrap_or_default();
    if all || which == "policy-scale" {
        crate::bench_scale::run()?;
    }
    if all || which == "flow-ingest" {
        flow_ingest()?;
    }
    if all || which == "l7-proxy" {
        crate::bench_l7::run()?;
    }
    if all || which == "prefilter" {
        crate::bench_prefilter::run()?;
    }
    if all || which == "datapath" || which == "datapath-baseline" {
        tools::ensure_packages()?;
        let bin_dir = build_binaries(true)?;
        // SAFETY: single-threaded here; the fixture reads it.
        unsafe { std::env::set_var("PALISADE_BIN_DIR", &bin_dir) };
        let mut opts = path::Options::from_env()?;
        opts.without_fast_path = which != "datapath-baseline";
        let dir = workspace_root().join("docs/benchmarks");
        let (body, plot) = path::run(&opts, &dir)?;
        std::fs::write(dir.join("datapath.svg"), plot)?;
        write_result(
            "datapath",
            "The datapath between two endpoints, side by side with the plain path, iptables and nftables",
            &body,
        )?;
    }
    if all || which == "datapath-micro" {
        let body = micro::run()?;
        write_result(
            "datapath-micro",
            "The datapath programs' own cost per packet",
            &body,
        )?;
    }
    if all || which == "kubernetes-scale" {
        crate::bench_k8s::run()?;
    }
    if all || which == "dns" {
        crate::bench_dns::run()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rerun_keeps_what_was_written_by_hand_below_the_marker() {
        let previous = format!("# T\n\nold table\n\n{HAND_WRITTEN_MARKER}\n\n## Reading\n\nwhy\n");
        let kept = keep_hand_written("# T\n\nnew table\n".to_string(), &previous);
        assert_eq!(
            kept,
            format!("# T\n\nnew table\n\n{HAND_WRITTEN_MARKER}\n\n## Reading\n\nwhy\n")
        );
        assert_eq!(keep_hand_written("new\n".to_string(), "old\n"), "new\n");
    }
}
