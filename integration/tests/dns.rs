//! DNS-aware policy end to end: dnsmasq in an endpoint's namespace as the resolver, servers
//! in a "world" namespace outside the cluster, and a client whose egress policy allows only
//! some names (`rules.dns`) and the addresses their answers hold (`toFQDNs`). The datapath
//! redirects the client's DNS (UDP and TCP) to the agent's DNS proxy, which learns each answer
//! into the maps before releasing it.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use palisade_integration::dns::{self, query, resolver, udp_raw_answered, world};
use palisade_integration::traffic::{OpenConnection, tcp_connects, tcp_server};
use palisade_integration::{Endpoint, Node};

const API: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
const CDN_BASE: u8 = 100;
/// Answered by dnsmasq, but no rule lets the client ask for it.
const HIDDEN: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 66);
const FIRST_CONNECTIONS: u8 = 30;

const CLIENT_POLICY: &str = r#"apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: client-egress, namespace: x}
spec:
  endpointSelector: {matchLabels: {app: client}}
  egress:
  - toEndpoints:
    - matchLabels: {"k8s:io.kubernetes.pod.namespace": kube-system, k8s-app: kube-dns}
    toPorts:
    - ports: [{port: "53", protocol: ANY}]
      rules:
        dns:
        - matchName: api.example.test
        - matchPattern: "*.cdn.example.test"
  - toFQDNs:
    - matchName: api.example.test
    - matchPattern: "*.cdn.example.test"
    toPorts:
    - ports: [{port: "8080", protocol: TCP}]
"#;

struct Scene {
    node: Node,
    client: Endpoint,
    dns: Endpoint,
    _resolver: dns::Resolver,
    _server: palisade_integration::traffic::Server,
}

fn cdn(i: u8) -> (String, Ipv4Addr) {
    (
        format!("n{i}.cdn.example.test"),
        Ipv4Addr::new(192, 0, 2, CDN_BASE + i),
    )
}

fn scene(test: &str, agent_args: &[&str], ttl: u32) -> Scene {
    let node = Node::start_with(test, agent_args);
    let client = node.add_endpoint("client", "x", "app=client");
    let dns_ep = node.add_endpoint("dns", "kube-system", "k8s-app=kube-dns");
    let world_ns = world(&node);
    let server = tcp_server(&world_ns, 8080);
    // One more than the burst asks for: a name first looked up just before a crash.
    let cdn: Vec<(String, Ipv4Addr)> = (0..=FIRST_CONNECTIONS).map(cdn).collect();
    let mut records: Vec<(&str, Ipv4Addr)> =
        vec![("api.example.test", API), ("hidden.example.test", HIDDEN)];
    records.extend(cdn.iter().map(|(n, a)| (n.as_str(), *a)));
    let r = resolver(&dns_ep.name, dns_ep.ip, ttl, &records, &node.dir);
    node.apply(CLIENT_POLICY);
    Scene {
        node,
        client,
        dns: dns_ep,
        _resolver: r,
        _server: server,
    }
}

fn resolve(s: &Scene, name: &str, tcp: bool) -> dns::Reply {
    query(&s.client.name, s.dns.ip, name, tcp)
        .unwrap_or_else(|| panic!("no answer for {name}:\n{}", s.node.agent_log()))
}

fn dns_flows(s: &Scene, name: &str) -> Vec<serde_json::Value> {
    s.node
        .flows(&["--protocol", "dns", "--fqdn", name, "--last", "100"])
}

/// What the agent knows, for a failure's message.
fn dump(s: &Scene) -> String {
    let run = |args: &[&str]| String::from_utf8_lossy(&s.node.palisade(args).stdout).into_owned();
    format!(
        "flows:\n{}\nfqdns:\n{}\nidentities:\n{}",
        run(&["observe", "--last", "40"]),
        run(&["fqdn", "list"]),
        run(&["identity", "list"]),
    )
}

fn until(what: &str, deadline: Duration, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + deadline;
    while Instant::now() < end {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!("{what} did not happen within {deadline:?}");
}

#[test]
fn allowed_names_resolve_and_their_first_connection_passes_others_are_refused() {
    let s = scene("dns-allow", &[], 300);
    // Before any lookup, the address is no name's: denied.
    assert!(!tcp_connects(&s.client.name, API, 8080));

    let r = resolve(&s, "api.example.test", false);
    assert_eq!(
        (r.rcode.as_str(), r.addresses.as_slice()),
        ("NoError", &[API][..])
    );
    assert!(
        tcp_connects(&s.client.name, API, 8080),
        "the connection right after the lookup passes:\n{}",
        dump(&s)
    );
    // Over TCP as well.
    let r = resolve(&s, "api.example.test", true);
    assert_eq!(r.addresses, vec![API]);

    // A wildcard: every name resolved is connected to at once, none dropped.
    let mut dropped = 0;
    for i in 0..FIRST_CONNECTIONS {
        let (name, addr) = cdn(i);
        let r = resolve(&s, &name, i % 2 == 1);
        assert_eq!(r.addresses, vec![addr], "{name}");
        if !tcp_connects(&s.client.name, addr, 8080) {
            dropped += 1;
        }
    }
    assert_eq!(dropped, 0, "first connections dropped");

    // A name no rule allows: REFUSED by the proxy, and a flow says so.
    let r = resolve(&s, "hidden.example.test", false);
    assert_eq!(r.rcode, "Refused");
    assert!(r.addresses.is_empty());
    // An address the client never resolved: denied (dnsmasq knows it, the client did not ask).
    assert!(!tcp_connects(&s.client.name, HIDDEN, 8080));
    let flows = dns_flows(&s, "hidden.example.test");
    let refused = flows
        .iter()
        .find(|f| f["verdict"] == "DROPPED")
        .unwrap_or_else(|| panic!("no refused DNS flow: {flows:?}"));
    assert_eq!(refused["dns"]["rcode"], "Refused");
    assert_eq!(refused["event"], "dns-request");
    assert_eq!(refused["source"]["name"], s.client.name.as_str());
    let answered = dns_flows(&s, "api.example.test");
    let ok = answered
        .iter()
        .find(|f| f["verdict"] == "FORWARDED")
        .unwrap_or_else(|| panic!("no answered DNS flow: {answered:?}"));
    assert_eq!(ok["dns"]["answers"][0], API.to_string());
    assert!(
        ok["policy"]["rule"]
            .as_str()
            .is_some_and(|r| r.contains("x/client-egress")),
        "{ok}"
    );
    // The --fqdn filter takes patterns.
    assert!(dns_flows(&s, "*.cdn.example.test").len() >= usize::from(FIRST_CONNECTIONS));

    // Garbage to the resolver's port: no answer, and counted as a malformed query.
    assert!(!udp_raw_answered(
        &s.client.name,
        s.dns.ip,
        vec![0xde, 0xad, 0xbe, 0xef]
    ));
    let malformed = s
        .node
        .flows(&["--protocol", "dns", "--verdict", "DROPPED", "--last", "200"]);
    assert!(
        malformed
            .iter()
            .any(|f| f["drop_reason"] == "Invalid DNS message"),
        "{malformed:?}"
    );

    // The cache, as `palisade fqdn list` shows it.
    let list = s.node.json(&["fqdn", "list"]);
    let entry = list
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "api.example.test")
        .unwrap_or_else(|| panic!("{list}"));
    assert_eq!(entry["address"], API.to_string());
    assert_eq!(entry["endpoint"], s.client.qualified());
    assert!(entry["identity"].is_u64());

    // `policy trace --to-fqdn`: the selector, the lookup, and each learned address's verdict.
    let from = s.client.qualified();
    let trace = |name: &str| {
        s.node.json(&[
            "policy",
            "trace",
            "--from",
            &from,
            "--to-fqdn",
            name,
            "--port",
            "8080",
        ])
    };
    let api = trace("api.example.test");
    assert_eq!(api["verdict"], "ALLOWED", "{api}");
    assert_eq!(api["lookup"], "ANSWERED", "{api}");
    assert_eq!(api["addresses"][0]["address"], API.to_string(), "{api}");
    assert_eq!(api["addresses"][0]["egress"]["verdict"], "ALLOWED", "{api}");
    assert!(
        api["selected_by"][0]
            .as_str()
            .is_some_and(|r| r.contains("x/client-egress egress rule 1")),
        "{api}"
    );
    let hidden = trace("hidden.example.test");
    assert_eq!(hidden["verdict"], "DENIED", "{hidden}");
    assert_eq!(hidden["lookup"], "REFUSED", "{hidden}");
    assert!(hidden["addresses"].as_array().is_some_and(Vec::is_empty));
    let text = s.node.palisade_ok(&[
        "policy",
        "trace",
        "--from",
        &from,
        "--to-fqdn",
        "api.example.test",
        "--port",
        "8080",
    ]);
    assert!(
        text.starts_with(&format!("ALLOWED {from} -> api.example.test on 8080/TCP")),
        "{text}"
    );
    assert!(text.contains(&API.to_string()), "{text}");

    // A restart keeps what was learned: the next connection passes at once, before any
    // new lookup.
    s.node.restart_agent();
    assert!(
        tcp_connects(&s.client.name, API, 8080),
        "allowed after a restart"
    );
    let list = s.node.json(&["fqdn", "list"]);
    assert!(
        list.as_array()
            .unwrap()
            .iter()
            .any(|e| e["name"] == "api.example.test"),
        "{list}"
    );

    // A crash right after an answer was released, before the state file could have it (its
    // writes fail: a directory stands where its temporary file goes): the restarted agent
    // still has the name (the journal), and the connection opened after the lookup goes on.
    let blocker = s.node.dir.join("state").join("state.json.tmp");
    std::fs::create_dir_all(&blocker).unwrap();
    let (name, addr) = cdn(FIRST_CONNECTIONS);
    assert_eq!(resolve(&s, &name, false).addresses, vec![addr]);
    let mut open = OpenConnection::open(&s.client.name, addr, 8080)
        .unwrap_or_else(|| panic!("connects after the lookup:\n{}", dump(&s)));
    s.node.kill_agent();
    std::fs::remove_dir_all(&blocker).unwrap();
    s.node.start_agent();
    assert!(
        open.round_trip(),
        "the connection goes on after the crash:\n{}",
        dump(&s)
    );
    assert!(
        tcp_connects(&s.client.name, addr, 8080),
        "new connections pass too"
    );
    let list = s.node.json(&["fqdn", "list"]);
    assert!(
        list.as_array()
            .unwrap()
            .iter()
            .any(|e| e["name"] == name.as_str()),
        "{list}"
    );
}

/// A burst of 1,000 lookups a second of names never seen before, each followed at once by a
/// connection to the address it returned: every lookup is answered and no first connection is
/// dropped (counted). How fast the burst runs is the benchmark's to say (`cargo xtask bench
/// dns`), not this test's.
#[test]
fn a_burst_of_a_thousand_lookups_a_second_drops_no_first_connection() {
    const BURST: usize = 1_000;
    let node = Node::start_with("dns-burst", &[]);
    let client = node.add_endpoint("client", "x", "app=client");
    let dns_ep = node.add_endpoint("dns", "kube-system", "k8s-app=kube-dns");
    let world_ns = dns::world_with(&node, &["198.18.0.0/16"]);
    let _server = tcp_server(&world_ns, 8080);
    let names: Vec<(String, Ipv4Addr)> = (0..BURST)
        .map(|i| {
            let (hi, lo) = (
                u8::try_from(i / 250).unwrap(),
                u8::try_from(i % 250 + 1).unwrap(),
            );
            (
                format!("b{i}.cdn.example.test"),
                Ipv4Addr::new(198, 18, hi, lo),
            )
        })
        .collect();
    let records: Vec<(&str, Ipv4Addr)> = names.iter().map(|(n, a)| (n.as_str(), *a)).collect();
    let _resolver = resolver(&dns_ep.name, dns_ep.ip, 300, &records, &node.dir);
    node.apply(CLIENT_POLICY);

    let burst = dns::paced_burst(&client.name, dns_ep.ip, &names, 1_000, 4, 8080);
    let seen = format!(
        "{} answered in {:.2} s, {} first connections dropped",
        burst.answered, burst.seconds, burst.first_connections_dropped
    );
    assert_eq!(burst.answered, BURST, "every lookup answered: {seen}");
    assert_eq!(burst.first_connections_dropped, 0, "{seen}");
    let learned = node.json(&["fqdn", "list"]);
    assert_eq!(
        learned.as_array().map_or(0, Vec::len),
        BURST,
        "every answer learned"
    );
}

#[test]
fn an_expired_answer_is_denied_unless_a_connection_still_uses_it() {
    // TTL 2 s, no minimum: answers expire quickly.
    let s = scene("dns-ttl", &["--fqdn-min-ttl", "0"], 2);
    let (held_name, held) = cdn(1);
    let (free_name, free) = cdn(2);
    assert_eq!(resolve(&s, &held_name, false).addresses, vec![held]);
    assert_eq!(resolve(&s, &free_name, false).addresses, vec![free]);
    let mut open = OpenConnection::open(&s.client.name, held, 8080)
        .unwrap_or_else(|| panic!("connects:\n{}", dump(&s)));
    assert!(tcp_connects(&s.client.name, free, 8080));

    // Without a connection the address goes once its TTL has passed.
    until(
        "the unused address expiring",
        Duration::from_secs(20),
        || !tcp_connects(&s.client.name, free, 8080),
    );
    // The one with an open connection stays, and the connection goes on.
    assert!(open.round_trip(), "the open connection goes on");
    let list = s.node.json(&["fqdn", "list"]);
    let entry = list
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["address"] == held.to_string())
        .unwrap_or_else(|| panic!("{list}"));
    assert_eq!(entry["held_by_connections"], true);

    // Once it closes, the address goes too.
    open.reset();
    until("the held address expiring", Duration::from_secs(20), || {
        !tcp_connects(&s.client.name, held, 8080)
    });
    // And a fresh lookup allows it again.
    assert_eq!(resolve(&s, &held_name, true).addresses, vec![held]);
    assert!(tcp_connects(&s.client.name, held, 8080));
}

/// While learning: every lookup of the client goes through the DNS proxy, no name refused.
const DNS_VISIBILITY: &str = r#"apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: dns-visibility, namespace: x}
spec:
  endpointSelector: {matchLabels: {app: client}}
  egress:
  - toEndpoints:
    - matchLabels: {"k8s:io.kubernetes.pod.namespace": kube-system, k8s-app: kube-dns}
    toPorts:
    - ports: [{port: "53", protocol: ANY}]
      rules:
        dns: [{matchPattern: "*"}]
"#;

#[test]
fn learned_lookups_become_fqdn_and_dns_rules_that_refuse_what_was_never_looked_up() {
    let node = Node::start_with("dns-learn", &[]);
    let client = node.add_endpoint("client", "x", "app=client");
    let dns_ep = node.add_endpoint("dns", "kube-system", "k8s-app=kube-dns");
    let world_ns = world(&node);
    let _server = tcp_server(&world_ns, 8080);
    let _resolver = resolver(
        &dns_ep.name,
        dns_ep.ip,
        300,
        &[("api.example.test", API), ("hidden.example.test", HIDDEN)],
        &node.dir,
    );
    node.palisade_ok(&["namespace", "mode", "x", "discover"]);
    node.apply(DNS_VISIBILITY);

    // Discover: the client resolves a name through the agent and connects to its answer.
    let r = query(&client.name, dns_ep.ip, "api.example.test", false)
        .unwrap_or_else(|| panic!("no answer:\n{}", node.agent_log()));
    assert_eq!(r.addresses, vec![API]);
    assert!(
        tcp_connects(&client.name, API, 8080),
        "discover lets it through"
    );

    let mut yaml = String::new();
    until(
        "the suggestion names the lookup",
        Duration::from_secs(10),
        || {
            yaml = node.palisade_ok(&["policy", "suggest", "--namespace", "x"]);
            yaml.contains("toFQDNs") && yaml.contains("rules:\n        dns:")
        },
    );
    assert!(
        yaml.contains("- toFQDNs:\n    - matchName: \"api.example.test\"\n"),
        "{yaml}"
    );
    assert!(
        !yaml.contains("192.0.2.10/32"),
        "by name, not address:\n{yaml}"
    );
    assert!(yaml.contains("protocol: ANY"), "{yaml}");
    assert!(
        yaml.contains("dns:\n        - matchName: \"api.example.test\"\n"),
        "{yaml}"
    );
    assert_eq!(
        yaml,
        node.palisade_ok(&["policy", "suggest", "--namespace", "x"]),
        "stable"
    );

    // Protect with the suggestion alone.
    node.palisade_ok(&["policy", "delete", "dns-visibility", "--namespace", "x"]);
    node.apply(&yaml);
    node.palisade_ok(&["namespace", "mode", "x", "protect"]);

    let r = query(&client.name, dns_ep.ip, "api.example.test", false)
        .unwrap_or_else(|| panic!("no answer:\n{}", node.agent_log()));
    assert_eq!(
        (r.rcode.as_str(), r.addresses.as_slice()),
        ("NoError", &[API][..])
    );
    assert!(
        tcp_connects(&client.name, API, 8080),
        "the learned name still works:\n{yaml}"
    );
    let r = query(&client.name, dns_ep.ip, "hidden.example.test", false)
        .unwrap_or_else(|| panic!("no answer:\n{}", node.agent_log()));
    assert_eq!(r.rcode, "Refused", "never looked up while learning");
    assert!(r.addresses.is_empty());
    assert!(
        !tcp_connects(&client.name, HIDDEN, 8080),
        "and its address dropped"
    );
}
