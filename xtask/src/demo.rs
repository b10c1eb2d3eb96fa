//! `cargo xtask demo`: Palisade in one run. A node namespace with no uplink runs the agent;
//! three shop workloads get identities from their labels; the policies in policies/demo/ are
//! applied; real connections are attempted; a table says what happened and why (from the
//! agent's own flow records); then the learning loop (discover, suggest, what-if, protect) on
//! a second namespace; then everything is removed.

use std::time::Instant;

use anyhow::{Context as _, bail};
use palisade_integration::traffic::{self, ping, tcp_connects, tcp_server};
use palisade_integration::{Endpoint, Node};
use serde_json::Value;

use crate::{build_binaries, workspace_root};

const TAG: &str = "pal-demo";

/// What a probe sends.
#[derive(Clone, Copy)]
enum What {
    Tcp(u16),
    Ping,
    /// An HTTP request (method, path) to port 8080; allowed means a 200 answer.
    Http(&'static str, &'static str),
}

struct Probe {
    from: &'static str,
    to: &'static str,
    what: What,
    expect: bool,
    note: &'static str,
}

const HTTP_PORT: u16 = 8080;

fn http_status(src: &Endpoint, dst: &Endpoint, method: &str, path: &str) -> Option<u16> {
    let mut c = palisade_integration::http::Client::connect(&src.name, dst.ip, HTTP_PORT).ok()?;
    c.send(
        format!("{method} {path} HTTP/1.1\r\nHost: backend\r\nContent-Length: 0\r\n\r\n")
            .as_bytes(),
    )
    .ok()?;
    c.read_reply().ok().map(|r| r.status)
}

fn short(name: &str) -> &str {
    name.strip_prefix(&format!("{TAG}-")).unwrap_or(name)
}

fn why(flows: &[Value], src: &Endpoint, dst: &Endpoint, what: What, allowed: bool) -> String {
    if let What::Http(method, path) = what {
        let f = flows.iter().rev().find(|f| {
            f["ip"]["source"] == src.ip.to_string()
                && f["http"]["method"] == method
                && f["http"]["path"] == path
        });
        return match f {
            Some(f) => {
                let status = f["http"]["status"].as_u64().unwrap_or(0);
                let rule = f["policy"]["rule"].as_str().unwrap_or("no rule");
                if allowed {
                    format!("HTTP {status}, allowed by {rule}")
                } else {
                    format!(
                        "HTTP {status} from the L7 proxy: no HTTP rule of {rule} matches {method} {path}"
                    )
                }
            }
            None => "no HTTP flow recorded".to_string(),
        };
    }
    let (proto, port) = match what {
        What::Tcp(p) => ("TCP", p),
        _ => ("ICMP", 0),
    };
    let matching = |f: &&Value| {
        f["ip"]["source"] == src.ip.to_string()
            && f["ip"]["destination"] == dst.ip.to_string()
            && f["l4"]["protocol"] == proto
            && f.get("http").is_none()
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
            let (src, dst, what) = (find(p.from), find(p.to), p.what);
            Box::new(move || match what {
                What::Ping => ping(&src.name, dst.ip),
                What::Tcp(port) => tcp_connects(&src.name, dst.ip, port),
                What::Http(method, path) => http_status(&src, &dst, method, path) == Some(200),
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
        let what = match p.what {
            What::Ping => "ping".to_string(),
            What::Tcp(port) => format!("tcp/{port}"),
            What::Http(method, path) => format!("{method} {path}"),
        };
        let mark = if *ok == p.expect {
            ""
        } else {
            "  <-- UNEXPECTED"
        };
        rows.push(format!(
            "{:<10} {:<10} {:<22} {:<9} {:<9} {}{}",
            p.from,
            p.to,
            what,
            if p.expect { "allow" } else { "deny" },
            if *ok { "ALLOWED" } else { "DENIED" },
            why(&flows, &src, &dst, p.what, *ok),
            mark
        ));
        if !p.note.is_empty() {
            rows.push(format!("{:>54}  ({})", "", p.note));
        }
    }
    println!(
        "{:<10} {:<10} {:<22} {:<9} {:<9} WHY",
        "FROM", "TO", "WHAT", "EXPECTED", "RESULT"
    );
    for r in rows {
        println!("{r}");
    }
    results
}

/// The learning loop in namespace `lab`: discover, suggest, what-if, protect. True when every
/// verdict was the expected one.
fn learning(node: &Node) -> anyhow::Result<bool> {
    section("Learning: discover -> suggest -> what-if -> protect (namespace lab)");
    let mut eps = Vec::new();
    for (name, labels) in [
        ("lab-web", "app=web,pod-template-hash=7d9f"),
        ("lab-api", "app=api"),
        ("lab-db", "app=db"),
        ("lab-new", "app=new"),
    ] {
        eps.push(node.add_endpoint(name, "lab", labels));
    }
    let _servers = [tcp_server(&eps[1].name, 80), tcp_server(&eps[2].name, 5432)];
    show(node, &["namespace", "mode", "lab", "discover"]);
    let probe = |from, to, port, expect| Probe {
        from,
        to,
        what: What::Tcp(port),
        expect,
        note: "",
    };
    let mix = [
        probe("lab-web", "lab-api", 80, true),
        probe("lab-api", "lab-db", 5432, true),
    ];
    let learned = run_probes(node, &eps, &mix);
    println!("$ palisade policy suggest --namespace lab > suggested.yaml");
    let yaml = node.palisade_ok(&["policy", "suggest", "--namespace", "lab"]);
    // The policies and, above each rule, the flows behind it.
    let shown = |l: &&str| {
        l.starts_with("# lab/")
            || l.trim_start().starts_with("# from ")
            || l.trim_start().starts_with("# to ")
    };
    for line in yaml.lines().filter(shown) {
        println!("  {line}");
    }
    let file = node.dir.join("suggested.yaml");
    std::fs::write(&file, &yaml)?;
    let file = file.to_str().expect("utf-8 path");
    // Something the mix never did, while the namespace still learns.
    let newcomer = run_probes(node, &eps, &[probe("lab-new", "lab-db", 5432, true)]);
    println!("$ palisade policy what-if -f suggested.yaml   # exit 2: something would change");
    let what_if = node.palisade(&["policy", "what-if", "-f", file]);
    print!("{}", String::from_utf8_lossy(&what_if.stdout));
    let what_if_ok = what_if.status.code() == Some(2);
    show(node, &["policy", "apply", "-f", file]);
    show(node, &["namespace", "mode", "lab", "protect"]);
    let protect_probes = [
        probe("lab-web", "lab-api", 80, true),
        probe("lab-api", "lab-db", 5432, true),
        probe("lab-new", "lab-db", 5432, false),
        probe("lab-web", "lab-db", 5432, false),
    ];
    let protected = run_probes(node, &eps, &protect_probes);
    Ok(learned == vec![true; 2]
        && newcomer == vec![true]
        && what_if_ok
        && protected == protect_probes.iter().map(|p| p.expect).collect::<Vec<_>>())
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
        tcp_server(&ep("backend").name, 9090),
        tcp_server(&ep("db").name, 5432),
    ];
    let _api = palisade_integration::http::backend(&ep("backend").name, HTTP_PORT);
    println!("servers: frontend tcp/80, backend HTTP on 8080 and tcp/9090, db tcp/5432");

    section("Before any policy: everything may talk to everything (Kubernetes default)");
    let open = run_probes(
        &node,
        &eps,
        &[Probe {
            from: "frontend",
            to: "db",
            what: What::Tcp(5432),
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
            println!("{comment}");
        }
        show(
            &node,
            &["policy", "apply", "-f", f.to_str().expect("utf-8 path")],
        );
    }

    section("Traffic with the policies in force");
    let probe = |from, to, what, expect, note| Probe {
        from,
        to,
        what,
        expect,
        note,
    };
    let probes = [
        probe(
            "frontend",
            "backend",
            What::Http("GET", "/api/products/42"),
            true,
            "",
        ),
        probe(
            "frontend",
            "backend",
            What::Http("DELETE", "/api/products/42"),
            false,
            "the L7 proxy judges each request",
        ),
        probe(
            "frontend",
            "backend",
            What::Tcp(9090),
            false,
            "only the API port is open",
        ),
        probe("backend", "db", What::Tcp(5432), true, ""),
        probe(
            "frontend",
            "db",
            What::Tcp(5432),
            false,
            "tier=web is allowed, but the deny rule wins",
        ),
        probe("db", "backend", What::Tcp(8080), false, ""),
        probe("backend", "frontend", What::Tcp(80), false, ""),
        probe("newcomer", "backend", What::Tcp(8080), false, ""),
        probe(
            "frontend",
            "backend",
            What::Ping,
            false,
            "ICMP echo is not TCP/8080",
        ),
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
        probe(
            "newcomer",
            "backend",
            What::Http("POST", "/api/cart"),
            true,
            "same identity as frontend now",
        ),
        probe("newcomer", "db", What::Tcp(5432), false, ""),
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

    show(
        &node,
        &[
            "observe",
            "--protocol",
            "http",
            "--namespace",
            "shop",
            "--last",
            "3",
        ],
    );

    section("Why? `palisade policy trace` answers from the datapath's own map state");
    for (from, to, port) in [
        ("backend", "db", "5432"),
        ("frontend", "db", "5432"),
        ("frontend", "backend", "8080"),
    ] {
        let (from, to) = (ep(from).qualified(), ep(to).qualified());
        show(
            &node,
            &[
                "policy", "trace", "--from", &from, "--to", &to, "--port", port,
            ],
        );
    }

    let learned = learning(&node)?;

    section("Agent status");
    show(&node, &["status"]);
    let (rss, hwm) = node.agent_pid().map_or((0, 0), rss_kib);

    let expected: Vec<bool> = probes.iter().map(|p| p.expect).collect();
    let expected_relabel: Vec<bool> = relabeled_probes.iter().map(|p| p.expect).collect();
    let all_ok =
        open == vec![true] && enforced == expected && relabeled == expected_relabel && learned;
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
