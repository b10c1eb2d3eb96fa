//! palisade-cni executed exactly as a runtime executes it (a clean environment of `CNI_*`
//! variables, the configuration on stdin, real network namespaces made by the test, the real
//! agent and Debian's reference plugins): every verb standalone with host-local and chained
//! after bridge and after ptp, results checked against each supported version's shape, the
//! bad-input cases of the issue, the agent down and restarted.

use std::net::Ipv4Addr;

use palisade_integration::Node;
use palisade_integration::cni::{Container, with_prev_result};
use palisade_integration::http::{backend, get};
use palisade_integration::traffic::{tcp_connects, tcp_server};
use serde::Deserialize;
use serde_json::{Value, json};

/// The result shapes of the supported versions, unknown fields refused: what a runtime
/// decoding with libcni's types for that version accepts.
#[expect(
    dead_code,
    reason = "the fields that are not checked are there so that the shape accepts them"
)]
mod shape {
    use serde::Deserialize;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Interface {
        pub name: String,
        #[serde(default)]
        pub mac: Option<String>,
        #[serde(default)]
        pub mtu: Option<u32>,
        #[serde(default)]
        pub sandbox: Option<String>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Route {
        pub dst: String,
        #[serde(default)]
        pub gw: Option<String>,
    }

    #[derive(Debug, Default, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Ip040 {
        pub version: String,
        pub address: String,
        #[serde(default)]
        pub gateway: Option<String>,
        #[serde(default)]
        pub interface: Option<usize>,
    }

    #[derive(Debug, Default, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Ip1 {
        pub address: String,
        #[serde(default)]
        pub gateway: Option<String>,
        #[serde(default)]
        pub interface: Option<usize>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields, rename_all = "camelCase")]
    pub struct Result<Ip> {
        pub cni_version: String,
        #[serde(default)]
        pub interfaces: Vec<Interface>,
        #[serde(default)]
        pub ips: Vec<Ip>,
        #[serde(default)]
        pub routes: Vec<Route>,
        #[serde(default)]
        pub dns: serde_json::Value,
    }
}

/// Checks an ADD result against the shape of `version` and what it must say about the
/// container; returns the container's address.
fn check_result(version: &str, v: &Value, c: &Container) -> Ipv4Addr {
    /// An address, the index of its interface, its gateway.
    type Addr = (String, Option<usize>, Option<String>);
    let (cni_version, interfaces, addrs): (String, Vec<shape::Interface>, Vec<Addr>) =
        if version == "0.4.0" {
            let r: shape::Result<shape::Ip040> = serde_json::from_value(v.clone())
                .unwrap_or_else(|e| panic!("not a 0.4.0 result ({e}): {v}"));
            assert!(r.ips.iter().all(|ip| ip.version == "4"), "{v}");
            (
                r.cni_version,
                r.interfaces,
                r.ips
                    .into_iter()
                    .map(|i| (i.address, i.interface, i.gateway))
                    .collect(),
            )
        } else {
            let r: shape::Result<shape::Ip1> = serde_json::from_value(v.clone())
                .unwrap_or_else(|e| panic!("not a {version} result ({e}): {v}"));
            (
                r.cni_version,
                r.interfaces,
                r.ips
                    .into_iter()
                    .map(|i| (i.address, i.interface, i.gateway))
                    .collect(),
            )
        };
    assert_eq!(cni_version, version, "{v}");
    let sandbox = c.path.display().to_string();
    let container_if = interfaces
        .iter()
        .position(|i| i.sandbox.as_deref() == Some(sandbox.as_str()) && i.name == "eth0")
        .unwrap_or_else(|| panic!("no eth0 in {sandbox}: {v}"));
    for i in &interfaces {
        let mac = i.mac.as_deref().unwrap_or_default();
        assert!(
            mac.len() == 17 && mac.split(':').all(|b| u8::from_str_radix(b, 16).is_ok()),
            "bad mac {mac:?}"
        );
    }
    let (address, interface, gateway) = addrs.first().cloned().expect("an address");
    assert_eq!(
        interface,
        Some(container_if),
        "the address is on the container's interface"
    );
    assert_eq!(gateway.as_deref(), Some("169.254.1.1"));
    let (ip, len) = address.split_once('/').expect("CIDR");
    assert_eq!(len, "32");
    ip.parse().expect("an IPv4 address")
}

fn labelled(config: &Value, labels: &[(&str, &str)]) -> Value {
    let mut c = config.clone();
    c["args"] = json!({"cni": {"labels": labels.iter().map(|(k, v)| json!({"key": k, "value": v})).collect::<Vec<_>>()}});
    c
}

const WEB_FROM_CLIENTS: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: web, namespace: shop}\nspec:\n  podSelector: {matchLabels: {app: web}}\n  ingress:\n  - from:\n    - podSelector: {matchLabels: {app: client}}\n    ports: [{port: 80}]\n";

const WEB_HTTP_FROM_CLIENTS: &str = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: web-http, namespace: shop}\nspec:\n  endpointSelector: {matchLabels: {app: web}}\n  ingress:\n  - fromEndpoints: [{matchLabels: {app: client}}]\n    toPorts:\n    - ports: [{port: \"8080\", protocol: TCP}]\n      rules:\n        http: [{method: GET, path: \"/public/.*\"}]\n";

#[derive(Deserialize)]
struct EndpointRow {
    name: String,
    namespace: String,
    identity: u32,
    container_id: Option<String>,
}

fn endpoints(node: &Node) -> Vec<EndpointRow> {
    serde_json::from_value(node.json(&["endpoint", "list"])).expect("endpoint list")
}

#[test]
fn every_verb_standalone_with_host_local_and_policy_between_containers() {
    let node = Node::start("cni-verbs");
    let base = node.cni_config("1.0.0");
    let version = node.run_plugin(
        "palisade-cni",
        "VERSION",
        None,
        "",
        &json!({"cniVersion": "1.0.0"}),
        &[],
    );
    let v = version.ok();
    assert_eq!(v["supportedVersions"], json!(["0.4.0", "1.0.0", "1.1.0"]));

    let web = node.container("web");
    let client = node.container("client");
    let other = node.container("other");
    let shop = |app: &str| labelled(&base, &[("app", app), ("palisade.io/namespace", "shop")]);
    let web_ip = check_result("1.0.0", &node.cni("ADD", &web, &shop("web")).ok(), &web);
    let client_ip = check_result(
        "1.0.0",
        &node.cni("ADD", &client, &shop("client")).ok(),
        &client,
    );
    check_result(
        "1.0.0",
        &node.cni("ADD", &other, &shop("other")).ok(),
        &other,
    );
    assert_ne!(web_ip, client_ip);
    let eps = endpoints(&node);
    assert_eq!(eps.len(), 3);
    assert!(
        eps.iter()
            .all(|e| e.namespace == "shop" && e.container_id.is_some() && e.identity >= 256)
    );

    let _srv = tcp_server(&web.netns, 80);
    assert!(tcp_connects(&other.netns, web_ip, 80), "no policy yet");
    node.apply(WEB_FROM_CLIENTS);
    assert!(
        tcp_connects(&client.netns, web_ip, 80),
        "clients may reach the web container"
    );
    assert!(!tcp_connects(&other.netns, web_ip, 80), "others may not");
    let flows = node.flows(&["--verdict", "DROPPED", "--to-port", "80"]);
    assert!(
        flows.iter().any(|f| f["destination"]["name"] == "web"
            && f["destination"]["namespace"] == "shop"
            && f["source"]["name"] == "other"),
        "the drop names the containers: {flows:?}"
    );

    // CHECK and STATUS agree; DEL twice; the container's veth and address are gone.
    let prev = json!({"cniVersion": "1.0.0", "ips": [{"address": format!("{web_ip}/32"), "interface": 1}],
        "interfaces": [{"name": "x"}, {"name": "eth0", "sandbox": web.path}]});
    node.cni("CHECK", &web, &with_prev_result(&shop("web"), &prev))
        .ok();
    let mut status = base.clone();
    status["cniVersion"] = json!("1.1.0");
    node.run_plugin("palisade-cni", "STATUS", None, "", &status, &[])
        .ok();
    let links_before = node.node_links().len();
    node.cni("DEL", &web, &with_prev_result(&shop("web"), &prev))
        .ok();
    node.cni("DEL", &web, &with_prev_result(&shop("web"), &prev))
        .ok();
    assert_eq!(
        node.node_links().len(),
        links_before - 1,
        "the host side went"
    );
    assert!(!endpoints(&node).iter().any(|e| e.name == "web"));
}

#[test]
fn results_have_the_shape_of_each_supported_version() {
    let node = Node::start("cni-versions");
    for (i, version) in ["0.4.0", "1.0.0", "1.1.0"].into_iter().enumerate() {
        let c = node.container(&format!("v{i}"));
        let config = labelled(&node.cni_config(version), &[("app", "x")]);
        let result = node.cni("ADD", &c, &config).ok();
        check_result(version, &result, &c);
        node.cni("DEL", &c, &with_prev_result(&config, &result))
            .ok();
    }
    let bad = node.cni("ADD", &node.container("v9"), &node.cni_config("9.9.9"));
    let (code, details) = bad.err();
    assert_eq!(code, 1, "{details}");
    assert!(details.contains("9.9.9"), "{details}");
}

/// A reference plugin's configuration, as the runtime gives it to the first plugin of a list.
fn reference_config(node: &Node, plugin: &str, subnet: &str) -> Value {
    let mut c = json!({
        "cniVersion": "1.0.0",
        "name": format!("chain-{}", node.tag),
        "type": plugin,
        "ipam": {"type": "host-local", "subnet": subnet, "dataDir": node.dir.join(format!("ipam-{plugin}"))},
    });
    if plugin == "bridge" {
        c["bridge"] = json!(format!("{}br", node.tag));
        c["isGateway"] = json!(true);
    }
    c
}

/// palisade-cni's part of the same list: the list's version and name, its own keys, and the
/// previous plugin's result.
fn chained_config(node: &Node, prev: &Value, app: &str) -> Value {
    let c = json!({
        "cniVersion": "1.0.0",
        "name": format!("chain-{}", node.tag),
        "type": "palisade-cni",
        "api": node.api,
        "prevResult": prev,
    });
    labelled(&c, &[("app", app), ("palisade.io/namespace", "shop")])
}

/// Sets `net.bridge.bridge-nf-call-iptables` in a namespace; false when this kernel has no
/// bridge netfilter (then nothing calls iptables on bridged frames anyway).
fn set_bridge_nf_call_iptables(netns: &str, value: &str) -> bool {
    std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            netns,
            "sysctl",
            "-q",
            "-w",
            &format!("net.bridge.bridge-nf-call-iptables={value}"),
        ])
        .output()
        .is_ok_and(|o| o.status.success())
}

#[test]
fn chained_after_bridge_and_after_ptp_palisade_judges_the_previous_plugins_veth() {
    let node = Node::start("cni-chain");
    for (plugin, subnet) in [("bridge", "10.90.0.0/24"), ("ptp", "10.91.0.0/24")] {
        let web = node.container(&format!("{plugin}w"));
        let client = node.container(&format!("{plugin}c"));
        let other = node.container(&format!("{plugin}o"));
        let first = reference_config(&node, plugin, subnet);
        let mut ips = Vec::new();
        for (c, app) in [(&web, "web"), (&client, "client"), (&other, "other")] {
            let prev = node
                .run_plugin(plugin, "ADD", Some(c), "eth0", &first, &[])
                .ok();
            let out = node
                .run_plugin(
                    "palisade-cni",
                    "ADD",
                    Some(c),
                    "eth0",
                    &chained_config(&node, &prev, app),
                    &[],
                )
                .ok();
            assert_eq!(
                out["ips"], prev["ips"],
                "{plugin}: the previous result passes through"
            );
            assert_eq!(out["interfaces"], prev["interfaces"]);
            let ip: Ipv4Addr = prev["ips"][0]["address"]
                .as_str()
                .and_then(|a| a.split('/').next())
                .and_then(|a| a.parse().ok())
                .expect("address");
            ips.push((c, prev, ip));
        }
        let web_ip = ips[0].2;
        let _srv = tcp_server(&web.netns, 80);
        node.apply(WEB_FROM_CLIENTS);
        assert!(
            tcp_connects(&client.netns, web_ip, 80),
            "{plugin}: client allowed"
        );
        assert!(
            !tcp_connects(&other.netns, web_ip, 80),
            "{plugin}: other denied"
        );
        // HTTP rules: the previous plugin's veth redirects to the proxy as palisade's own does
        // (a bridge port's frames go to the node's stack, not switched past it), with bridge
        // netfilter calling iptables on bridged frames (as Kubernetes nodes have it) and not.
        let _http = backend(&web.netns, 8080);
        node.apply(WEB_HTTP_FROM_CLIENTS);
        let status =
            |path: &str| get(&client.netns, web_ip, 8080, path, "").map_or(0, |r| r.status);
        for bridge_nf in ["1", "0"] {
            let set = set_bridge_nf_call_iptables(&node.netns, bridge_nf);
            if !set && bridge_nf == "0" {
                break;
            }
            let how = format!("{plugin} (bridge-nf-call-iptables {bridge_nf}, set: {set})");
            assert_eq!(status("/public/a"), 200, "{how}: an allowed request");
            assert_eq!(status("/secret"), 403, "{how}: a denied request");
        }
        let http = node.flows(&["--protocol", "http", "--to-port", "8080"]);
        assert!(
            http.iter()
                .any(|f| f["source"]["name"] == format!("{plugin}c") && f["verdict"] == "DROPPED"),
            "{plugin}: the proxy judged the client: {http:?}"
        );
        let _ = node.palisade(&["policy", "delete", "web-http", "--namespace", "shop"]);
        // CHECK sees the attachment whole; DEL as the runtime runs it, last plugin first.
        for (c, prev, _) in &ips {
            let conf = chained_config(&node, prev, "x");
            node.run_plugin("palisade-cni", "CHECK", Some(c), "eth0", &conf, &[])
                .ok();
            node.run_plugin("palisade-cni", "DEL", Some(c), "eth0", &conf, &[])
                .ok();
            node.run_plugin(
                plugin,
                "DEL",
                Some(c),
                "eth0",
                &with_prev_result(&first, prev),
                &[],
            )
            .ok();
        }
        let _ = node.palisade(&["policy", "delete", "web", "--namespace", "shop"]);
        assert!(
            endpoints(&node).is_empty(),
            "{plugin}: every attachment removed"
        );
    }
}

#[test]
fn bad_input_gets_the_specs_error_names_the_problem_and_leaves_nothing() {
    let node = Node::start("cni-bad");
    let config = labelled(&node.cni_config("1.0.0"), &[("app", "x")]);
    let good = node.container("good");
    let good_result = node.cni("ADD", &good, &config).ok();
    let links = node.node_links();
    let c = node.container("bad");
    let err = |env: &[(&str, &str)], conf: &Value| {
        node.run_plugin("palisade-cni", "ADD", Some(&c), "eth0", conf, env)
            .err()
    };
    for var in ["CNI_COMMAND", "CNI_NETNS", "CNI_IFNAME", "CNI_CONTAINERID"] {
        let (code, details) = err(&[(var, "")], &config);
        assert_eq!(code, 4, "{var}: {details}");
        assert!(details.contains(var), "{var}: {details}");
    }
    let malformed = node.run_plugin(
        "palisade-cni",
        "ADD",
        Some(&c),
        "eth0",
        &json!("{not json"),
        &[],
    );
    let (code, _) = malformed.err();
    assert_eq!(code, 6);
    let mut no_ipam = config.clone();
    no_ipam["ipam"]["type"] = json!("no-such-ipam");
    let (code, details) = err(&[], &no_ipam);
    assert!(
        code >= 100 && details.contains("no-such-ipam") && details.contains("CNI_PATH"),
        "{details}"
    );
    let not_ns = node.dir.join("not-a-netns");
    std::fs::write(&not_ns, "").expect("file");
    let (code, details) = err(&[("CNI_NETNS", not_ns.to_str().expect("path"))], &config);
    assert_eq!(code, 4, "{details}");
    assert!(details.contains("is not a network namespace"), "{details}");
    let taken = std::process::Command::new("ip")
        .args([
            "-n", &c.netns, "link", "add", "eth0", "type", "veth", "peer", "name", "x0",
        ])
        .status()
        .expect("ip");
    assert!(taken.success());
    let (code, details) = err(&[], &config);
    assert_eq!(code, 101, "{details}");
    assert!(details.contains("eth0 already exists"), "{details}");
    // The same container and interface twice: refused, and the first attachment intact.
    let again = node.cni("ADD", &good, &config);
    let (_, details) = again.err();
    assert!(details.contains("already has an attachment"), "{details}");
    node.cni("CHECK", &good, &with_prev_result(&config, &good_result))
        .ok();
    assert_eq!(node.node_links(), links, "no veth left behind");
    assert_eq!(endpoints(&node).len(), 1, "no other endpoint changed");
}

#[test]
fn the_agent_down_at_add_fails_the_container_and_a_restarted_agent_keeps_attachments() {
    let node = Node::start("cni-agent");
    let config = labelled(&node.cni_config("1.1.0"), &[("app", "x")]);
    let c = node.container("c");
    node.stop_agent();
    let links = node.node_links();
    let (code, details) = node.cni("ADD", &c, &config).err();
    assert_eq!(code, 11, "{details}");
    assert!(details.contains("not running"), "{details}");
    assert_eq!(
        node.node_links(),
        links,
        "nothing made for a container the agent cannot enforce"
    );
    let (code, _) = node
        .run_plugin("palisade-cni", "STATUS", None, "", &config, &[])
        .err();
    assert_eq!(code, 50);
    let ipam_dir = node.dir.join("ipam");
    let allocated = std::fs::read_dir(&ipam_dir).map_or(0, |d| {
        d.flatten()
            .flat_map(|net| {
                std::fs::read_dir(net.path())
                    .into_iter()
                    .flatten()
                    .flatten()
            })
            .filter(|f| f.file_name().to_string_lossy().starts_with("10."))
            .count()
    });
    assert_eq!(allocated, 0, "no address taken");

    node.start_agent();
    let result = node.cni("ADD", &c, &config).ok();
    node.restart_agent();
    let eps = endpoints(&node);
    assert_eq!(eps.len(), 1, "the restarted agent kept the attachment");
    node.cni("CHECK", &c, &with_prev_result(&config, &result))
        .ok();
    node.cni("DEL", &c, &with_prev_result(&config, &result))
        .ok();
    assert!(endpoints(&node).is_empty());
}

#[test]
fn gc_removes_what_the_runtime_no_longer_has_and_check_says_what_is_missing() {
    let node = Node::start("cni-gc");
    let config = labelled(&node.cni_config("1.1.0"), &[("app", "x")]);
    let cs: Vec<Container> = ["a", "b", "c"].iter().map(|n| node.container(n)).collect();
    let results: Vec<Value> = cs
        .iter()
        .map(|c| node.cni("ADD", c, &config).ok())
        .collect();
    let mut gc = config.clone();
    gc["cni.dev/valid-attachments"] = json!([{"containerID": cs[1].id, "ifname": "eth0"}]);
    node.run_plugin("palisade-cni", "GC", None, "", &gc, &[])
        .ok();
    let eps = endpoints(&node);
    assert_eq!(eps.len(), 1, "only the valid attachment remains");
    assert_eq!(eps[0].container_id.as_deref(), Some(cs[1].id.as_str()));

    // CHECK when the host side of the veth is gone.
    let host = results[1]["interfaces"][0]["name"]
        .as_str()
        .expect("host interface")
        .to_string();
    let del = std::process::Command::new("ip")
        .args(["-n", &node.netns, "link", "del", &host])
        .status()
        .expect("ip");
    assert!(del.success());
    let (code, details) = node
        .cni("CHECK", &cs[1], &with_prev_result(&config, &results[1]))
        .err();
    assert!(code >= 100, "{details}");
    assert!(
        details.contains(&host) && details.contains("is gone"),
        "{details}"
    );
}

/// The network `cargo xtask install-cni` installs (and the DaemonSet's init container) attaches
/// a container as it is, the agent's socket and the address directory aside.
#[test]
fn the_example_network_attaches_a_container() {
    let node = Node::start("cni-example");
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../controller/cni/conf/50-palisade.conflist");
    let list: Value = serde_json::from_str(&std::fs::read_to_string(&path).expect("conflist"))
        .expect("the example is JSON");
    assert_eq!(list["name"], "palisade");
    let mut conf = list["plugins"][0].clone();
    assert_eq!(conf["type"], "palisade-cni");
    assert_eq!(
        conf["api"], "/run/palisade/agent.sock",
        "the agent's default socket"
    );
    // As a runtime does: the list's version and name into the plugin's configuration.
    conf["cniVersion"] = list["cniVersion"].clone();
    conf["name"] = list["name"].clone();
    conf["api"] = json!(node.api);
    conf["ipam"]["dataDir"] = json!(node.dir.join("ipam-example"));
    let c = node.container("ex");
    let ip = check_result("1.0.0", &node.cni("ADD", &c, &conf).ok(), &c);
    assert!(
        ipnetwork::Ipv4Network::new(Ipv4Addr::new(10, 201, 0, 0), 16)
            .expect("net")
            .contains(ip),
        "{ip}"
    );
    assert_eq!(endpoints(&node).len(), 1);
    node.cni("DEL", &c, &conf).ok();
    assert!(endpoints(&node).is_empty());
}
