//! The ADD result (and what IPAM plugins and previous plugins return), written in the shape
//! of the version the runtime asked for: 0.4.0 puts `"version": "4"` on each address, 1.x
//! does not.

use serde::{Deserialize, Serialize};

use crate::config::Dns;

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Interface {
    pub name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub mac: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub sandbox: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpConfig {
    /// CIDR notation.
    pub address: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<String>,
    /// Index into `interfaces`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<usize>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    pub dst: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gw: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CniResult {
    #[serde(default)]
    pub interfaces: Vec<Interface>,
    #[serde(default)]
    pub ips: Vec<IpConfig>,
    #[serde(default)]
    pub routes: Vec<Route>,
    #[serde(default)]
    pub dns: Option<Dns>,
}

impl CniResult {
    /// The first IPv4 address, and the index of its interface, if any.
    pub fn first_ipv4(&self) -> Option<(std::net::Ipv4Addr, Option<usize>)> {
        self.ips.iter().find_map(|ip| {
            let addr = ip.address.split('/').next()?;
            addr.parse().ok().map(|a| (a, ip.interface))
        })
    }

    /// The result as the runtime's version shapes it.
    pub fn to_json(&self, version: &str) -> serde_json::Value {
        let mut v = serde_json::to_value(self).unwrap_or(serde_json::Value::Null);
        if let serde_json::Value::Object(map) = &mut v {
            map.insert("cniVersion".into(), version.into());
            if version == "0.4.0"
                && let Some(serde_json::Value::Array(ips)) = map.get_mut("ips")
            {
                for ip in ips {
                    if let serde_json::Value::Object(ip) = ip {
                        ip.insert("version".into(), "4".into());
                    }
                }
            }
            if matches!(map.get("dns"), Some(serde_json::Value::Null)) {
                map.insert("dns".into(), serde_json::json!({}));
            }
        }
        v
    }
}

/// A MAC address in the usual form.
pub fn mac(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> CniResult {
        CniResult {
            interfaces: vec![Interface {
                name: "eth0".into(),
                mac: "aa:bb:cc:dd:ee:ff".into(),
                sandbox: "/run/netns/x".into(),
            }],
            ips: vec![IpConfig {
                address: "10.88.0.5/32".into(),
                gateway: Some("169.254.1.1".into()),
                interface: Some(0),
            }],
            routes: vec![Route {
                dst: "0.0.0.0/0".into(),
                gw: Some("169.254.1.1".into()),
            }],
            dns: None,
        }
    }

    #[test]
    fn each_version_gets_its_shape() {
        let v04 = sample().to_json("0.4.0");
        assert_eq!(v04["cniVersion"], "0.4.0");
        assert_eq!(v04["ips"][0]["version"], "4");
        let v1 = sample().to_json("1.1.0");
        assert_eq!(v1["cniVersion"], "1.1.0");
        assert!(v1["ips"][0].get("version").is_none());
        assert_eq!(v1["interfaces"][0]["sandbox"], "/run/netns/x");
    }

    #[test]
    fn results_of_either_version_are_read() {
        let ipam: CniResult = serde_json::from_str(
            r#"{"cniVersion":"0.4.0","ips":[{"version":"4","address":"10.88.0.7/16","gateway":"10.88.0.1"}],"dns":{}}"#,
        )
        .unwrap();
        assert_eq!(
            ipam.first_ipv4(),
            Some((std::net::Ipv4Addr::new(10, 88, 0, 7), None))
        );
        assert_eq!(mac(&[0xde, 0xad, 0, 1, 2, 0xff]), "de:ad:00:01:02:ff");
    }
}
