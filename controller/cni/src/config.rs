//! The network configuration a runtime gives on stdin: the spec's keys, palisade's own
//! (`api`), and what the runtime adds (`prevResult`, `args`, `cni.dev/valid-attachments`).
//! The whole object is kept too: a delegated IPAM plugin gets it unchanged.

use std::path::PathBuf;

use palisade_policies::labels::Labels;
use serde::Deserialize;

use crate::error::CniError;

/// Versions this plugin speaks, as the reference plugins report theirs.
pub const SUPPORTED_VERSIONS: [&str; 3] = ["0.4.0", "1.0.0", "1.1.0"];

/// The agent's socket unless the configuration names another.
pub const DEFAULT_API: &str = "/run/palisade/agent.sock";

/// The label key that names the endpoint's namespace.
pub const NAMESPACE_LABEL: &str = "palisade.io/namespace";

#[derive(Clone, Debug, Deserialize)]
pub struct Ipam {
    #[serde(rename = "type")]
    pub plugin: String,
}

#[derive(Clone, Debug, Default, Deserialize, serde::Serialize, PartialEq, Eq)]
pub struct Dns {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nameservers: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub search: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub options: Vec<String>,
}

/// One label of `args.cni.labels` (the CNI conventions).
#[derive(Clone, Debug, Deserialize)]
pub struct ArgLabel {
    pub key: String,
    pub value: String,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct CniConventionArgs {
    #[serde(default)]
    pub labels: Vec<ArgLabel>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct Args {
    #[serde(default)]
    pub cni: CniConventionArgs,
}

/// One entry of `cni.dev/valid-attachments` (GC).
#[derive(Clone, Debug, Deserialize)]
pub struct ValidAttachment {
    #[serde(rename = "containerID")]
    pub container_id: String,
    pub ifname: String,
}

#[derive(Clone, Debug, Deserialize)]
pub struct NetConf {
    #[serde(rename = "cniVersion")]
    pub cni_version: String,
    #[serde(rename = "type")]
    pub plugin: String,
    /// The network's name; attachments (and GC) are per network.
    #[serde(default)]
    pub name: String,
    /// The agent's API socket.
    #[serde(default)]
    pub api: Option<PathBuf>,
    #[serde(default)]
    pub ipam: Option<Ipam>,
    #[serde(default)]
    pub dns: Option<Dns>,
    #[serde(default)]
    pub args: Option<Args>,
    #[serde(rename = "prevResult", default)]
    pub prev_result: Option<serde_json::Value>,
    #[serde(rename = "cni.dev/valid-attachments", default)]
    pub valid_attachments: Option<Vec<ValidAttachment>>,
}

/// The configuration, parsed, and as it came (for delegated plugins).
#[derive(Clone, Debug)]
pub struct Config {
    pub conf: NetConf,
    pub raw: Vec<u8>,
}

impl Config {
    pub fn parse(raw: Vec<u8>) -> Result<Config, CniError> {
        let conf: NetConf = serde_json::from_slice(&raw).map_err(CniError::Decode)?;
        if !SUPPORTED_VERSIONS.contains(&conf.cni_version.as_str()) {
            return Err(CniError::IncompatibleVersion {
                version: conf.cni_version,
                supported: SUPPORTED_VERSIONS.join(", "),
            });
        }
        if conf.plugin != "palisade-cni" {
            return Err(CniError::InvalidConfig(format!(
                "type is {:?}, but this is palisade-cni",
                conf.plugin
            )));
        }
        if let Some(ipam) = &conf.ipam
            && (ipam.plugin.is_empty() || ipam.plugin.contains('/'))
        {
            return Err(CniError::InvalidConfig(format!(
                "ipam.type {:?} is not a plugin name",
                ipam.plugin
            )));
        }
        Ok(Config { conf, raw })
    }

    pub fn api(&self) -> PathBuf {
        self.conf
            .api
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_API))
    }

    /// `args.cni.labels`, split into the endpoint's namespace and its labels; None when the
    /// configuration gives no labels.
    pub fn labels(&self) -> Option<(Option<String>, Labels)> {
        let given = &self.conf.args.as_ref()?.cni.labels;
        if given.is_empty() {
            return None;
        }
        let mut namespace = None;
        let mut labels = Labels::new();
        for l in given {
            if l.key == NAMESPACE_LABEL {
                namespace = Some(l.value.clone());
            } else {
                labels.insert(l.key.clone(), l.value.clone());
            }
        }
        Some((namespace, labels))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_types_and_json_are_checked() {
        let e = Config::parse(b"{nope".to_vec()).unwrap_err();
        assert_eq!(e.code(), 6, "{e}");
        let e =
            Config::parse(br#"{"cniVersion":"0.2.0","type":"palisade-cni"}"#.to_vec()).unwrap_err();
        assert_eq!(e.code(), 1, "{e}");
        assert!(e.to_string().contains("0.2.0"), "{e}");
        let e = Config::parse(br#"{"cniVersion":"1.0.0","type":"bridge"}"#.to_vec()).unwrap_err();
        assert_eq!(e.code(), 7, "{e}");
        let e = Config::parse(
            br#"{"cniVersion":"1.0.0","type":"palisade-cni","ipam":{"type":"../x"}}"#.to_vec(),
        )
        .unwrap_err();
        assert!(e.to_string().contains("ipam.type"), "{e}");
    }

    #[test]
    fn labels_come_from_the_cni_conventions() {
        let c = Config::parse(
            br#"{"cniVersion":"1.1.0","name":"n","type":"palisade-cni","args":{"cni":{"labels":[{"key":"app","value":"web"},{"key":"palisade.io/namespace","value":"shop"}]}}}"#.to_vec(),
        )
        .unwrap();
        let (ns, labels) = c.labels().unwrap();
        assert_eq!(ns.as_deref(), Some("shop"));
        assert_eq!(labels["app"], "web");
        assert_eq!(c.api(), PathBuf::from(DEFAULT_API));
    }
}
