//! ICMP through the datapath, with real packets between namespaces: a query passes only with
//! its own reply (by identifier and type), and an ICMP error reaches only the sender of the
//! packet it reports on, from the address that packet went to.

use std::net::Ipv4Addr;

use palisade_integration::Node;
use palisade_integration::traffic::{
    ICMP_ECHO, ICMP_ECHO_REPLY, ICMP_TIMESTAMP, ICMP_TIMESTAMP_REPLY, IcmpCapture, checksum,
    icmp_query, send_raw_ipv4, udp_refused,
};

/// The client takes nothing in: what reaches it must be part of what it started.
const CLIENT_CLOSED: &str = r"apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: client-closed, namespace: x}
spec:
  podSelector: {matchLabels: {app: client}}
  policyTypes: [Ingress]
";

/// The identifier of the queries both sides send.
const ID: u16 = 0x7e57;
/// The client's UDP port.
const CLIENT_PORT: u16 = 40053;

#[test]
fn a_query_passes_only_with_its_own_reply() {
    let node = Node::start("icmp-query");
    let client = node.add_endpoint("client", "x", "app=client");
    let server = node.add_endpoint("server", "x", "app=server");
    node.apply(CLIENT_CLOSED);
    assert!(
        icmp_query(&client.name, server.ip, ICMP_ECHO, ICMP_ECHO_REPLY, ID),
        "the client's echo request is answered"
    );
    assert!(
        icmp_query(
            &client.name,
            server.ip,
            ICMP_TIMESTAMP,
            ICMP_TIMESTAMP_REPLY,
            ID
        ),
        "the client's timestamp request is answered"
    );
    // The server's own requests, with the identifier of the client's: they are requests, not
    // replies, and the client takes none.
    assert!(
        !icmp_query(&server.name, client.ip, ICMP_ECHO, ICMP_ECHO_REPLY, ID),
        "an echo request passed as the reply of the client's"
    );
    assert!(
        !icmp_query(
            &server.name,
            client.ip,
            ICMP_TIMESTAMP,
            ICMP_TIMESTAMP_REPLY,
            ID
        ),
        "a timestamp request passed as part of the client's"
    );
    let drops = node.flows(&[
        "--to-pod",
        &client.qualified(),
        "--verdict",
        "DROPPED",
        "--protocol",
        "icmp",
    ]);
    assert_eq!(drops.len(), 2, "{drops:#?}");
    assert!(
        drops
            .iter()
            .all(|f| f["drop_reason"] == "Policy denied" && f["direction"] == "ingress"),
        "{drops:#?}"
    );
}

/// An IPv4 header (20 bytes, no options) for a packet of `total` bytes.
fn ipv4_header(src: Ipv4Addr, dst: Ipv4Addr, protocol: u8, total: u16) -> Vec<u8> {
    let [t0, t1] = total.to_be_bytes();
    let mut h = vec![0x45, 0, t0, t1, 0x12, 0x34, 0x40, 0, 64, protocol, 0, 0];
    h.extend_from_slice(&src.octets());
    h.extend_from_slice(&dst.octets());
    let c = checksum(&h).to_be_bytes();
    h[10..12].copy_from_slice(&c);
    h
}

/// A destination unreachable (port unreachable) from `src` to `dst`, quoting `inner`.
fn port_unreachable(src: Ipv4Addr, dst: Ipv4Addr, inner: &[u8]) -> Vec<u8> {
    let mut icmp = vec![3, 3, 0, 0, 0, 0, 0, 0];
    icmp.extend_from_slice(inner);
    let c = checksum(&icmp).to_be_bytes();
    icmp[2..4].copy_from_slice(&c);
    let total = u16::try_from(20 + icmp.len()).expect("small");
    let mut p = ipv4_header(src, dst, 1, total);
    p.extend_from_slice(&icmp);
    p
}

/// Captured packets that are destination unreachables, by their source address.
fn unreachables_from(captured: &[Vec<u8>]) -> Vec<Ipv4Addr> {
    captured
        .iter()
        .filter(|p| p.len() >= 28 && p[20] == 3)
        .map(|p| Ipv4Addr::new(p[12], p[13], p[14], p[15]))
        .collect()
}

#[test]
fn icmp_errors_reach_only_the_sender_of_the_packet_they_report_on() {
    let node = Node::start("icmp-errors");
    let client = node.add_endpoint("client", "x", "app=client");
    let server = node.add_endpoint("server", "x", "app=server");
    let bystander = node.add_endpoint("bystander", "x", "app=bystander");
    // The real thing: nothing listens on the server's port 53, and its kernel's port
    // unreachable comes back to the client.
    assert!(
        udp_refused(&client.name, CLIENT_PORT, server.ip, 53),
        "the server's port unreachable reaches the client"
    );
    // The same report, made up inside the server's namespace: the datagram it quotes is the
    // client's, which conntrack knows.
    let mut inner = ipv4_header(client.ip, server.ip, 17, 32);
    let [p0, p1] = CLIENT_PORT.to_be_bytes();
    inner.extend_from_slice(&[p0, p1, 0, 53, 0, 12, 0, 0]);
    let to_bystander = IcmpCapture::start(&bystander.name);
    let to_client = IcmpCapture::start(&client.name);
    // To the bystander, which sent nothing; to the client, from the bystander's address; and
    // as the server's kernel sends it, which passes.
    for packet in [
        port_unreachable(server.ip, bystander.ip, &inner),
        port_unreachable(bystander.ip, client.ip, &inner),
        port_unreachable(server.ip, client.ip, &inner),
    ] {
        send_raw_ipv4(&server.name, packet).expect("raw send");
    }
    let bystander_got = unreachables_from(&to_bystander.finish());
    let client_got = unreachables_from(&to_client.finish());
    assert!(
        bystander_got.is_empty(),
        "the bystander received an error about the client's datagram: {bystander_got:?}"
    );
    assert_eq!(
        client_got,
        vec![server.ip],
        "the client receives the server's error only"
    );
    let drops = node.flows(&["--verdict", "DROPPED"]);
    let reasons: Vec<&str> = drops
        .iter()
        .filter(|f| f["endpoint"]["name"] == server.name.as_str() && f["direction"] == "egress")
        .filter_map(|f| f["drop_reason"].as_str())
        .collect();
    assert!(
        reasons.contains(&"ICMP error does not match its connection")
            && reasons.contains(&"Invalid source ip"),
        "both made-up errors dropped at the server's egress: {drops:#?}"
    );
}
