//! Endpoints as the compiler sees them.

use std::fmt;
use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

use crate::identity::Identity;
use crate::model::Protocol;

/// Small per-node endpoint number used in map keys (never 0).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct EndpointId(pub u32);

impl fmt::Display for EndpointId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A named container port, as in a Pod spec (`--port http=8080/TCP`).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct NamedPort {
    pub name: String,
    pub protocol: Protocol,
    pub port: u16,
}

impl NamedPort {
    /// Parses `NAME=NUMBER[/PROTO]` (protocol defaults to TCP).
    pub fn parse(s: &str) -> Result<NamedPort, String> {
        let (name, rest) = s
            .split_once('=')
            .ok_or_else(|| format!("port {s:?} is not of the form NAME=NUMBER/PROTO"))?;
        let (number, proto) = rest.split_once('/').unwrap_or((rest, "TCP"));
        let port: u16 = number
            .parse()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| format!("port {s:?}: {number:?} is not a port number (1-65535)"))?;
        let Some(protocol @ (Protocol::Tcp | Protocol::Udp | Protocol::Sctp)) =
            Protocol::parse(proto)
        else {
            return Err(format!(
                "port {s:?}: protocol {proto:?} is not TCP, UDP or SCTP"
            ));
        };
        if !is_iana_svc_name(name) {
            return Err(format!(
                "port {s:?}: name {name:?} is not a valid port name (1-15 lowercase letters, digits and '-', with a letter)"
            ));
        }
        Ok(NamedPort {
            name: name.to_string(),
            protocol,
            port,
        })
    }
}

/// IANA service name rules, as Kubernetes applies them to container port names.
pub fn is_iana_svc_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 15
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && s.bytes().any(|b| b.is_ascii_lowercase())
        && !s.starts_with('-')
        && !s.ends_with('-')
        && !s.contains("--")
}

/// Link-layer facts of an endpoint's veth that the datapath needs: read by the agent from the
/// interfaces (never from a policy). All zero when unknown, which the datapath handles by
/// taking the node's own path.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
pub struct LinkLayer {
    /// MAC of the endpoint's own interface, inside its namespace.
    pub mac: [u8; 6],
    /// MAC of the host-side veth.
    pub host_mac: [u8; 6],
    /// The Linux bridge the host-side veth is a port of (chained after the CNI `bridge`
    /// plugin), if any: the endpoint's traffic is switched at L2, not routed by the node.
    pub bridge: Option<BridgeLink>,
}

/// A bridge, as the datapath reaches it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct BridgeLink {
    pub ifindex: u32,
    pub mac: [u8; 6],
}

/// An endpoint: what policy needs to know about it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoint {
    pub id: EndpointId,
    pub name: String,
    pub namespace: String,
    pub identity: Identity,
    pub ip: Ipv4Addr,
    /// Host-side interface index; the datapath finds the endpoint by it.
    pub ifindex: u32,
    pub named_ports: Vec<NamedPort>,
    /// Its veth's link layer, passed through to the endpoint map.
    #[serde(default)]
    pub link: LinkLayer,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn named_port_parses_with_default_protocol() {
        let p = NamedPort::parse("http=8080").unwrap();
        assert_eq!(
            (p.name.as_str(), p.port, p.protocol),
            ("http", 8080, Protocol::Tcp)
        );
        let p = NamedPort::parse("dns=53/udp").unwrap();
        assert_eq!(p.protocol, Protocol::Udp);
    }

    #[test]
    fn named_port_rejects_bad_names_numbers_and_protocols() {
        assert!(NamedPort::parse("HTTP=80").is_err());
        assert!(NamedPort::parse("80=80").is_err());
        assert!(NamedPort::parse("http=0").is_err());
        assert!(NamedPort::parse("http=70000").is_err());
        assert!(NamedPort::parse("http=80/ICMP").is_err());
        assert!(NamedPort::parse("http").is_err());
    }
}
