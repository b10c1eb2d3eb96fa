//! What the DNS proxy enforces: each endpoint's egress allow rules that cover DNS servers,
//! with the names they let be asked, and who is behind an address. Built by the engine after
//! every change from the same compile that made the datapath redirect (the incremental
//! compiler keeps each endpoint's DNS rules with its entries); judging a query is a plain
//! function of it.
//!
//! Semantics (Cilium's): a query is allowed if any allow rule covering the server's identity,
//! the protocol and the port lets its name be asked; a covering rule without DNS rules lets
//! every name be asked (the L4 wildcard). Anything else is REFUSED. An endpoint without DNS
//! rules has nothing to judge here: the datapath's verdict stands.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddrV4};

use crate::compile::{DnsRule, L7Policy};
use crate::endpoint::EndpointId;
use crate::identity::Identity;
use crate::mapstate::{IpcacheEntry, MapState, RuleId};

#[derive(Debug, Default, PartialEq, Eq)]
pub struct DnsPolicy {
    rules: BTreeMap<EndpointId, Vec<DnsRule>>,
    /// Only the ipcache is filled: the datapath's view of addresses.
    addresses: MapState,
}

/// The proxy's verdict on one query.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DnsVerdict {
    pub allowed: bool,
    /// The rule that allowed it, or (denied) the first rule that covered the server;
    /// `RuleId::NONE` when no rule covers it at all.
    pub rule: RuleId,
}

impl DnsPolicy {
    pub fn new(l7: &L7Policy, state: &MapState) -> Self {
        Self {
            rules: l7.dns.clone(),
            addresses: MapState {
                ipcache: state.ipcache.clone(),
                ..MapState::default()
            },
        }
    }

    pub fn peer(&self, addr: Ipv4Addr) -> IpcacheEntry {
        self.addresses.ipcache_lookup(addr)
    }

    /// Judges a query for `name` (normalized) that `client` sent to `server` over
    /// `protocol` (6 or 17).
    pub fn judge(
        &self,
        client: Ipv4Addr,
        server: SocketAddrV4,
        protocol: u8,
        name: &str,
    ) -> DnsVerdict {
        let denied = DnsVerdict {
            allowed: false,
            rule: RuleId::NONE,
        };
        let Some(endpoint) = self.peer(client).endpoint else {
            return denied;
        };
        // An endpoint without DNS rules (any more) has its queries judged by the datapath
        // alone, as a flow redirected before a policy change is.
        let Some(rules) = self.rules.get(&endpoint) else {
            return DnsVerdict {
                allowed: true,
                rule: RuleId::NONE,
            };
        };
        let dst = self.peer(*server.ip());
        let identities: Vec<Identity> = std::iter::once(dst.identity)
            .chain(dst.cidr_identity)
            .collect();
        let covers = |r: &&DnsRule| {
            r.keys.iter().any(|(id, proto, port)| {
                (*id == Identity::ANY || identities.contains(id))
                    && proto.is_none_or(|p| p == protocol)
                    && port.contains(server.port())
            })
        };
        let covering: Vec<&DnsRule> = rules.iter().filter(covers).collect();
        if let Some(r) = covering.iter().find(|r| {
            r.names
                .as_ref()
                .is_none_or(|names| names.iter().any(|n| n.matches(name)))
        }) {
            return DnsVerdict {
                allowed: true,
                rule: r.rule,
            };
        }
        DnsVerdict {
            allowed: false,
            rule: covering.first().map_or(RuleId::NONE, |r| r.rule),
        }
    }

    /// Whether any endpoint has DNS rules.
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fqdn::FqdnSelector;
    use crate::mapstate::PortPrefix;
    use ipnetwork::Ipv4Network;

    const EP: EndpointId = EndpointId(1);
    const DNS_ID: Identity = Identity(300);

    fn policy() -> DnsPolicy {
        let mut l7 = L7Policy::default();
        l7.dns.insert(
            EP,
            vec![DnsRule {
                keys: vec![(DNS_ID, Some(17), PortPrefix::exact(53))],
                names: Some(vec![
                    FqdnSelector::name("api.example.test").unwrap(),
                    FqdnSelector::pattern("*.cdn.test").unwrap(),
                ]),
                rule: RuleId(7),
            }],
        );
        let mut state = MapState::default();
        state.ipcache.insert(
            Ipv4Network::from(Ipv4Addr::new(10, 0, 0, 2)),
            IpcacheEntry {
                identity: Identity(256),
                endpoint: Some(EP),
                cidr_identity: None,
            },
        );
        state.ipcache.insert(
            Ipv4Network::from(Ipv4Addr::new(10, 0, 0, 53)),
            IpcacheEntry {
                identity: DNS_ID,
                endpoint: Some(EndpointId(2)),
                cidr_identity: None,
            },
        );
        DnsPolicy::new(&l7, &state)
    }

    fn judge(p: &DnsPolicy, proto: u8, name: &str) -> DnsVerdict {
        p.judge(
            Ipv4Addr::new(10, 0, 0, 2),
            "10.0.0.53:53".parse().unwrap(),
            proto,
            name,
        )
    }

    #[test]
    fn listed_names_are_allowed_by_their_rule() {
        let p = policy();
        assert_eq!(
            judge(&p, 17, "api.example.test"),
            DnsVerdict {
                allowed: true,
                rule: RuleId(7)
            }
        );
        assert!(judge(&p, 17, "img.cdn.test").allowed);
    }

    #[test]
    fn other_names_are_refused_naming_the_covering_rule() {
        let p = policy();
        assert_eq!(
            judge(&p, 17, "evil.test"),
            DnsVerdict {
                allowed: false,
                rule: RuleId(7)
            }
        );
    }

    #[test]
    fn an_endpoint_without_dns_rules_is_judged_by_the_datapath_alone() {
        let p = DnsPolicy::new(&L7Policy::default(), &policy().addresses);
        assert!(judge(&p, 17, "anything.test").allowed);
        let stranger = p.judge(
            Ipv4Addr::new(10, 9, 9, 9),
            "10.0.0.53:53".parse().unwrap(),
            17,
            "a.test",
        );
        assert!(!stranger.allowed, "a client that is no endpoint is refused");
    }

    #[test]
    fn a_protocol_or_server_no_rule_covers_is_refused() {
        let p = policy();
        assert!(!judge(&p, 6, "api.example.test").allowed);
        let v = p.judge(
            Ipv4Addr::new(10, 0, 0, 2),
            "10.0.0.54:53".parse().unwrap(),
            17,
            "api.example.test",
        );
        assert_eq!(v.rule, RuleId::NONE);
        assert!(!v.allowed);
    }
}
