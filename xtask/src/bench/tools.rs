//! The programs the benchmarks drive (wrk, iperf3, nginx, nftables, iptables, ethtool), installed
//! from Debian when missing, and what the machine was doing meanwhile.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context as _, bail};

/// (command, Debian package) pairs the benchmarks need.
const PACKAGES: &[(&str, &str)] = &[
    ("wrk", "wrk"),
    ("nginx", "nginx-light"),
    ("iperf3", "iperf3"),
    ("nft", "nftables"),
    ("iptables", "iptables"),
    // `ethtool -K DEV gro on`: NAPI on the prefilter benchmark's receiving veth.
    ("ethtool", "ethtool"),
];

fn have(cmd: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {cmd}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Installs the packages whose commands are missing.
pub fn ensure_packages() -> anyhow::Result<()> {
    let missing: Vec<&str> = PACKAGES
        .iter()
        .filter(|(cmd, _)| !have(cmd))
        .map(|(_, pkg)| *pkg)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("xtask: installing {missing:?} for the benchmarks");
    let nginx_before = std::fs::read_to_string("/run/nginx.pid").ok();
    crate::run(
        Command::new("apt-get")
            .arg("update")
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )?;
    crate::run(
        Command::new("apt-get")
            .args(["install", "-y", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )?;
    // The nginx package may start a system nginx (the benchmarks run their own in
    // namespaces): the one it started, by its pid, and no other.
    if nginx_before.is_none()
        && let Some(pid) = std::fs::read_to_string("/run/nginx.pid")
            .ok()
            .and_then(|p| p.trim().parse::<i32>().ok())
    {
        let _ = Command::new("sh")
            .args([
                "-c",
                "command -v systemctl >/dev/null && systemctl stop nginx",
            ])
            .status();
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
    for (cmd, pkg) in PACKAGES {
        if !have(cmd) {
            bail!("{pkg} was installed but `{cmd}` is still not found");
        }
    }
    Ok(())
}

/// A process in a namespace, stopped (SIGTERM, then waited for) on drop.
pub struct Daemon {
    child: Child,
}

impl Daemon {
    pub fn spawn(netns: &str, args: &[&str]) -> anyhow::Result<Daemon> {
        let child = Command::new("ip")
            .args(["netns", "exec", netns])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {args:?} in {netns}"))?;
        Ok(Daemon { child })
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(
                i32::try_from(self.child.id()).expect("a pid fits in pid_t"),
            ),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.child.wait();
    }
}

/// An nginx in a namespace with `workers` worker processes and `http_block` inside its
/// `http {}`, stopped on drop.
pub fn nginx(
    netns: &str,
    dir: &Path,
    name: &str,
    workers: u32,
    http_block: &str,
) -> anyhow::Result<Daemon> {
    let prefix = dir.join(name);
    std::fs::create_dir_all(prefix.join("logs"))?;
    let conf = prefix.join("nginx.conf");
    std::fs::write(
        &conf,
        format!(
            "daemon off;\nmaster_process on;\nworker_processes {workers};\npid {p}/nginx.pid;\nerror_log {p}/logs/error.log warn;\nevents {{ worker_connections 4096; }}\nhttp {{\n  access_log off;\n  keepalive_requests 10000000;\n  client_body_temp_path {p}/body;\n  proxy_temp_path {p}/proxy;\n  fastcgi_temp_path {p}/fastcgi;\n  uwsgi_temp_path {p}/uwsgi;\n  scgi_temp_path {p}/scgi;\n{http_block}\n}}\n",
            p = prefix.display()
        ),
    )?;
    let conf = conf.display().to_string();
    let prefix = prefix.display().to_string();
    let d = Daemon::spawn(netns, &["nginx", "-c", &conf, "-p", &prefix])?;
    std::thread::sleep(Duration::from_millis(400));
    Ok(d)
}

/// An nginx answering 200 with a fixed two-byte body on port 80.
pub fn nginx_ok(netns: &str, dir: &Path, name: &str) -> anyhow::Result<Daemon> {
    nginx(
        netns,
        dir,
        name,
        1,
        "  server { listen 80 reuseport backlog=4096; location / { return 200 \"ok\"; } }",
    )
}

/// What wrk measured.
#[derive(Clone, Copy, Debug)]
pub struct WrkResult {
    pub requests_per_second: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
}

/// wrk from `netns` with `threads` threads and `connections` connections for `seconds`;
/// `close` asks for a new connection per request. Percentiles from a Lua `done` hook.
pub fn wrk(
    netns: &str,
    url: &str,
    threads: u32,
    connections: u32,
    seconds: u32,
    close: bool,
) -> anyhow::Result<WrkResult> {
    let script = std::env::temp_dir().join("palisade-bench-wrk.lua");
    std::fs::write(
        &script,
        "done = function(summary, latency, requests)\n  \
         io.write(string.format(\"PCT %d %d %d\\n\", latency:percentile(50), \
         latency:percentile(99), latency:percentile(99.9)))\nend\n",
    )?;
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", netns, "wrk"])
        .arg(format!("-t{threads}"))
        .arg(format!("-c{connections}"))
        .arg(format!("-d{seconds}s"))
        .arg("-s")
        .arg(&script);
    if close {
        cmd.args(["-H", "Connection: close"]);
    }
    let out = cmd.arg(url).output().context("running wrk")?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    parse_wrk(&text, close).with_context(|| {
        format!(
            "unexpected wrk output for {url}:\n{text}{}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// Reads wrk's report (with the percentile line of the `done` hook `wrk` installs). None when
/// a figure is missing, or when any answer was not a 2xx: a benchmark of error responses
/// measures nothing. Socket errors are expected only when each request closes its connection
/// (`close`: a read racing the server's close).
fn parse_wrk(text: &str, close: bool) -> Option<WrkResult> {
    let non_2xx = text.lines().any(|l| l.contains("Non-2xx"));
    let socket_errors = text
        .lines()
        .any(|l| l.trim_start().starts_with("Socket errors"));
    if non_2xx || (socket_errors && !close) {
        return None;
    }
    let requests_per_second = text
        .lines()
        .find(|l| l.starts_with("Requests/sec:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<f64>().ok())?;
    let pct: Vec<f64> = text
        .lines()
        .find_map(|l| l.strip_prefix("PCT "))?
        .split_whitespace()
        .map(str::parse)
        .collect::<Result<_, _>>()
        .ok()?;
    match pct[..] {
        [p50_us, p99_us, p999_us] => Some(WrkResult {
            requests_per_second,
            p50_us,
            p99_us,
            p999_us,
        }),
        _ => None,
    }
}

/// iperf3 from `netns` to `server` for `seconds` (one stream): Gbit/s received.
pub fn iperf3(netns: &str, server: std::net::Ipv4Addr, seconds: u32) -> anyhow::Result<f64> {
    let out = Command::new("ip")
        .args(["netns", "exec", netns, "iperf3", "-J", "-c"])
        .arg(server.to_string())
        .arg("-t")
        .arg(seconds.to_string())
        .output()
        .context("running iperf3")?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "iperf3 output is not JSON: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })?;
    let bps = v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .with_context(|| format!("iperf3 reported no throughput: {}", v["error"]))?;
    Ok(bps / 1e9)
}

/// The load average and the busiest processes right now: what else the machine was doing.
pub fn machine_load() -> String {
    let load = std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ");
    let top = Command::new("ps")
        .args(["-eo", "pcpu,comm", "--sort=-pcpu", "--no-headers"])
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .take(6)
                .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
                .collect::<Vec<_>>()
                .join(", ")
        })
        .unwrap_or_default();
    format!("load average {load}; busiest processes (%CPU since start, command): {top}")
}

#[cfg(test)]
mod tests {
    use super::*;

    const REPORT: &str = "Running 10s test @ http://x/\n  1 threads and 16 connections\nRequests/sec:  76543.21\nTransfer/sec:      9.53MB\nPCT 180 1990 4100\n";

    #[test]
    fn reads_rate_and_percentiles_from_wrk() {
        let r = parse_wrk(REPORT, false).expect("parsed");
        assert!((r.requests_per_second - 76543.21).abs() < 1e-6);
        assert!((r.p50_us - 180.0).abs() < 1e-9);
        assert!((r.p99_us - 1990.0).abs() < 1e-9);
        assert!((r.p999_us - 4100.0).abs() < 1e-9);
        assert!(parse_wrk("Requests/sec: 1\n", false).is_none());
        assert!(parse_wrk("Requests/sec: 1\nPCT 1 2\n", false).is_none());
    }

    #[test]
    fn error_answers_fail_the_run_and_socket_errors_only_on_keep_alive() {
        let non_2xx = REPORT.replace(
            "Requests/sec",
            "  Non-2xx or 3xx responses: 3\nRequests/sec",
        );
        assert!(parse_wrk(&non_2xx, false).is_none());
        assert!(parse_wrk(&non_2xx, true).is_none(), "not even when closing");
        let socket = REPORT.replace(
            "Requests/sec",
            "  Socket errors: connect 0, read 2, write 0, timeout 0\nRequests/sec",
        );
        assert!(parse_wrk(&socket, false).is_none());
        assert!(parse_wrk(&socket, true).is_some());
    }
}
