//! containerd (Debian's 1.6) attaching containers through palisade-cni with `ctr run --cni`:
//! two containers with different labels (`ctr run --label`), a policy, allowed and denied
//! traffic. The test runs a containerd of its own (its own root, state and socket); ctr reads
//! CNI configuration only from /etc/cni/net.d and plugins only from /opt/cni/bin, so it runs
//! in a private mount namespace where the test's directories are bound over those two.
#![expect(
    clippy::print_stderr,
    reason = "a failing test prints containerd's log for whoever reads it"
)]

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use palisade_integration::Node;
use palisade_integration::node::bin_dir;
use palisade_integration::traffic::{tcp_connects, tcp_server};
use serde_json::Value;

struct Containerd {
    dir: PathBuf,
    socket: PathBuf,
    daemon: Child,
    node_netns: Option<String>,
    containers: Vec<String>,
}

impl Containerd {
    fn start() -> Containerd {
        let dir = std::env::temp_dir().join(format!("palisade-ctr-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        for d in ["root", "state", "net.d", "bin", "rootfs/bin"] {
            std::fs::create_dir_all(dir.join(d)).expect("containerd dirs");
        }
        let socket = dir.join("containerd.sock");
        let log = std::fs::File::create(dir.join("containerd.log")).expect("log");
        let daemon = Command::new("containerd")
            .arg("--root")
            .arg(dir.join("root"))
            .arg("--state")
            .arg(dir.join("state"))
            .arg("--address")
            .arg(&socket)
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("containerd (Debian package containerd)");
        let deadline = Instant::now() + Duration::from_secs(20);
        while !socket.exists() {
            assert!(Instant::now() < deadline, "containerd did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        let rootfs = dir.join("rootfs");
        std::fs::copy("/bin/busybox", rootfs.join("bin/busybox")).expect("busybox-static");
        for applet in ["sh", "sleep"] {
            let _ = std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(applet));
        }
        for plugin in [
            bin_dir().join("palisade-cni"),
            PathBuf::from("/usr/lib/cni/host-local"),
            PathBuf::from("/usr/lib/cni/loopback"),
        ] {
            let to = dir.join("bin").join(plugin.file_name().expect("name"));
            std::fs::copy(&plugin, &to).unwrap_or_else(|e| panic!("{}: {e}", plugin.display()));
        }
        Containerd {
            dir,
            socket,
            daemon,
            node_netns: None,
            containers: Vec::new(),
        }
    }

    fn network(&mut self, node: &Node) {
        let conflist = serde_json::json!({
            "cniVersion": "1.0.0",
            "name": format!("pal-{}", node.tag),
            "plugins": [{
                "type": "palisade-cni",
                "api": node.api,
                "ipam": {"type": "host-local", "subnet": "10.93.0.0/24", "dataDir": self.dir.join("ipam")},
            }],
        });
        std::fs::write(
            self.dir.join("net.d/10-palisade.conflist"),
            conflist.to_string(),
        )
        .expect("conflist");
        self.node_netns = Some(node.netns.clone());
    }

    /// ctr in the node namespace and a mount namespace where /etc/cni/net.d and /opt/cni/bin
    /// are the test's.
    fn ctr(&self, args: &[&str]) -> std::process::Output {
        let netns = self.node_netns.as_deref().expect("network set");
        let script = format!(
            "mkdir -p /etc/cni/net.d /opt/cni/bin && mount --bind {d}/net.d /etc/cni/net.d && mount --bind {d}/bin /opt/cni/bin && exec nsenter --net=/run/netns/{netns} ctr --address {s} \"$@\"",
            d = self.dir.display(),
            s = self.socket.display()
        );
        Command::new("unshare")
            .args([
                "--mount",
                "--propagation",
                "private",
                "--",
                "sh",
                "-c",
                &script,
                "ctr",
            ])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("ctr")
    }

    fn run(&mut self, id: &str, labels: &[&str]) {
        let rootfs = self.dir.join("rootfs").display().to_string();
        let mut args = vec!["run", "-d", "--cni"];
        for l in labels {
            args.extend(["--label", l]);
        }
        args.extend(["--rootfs", &rootfs, id, "/bin/sleep", "600"]);
        let out = self.ctr(&args);
        assert!(
            out.status.success(),
            "ctr run {id}: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(self.dir.join("containerd.log")).unwrap_or_default()
        );
        self.containers.push(id.to_string());
    }

    /// The container's network namespace: its task's.
    fn netns_path(&self, id: &str) -> PathBuf {
        let out = self.ctr(&["tasks", "ls"]);
        let pid = String::from_utf8_lossy(&out.stdout)
            .lines()
            .find(|l| l.split_whitespace().next() == Some(id))
            .and_then(|l| l.split_whitespace().nth(1).map(str::to_string))
            .unwrap_or_else(|| panic!("no task {id}"));
        PathBuf::from(format!("/proc/{pid}/ns/net"))
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        if self.node_netns.is_some() {
            for c in &self.containers {
                let _ = self.ctr(&["tasks", "kill", "-s", "SIGKILL", c]);
            }
            std::thread::sleep(Duration::from_millis(300));
            for c in &self.containers {
                let _ = self.ctr(&["tasks", "delete", "-f", c]);
                let _ = self.ctr(&["containers", "delete", c]);
            }
        }
        if std::thread::panicking() {
            eprintln!(
                "---- containerd log ----\n{}",
                std::fs::read_to_string(self.dir.join("containerd.log")).unwrap_or_default()
            );
        }
        let _ = self.daemon.kill();
        let _ = self.daemon.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

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
fn containerd_containers_are_enforced_by_the_labels_they_were_run_with() {
    let mut containerd = Containerd::start();
    let socket = containerd.socket.display().to_string();
    let node = Node::start_with("containerd", &["--containerd-socket", &socket]);
    containerd.network(&node);
    let web = format!("{}web", node.tag);
    let client = format!("{}cli", node.tag);
    let other = format!("{}oth", node.tag);
    containerd.run(&web, &["app=web", "palisade.io/namespace=shop"]);
    containerd.run(&client, &["app=client", "palisade.io/namespace=shop"]);
    containerd.run(&other, &["app=other", "palisade.io/namespace=shop"]);
    // ctr names attachments <containerd namespace>-<id>.
    let web_ep = endpoint_with_labels(&node, &format!("default-{web}"));
    endpoint_with_labels(&node, &format!("default-{client}"));
    endpoint_with_labels(&node, &format!("default-{other}"));
    assert_eq!(web_ep["namespace"], "shop");
    let web_ip: Ipv4Addr = web_ep["ip"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .expect("ip");

    // The traffic helpers enter `ip netns` names; these namespaces are /proc paths.
    let link = |id: &str| {
        let name = format!("{}-{id}", node.tag);
        let target = PathBuf::from(format!("/run/netns/{name}"));
        let _ = std::fs::File::create(&target);
        nix::mount::mount(
            Some(&containerd.netns_path(id)),
            &target,
            None::<&str>,
            nix::mount::MsFlags::MS_BIND,
            None::<&str>,
        )
        .expect("bind the container's netns");
        node.track_netns(&name);
        name
    };
    let (web_ns, client_ns, other_ns) = (link(&web), link(&client), link(&other));
    let _srv = tcp_server(&web_ns, 80);
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
}
