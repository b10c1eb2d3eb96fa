//! Running `palisade-cni` exactly as a container runtime does: in the node's network
//! namespace, with a clean environment holding only the `CNI_*` variables (and `PATH`), the
//! network configuration on stdin, the result or the spec's error JSON on stdout.

use std::io::Write as _;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use serde_json::{Value, json};

use crate::node::{Node, bin_dir};

/// Where Debian's containernetworking-plugins (bridge, ptp, host-local...) live.
pub const REFERENCE_PLUGINS: &str = "/usr/lib/cni";

/// A container's network namespace, made by the test as a runtime would make one.
pub struct Container {
    /// Its name, as a runtime passes it (`K8S_POD_NAME`).
    pub name: String,
    /// Its `ip netns` name (also how the traffic helpers enter it).
    pub netns: String,
    pub path: PathBuf,
    pub id: String,
}

/// One execution of a plugin.
#[derive(Debug)]
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| {
            panic!(
                "plugin output is not JSON ({e}): {:?}\nstderr: {}",
                self.stdout, self.stderr
            )
        })
    }

    /// Asserts success and returns the JSON result (Null when the verb prints nothing).
    pub fn ok(&self) -> Value {
        assert_eq!(
            self.code, 0,
            "plugin failed: {}\nstderr: {}",
            self.stdout, self.stderr
        );
        if self.stdout.trim().is_empty() {
            Value::Null
        } else {
            self.json()
        }
    }

    /// Asserts failure with the spec's error JSON and returns (code, details).
    pub fn err(&self) -> (u64, String) {
        assert_ne!(self.code, 0, "plugin succeeded: {}", self.stdout);
        let v = self.json();
        for key in ["cniVersion", "code", "msg", "details"] {
            assert!(v.get(key).is_some(), "error result without {key}: {v}");
        }
        (
            v["code"].as_u64().expect("numeric code"),
            v["details"].as_str().unwrap_or_default().to_string(),
        )
    }
}

impl Node {
    /// A network namespace for a container, named after this node's tag; removed with the
    /// node.
    pub fn container(&self, short: &str) -> Container {
        let netns = self.name(short);
        let out = Command::new("ip")
            .args(["netns", "add", &netns])
            .output()
            .expect("ip netns add");
        assert!(out.status.success(), "ip netns add {netns}");
        self.track_netns(&netns);
        Container {
            name: short.to_string(),
            path: PathBuf::from(format!("/run/netns/{netns}")),
            id: format!("{}{short}0123456789abcdef", self.tag),
            netns,
        }
    }

    /// A standalone palisade-cni configuration (host-local IPAM) for this node's agent.
    pub fn cni_config(&self, version: &str) -> Value {
        json!({
            "cniVersion": version,
            "name": format!("palnet-{}", self.tag),
            "type": "palisade-cni",
            "api": self.api,
            "ipam": {
                "type": "host-local",
                "subnet": "10.89.0.0/24",
                "dataDir": self.dir.join("ipam"),
            },
        })
    }

    /// Runs a plugin (`palisade-cni` by default, or a reference plugin by name) with `verb`
    /// for `container` on `ifname`; `env` adds or overrides variables (an empty value removes
    /// one).
    pub fn run_plugin(
        &self,
        plugin: &str,
        verb: &str,
        container: Option<&Container>,
        ifname: &str,
        config: &Value,
        env: &[(&str, &str)],
    ) -> Run {
        let exe = if plugin == "palisade-cni" {
            bin_dir().join("palisade-cni")
        } else {
            PathBuf::from(REFERENCE_PLUGINS).join(plugin)
        };
        let mut vars: Vec<(String, String)> = vec![
            ("PATH".into(), "/usr/sbin:/usr/bin:/sbin:/bin".into()),
            ("CNI_COMMAND".into(), verb.into()),
            ("CNI_IFNAME".into(), ifname.into()),
            (
                "CNI_PATH".into(),
                format!("{}:{REFERENCE_PLUGINS}", bin_dir().display()),
            ),
        ];
        if let Some(c) = container {
            vars.push(("CNI_CONTAINERID".into(), c.id.clone()));
            vars.push(("CNI_NETNS".into(), c.path.display().to_string()));
            // What podman passes: the container's name.
            vars.push((
                "CNI_ARGS".into(),
                format!("IgnoreUnknown=1;K8S_POD_NAME={}", c.name),
            ));
        }
        for (k, v) in env {
            vars.retain(|(name, _)| name != k);
            if !v.is_empty() {
                vars.push(((*k).to_string(), (*v).to_string()));
            }
        }
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{}", self.netns))
            .arg("--")
            .arg(&exe)
            .env_clear()
            .envs(vars)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("running {}: {e}", exe.display()));
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(config.to_string().as_bytes())
            .expect("write config");
        let out = child.wait_with_output().expect("plugin output");
        Run {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// palisade-cni, as a runtime runs it.
    pub fn cni(&self, verb: &str, container: &Container, config: &Value) -> Run {
        self.run_plugin("palisade-cni", verb, Some(container), "eth0", config, &[])
    }

    /// Interfaces of the node namespace (names).
    pub fn node_links(&self) -> Vec<String> {
        let out = Command::new("ip")
            .args(["-n", &self.netns, "-o", "link", "show"])
            .output()
            .expect("ip link");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split(": ").nth(1))
            .map(|n| n.split('@').next().unwrap_or(n).to_string())
            .collect()
    }
}

/// The configuration with `prevResult` set, as a runtime passes it to CHECK and DEL.
pub fn with_prev_result(config: &Value, prev: &Value) -> Value {
    let mut c = config.clone();
    c["prevResult"] = prev.clone();
    c
}
