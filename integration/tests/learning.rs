//! Audit modes and policy learning end to end, with the real agent, CLI and BPF: a traffic mix
//! learned in discover mode (several tiers, a namespace boundary, an address outside the
//! cluster, HTTP paths through the L7 proxy), `policy suggest`, `policy what-if` on the
//! suggestion, the suggestion applied and the namespaces protected, the same mix replayed;
//! monitor mode, mode changes on open connections, per-endpoint and per-policy audit; the
//! service map; the connection log across a restart.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::process::Output;
use std::time::Duration;

use palisade_integration::http::{Client, backend, get};
use palisade_integration::node::ip;
use palisade_integration::traffic::{self, OpenConnection, tcp_connects, tcp_server};
use palisade_integration::{Endpoint, Node};
use serde_json::Value;

/// The address outside the cluster the mix reaches.
const WORLD: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);

/// The L7 proxy sees api's HTTP while the namespace learns: every request on 8080 is allowed.
const VISIBILITY: &str = r#"apiVersion: palisade.io/v1
kind: NetworkPolicy
metadata: {name: api-http-visibility, namespace: shop}
spec:
  endpointSelector: {matchLabels: {app: api}}
  ingress:
  - toPorts:
    - ports: [{port: "8080", protocol: TCP}]
      rules:
        http: [{}]
"#;

fn run_ok(args: &[&str]) {
    let out = ip(args);
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A namespace outside the cluster joined to the node by a veth: `WORLD` lives there.
fn world(node: &Node) -> String {
    let ext = node.name("ext");
    node.track_netns(&ext);
    run_ok(&["netns", "add", &ext]);
    let (host_side, ext_side) = (format!("{}x0", node.tag), format!("{}x1", node.tag));
    run_ok(&[
        "link",
        "add",
        &host_side,
        "netns",
        &node.netns,
        "type",
        "veth",
        "peer",
        "name",
        &ext_side,
        "netns",
        &ext,
    ]);
    for (ns, dev, addr) in [
        (&node.netns, &host_side, "192.0.2.1/24"),
        (&ext, &ext_side, "192.0.2.10/24"),
    ] {
        run_ok(&["-n", ns, "addr", "add", addr, "dev", dev]);
        run_ok(&["-n", ns, "link", "set", dev, "up"]);
    }
    run_ok(&["-n", &ext, "link", "set", "lo", "up"]);
    run_ok(&["-n", &ext, "route", "add", "default", "via", "192.0.2.1"]);
    ext
}

/// One HTTP request on a fresh connection: its status, 0 when none came.
fn request(from: &Endpoint, to: &Endpoint, method: &str, path: &str) -> u16 {
    if method == "GET" {
        return get(&from.name, to.ip, 8080, path, "").map_or(0, |r| r.status);
    }
    let Ok(mut c) = Client::connect(&from.name, to.ip, 8080) else {
        return 0;
    };
    let head = format!("{method} {path} HTTP/1.1\r\nHost: api\r\nContent-Length: 0\r\n\r\n");
    if c.send(head.as_bytes()).is_err() {
        return 0;
    }
    c.read_reply().map_or(0, |r| r.status)
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

struct Shop {
    node: Node,
    web1: Endpoint,
    web2: Endpoint,
    api: Endpoint,
    db: Endpoint,
    backup: Endpoint,
    stranger: Endpoint,
    _servers: Vec<traffic::Server>,
}

fn shop(test: &str) -> Shop {
    let node = Node::start(test);
    // Two replicas of one workload, told apart only by their pod-template hash.
    let web1 = node.add_endpoint("web1", "shop", "app=web,tier=front,pod-template-hash=aa11");
    let web2 = node.add_endpoint("web2", "shop", "app=web,tier=front,pod-template-hash=bb22");
    let api = node.add_endpoint("api", "shop", "app=api,tier=back,version=v2");
    let db = node.add_endpoint("db", "shop", "app=db,tier=data");
    let backup = node.add_endpoint("backup", "ops", "app=backup");
    let stranger = node.add_endpoint("stranger", "shop", "app=stranger");
    let ext = world(&node);
    let _ = backend(&api.name, 8080);
    let servers = vec![tcp_server(&db.name, 5432), tcp_server(&ext, 443)];
    Shop {
        node,
        web1,
        web2,
        api,
        db,
        backup,
        stranger,
        _servers: servers,
    }
}

const OBSERVED_HTTP: [(&str, &str); 7] = [
    ("GET", "/api/products/1"),
    ("GET", "/api/products/2"),
    ("GET", "/api/products/3"),
    ("GET", "/api/products/4"),
    ("GET", "/api/cart"),
    ("POST", "/api/cart"),
    ("GET", "/healthz"),
];

/// The mix the namespaces learn; every part of it must get through.
fn mix(s: &Shop) {
    for web in [&s.web1, &s.web2] {
        for (m, p) in OBSERVED_HTTP {
            assert_eq!(request(web, &s.api, m, p), 200, "{} {m} {p}", web.name);
        }
    }
    assert!(tcp_connects(&s.api.name, s.db.ip, 5432), "api -> db");
    assert!(
        tcp_connects(&s.backup.name, s.db.ip, 5432),
        "backup (ops) -> db"
    );
    assert!(tcp_connects(&s.api.name, WORLD, 443), "api -> the world");
}

/// Traffic the mix never has: stranger -> db, web -> db, web -> the world.
fn unobserved(s: &Shop) -> [bool; 3] {
    [
        tcp_connects(&s.stranger.name, s.db.ip, 5432),
        tcp_connects(&s.web1.name, s.db.ip, 5432),
        tcp_connects(&s.web1.name, WORLD, 443),
    ]
}

fn write(node: &Node, name: &str, body: &str) -> String {
    let path = node.dir.join(name);
    std::fs::write(&path, body).expect("write");
    path.to_str().expect("utf-8").to_string()
}

fn settle() {
    std::thread::sleep(Duration::from_millis(500));
}

#[test]
fn learned_policy_allows_the_observed_mix_and_drops_the_rest_and_what_if_says_so_first() {
    let s = shop("learn-loop");
    let node = &s.node;
    for ns in ["shop", "ops"] {
        let v = node.json(&["namespace", "mode", ns, "discover"]);
        assert_eq!(
            (v["mode"].as_str(), v["previous"].as_str()),
            (Some("discover"), Some("protect"))
        );
    }
    let status = node.json(&["status"]);
    assert_eq!(
        status["audit"]["namespace_modes"]["shop"], "discover",
        "{status}"
    );
    assert_eq!(
        status["audit"]["namespace_modes"]["ops"], "discover",
        "{status}"
    );
    node.apply(VISIBILITY);

    // Discover: everything passes and is learned.
    mix(&s);
    settle();
    let suggest = |format: &str| node.palisade_ok(&["policy", "suggest", "--format", format]);
    let yaml = suggest("palisade");
    assert_eq!(
        yaml,
        suggest("palisade"),
        "the same flows give the same YAML"
    );
    for want in [
        "name: \"learned-web-front\"",
        "name: \"learned-api-back\"",
        "name: \"learned-db-data\"",
        "name: \"learned-backup\"",
        "\"/api/products/.*\"",
        "\"192.0.2.10/32\"",
        "\"k8s:io.kubernetes.pod.namespace\": \"ops\"",
        "443/TCP: 1 connection",
    ] {
        assert!(yaml.contains(want), "{want} missing:\n{yaml}");
    }
    for never in ["pod-template-hash", "version", &s.web1.name] {
        assert!(!yaml.contains(never), "{never} in a selector:\n{yaml}");
    }
    assert!(
        yaml.contains("  # from shop/app=web,tier=front (seen: "),
        "{yaml}"
    );
    let k8s = suggest("k8s");
    assert!(
        k8s.contains("kind: NetworkPolicy\n") && k8s.contains("networking.k8s.io/v1"),
        "{k8s}"
    );
    let suggestion = write(node, "suggested.yaml", &yaml);

    // Traffic the mix never had, still in discover: it passes, and is recorded.
    assert_eq!(unobserved(&s), [true; 3], "discover allows everything");
    settle();

    // What-if: exactly the unobserved connections become drops; nothing observed changes.
    let out = node.palisade(&["policy", "what-if", "-f", &suggestion, "-o", "json"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    let changes = r["changes"].as_array().unwrap();
    let db_group = "shop/app=db,tier=data";
    let mut seen = BTreeSet::new();
    for c in changes {
        assert_eq!(c["change"], "newly-denied", "{c}");
        assert_eq!(
            c["endpoint_in_audit"], true,
            "discover: reported, not dropped: {c}"
        );
        let (src, dst, port) = (
            c["source"].as_str().unwrap(),
            c["destination"].as_str().unwrap(),
            c["port"].as_u64().unwrap(),
        );
        let which = match (src, dst, port) {
            ("shop/app=stranger", d, 5432) if d == db_group => "stranger->db",
            ("shop/app=web,tier=front", d, 5432) if d == db_group => "web->db",
            ("shop/app=web,tier=front", "192.0.2.10", 443) => "web->world",
            _ => panic!("an observed connection would change: {c}"),
        };
        seen.insert(which);
    }
    assert_eq!(
        seen.into_iter().collect::<Vec<_>>(),
        vec!["stranger->db", "web->db", "web->world"],
        "{r}"
    );
    assert_eq!(r["newly_allowed"], 0);
    let words = node.palisade(&["policy", "what-if", "-f", &suggestion]);
    assert!(
        text(&words).contains("shop/app=stranger -> shop/app=db,tier=data"),
        "{}",
        text(&words)
    );

    // Apply as it is; what-if on it now changes nothing (exit 0).
    node.palisade_ok(&["policy", "apply", "-f", &suggestion]);
    let again = node.palisade(&["policy", "what-if", "-f", &suggestion]);
    assert_eq!(again.status.code(), Some(0), "{}", text(&again));
    assert!(
        text(&again).contains("nothing would change"),
        "{}",
        text(&again)
    );
    let listed = node.json(&["policy", "list"]);
    assert!(
        listed
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["name"] == "learned-web-front" && p["audit"] == false),
        "{listed}"
    );

    // Protect, learning scaffolding gone: the observed mix passes, nothing else does.
    node.palisade_ok(&[
        "policy",
        "delete",
        "api-http-visibility",
        "--namespace",
        "shop",
    ]);
    for ns in ["shop", "ops"] {
        node.palisade_ok(&["namespace", "mode", ns, "protect"]);
    }
    let status = node.json(&["status"]);
    assert!(
        status["audit"]["namespace_modes"]
            .get("shop")
            .is_none_or(|m| m == "protect"),
        "{status}"
    );
    mix(&s);
    assert_eq!(
        request(&s.web1, &s.api, "GET", "/api/products/999"),
        200,
        "a collapsed prefix"
    );
    assert_eq!(
        unobserved(&s),
        [false; 3],
        "stranger -> db, web -> db, web -> world"
    );
    assert_eq!(
        request(&s.web1, &s.api, "GET", "/admin"),
        403,
        "a path never seen"
    );
    assert_eq!(
        request(&s.web2, &s.api, "DELETE", "/api/cart"),
        403,
        "a method never seen"
    );
    assert!(
        !tcp_connects(&s.db.name, s.api.ip, 8080),
        "the reverse direction"
    );
    settle();
    let dropped = node.flows(&["--verdict", "DROPPED", "--since", "30s"]);
    let unobserved_sources = [&s.stranger.name, &s.web1.name, &s.web2.name, &s.db.name];
    for f in &dropped {
        let src = f["source"]["name"].as_str().unwrap_or("");
        assert!(
            unobserved_sources.iter().any(|n| n.as_str() == src),
            "an observed flow was dropped: {f}"
        );
        if src == s.web1.name || src == s.web2.name {
            // web's drops: db, the world, or HTTP it never sent.
            let to_api = f["destination"]["name"] == s.api.name.as_str();
            assert!(
                !to_api || f["http"].is_object(),
                "web -> api dropped at L3/L4: {f}"
            );
        }
    }
    assert!(dropped.len() >= 5, "{dropped:?}");

    // The service map names every workload and colours edges by verdict.
    let svg = node.palisade_ok(&["map", "-o", "svg"]);
    let doc = roxmltree::Document::parse(&svg).unwrap_or_else(|e| panic!("{e}\n{svg}"));
    let texts: Vec<&str> = doc
        .descendants()
        .filter(|n| n.has_tag_name("text"))
        .filter_map(|n| n.text())
        .collect();
    for e in [&s.web1, &s.web2, &s.api, &s.db, &s.backup, &s.stranger] {
        assert!(
            texts.iter().any(|t| t.contains(e.name.as_str())),
            "{} missing from the map",
            e.name
        );
    }
    assert!(texts.contains(&"192.0.2.10"), "{texts:?}");
    let verdicts: BTreeSet<&str> = doc
        .descendants()
        .filter_map(|n| n.attribute("data-verdict"))
        .collect();
    for v in ["FORWARDED", "REDIRECTED", "DROPPED"] {
        assert!(verdicts.contains(v), "{v}: {verdicts:?}");
    }
    let ops_only = node.palisade_ok(&["map", "--namespace", "ops", "-o", "dot"]);
    assert!(
        ops_only.starts_with("digraph palisade {") && ops_only.contains("app=backup"),
        "{ops_only}"
    );
    assert!(!ops_only.contains("app=stranger"), "{ops_only}");

    // The connection log outlives the agent: the same map after a restart.
    let dot = node.palisade_ok(&["map", "-o", "dot"]);
    node.restart_agent();
    assert_eq!(
        node.palisade_ok(&["map", "-o", "dot"]),
        dot,
        "the log was kept across the restart"
    );
}

#[test]
fn monitor_mode_reports_violations_and_mode_changes_reach_open_connections() {
    let node = Node::start("learn-monitor");
    let client = node.add_endpoint("client", "m", "app=client");
    let server = node.add_endpoint("server", "m", "app=server");
    let other = node.add_endpoint("other", "m", "app=other");
    let _srv = [tcp_server(&server.name, 80), tcp_server(&other.name, 80)];
    node.apply(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: friends-only, namespace: m}\nspec:\n  podSelector: {matchLabels: {app: server}}\n  ingress:\n  - from: [{podSelector: {matchLabels: {app: friend}}}]\n",
    );
    assert!(
        !tcp_connects(&client.name, server.ip, 80),
        "protected: dropped"
    );

    // Monitor: the violation passes, as an AUDIT flow naming the policy, and is counted.
    node.palisade_ok(&["namespace", "mode", "m", "monitor"]);
    assert!(
        tcp_connects(&client.name, server.ip, 80),
        "monitor never drops"
    );
    let mut open =
        OpenConnection::open(&client.name, server.ip, 80).expect("connect in monitor mode");
    assert!(open.round_trip());
    settle();
    let audited = node.flows(&["--verdict", "AUDIT", "--to-pod", &server.qualified()]);
    assert!(
        audited
            .iter()
            .any(|f| f["policy"]["name"] == "m/friends-only"),
        "{audited:?}"
    );
    let status = node.json(&["status"]);
    assert_eq!(
        status["audit"]["namespace_modes"]["m"], "monitor",
        "{status}"
    );
    assert!(
        status["audit"]["violations"]["m"].as_u64().unwrap_or(0) >= 2,
        "{status}"
    );
    let human = node.palisade_ok(&["status"]);
    assert!(human.contains("namespaces m (monitor)"), "{human}");
    let eps = node.json(&["endpoint", "list"]);
    assert!(
        eps.as_array()
            .unwrap()
            .iter()
            .all(|e| e["audit"] == "namespace (monitor)"),
        "{eps}"
    );

    // Protect: the open connection stops on its next packet, as on a policy change.
    node.palisade_ok(&["namespace", "mode", "m", "protect"]);
    assert!(
        !open.round_trip(),
        "protect stops an open violating connection"
    );
    assert!(!tcp_connects(&client.name, server.ip, 80));

    // One endpoint in audit on its own, in a protected namespace.
    let v = node.json(&["endpoint", "audit", &server.name, "on"]);
    assert_eq!(v["audit"], "endpoint", "{v}");
    assert!(
        tcp_connects(&client.name, server.ip, 80),
        "the endpoint in audit"
    );
    node.palisade_ok(&["endpoint", "audit", &server.name, "off"]);
    assert!(
        !tcp_connects(&client.name, server.ip, 80),
        "out of audit again"
    );

    // A policy in audit (annotation): enforced policies decide, it reports what it would drop.
    node.apply(
        "apiVersion: palisade.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: other-staged\n  namespace: m\n  annotations: {palisade.io/audit: \"true\"}\nspec:\n  endpointSelector: {matchLabels: {app: other}}\n  ingress:\n  - fromEndpoints: [{matchLabels: {app: friend}}]\n",
    );
    assert!(
        tcp_connects(&client.name, other.ip, 80),
        "a policy in audit never drops"
    );
    settle();
    let staged = node.flows(&["--verdict", "AUDIT", "--to-pod", &other.qualified()]);
    assert!(
        staged
            .iter()
            .any(|f| f["policy"]["name"] == "m/other-staged"),
        "{staged:?}"
    );
    let listed = node.json(&["policy", "list"]);
    assert!(
        listed
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["name"] == "other-staged" && p["audit"] == true),
        "{listed}"
    );
    let status = node.json(&["status"]);
    assert!(
        status["audit"]["policies"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p == "m/other-staged"),
        "{status}"
    );
}
