//! Podman (Debian's 4.3, CNI network backend) attaching containers through palisade-cni:
//! two containers with different labels (`podman run --label`), a policy applied with
//! `palisade policy apply`, allowed and denied traffic between them, flows naming the
//! containers. Podman runs in the test's node namespace, so everything stays inside it; the
//! containers' root filesystem is busybox-static (`podman run --rootfs`, no registry).

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use palisade_integration::Node;
use palisade_integration::node::bin_dir;
use palisade_integration::traffic::{tcp_connects, tcp_server};
use serde_json::Value;

/// Podman configured for the test: its own containers.conf (CNI backend, palisade-cni's
/// directory, the test's network directory) and the containers it started, removed in Drop.
struct Podman {
    node_netns: String,
    conf: PathBuf,
    rootfs: PathBuf,
    network: String,
    containers: Vec<String>,
}

impl Podman {
    fn new(node: &Node) -> Podman {
        let dir = node.dir.join("podman");
        let net_dir = dir.join("net.d");
        std::fs::create_dir_all(&net_dir).expect("podman dirs");
        let network = format!("pal-{}", node.tag);
        let conflist = serde_json::json!({
            "cniVersion": "1.0.0",
            "name": network,
            "plugins": [{
                "type": "palisade-cni",
                "api": node.api,
                "ipam": {"type": "host-local", "subnet": "10.92.0.0/24", "dataDir": dir.join("ipam")},
            }],
        });
        std::fs::write(
            net_dir.join(format!("{network}.conflist")),
            conflist.to_string(),
        )
        .expect("conflist");
        let conf = dir.join("containers.conf");
        // The sandbox caps RLIMIT_NOFILE below podman's default ulimits.
        std::fs::write(
            &conf,
            format!(
                "[containers]\ndefault_ulimits = []\n[network]\nnetwork_backend = \"cni\"\ncni_plugin_dirs = [\"{}\", \"/usr/lib/cni\"]\nnetwork_config_dir = \"{}\"\n",
                bin_dir().display(),
                net_dir.display()
            ),
        )
        .expect("containers.conf");
        let rootfs = dir.join("rootfs");
        std::fs::create_dir_all(rootfs.join("bin")).expect("rootfs");
        std::fs::copy("/bin/busybox", rootfs.join("bin/busybox")).expect("busybox-static");
        for applet in ["sh", "sleep"] {
            let _ = std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(applet));
        }
        Podman {
            node_netns: node.netns.clone(),
            conf,
            rootfs,
            network,
            containers: Vec::new(),
        }
    }

    fn podman(&self, args: &[&str]) -> std::process::Output {
        Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.node_netns))
            .arg("--")
            .arg("podman")
            .args(args)
            .env("CONTAINERS_CONF", &self.conf)
            .output()
            .expect("podman")
    }

    /// `podman run -d` of a sleeping busybox with these labels; its id.
    fn run(&mut self, name: &str, labels: &[&str]) -> String {
        let mut args = vec!["run", "-d", "--name", name, "--network", &self.network];
        for l in labels {
            args.extend(["--label", l]);
        }
        let rootfs = self.rootfs.display().to_string();
        args.extend(["--rootfs", &rootfs, "/bin/sleep", "600"]);
        let out = self.podman(&args);
        assert!(
            out.status.success(),
            "podman run {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        self.containers.push(name.to_string());
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// The container's network namespace, as an `ip netns` name.
    fn netns(&self, name: &str) -> String {
        let out = self.podman(&[
            "inspect",
            "--format",
            "{{.NetworkSettings.SandboxKey}}",
            name,
        ]);
        let key = String::from_utf8_lossy(&out.stdout).trim().to_string();
        Path::new(&key).file_name().map_or_else(
            || panic!("no network namespace for {name}: {key:?}"),
            |f| f.to_string_lossy().into_owned(),
        )
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        for c in &self.containers {
            let _ = self.podman(&["rm", "-f", "-t", "0", c]);
        }
    }
}

/// Waits until the agent knows the container's labels (it asks podman after ADD).
fn endpoint_with_labels(node: &Node, name: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let list = node.json(&["endpoint", "list"]);
        if let Some(e) = list
            .as_array()
            .and_then(|l| l.iter().find(|e| e["name"] == name))
            && e["pending_labels"] == false
        {
            return e.clone();
        }
        assert!(
            Instant::now() < deadline,
            "the agent never learned {name}'s labels: {list}\n{}",
            node.agent_log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn podman_containers_are_enforced_by_the_labels_they_were_run_with() {
    let node = Node::start("podman");
    let mut podman = Podman::new(&node);
    let web_name = format!("{}-web", node.tag);
    let client_name = format!("{}-client", node.tag);
    let other_name = format!("{}-other", node.tag);
    podman.run(&web_name, &["app=web", "palisade.io/namespace=shop"]);
    podman.run(&client_name, &["app=client", "palisade.io/namespace=shop"]);
    podman.run(&other_name, &["app=other", "palisade.io/namespace=shop"]);

    let web = endpoint_with_labels(&node, &web_name);
    let client = endpoint_with_labels(&node, &client_name);
    endpoint_with_labels(&node, &other_name);
    assert_eq!(web["namespace"], "shop");
    assert_eq!(web["labels"]["app"], "web");
    assert_ne!(web["identity"], client["identity"]);
    let web_ip: Ipv4Addr = web["ip"].as_str().and_then(|s| s.parse().ok()).expect("ip");

    let _srv = tcp_server(&podman.netns(&web_name), 80);
    let (client_ns, other_ns) = (podman.netns(&client_name), podman.netns(&other_name));
    assert!(tcp_connects(&other_ns, web_ip, 80), "no policy yet");
    node.apply(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: web, namespace: shop}\nspec:\n  podSelector: {matchLabels: {app: web}}\n  ingress:\n  - from:\n    - podSelector: {matchLabels: {app: client}}\n    ports: [{port: 80}]\n",
    );
    assert!(
        tcp_connects(&client_ns, web_ip, 80),
        "the client container is allowed"
    );
    assert!(
        !tcp_connects(&other_ns, web_ip, 80),
        "the other container is not"
    );

    let drops = node.flows(&[
        "--verdict",
        "DROPPED",
        "--to-pod",
        &format!("shop/{web_name}"),
    ]);
    assert!(
        drops
            .iter()
            .any(|f| f["source"]["name"] == other_name.as_str()),
        "the drop names both containers: {drops:?}"
    );
    let allowed = node.flows(&[
        "--verdict",
        "FORWARDED",
        "--to-pod",
        &format!("shop/{web_name}"),
    ]);
    assert!(
        allowed
            .iter()
            .any(|f| f["source"]["name"] == client_name.as_str()),
        "{allowed:?}"
    );

    // podman rm runs CNI DEL: the endpoint goes with the container.
    let out = podman.podman(&["rm", "-f", "-t", "0", &other_name]);
    assert!(out.status.success());
    podman.containers.retain(|c| *c != other_name);
    let list = node.json(&["endpoint", "list"]);
    assert!(
        !list
            .as_array()
            .is_some_and(|l| l.iter().any(|e| e["name"] == other_name.as_str())),
        "{list}"
    );
}
