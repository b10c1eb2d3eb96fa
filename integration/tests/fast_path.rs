//! The fast path between endpoints of one node (`bpf_redirect_peer` after both verdicts): it
//! carries traffic the node itself could not route, never past the destination's ingress
//! policy, and `--no-fast-path` turns it off.
//!
//! The node's IPv4 forwarding is switched off in these tests: the node's own path then
//! delivers nothing between endpoints, so what arrives came by the fast path.

use palisade_integration::Node;
use palisade_integration::traffic::{OpenConnection, ping, tcp_connects, tcp_server};

fn forwarding(node: &Node, on: bool) {
    let value = format!("net.ipv4.ip_forward={}", u8::from(on));
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", &node.netns, "sysctl", "-qw", &value])
        .output()
        .expect("sysctl");
    assert!(out.status.success(), "{out:?}");
}

/// A NetworkPolicy selecting the server for ingress, with these rules (`[]`: none).
fn server_ingress(rules: &str) -> String {
    format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: fp, namespace: x}}\nspec:\n  podSelector: {{matchLabels: {{app: server}}}}\n  policyTypes: [Ingress]\n  ingress:{rules}"
    )
}

#[test]
fn fast_path_delivers_past_the_node_and_the_destination_ingress_policy_still_applies() {
    let node = Node::start("fast-path");
    let client = node.add_endpoint("client", "x", "app=client");
    let server = node.add_endpoint("server", "x", "app=server");
    let other = node.add_endpoint("other", "x", "app=other");
    let _srv = tcp_server(&server.name, 80);
    forwarding(&node, false);

    assert!(
        tcp_connects(&client.name, server.ip, 80),
        "the fast path carries TCP the node cannot forward"
    );
    assert!(ping(&client.name, server.ip), "and ICMP");
    let mut open = OpenConnection::open(&client.name, server.ip, 80).expect("connection");
    assert!(open.round_trip());

    // The destination's ingress policy: the client allowed, anyone else dropped at the
    // server's ingress, in the source's program, and reported as the server's drop.
    node.apply(&server_ingress(
        "\n  - from: [{podSelector: {matchLabels: {app: client}}}]\n    ports: [{port: 80, protocol: TCP}]\n",
    ));
    assert!(tcp_connects(&client.name, server.ip, 80), "allowed peer");
    assert!(!tcp_connects(&other.name, server.ip, 80), "denied peer");
    assert!(!ping(&client.name, server.ip), "ICMP is not allowed");
    let drops = node.flows(&["--verdict", "DROPPED", "--to-pod", &server.qualified()]);
    assert!(
        drops.iter().any(|f| f["drop_reason"] == "Policy denied"
            && f["source"]["name"] == other.name.as_str()
            && f["direction"] == "ingress"),
        "{drops:?}"
    );
    // The connection opened before the policy is still allowed: revalidated, it lives on.
    assert!(
        open.round_trip(),
        "an allowed established connection lives on: {:?}",
        node.flows(&["--last", "10"])
    );

    // Deny everyone: the established connection stops on its next packet (revalidation).
    node.apply(&server_ingress(" []\n"));
    assert!(!tcp_connects(&client.name, server.ip, 80), "ingress deny");
    assert!(
        !open.round_trip(),
        "the established connection stops once policy denies it"
    );
    let stopped = node.flows(&["--to-pod", &server.qualified()]);
    assert!(
        stopped
            .iter()
            .any(|f| f["event"] == "revalidation-drop" && f["direction"] == "ingress"),
        "{stopped:?}"
    );
}

#[test]
fn no_fast_path_leaves_delivery_to_the_node() {
    let node = Node::start_with("no-fast-path", &["--no-fast-path"]);
    let client = node.add_endpoint("client", "x", "app=client");
    let server = node.add_endpoint("server", "x", "app=server");
    let _srv = tcp_server(&server.name, 80);
    assert!(
        tcp_connects(&client.name, server.ip, 80),
        "routed by the node"
    );
    forwarding(&node, false);
    assert!(
        !tcp_connects(&client.name, server.ip, 80),
        "without the fast path, a node that does not forward delivers nothing"
    );
}
