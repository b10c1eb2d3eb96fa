//! L3/L4 enforcement end to end: real agent, real BPF on real veths, real packets.
//! Each test runs its own node namespace and agent, so tests are independent.

use std::thread::sleep;
use std::time::Duration;

use palisade_integration::Node;
use palisade_integration::traffic::{
    self, OpenConnection, ping, tcp_connects, tcp_server, udp_reaches, udp_server,
};

/// A policy on `app=server` pods; `ingress` is the YAML list of rules (`[]` for none).
fn server_policy(name: &str, ns: &str, ingress: &str) -> String {
    let ingress = if ingress.trim() == "[]" {
        " []\n".to_string()
    } else {
        format!("\n{ingress}")
    };
    format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: {name}\n  namespace: {ns}\nspec:\n  podSelector:\n    matchLabels:\n      app: server\n  policyTypes: [Ingress]\n  ingress:{ingress}"
    )
}

#[test]
fn traffic_flows_freely_until_a_policy_selects_the_endpoint() {
    let node = Node::start("default-allow");
    let client = node.add_endpoint("client", "x", "app=client");
    let server = node.add_endpoint("server", "x", "app=server");
    let _tcp = tcp_server(&server.name, 80);
    let _udp = udp_server(&server.name, 80);
    let _back = tcp_server(&client.name, 80);
    assert!(
        tcp_connects(&client.name, server.ip, 80),
        "TCP client->server"
    );
    assert!(
        udp_reaches(&client.name, server.ip, 80),
        "UDP client->server"
    );
    assert!(ping(&client.name, server.ip), "ICMP echo client->server");
    assert!(
        tcp_connects(&server.name, client.ip, 80),
        "TCP server->client"
    );

    // Selected with no ingress rule: everything into the server stops, nothing else does.
    node.apply(&server_policy("deny-all", "x", "  []\n"));
    let (c, s) = (client.clone(), server.clone());
    let results = traffic::all(vec![
        Box::new(move || tcp_connects(&c.name, s.ip, 80)) as Box<dyn FnOnce() -> bool + Send>,
        Box::new({
            let (c, s) = (client.clone(), server.clone());
            move || udp_reaches(&c.name, s.ip, 80)
        }),
        Box::new({
            let (c, s) = (client.clone(), server.clone());
            move || ping(&c.name, s.ip)
        }),
        Box::new({
            let (c, s) = (client.clone(), server.clone());
            move || tcp_connects(&s.name, c.ip, 80)
        }),
    ]);
    assert_eq!(
        results,
        vec![false, false, false, true],
        "[tcp, udp, icmp into server; tcp out of server]"
    );

    // The drop is visible as a flow naming the reason.
    let drops = node.flows(&["--verdict", "DROPPED", "--to-pod", &server.qualified()]);
    assert!(
        drops
            .iter()
            .any(|f| f["drop_reason"] == "Policy denied" && f["l4"]["destination_port"] == 80),
        "{drops:?}"
    );
}

#[test]
fn pod_label_namespace_label_and_both_select_peers() {
    let node = Node::start("selectors");
    let server = node.add_endpoint("server", "x", "app=server");
    let same_ns = node.add_endpoint("same", "x", "app=client");
    let other_label = node.add_endpoint("other", "x", "app=other");
    let ns_y = node.add_endpoint("ycl", "y", "app=client");
    let ns_z = node.add_endpoint("zcl", "z", "app=client");
    let _srv = tcp_server(&server.name, 80);
    node.palisade_ok(&["namespace", "label", "y", "--set", "team=blue"]);
    node.palisade_ok(&["namespace", "label", "z", "--set", "team=red"]);

    let probe = |clients: &[&palisade_integration::Endpoint]| -> Vec<bool> {
        traffic::all(
            clients
                .iter()
                .map(|c| {
                    let (c, ip) = (c.name.clone(), server.ip);
                    move || tcp_connects(&c, ip, 80)
                })
                .collect(),
        )
    };
    let everyone = [&same_ns, &other_label, &ns_y, &ns_z];

    node.apply(&server_policy(
        "by-pod",
        "x",
        "  - from:\n    - podSelector:\n        matchLabels:\n          app: client\n",
    ));
    assert_eq!(
        probe(&everyone),
        vec![true, false, false, false],
        "podSelector: same namespace only"
    );

    node.apply(&server_policy(
        "by-pod",
        "x",
        "  - from:\n    - namespaceSelector:\n        matchLabels:\n          team: blue\n",
    ));
    assert_eq!(
        probe(&everyone),
        vec![false, false, true, false],
        "namespaceSelector team=blue"
    );

    node.apply(&server_policy(
        "by-pod",
        "x",
        "  - from:\n    - namespaceSelector:\n        matchExpressions:\n        - {key: team, operator: Exists}\n      podSelector:\n        matchExpressions:\n        - {key: app, operator: In, values: [client]}\n",
    ));
    assert_eq!(
        probe(&everyone),
        vec![false, false, true, true],
        "both in one peer: AND"
    );

    // A namespace label change moves its pods in and out.
    node.palisade_ok(&["namespace", "label", "z", "--remove", "team"]);
    assert_eq!(
        probe(&everyone),
        vec![false, false, true, false],
        "z lost its team label"
    );
}

#[test]
fn ip_block_with_except_applies_to_endpoint_addresses() {
    let node = Node::start("ipblock");
    let server = node.add_endpoint_with("server", "x", "app=server", &["--ip", "10.200.0.10"]);
    let inside = node.add_endpoint_with("inside", "x", "app=c", &["--ip", "10.200.1.5"]);
    let excepted = node.add_endpoint_with("except", "x", "app=c", &["--ip", "10.200.2.5"]);
    let outside = node.add_endpoint_with("outside", "x", "app=c", &["--ip", "10.200.64.5"]);
    let _srv = tcp_server(&server.name, 80);
    node.apply(&server_policy(
        "cidr",
        "x",
        "  - from:\n    - ipBlock:\n        cidr: 10.200.0.0/18\n        except: [10.200.2.0/24]\n",
    ));
    let results = traffic::all(
        [&inside, &excepted, &outside]
            .iter()
            .map(|c| {
                let (c, ip) = (c.name.clone(), server.ip);
                move || tcp_connects(&c, ip, 80)
            })
            .collect(),
    );
    assert_eq!(
        results,
        vec![true, false, false],
        "[in cidr, in except, outside cidr]"
    );
}

#[test]
fn ports_and_protocols_are_enforced_separately() {
    let node = Node::start("ports");
    let server = node.add_endpoint("server", "x", "app=server");
    let client = node.add_endpoint("client", "x", "app=client");
    let _t80 = tcp_server(&server.name, 80);
    let _t81 = tcp_server(&server.name, 81);
    let _u80 = udp_server(&server.name, 80);
    let _u81 = udp_server(&server.name, 81);
    node.apply(&server_policy(
        "ports",
        "x",
        "  - ports:\n    - protocol: TCP\n      port: 80\n    - protocol: UDP\n      port: 81\n",
    ));
    let (c, ip) = (client.name.clone(), server.ip);
    let results = traffic::all(vec![
        Box::new({
            let c = c.clone();
            move || tcp_connects(&c, ip, 80)
        }) as Box<dyn FnOnce() -> bool + Send>,
        Box::new({
            let c = c.clone();
            move || tcp_connects(&c, ip, 81)
        }),
        Box::new({
            let c = c.clone();
            move || udp_reaches(&c, ip, 80)
        }),
        Box::new(move || udp_reaches(&c, ip, 81)),
    ]);
    assert_eq!(
        results,
        vec![true, false, false, true],
        "[tcp/80, tcp/81, udp/80, udp/81]"
    );
}

#[test]
fn egress_policy_limits_what_an_endpoint_may_reach_and_replies_pass() {
    let node = Node::start("egress");
    let client = node.add_endpoint("client", "x", "app=client");
    let db = node.add_endpoint("db", "x", "app=db");
    let web = node.add_endpoint("web", "x", "app=web");
    let _db = tcp_server(&db.name, 5432);
    let _web = tcp_server(&web.name, 80);
    let _client = tcp_server(&client.name, 9000);
    node.apply(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: client-out, namespace: x}\nspec:\n  podSelector: {matchLabels: {app: client}}\n  policyTypes: [Egress, Ingress]\n  egress:\n  - to:\n    - podSelector: {matchLabels: {app: web}}\n    ports: [{port: 80}]\n",
    );
    // Egress to web/80 works, and its replies pass although the client's ingress is locked.
    assert!(tcp_connects(&client.name, web.ip, 80));
    assert!(
        !tcp_connects(&client.name, db.ip, 5432),
        "egress to db not allowed"
    );
    // New connections into the client are not replies: denied.
    assert!(
        !tcp_connects(&web.name, client.ip, 9000),
        "ingress to client denied"
    );
}

#[test]
fn label_change_moves_an_endpoint_in_and_out_of_a_policy() {
    let node = Node::start("relabel");
    let server = node.add_endpoint("server", "x", "app=server");
    let client = node.add_endpoint("client", "x", "app=visitor");
    let _srv = tcp_server(&server.name, 80);
    node.apply(&server_policy(
        "allow-client",
        "x",
        "  - from:\n    - podSelector: {matchLabels: {app: client}}\n",
    ));
    assert!(!tcp_connects(&client.name, server.ip, 80));
    node.palisade_ok(&["endpoint", "label", &client.name, "--set", "app=client"]);
    assert!(
        tcp_connects(&client.name, server.ip, 80),
        "after relabel to app=client"
    );
    // An established connection stops once a relabel takes the client out of the policy.
    let mut conn = OpenConnection::open(&client.name, server.ip, 80).expect("connect");
    assert!(conn.round_trip());
    node.palisade_ok(&["endpoint", "label", &client.name, "--set", "app=visitor"]);
    assert!(
        !conn.round_trip(),
        "established connection revalidated after the policy change"
    );
    assert!(!tcp_connects(&client.name, server.ip, 80));
    let revalidated = node.flows(&["--to-pod", &server.qualified(), "--verdict", "DROPPED"]);
    assert!(
        revalidated
            .iter()
            .any(|f| f["event"] == "revalidation-drop"),
        "{revalidated:?}"
    );
}

#[test]
fn deleting_a_policy_restores_traffic_and_keeps_allowed_connections_alive_during_updates() {
    let node = Node::start("delete");
    let server = node.add_endpoint("server", "x", "app=server");
    let client = node.add_endpoint("client", "x", "app=client");
    let _srv = tcp_server(&server.name, 80);
    let allow = server_policy(
        "allow",
        "x",
        "  - from:\n    - podSelector: {matchLabels: {app: client}}\n",
    );
    node.apply(&allow);
    let mut conn = OpenConnection::open(&client.name, server.ip, 80).expect("connect");
    assert!(conn.round_trip());
    // Replace the rule with an equivalent one on the port: the connection stays allowed
    // throughout (add before delete), so it must survive.
    node.apply(&server_policy(
        "allow",
        "x",
        "  - from:\n    - podSelector: {matchLabels: {app: client}}\n    ports: [{port: 80}]\n",
    ));
    assert!(
        conn.round_trip(),
        "connection that stays allowed survives the update"
    );
    node.apply(&server_policy("deny", "x", "  []\n"));
    assert!(
        conn.round_trip(),
        "the allow policy still applies alongside"
    );
    node.palisade_ok(&["policy", "delete", "allow", "--namespace", "x"]);
    assert!(
        !conn.round_trip(),
        "only deny-all left: {:?}\n{}",
        node.flows(&["--last", "20"]),
        node.palisade_ok(&["status"])
    );
    node.palisade_ok(&["policy", "delete", "deny", "--namespace", "x"]);
    let other = node.add_endpoint("other", "x", "app=other");
    assert!(
        tcp_connects(&other.name, server.ip, 80),
        "no policy left: default allow again"
    );
}

#[test]
fn deny_rule_beats_allow_rule() {
    let node = Node::start("deny");
    let server = node.add_endpoint("server", "x", "app=server");
    let client = node.add_endpoint("client", "x", "app=client");
    let admin = node.add_endpoint("admin", "x", "app=admin");
    let _srv = tcp_server(&server.name, 80);
    let _srv2 = tcp_server(&server.name, 22);
    node.apply(&server_policy("allow-all-in", "x", "  - {}\n"));
    node.apply(
        "apiVersion: palisade.io/v1\nkind: NetworkPolicy\nmetadata: {name: no-ssh, namespace: x}\nspec:\n  endpointSelector: {matchLabels: {app: server}}\n  ingressDeny:\n  - fromEndpoints: [{matchLabels: {app: client}}]\n    toPorts: [{ports: [{port: \"22\", protocol: TCP}]}]\n",
    );
    let results = traffic::all(vec![
        Box::new({
            let (c, ip) = (client.name.clone(), server.ip);
            move || tcp_connects(&c, ip, 22)
        }) as Box<dyn FnOnce() -> bool + Send>,
        Box::new({
            let (c, ip) = (client.name.clone(), server.ip);
            move || tcp_connects(&c, ip, 80)
        }),
        Box::new({
            let (c, ip) = (admin.name.clone(), server.ip);
            move || tcp_connects(&c, ip, 22)
        }),
    ]);
    assert_eq!(
        results,
        vec![false, true, true],
        "[client:22 denied by rule, client:80, admin:22]"
    );
    let flows = node.flows(&["--from-pod", &client.qualified(), "--verdict", "DROPPED"]);
    assert!(
        flows
            .iter()
            .any(|f| f["drop_reason"] == "Policy denied by denylist"
                && f["policy"]["name"] == "x/no-ssh"),
        "{flows:?}"
    );
}

#[test]
fn conntrack_entries_expire_and_close() {
    let node = Node::start_with("conntrack", &["--ct-other-timeout", "2s"]);
    let server = node.add_endpoint("server", "x", "app=server");
    let client = node.add_endpoint("client", "x", "app=client");
    let _srv = tcp_server(&server.name, 80);
    let udp = udp_server(&server.name, 53);
    // Client ingress locked down: only replies may reach it.
    node.apply(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: lock, namespace: x}\nspec:\n  podSelector: {matchLabels: {app: client}}\n  policyTypes: [Ingress]\n",
    );
    // UDP from client port 5353 creates the entries; the answer from server:53 is a reply
    // and passes the locked ingress ...
    assert!(
        traffic::udp_send_from(&client.name, 5353, server.ip, 53),
        "reply of an allowed UDP flow"
    );
    let before = node.json(&["status"])["conntrack_entries"]
        .as_u64()
        .unwrap();
    assert!(before >= 2, "UDP entries on both sides: {before}");
    // ... until the entry expires: then the same tuple is a new flow into the client, denied.
    sleep(Duration::from_secs(3));
    drop(udp);
    let flows_before = node
        .flows(&["--to-pod", &client.qualified(), "--verdict", "DROPPED"])
        .len();
    let c = client.ip;
    let sent = traffic::in_netns(&server.name, move || {
        let sock =
            std::net::UdpSocket::bind((std::net::Ipv4Addr::UNSPECIFIED, 53)).expect("bind 53");
        sock.send_to(b"late", (c, 5353)).is_ok()
    });
    assert!(sent);
    sleep(Duration::from_millis(300));
    let flows_after = node.flows(&["--to-pod", &client.qualified(), "--verdict", "DROPPED"]);
    assert!(
        flows_after.len() > flows_before,
        "late datagram after expiry is dropped: {flows_after:?}"
    );

    // FIN in both directions puts both entries on the short close timeout.
    let conn = OpenConnection::open(&client.name, server.ip, 80).expect("connect");
    let port = conn.local_port();
    drop(conn);
    sleep(Duration::from_millis(300));
    let entries = node.json(&["conntrack", "list"]);
    let closing: Vec<&serde_json::Value> = entries
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["source_port"] == port && e["protocol"] == "TCP")
        .collect();
    assert_eq!(
        closing.len(),
        2,
        "client egress and server ingress entries: {entries}"
    );
    for e in closing {
        let flags: Vec<&str> = e["flags"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|f| f.as_str())
            .collect();
        assert!(
            flags.contains(&"fin-forward") && flags.contains(&"fin-reply"),
            "{e}"
        );
        assert!(e["expires_in_seconds"].as_u64().unwrap() <= 10, "{e}");
    }

    // TCP RST removes the entries at once.
    let conn = OpenConnection::open(&client.name, server.ip, 80).expect("connect");
    let with_conn = node.json(&["status"])["conntrack_entries"]
        .as_u64()
        .unwrap();
    conn.reset();
    sleep(Duration::from_millis(200));
    let after_rst = node.json(&["status"])["conntrack_entries"]
        .as_u64()
        .unwrap();
    assert!(
        after_rst + 2 <= with_conn,
        "RST closed both entries: {with_conn} -> {after_rst}"
    );
}

#[test]
fn bad_input_is_rejected_with_a_clear_error_and_changes_nothing() {
    let node = Node::start("bad-input");
    let server = node.add_endpoint("server", "x", "app=server");
    let client = node.add_endpoint("client", "x", "app=client");
    let _srv = tcp_server(&server.name, 80);
    node.apply(&server_policy(
        "allow",
        "x",
        "  - from:\n    - podSelector: {matchLabels: {app: client}}\n",
    ));
    let before = node.palisade_ok(&["policy", "list", "-o", "json"]);

    let cases = [
        (
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: a, namespace: x}\nspec:\n  podSelector: {}\n  ingres: []\n",
            "ingres",
        ),
        (
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: a, namespace: x}\nspec:\n  podSelector: {}\n  ingress:\n  - from:\n    - ipBlock: {cidr: 10.0.0.0/33}\n",
            "10.0.0.0/33",
        ),
        ("apiVersion: v1\nkind: Pod\nmetadata: {name: a}\n", "Pod"),
        (
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: a, namespace: x}\nspec:\n  podSelector:\n    matchExpressions: [{key: app, operator: Near, values: [a]}]\n",
            "Near",
        ),
        ("this: is: not: yaml: [", "invalid YAML"),
    ];
    for (yaml, needle) in cases {
        // A valid document first: the whole apply must still be refused.
        let doc = format!("{}---\n{yaml}", server_policy("extra", "x", "  []\n"));
        let out = node.try_apply(&doc);
        assert!(!out.status.success(), "accepted: {yaml}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(needle), "error {err:?} should name {needle:?}");
        assert!(
            err.contains("document 2") || needle == "document 1",
            "error {err:?} should name the document"
        );
        assert_eq!(err.trim().lines().count(), 1, "one-line error: {err:?}");
    }
    assert_eq!(
        node.palisade_ok(&["policy", "list", "-o", "json"]),
        before,
        "nothing changed"
    );
    assert!(
        tcp_connects(&client.name, server.ip, 80),
        "enforcement intact"
    );

    let dup = node.palisade(&["endpoint", "add", &client.name, "--namespace", "x"]);
    assert!(!dup.status.success());
    assert!(String::from_utf8_lossy(&dup.stderr).contains("already exists"));

    let no_agent =
        std::process::Command::new(palisade_integration::node::bin_dir().join("palisade"))
            .args(["--api", "/nonexistent/agent.sock", "status"])
            .output()
            .expect("run palisade");
    assert!(!no_agent.status.success());
    assert!(String::from_utf8_lossy(&no_agent.stderr).contains("agent is not running"));
}

#[test]
fn enforcement_survives_an_agent_restart_and_identities_stay() {
    let node = Node::start("restart");
    let server = node.add_endpoint("server", "x", "app=server");
    let client = node.add_endpoint("client", "x", "app=client");
    let other = node.add_endpoint("other", "x", "app=other");
    let _srv = tcp_server(&server.name, 80);
    node.apply(&server_policy(
        "allow",
        "x",
        "  - from:\n    - podSelector: {matchLabels: {app: client}}\n",
    ));
    let mut conn = OpenConnection::open(&client.name, server.ip, 80).expect("connect");
    node.stop_agent();
    // No agent: the pinned datapath still enforces, and established connections live on.
    assert!(conn.round_trip());
    assert!(!tcp_connects(&other.name, server.ip, 80));
    assert!(tcp_connects(&client.name, server.ip, 80));
    node.start_agent();
    assert!(
        conn.round_trip(),
        "restart does not break allowed connections"
    );
    let eps = node.json(&["endpoint", "list"]);
    let ids: Vec<u64> = eps
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["identity"].as_u64().unwrap())
        .collect();
    assert!(ids.contains(&u64::from(server.identity)) && ids.contains(&u64::from(client.identity)));
    assert!(!tcp_connects(&other.name, server.ip, 80));
    let status = node.json(&["status"]);
    assert_eq!(status["maps_in_sync"], true);
}

#[test]
fn enforcement_always_denies_even_endpoints_no_policy_selects() {
    let node = Node::start_with("always", &["--enforcement", "always"]);
    let server = node.add_endpoint("server", "x", "app=server");
    let client = node.add_endpoint("client", "x", "app=client");
    let _srv = tcp_server(&server.name, 80);
    assert!(
        !tcp_connects(&client.name, server.ip, 80),
        "no policy, but enforcement is always"
    );
    let eps = node.json(&["endpoint", "list"]);
    assert!(
        eps.as_array()
            .unwrap()
            .iter()
            .all(|e| e["ingress_enforced"] == true && e["egress_enforced"] == true)
    );
    // Allowing both directions explicitly opens the path.
    node.apply(&server_policy(
        "in",
        "x",
        "  - from:\n    - podSelector: {matchLabels: {app: client}}\n",
    ));
    node.apply(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: out, namespace: x}\nspec:\n  podSelector: {matchLabels: {app: client}}\n  policyTypes: [Egress]\n  egress:\n  - to: [{podSelector: {matchLabels: {app: server}}}]\n",
    );
    assert!(tcp_connects(&client.name, server.ip, 80));
}

#[test]
fn audit_mode_forwards_what_policy_would_drop_and_says_so() {
    let node = Node::start_with("audit", &["--audit"]);
    let server = node.add_endpoint("server", "x", "app=server");
    let client = node.add_endpoint("client", "x", "app=client");
    let _srv = tcp_server(&server.name, 80);
    node.apply(&server_policy("deny-all", "x", "  []\n"));
    assert!(
        tcp_connects(&client.name, server.ip, 80),
        "audit mode never drops"
    );
    let audited = node.flows(&["--verdict", "AUDIT"]);
    assert!(
        audited.iter().any(
            |f| f["destination"]["name"] == server.name.as_str() && f["direction"] == "ingress"
        ),
        "the would-be drop is reported as AUDIT: {audited:?}"
    );
}
