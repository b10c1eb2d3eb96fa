//! A reachability-matrix runner modeled on the upstream Kubernetes network policy e2e suite
//! (test/e2e/network/netpol): namespaces x, y, z with pods a, b, c, each serving TCP and UDP
//! on ports 80 and 81. The model is built once; each case (data, see conformance/*.yaml)
//! applies policies and label changes, probes the matrix in parallel, and on failure prints
//! expected and actual truth tables.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::Ipv4Addr;

use serde::Deserialize;

use crate::node::{Endpoint, Node};
use crate::traffic::{self, Server};

pub const NAMESPACES: [&str; 3] = ["x", "y", "z"];
pub const PODS: [&str; 3] = ["a", "b", "c"];

/// A case file: a list of cases.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaseFile {
    pub cases: Vec<Case>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Case {
    pub name: String,
    /// The upstream `It(...)` title this case ports, when it ports one.
    #[serde(default)]
    pub upstream: Option<String>,
    /// Why this case cannot run here (e.g. SCTP is not in this kernel); it is counted and
    /// listed, not run.
    #[serde(default)]
    pub skip: Option<String>,
    /// Pods whose connectivity the case checks (`ns/pod`); default all nine.
    #[serde(default)]
    pub pods: Vec<String>,
    /// Each step is a one-key map: `apply:`, `delete_policy:`, `label_pod:`,
    /// `label_namespace:` or `expect:`.
    #[serde(with = "serde_norway::with::singleton_map_recursive")]
    pub steps: Vec<Step>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub enum Step {
    /// Manifests to apply; `{{ip ns/pod}}` and `{{cidr ns/pod LEN}}` are replaced by the
    /// pod's address and by the prefix of that length around it.
    Apply(String),
    DeletePolicy {
        namespace: String,
        name: String,
    },
    LabelPod {
        pod: String,
        #[serde(default)]
        set: BTreeMap<String, String>,
        #[serde(default)]
        remove: Vec<String>,
    },
    LabelNamespace {
        namespace: String,
        #[serde(default)]
        set: BTreeMap<String, String>,
        #[serde(default)]
        remove: Vec<String>,
    },
    Expect(Expectation),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Expectation {
    /// Which (port, protocol) pairs to probe.
    pub probes: Vec<ProbeSpec>,
    /// Reachability of every pair unless a rule says otherwise.
    pub default: Verdict,
    /// Applied in order; later rules override earlier ones.
    #[serde(default)]
    pub rules: Vec<ExpectRule>,
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ProbeSpec {
    pub port: u16,
    pub protocol: Proto,
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
pub enum Proto {
    #[serde(rename = "TCP")]
    Tcp,
    #[serde(rename = "UDP")]
    Udp,
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Allow,
    Deny,
}

/// `from`/`to` are `ns/pod` with `*` wildcards (`x/*`, `*/a`, `*`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExpectRule {
    pub from: String,
    pub to: String,
    pub verdict: Verdict,
    /// Limit the rule to these probes (default: all of the step's probes).
    #[serde(default)]
    pub probes: Vec<ProbeSpec>,
}

fn matches(pattern: &str, pod: &str) -> bool {
    if pattern == "*" {
        return true;
    }
    let (pns, ppod) = pattern.split_once('/').unwrap_or((pattern, "*"));
    let (ns, name) = pod.split_once('/').expect("ns/pod");
    (pns == "*" || pns == ns) && (ppod == "*" || ppod == name)
}

/// The nine-pod model on one node.
pub struct Model {
    pub node: Node,
    pub pods: BTreeMap<String, Endpoint>,
    _servers: Vec<Server>,
}

pub fn all_pods() -> Vec<String> {
    NAMESPACES
        .iter()
        .flat_map(|ns| PODS.iter().map(move |p| format!("{ns}/{p}")))
        .collect()
}

const BASE_NS_LABEL: &str = "ns";

impl Model {
    /// Namespaces x, y, z (labelled `ns=<name>`), pods a, b, c (labelled `pod=<name>`), each
    /// with named ports serve-80-tcp, serve-81-tcp, serve-80-udp, serve-81-udp.
    pub fn build() -> Model {
        let node = Node::start("conformance");
        let mut pods = BTreeMap::new();
        let mut servers = Vec::new();
        for (ni, ns) in NAMESPACES.iter().enumerate() {
            node.palisade_ok(&[
                "namespace",
                "label",
                ns,
                "--set",
                &format!("{BASE_NS_LABEL}={ns}"),
            ]);
            for (pi, pod) in PODS.iter().enumerate() {
                let ip = format!("10.200.{}.{}", ni + 1, 10 + pi);
                let e = node.add_endpoint_with(
                    &format!("{ns}-{pod}"),
                    ns,
                    &format!("pod={pod}"),
                    &[
                        "--ip",
                        &ip,
                        "--port",
                        "serve-80-tcp=80/TCP",
                        "--port",
                        "serve-81-tcp=81/TCP",
                        "--port",
                        "serve-80-udp=80/UDP",
                        "--port",
                        "serve-81-udp=81/UDP",
                    ],
                );
                for port in [80, 81] {
                    servers.push(traffic::tcp_server(&e.name, port));
                    servers.push(traffic::udp_server(&e.name, port));
                }
                pods.insert(format!("{ns}/{pod}"), e);
            }
        }
        Model {
            node,
            pods,
            _servers: servers,
        }
    }

    fn ip(&self, pod: &str) -> Ipv4Addr {
        self.pods
            .get(pod)
            .unwrap_or_else(|| panic!("no pod {pod} in the model"))
            .ip
    }

    /// Replaces `{{ip ns/pod}}` and `{{cidr ns/pod LEN}}` in a manifest.
    pub fn render(&self, text: &str) -> String {
        let mut out = String::new();
        let mut rest = text;
        while let Some(start) = rest.find("{{") {
            out.push_str(&rest[..start]);
            let end = rest[start..]
                .find("}}")
                .map(|e| start + e)
                .expect("unterminated {{");
            let words: Vec<&str> = rest[start + 2..end].split_whitespace().collect();
            match words.as_slice() {
                ["ip", pod] => out.push_str(&self.ip(pod).to_string()),
                ["cidr", pod, len] => {
                    let len: u32 = len.parse().expect("prefix length");
                    let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
                    let _ = write!(
                        out,
                        "{}/{len}",
                        Ipv4Addr::from(u32::from(self.ip(pod)) & mask)
                    );
                }
                other => panic!("unknown placeholder {other:?}"),
            }
            rest = &rest[end + 2..];
        }
        out.push_str(rest);
        out
    }

    /// Back to the baseline between cases: no policies, original labels.
    pub fn reset(&self) {
        let policies = self.node.json(&["policy", "list"]);
        for p in policies.as_array().expect("policy list") {
            let name = p["name"].as_str().expect("name");
            match p["namespace"].as_str() {
                Some(ns) => self
                    .node
                    .palisade_ok(&["policy", "delete", name, "--namespace", ns]),
                None => self
                    .node
                    .palisade_ok(&["policy", "delete", name, "--clusterwide"]),
            };
        }
        let endpoints = self.node.json(&["endpoint", "list"]);
        for e in endpoints.as_array().expect("endpoint list") {
            let name = e["name"].as_str().expect("name");
            let pod = name.rsplit('-').next().expect("pod suffix");
            let labels = e["labels"].as_object().expect("labels");
            if labels.len() != 1 || labels.get("pod").and_then(|v| v.as_str()) != Some(pod) {
                let mut args = vec![
                    "endpoint".to_string(),
                    "label".into(),
                    name.to_string(),
                    "--set".into(),
                    format!("pod={pod}"),
                ];
                for k in labels.keys().filter(|k| *k != "pod") {
                    args.push("--remove".into());
                    args.push(k.clone());
                }
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                self.node.palisade_ok(&args);
            }
        }
        let status = self.node.json(&["status"]);
        for ns in NAMESPACES {
            let labels = status["namespaces"][ns]
                .as_object()
                .cloned()
                .unwrap_or_default();
            let extra: Vec<String> = labels
                .keys()
                .filter(|k| *k != BASE_NS_LABEL && *k != "kubernetes.io/metadata.name")
                .cloned()
                .collect();
            if labels.get(BASE_NS_LABEL).and_then(|v| v.as_str()) != Some(ns) || !extra.is_empty() {
                let mut args = vec![
                    "namespace".to_string(),
                    "label".into(),
                    ns.to_string(),
                    "--set".into(),
                    format!("{BASE_NS_LABEL}={ns}"),
                ];
                for k in extra {
                    args.push("--remove".into());
                    args.push(k);
                }
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                self.node.palisade_ok(&args);
            }
        }
    }

    fn label_args(
        kind: &str,
        target: &str,
        set: &BTreeMap<String, String>,
        remove: &[String],
    ) -> Vec<String> {
        let mut args = vec![kind.to_string(), "label".into(), target.to_string()];
        for (k, v) in set {
            args.push("--set".into());
            args.push(format!("{k}={v}"));
        }
        for k in remove {
            args.push("--remove".into());
            args.push(k.clone());
        }
        args
    }

    fn run_step(&self, step: &Step, pods: &[String]) -> Result<(), String> {
        match step {
            Step::Apply(text) => {
                let out = self.node.try_apply(&self.render(text));
                if !out.status.success() {
                    return Err(format!(
                        "policy apply failed: {}",
                        String::from_utf8_lossy(&out.stderr).trim()
                    ));
                }
            }
            Step::DeletePolicy { namespace, name } => {
                self.node
                    .palisade_ok(&["policy", "delete", name, "--namespace", namespace]);
            }
            Step::LabelPod { pod, set, remove } => {
                let name = &self
                    .pods
                    .get(pod)
                    .ok_or_else(|| format!("no pod {pod}"))?
                    .name;
                let args = Self::label_args("endpoint", name, set, remove);
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                self.node.palisade_ok(&args);
            }
            Step::LabelNamespace {
                namespace,
                set,
                remove,
            } => {
                let args = Self::label_args("namespace", namespace, set, remove);
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                self.node.palisade_ok(&args);
            }
            Step::Expect(e) => self.check(e, pods)?,
        }
        Ok(())
    }

    /// Runs a case; Err carries the truth-table diff.
    pub fn run_case(&self, case: &Case) -> Result<(), String> {
        self.reset();
        let pods = if case.pods.is_empty() {
            all_pods()
        } else {
            case.pods.clone()
        };
        for step in &case.steps {
            self.run_step(step, &pods)?;
        }
        Ok(())
    }

    fn expected(e: &Expectation, probe: ProbeSpec, from: &str, to: &str) -> bool {
        let mut v = e.default;
        for r in &e.rules {
            if (r.probes.is_empty() || r.probes.contains(&probe))
                && matches(&r.from, from)
                && matches(&r.to, to)
            {
                v = r.verdict;
            }
        }
        v == Verdict::Allow
    }

    fn probe_all(&self, cells: &[(ProbeSpec, String, String)]) -> Vec<bool> {
        let jobs: Vec<Box<dyn FnOnce() -> bool + Send>> = cells
            .iter()
            .map(|(p, from, to)| {
                let (src, dst, probe) = (self.pods[from].name.clone(), self.ip(to), *p);
                Box::new(move || match probe.protocol {
                    Proto::Tcp => traffic::tcp_connects(&src, dst, probe.port),
                    Proto::Udp => traffic::udp_reaches(&src, dst, probe.port),
                }) as Box<dyn FnOnce() -> bool + Send>
            })
            .collect();
        traffic::all(jobs)
    }

    fn check(&self, e: &Expectation, pods: &[String]) -> Result<(), String> {
        // Loopback is not judged (upstream ignores it too: it never leaves the pod).
        let cells: Vec<(ProbeSpec, String, String)> = e
            .probes
            .iter()
            .flat_map(|p| {
                pods.iter().flat_map(move |from| {
                    pods.iter()
                        .filter(move |to| *to != from)
                        .map(move |to| (*p, from.clone(), to.clone()))
                })
            })
            .collect();
        let mut actual = self.probe_all(&cells);
        // Probe disagreements once more before calling them failures.
        let wrong: Vec<usize> = (0..cells.len())
            .filter(|&i| actual[i] != Self::expected(e, cells[i].0, &cells[i].1, &cells[i].2))
            .collect();
        if wrong.is_empty() {
            return Ok(());
        }
        let again = self.probe_all(&wrong.iter().map(|&i| cells[i].clone()).collect::<Vec<_>>());
        for (k, &i) in wrong.iter().enumerate() {
            actual[i] = again[k];
        }
        let mut report = String::new();
        let mut failed = false;
        for probe in &e.probes {
            let cell = |from: &str, to: &str| {
                cells
                    .iter()
                    .position(|(p, f, t)| p == probe && f == from && t == to)
                    .map(|i| actual[i])
            };
            let mut table = format!(
                "  {:?}/{} (row: from, column: to; . allowed, X denied, ! unexpected)\n        ",
                probe.protocol, probe.port
            );
            for to in pods {
                let _ = write!(table, "{to:<5}");
            }
            table.push('\n');
            for from in pods {
                let _ = write!(table, "  {from:<6}");
                for to in pods {
                    let mark = match cell(from, to) {
                        None => "-".to_string(),
                        Some(got) => {
                            let want = Self::expected(e, *probe, from, to);
                            let sym = if got { "." } else { "X" };
                            if got == want {
                                sym.to_string()
                            } else {
                                failed = true;
                                format!("{sym}!")
                            }
                        }
                    };
                    let _ = write!(table, "{mark:<5}");
                }
                table.push('\n');
            }
            report.push_str(&table);
        }
        if failed { Err(report) } else { Ok(()) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_match_namespaces_pods_and_wildcards() {
        assert!(matches("*", "x/a"));
        assert!(matches("x/*", "x/b"));
        assert!(!matches("x/*", "y/b"));
        assert!(matches("*/a", "z/a"));
        assert!(matches("x", "x/c"));
        assert!(matches("x/a", "x/a"));
        assert!(!matches("x/a", "x/b"));
    }

    #[test]
    fn later_rules_override_earlier_ones() {
        let e = Expectation {
            probes: vec![ProbeSpec {
                port: 80,
                protocol: Proto::Tcp,
            }],
            default: Verdict::Allow,
            rules: vec![
                ExpectRule {
                    from: "*".into(),
                    to: "x/a".into(),
                    verdict: Verdict::Deny,
                    probes: vec![],
                },
                ExpectRule {
                    from: "x/b".into(),
                    to: "x/a".into(),
                    verdict: Verdict::Allow,
                    probes: vec![],
                },
            ],
        };
        let p = e.probes[0];
        assert!(!Model::expected(&e, p, "y/a", "x/a"));
        assert!(Model::expected(&e, p, "x/b", "x/a"));
        assert!(Model::expected(&e, p, "y/a", "x/b"));
    }
}
