//! What the L7 proxy enforces: the compiled HTTP rules and who is behind an address, built by
//! the engine after every change and handed to the proxy (so requests on connections that are
//! already open are judged by the current policy). Judging a request is a plain function of it.

use std::collections::BTreeSet;
use std::net::SocketAddrV4;

use super::{L7Error, L7Matcher, L7Verdict, RequestView, restricted_upgrades};
use crate::compile::L7Policy;
use crate::endpoint::EndpointId;
use crate::identity::Identity;
use crate::mapstate::{IpcacheEntry, MapState, RuleId};
use crate::model::Direction;

#[derive(Debug, Default)]
pub struct ProxyPolicy {
    matcher: L7Matcher,
    /// Only the ipcache is filled: the datapath's view of addresses.
    addresses: MapState,
    /// Endpoints in audit: what their HTTP rules deny is forwarded, as audited.
    audited: BTreeSet<EndpointId>,
}

/// The proxy's verdict on one request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestVerdict {
    pub allowed: bool,
    /// Allowed only because the side whose rules deny it is in audit (`rule` denies it).
    pub audit: bool,
    pub rule: RuleId,
    /// When denied only because of an upgrade: the protocol no rule allows.
    pub refused_upgrade: Option<String>,
}

impl ProxyPolicy {
    pub fn new(l7: &L7Policy, state: &MapState) -> Result<Self, L7Error> {
        Ok(Self {
            matcher: L7Matcher::new(l7)?,
            addresses: MapState {
                ipcache: state.ipcache.clone(),
                ..MapState::default()
            },
            audited: state
                .endpoints
                .iter()
                .filter(|(_, e)| e.audit)
                .map(|(id, _)| *id)
                .collect(),
        })
    }

    pub fn peer(&self, addr: std::net::Ipv4Addr) -> IpcacheEntry {
        self.addresses.ipcache_lookup(addr)
    }

    fn identities(e: &IpcacheEntry) -> Vec<Identity> {
        std::iter::once(e.identity).chain(e.cidr_identity).collect()
    }

    /// Who is at both ends of a connection (looked up once per connection and policy).
    pub fn ends(&self, client: SocketAddrV4, destination: SocketAddrV4) -> Ends {
        Ends {
            client: self.peer(*client.ip()),
            destination: self.peer(*destination.ip()),
            port: destination.port(),
        }
    }

    /// Both ends may have HTTP rules: the destination's ingress and the client's egress; a
    /// request passes only if every side that has rules for this peer and port allows it.
    /// A request asking to upgrade to anything but websocket needs an HTTP rule listing the
    /// protocol: when no side has rules for the connection (any more), it is denied.
    pub fn judge(
        &self,
        client: SocketAddrV4,
        destination: SocketAddrV4,
        req: &impl RequestView,
    ) -> RequestVerdict {
        self.judge_ends(&self.ends(client, destination), req)
    }

    pub fn judge_ends(&self, ends: &Ends, req: &impl RequestView) -> RequestVerdict {
        let (c, d, port) = (&ends.client, &ends.destination, ends.port);
        let egress: Option<L7Verdict> = c.endpoint.and_then(|ep| {
            self.matcher
                .decide(ep, Direction::Egress, &Self::identities(d), port, req)
        });
        let ingress: Option<L7Verdict> = d.endpoint.and_then(|ep| {
            self.matcher
                .decide(ep, Direction::Ingress, &Self::identities(c), port, req)
        });
        let in_audit = |ep: Option<EndpointId>| ep.is_some_and(|e| self.audited.contains(&e));
        let sides = [(&egress, c.endpoint), (&ingress, d.endpoint)];
        let denying = sides
            .iter()
            .filter_map(|(v, ep)| v.as_ref().filter(|v| !v.allowed).map(|v| (v, *ep)));
        let mut audited = None;
        for (denied, ep) in denying {
            if !in_audit(ep) {
                return RequestVerdict {
                    allowed: false,
                    audit: false,
                    rule: denied.rule,
                    refused_upgrade: denied.refused_upgrade.clone(),
                };
            }
            audited.get_or_insert(denied.rule);
        }
        if let Some(rule) = audited {
            return RequestVerdict {
                allowed: true,
                audit: true,
                rule,
                refused_upgrade: None,
            };
        }
        let rule = ingress.as_ref().or(egress.as_ref()).map(|v| v.rule);
        if rule.is_none()
            && let Some(protocol) = restricted_upgrades(req).next()
        {
            return RequestVerdict {
                allowed: false,
                audit: false,
                rule: RuleId::NONE,
                refused_upgrade: Some(protocol.to_owned()),
            };
        }
        RequestVerdict {
            allowed: true,
            audit: false,
            rule: rule.unwrap_or(RuleId::NONE),
            refused_upgrade: None,
        }
    }
}

/// The two ends of a proxied connection, as the ipcache saw them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ends {
    pub client: IpcacheEntry,
    pub destination: IpcacheEntry,
    pub port: u16,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compile::L7Rule;
    use crate::endpoint::EndpointId;
    use crate::mapstate::PortPrefix;
    use crate::model::HttpRule;

    struct Get(&'static str);

    impl RequestView for Get {
        fn method(&self) -> &'static str {
            "GET"
        }
        fn path(&self) -> &str {
            self.0
        }
        fn host(&self) -> Option<&str> {
            None
        }
        fn header(&self, _: &str) -> Option<&[u8]> {
            None
        }
    }

    struct Upgrade(&'static str, Vec<String>);

    impl RequestView for Upgrade {
        fn method(&self) -> &'static str {
            "GET"
        }
        fn path(&self) -> &str {
            self.0
        }
        fn host(&self) -> Option<&str> {
            None
        }
        fn header(&self, _: &str) -> Option<&[u8]> {
            None
        }
        fn upgrades(&self) -> &[String] {
            &self.1
        }
    }

    fn policy() -> ProxyPolicy {
        let mut state = MapState::default();
        for (ip, ep, id) in [("10.0.0.2/32", 1, 300), ("10.0.0.3/32", 2, 301)] {
            state.ipcache.insert(
                ip.parse().unwrap(),
                IpcacheEntry {
                    identity: Identity(id),
                    endpoint: Some(EndpointId(ep)),
                    cidr_identity: None,
                },
            );
        }
        let mut l7 = L7Policy::default();
        l7.rules.insert(
            (EndpointId(2), Direction::Ingress),
            vec![L7Rule {
                keys: vec![(Identity(300), PortPrefix::exact(80))],
                http: Some(vec![HttpRule {
                    path: Some("/public/.*".into()),
                    ..HttpRule::default()
                }]),
                rule: RuleId(5),
            }],
        );
        l7.rules.insert(
            (EndpointId(1), Direction::Egress),
            vec![L7Rule {
                keys: vec![(Identity::ANY, PortPrefix::exact(80))],
                http: Some(vec![HttpRule {
                    path: Some("/public/a.*".into()),
                    ..HttpRule::default()
                }]),
                rule: RuleId(9),
            }],
        );
        ProxyPolicy::new(&l7, &state).unwrap()
    }

    #[test]
    fn both_sides_must_allow() {
        let p = policy();
        let (c, d) = (
            "10.0.0.2:40000".parse().unwrap(),
            "10.0.0.3:80".parse().unwrap(),
        );
        assert_eq!(
            p.judge(c, d, &Get("/public/a1")),
            RequestVerdict {
                allowed: true,
                audit: false,
                rule: RuleId(5),
                refused_upgrade: None,
            }
        );
        assert_eq!(
            p.judge(c, d, &Get("/public/b1")),
            RequestVerdict {
                allowed: false,
                audit: false,
                rule: RuleId(9),
                refused_upgrade: None,
            }
        );
        assert_eq!(
            p.judge(c, d, &Get("/private")),
            RequestVerdict {
                allowed: false,
                audit: false,
                rule: RuleId(9),
                refused_upgrade: None,
            }
        );
    }

    #[test]
    fn a_denial_by_a_side_in_audit_is_forwarded_as_audited() {
        let mut p = policy();
        // The client (endpoint 1) is in audit: its egress rule 9 denies /public/b1, the
        // server's ingress allows it.
        p.audited.insert(EndpointId(1));
        let (c, d) = (
            "10.0.0.2:40000".parse().unwrap(),
            "10.0.0.3:80".parse().unwrap(),
        );
        assert_eq!(
            p.judge(c, d, &Get("/public/b1")),
            RequestVerdict {
                allowed: true,
                audit: true,
                rule: RuleId(9),
                refused_upgrade: None,
            }
        );
        // The server is enforced: what its ingress denies stays denied.
        assert_eq!(
            p.judge(c, d, &Get("/private")),
            RequestVerdict {
                allowed: false,
                audit: false,
                rule: RuleId(5),
                refused_upgrade: None,
            }
        );
        assert!(!p.judge(c, d, &Get("/public/a1")).audit);
    }

    #[test]
    fn a_side_without_rules_for_the_port_has_no_say() {
        let p = policy();
        let (c, d) = (
            "10.0.0.2:40000".parse().unwrap(),
            "10.0.0.3:8080".parse().unwrap(),
        );
        assert!(p.judge(c, d, &Get("/anything")).allowed);
    }

    #[test]
    fn without_any_http_rule_only_websocket_upgrades_pass() {
        let p = policy();
        let (c, d) = (
            "10.0.0.2:40000".parse().unwrap(),
            "10.0.0.3:8080".parse().unwrap(),
        );
        let ws = Upgrade("/x", vec!["websocket".into()]);
        assert!(p.judge(c, d, &ws).allowed);
        let spdy = Upgrade("/x", vec!["websocket".into(), "spdy/3.1".into()]);
        assert_eq!(
            p.judge(c, d, &spdy),
            RequestVerdict {
                allowed: false,
                audit: false,
                rule: RuleId::NONE,
                refused_upgrade: Some("spdy/3.1".into()),
            }
        );
    }

    #[test]
    fn a_refused_upgrade_is_named() {
        let p = policy();
        let (c, d) = (
            "10.0.0.2:40000".parse().unwrap(),
            "10.0.0.3:80".parse().unwrap(),
        );
        let v = p.judge(c, d, &Upgrade("/public/a1", vec!["spdy/3.1".into()]));
        assert!(!v.allowed);
        assert_eq!(v.refused_upgrade.as_deref(), Some("spdy/3.1"));
    }
}
