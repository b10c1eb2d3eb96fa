//! Conversions between the compiler's map state and the shared `#[repr(C)]` map types. Pure,
//! so the exact bytes the datapath sees are unit-tested without root.

use std::net::{Ipv4Addr, SocketAddrV4};

use ipnetwork::Ipv4Network;
use palisade_common::{
    conntrack::{CT_FLAG_FROM_PROXY, CT_FLAG_PROXY_REDIRECT, CtEntry, CtKey},
    direction, endpoint as ep_flags,
    endpoint::EndpointInfo,
    family,
    ipcache::{IPCACHE_PREFIX_OFFSET_BITS, IpcacheKey, IpcacheValue},
    policy::{
        self as common_policy, POLICY_PREFIX_ANY_PORT, POLICY_PREFIX_ANY_PROTO, POLICY_PREFIX_FULL,
        PolicyValue,
    },
};
use palisade_engine::datapath::TrackedConnection;
use palisade_policies::{
    endpoint::{BridgeLink, EndpointId, LinkLayer},
    identity::Identity,
    mapstate::{
        Action, EndpointEntry, IpcacheEntry, PolicyEntry, PolicyKey, PortPrefix, RuleId, Staged,
        StagedEnforcement,
    },
    model::Direction,
};

/// A map entry the datapath holds that the agent cannot read back as map state.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("policy key has invalid prefix length {0}")]
    PolicyPrefix(u32),
    #[error("policy key has invalid direction {0}")]
    Direction(u8),
    #[error("policy value has invalid action {0} (or one its flags do not allow)")]
    Action(u8),
    #[error("policy value has unknown flags {0:#x}")]
    PolicyFlags(u8),
    #[error("ipcache key has family {family} / prefix length {prefix_len}")]
    IpcacheKey { family: u8, prefix_len: u32 },
}

pub fn direction_code(d: Direction) -> u8 {
    match d {
        Direction::Ingress => direction::INGRESS,
        Direction::Egress => direction::EGRESS,
    }
}

pub fn direction_from_code(code: u8) -> Option<Direction> {
    match code {
        direction::INGRESS => Some(Direction::Ingress),
        direction::EGRESS => Some(Direction::Egress),
        _ => None,
    }
}

pub fn policy_key(k: &PolicyKey) -> (u32, common_policy::PolicyKey) {
    let (prefix, protocol, port) = match k.protocol {
        None => (POLICY_PREFIX_ANY_PROTO, 0, 0),
        Some(p) => {
            let port = k.port.canonical();
            (POLICY_PREFIX_ANY_PORT + u32::from(port.bits), p, port.port)
        }
    };
    (
        prefix,
        common_policy::PolicyKey {
            endpoint_id: k.endpoint.0,
            identity: k.identity.0,
            direction: direction_code(k.direction),
            protocol,
            dport_be: port.to_be(),
        },
    )
}

pub fn policy_key_from(
    prefix: u32,
    k: &common_policy::PolicyKey,
) -> Result<PolicyKey, DecodeError> {
    let direction = direction_from_code(k.direction).ok_or(DecodeError::Direction(k.direction))?;
    let (protocol, port) = match prefix {
        POLICY_PREFIX_ANY_PROTO => (None, PortPrefix::ANY),
        p if (POLICY_PREFIX_ANY_PORT..=POLICY_PREFIX_FULL).contains(&p) => (
            Some(k.protocol),
            PortPrefix {
                port: u16::from_be(k.dport_be),
                bits: u8::try_from(p - POLICY_PREFIX_ANY_PORT)
                    .map_err(|_| DecodeError::PolicyPrefix(p))?,
            }
            .canonical(),
        ),
        p => return Err(DecodeError::PolicyPrefix(p)),
    };
    Ok(PolicyKey {
        endpoint: EndpointId(k.endpoint_id),
        identity: Identity(k.identity),
        direction,
        protocol,
        port,
    })
}

pub fn policy_value(e: PolicyEntry) -> PolicyValue {
    let (mut action, proxy_port) = match e.action {
        Action::Allow => (common_policy::action::ALLOW, 0),
        Action::Deny => (common_policy::action::DENY, 0),
        Action::Redirect { proxy_port } => (common_policy::action::REDIRECT, proxy_port),
    };
    let flags = if e.staged_denies() {
        common_policy::flags::STAGED_DENY
    } else {
        0
    };
    if e.staged == Staged::Only {
        action = common_policy::action::NONE;
    }
    PolicyValue {
        action,
        flags,
        proxy_port_be: proxy_port.to_be(),
        rule_id: e.rule.0,
    }
}

pub fn policy_entry_from(v: PolicyValue) -> Result<PolicyEntry, DecodeError> {
    let staged_deny = v.flags & common_policy::flags::STAGED_DENY != 0;
    if v.flags & !common_policy::flags::STAGED_DENY != 0 {
        return Err(DecodeError::PolicyFlags(v.flags));
    }
    let (action, staged) = match (v.action, staged_deny) {
        (common_policy::action::NONE, true) => (Action::Deny, Staged::Only),
        (common_policy::action::NONE, false) => (Action::Allow, Staged::Only),
        (common_policy::action::ALLOW, true) => (Action::Allow, Staged::Deny),
        (common_policy::action::ALLOW, false) => (Action::Allow, Staged::Same),
        (common_policy::action::DENY, false) => (Action::Deny, Staged::Same),
        (common_policy::action::REDIRECT, false) => (
            Action::Redirect {
                proxy_port: u16::from_be(v.proxy_port_be),
            },
            Staged::Same,
        ),
        (other, _) => return Err(DecodeError::Action(other)),
    };
    Ok(PolicyEntry {
        action,
        rule: RuleId(v.rule_id),
        staged,
    })
}

pub fn ipcache_key(prefix: Ipv4Network) -> (u32, IpcacheKey) {
    (
        IPCACHE_PREFIX_OFFSET_BITS + u32::from(prefix.prefix()),
        IpcacheKey::ipv4(prefix.network().octets()),
    )
}

pub fn ipcache_key_from(prefix_len: u32, k: &IpcacheKey) -> Result<Ipv4Network, DecodeError> {
    let bad = || DecodeError::IpcacheKey {
        family: k.family,
        prefix_len,
    };
    if k.family != family::IPV4
        || !(IPCACHE_PREFIX_OFFSET_BITS..=IPCACHE_PREFIX_OFFSET_BITS + 32).contains(&prefix_len)
    {
        return Err(bad());
    }
    let addr = Ipv4Addr::new(k.addr[0], k.addr[1], k.addr[2], k.addr[3]);
    let bits = u8::try_from(prefix_len - IPCACHE_PREFIX_OFFSET_BITS).map_err(|_| bad())?;
    Ipv4Network::new(addr, bits).map_err(|_| bad())
}

pub fn ipcache_value(e: &IpcacheEntry) -> IpcacheValue {
    IpcacheValue {
        identity: e.identity.0,
        endpoint_id: e.endpoint.map_or(0, |id| id.0),
        cidr_identity: e.cidr_identity.map_or(0, |id| id.0),
        flags: 0,
    }
}

pub fn ipcache_entry_from(v: &IpcacheValue) -> IpcacheEntry {
    IpcacheEntry {
        identity: Identity(v.identity),
        endpoint: (v.endpoint_id != 0).then_some(EndpointId(v.endpoint_id)),
        cidr_identity: (v.cidr_identity != 0).then_some(Identity(v.cidr_identity)),
    }
}

pub fn endpoint_info(id: EndpointId, e: &EndpointEntry) -> EndpointInfo {
    let mut flags = 0;
    if e.ingress_enforced {
        flags |= ep_flags::FLAG_INGRESS_ENFORCED;
    }
    if e.egress_enforced {
        flags |= ep_flags::FLAG_EGRESS_ENFORCED;
    }
    if e.audit {
        flags |= ep_flags::FLAG_AUDIT;
    }
    if e.staged.ingress {
        flags |= ep_flags::FLAG_STAGED_INGRESS_ENFORCED;
    }
    if e.staged.egress {
        flags |= ep_flags::FLAG_STAGED_EGRESS_ENFORCED;
    }
    let bridge = e.link.bridge.unwrap_or(BridgeLink {
        ifindex: 0,
        mac: [0; 6],
    });
    if e.link.bridge.is_some() {
        flags |= ep_flags::FLAG_BRIDGE_PORT;
    }
    let o = e.ip.octets();
    EndpointInfo {
        endpoint_id: id.0,
        identity: e.identity.0,
        flags,
        family: family::IPV4,
        _pad: [0; 3],
        addr: [o[0], o[1], o[2], o[3], 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        bridge_ifindex: bridge.ifindex,
        mac: e.link.mac,
        host_mac: e.link.host_mac,
        bridge_mac: bridge.mac,
        _pad2: [0; 2],
    }
}

pub fn endpoint_entry_from(ifindex: u32, v: &EndpointInfo) -> (EndpointId, EndpointEntry) {
    (
        EndpointId(v.endpoint_id),
        EndpointEntry {
            ifindex,
            identity: Identity(v.identity),
            ip: Ipv4Addr::new(v.addr[0], v.addr[1], v.addr[2], v.addr[3]),
            ingress_enforced: v.flags & ep_flags::FLAG_INGRESS_ENFORCED != 0,
            egress_enforced: v.flags & ep_flags::FLAG_EGRESS_ENFORCED != 0,
            audit: v.flags & ep_flags::FLAG_AUDIT != 0,
            staged: StagedEnforcement {
                ingress: v.flags & ep_flags::FLAG_STAGED_INGRESS_ENFORCED != 0,
                egress: v.flags & ep_flags::FLAG_STAGED_EGRESS_ENFORCED != 0,
            },
            link: LinkLayer {
                mac: v.mac,
                host_mac: v.host_mac,
                bridge: (v.flags & ep_flags::FLAG_BRIDGE_PORT != 0).then_some(BridgeLink {
                    ifindex: v.bridge_ifindex,
                    mac: v.bridge_mac,
                }),
            },
        },
    )
}

/// A conntrack entry as the engine sees a connection; None for keys that are not IPv4.
pub fn tracked_connection(k: &CtKey, e: &CtEntry) -> Option<TrackedConnection> {
    if k.family != family::IPV4 {
        return None;
    }
    let v4 = |a: &[u8; 16]| Ipv4Addr::new(a[0], a[1], a[2], a[3]);
    Some(TrackedConnection {
        endpoint: EndpointId(e.endpoint_id),
        scope: direction_from_code(k.scope)?,
        protocol: k.protocol,
        source: SocketAddrV4::new(v4(&k.saddr), u16::from_be(k.sport_be)),
        destination: SocketAddrV4::new(v4(&k.daddr), u16::from_be(k.dport_be)),
        through_proxy: e.flags & CT_FLAG_PROXY_REDIRECT != 0,
        from_proxy: e.flags & CT_FLAG_FROM_PROXY != 0,
        rule: RuleId(e.rule_id),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_keys_encode_prefix_lengths_and_network_order_ports() {
        let k = PolicyKey {
            endpoint: EndpointId(7),
            identity: Identity(300),
            direction: Direction::Egress,
            protocol: Some(6),
            port: PortPrefix {
                port: 8080,
                bits: 15,
            },
        };
        let (prefix, raw) = policy_key(&k);
        assert_eq!(prefix, 95);
        assert_eq!(raw.dport_be.to_ne_bytes(), 8080u16.to_be_bytes());
        assert_eq!(raw.direction, direction::EGRESS);
        assert_eq!(policy_key_from(prefix, &raw).unwrap(), k);

        let any = PolicyKey {
            protocol: None,
            port: PortPrefix::ANY,
            ..k
        };
        let (prefix, raw) = policy_key(&any);
        assert_eq!((prefix, raw.protocol, raw.dport_be), (72, 0, 0));
        assert_eq!(policy_key_from(prefix, &raw).unwrap(), any);
        assert!(policy_key_from(71, &raw).is_err());
        assert!(policy_key_from(97, &raw).is_err());
    }

    #[test]
    fn policy_values_round_trip() {
        for (action, staged) in [
            (Action::Allow, Staged::Same),
            (Action::Deny, Staged::Same),
            (Action::Redirect { proxy_port: 15001 }, Staged::Same),
            (Action::Allow, Staged::Deny),
            (Action::Allow, Staged::Only),
            (Action::Deny, Staged::Only),
        ] {
            let e = PolicyEntry {
                action,
                rule: RuleId(42),
                staged,
            };
            assert_eq!(policy_entry_from(policy_value(e)).unwrap(), e);
        }
        let only = policy_value(PolicyEntry {
            action: Action::Deny,
            rule: RuleId(1),
            staged: Staged::Only,
        });
        assert_eq!(
            (only.action, only.flags),
            (
                common_policy::action::NONE,
                common_policy::flags::STAGED_DENY
            )
        );
        let unknown_flag = PolicyValue {
            action: common_policy::action::ALLOW,
            flags: 0x80,
            ..PolicyValue::default()
        };
        assert!(policy_entry_from(unknown_flag).is_err());
        let bad = PolicyValue {
            action: 9,
            ..PolicyValue::default()
        };
        assert!(policy_entry_from(bad).is_err());
    }

    #[test]
    fn ipcache_prefix_length_counts_the_family_header() {
        let net: Ipv4Network = "10.1.0.0/16".parse().unwrap();
        let (len, key) = ipcache_key(net);
        assert_eq!(len, 48);
        assert_eq!(&key.addr[..4], &[10, 1, 0, 0]);
        assert_eq!(ipcache_key_from(len, &key).unwrap(), net);
        let e = IpcacheEntry {
            identity: Identity(300),
            endpoint: Some(EndpointId(3)),
            cidr_identity: None,
        };
        assert_eq!(ipcache_entry_from(&ipcache_value(&e)), e);
    }

    #[test]
    fn endpoint_flags_round_trip() {
        let e = EndpointEntry {
            ifindex: 9,
            identity: Identity(256),
            ip: Ipv4Addr::new(10, 200, 0, 5),
            ingress_enforced: true,
            egress_enforced: false,
            audit: true,
            staged: StagedEnforcement {
                ingress: false,
                egress: true,
            },
            link: LinkLayer {
                mac: [2, 0, 0, 0, 0, 1],
                host_mac: [2, 0, 0, 0, 0, 2],
                bridge: Some(BridgeLink {
                    ifindex: 3,
                    mac: [2, 0, 0, 0, 0, 3],
                }),
            },
        };
        let info = endpoint_info(EndpointId(4), &e);
        assert_eq!(
            info.flags,
            ep_flags::FLAG_INGRESS_ENFORCED
                | ep_flags::FLAG_AUDIT
                | ep_flags::FLAG_STAGED_EGRESS_ENFORCED
                | ep_flags::FLAG_BRIDGE_PORT
        );
        assert_eq!(
            (info.bridge_ifindex, info.bridge_mac),
            (3, [2, 0, 0, 0, 0, 3])
        );
        assert_eq!(endpoint_entry_from(9, &info), (EndpointId(4), e));
    }
}
