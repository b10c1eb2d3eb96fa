//! The datapath programs' own cost per packet, measured for `cargo xtask bench datapath-micro`:
//! BPF_PROG_TEST_RUN with a repeat count, on the frames of one connection between two
//! endpoints, against maps the engine would write. The kernel times the runs itself, so what
//! the machine's other work adds is the noise between rounds, not a share of every figure;
//! rounds are interleaved across cases. Prints the samples as JSON on stdout (xtask makes the
//! table); it lives here, not in xtask, because it loads the BPF programs in-process, and
//! xtask must build before the BPF toolchain is installed.
#![expect(
    clippy::print_stdout,
    clippy::print_stderr,
    reason = "a measuring tool: its samples go to stdout, a failure to stderr"
)]

use std::net::Ipv4Addr;
use std::process::ExitCode;

use palisade_integration::differential::DatapathConfig;
use palisade_integration::differential::frames::{self, L4, Tuple};
use palisade_integration::differential::{DiffEnv, RealDatapath};
use palisade_integration::traffic;
use palisade_policies::datapath_model::Program;
use palisade_policies::endpoint::{EndpointId, LinkLayer};
use palisade_policies::identity::Identity;
use palisade_policies::mapstate::{
    Action, EndpointEntry, IpcacheEntry, MapState, PolicyEntry, PolicyKey, PortPrefix, RuleId,
    Staged, StagedEnforcement,
};
use palisade_policies::model::Direction;
use serde_json::json;

const A: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 2);
const B: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 3);
const TCP: u8 = 6;
const SYN: u8 = 0x02;
const ACK: u8 = 0x10;
/// Runs per timed test run.
const REPEAT: u32 = 200_000;
const ROUNDS: usize = 7;

/// One timed case: a frame, the program and the endpoint interface it runs on.
struct Case {
    name: &'static str,
    program: Program,
    /// 0: endpoint A's interface, 1: endpoint B's.
    at: usize,
    frame: Vec<u8>,
}

fn tcp(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    frames::frame(
        &Tuple {
            src,
            dst,
            protocol: TCP,
            sport,
            dport,
        },
        L4::Tcp { flags },
    )
}

/// Two endpoints; B's ingress enforced, allowing A on ports 80 and 81, and `peers` CIDR
/// identities more (one /32 each) so the policy and ipcache tries have their size.
fn maps(ifindexes: [u32; 2], peers: u32) -> MapState {
    let mut m = MapState::default();
    let link = |n: u8| LinkLayer {
        mac: [2, 0, 0, 0, 1, n],
        host_mac: [2, 0, 0, 0, 2, n],
        bridge: None,
    };
    for (i, (ip, identity)) in [(A, 256), (B, 257)].into_iter().enumerate() {
        let n = u8::try_from(i).expect("two endpoints");
        m.endpoints.insert(
            EndpointId(u32::from(n) + 1),
            EndpointEntry {
                ifindex: ifindexes[i],
                identity: Identity(identity),
                ip,
                ingress_enforced: i == 1,
                egress_enforced: false,
                audit: false,
                staged: StagedEnforcement::default(),
                link: link(n),
            },
        );
        m.ipcache.insert(
            ip.into(),
            IpcacheEntry {
                identity: Identity(identity),
                endpoint: Some(EndpointId(u32::from(n) + 1)),
                cidr_identity: None,
            },
        );
    }
    m.ipcache.insert(
        "0.0.0.0/0".parse().expect("prefix"),
        IpcacheEntry {
            identity: Identity::WORLD,
            endpoint: None,
            cidr_identity: None,
        },
    );
    let allow = |identity: u32, port: u16| {
        (
            PolicyKey {
                endpoint: EndpointId(2),
                identity: Identity(identity),
                direction: Direction::Ingress,
                protocol: Some(TCP),
                port: PortPrefix::exact(port),
            },
            PolicyEntry {
                action: Action::Allow,
                rule: RuleId(1),
                staged: Staged::Same,
            },
        )
    };
    m.policy.extend([allow(256, 80), allow(256, 81)]);
    for k in 0..peers {
        let [_, _, hi, lo] = k.to_be_bytes();
        let identity = (1 << 24) + k + 1;
        m.ipcache.insert(
            Ipv4Addr::new(10, 1, hi, lo).into(),
            IpcacheEntry {
                identity: Identity(identity),
                endpoint: None,
                cidr_identity: None,
            },
        );
        m.policy.extend([allow(identity, 80)]);
    }
    m
}

/// Runs once and checks the program forwarded (TC_ACT_OK) or handed the frame on
/// (TC_ACT_REDIRECT).
fn pass(real: &RealDatapath, c: &Case, ifindexes: [u32; 2]) -> Result<(), String> {
    let (rv, _) = real.time_run(c.program, &c.frame, ifindexes[c.at], 1)?;
    if rv != 0 && rv != 7 {
        return Err(format!("{}: the program returned {rv}", c.name));
    }
    Ok(())
}

/// ns per packet for each case, one sample per round, over `ROUNDS` interleaved rounds.
fn measure(peers: u32, cfg: DatapathConfig) -> Result<Vec<(String, Vec<f64>)>, String> {
    let env = DiffEnv::create("micro", 2);
    let interfaces = env.interfaces.clone();
    let bpffs = env.bpffs();
    let result = traffic::in_netns(&env.netns, move || -> Result<_, String> {
        let idx = |n: &str| nix::net::if_::if_nametoindex(n).map_err(|e| format!("{n}: {e}"));
        let ifindexes = [idx(&interfaces[0])?, idx(&interfaces[2])?];
        let mut real = RealDatapath::load_with(&bpffs, cfg);
        real.set_maps(&maps(ifindexes, peers))?;
        // The connection, opened at both hops in both directions.
        let open = [
            Case {
                name: "syn",
                program: Program::FromEndpoint,
                at: 0,
                frame: tcp(A, B, 40000, 80, SYN),
            },
            Case {
                name: "syn",
                program: Program::ToEndpoint,
                at: 1,
                frame: tcp(A, B, 40000, 80, SYN),
            },
            Case {
                name: "syn-ack",
                program: Program::FromEndpoint,
                at: 1,
                frame: tcp(B, A, 80, 40000, SYN | ACK),
            },
            Case {
                name: "syn-ack",
                program: Program::ToEndpoint,
                at: 0,
                frame: tcp(B, A, 80, 40000, SYN | ACK),
            },
        ];
        for c in &open {
            pass(&real, c, ifindexes)?;
        }
        let cases = [
            Case {
                name: "established, forward: A's egress",
                program: Program::FromEndpoint,
                at: 0,
                frame: tcp(A, B, 40000, 80, ACK),
            },
            Case {
                name: "established, forward: B's ingress",
                program: Program::ToEndpoint,
                at: 1,
                frame: tcp(A, B, 40000, 80, ACK),
            },
            Case {
                name: "established, reply: B's egress",
                program: Program::FromEndpoint,
                at: 1,
                frame: tcp(B, A, 80, 40000, ACK),
            },
            Case {
                name: "established, reply: A's ingress",
                program: Program::ToEndpoint,
                at: 0,
                frame: tcp(B, A, 80, 40000, ACK),
            },
            Case {
                name: "untracked, judged by policy: B's ingress",
                program: Program::ToEndpoint,
                at: 1,
                frame: tcp(A, B, 40001, 81, ACK),
            },
        ];
        for c in &cases {
            pass(&real, c, ifindexes)?;
        }
        let mut samples = vec![Vec::new(); cases.len()];
        for _ in 0..ROUNDS {
            for (c, s) in cases.iter().zip(&mut samples) {
                let (_, d) = real.time_run(c.program, &c.frame, ifindexes[c.at], REPEAT)?;
                s.push(d.as_secs_f64() * 1e9);
            }
        }
        Ok(cases
            .iter()
            .zip(samples)
            .map(|(c, s)| (c.name.to_string(), s))
            .collect::<Vec<_>>())
    });
    drop(env);
    result
}

/// The four settings: every packet counted in its conntrack entry and no fast path (the
/// datapath before its trimming), trimmed, trimmed with the fast path, and that with 10,000
/// CIDR peers.
fn settings() -> [(&'static str, u32, DatapathConfig); 4] {
    [
        (
            "per-packet conntrack writes, no fast path",
            0,
            DatapathConfig {
                fast_path: false,
                conntrack_accounting: true,
                ..DatapathConfig::default()
            },
        ),
        (
            "trimmed, no fast path",
            0,
            DatapathConfig {
                fast_path: false,
                ..DatapathConfig::default()
            },
        ),
        ("trimmed, fast path", 0, DatapathConfig::default()),
        (
            "trimmed, fast path, 10,000 CIDR peers",
            10_000,
            DatapathConfig::default(),
        ),
    ]
}

fn main() -> ExitCode {
    let mut columns = Vec::new();
    for (name, peers, cfg) in settings() {
        match measure(peers, cfg) {
            Ok(cases) => columns.push(json!({
                "setting": name,
                "cases": cases
                    .into_iter()
                    .map(|(case, ns)| json!({"case": case, "ns_per_packet": ns}))
                    .collect::<Vec<_>>(),
            })),
            Err(e) => {
                eprintln!("measuring the programs, {name}: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    println!(
        "{}",
        json!({"repeat": REPEAT, "rounds": ROUNDS, "settings": columns})
    );
    ExitCode::SUCCESS
}
