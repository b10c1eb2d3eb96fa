//! `cargo xtask bench prefilter`: how fast the XDP prefilter drops a flood from a denied CIDR,
//! against an iptables raw-table DROP and an nftables netdev-ingress drop of the same CIDR, on
//! the same veth, in interleaved rounds.
//!
//! The flood comes from a namespace standing for the outside: minimal UDP frames from many
//! source addresses in 198.18.0.0/15, written straight to the device with AF_PACKET sendmmsg
//! (the qdisc bypassed) from one thread per CPU. There is no kernel pktgen here (the module is
//! not built), so this generator is the load. Each figure is the drop counter's rate of the
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

use crate::bench::write_result;
use crate::build_binaries;

const DENIED: &str = "198.18.0.0/15";
const NODE_ADDR: Ipv4Addr = Ipv4Addr::new(192, 168, 99, 1);
const ROUNDS: usize = 3;
const SECONDS: u64 = 5;
const WARMUP: Duration = Duration::from_millis(500);
/// Frames per sendmmsg call.
const BATCH: usize = 256;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Filter {
    Xdp,
    IptablesRaw,
    NftIngress,
}

impl Filter {
    const ALL: [Filter; 3] = [Filter::Xdp, Filter::IptablesRaw, Filter::NftIngress];

    fn label(self) -> &'static str {
        match self {
            Filter::Xdp => "Palisade XDP prefilter",
            Filter::IptablesRaw => "iptables raw PREROUTING DROP",
            Filter::NftIngress => "nftables netdev ingress drop",
        }
    }
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

fn ipv4_checksum(header: &[u8]) -> u16 {
    let mut sum: u32 = header
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c.get(1).copied().unwrap_or(0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !u16::try_from(sum).unwrap_or(0)
}

/// A minimal UDP frame (60 bytes before the FCS) from `src` to the node's address, with a
/// valid IPv4 header checksum, so the stack's own checks do not drop it before iptables.
fn frame(dst_mac: [u8; 6], src_mac: [u8; 6], src: Ipv4Addr, sport: u16) -> Vec<u8> {
    let mut f = Vec::with_capacity(60);
    f.extend(dst_mac);
    f.extend(src_mac);
    f.extend(0x0800u16.to_be_bytes());
    let mut iph = vec![0x45, 0, 0, 32, 0, 0, 0x40, 0, 64, 17, 0, 0];
    iph.extend(src.octets());
    iph.extend(NODE_ADDR.octets());
    let c = ipv4_checksum(&iph);
    iph[10..12].copy_from_slice(&c.to_be_bytes());
    f.extend(iph);
    f.extend(sport.to_be_bytes());
    f.extend(9u16.to_be_bytes());
    f.extend(12u16.to_be_bytes());
    f.extend([0, 0]);
    f.extend(b"floo");
    f.resize(60, 0);
    f
}

/// One generator thread: AF_PACKET on `ifindex`, qdisc bypassed, sendmmsg of `BATCH` frames
/// at a time until `stop`; returns the frames the kernel took.
fn flood(ifindex: i32, frames: &[Vec<u8>], stop: &AtomicBool) -> anyhow::Result<u64> {
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
        let mut sent = 0u64;
        while !stop.load(Ordering::Relaxed) {
            let n = libc::sendmmsg(
                fd,
                msgs.as_mut_ptr(),
                u32::try_from(msgs.len()).unwrap_or(1),
                0,
            );
            if n > 0 {
                sent += u64::try_from(n).unwrap_or(0);
            }
        }
        libc::close(fd);
        Ok(sent)
    }
}

struct Scene {
    node: Node,
    gen_ns: String,
    frames: Arc<Vec<Vec<u8>>>,
    eth0: i32,
    file: std::path::PathBuf,
}

fn scene() -> anyhow::Result<Scene> {
    let node = Node::prepare("prefilter-bench", &[]);
    let gen_ns = node.name("gen");
    node.track_netns(&gen_ns);
    ip_ok(&["netns", "add", &gen_ns])?;
    let n = node.netns.clone();
    ip_ok(&[
        "-n", &n, "link", "add", "ext0", "type", "veth", "peer", "name", "eth0", "netns", &gen_ns,
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
    let dst_mac = mac_of(&n, "ext0")?;
    let src_mac = mac_of(&gen_ns, "eth0")?;
    let frames: Vec<Vec<u8>> = (0..256u16)
        .map(|i| {
            let [hi, lo] = i.to_be_bytes();
            frame(
                dst_mac,
                src_mac,
                Ipv4Addr::new(198, 18 + (lo & 1), hi ^ lo, lo),
                10_000 + i,
            )
        })
        .collect();
    let eth0 = sh(&gen_ns, &["cat", "/sys/class/net/eth0/ifindex"])?
        .trim()
        .parse()
        .context("ifindex of eth0")?;
    let file = node.dir.join("deny.txt");
    std::fs::write(&file, format!("{DENIED}\n"))?;
    Ok(Scene {
        node,
        gen_ns,
        frames: Arc::new(frames),
        eth0,
        file,
    })
}

/// Runs the flood for `SECONDS` after a warm-up; returns (dropped per second as `count`
/// says, frames sent per second).
fn measure(s: &Scene, count: &dyn Fn() -> anyhow::Result<u64>) -> anyhow::Result<(f64, f64)> {
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    let threads: Vec<_> = (0..cpus)
        .map(|_| {
            let (stop, sent, frames, ns, ifindex) = (
                Arc::clone(&stop),
                Arc::clone(&sent),
                Arc::clone(&s.frames),
                s.gen_ns.clone(),
                s.eth0,
            );
            std::thread::spawn(move || {
                let n = traffic::in_netns(&ns, move || flood(ifindex, &frames, &stop));
                n.map(|n| sent.fetch_add(n, Ordering::Relaxed))
            })
        })
        .collect();
    std::thread::sleep(WARMUP);
    let (c0, s0, t0) = (count()?, sent.load(Ordering::Relaxed), Instant::now());
    std::thread::sleep(Duration::from_secs(SECONDS));
    let c1 = count()?;
    let elapsed = t0.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join()
            .map_err(|_| anyhow::anyhow!("generator thread panicked"))??;
    }
    // Sent is read after the threads end; scale by the measured window's share.
    let s1 = sent.load(Ordering::Relaxed);
    let total = (SECONDS as f64) + WARMUP.as_secs_f64();
    let offered = (s1 - s0) as f64 / total;
    Ok(((c1.saturating_sub(c0)) as f64 / elapsed, offered))
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

fn round(s: &mut Scene, filter: Filter) -> anyhow::Result<(f64, f64, String)> {
    let netns = s.node.netns.clone();
    match filter {
        Filter::Xdp => {
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
            let node = &s.node;
            let result = measure(s, &|| xdp_count(node));
            // An agent without the device takes the program off it again.
            s.node.stop_agent();
            s.node.set_agent_args(&[]);
            s.node.start_agent();
            s.node.stop_agent();
            let (dropped, offered) = result?;
            Ok((dropped, offered, mode))
        }
        Filter::IptablesRaw => {
            sh(
                &netns,
                &[
                    "iptables",
                    "-t",
                    "raw",
                    "-I",
                    "PREROUTING",
                    "-s",
                    DENIED,
                    "-j",
                    "DROP",
                ],
            )?;
            let result = measure(s, &|| iptables_count(&netns));
            sh(
                &netns,
                &[
                    "iptables",
                    "-t",
                    "raw",
                    "-D",
                    "PREROUTING",
                    "-s",
                    DENIED,
                    "-j",
                    "DROP",
                ],
            )?;
            let (dropped, offered) = result?;
            Ok((dropped, offered, String::new()))
        }
        Filter::NftIngress => {
            let script = format!(
                "table netdev pfbench {{\n chain ingress {{\n  type filter hook ingress device \"ext0\" priority -500; policy accept;\n  ip saddr {DENIED} counter drop\n }}\n}}\n"
            );
            let path = s.node.dir.join("pfbench.nft");
            std::fs::write(&path, script)?;
            sh(&netns, &["nft", "-f", &path.display().to_string()])?;
            let result = measure(s, &|| nft_count(&netns));
            sh(&netns, &["nft", "delete", "table", "netdev", "pfbench"])?;
            let (dropped, offered) = result?;
            Ok((dropped, offered, String::new()))
        }
    }
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s[s.len() / 2]
}

fn mpps(x: f64) -> String {
    format!("{:.2}", x / 1e6)
}

pub fn run() -> anyhow::Result<()> {
    crate::bench::tools::ensure_packages()?;
    let bin_dir = build_binaries(true)?;
    // SAFETY: set before any thread of ours starts; the harness reads it when spawning.
    unsafe { std::env::set_var("PALISADE_BIN_DIR", &bin_dir) };
    let mut s = scene()?;
    let mut drops: Vec<Vec<f64>> = vec![Vec::new(); Filter::ALL.len()];
    let mut offered: Vec<Vec<f64>> = vec![Vec::new(); Filter::ALL.len()];
    let mut mode = String::new();
    for r in 0..ROUNDS {
        for (i, f) in Filter::ALL.iter().enumerate() {
            let (d, o, m) = round(&mut s, *f)?;
            println!(
                "round {}: {:<32} {} Mpps dropped ({} Mpps sent)",
                r + 1,
                f.label(),
                mpps(d),
                mpps(o)
            );
            if !m.is_empty() {
                mode = m;
            }
            drops[i].push(d);
            offered[i].push(o);
        }
    }
    let backend = Command::new("iptables")
        .arg("-V")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let ipt = median(&drops[1]);
    let mut table = String::from(
        "| drop mechanism | dropped, Mpps (median) | min–max | ratio to iptables raw | generator sent, Mpps (median) |\n|---|---|---|---|---|\n",
    );
    for (i, f) in Filter::ALL.iter().enumerate() {
        let d = &drops[i];
        let lo = d.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = d.iter().copied().fold(0.0, f64::max);
        let label = if *f == Filter::Xdp {
            format!("{} ({mode} XDP)", f.label())
        } else {
            f.label().to_string()
        };
        let _ = writeln!(
            table,
            "| {label} | {} | {}–{} | {:.2}x | {} |",
            mpps(median(d)),
            mpps(lo),
            mpps(hi),
            median(d) / ipt,
            mpps(median(&offered[i]))
        );
    }
    let xdp_ratio = median(&drops[0]) / ipt;
    let verdict = if xdp_ratio >= 2.0 {
        format!("met ({xdp_ratio:.2}x)")
    } else {
        format!("not met ({xdp_ratio:.2}x)")
    };
    let body = format!(
        "A flood of minimal UDP frames (60 bytes) from 256 source addresses in {DENIED}, written \
         with AF_PACKET `sendmmsg` ({BATCH} frames a call, qdisc bypassed) by one thread per CPU in \
         a namespace standing for the outside, into a veth whose node-side end carries the filter \
         that drops the whole CIDR. No kernel pktgen on this machine (the kernel is built without \
         it), so this generator is the load, and it shares the two CPUs with the receive path: a \
         cheaper drop leaves more CPU to the generator, so the drop rate measures the whole \
         path. {ROUNDS} interleaved rounds of {SECONDS} s (after {} ms of warm-up) per mechanism; \
         each rate is the mechanism's own drop counter over the window. The prefilter is attached \
         only in its own rounds (an agent restarted without `--prefilter-device` takes it off), \
         so the other rows run without it. iptables: {backend}.\n\n{table}\n\
         Target: XDP drop rate >= 2x the iptables raw-table drop rate: {verdict}.\n\n\
         Where a row drops nearly all its generator sent (compare the last two columns), the \
         generator, not the filter, sets the rate: the figure is then a lower bound of what the \
         filter can drop, and the ratio between rows understates the difference in their cost.\n",
        WARMUP.as_millis()
    );
    write_result("prefilter", "XDP prefilter drop rate", &body)
}
