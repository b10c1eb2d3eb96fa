//! `cargo xtask bench prefilter`: how fast the XDP prefilter drops a flood from a denied CIDR,
//! against an iptables raw-table DROP and an nftables netdev-ingress drop of the same CIDR, on
//! the same veth, in interleaved rounds.
//!
//! The flood comes from a namespace standing for the outside, sent from inside the kernel by
//! `bench::xdp_gen` (BPF_PROG_TEST_RUN live frames: an XDP program's `XDP_TX` transmitted into
//! the veth with `ndo_xdp_xmit`), one pinned thread per CPU, each frame from another source
//! address in 198.18.0.0/16 (inside the denied /15). There is no kernel pktgen here (the module
//! is not built), and `xdp-trafficgen` (xdp-tools, the same mechanism) sends IPv6 only, which
//! the IPv4 prefilter does not judge. Where live frames cannot run (a kernel before 5.18), an
//! AF_PACKET `sendmmsg` generator is the fallback, and the document says so.
//!
//! Frames sent with `ndo_xdp_xmit` reach a veth only when its receive queues run in NAPI mode
//! (an XDP program on it, or GRO on it): GRO is on on the receiving end in every row, so every
//! row receives through the same NAPI poll. Each figure is the drop counter's rate of the
//! mechanism under test (prefilter counter, iptables rule counter, nft rule counter).

use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use palisade_integration::Node;
use palisade_integration::node::ip;
use palisade_integration::traffic;

use crate::bench::svg::{self, Bar};
use crate::bench::xdp_gen::{self, BareDrop, Generator};
use crate::bench::{tools, write_result};
use crate::{build_binaries, workspace_root};

const DENIED: &str = "198.18.0.0/15";
const NODE_ADDR: Ipv4Addr = Ipv4Addr::new(192, 168, 99, 1);
const ROUNDS: usize = 3;
const SECONDS: u64 = 5;
const WARMUP: Duration = Duration::from_millis(500);
/// Frames per sendmmsg call (AF_PACKET fallback).
const BATCH: usize = 256;
/// Frames per BPF_PROG_TEST_RUN call of the live generator, and per batch inside it (the
/// kernel's default batch; a veth receive ring holds 256).
const LIVE_REPEAT: u32 = 1 << 18;
const LIVE_BATCH: u32 = 64;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Row {
    Xdp,
    IptablesRaw,
    NftIngress,
    /// A reference: the smallest XDP program that drops (no lookup, no counter), native, on
    /// ext0: the floor of any XDP drop on this veth.
    BareXdpDrop,
    /// The live generator with nothing receiving: the veth discards each frame on transmit
    /// (its peer has no NAPI: GRO off, no XDP). The generator's own ceiling.
    GeneratorAlone,
}

impl Row {
    const FILTERS: [Row; 3] = [Row::Xdp, Row::IptablesRaw, Row::NftIngress];

    fn label(self) -> &'static str {
        match self {
            Row::Xdp => "Palisade XDP prefilter",
            Row::IptablesRaw => "iptables raw PREROUTING DROP",
            Row::NftIngress => "nftables netdev ingress drop",
            Row::BareXdpDrop => "reference: bare XDP_DROP program (no lookup)",
            Row::GeneratorAlone => "reference: generator alone (frames discarded on transmit)",
        }
    }
}

/// Which generator sends the flood.
#[derive(Clone, Debug)]
enum Flood {
    /// In-kernel, BPF_PROG_TEST_RUN live frames (`xdp_gen`).
    Live,
    /// AF_PACKET sendmmsg, because live frames could not run (the reason).
    Packet(String),
}

fn sh(netns: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("ip")
        .args(["netns", "exec", netns])
        .args(args)
        .output()
        .with_context(|| format!("running {args:?}"))?;
    if !out.status.success() {
        bail!(
            "{args:?} in {netns}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn ip_ok(args: &[&str]) -> anyhow::Result<()> {
    let out = ip(args);
    if !out.status.success() {
        bail!(
            "ip {args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn mac_of(netns: &str, dev: &str) -> anyhow::Result<[u8; 6]> {
    let text = sh(netns, &["cat", &format!("/sys/class/net/{dev}/address")])?;
    let bytes: Vec<u8> = text
        .trim()
        .split(':')
        .map(|h| u8::from_str_radix(h, 16))
        .collect::<Result<_, _>>()
        .with_context(|| format!("MAC of {dev}: {text:?}"))?;
    <[u8; 6]>::try_from(bytes).map_err(|_| anyhow::anyhow!("MAC of {dev}: {text:?}"))
}

/// One generator thread: AF_PACKET on `ifindex`, qdisc bypassed, sendmmsg of `BATCH` frames
/// at a time until `stop`, adding the frames the kernel took to `sent`.
fn flood(
    ifindex: i32,
    frames: &[Vec<u8>],
    stop: &AtomicBool,
    sent: &AtomicU64,
) -> anyhow::Result<()> {
    // SAFETY: plain socket calls on a descriptor this function owns; every pointer handed to
    // the kernel points at live memory of the stated length for the duration of the call.
    unsafe {
        let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0);
        if fd < 0 {
            bail!("AF_PACKET socket: {}", std::io::Error::last_os_error());
        }
        let one: libc::c_int = 1;
        libc::setsockopt(
            fd,
            libc::SOL_PACKET,
            libc::PACKET_QDISC_BYPASS,
            (&raw const one).cast(),
            u32::try_from(size_of::<libc::c_int>()).unwrap_or(4),
        );
        let mut sll: libc::sockaddr_ll = std::mem::zeroed();
        sll.sll_family = u16::try_from(libc::AF_PACKET).unwrap_or(17);
        sll.sll_ifindex = ifindex;
        sll.sll_halen = 6;
        if libc::bind(
            fd,
            (&raw const sll).cast(),
            u32::try_from(size_of::<libc::sockaddr_ll>()).unwrap_or(20),
        ) < 0
        {
            let e = std::io::Error::last_os_error();
            libc::close(fd);
            bail!("binding AF_PACKET: {e}");
        }
        let mut iovs: Vec<libc::iovec> = frames
            .iter()
            .map(|f| libc::iovec {
                iov_base: f.as_ptr().cast_mut().cast(),
                iov_len: f.len(),
            })
            .collect();
        let mut msgs: Vec<libc::mmsghdr> = iovs
            .iter_mut()
            .map(|iov| {
                let mut m: libc::mmsghdr = std::mem::zeroed();
                m.msg_hdr.msg_iov = std::ptr::from_mut(iov);
                m.msg_hdr.msg_iovlen = 1;
                m
            })
            .collect();
        while !stop.load(Ordering::Relaxed) {
            let n = libc::sendmmsg(
                fd,
                msgs.as_mut_ptr(),
                u32::try_from(msgs.len()).unwrap_or(1),
                0,
            );
            if n > 0 {
                sent.fetch_add(u64::try_from(n).unwrap_or(0), Ordering::Relaxed);
            }
        }
        libc::close(fd);
        Ok(())
    }
}

struct Scene {
    node: Node,
    gen_ns: String,
    flood: Flood,
    /// The live generator's frame (source 198.18.0.0, rewritten per frame by the program).
    live_frame: Arc<Vec<u8>>,
    /// The AF_PACKET fallback's frames: 256 sources in the denied CIDR.
    frames: Arc<Vec<Vec<u8>>>,
    eth0: i32,
    file: std::path::PathBuf,
    cpus: usize,
}

fn set_gro(netns: &str, on: bool) -> anyhow::Result<()> {
    sh(
        netns,
        &[
            "ethtool",
            "-K",
            "ext0",
            "gro",
            if on { "on" } else { "off" },
        ],
    )
    .map(drop)
}

fn gro_on(netns: &str) -> anyhow::Result<bool> {
    let text = sh(netns, &["ethtool", "-k", "ext0"])?;
    Ok(text
        .lines()
        .any(|l| l.trim() == "generic-receive-offload: on"))
}

/// The XDP attachment `ip link` shows on ext0: "" (none), "xdp" (native), "xdpgeneric".
fn xdp_on_link(netns: &str) -> anyhow::Result<String> {
    let text = sh(netns, &["ip", "-d", "link", "show", "ext0"])?;
    Ok(text
        .split_whitespace()
        .find(|w| w.starts_with("xdp"))
        .unwrap_or("")
        .to_string())
}

/// Whether live frames run here: one short burst into the veth.
fn probe_live(gen_ns: &str, frame: &Arc<Vec<u8>>, ifindex: i32) -> Result<(), String> {
    let frame = Arc::clone(frame);
    traffic::in_netns(gen_ns, move || {
        let generator = Generator::load().map_err(|e| format!("{e:#}"))?;
        let ifindex = u32::try_from(ifindex).map_err(|e| e.to_string())?;
        generator
            .send(&frame, ifindex, 64, LIVE_BATCH)
            .map(drop)
            .map_err(|e| format!("{e:#}"))
    })
}

fn scene() -> anyhow::Result<Scene> {
    let node = Node::prepare("prefilter-bench", &[]);
    let gen_ns = node.name("gen");
    node.track_netns(&gen_ns);
    ip_ok(&["netns", "add", &gen_ns])?;
    let n = node.netns.clone();
    let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    // One receive queue per CPU on both ends: a veth's ndo_xdp_xmit picks the peer's queue by
    // the sending CPU, so each generator thread feeds its own queue and NAPI.
    let queues = cpus.to_string();
    ip_ok(&[
        "-n",
        &n,
        "link",
        "add",
        "ext0",
        "numtxqueues",
        &queues,
        "numrxqueues",
        &queues,
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "numtxqueues",
        &queues,
        "numrxqueues",
        &queues,
        "netns",
        &gen_ns,
    ])?;
    ip_ok(&["-n", &n, "addr", "add", "192.168.99.1/24", "dev", "ext0"])?;
    ip_ok(&["-n", &n, "link", "set", "ext0", "up"])?;
    ip_ok(&[
        "-n",
        &gen_ns,
        "addr",
        "add",
        "192.168.99.2/24",
        "dev",
        "eth0",
    ])?;
    ip_ok(&["-n", &gen_ns, "link", "set", "eth0", "up"])?;
    // NAPI on ext0's queues in every row (the veth needs it to take XDP frames at all).
    set_gro(&n, true)?;
    let dst_mac = mac_of(&n, "ext0")?;
    let src_mac = mac_of(&gen_ns, "eth0")?;
    let frames: Vec<Vec<u8>> = (0..256u16)
        .map(|i| {
            let [hi, lo] = i.to_be_bytes();
            xdp_gen::frame(
                dst_mac,
                src_mac,
                Ipv4Addr::new(198, 18 + (lo & 1), hi ^ lo, lo),
                NODE_ADDR,
                0,
                10_000 + i,
            )
        })
        .collect();
    let live_frame = Arc::new(xdp_gen::live_frame(dst_mac, src_mac, [198, 18], NODE_ADDR));
    let eth0 = sh(&gen_ns, &["cat", "/sys/class/net/eth0/ifindex"])?
        .trim()
        .parse()
        .context("ifindex of eth0")?;
    let flood = match probe_live(&gen_ns, &live_frame, eth0) {
        Ok(()) => Flood::Live,
        Err(why) => {
            eprintln!("xtask: live-frames generator unavailable ({why}); using AF_PACKET");
            Flood::Packet(why)
        }
    };
    let file = node.dir.join("deny.txt");
    std::fs::write(&file, format!("{DENIED}\n"))?;
    Ok(Scene {
        node,
        gen_ns,
        flood,
        live_frame,
        frames: Arc::new(frames),
        eth0,
        file,
        cpus,
    })
}

/// Frames handed to ext0 so far: received (whatever then dropped them) plus those its receive
/// rings had no room for.
fn arrived(netns: &str) -> anyhow::Result<u64> {
    let read = |c: &str| -> anyhow::Result<u64> {
        sh(
            netns,
            &["cat", &format!("/sys/class/net/ext0/statistics/{c}")],
        )?
        .trim()
        .parse()
        .with_context(|| format!("ext0 {c}"))
    };
    Ok(read("rx_packets")? + read("rx_dropped")?)
}

/// What one window measured, per second.
#[derive(Clone, Copy, Debug, Default)]
struct Sample {
    /// The mechanism's drop counter (for the generator-alone row: what the generator sent).
    dropped: f64,
    /// Frames handed to the receiving veth.
    arrived: f64,
    /// Frames the generator sent.
    sent: f64,
    /// For the XDP rows: the program's own ns per run (BPF_PROG_TEST_RUN on a denied frame).
    program_ns: Option<f64>,
}

/// Runs the flood for `SECONDS` after a warm-up and reads `count`, the receiving device's
/// counters and the generator's own count at both ends of the window.
fn measure(s: &Scene, count: &dyn Fn() -> anyhow::Result<u64>) -> anyhow::Result<Sample> {
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let threads: Vec<_> = (0..s.cpus)
        .map(|cpu| {
            let (stop, sent, ns, ifindex) = (
                Arc::clone(&stop),
                Arc::clone(&sent),
                s.gen_ns.clone(),
                s.eth0,
            );
            let (live, frame, frames) = (
                matches!(s.flood, Flood::Live),
                Arc::clone(&s.live_frame),
                Arc::clone(&s.frames),
            );
            std::thread::spawn(move || {
                traffic::in_netns(&ns, move || -> anyhow::Result<()> {
                    xdp_gen::pin_to_cpu(cpu)?;
                    if live {
                        let generator = Generator::load()?;
                        let ifindex = u32::try_from(ifindex)?;
                        while !stop.load(Ordering::Relaxed) {
                            let n = generator.send(&frame, ifindex, LIVE_REPEAT, LIVE_BATCH)?;
                            sent.fetch_add(n, Ordering::Relaxed);
                        }
                        Ok(())
                    } else {
                        flood(ifindex, &frames, &stop, &sent)
                    }
                })
            })
        })
        .collect();
    std::thread::sleep(WARMUP);
    let netns = &s.node.netns;
    // Each counter is stamped with the middle of its own read (a CLI call to the agent may
    // take a while on a busy machine), so no read's latency stretches another's window.
    let read = || -> anyhow::Result<[(u64, Instant); 3]> {
        Ok([
            timed(count)?,
            timed(&|| arrived(netns))?,
            timed(&|| Ok(sent.load(Ordering::Relaxed)))?,
        ])
    };
    let first = read();
    std::thread::sleep(Duration::from_secs(SECONDS));
    let last = read();
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join()
            .map_err(|_| anyhow::anyhow!("generator thread panicked"))??;
    }
    let (first, last) = (first?, last?);
    let rate = |i: usize| {
        let ((a, t0), (b, t1)) = (first[i], last[i]);
        b.saturating_sub(a) as f64 / (t1 - t0).as_secs_f64()
    };
    Ok(Sample {
        dropped: rate(0),
        arrived: rate(1),
        sent: rate(2),
        program_ns: None,
    })
}

/// `read()`'s value and the instant halfway through the read.
fn timed(read: &dyn Fn() -> anyhow::Result<u64>) -> anyhow::Result<(u64, Instant)> {
    let before = Instant::now();
    let value = read()?;
    Ok((value, before + before.elapsed() / 2))
}

fn xdp_count(node: &Node) -> anyhow::Result<u64> {
    let v = node.json(&["prefilter", "list"]);
    v["entries"]
        .as_array()
        .and_then(|es| es.iter().find(|e| e["cidr"] == DENIED))
        .and_then(|e| e["packets"].as_u64())
        .context("the prefilter entry's counter")
}

fn iptables_count(netns: &str) -> anyhow::Result<u64> {
    let text = sh(netns, &["iptables", "-t", "raw", "-nvxL", "PREROUTING"])?;
    text.lines()
        .find(|l| l.contains("DROP") && l.contains("198.18.0.0/15"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .context("the iptables rule's counter")
}

fn nft_count(netns: &str) -> anyhow::Result<u64> {
    let text = sh(
        netns,
        &["nft", "list", "chain", "netdev", "pfbench", "ingress"],
    )?;
    text.split_whitespace()
        .skip_while(|w| *w != "packets")
        .nth(1)
        .and_then(|n| n.parse().ok())
        .context("the nft rule's counter")
}

/// Runs of the XDP program for its own cost, per sample, and samples (median taken).
const COST_RUNS: u32 = 1_000_000;
const COST_SAMPLES: usize = 3;

/// An XDP program's own cost on a frame from the denied CIDR: the median of `COST_SAMPLES`
/// BPF_PROG_TEST_RUNs of `COST_RUNS` each; fails unless the program drops the frame.
fn program_cost(prog: &std::os::fd::OwnedFd) -> anyhow::Result<f64> {
    let frame = xdp_gen::frame(
        [2; 6],
        [4; 6],
        Ipv4Addr::new(198, 18, 3, 4),
        NODE_ADDR,
        0,
        10_000,
    );
    let mut ns = Vec::new();
    for _ in 0..COST_SAMPLES {
        let (verdict, per_run) = xdp_gen::run_cost(prog, &frame, COST_RUNS)?;
        if verdict != 1 {
            bail!("the XDP program returned {verdict}, not XDP_DROP, for a denied source");
        }
        ns.push(f64::from(per_run));
    }
    Ok(median(&ns))
}

/// The id of the XDP program `ip -d link` shows attached to ext0.
fn attached_program(netns: &str) -> anyhow::Result<std::os::fd::OwnedFd> {
    let text = sh(netns, &["ip", "-d", "link", "show", "ext0"])?;
    let id = text
        .split("prog/xdp id ")
        .nth(1)
        .and_then(|t| t.split_whitespace().next())
        .and_then(|t| t.parse().ok())
        .with_context(|| format!("no XDP program id on ext0: {text}"))?;
    xdp_gen::program_by_id(id)
}

/// The veth's own count of XDP_DROP verdicts on ext0, over its receive queues.
fn veth_xdp_drops(netns: &str) -> anyhow::Result<u64> {
    let text = sh(netns, &["ethtool", "-S", "ext0"])?;
    let counts: Vec<u64> = text
        .lines()
        .filter_map(|l| l.trim().split_once(':'))
        .filter(|(k, _)| k.starts_with("rx_queue_") && k.ends_with("_xdp_drops"))
        .map(|(_, v)| v.trim().parse().context("an ethtool counter"))
        .collect::<anyhow::Result<_>>()?;
    if counts.is_empty() {
        bail!("ethtool -S ext0 shows no rx_queue_*_xdp_drops counters");
    }
    Ok(counts.iter().sum())
}

/// The receive side every filter row must share: GRO (so NAPI) on ext0, and no XDP program
/// on it but the prefilter's own in its row. Fails the run when a row would differ.
fn check_receive_side(s: &Scene, row: Row) -> anyhow::Result<String> {
    let netns = &s.node.netns;
    if !gro_on(netns)? {
        bail!(
            "{}: GRO is off on ext0; every row runs with it on",
            row.label()
        );
    }
    let threaded = sh(netns, &["cat", "/sys/class/net/ext0/threaded"])?;
    if threaded.trim() != "0" {
        bail!("{}: threaded NAPI is on on ext0", row.label());
    }
    let xdp = xdp_on_link(netns)?;
    let with_xdp = matches!(row, Row::Xdp | Row::BareXdpDrop);
    match (with_xdp, xdp.as_str()) {
        (true, "") => bail!("{}: no XDP program on ext0", row.label()),
        (true, _) | (false, "") => Ok(xdp),
        (false, other) => bail!("{}: an XDP program ({other}) is still on ext0", row.label()),
    }
}

/// One window of `row`; the prefilter's mode (as the agent and `ip link` report it) in its row.
fn round(s: &mut Scene, row: Row) -> anyhow::Result<(Sample, String)> {
    let netns = s.node.netns.clone();
    match row {
        Row::Xdp => {
            let file = s.file.display().to_string();
            s.node.set_agent_args(&[
                "--prefilter-device".into(),
                "ext0".into(),
                "--prefilter-file".into(),
                file,
            ]);
            s.node.start_agent();
            let mode = s.node.json(&["prefilter", "list"])["devices"][0]["mode"]
                .as_str()
                .unwrap_or("?")
                .to_string();
            let link = check_receive_side(s, row);
            let node = &s.node;
            let result = link.and_then(|link| {
                let mut sample = measure(s, &|| xdp_count(node))?;
                sample.program_ns = Some(program_cost(&attached_program(&netns)?)?);
                Ok((sample, link))
            });
            // An agent without the device takes the program off it again.
            s.node.stop_agent();
            s.node.set_agent_args(&[]);
            s.node.start_agent();
            s.node.stop_agent();
            let (sample, link) = result?;
            Ok((sample, format!("{mode} XDP, `ip link`: {link}")))
        }
        Row::IptablesRaw => {
            let rule = ["-t", "raw", "PREROUTING", "-s", DENIED, "-j", "DROP"];
            let with = |op: &str| {
                let mut args = vec!["iptables", rule[0], rule[1], op];
                args.extend(&rule[2..]);
                sh(&netns, &args).map(drop)
            };
            with("-I")?;
            let result =
                check_receive_side(s, row).and_then(|_| measure(s, &|| iptables_count(&netns)));
            with("-D")?;
            Ok((result?, String::new()))
        }
        Row::NftIngress => {
            let script = format!(
                "table netdev pfbench {{\n chain ingress {{\n  type filter hook ingress device \"ext0\" priority -500; policy accept;\n  ip saddr {DENIED} counter drop\n }}\n}}\n"
            );
            let path = s.node.dir.join("pfbench.nft");
            std::fs::write(&path, script)?;
            sh(&netns, &["nft", "-f", &path.display().to_string()])?;
            let result = check_receive_side(s, row).and_then(|_| measure(s, &|| nft_count(&netns)));
            sh(&netns, &["nft", "delete", "table", "netdev", "pfbench"])?;
            Ok((result?, String::new()))
        }
        Row::BareXdpDrop => {
            let ifindex: u32 = sh(&netns, &["cat", "/sys/class/net/ext0/ifindex"])?
                .trim()
                .parse()
                .context("ifindex of ext0")?;
            let attached = traffic::in_netns(&netns, move || BareDrop::attach(ifindex))?;
            let result = check_receive_side(s, row).and_then(|link| {
                let mut sample = measure(s, &|| veth_xdp_drops(&netns))?;
                sample.program_ns = Some(program_cost(&attached.prog)?);
                Ok((sample, link))
            });
            drop(attached);
            let (sample, link) = result?;
            Ok((sample, format!("native XDP, `ip link`: {link}")))
        }
        Row::GeneratorAlone => {
            set_gro(&netns, false)?;
            let result = measure(s, &|| Ok(0));
            set_gro(&netns, true)?;
            let mut sample = result?;
            if sample.arrived > 0.01 * sample.sent {
                bail!(
                    "generator alone: {:.0} frames/s still reached ext0 with GRO off",
                    sample.arrived
                );
            }
            sample.dropped = sample.sent;
            Ok((sample, String::new()))
        }
    }
}

fn utc_now() -> String {
    Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s[s.len() / 2]
}

fn mpps(x: f64) -> String {
    format!("{:.2}", x / 1e6)
}

/// CPU time the receive side spends per frame beyond the generator's own, in ns: each CPU
/// runs one generator thread and, between its batches, the NAPI poll receiving them, so a
/// frame costs `cpus / rate` CPU-seconds, of which `cpus / alone` are the generator's.
fn receive_ns(cpus: usize, rate: f64, alone: f64) -> f64 {
    let cpus = cpus as f64;
    (cpus / rate - cpus / alone) * 1e9
}

pub fn run() -> anyhow::Result<()> {
    tools::ensure_packages()?;
    let bin_dir = build_binaries(true)?;
    // SAFETY: set before any thread of ours starts; the harness reads it when spawning.
    unsafe { std::env::set_var("PALISADE_BIN_DIR", &bin_dir) };
    let load_before = tools::machine_load();
    let started = utc_now();
    let mut s = scene()?;
    let live = matches!(s.flood, Flood::Live);
    let mut rows = Row::FILTERS.to_vec();
    rows.push(Row::BareXdpDrop);
    if live {
        rows.push(Row::GeneratorAlone);
    }
    let mut samples: Vec<Vec<Sample>> = vec![Vec::new(); rows.len()];
    let mut modes = vec![String::new(); rows.len()];
    for r in 0..ROUNDS {
        for (i, row) in rows.iter().enumerate() {
            let (sample, m) = round(&mut s, *row)?;
            println!(
                "round {}: {:<46} {} Mpps dropped ({} Mpps sent, {} Mpps reached ext0)",
                r + 1,
                row.label(),
                mpps(sample.dropped),
                mpps(sample.sent),
                mpps(sample.arrived)
            );
            if !m.is_empty() {
                modes[i] = m;
            }
            samples[i].push(sample);
        }
    }
    let load_after = tools::machine_load();
    let backend = Command::new("iptables")
        .arg("-V")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let col = |i: usize, f: fn(&Sample) -> f64| -> Vec<f64> { samples[i].iter().map(f).collect() };
    let of = |row: Row| rows.iter().position(|r| *r == row);
    let ipt = median(&col(of(Row::IptablesRaw).unwrap_or(1), |x| x.dropped));
    let alone = of(Row::GeneratorAlone).map(|i| median(&col(i, |x| x.dropped)));
    let mut table = String::from(
        "| drop mechanism | dropped, Mpps (median) | min–max | ratio to iptables raw | generator sent, Mpps (median) | reached ext0, Mpps (median) | receive-side CPU per frame, ns (derived) | XDP program's own cost, ns per run |\n|---|---|---|---|---|---|---|---|\n",
    );
    let mut bars = Vec::new();
    for (i, row) in rows.iter().enumerate() {
        let d = col(i, |x| x.dropped);
        let lo = d.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = d.iter().copied().fold(0.0, f64::max);
        let label = if modes[i].is_empty() {
            row.label().to_string()
        } else {
            format!("{} ({})", row.label(), modes[i])
        };
        let (ratio, cost) = if *row == Row::GeneratorAlone {
            ("—".to_string(), "—".to_string())
        } else {
            bars.push(Bar {
                label: row.label().to_string(),
                values: vec![100.0 * median(&d) / ipt],
            });
            (
                format!("{:.2}x", median(&d) / ipt),
                alone.map_or("—".into(), |a| {
                    format!("{:.0}", receive_ns(s.cpus, median(&d), a))
                }),
            )
        };
        let own: Vec<f64> = samples[i].iter().filter_map(|x| x.program_ns).collect();
        let own = if own.is_empty() {
            "—".to_string()
        } else {
            format!("{:.0}", median(&own))
        };
        let _ = writeln!(
            table,
            "| {label} | {} | {}–{} | {ratio} | {} | {} | {cost} | {own} |",
            mpps(median(&d)),
            mpps(lo),
            mpps(hi),
            mpps(median(&col(i, |x| x.sent))),
            mpps(median(&col(i, |x| x.arrived))),
        );
    }
    let xdp_ratio = median(&col(of(Row::Xdp).unwrap_or(0), |x| x.dropped)) / ipt;
    let verdict = if xdp_ratio >= 2.0 {
        format!("met ({xdp_ratio:.2}x)")
    } else {
        format!("not met ({xdp_ratio:.2}x)")
    };
    let plot = svg::bars(
        "XDP prefilter drop rate: % of the iptables raw-table drop rate (median)",
        &["drop rate"],
        &bars,
    );
    std::fs::write(workspace_root().join("docs/benchmarks/prefilter.svg"), plot)?;
    let generator = match &s.flood {
        Flood::Live => format!(
            "The flood is sent from inside the kernel: one thread per CPU in a namespace standing \
             for the outside, each pinned to its CPU, runs BPF_PROG_TEST_RUN in live-frames mode \
             (`BPF_F_TEST_XDP_LIVE_FRAMES`, {LIVE_REPEAT} frames a call, batches of \
             {LIVE_BATCH}) over a 60-byte UDP frame with a 15-instruction XDP program \
             (xtask/src/bench/xdp_gen.rs) that writes a random value into the low half of the \
             IPv4 source (so every frame comes from another address of 198.18.0.0/16, inside \
             the denied {DENIED}) and its complement into the IP ID (so the header checksum \
             stays valid), and returns `XDP_TX`, which the kernel transmits on the generator's \
             veth end with `ndo_xdp_xmit`. This is xdp-trafficgen's mechanism; xdp-trafficgen \
             itself (xdp-tools 1.3.1) sends IPv6 only, which the IPv4 prefilter does not judge, \
             and there is no kernel pktgen here (the kernel is built without it). A veth takes \
             XDP frames only into receive queues in NAPI mode: the receiving end, ext0, has \
             GRO on (`ethtool -K ext0 gro on`) in every row, checked before each window, so \
             the frames reach all three mechanisms through the same NAPI poll (the prefilter \
             row's XDP program runs in it; the other rows get an skb built from the frame and \
             handed to the stack through GRO); ext0 has one receive queue per CPU (the veth picks \
             the queue by the sending CPU) and threaded NAPI off, and no XDP program in the \
             iptables and nftables rows (checked). The receive path of a queue runs on the CPU \
             whose generator fills it, between the generator's batches, so each row's rate is \
             set by generator plus receive path. Two reference rows follow the three mechanisms: a \
             bare XDP program (`return XDP_DROP`, two instructions, attached native to ext0 with \
             a bpf link, counted by the veth's own rx_queue_*_xdp_drops), the floor under any XDP \
             drop on this veth; and the generator alone (ext0's GRO off and no XDP: the veth \
             discards each frame on transmit), its ceiling. The last column derives from that \
             ceiling the receive side's own CPU time per frame: {cpus} CPUs / rate − {cpus} \
             CPUs / generator-alone rate (it includes the veth's NAPI poll: the prefilter \
             program's own cost is about its figure minus the bare XDP_DROP's).",
            cpus = s.cpus
        ),
        Flood::Packet(why) => format!(
            "The flood is written with AF_PACKET `sendmmsg` ({BATCH} frames a call, qdisc \
             bypassed, 256 source addresses in {DENIED}) by one pinned thread per CPU in a \
             namespace standing for the outside: the in-kernel live-frames generator could not \
             run here ({why}). This generator shares the CPUs with the receive path and costs \
             more per frame than the receive side of any row, so it sets the rates: read the \
             ratios as lower bounds. ext0 has GRO on in every row (checked before each window), \
             one receive queue per CPU, no XDP program outside the two XDP rows.",
        ),
    };
    let body = format!(
        "{generator} {ROUNDS} interleaved rounds of {SECONDS} s (after {} ms of warm-up) per \
         row; each drop rate is the mechanism's own drop counter over the window (the prefilter \
         entry's counter, the iptables rule's, the nft rule's), \"reached ext0\" is ext0's \
         rx_packets + rx_dropped over the same window. The prefilter is attached only in its own \
         rounds (an agent restarted without `--prefilter-device` takes it off), so the other \
         rows run without it. The last column is the XDP program's own cost, free of the \
         generator and of the machine's other load: after each XDP window, BPF_PROG_TEST_RUN \
         (not live: nothing sent) of the program attached to ext0 on a frame from the denied \
         CIDR, {COST_RUNS} runs, median of {COST_SAMPLES}, the kernel's mean ns per run (it \
         includes the test loop's own few ns, as the bare XDP_DROP's figure shows), and the \
         program must return XDP_DROP. iptables: {backend}. Release agent.\n\n\
         Started at {started}; before the run: {load_before}; after: {load_after}.\n\n\
         {table}\n![drop rate as % of iptables raw](prefilter.svg)\n\n\
         Target: XDP drop rate >= 2x the iptables raw-table drop rate: {verdict}.\n\n\
         Where a row drops nearly all the generator sent and the generator-alone rate is not \
         much higher than the row's, the generator, not the filter, sets the rate: the figure is \
         then a lower bound of what the filter can drop, and the ratio between rows understates \
         the difference in their cost (the last column does not).\n",
        WARMUP.as_millis()
    );
    write_result("prefilter", "XDP prefilter drop rate", &body)
}
