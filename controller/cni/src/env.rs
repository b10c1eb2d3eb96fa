//! The `CNI_*` variables a runtime sets, checked for the verb that needs them.

use std::collections::BTreeMap;
use std::path::PathBuf;

use crate::error::CniError;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verb {
    Add,
    Del,
    Check,
    Status,
    Gc,
    Version,
}

impl Verb {
    fn parse(s: &str) -> Option<Verb> {
        Some(match s {
            "ADD" => Verb::Add,
            "DEL" => Verb::Del,
            "CHECK" => Verb::Check,
            "STATUS" => Verb::Status,
            "GC" => Verb::Gc,
            "VERSION" => Verb::Version,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Verb::Add => "ADD",
            Verb::Del => "DEL",
            Verb::Check => "CHECK",
            Verb::Status => "STATUS",
            Verb::Gc => "GC",
            Verb::Version => "VERSION",
        }
    }
}

/// What `CNI_ARGS` carries that palisade reads.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CniArgs {
    pub k8s_pod_namespace: Option<String>,
    pub k8s_pod_name: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CniEnv {
    pub verb: Verb,
    pub container_id: String,
    pub netns: Option<PathBuf>,
    pub ifname: String,
    pub args: CniArgs,
    pub path: Vec<PathBuf>,
}

/// CNI_ARGS: `K=V;K=V`. Keys palisade does not know are an error unless `IgnoreUnknown=1`
/// is among them (the CNI convention).
fn parse_args(raw: &str) -> Result<CniArgs, CniError> {
    let bad = |why: String| CniError::InvalidEnvironment {
        name: "CNI_ARGS",
        why,
    };
    let mut pairs = BTreeMap::new();
    for part in raw.split(';').filter(|p| !p.is_empty()) {
        let (k, v) = part
            .split_once('=')
            .ok_or_else(|| bad(format!("{part:?} is not KEY=VALUE")))?;
        pairs.insert(k.to_string(), v.to_string());
    }
    let ignore_unknown = pairs
        .get("IgnoreUnknown")
        .is_some_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
    let mut args = CniArgs::default();
    for (k, v) in pairs {
        match k.as_str() {
            "IgnoreUnknown" | "K8S_POD_INFRA_CONTAINER_ID" | "K8S_POD_UID" => {}
            "K8S_POD_NAMESPACE" => args.k8s_pod_namespace = Some(v),
            "K8S_POD_NAME" => args.k8s_pod_name = Some(v),
            _ if ignore_unknown => {}
            _ => {
                return Err(CniError::UnsupportedField {
                    field: format!("CNI_ARGS {k}"),
                    value: v,
                });
            }
        }
    }
    Ok(args)
}

/// Container ids as the spec allows them: alphanumeric first, then alphanumerics, `_`, `.`, `-`.
fn valid_container_id(id: &str) -> bool {
    id.as_bytes().first().is_some_and(u8::is_ascii_alphanumeric)
        && id
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'))
}

impl CniEnv {
    /// Reads and checks the variables `get` gives (the process environment in the plugin).
    pub fn read(get: impl Fn(&str) -> Option<String>) -> Result<CniEnv, CniError> {
        let missing = |name: &'static str| CniError::InvalidEnvironment {
            name,
            why: "is required and missing".to_string(),
        };
        let raw_verb = get("CNI_COMMAND")
            .filter(|v| !v.is_empty())
            .ok_or_else(|| missing("CNI_COMMAND"))?;
        let verb = Verb::parse(&raw_verb).ok_or_else(|| CniError::InvalidEnvironment {
            name: "CNI_COMMAND",
            why: format!("{raw_verb:?} is not ADD, DEL, CHECK, STATUS, GC or VERSION"),
        })?;
        let needs = |name: &'static str, verbs: &[Verb]| -> Result<String, CniError> {
            match get(name).filter(|v| !v.is_empty()) {
                Some(v) => Ok(v),
                None if verbs.contains(&verb) => Err(missing(name)),
                None => Ok(String::new()),
            }
        };
        let container_id = needs("CNI_CONTAINERID", &[Verb::Add, Verb::Del, Verb::Check])?;
        if !container_id.is_empty() && !valid_container_id(&container_id) {
            return Err(CniError::InvalidEnvironment {
                name: "CNI_CONTAINERID",
                why: format!("{container_id:?} is not a valid container id"),
            });
        }
        let netns = needs("CNI_NETNS", &[Verb::Add, Verb::Check])?;
        let ifname = needs("CNI_IFNAME", &[Verb::Add, Verb::Del, Verb::Check])?;
        if ifname.len() > 15 || ifname.contains(['/', ' ']) || ifname == "." || ifname == ".." {
            return Err(CniError::InvalidEnvironment {
                name: "CNI_IFNAME",
                why: format!("{ifname:?} is not a valid interface name"),
            });
        }
        let path = get("CNI_PATH").unwrap_or_default();
        Ok(CniEnv {
            verb,
            container_id,
            netns: (!netns.is_empty()).then(|| PathBuf::from(netns)),
            ifname,
            args: parse_args(&get("CNI_ARGS").unwrap_or_default())?,
            path: std::env::split_paths(&path).collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Result<CniEnv, CniError> {
        let map: BTreeMap<String, String> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
            .collect();
        CniEnv::read(|k| map.get(k).cloned())
    }

    #[test]
    fn a_missing_variable_is_named() {
        let e = env(&[("CNI_COMMAND", "ADD"), ("CNI_CONTAINERID", "abc")]).unwrap_err();
        assert!(e.to_string().contains("CNI_NETNS"), "{e}");
        assert_eq!(e.code(), 4);
        let e = env(&[]).unwrap_err();
        assert!(e.to_string().contains("CNI_COMMAND"), "{e}");
        let e = env(&[("CNI_COMMAND", "PUT")]).unwrap_err();
        assert!(e.to_string().contains("\"PUT\""), "{e}");
    }

    #[test]
    fn del_needs_no_namespace_and_version_needs_nothing() {
        let e = env(&[
            ("CNI_COMMAND", "DEL"),
            ("CNI_CONTAINERID", "abc"),
            ("CNI_IFNAME", "eth0"),
        ])
        .unwrap();
        assert_eq!(e.netns, None);
        assert!(env(&[("CNI_COMMAND", "VERSION")]).is_ok());
    }

    #[test]
    fn cni_args_follow_the_conventions() {
        let base = [
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "abc"),
            ("CNI_NETNS", "/run/netns/x"),
            ("CNI_IFNAME", "eth0"),
        ];
        let with = |args: &str| {
            let mut v = base.to_vec();
            v.push(("CNI_ARGS", args));
            env(&v)
        };
        let k8s = with("K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-1;K8S_POD_UID=x").unwrap();
        assert_eq!(k8s.args.k8s_pod_namespace.as_deref(), Some("shop"));
        assert_eq!(k8s.args.k8s_pod_name.as_deref(), Some("web-1"));
        let e = with("FOO=bar").unwrap_err();
        assert_eq!(e.code(), 2, "{e}");
        assert!(e.to_string().contains("FOO=bar"), "{e}");
        assert!(with("IgnoreUnknown=1;FOO=bar").is_ok());
        assert!(with("nonsense").is_err());
    }

    #[test]
    fn container_ids_and_interface_names_are_checked() {
        let e = env(&[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "-x"),
            ("CNI_NETNS", "/n"),
            ("CNI_IFNAME", "eth0"),
        ])
        .unwrap_err();
        assert!(e.to_string().contains("CNI_CONTAINERID"), "{e}");
        let e = env(&[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "x"),
            ("CNI_NETNS", "/n"),
            ("CNI_IFNAME", "a-very-long-interface-name"),
        ])
        .unwrap_err();
        assert!(e.to_string().contains("CNI_IFNAME"), "{e}");
    }
}
