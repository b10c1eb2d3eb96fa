//! Flow observability end to end: real traffic, then `palisade observe` and the metrics
//! endpoint, as an operator would use them.

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use palisade_integration::Node;
use palisade_integration::node::bin_dir;
use palisade_integration::traffic::{self, tcp_connects, tcp_server, udp_reaches, udp_server};
use serde_json::Value;

const POLICY: &str = "apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: server-in, namespace: x}
spec:
  podSelector: {matchLabels: {app: server}}
  ingress:
  - from:
    - podSelector: {matchLabels: {app: client}}
";

struct Scene {
    node: Node,
    client: palisade_integration::Endpoint,
    server: palisade_integration::Endpoint,
    other: palisade_integration::Endpoint,
    _servers: Vec<traffic::Server>,
}

/// client -> server tcp/80 and udp/53 allowed; other (namespace y) -> server denied.
fn scene(test: &str, agent_args: &[&str]) -> Scene {
    let node = Node::start_with(test, agent_args);
    let client = node.add_endpoint("client", "x", "app=client");
    let server = node.add_endpoint("server", "x", "app=server");
    let other = node.add_endpoint("other", "y", "app=other");
    let servers = vec![tcp_server(&server.name, 80), udp_server(&server.name, 53)];
    node.apply(POLICY);
    Scene {
        node,
        client,
        server,
        other,
        _servers: servers,
    }
}

fn traffic(s: &Scene) {
    assert!(tcp_connects(&s.client.name, s.server.ip, 80));
    assert!(udp_reaches(&s.client.name, s.server.ip, 53));
    assert!(!tcp_connects(&s.other.name, s.server.ip, 80));
    std::thread::sleep(Duration::from_millis(300));
}

fn names(flows: &[Value]) -> Vec<(String, String, String)> {
    flows
        .iter()
        .map(|f| {
            (
                f["source"]["name"].as_str().unwrap_or("").to_string(),
                f["destination"]["name"].as_str().unwrap_or("").to_string(),
                f["verdict"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

#[test]
fn observe_reports_allowed_and_denied_flows_with_names_reasons_and_policies() {
    let s = scene("observe-json", &[]);
    traffic(&s);
    let flows = s.node.flows(&[]);
    let allowed = flows
        .iter()
        .find(|f| {
            f["verdict"] == "FORWARDED"
                && f["direction"] == "ingress"
                && f["source"]["name"] == s.client.name.as_str()
                && f["l4"]["protocol"] == "TCP"
        })
        .unwrap_or_else(|| panic!("no forwarded TCP flow into the server: {flows:?}"));
    assert_eq!(allowed["destination"]["name"], s.server.name.as_str());
    assert_eq!(allowed["destination"]["namespace"], "x");
    assert_eq!(allowed["l4"]["destination_port"], 80);
    assert_eq!(allowed["event"], "new-connection");
    assert_eq!(allowed["policy"]["name"], "x/server-in");
    assert_eq!(allowed["policy"]["rule"], "x/server-in ingress rule 0");
    assert_eq!(allowed["source"]["identity"], s.client.identity);
    assert!(
        allowed["source"]["labels"]
            .as_array()
            .unwrap()
            .iter()
            .any(|l| l == "k8s:app=client")
    );
    assert!(allowed["time"].as_str().unwrap().ends_with('Z'));

    let denied = flows
        .iter()
        .find(|f| f["verdict"] == "DROPPED" && f["source"]["name"] == s.other.name.as_str())
        .unwrap_or_else(|| panic!("no drop from other: {flows:?}"));
    assert_eq!(denied["drop_reason"], "Policy denied");
    assert_eq!(denied["drop_reason_code"], 133);
    assert_eq!(denied["endpoint"]["name"], s.server.name.as_str());
    assert_eq!(denied["l4"]["tcp_flags"][0], "SYN");
    assert!(
        denied.get("policy").is_none(),
        "default deny names no rule: {denied}"
    );

    assert!(
        flows
            .iter()
            .any(|f| f["l4"]["protocol"] == "UDP" && f["l4"]["destination_port"] == 53),
        "UDP flow: {flows:?}"
    );

    let compact = s.node.palisade_ok(&["observe", "--verdict", "DROPPED"]);
    assert!(
        compact.contains(&format!("y/{}", s.other.name))
            && compact.contains("DROPPED (Policy denied)"),
        "{compact}"
    );
    assert!(compact.contains("by default deny on x/"), "{compact}");
    let table = s.node.palisade_ok(&["observe", "-o", "table"]);
    assert!(
        table.starts_with("TIME") && table.contains("VERDICT"),
        "{table}"
    );
}

#[test]
fn every_observe_filter_selects_what_it_names() {
    let s = scene("observe-filters", &[]);
    traffic(&s);
    let (c, sv, o) = (s.client.clone(), s.server.clone(), s.other.clone());
    let q = |args: &[&str]| names(&s.node.flows(args));
    let all = q(&[]);
    assert!(all.len() >= 5, "{all:?}");
    let only = |flows: &[(String, String, String)],
                pred: &dyn Fn(&(String, String, String)) -> bool,
                what: &str| {
        assert!(!flows.is_empty(), "{what}: nothing matched");
        assert!(flows.iter().all(pred), "{what}: {flows:?}");
    };
    let cq = c.qualified();
    let sq = sv.qualified();
    let oq = o.qualified();
    only(&q(&["--from-pod", &oq]), &|f| f.0 == o.name, "--from-pod");
    only(&q(&["--to-pod", &sq]), &|f| f.1 == sv.name, "--to-pod");
    only(
        &q(&["--pod", &cq]),
        &|f| f.0 == c.name || f.1 == c.name,
        "--pod",
    );
    only(
        &q(&["--from-label", "app=other"]),
        &|f| f.0 == o.name,
        "--from-label",
    );
    only(
        &q(&["--to-label", "k8s:app=server"]),
        &|f| f.1 == sv.name,
        "--to-label",
    );
    only(
        &q(&["--label", "app=client"]),
        &|f| f.0 == c.name || f.1 == c.name,
        "--label",
    );
    only(
        &q(&["--from-identity", &o.identity.to_string()]),
        &|f| f.0 == o.name,
        "--from-identity",
    );
    only(
        &q(&["--to-identity", &sv.identity.to_string()]),
        &|f| f.1 == sv.name,
        "--to-identity",
    );
    only(
        &q(&["--identity", &o.identity.to_string()]),
        &|f| f.0 == o.name || f.1 == o.name,
        "--identity",
    );
    only(
        &q(&["--from-ip", &o.ip.to_string()]),
        &|f| f.0 == o.name,
        "--from-ip",
    );
    only(
        &q(&["--to-ip", &sv.ip.to_string()]),
        &|f| f.1 == sv.name,
        "--to-ip",
    );
    only(
        &q(&["--ip", &c.ip.to_string()]),
        &|f| f.0 == c.name || f.1 == c.name,
        "--ip",
    );
    only(
        &q(&["--verdict", "DROPPED"]),
        &|f| f.2 == "DROPPED",
        "--verdict",
    );
    only(&q(&["--namespace", "y"]), &|f| f.0 == o.name, "--namespace");
    only(
        &q(&["--drop-reason", "Policy denied"]),
        &|f| f.2 == "DROPPED",
        "--drop-reason",
    );
    only(
        &q(&["--not", "--verdict", "DROPPED"]),
        &|f| f.2 != "DROPPED",
        "--not --verdict",
    );
    let udp = s.node.flows(&["--protocol", "udp"]);
    assert!(
        !udp.is_empty() && udp.iter().all(|f| f["l4"]["protocol"] == "UDP"),
        "{udp:?}"
    );
    let p53 = s.node.flows(&["--port", "53"]);
    assert!(
        !p53.is_empty()
            && p53
                .iter()
                .all(|f| f["l4"]["destination_port"] == 53 || f["l4"]["source_port"] == 53)
    );
    let to80 = s.node.flows(&["--to-port", "80"]);
    assert!(!to80.is_empty() && to80.iter().all(|f| f["l4"]["destination_port"] == 80));
    let from_port = to80[0]["l4"]["source_port"].as_u64().unwrap().to_string();
    let fp = s.node.flows(&["--from-port", &from_port]);
    assert!(
        !fp.is_empty()
            && fp.iter().all(|f| f["l4"]["source_port"]
                .as_u64()
                .map(|p| p.to_string())
                .as_deref()
                == Some(from_port.as_str()))
    );
    // Different flags must all hold.
    only(
        &q(&["--to-pod", &sq, "--verdict", "FORWARDED"]),
        &|f| f.1 == sv.name && f.2 == "FORWARDED",
        "and",
    );
    assert_eq!(q(&["--last", "2"]).len(), 2);
    assert!(q(&["--since", "1h"]).len() == all.len());
    // A malformed value is an error, not an empty answer.
    let bad = s.node.palisade(&["observe", "--to-port", "http"]);
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("port"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );
}

#[test]
fn observe_follow_streams_new_flows_as_they_happen() {
    let s = scene("observe-follow", &[]);
    let mut child = Command::new(bin_dir().join("palisade"))
        .args([
            "--api",
            s.node.api.to_str().unwrap(),
            "observe",
            "--follow",
            "-o",
            "json",
            "--verdict",
            "DROPPED",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .expect("observe --follow");
    std::thread::sleep(Duration::from_millis(300));
    assert!(!tcp_connects(&s.other.name, s.server.ip, 80));
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut got = None;
    while Instant::now() < deadline {
        if let Ok(line) = rx.recv_timeout(Duration::from_millis(200)) {
            let v: Value = serde_json::from_str(&line).expect("json line");
            got = Some(v);
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    let f = got.expect("observe --follow printed the drop as it happened");
    assert_eq!(f["verdict"], "DROPPED");
    assert_eq!(f["source"]["name"], s.other.name.as_str());
}

/// GET over plain HTTP/1.0 from inside the node namespace (the agent serves metrics on its
/// loopback there).
fn http_get(netns: &str, port: u16, path: &str) -> (u16, String) {
    let path = path.to_string();
    traffic::in_netns(netns, move || {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect metrics");
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").unwrap();
        let mut resp = String::new();
        s.read_to_string(&mut resp).unwrap();
        let status = resp
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let body = resp
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        (status, body)
    })
}

#[test]
fn metrics_and_health_endpoints_report_the_datapath() {
    let s = scene("metrics", &["--metrics-addr", "127.0.0.1:9962"]);
    traffic(&s);
    let (code, health) = http_get(&s.node.netns, 9962, "/healthz");
    assert_eq!((code, health.trim()), (200, "ok"));
    let (code, text) = http_get(&s.node.netns, 9962, "/metrics");
    assert_eq!(code, 200);
    for needle in [
        "palisade_endpoints 3",
        "palisade_policies 1",
        "palisade_datapath_packets_total{direction=\"ingress\",outcome=\"Policy denied\"}",
        "palisade_datapath_packets_total{direction=\"egress\",outcome=\"FORWARDED\"}",
        "palisade_flows_total{verdict=\"DROPPED\",direction=\"ingress\",reason=\"Policy denied\"}",
        "palisade_policy_compile_seconds_count",
        "palisade_maps_in_sync 1",
    ] {
        assert!(text.contains(needle), "metrics lack {needle}:\n{text}");
    }
}

#[test]
fn a_denied_flood_is_rate_limited_and_the_loss_is_counted() {
    let s = scene("ratelimit", &["--events-per-second", "5"]);
    // Many distinct denied connection attempts (each a new flow) in a short time.
    let jobs: Vec<Box<dyn FnOnce() -> bool + Send>> = (0..40)
        .map(|_| {
            let (o, ip) = (s.other.name.clone(), s.server.ip);
            Box::new(move || tcp_connects(&o, ip, 80)) as Box<dyn FnOnce() -> bool + Send>
        })
        .collect();
    assert!(traffic::all(jobs).iter().all(|ok| !ok));
    let flows = s.node.flows(&["--verdict", "DROPPED"]);
    let status = s.node.json(&["status"]);
    let limited: u64 = status["counters"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["outcome"] == "EVENTS_RATE_LIMITED")
        .map(|c| c["packets"].as_u64().unwrap())
        .sum();
    let dropped: u64 = status["counters"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["outcome"] == "Policy denied")
        .map(|c| c["packets"].as_u64().unwrap())
        .sum();
    assert!(limited > 0, "suppressed events are counted: {status}");
    assert!(
        (flows.len() as u64) < dropped,
        "fewer flows ({}) than drops ({dropped})",
        flows.len()
    );
    assert!(
        dropped >= 40,
        "every drop is counted even when its event is not: {dropped}"
    );
}
