//! L7 HTTP policy end to end: the datapath redirects to the agent's proxy transparently, the
//! proxy enforces HTTP rules per request, and the server's own L3/L4 policy still applies.

use std::net::SocketAddrV4;
use std::time::{Duration, Instant};

use palisade_integration::Node;
use palisade_integration::http::{Client, UNJUDGED, backend, get, upgrading_backend};
use palisade_integration::traffic::{tcp_counter, time_wait_sockets};

const API_L7: &str = r#"apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: api-l7, namespace: x}
spec:
  endpointSelector: {matchLabels: {app: api}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: client}}]
    toPorts:
    - ports: [{port: "80", protocol: TCP}]
      rules:
        http:
        - {method: GET, path: "/public/.*"}
        - {method: POST, path: "/upload"}
        - method: GET
          path: "/admin/.*"
          headers: ["X-Token: secret"]
"#;

struct L7Scene {
    node: Node,
    client: palisade_integration::Endpoint,
    api: palisade_integration::Endpoint,
    seen: palisade_integration::http::Seen,
}

fn scene(test: &str) -> L7Scene {
    let node = Node::start(test);
    let client = node.add_endpoint("client", "x", "app=client");
    let api = node.add_endpoint("api", "x", "app=api");
    let seen = backend(&api.name, 80);
    node.apply(API_L7);
    L7Scene {
        node,
        client,
        api,
        seen,
    }
}

fn status(s: &L7Scene, path: &str, headers: &str) -> u16 {
    get(&s.client.name, s.api.ip, 80, path, headers).map_or(0, |r| r.status)
}

#[test]
fn http_rules_allow_and_deny_requests_by_method_path_and_header() {
    let s = scene("l7-rules");
    assert_eq!(status(&s, "/public/index.html", ""), 200);
    let reply = get(&s.client.name, s.api.ip, 80, "/public/a?x=1", "").unwrap();
    assert_eq!(
        reply.body, "GET /public/a?x=1 0",
        "the backend sees the request, query kept"
    );
    assert_eq!(status(&s, "/private", ""), 403, "path not allowed");
    assert_eq!(status(&s, "/admin/users", ""), 403, "header missing");
    assert_eq!(
        status(&s, "/admin/users", "X-Token: wrong\r\n"),
        403,
        "header wrong"
    );
    assert_eq!(status(&s, "/admin/users", "X-Token: secret\r\n"), 200);
    let mut c = Client::connect(&s.client.name, s.api.ip, 80).unwrap();
    c.send(b"POST /public/x HTTP/1.1\r\nHost: api\r\nContent-Length: 2\r\n\r\nhi")
        .unwrap();
    let r = c.read_reply().unwrap();
    assert_eq!(r.status, 403, "POST only on /upload");
    assert!(
        !s.node.flows(&["--http-method", "POST"]).is_empty(),
        "a denial's flow is there as soon as its 403 is, without waiting"
    );
    assert!(
        r.body.contains("denied") || r.body.contains("Denied"),
        "{r:?}"
    );
    let seen = s.seen.lock().unwrap().clone();
    assert!(
        !seen
            .iter()
            .any(|l| l.starts_with("GET /private") || l.starts_with("POST /public")),
        "{seen:?}"
    );

    let flows = s.node.flows(&["--protocol", "http"]);
    let denied = flows
        .iter()
        .find(|f| f["http"]["path"] == "/private")
        .unwrap_or_else(|| panic!("no flow for /private: {flows:?}"));
    assert_eq!(denied["verdict"], "DROPPED");
    assert_eq!(denied["http"]["status"], 403);
    assert_eq!(denied["http"]["method"], "GET");
    assert_eq!(denied["policy"]["name"], "x/api-l7");
    assert_eq!(denied["source"]["name"], s.client.name.as_str());
    let allowed = flows
        .iter()
        .find(|f| f["http"]["path"] == "/public/index.html")
        .unwrap();
    assert_eq!(allowed["verdict"], "FORWARDED");
    assert_eq!(allowed["http"]["status"], 200);
    assert!(allowed["http"]["latency_us"].as_u64().is_some());
    let only_403 = s.node.flows(&["--http-status", "403"]);
    assert!(!only_403.is_empty() && only_403.iter().all(|f| f["http"]["status"] == 403));
    let by_method = s.node.flows(&["--http-method", "POST"]);
    assert!(by_method.iter().all(|f| f["http"]["method"] == "POST") && !by_method.is_empty());
    let by_path = s.node.flows(&["--http-path", "/admin/.*"]);
    assert_eq!(by_path.len(), 3, "{by_path:?}");
}

#[test]
fn keep_alive_and_pipelined_requests_are_judged_one_by_one_in_order() {
    let s = scene("l7-keepalive");
    let mut c = Client::connect(&s.client.name, s.api.ip, 80).unwrap();
    for (path, want) in [("/public/1", 200), ("/nope", 403), ("/public/2", 200)] {
        c.send(format!("GET {path} HTTP/1.1\r\nHost: api\r\n\r\n").as_bytes())
            .unwrap();
        assert_eq!(c.read_reply().unwrap().status, want, "{path}");
    }
    // Pipelined: three requests in one write, answered in order.
    c.send(b"GET /public/a HTTP/1.1\r\nHost: api\r\n\r\nGET /secret HTTP/1.1\r\nHost: api\r\n\r\nGET /public/b HTTP/1.1\r\nHost: api\r\n\r\n")
        .unwrap();
    let replies: Vec<(u16, String)> = (0..3)
        .map(|_| c.read_reply().unwrap())
        .map(|r| (r.status, r.body))
        .collect();
    assert_eq!(replies[0], (200, "GET /public/a 0".to_string()));
    assert_eq!(replies[1].0, 403);
    assert_eq!(replies[2], (200, "GET /public/b 0".to_string()));
}

#[test]
fn chunked_uploads_stream_through() {
    let s = scene("l7-chunked");
    let mut c = Client::connect(&s.client.name, s.api.ip, 80).unwrap();
    c.send(b"POST /upload HTTP/1.1\r\nHost: api\r\nTransfer-Encoding: chunked\r\n\r\n")
        .unwrap();
    let chunk = vec![b'x'; 64 * 1024];
    for _ in 0..64 {
        c.send(format!("{:x}\r\n", chunk.len()).as_bytes()).unwrap();
        c.send(&chunk).unwrap();
        c.send(b"\r\n").unwrap();
    }
    c.send(b"0\r\n\r\n").unwrap();
    let r = c.read_reply().unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.body, format!("POST /upload {}", 64 * 64 * 1024));
}

#[test]
fn smuggling_attempts_get_400_and_never_reach_the_server() {
    let s = scene("l7-smuggling");
    let attempts: [&[u8]; 6] = [
        b"POST /upload HTTP/1.1\r\nHost: api\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /secret HTTP/1.1\r\nHost: api\r\n\r\n",
        b"POST /upload HTTP/1.1\r\nHost: api\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc",
        b"POST /upload HTTP/1.1\r\nHost: api\r\nContent-Length: +3\r\n\r\nabc",
        b"POST /upload HTTP/1.1\r\nHost: api\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
        b"GET /public/a HTTP/1.1\r\nHost: api\r\nX-Folded: a\r\n b\r\n\r\n",
        b"GET /public/\x01a HTTP/1.1\r\nHost: api\r\n\r\n",
    ];
    for raw in attempts {
        let mut c = Client::connect(&s.client.name, s.api.ip, 80).unwrap();
        c.send(raw).unwrap();
        let r = c
            .read_reply()
            .unwrap_or_else(|e| panic!("no reply to {:?}: {e}", String::from_utf8_lossy(raw)));
        assert!(
            r.status == 400 || r.status == 501,
            "{:?} -> {}",
            String::from_utf8_lossy(raw),
            r.status
        );
        assert!(
            c.closed(),
            "connection closed after {:?}",
            String::from_utf8_lossy(raw)
        );
    }
    std::thread::sleep(Duration::from_millis(200));
    let seen = s.seen.lock().unwrap().clone();
    assert!(seen.is_empty(), "nothing reached the backend: {seen:?}");
}

#[test]
fn path_normalization_closes_bypasses() {
    let s = scene("l7-paths");
    for path in [
        "/public/../admin/x",
        "//admin/x",
        "/%2e%2e/admin/x",
        "/public/%2E%2E/admin/x",
        "/public/./../admin/x",
    ] {
        assert_eq!(
            status(&s, path, ""),
            403,
            "{path} must be judged as /admin/x"
        );
    }
    // Equivalent spellings of an allowed path are allowed, and the server sees the normal form.
    let r = get(&s.client.name, s.api.ip, 80, "/public//./%61", "").unwrap();
    assert_eq!((r.status, r.body.as_str()), (200, "GET /public/a 0"));
}

#[test]
fn policy_updates_apply_to_open_connections() {
    let s = scene("l7-update");
    let mut c = Client::connect(&s.client.name, s.api.ip, 80).unwrap();
    c.send(b"GET /public/a HTTP/1.1\r\nHost: api\r\n\r\n")
        .unwrap();
    assert_eq!(c.read_reply().unwrap().status, 200);
    s.node
        .apply(&API_L7.replace("path: \"/public/.*\"", "path: \"/public/only-this\""));
    c.send(b"GET /public/a HTTP/1.1\r\nHost: api\r\n\r\n")
        .unwrap();
    assert_eq!(
        c.read_reply().unwrap().status,
        403,
        "same connection, new policy"
    );
    c.send(b"GET /public/only-this HTTP/1.1\r\nHost: api\r\n\r\n")
        .unwrap();
    assert_eq!(c.read_reply().unwrap().status, 200);
}

#[test]
fn the_servers_l3_policy_still_judges_the_client_through_the_proxy() {
    let node = Node::start("l7-l3");
    let client = node.add_endpoint("client", "x", "app=client");
    let intruder = node.add_endpoint("intruder", "x", "app=intruder");
    let api = node.add_endpoint("api", "x", "app=api");
    let seen = backend(&api.name, 80);
    // Egress HTTP rules on the callers send their connections through the proxy ...
    node.apply(
        "apiVersion: palisade.io/v1\nkind: ClusterwideNetworkPolicy\nmetadata: {name: callers-l7}\nspec:\n  endpointSelector: {matchExpressions: [{key: app, operator: In, values: [client, intruder]}]}\n  egress:\n  - toEndpoints: [{matchLabels: {app: api}}]\n    toPorts:\n    - ports: [{port: \"80\"}]\n      rules:\n        http: [{method: GET}]\n",
    );
    // ... and the server admits only the client at L3/L4.
    node.apply(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: api-in, namespace: x}\nspec:\n  podSelector: {matchLabels: {app: api}}\n  ingress:\n  - from: [{podSelector: {matchLabels: {app: client}}}]\n",
    );
    let ok = get(&client.name, api.ip, 80, "/x", "").map(|r| r.status);
    assert_eq!(ok, Some(200), "client passes both checks");
    let denied = get(&intruder.name, api.ip, 80, "/x", "").map(|r| r.status);
    assert!(
        matches!(denied, None | Some(502 | 504)),
        "intruder's upstream leg must be dropped, got {denied:?}"
    );
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 1, "{seen:?}");
    let drops = node.flows(&["--to-pod", &api.qualified(), "--verdict", "DROPPED"]);
    assert!(
        drops
            .iter()
            .any(|f| f["source"]["identity"] == intruder.identity
                && f["drop_reason"] == "Policy denied"),
        "dropped as the intruder's identity, not the node's: {drops:?}"
    );
    let redirected = node.flows(&["--verdict", "REDIRECTED"]);
    assert!(!redirected.is_empty(), "the datapath reports the redirect");
}

#[test]
fn the_servers_cidr_rules_still_judge_the_client_through_the_proxy() {
    let node = Node::start("l7-cidr");
    // Two callers with the same labels, so the same identity: only their addresses tell
    // them apart, as the server's ipBlock and CIDR deny rules do.
    let client = node.add_endpoint("client", "x", "app=caller");
    let intruder = node.add_endpoint("intruder", "x", "app=caller");
    assert_eq!(client.identity, intruder.identity);
    let api = node.add_endpoint("api", "x", "app=api");
    let seen = backend(&api.name, 80);
    // Egress HTTP rules on the callers send their connections through the proxy.
    node.apply(
        "apiVersion: palisade.io/v1\nkind: ClusterwideNetworkPolicy\nmetadata: {name: callers-l7}\nspec:\n  endpointSelector: {matchLabels: {app: caller}}\n  egress:\n  - toEndpoints: [{matchLabels: {app: api}}]\n    toPorts:\n    - ports: [{port: \"80\"}]\n      rules:\n        http: [{method: GET}]\n",
    );
    let status = |who: &palisade_integration::Endpoint| {
        get(&who.name, api.ip, 80, "/x", "").map(|r| r.status)
    };
    let refused = |got: Option<u16>| matches!(got, None | Some(502 | 504));
    // A CIDR deny on the intruder's address beats the allow both their labels have.
    node.apply(&format!(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{name: api-deny, namespace: x}}\nspec:\n  endpointSelector: {{matchLabels: {{app: api}}}}\n  ingress:\n  - fromEndpoints: [{{matchLabels: {{app: caller}}}}]\n  ingressDeny:\n  - fromCIDR: [{}/32]\n",
        intruder.ip
    ));
    assert_eq!(status(&client), Some(200), "the client is allowed");
    let denied = status(&intruder);
    assert!(
        refused(denied),
        "the intruder bypassed the CIDR deny: {denied:?}"
    );
    // An ipBlock of the client's address alone admits the client, not the intruder.
    node.apply(&format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: api-in, namespace: x}}\nspec:\n  podSelector: {{matchLabels: {{app: api}}}}\n  ingress:\n  - from: [{{ipBlock: {{cidr: {}/32}}}}]\n",
        client.ip
    ));
    node.palisade_ok(&["policy", "delete", "api-deny", "--namespace", "x"]);
    assert_eq!(
        status(&client),
        Some(200),
        "the client's address is allowed"
    );
    let denied = status(&intruder);
    assert!(
        refused(denied),
        "the intruder's upstream leg passed: {denied:?}"
    );
    let seen = seen.lock().unwrap().clone();
    assert_eq!(
        seen.len(),
        2,
        "only the client's requests reached the server: {seen:?}"
    );
    let drops = node.flows(&["--to-pod", &api.qualified(), "--verdict", "DROPPED"]);
    for reason in ["Policy denied", "Policy denied by denylist"] {
        assert!(
            drops
                .iter()
                .any(|f| f["source"]["identity"] == intruder.identity
                    && f["ip"]["source"] != intruder.ip.to_string()
                    && f["drop_reason"] == reason),
            "the upstream leg dropped ({reason}) as the intruder: {drops:#?}"
        );
    }
}

/// Only `GET /public.*`: what the h2c smuggling route starts from.
const PUBLIC_ONLY: &str = r#"apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: api-public, namespace: x}
spec:
  endpointSelector: {matchLabels: {app: api}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: client}}]
    toPorts:
    - ports: [{port: "80", protocol: TCP}]
      rules:
        http:
        - {method: GET, path: "/public.*"}
"#;

/// The client's flows of `event`, once there are `n` of them (within a few seconds).
fn wait_for_flows(node: &Node, event: &str, n: usize) -> Vec<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let flows: Vec<_> = node
            .flows(&[])
            .into_iter()
            .filter(|f| f["event"] == event)
            .collect();
        if flows.len() >= n || Instant::now() > deadline {
            return flows;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn an_h2c_upgrade_is_stripped_and_later_requests_are_still_judged() {
    let node = Node::start("l7-h2c");
    let client = node.add_endpoint("client", "x", "app=client");
    let api = node.add_endpoint("api", "x", "app=api");
    // This server switches to h2c whenever asked, and answers UNJUDGED to what follows.
    let seen = upgrading_backend(&api.name, 80);
    node.apply(PUBLIC_ONLY);

    let mut c = Client::connect(&client.name, api.ip, 80).unwrap();
    c.send(
        b"GET /public/x HTTP/1.1\r\nHost: api\r\nUpgrade: h2c\r\n\
          HTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\nConnection: Upgrade, HTTP2-Settings\r\n\r\n",
    )
    .unwrap();
    let r = c.read_reply().unwrap();
    assert_eq!(
        (r.status, r.body.as_str()),
        (200, "GET /public/x"),
        "a plain answer, not 101: {r:?}"
    );
    // Same connection: still HTTP/1.1 through the proxy, judged request by request.
    c.send(b"GET /admin HTTP/1.1\r\nHost: api\r\n\r\n").unwrap();
    let r = c.read_reply().unwrap();
    assert_eq!(r.status, 403, "{r:?}");
    assert!(!r.body.contains(UNJUDGED), "{r:?}");
    c.send(b"GET /public/y HTTP/1.1\r\nHost: api\r\n\r\n")
        .unwrap();
    assert_eq!(c.read_reply().unwrap().status, 200);
    std::thread::sleep(Duration::from_millis(200));
    let seen = seen.lock().unwrap().clone();
    assert_eq!(
        seen,
        ["GET /public/x", "GET /public/y"],
        "the server saw no h2c offer, no HTTP2-Settings, no /admin and nothing unjudged"
    );

    let flows = node.flows(&["--protocol", "http"]);
    let admin = flows
        .iter()
        .find(|f| f["http"]["path"] == "/admin")
        .unwrap_or_else(|| panic!("no flow for /admin: {flows:?}"));
    assert_eq!(admin["verdict"], "DROPPED");
    assert_eq!(admin["drop_reason"], "Policy denied (L7)");
    assert!(
        node.flows(&[])
            .iter()
            .all(|f| f["event"] != "tunnel-opened"),
        "no tunnel was opened"
    );
}

#[test]
fn websockets_and_listed_upgrades_tunnel_after_a_101_and_others_get_403() {
    let node = Node::start("l7-upgrades");
    let client = node.add_endpoint("client", "x", "app=client");
    let api = node.add_endpoint("api", "x", "app=api");
    let seen = upgrading_backend(&api.name, 80);
    // `upgrades` is palisade.io/v1's: Cilium has no such field.
    let cilium = PUBLIC_ONLY.replace("name: api-public", "name: api-upgrades").replace(
        "        - {method: GET, path: \"/public.*\"}\n",
        "        - {method: GET, path: \"/public.*\"}\n        - {method: POST, path: /attach, upgrades: [spdy/3.1]}\n",
    );
    let out = node.try_apply(&cilium);
    assert!(!out.status.success(), "cilium.io/v2 must reject `upgrades`");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("upgrades") && err.contains("unknown field"),
        "{err}"
    );
    node.apply(
        &cilium
            .replace("cilium.io/v2", "palisade.io/v1")
            .replace("CiliumNetworkPolicy", "NetworkPolicy"),
    );

    // A websocket on an allowed path: tunnelled after the server's 101.
    let mut ws = Client::connect(&client.name, api.ip, 80).unwrap();
    ws.send(b"GET /public/ws HTTP/1.1\r\nHost: api\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
        .unwrap();
    let r = ws.read_reply().unwrap();
    assert_eq!(r.status, 101, "{r:?}");
    ws.send(b"ping").unwrap();
    assert_eq!(ws.read_until(b"ping").unwrap(), b"echo:ping");

    // An upgrade no rule lists: refused before the server hears of it.
    let mut spdy = Client::connect(&client.name, api.ip, 80).unwrap();
    spdy.send(
        b"GET /public/x HTTP/1.1\r\nHost: api\r\nConnection: Upgrade\r\nUpgrade: spdy/3.1\r\n\r\n",
    )
    .unwrap();
    assert_eq!(spdy.read_reply().unwrap().status, 403);
    // The same protocol where the palisade.io/v1 rule lists it: tunnelled.
    spdy.send(b"POST /attach HTTP/1.1\r\nHost: api\r\nConnection: Upgrade\r\nUpgrade: SPDY/3.1\r\nContent-Length: 0\r\n\r\n")
        .unwrap();
    assert_eq!(spdy.read_reply().unwrap().status, 101);
    spdy.send(b"frame").unwrap();
    assert_eq!(spdy.read_until(b"frame").unwrap(), b"echo:frame");
    drop(ws);
    drop(spdy);

    let seen = seen.lock().unwrap().clone();
    assert_eq!(
        seen,
        [
            "GET /public/ws upgrade=websocket",
            "TUNNEL 4",
            "POST /attach upgrade=SPDY/3.1",
            "TUNNEL 5"
        ],
        "{seen:?}"
    );
    let refused = node
        .flows(&["--http-path", "/public/x"])
        .into_iter()
        .next()
        .expect("a flow for the refused upgrade");
    assert_eq!(refused["verdict"], "DROPPED");
    assert_eq!(refused["drop_reason"], "Policy denied (L7)");
    assert_eq!(refused["http"]["status"], 403);

    let opened = wait_for_flows(&node, "tunnel-opened", 2);
    let closed = wait_for_flows(&node, "tunnel-closed", 2);
    assert_eq!(opened.len(), 2, "{opened:?}");
    assert_eq!(closed.len(), 2, "{closed:?}");
    let by_protocol = |flows: &[serde_json::Value], p: &str| {
        flows
            .iter()
            .find(|f| f["tunnel"]["protocol"] == p)
            .cloned()
            .unwrap_or_else(|| panic!("no {p} tunnel in {flows:?}"))
    };
    let ws_closed = by_protocol(&closed, "websocket");
    assert_eq!(ws_closed["verdict"], "FORWARDED");
    assert_eq!(ws_closed["tunnel"]["bytes_to_server"], 4);
    assert_eq!(ws_closed["tunnel"]["bytes_to_client"], 9);
    assert_eq!(ws_closed["policy"]["name"], "x/api-upgrades");
    assert_eq!(ws_closed["source"]["name"], client.name.as_str());
    let spdy_closed = by_protocol(&closed, "SPDY/3.1");
    assert_eq!(spdy_closed["tunnel"]["bytes_to_server"], 5);
    assert_eq!(spdy_closed["tunnel"]["bytes_to_client"], 10);
    assert_eq!(spdy_closed["policy"]["name"], "x/api-upgrades");
    assert_eq!(
        by_protocol(&opened, "websocket")["tunnel"]["bytes_to_server"],
        0
    );
}

/// The proxy's TIME_WAIT sockets of connections from `client` to `server:80`: its
/// transparently accepted sockets carry the original destination as their local address.
fn proxy_time_waits(s: &L7Scene) -> usize {
    let (client, server) = (s.client.ip, s.api.ip);
    time_wait_sockets(&s.node.netns)
        .iter()
        .filter(|(local, remote)| *local == SocketAddrV4::new(server, 80) && *remote.ip() == client)
        .count()
}

/// `n` requests from one client port, each on a connection of its own, `request(i)` asking
/// the proxy to close after answering; each must be answered whole, and the proxy, which
/// closes first, holds the TIME_WAIT of the client's tuple when the next connection reuses it.
/// Returns the SYN retransmissions this took.
fn reconnect_from_one_port(
    s: &L7Scene,
    port: u16,
    n: usize,
    request: impl Fn(usize) -> String,
) -> u64 {
    let retransmitted = || tcp_counter(&s.client.name, "TcpExtTCPSynRetrans");
    let before = retransmitted();
    for i in 0..n {
        let mut c = (0..100)
            .find_map(|_| {
                let connected = Client::connect_from(&s.client.name, port, s.api.ip, 80);
                if connected.is_err() {
                    // The previous connection's last ACK may still be on its way.
                    std::thread::sleep(Duration::from_millis(20));
                }
                connected.ok()
            })
            .unwrap_or_else(|| panic!("connection {i} from port {port} failed"));
        c.send(request(i).as_bytes()).unwrap();
        let reply = c.read_reply().unwrap();
        assert_eq!(
            (reply.status, reply.body),
            (200, format!("GET /public/{i} 0")),
            "request {i}"
        );
        // The client reads to the end, as one that asked to close does.
        assert!(c.closed(), "the proxy closes after answering request {i}");
    }
    // The proxy's socket reaches TIME_WAIT once the client's FIN has come back, which may be
    // just after the client read the end.
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    while proxy_time_waits(s) == 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        proxy_time_waits(s) >= 1,
        "the proxy closed first, so it holds the TIME_WAIT"
    );
    retransmitted() - before
}

#[test]
fn a_port_reused_while_the_proxy_holds_its_time_wait_connects_without_a_retransmission() {
    // The proxy closes first, as a server does for `Connection: close` (and must for an
    // HTTP/1.0 client, which may read to the end of the connection), so the TIME_WAIT of the
    // client's tuple is the proxy's. A client may reuse the port at once (it holds no
    // TIME_WAIT); its SYN must open a new connection, as the kernel's TIME_WAIT handling
    // lets it, not be dropped and retransmitted (n - 1 retransmissions, a second each).
    let s = scene("l7-reuse");
    let n = 6;
    let close = reconnect_from_one_port(&s, 41_000, n, |i| {
        format!("GET /public/{i} HTTP/1.1\r\nHost: api\r\nConnection: close\r\n\r\n")
    });
    let http10 = reconnect_from_one_port(&s, 41_002, n, |i| {
        format!("GET /public/{i} HTTP/1.0\r\nHost: api\r\n\r\n")
    });
    assert!(
        close + http10 <= 1,
        "SYN retransmissions for {n} connections from one port: {close} with Connection: close, {http10} with HTTP/1.0"
    );
}

#[test]
fn connections_closed_after_each_request_share_the_proxys_upstream_until_policy_changes() {
    // A client that opens a connection per request costs the server one handshake per
    // proxy worker, not one per request: the proxy keeps its upstream connection (the
    // client's `Connection: close` is for its own connection) for the next connection of
    // the same client to the same server, as nginx's `keepalive` does.
    let s = scene("l7-pool");
    let opened = || tcp_counter(&s.api.name, "TcpPassiveOpens");
    let ask = |i: usize| {
        let mut c = Client::connect(&s.client.name, s.api.ip, 80).unwrap();
        c.send(
            format!("GET /public/{i} HTTP/1.1\r\nHost: api\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .unwrap();
        let reply = c.read_reply().unwrap();
        assert_eq!(
            (reply.status, reply.body),
            (200, format!("GET /public/{i} 0"))
        );
        assert!(c.closed(), "the proxy closes the client's connection");
    };
    let n = 12;
    let before = opened();
    (0..n).for_each(ask);
    let pooled = opened() - before;
    assert!(
        (1..=n as u64 / 2).contains(&pooled),
        "{n} client connections took {pooled} upstream connections"
    );
    // Any policy change may change how the datapath judges a kept connection: the next
    // request is carried by a connection opened, and judged, under the new policy.
    s.node
        .apply(&API_L7.replace("path: \"/upload\"", "path: \"/upload/.*\""));
    let before = opened();
    ask(n);
    assert_eq!(
        opened() - before,
        1,
        "a new upstream connection after the policy change"
    );
}
