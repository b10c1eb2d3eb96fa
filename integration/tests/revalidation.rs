//! Policy changes reach connections already open, whatever their verdict becomes: a
//! connection that the new policy sends through the L7 proxy is ended at once (both ends see
//! a reset) and the client's next connection is judged by the proxy; one already going through
//! the proxy keeps going through it when the HTTP rules go away; a UDP flow the proxy cannot
//! take stops; in audit mode, what the new policy would stop goes on audited, and is reported.
#![expect(
    clippy::print_stderr,
    reason = "the tests report how long a client waited for its next answer"
)]

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use palisade_integration::http::{Client, Seen, backend, get};
use palisade_integration::traffic;
use palisade_integration::{Endpoint, Node};

const HTTP_RULES: &str = r#"apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: api, namespace: x}
spec:
  endpointSelector: {matchLabels: {app: api}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: client}}]
    toPorts:
    - ports: [{port: "80", protocol: TCP}]
      rules:
        http:
        - {method: GET, path: "/public/.*"}
  - fromEndpoints: [{matchLabels: {app: tool}}]
    toPorts:
    - ports: [{port: "80", protocol: TCP}]
"#;

const PLAIN_ALLOW: &str = r#"apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: api, namespace: x}
spec:
  endpointSelector: {matchLabels: {app: api}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: client}}]
    toPorts:
    - ports: [{port: "80", protocol: TCP}]
"#;

/// A keep-alive connection from inside a namespace, raw, to see exactly how it ends.
struct Conn {
    stream: TcpStream,
}

impl Conn {
    fn open(netns: &str, to: &Endpoint) -> Conn {
        let ip = to.ip;
        let stream = traffic::in_netns(netns, move || {
            let s =
                TcpStream::connect_timeout(&SocketAddr::from((ip, 80)), Duration::from_secs(3))?;
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            Ok::<_, std::io::Error>(s)
        })
        .expect("connect");
        Conn { stream }
    }

    /// Sends `GET path` and returns the status line's code, or the error that ended the
    /// connection.
    fn get(&mut self, path: &str) -> Result<u16, std::io::ErrorKind> {
        self.stream
            .write_all(format!("GET {path} HTTP/1.1\r\nHost: api\r\n\r\n").as_bytes())
            .map_err(|e| e.kind())?;
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            let n = self.stream.read(&mut chunk).map_err(|e| e.kind())?;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof);
            }
            buf.extend_from_slice(&chunk[..n]);
            let text = String::from_utf8_lossy(&buf);
            if let Some(end) = text.find("\r\n\r\n") {
                let len: usize = text[..end]
                    .lines()
                    .find_map(|l| {
                        l.to_ascii_lowercase()
                            .strip_prefix("content-length:")
                            .and_then(|v| v.trim().parse().ok())
                    })
                    .unwrap_or(0);
                if buf.len() >= end + 4 + len {
                    return text
                        .split(' ')
                        .nth(1)
                        .and_then(|c| c.parse().ok())
                        .ok_or(std::io::ErrorKind::InvalidData);
                }
            }
        }
    }

    /// Waits until the connection is seen to end (reset, abort or close) without sending.
    fn ended(&mut self) -> Option<std::io::ErrorKind> {
        let mut chunk = [0u8; 64];
        match self.stream.read(&mut chunk) {
            Ok(0) => Some(std::io::ErrorKind::UnexpectedEof),
            Ok(_) => None,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => None,
            Err(e) => Some(e.kind()),
        }
    }
}

struct Scene {
    node: Node,
    client: Endpoint,
    api: Endpoint,
    seen: Seen,
}

fn scene(test: &str, client_labels: &str) -> Scene {
    let node = Node::start(test);
    let client = node.add_endpoint("client", "x", client_labels);
    let api = node.add_endpoint("api", "x", "app=api");
    let seen = backend(&api.name, 80);
    Scene {
        node,
        client,
        api,
        seen,
    }
}

fn admin_requests(seen: &Seen) -> usize {
    seen.lock()
        .unwrap()
        .iter()
        .filter(|l| l.starts_with("GET /admin"))
        .count()
}

/// The old connection is over at once, and the client's next connection gets the proxy's
/// judgement; returns how long that took from the change.
fn expect_old_ended_and_new_judged(s: &Scene, old: &mut Conn, changed: Instant) -> Duration {
    let admin_before = admin_requests(&s.seen);
    let ended = old.ended();
    let ended_after = changed.elapsed();
    assert!(
        matches!(
            ended,
            Some(
                std::io::ErrorKind::ConnectionAborted
                    | std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::UnexpectedEof
            )
        ),
        "the old connection should have been ended, read gave {ended:?}"
    );
    // Whatever the client tries on it now reaches nothing.
    assert!(
        old.get("/admin").is_err(),
        "the old connection still serves"
    );
    let reply = get(&s.client.name, s.api.ip, 80, "/admin", "").expect("an answer");
    let next_answer = changed.elapsed();
    assert_eq!(reply.status, 403, "a new connection is judged by the proxy");
    assert_eq!(
        get(&s.client.name, s.api.ip, 80, "/public/x", "").map(|r| r.status),
        Some(200)
    );
    assert_eq!(
        admin_requests(&s.seen),
        admin_before,
        "no /admin request reached the server after the change"
    );
    eprintln!(
        "old connection ended {ended_after:?} after the change; next answer after {next_answer:?}"
    );
    next_answer
}

#[test]
fn http_rules_reach_a_keep_alive_connection_opened_before_them() {
    let s = scene("reval-http", "app=client");
    let mut old = Conn::open(&s.client.name, &s.api);
    assert_eq!(old.get("/admin"), Ok(200), "no policy yet");
    assert_eq!(old.get("/admin"), Ok(200), "keep-alive");

    s.node.apply(HTTP_RULES);
    let changed = Instant::now();
    expect_old_ended_and_new_judged(&s, &mut old, changed);

    let flows = s.node.flows(&["--verdict", "DROPPED"]);
    let reset = flows
        .iter()
        .find(|f| f["event"] == "connection-reset")
        .unwrap_or_else(|| panic!("no connection-reset flow: {flows:?}"));
    assert_eq!(reset["drop_reason"], "Policy now requires the L7 proxy");
    assert_eq!(reset["policy"]["name"], "x/api");
    assert_eq!(reset["l4"]["destination_port"], 80);
}

#[test]
fn a_relabel_that_brings_http_rules_ends_the_direct_connection() {
    // As a tool, the client may reach the API directly; relabelled a client, only through the
    // proxy's HTTP rules.
    let s = scene("reval-relabel", "app=tool");
    s.node.apply(HTTP_RULES);
    let mut old = Conn::open(&s.client.name, &s.api);
    assert_eq!(old.get("/admin"), Ok(200), "L3/L4 allowed, no HTTP rules");

    s.node
        .palisade_ok(&["endpoint", "label", &s.client.name, "--set", "app=client"]);
    let changed = Instant::now();
    expect_old_ended_and_new_judged(&s, &mut old, changed);
}

#[test]
fn a_proxied_connection_keeps_working_when_the_http_rules_go() {
    let s = scene("reval-unproxy", "app=client");
    s.node.apply(HTTP_RULES);
    let mut c = Client::connect(&s.client.name, s.api.ip, 80).expect("connect");
    let ask = |c: &mut Client, path: &str| {
        c.send(format!("GET {path} HTTP/1.1\r\nHost: api\r\n\r\n").as_bytes())
            .expect("send");
        c.read_reply().map(|r| r.status).ok()
    };
    assert_eq!(ask(&mut c, "/public/a"), Some(200));
    assert_eq!(ask(&mut c, "/admin"), Some(403));

    // The same connection, now with plain L3/L4 policy: it stays in the proxy, which no
    // longer has HTTP rules to apply.
    s.node.apply(PLAIN_ALLOW);
    assert_eq!(ask(&mut c, "/admin"), Some(200), "kept through the proxy");
    assert_eq!(ask(&mut c, "/public/b"), Some(200));
    // And when L3/L4 policy no longer allows the client, the connection stops.
    s.node
        .palisade_ok(&["endpoint", "label", &s.client.name, "--set", "app=stranger"]);
    assert_eq!(ask(&mut c, "/public/c"), None, "denied now");
}

#[test]
fn a_connection_closed_before_the_change_leaves_the_servers_listener_alone() {
    // Closed on both ends, the connection still has conntrack entries, so the change ends it
    // too. For its address pair the kernel now finds the server's listening socket: ending
    // that would stop the server accepting anything, through the proxy or not.
    let s = scene("reval-closed", "app=client");
    let mut old = Conn::open(&s.client.name, &s.api);
    assert_eq!(old.get("/public/a"), Ok(200), "no policy yet");
    let port = old.stream.local_addr().expect("local address").port();
    drop(old);
    let deadline = Instant::now() + Duration::from_secs(10);
    let sockets = || {
        let out = std::process::Command::new("ip")
            .args(["netns", "exec", &s.api.name, "ss", "-Htn", "state", "all"])
            .output()
            .expect("ss");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    while sockets().contains(&format!(":{port} ")) {
        assert!(
            Instant::now() < deadline,
            "the server never closed its end: {}",
            sockets()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        s.node
            .json(&["conntrack", "list"])
            .as_array()
            .is_some_and(|entries| entries.iter().any(|e| e["source_port"] == port)),
        "the closed connection is still tracked, so the change considers it"
    );

    s.node.apply(HTTP_RULES);
    assert!(
        sockets().contains("0.0.0.0:80 "),
        "the server still listens: {}",
        sockets()
    );
    for path in ["/public/b", "/public/c"] {
        assert_eq!(
            get(&s.client.name, s.api.ip, 80, path, "").map(|r| r.status),
            Some(200),
            "the server still accepts, through the proxy"
        );
    }
}

/// The server's conntrack entry (its ingress) of the connection from `client_port`.
fn server_entry(node: &Node, server: &Endpoint, client_port: u16) -> serde_json::Value {
    let entries = node.json(&["conntrack", "list"]);
    entries
        .as_array()
        .expect("a list")
        .iter()
        .find(|e| {
            e["scope"] == "ingress"
                && e["destination"] == server.ip.to_string()
                && e["source_port"] == client_port
        })
        .cloned()
        .unwrap_or_else(|| panic!("no entry from port {client_port}: {entries:#}"))
}

fn audited(entry: &serde_json::Value) -> bool {
    entry["flags"]
        .as_array()
        .is_some_and(|f| f.iter().any(|w| w == "audit"))
}

fn allow_from(app: &str) -> String {
    format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: srv, namespace: x}}\nspec:\n  podSelector: {{matchLabels: {{app: server}}}}\n  policyTypes: [Ingress]\n  ingress:\n  - from: [{{podSelector: {{matchLabels: {{app: {app}}}}}}}]\n"
    )
}

#[test]
fn audit_mode_reports_the_open_connections_a_policy_change_would_stop() {
    let node = Node::start_with("reval-audit", &["--audit"]);
    let server = node.add_endpoint("server", "x", "app=server");
    let client = node.add_endpoint("client", "x", "app=client");
    let _srv = traffic::tcp_server(&server.name, 80);
    node.apply(&allow_from("client"));
    let mut conn = traffic::OpenConnection::open(&client.name, server.ip, 80).expect("connect");
    assert!(conn.round_trip());
    let port = conn.local_port();
    assert!(!audited(&server_entry(&node, &server, port)), "allowed");
    // The client is no longer allowed: audit mode keeps the connection, but says so.
    node.apply(&allow_from("nobody"));
    assert!(conn.round_trip(), "audit mode never drops");
    assert!(
        audited(&server_entry(&node, &server, port)),
        "the connection goes on audited"
    );
    let flows = node.flows(&["--verdict", "AUDIT"]);
    let reported = flows.iter().find(|f| {
        f["event"] == "revalidation-audit"
            && f["endpoint"]["name"] == server.name.as_str()
            && (f["l4"]["source_port"] == port || f["l4"]["destination_port"] == port)
    });
    assert!(
        reported.is_some(),
        "the would-be revalidation drop is reported as AUDIT: {flows:#?}"
    );
    // Allowed again: no longer audited.
    node.apply(&allow_from("client"));
    assert!(conn.round_trip());
    assert!(
        !audited(&server_entry(&node, &server, port)),
        "allowed again"
    );
}

#[test]
fn a_udp_flow_that_policy_now_sends_to_the_proxy_stops() {
    let node = Node::start("reval-udp");
    let server = node.add_endpoint("server", "x", "app=server");
    let client = node.add_endpoint("client", "x", "app=client");
    let _udp = traffic::udp_server(&server.name, 53);
    assert!(traffic::udp_send_from(&client.name, 45353, server.ip, 53));
    // HTTP rules on port 53 of any protocol: the proxy can take TCP only.
    node.apply(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: srv, namespace: x}\nspec:\n  endpointSelector: {matchLabels: {app: server}}\n  ingress:\n  - fromEndpoints: [{matchLabels: {app: client}}]\n    toPorts:\n    - ports: [{port: \"53\", protocol: ANY}]\n      rules:\n        http: [{method: GET}]\n",
    );
    assert!(
        !traffic::udp_send_from(&client.name, 45353, server.ip, 53),
        "the open UDP flow still passes"
    );
    assert!(
        !traffic::udp_send_from(&client.name, 45354, server.ip, 53),
        "a new UDP flow passes"
    );
    let flows = node.flows(&["--verdict", "DROPPED", "--to-pod", &server.qualified()]);
    let reason = "Proxy redirection not supported for protocol";
    assert!(
        flows
            .iter()
            .any(|f| f["event"] == "revalidation-drop" && f["drop_reason"] == reason),
        "the open flow is stopped at revalidation: {flows:#?}"
    );
    assert!(
        flows
            .iter()
            .any(|f| f["event"] == "drop" && f["drop_reason"] == reason),
        "the new one is dropped: {flows:#?}"
    );
}
