//! The DaemonSet in `policies/deploy/` starts the agent with flags its ConfigMap fills in:
//! each must be one `palisade-agent` takes, with a value it accepts, so a deployment never
//! crash-loops on a flag this build does not know.

use std::collections::BTreeMap;
use std::path::PathBuf;

use clap::Parser as _;
use palisade_agent::run::AgentArgs;
use serde_json::Value;

fn documents(file: &str) -> Vec<Value> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../policies/deploy")
        .join(file);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    text.split("\n---")
        .filter(|d| {
            d.lines()
                .any(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
        })
        .map(|d| serde_norway::from_str(d).unwrap_or_else(|e| panic!("{file}: {e}")))
        .collect()
}

#[test]
fn the_daemonsets_agent_flags_parse_with_the_configmaps_values() {
    let config = documents("20-config.yaml")
        .into_iter()
        .find(|d| d["kind"] == "ConfigMap")
        .expect("the agent's ConfigMap");
    let daemonset = documents("30-daemonset.yaml")
        .into_iter()
        .find(|d| d["kind"] == "DaemonSet")
        .expect("the DaemonSet");
    let agent = daemonset["spec"]["template"]["spec"]["containers"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["name"] == "agent"))
        .expect("the agent container");
    // What the kubelet puts in $(VAR): the downward API and the ConfigMap's keys.
    let mut env: BTreeMap<String, String> = BTreeMap::new();
    for e in agent["env"].as_array().expect("env") {
        let name = e["name"].as_str().expect("name").to_string();
        let value = if let Some(key) = e.pointer("/valueFrom/configMapKeyRef/key") {
            config["data"][key.as_str().expect("key")]
                .as_str()
                .unwrap_or_else(|| panic!("ConfigMap key {key} missing"))
                .to_string()
        } else if e.pointer("/valueFrom/fieldRef/fieldPath") == Some(&Value::from("spec.nodeName"))
        {
            "node-a".to_string()
        } else if let Some(v) = e["value"].as_str() {
            v.to_string()
        } else {
            "palisade".to_string()
        };
        env.insert(name, value);
    }
    let mut argv = vec!["palisade-agent".to_string()];
    for a in agent["args"].as_array().expect("args") {
        let mut a = a.as_str().expect("string arg").to_string();
        for (k, v) in &env {
            a = a.replace(&format!("$({k})"), v);
        }
        assert!(!a.contains("$("), "unresolved variable in {a}");
        argv.push(a);
    }
    let args = AgentArgs::try_parse_from(&argv)
        .unwrap_or_else(|e| panic!("the DaemonSet's flags do not parse: {e}\n{argv:?}"));
    assert!(args.kubernetes);
    assert_eq!(args.node_name.as_deref(), Some("node-a"));
    assert_eq!(
        args.cni_conf_dir.as_deref(),
        Some(std::path::Path::new("/etc/cni/net.d"))
    );
}
