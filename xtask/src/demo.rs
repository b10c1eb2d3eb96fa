//! `cargo xtask demo`: Palisade in one run. A node namespace with no uplink runs the agent;
//! three shop workloads get identities from their labels; the policies in policies/demo/ are
//! applied; real connections are attempted; a table says what happened and why (from the
//! agent's own flow records); then everything is removed.

use std::time::Instant;

use anyhow::{Context as _, bail};
use palisade_integration::traffic::{self, ping, tcp_connects, tcp_server};
use palisade_integration::{Endpoint, Node};
use serde_json::Value;

use crate::{build_binaries, workspace_root};

const TAG: &str = "pal-demo";

struct Probe {
    from: &'static str,
    to: &'static str,
    port: u16,
    /// TCP, or ICMP echo when port is 0.
    expect: bool,
    note: &'static str,
}

fn short(name: &str) -> &str {
    name.strip_prefix(&format!("{TAG}-")).unwrap_or(name)
}

fn why(flows: &[Value], src: &Endpoint, dst: &Endpoint, port: u16, allowed: bool) -> String {
    let proto = if port == 0 { "ICMP" } else { "TCP" };
    let matching = |f: &&Value| {
        f["ip"]["source"] == src.ip.to_string()
            && f["ip"]["destination"] == dst.ip.to_string()
            && f["l4"]["protocol"] == proto
            && (port == 0 || f["l4"]["destination_port"] == port)
    };
    if allowed {
        // The destination's ingress check names the rule that let it in.
        let f = flows
            .iter()
            .rev()
            .filter(matching)
            .find(|f| f["direction"] == "ingress" && f["verdict"] == "FORWARDED");
        return match f.and_then(|f| f["policy"]["rule"].as_str()) {
            Some(rule) => format!("allowed by {rule}"),
            None => format!("no policy restricts {}: allowed", short(&dst.name)),
        };
    }
    match flows
        .iter()
        .rev()
        .filter(matching)
        .find(|f| f["verdict"] == "DROPPED")
    {
        Some(f) => {
            let reason = f["drop_reason"].as_str().unwrap_or("dropped");
            let at = format!(
                "{} {}",
                short(f["endpoint"]["name"].as_str().unwrap_or("?")),
                f["direction"].as_str().unwrap_or("")
            );
            match f["policy"]["rule"].as_str() {
                Some(rule) => format!("{reason}: {rule}"),
                None => format!("{reason}: nothing allows it at {at} (default deny)"),
            }
        }
        None => "no flow recorded".to_string(),
    }
}

fn rss_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn section(title: &str) {
    if std::io::IsTerminal::is_terminal(&std::io::stdout()) {
        println!("\n\x1b[1m== {title}\x1b[0m");
    } else {
        println!("\n== {title}");
    }
}

fn show(node: &Node, args: &[&str]) -> String {
    println!("$ palisade {}", args.join(" "));
    let out = node.palisade_ok(args);
    print!("{out}");
    out
}

fn run_probes(node: &Node, eps: &[Endpoint], probes: &[Probe]) -> Vec<bool> {
    let find = |n: &str| {
        eps.iter()
            .find(|e| short(&e.name) == n)
            .expect("demo endpoint")
            .clone()
    };
    let jobs: Vec<Box<dyn FnOnce() -> bool + Send>> = probes
        .iter()
        .map(|p| {
            let (src, dst, port) = (find(p.from), find(p.to), p.port);
            Box::new(move || {
                if port == 0 {
                    ping(&src.name, dst.ip)
                } else {
                    tcp_connects(&src.name, dst.ip, port)
                }
            }) as Box<dyn FnOnce() -> bool + Send>
        })
        .collect();
    let results = traffic::all(jobs);
    // Give the flow reader a moment to store the last events.
    std::thread::sleep(std::time::Duration::from_millis(300));
    let flows = node.flows(&["--last", "5000"]);
    let mut rows = Vec::new();
    for (p, ok) in probes.iter().zip(&results) {
        let (src, dst) = (find(p.from), find(p.to));
        let what = if p.port == 0 {
            "ping".to_string()
        } else {
            format!("tcp/{}", p.port)
        };
        let mark = if *ok == p.expect {
            ""
        } else {
            "  <-- UNEXPECTED"
        };
        rows.push(format!(
            "{:<10} {:<10} {:<9} {:<9} {:<9} {}{}",
            p.from,
            p.to,
            what,
            if p.expect { "allow" } else { "deny" },
            if *ok { "ALLOWED" } else { "DENIED" },
            why(&flows, &src, &dst, p.port, *ok),
            mark
        ));
        if !p.note.is_empty() {
            rows.push(format!("{:>41}  ({})", "", p.note));
        }
    }
    println!(
        "{:<10} {:<10} {:<9} {:<9} {:<9} WHY",
        "FROM", "TO", "WHAT", "EXPECTED", "RESULT"
    );
    for r in rows {
        println!("{r}");
    }
    results
}

pub fn run() -> anyhow::Result<()> {
    let started = Instant::now();
    println!("Palisade demo: identity-based network policy, enforced in eBPF, explained by flows.");
    let bin_dir = build_binaries(false)?;
    // SAFETY: single-threaded at this point; the variable is read by the fixture below.
    unsafe { std::env::set_var("PALISADE_BIN_DIR", &bin_dir) };
    if !nix::unistd::geteuid().is_root() {
        bail!(
            "the demo needs root (it loads BPF programs and creates network namespaces); run `cargo xtask demo` as root"
        );
    }
    // Leftovers of an interrupted run.
    if let Ok(rd) = std::fs::read_dir("/run/netns") {
        for e in rd.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if n.starts_with(&format!("{TAG}-")) {
                let _ = std::process::Command::new("ip")
                    .args(["netns", "del", &n])
                    .status();
            }
        }
    }

    section("A node namespace with no uplink, running palisade-agent --local");
    let node = Node::start_tagged(TAG, "demo", &[]);
    let agent_started = Instant::now();
    println!(
        "node namespace {TAG}-node; agent API {}",
        node.api.display()
    );

    section("Workloads join the node; identities come from their labels");
    let specs = [
        ("frontend", "app=frontend,tier=web"),
        ("backend", "app=backend,tier=api"),
        ("db", "app=db,tier=data"),
        ("newcomer", "app=newcomer"),
    ];
    let mut eps = Vec::new();
    for (name, labels) in specs {
        let full = node.name(name);
        println!("$ palisade endpoint add {full} --namespace shop --labels {labels}");
        let e = node.add_endpoint(name, "shop", labels);
        println!("  id {} ip {} identity {}", e.id, e.ip, e.identity);
        eps.push(e);
    }
    let ep = |n: &str| {
        eps.iter()
            .find(|e| short(&e.name) == n)
            .expect("endpoint")
            .clone()
    };
    let _servers = [
        tcp_server(&ep("frontend").name, 80),
        tcp_server(&ep("backend").name, 8080),
        tcp_server(&ep("backend").name, 9090),
        tcp_server(&ep("db").name, 5432),
    ];
    println!("servers: frontend tcp/80, backend tcp/8080 and tcp/9090, db tcp/5432");

    section("Before any policy: everything may talk to everything (Kubernetes default)");
    let open = run_probes(
        &node,
        &eps,
        &[Probe {
            from: "frontend",
            to: "db",
            port: 5432,
            expect: true,
            note: "",
        }],
    );

    section("Policies from policies/demo/");
    let demo_dir = workspace_root().join("policies/demo");
    let mut files: Vec<_> = std::fs::read_dir(&demo_dir)
        .with_context(|| format!("reading {}", demo_dir.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    for f in &files {
        let text = std::fs::read_to_string(f)?;
        if let Some(comment) = text.lines().find(|l| l.starts_with('#')) {
            println!("{}", comment);
        }
        show(
            &node,
            &["policy", "apply", "-f", f.to_str().expect("utf-8 path")],
        );
    }

    section("Traffic with the policies in force");
    let probes = [
        Probe {
            from: "frontend",
            to: "backend",
            port: 8080,
            expect: true,
            note: "",
        },
        Probe {
            from: "frontend",
            to: "backend",
            port: 9090,
            expect: false,
            note: "only the API port is open",
        },
        Probe {
            from: "backend",
            to: "db",
            port: 5432,
            expect: true,
            note: "",
        },
        Probe {
            from: "frontend",
            to: "db",
            port: 5432,
            expect: false,
            note: "tier=web is allowed, but the deny rule wins",
        },
        Probe {
            from: "db",
            to: "backend",
            port: 8080,
            expect: false,
            note: "",
        },
        Probe {
            from: "backend",
            to: "frontend",
            port: 80,
            expect: false,
            note: "",
        },
        Probe {
            from: "newcomer",
            to: "backend",
            port: 8080,
            expect: false,
            note: "",
        },
        Probe {
            from: "frontend",
            to: "backend",
            port: 0,
            expect: false,
            note: "ICMP echo is not TCP/8080",
        },
    ];
    let enforced = run_probes(&node, &eps, &probes);

    section("Labels are identity: relabel the newcomer as a frontend");
    show(
        &node,
        &[
            "endpoint",
            "label",
            &ep("newcomer").name,
            "--set",
            "app=frontend",
            "--set",
            "tier=web",
        ],
    );
    let relabeled_probes = [
        Probe {
            from: "newcomer",
            to: "backend",
            port: 8080,
            expect: true,
            note: "same identity as frontend now",
        },
        Probe {
            from: "newcomer",
            to: "db",
            port: 5432,
            expect: false,
            note: "",
        },
    ];
    let relabeled = run_probes(&node, &eps, &relabeled_probes);

    section("Drops, as `palisade observe` shows them");
    show(
        &node,
        &[
            "observe",
            "--verdict",
            "DROPPED",
            "--namespace",
            "shop",
            "--last",
            "6",
        ],
    );

    section("Why? `palisade policy trace` answers from the datapath's own map state");
    show(
        &node,
        &[
            "policy",
            "trace",
            "--from",
            &ep("frontend").qualified(),
            "--to",
            &ep("backend").qualified(),
            "--port",
            "8080",
        ],
    );
    show(
        &node,
        &[
            "policy",
            "trace",
            "--from",
            &ep("frontend").qualified(),
            "--to",
            &ep("db").qualified(),
            "--port",
            "5432",
        ],
    );

    section("Agent status");
    show(&node, &["status"]);
    let (rss, hwm) = node.agent_pid().map(rss_kib).unwrap_or((0, 0));

    let expected: Vec<bool> = probes.iter().map(|p| p.expect).collect();
    let expected_relabel: Vec<bool> = relabeled_probes.iter().map(|p| p.expect).collect();
    let all_ok = open == vec![true] && enforced == expected && relabeled == expected_relabel;
    let agent_secs = agent_started.elapsed().as_secs_f64();
    drop(node);
    section("Done");
    println!("cleaned up: agent stopped, namespaces and pinned BPF state removed");
    println!(
        "demo took {:.1}s ({agent_secs:.1}s with the agent running); agent memory: {} KiB resident, {} KiB peak",
        started.elapsed().as_secs_f64(),
        rss,
        hwm
    );
    if !all_ok {
        bail!("some traffic did not behave as the policies say (marked UNEXPECTED above)");
    }
    println!("every verdict matched the policies");
    Ok(())
}
