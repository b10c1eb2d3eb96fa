//! A Kubernetes cluster for the agent's Kubernetes mode, made of what runs here: the API
//! stand-in (`kube_api`), one node namespace per node with a real `--kubernetes` agent in it,
//! the nodes joined by one link, and pods made the way kubelet makes them — the Pod object
//! first, then palisade-cni run with the `CNI_ARGS` kubelet passes and the configuration the
//! agent wrote, then the pod's address written into its status.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::Output;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::cni::Container;
use crate::kube_api::ApiServer;
use crate::node::{Node, ip};

/// One node: its namespace and agent, its Node object's name and addresses.
pub struct KubeNode {
    pub node: Node,
    pub name: String,
    /// The node's address on the link between the nodes.
    pub ip: Ipv4Addr,
    pub pod_cidr: String,
    /// The API stand-in's listener inside this node's namespace.
    pub api_addr: SocketAddr,
    pub kubeconfig: PathBuf,
    pub conf_dir: PathBuf,
}

/// A pod made on a node.
pub struct KubePod {
    pub namespace: String,
    pub name: String,
    pub container: Container,
    pub ip: Ipv4Addr,
    pub node: usize,
}

pub struct Cluster {
    pub api: ApiServer,
    pub nodes: Vec<KubeNode>,
    link: Option<String>,
}

/// The CRDs Palisade installs, from `policies/crds/`.
pub fn palisade_crds() -> Vec<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../policies/crds");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    files
}

impl Cluster {
    /// `n` nodes (`node-a`, `node-b`, ...) with agents; the Palisade CRDs installed first
    /// (with kubectl, as an operator does) unless `crds` is false.
    pub fn start(test: &str, n: usize, crds: bool, agent_args: &[&str]) -> Cluster {
        let api = ApiServer::start();
        let mut cluster = Cluster {
            api,
            nodes: Vec::new(),
            link: None,
        };
        // The agent's own namespace, as policies/deploy makes it (its status Lease lives there).
        cluster.namespace("palisade", &[]);
        if crds {
            let host = cluster.api.addr();
            for f in palisade_crds() {
                let out = cluster
                    .api
                    .kubectl(host, None)
                    .arg("create")
                    .arg("-f")
                    .arg(&f)
                    .output()
                    .expect("kubectl");
                assert!(
                    out.status.success(),
                    "kubectl create -f {}: {}",
                    f.display(),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
        for i in 0..n {
            let letter = char::from(b'a' + u8::try_from(i).expect("few nodes"));
            let name = format!("node-{letter}");
            let octet = u8::try_from(i + 1).expect("few nodes");
            let ip = Ipv4Addr::new(192, 168, 77, octet);
            let pod_cidr = format!("10.210.{octet}.0/24");
            let node = Node::prepare(test, &[]);
            let conf_dir = node.dir.join("net.d");
            cluster.nodes.push(KubeNode {
                node,
                name,
                ip,
                pod_cidr,
                api_addr: SocketAddr::from(([0, 0, 0, 0], 0)),
                kubeconfig: PathBuf::new(),
                conf_dir,
            });
        }
        cluster.join_nodes();
        for i in 0..n {
            cluster.register_node(i);
            cluster.start_agent(i, agent_args);
        }
        cluster
    }

    /// One veth between the first two node namespaces, each end with its node's address.
    fn join_nodes(&mut self) {
        if self.nodes.len() < 2 {
            let n = &self.nodes[0];
            let out = ip(&["-n", &n.node.netns, "link", "set", "lo", "up"]);
            assert!(out.status.success());
            return;
        }
        let (a, b) = (&self.nodes[0], &self.nodes[1]);
        let (ea, eb) = (format!("{}l", a.node.tag), format!("{}l", b.node.tag));
        let out = ip(&[
            "link",
            "add",
            &ea,
            "netns",
            &a.node.netns,
            "type",
            "veth",
            "peer",
            "name",
            &eb,
            "netns",
            &b.node.netns,
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        for (n, dev) in [(a, &ea), (b, &eb)] {
            for args in [
                vec!["-n", &n.node.netns, "link", "set", "lo", "up"],
                vec!["-n", &n.node.netns, "link", "set", dev.as_str(), "up"],
            ] {
                assert!(ip(&args).status.success());
            }
            let cidr = format!("{}/24", n.ip);
            assert!(
                ip(&["-n", &n.node.netns, "addr", "add", &cidr, "dev", dev])
                    .status
                    .success()
            );
        }
        self.link = Some(ea);
    }

    /// The Node object (as kubelet registers it) and the API listener inside the node.
    fn register_node(&mut self, i: usize) {
        let (name, ip, cidr) = {
            let n = &self.nodes[i];
            (n.name.clone(), n.ip, n.pod_cidr.clone())
        };
        self.api.upsert(&json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
            "spec": {"podCIDR": cidr, "podCIDRs": [cidr]},
            "status": {"addresses": [
                {"type": "InternalIP", "address": ip.to_string()},
                {"type": "Hostname", "address": name},
            ]},
        }));
        let addr = self.api.listen_in_netns(&self.nodes[i].node.netns);
        let kubeconfig = self.nodes[i].node.dir.join("kubeconfig");
        ApiServer::write_kubeconfig(addr, &kubeconfig).expect("kubeconfig");
        self.nodes[i].api_addr = addr;
        self.nodes[i].kubeconfig = kubeconfig;
    }

    fn agent_args(&self, i: usize, extra: &[&str]) -> Vec<String> {
        let n = &self.nodes[i];
        let octet = i + 1;
        let mut args: Vec<String> = [
            "--kubernetes",
            "--node-name",
            &n.name,
            "--kubeconfig",
            &n.kubeconfig.display().to_string(),
            "--cni-conf-dir",
            &n.conf_dir.display().to_string(),
            "--cni-ipam-dir",
            &n.node.dir.join("ipam").display().to_string(),
            "--pod-cidr",
            &format!("10.211.{octet}.0/24"),
            "--lease-duration",
            "3s",
            "--lease-renew",
            "500ms",
        ]
        .iter()
        .map(ToString::to_string)
        .collect();
        args.extend(extra.iter().map(ToString::to_string));
        args
    }

    fn start_agent(&mut self, i: usize, extra: &[&str]) {
        let args = self.agent_args(i, extra);
        self.nodes[i].node.set_agent_args(&args);
        self.nodes[i].node.start_agent();
    }

    /// kubectl inside node `i`'s namespace.
    pub fn kubectl(&self, i: usize, args: &[&str]) -> Output {
        let n = &self.nodes[i];
        self.api
            .kubectl(n.api_addr, Some(&n.node.netns))
            .args(args)
            .output()
            .expect("kubectl")
    }

    /// `kubectl <verb> -f -` with `yaml` on stdin; its output, asserted successful.
    pub fn kubectl_stdin(&self, verb: &[&str], yaml: &str) -> String {
        use std::io::Write as _;
        let n = &self.nodes[0];
        let mut child = self
            .api
            .kubectl(n.api_addr, Some(&n.node.netns))
            .args(verb)
            .args(["-f", "-"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("kubectl");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(yaml.as_bytes())
            .expect("yaml");
        let out = child.wait_with_output().expect("kubectl");
        assert!(
            out.status.success(),
            "kubectl {verb:?}: {}\n{yaml}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn namespace(&self, name: &str, labels: &[(&str, &str)]) {
        let mut l: serde_json::Map<String, Value> = labels
            .iter()
            .map(|(k, v)| ((*k).to_string(), json!(v)))
            .collect();
        l.insert("kubernetes.io/metadata.name".into(), json!(name));
        self.api.upsert(&json!({
            "apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": name, "labels": l},
        }));
    }

    /// The CNI network node `i`'s agent wrote, once it has.
    pub fn node_network(&self, i: usize) -> Value {
        let path = self.nodes[i].conf_dir.join("05-palisade.conflist");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(text) = std::fs::read_to_string(&path) {
                return serde_json::from_str(&text).expect("the agent's conflist is JSON");
            }
            assert!(
                Instant::now() < deadline,
                "node {i}'s agent wrote no CNI configuration:\n{}",
                self.nodes[i].node.agent_log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// A pod on node `i`, as the scheduler and kubelet make it.
    pub fn pod(&self, i: usize, namespace: &str, name: &str, labels: &[(&str, &str)]) -> KubePod {
        self.pod_with_ports(i, namespace, name, labels, &[])
    }

    pub fn pod_with_ports(
        &self,
        i: usize,
        namespace: &str,
        name: &str,
        labels: &[(&str, &str)],
        ports: &[(&str, u16)],
    ) -> KubePod {
        let n = &self.nodes[i];
        let labels: serde_json::Map<String, Value> = labels
            .iter()
            .map(|(k, v)| ((*k).to_string(), json!(v)))
            .collect();
        let ports: Vec<Value> = ports
            .iter()
            .map(|(p, num)| json!({"name": p, "containerPort": num, "protocol": "TCP"}))
            .collect();
        let mut pod = json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": namespace, "labels": labels},
            "spec": {"nodeName": n.name, "containers": [{"name": "main", "image": "busybox", "ports": ports}]},
            "status": {"phase": "Pending"},
        });
        self.api.upsert(&pod);
        let container = n.node.container(
            &format!("{name}-{namespace}")
                .chars()
                .take(12)
                .collect::<String>(),
        );
        let list = self.node_network(i);
        let mut conf = list["plugins"][0].clone();
        conf["cniVersion"] = list["cniVersion"].clone();
        conf["name"] = list["name"].clone();
        let args = format!(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={name};K8S_POD_INFRA_CONTAINER_ID={}",
            container.id
        );
        let result = n
            .node
            .run_plugin(
                "palisade-cni",
                "ADD",
                Some(&container),
                "eth0",
                &conf,
                &[("CNI_ARGS", &args)],
            )
            .ok();
        let ip: Ipv4Addr = result["ips"][0]["address"]
            .as_str()
            .and_then(|a| a.split('/').next())
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("no address in {result}"));
        pod["status"] = json!({"phase": "Running", "podIP": ip.to_string(), "podIPs": [{"ip": ip.to_string()}], "hostIP": n.ip.to_string()});
        self.api.upsert(&pod);
        KubePod {
            namespace: namespace.into(),
            name: name.into(),
            container,
            ip,
            node: i,
        }
    }

    /// Deletes a pod as kubelet does: CNI DEL, then the object.
    pub fn delete_pod(&self, pod: &KubePod) {
        let n = &self.nodes[pod.node];
        let list = self.node_network(pod.node);
        let mut conf = list["plugins"][0].clone();
        conf["cniVersion"] = list["cniVersion"].clone();
        conf["name"] = list["name"].clone();
        n.node
            .run_plugin(
                "palisade-cni",
                "DEL",
                Some(&pod.container),
                "eth0",
                &conf,
                &[],
            )
            .ok();
        self.api
            .remove("v1", "Pod", &pod.namespace, &pod.name)
            .expect("the pod object");
    }

    /// Waits until `check` holds, or fails naming `what`, with node `i`'s agent log.
    pub fn eventually(&self, i: usize, what: &str, mut check: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !check() {
            assert!(
                Instant::now() < deadline,
                "{what}, never:\n{}",
                self.nodes[i].node.agent_log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Node `i`'s endpoint for a pod, once it has its labels' identity.
    pub fn endpoint(&self, i: usize, pod: &KubePod) -> Value {
        let mut found = Value::Null;
        self.eventually(
            i,
            &format!("{}/{} has its identity", pod.namespace, pod.name),
            || {
                let list = self.nodes[i].node.json(&["endpoint", "list"]);
                if let Some(e) = list.as_array().and_then(|l| {
                    l.iter().find(|e| {
                        e["name"] == pod.name.as_str() && e["namespace"] == pod.namespace.as_str()
                    })
                }) && e["pending_labels"] == false
                {
                    found = e.clone();
                    return true;
                }
                false
            },
        );
        found
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for n in &self.nodes {
            n.node.stop_agent();
        }
    }
}
