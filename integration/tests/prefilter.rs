//! The XDP prefilter end to end: a "host-facing" veth from the node namespace into a
//! namespace standing for the outside world, the agent's prefilter on it, real packets from
//! denied and allowed source addresses, the counters, `palisade observe`, /metrics, a restart,
//! and the endpoints' own traffic untouched by a CIDR that covers their subnet.

use std::io::{Read as _, Write as _};
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use palisade_integration::node::{bin_dir, ip};
use palisade_integration::traffic::{self, tcp_connects, tcp_server, udp_server};
use palisade_integration::{Endpoint, Node};
use serde_json::Value;

/// The outside's addresses: one the test denies, one it never does.
const DENIED_SRC: Ipv4Addr = Ipv4Addr::new(192, 168, 77, 2);
const ALLOWED_SRC: Ipv4Addr = Ipv4Addr::new(192, 168, 88, 2);
const DENIED_CIDR: &str = "192.168.77.0/24";
/// The endpoints' subnet (the agent's default pod CIDR), denied on the host device from the
/// prefilter file.
const ENDPOINT_CIDR: &str = "10.200.0.0/16";
const METRICS_PORT: u16 = 9964;

fn run_ok(args: &[&str]) {
    let out = ip(args);
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `ext0` in the node namespace, `eth0` in `outside`, with both outside addresses routed.
fn outside_world(node: &Node) -> String {
    let outside = node.name("out");
    node.track_netns(&outside);
    run_ok(&["netns", "add", &outside]);
    let n = node.netns.as_str();
    run_ok(&[
        "-n", n, "link", "add", "ext0", "type", "veth", "peer", "name", "eth0", "netns", &outside,
    ]);
    for a in ["192.168.77.1/24", "192.168.88.1/24"] {
        run_ok(&["-n", n, "addr", "add", a, "dev", "ext0"]);
    }
    run_ok(&["-n", n, "link", "set", "ext0", "up"]);
    for a in ["192.168.77.2/24", "192.168.88.2/24"] {
        run_ok(&["-n", &outside, "addr", "add", a, "dev", "eth0"]);
    }
    run_ok(&["-n", &outside, "link", "set", "eth0", "up"]);
    run_ok(&["-n", &outside, "link", "set", "lo", "up"]);
    run_ok(&[
        "-n",
        &outside,
        "route",
        "add",
        ENDPOINT_CIDR,
        "via",
        "192.168.77.1",
        "dev",
        "eth0",
    ]);
    outside
}

/// A UDP datagram from `src` (an address of `netns`) to `dst:port`; true when the answer
/// came back.
fn udp_from(netns: &str, src: Ipv4Addr, dst: Ipv4Addr, port: u16) -> bool {
    traffic::in_netns(netns, move || {
        let s = UdpSocket::bind((src, 0)).expect("bind");
        s.set_read_timeout(Some(Duration::from_millis(700)))
            .unwrap();
        let mut buf = [0u8; 16];
        // A few tries: the first datagram may wait for ARP.
        (0..3).any(|_| {
            s.send_to(b"ping", SocketAddr::from((dst, port))).is_ok() && s.recv(&mut buf).is_ok()
        })
    })
}

/// A UDP/IPv4 packet from `src` to `dst:port`, header and all (for addresses the sender does
/// not own).
fn udp_packet(src: Ipv4Addr, dst: Ipv4Addr, port: u16) -> Vec<u8> {
    let payload = b"spoofed";
    let total = u16::try_from(20 + 8 + payload.len()).unwrap();
    let mut p = vec![0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, 17, 0, 0];
    p[2..4].copy_from_slice(&total.to_be_bytes());
    p.extend(src.octets());
    p.extend(dst.octets());
    p.extend(40_000u16.to_be_bytes());
    p.extend(port.to_be_bytes());
    p.extend((total - 20).to_be_bytes());
    p.extend([0, 0]);
    p.extend(payload);
    p
}

fn prefilter_list(node: &Node) -> Value {
    node.json(&["prefilter", "list"])
}

fn entry(list: &Value, cidr: &str) -> Option<Value> {
    list["entries"]
        .as_array()?
        .iter()
        .find(|e| e["cidr"] == cidr)
        .cloned()
}

fn dropped(node: &Node, cidr: &str) -> u64 {
    entry(&prefilter_list(node), cidr).map_or(0, |e| e["packets"].as_u64().unwrap_or(0))
}

fn http_get(netns: &str, port: u16, path: &str) -> String {
    let path = path.to_string();
    traffic::in_netns(netns, move || {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect metrics");
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").unwrap();
        let mut resp = String::new();
        s.read_to_string(&mut resp).unwrap();
        resp
    })
}

struct Scene {
    node: Node,
    outside: String,
    a: Endpoint,
    b: Endpoint,
    _servers: Vec<traffic::Server>,
}

fn scene(test: &str) -> Scene {
    let node = Node::prepare(test, &[]);
    let file = node.dir.join("prefilter.txt");
    std::fs::write(
        &file,
        format!("# the endpoints' own subnet\n{ENDPOINT_CIDR}\n"),
    )
    .unwrap();
    let outside = outside_world(&node);
    let mut node = node;
    node.set_agent_args(&[
        "--prefilter-device".into(),
        "ext0".into(),
        "--prefilter-file".into(),
        file.display().to_string(),
        "--metrics-addr".into(),
        format!("127.0.0.1:{METRICS_PORT}"),
    ]);
    node.start_agent();
    let a = node.add_endpoint("a", "x", "app=a");
    let b = node.add_endpoint("b", "x", "app=b");
    let servers = vec![
        udp_server(&a.name, 5353),
        tcp_server(&b.name, 8080),
        tcp_server(&outside, 9090),
    ];
    Scene {
        node,
        outside,
        a,
        b,
        _servers: servers,
    }
}

#[test]
fn denied_sources_drop_at_xdp_counted_observed_and_back_on_delete() {
    let s = scene("prefilter");
    let node = &s.node;
    let list = prefilter_list(node);
    let devices = list["devices"].as_array().expect("devices");
    assert_eq!(devices.len(), 1, "{list}");
    assert_eq!(devices[0]["name"], "ext0");
    assert!(
        devices[0]["mode"] == "native" || devices[0]["mode"] == "generic",
        "{list}"
    );
    assert_eq!(
        entry(&list, ENDPOINT_CIDR).expect("file entry")["sources"],
        serde_json::json!(["file"])
    );

    // Before: both outside addresses reach the endpoint.
    assert!(udp_from(&s.outside, DENIED_SRC, s.a.ip, 5353));
    assert!(udp_from(&s.outside, ALLOWED_SRC, s.a.ip, 5353));

    let added = node.json(&["prefilter", "add", DENIED_CIDR]);
    assert_eq!(
        entry(&added, DENIED_CIDR).expect("added")["sources"],
        serde_json::json!(["api"])
    );
    assert!(
        !udp_from(&s.outside, DENIED_SRC, s.a.ip, 5353),
        "denied source still passes"
    );
    assert!(
        udp_from(&s.outside, ALLOWED_SRC, s.a.ip, 5353),
        "allowed source cut"
    );
    let n = dropped(node, DENIED_CIDR);
    assert!(n >= 1, "no drop counted: {}", prefilter_list(node));
    assert_eq!(dropped(node, ENDPOINT_CIDR), 0);

    // Observe shows the drop as a flow with its reason.
    let deadline = Instant::now() + Duration::from_secs(5);
    let flow = loop {
        let flows = node.flows(&["--verdict", "DROPPED", "--last", "50"]);
        if let Some(f) = flows.iter().find(|f| f["event"] == "prefilter-drop") {
            break f.clone();
        }
        assert!(Instant::now() < deadline, "no prefilter flow in {flows:?}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(flow["drop_reason"], "Denied by prefilter");
    assert_eq!(flow["ip"]["source"], DENIED_SRC.to_string());
    assert_eq!(flow["ip"]["destination"], s.a.ip.to_string());
    assert_eq!(flow["l4"]["protocol"], "UDP");
    assert_eq!(flow["l4"]["destination_port"], 5353);

    // And /metrics: per CIDR and among the datapath's drop reasons.
    let text = http_get(&node.netns, METRICS_PORT, "/metrics");
    for needle in [
        format!("palisade_prefilter_dropped_packets_total{{cidr=\"{DENIED_CIDR}\"}}"),
        "palisade_prefilter_device{device=\"ext0\"".to_string(),
        "outcome=\"Denied by prefilter\"".to_string(),
        "# EOF".to_string(),
    ] {
        assert!(text.contains(&needle), "metrics lack {needle}:\n{text}");
    }

    // The endpoints' subnet is denied on ext0, yet their own traffic is untouched: endpoint
    // to endpoint, and an endpoint's connection out with its replies.
    assert!(
        tcp_connects(&s.a.name, s.b.ip, 8080),
        "endpoint to endpoint cut"
    );
    assert!(
        tcp_connects(&s.b.name, ALLOWED_SRC, 9090),
        "endpoint to outside cut"
    );
    assert_eq!(dropped(node, ENDPOINT_CIDR), 0);

    // On the host device, a source in the denied endpoint subnet that is no endpoint is
    // dropped; one that is an endpoint's own address is never the prefilter's to drop.
    traffic::send_raw_ipv4(&s.outside, udp_packet(s.a.ip, s.b.ip, 8081)).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        dropped(node, ENDPOINT_CIDR),
        0,
        "an endpoint's address was dropped"
    );
    let stranger = Ipv4Addr::new(10, 200, 99, 99);
    traffic::send_raw_ipv4(&s.outside, udp_packet(stranger, s.b.ip, 8081)).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while dropped(node, ENDPOINT_CIDR) == 0 {
        assert!(Instant::now() < deadline, "{stranger} was not dropped");
        std::thread::sleep(Duration::from_millis(100));
    }

    // Delete restores the path.
    node.palisade_ok(&["prefilter", "delete", DENIED_CIDR]);
    assert!(entry(&prefilter_list(node), DENIED_CIDR).is_none());
    assert!(
        udp_from(&s.outside, DENIED_SRC, s.a.ip, 5353),
        "delete did not restore"
    );
}

#[test]
fn the_list_outlives_the_agent_and_a_restart_without_a_gap() {
    let s = scene("prefilter-restart");
    let node = &s.node;
    node.palisade_ok(&["prefilter", "add", DENIED_CIDR]);
    assert!(!udp_from(&s.outside, DENIED_SRC, s.a.ip, 5353));
    let before = dropped(node, DENIED_CIDR);

    // Agent stopped: the pinned program and list keep dropping.
    node.stop_agent();
    assert!(
        !udp_from(&s.outside, DENIED_SRC, s.a.ip, 5353),
        "gap while the agent is down"
    );
    assert!(udp_from(&s.outside, ALLOWED_SRC, s.a.ip, 5353));
    node.start_agent();
    assert!(
        !udp_from(&s.outside, DENIED_SRC, s.a.ip, 5353),
        "gap after the restart"
    );
    let list = prefilter_list(node);
    let e = entry(&list, DENIED_CIDR).expect("API entry kept across the restart");
    assert_eq!(e["sources"], serde_json::json!(["api"]));
    assert!(
        e["packets"].as_u64().unwrap_or(0) > before,
        "the counter did not carry on: {list}"
    );
    assert!(entry(&list, ENDPOINT_CIDR).is_some());
    assert_eq!(list["devices"][0]["name"], "ext0");
}

#[test]
fn bad_input_is_refused_naming_it() {
    let s = scene("prefilter-errors");
    let node = &s.node;
    let fail = |args: &[&str]| -> String {
        let out = node.palisade(args);
        assert!(!out.status.success(), "palisade {args:?} succeeded");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let e = fail(&["prefilter", "add", "10.1.0.1/16"]);
    assert!(
        e.contains("\"10.1.0.1/16\" has host bits set; the network is 10.1.0.0/16"),
        "{e}"
    );
    let e = fail(&["prefilter", "add", "192.0.2.0/24", "300.1.1.0/24"]);
    assert!(e.contains("\"300.1.1.0/24\" is not a CIDR"), "{e}");
    assert!(
        entry(&prefilter_list(node), "192.0.2.0/24").is_none(),
        "a refused add changed the list"
    );
    let e = fail(&["prefilter", "delete", "198.51.100.0/24"]);
    assert!(
        e.contains("198.51.100.0/24 is not in the prefilter deny list"),
        "{e}"
    );
    let e = fail(&["prefilter", "delete", ENDPOINT_CIDR]);
    assert!(e.contains("comes from the prefilter file"), "{e}");
    let e = fail(&["prefilter", "add", "2001:db8::/32"]);
    assert!(e.contains("IPv6"), "{e}");

    // An agent told to filter on a device that does not exist does not start, and says why
    // (in a namespace of its own, so it cannot disturb the node's agent).
    let bare = node.name("bare");
    node.track_netns(&bare);
    run_ok(&["netns", "add", &bare]);
    let out = Command::new("timeout")
        .arg("20")
        .arg("nsenter")
        .arg(format!("--net=/run/netns/{bare}"))
        .arg("--")
        .arg(bin_dir().join("palisade-agent"))
        .args(["--local", "--api"])
        .arg(node.dir.join("other.sock"))
        .arg("--state-dir")
        .arg(node.dir.join("other-state"))
        .arg("--bpffs")
        .arg(node.dir.join("other-bpffs"))
        .args(["--prefilter-device", "nosuch0"])
        .stdin(Stdio::null())
        .output()
        .expect("run the agent");
    let _ = nix::mount::umount2(
        &node.dir.join("other-bpffs"),
        nix::mount::MntFlags::MNT_DETACH,
    );
    assert!(!out.status.success());
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(
        e.contains("prefilter device \"nosuch0\": no such interface"),
        "{e}"
    );
}
