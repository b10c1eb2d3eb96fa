//! HTTP rule matching for the L7 proxy. Pure: the proxy hands in the request (with the path
//! already normalized) and the peer's identities; this decides with the rules the compiler
//! produced (`compile::L7Policy`), the same rules that made the datapath redirect.
//!
//! Semantics (Cilium's): a request is allowed if any allow rule covering the peer and port
//! allows it; a covering rule without HTTP rules allows every request (the L4 wildcard); a
//! rule with HTTP rules allows a request matching any one of them, where every field given
//! must match: method, path and host as anchored regular expressions, headers present (or
//! equal to the value given, exactly).
//!
//! Upgrades (palisade's addition; Cilium has no say on them): a request asking to switch
//! protocols matches an HTTP rule only if every protocol it asks for other than `websocket` is
//! listed in that rule's `upgrades` (case-insensitively, `name` or `name/version` exactly as
//! offered). A covering rule without HTTP rules (the L4 wildcard) allows websocket upgrades
//! only, and so does a connection no side has HTTP rules for any more. `h2c` never reaches
//! the matcher: the proxy strips that offer before judging.

mod dns_policy;
mod proxy_policy;

use std::collections::BTreeMap;

use regex::Regex;

pub use dns_policy::{DnsPolicy, DnsVerdict};
pub use proxy_policy::{Ends, ProxyPolicy, RequestVerdict};

use crate::compile::{L7Policy, L7Rule};
use crate::endpoint::EndpointId;
use crate::identity::Identity;
use crate::mapstate::RuleId;
use crate::model::{Direction, HttpRule};

/// The upgrade protocol every rule that allows a request allows it to switch to: Cilium passes
/// websockets through HTTP rules.
pub const WEBSOCKET: &str = "websocket";

/// What the matcher needs to know about a request.
pub trait RequestView {
    fn method(&self) -> &str;
    /// The normalized path, without query.
    fn path(&self) -> &str;
    fn host(&self) -> Option<&str>;
    /// First value of a header, by case-insensitive name.
    fn header(&self, name: &str) -> Option<&[u8]>;
    /// The protocols the request asks to switch to (`name` or `name/version`, as offered),
    /// when it really asks to switch (an HTTP/1.1 `Upgrade` named in `Connection`); empty for
    /// an ordinary request. A view of requests that can upgrade must say so here: the default
    /// is for views of plain requests only.
    fn upgrades(&self) -> &[String] {
        &[]
    }
}

/// The protocols a request asks to switch to that a rule must list: all but `websocket`.
pub fn restricted_upgrades(req: &impl RequestView) -> impl Iterator<Item = &str> {
    req.upgrades()
        .iter()
        .map(String::as_str)
        .filter(|p| !p.eq_ignore_ascii_case(WEBSOCKET))
}

#[derive(Debug, thiserror::Error)]
#[error("HTTP rule field {field} has an invalid regular expression {pattern:?}: {source}")]
pub struct L7Error {
    pub field: &'static str,
    pub pattern: String,
    #[source]
    pub source: regex::Error,
}

/// The most memory one compiled HTTP-rule or flow-filter expression may take. Paths and
/// methods are short; the bound is what keeps a hostile one from costing tens of
/// milliseconds (and megabytes) each (`[^/]{2,3}{2,3}...` reaches regex's own 10 MB default).
pub const REGEX_SIZE_LIMIT: usize = 256 * 1024;
/// How deeply an expression may nest.
pub const REGEX_NEST_LIMIT: u32 = 64;

/// `pattern` matched against the whole value (`^(?:pattern)$`), as Cilium's HTTP rules and
/// Hubble's path filters mean it, within `REGEX_SIZE_LIMIT`. Validating and matching both
/// use this, so what passes validation is exactly what later matches.
pub fn anchored_regex(pattern: &str) -> Result<Regex, regex::Error> {
    regex::RegexBuilder::new(&format!("^(?:{pattern})$"))
        .size_limit(REGEX_SIZE_LIMIT)
        .dfa_size_limit(REGEX_SIZE_LIMIT)
        .nest_limit(REGEX_NEST_LIMIT)
        .build()
}

fn anchored(field: &'static str, pattern: Option<&String>) -> Result<Option<Regex>, L7Error> {
    pattern
        .map(|p| {
            anchored_regex(p).map_err(|source| L7Error {
                field,
                pattern: p.clone(),
                source,
            })
        })
        .transpose()
}

#[derive(Debug)]
struct CompiledHttp {
    method: Option<Regex>,
    path: Option<Regex>,
    host: Option<Regex>,
    /// Lowercase name, required value.
    headers: Vec<(String, Option<String>)>,
    /// Upgrade protocols allowed besides websocket, lower-case.
    upgrades: Vec<String>,
}

impl CompiledHttp {
    fn new(r: &HttpRule) -> Result<Self, L7Error> {
        Ok(Self {
            method: anchored("method", r.method.as_ref())?,
            path: anchored("path", r.path.as_ref())?,
            host: anchored("host", r.host.as_ref())?,
            headers: r
                .headers
                .iter()
                .map(|h| (h.name.to_ascii_lowercase(), h.value.clone()))
                .collect(),
            upgrades: r.upgrades.iter().map(|u| u.to_ascii_lowercase()).collect(),
        })
    }

    fn matches(&self, req: &impl RequestView) -> bool {
        self.matches_ignoring_upgrades(req) && self.unlisted_upgrade(req).is_none()
    }

    /// The first protocol the request asks to switch to that this rule does not allow.
    fn unlisted_upgrade<'r>(&self, req: &'r impl RequestView) -> Option<&'r str> {
        restricted_upgrades(req).find(|p| !self.upgrades.iter().any(|u| u.eq_ignore_ascii_case(p)))
    }

    /// Whether every field but `upgrades` matches.
    fn matches_ignoring_upgrades(&self, req: &impl RequestView) -> bool {
        let re = |r: &Option<Regex>, v: &str| r.as_ref().is_none_or(|r| r.is_match(v));
        let host_ok = match (&self.host, req.host()) {
            (None, _) => true,
            (Some(_), None) => false,
            // With or without the port: `api.example.com` matches `api.example.com:8080`.
            (Some(r), Some(h)) => {
                r.is_match(h) || h.rsplit_once(':').is_some_and(|(name, _)| r.is_match(name))
            }
        };
        re(&self.method, req.method())
            && re(&self.path, req.path())
            && host_ok
            && self
                .headers
                .iter()
                .all(|(name, value)| match (req.header(name), value) {
                    (None, _) => false,
                    (Some(_), None) => true,
                    (Some(got), Some(want)) => got == want.as_bytes(),
                })
    }
}

#[derive(Debug)]
struct CompiledRule {
    keys: Vec<(Identity, crate::mapstate::PortPrefix)>,
    /// None: every request (that asks for no upgrade but websocket).
    http: Option<Vec<CompiledHttp>>,
    rule: RuleId,
}

impl CompiledRule {
    fn allows(&self, req: &impl RequestView) -> bool {
        match &self.http {
            None => restricted_upgrades(req).next().is_none(),
            Some(hs) => hs.iter().any(|h| h.matches(req)),
        }
    }

    /// For a request this rule does not allow: the upgrade to blame, when the rule would allow
    /// the request if it asked for no upgrade but websocket.
    fn refused_upgrade<'r>(&self, req: &'r impl RequestView) -> Option<&'r str> {
        match &self.http {
            None => restricted_upgrades(req).next(),
            Some(hs) => hs
                .iter()
                .filter(|h| h.matches_ignoring_upgrades(req))
                .find_map(|h| h.unlisted_upgrade(req)),
        }
    }

    fn covers(&self, peers: &[Identity], port: u16) -> bool {
        self.keys
            .iter()
            .any(|(id, block)| (*id == Identity::ANY || peers.contains(id)) && block.contains(port))
    }
}

/// A side's verdict on a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct L7Verdict {
    pub allowed: bool,
    /// The rule that allowed it, or (when denied) the rule whose HTTP rules did not match
    /// (for a refused upgrade, the rule that would have allowed the request without it).
    pub rule: RuleId,
    /// When denied only because of an upgrade: the protocol no covering rule allows.
    pub refused_upgrade: Option<String>,
}

/// The L7 policy with its regular expressions compiled, ready for the proxy.
#[derive(Debug, Default)]
pub struct L7Matcher {
    sides: BTreeMap<(EndpointId, Direction), Vec<CompiledRule>>,
}

impl L7Matcher {
    pub fn new(policy: &L7Policy) -> Result<Self, L7Error> {
        let mut sides = BTreeMap::new();
        for (side, rules) in &policy.rules {
            let compiled = rules
                .iter()
                .map(|r: &L7Rule| {
                    Ok(CompiledRule {
                        keys: r.keys.clone(),
                        http: r
                            .http
                            .as_ref()
                            .map(|hs| {
                                hs.iter()
                                    .map(CompiledHttp::new)
                                    .collect::<Result<Vec<_>, _>>()
                            })
                            .transpose()?,
                        rule: r.rule,
                    })
                })
                .collect::<Result<Vec<_>, L7Error>>()?;
            sides.insert(*side, compiled);
        }
        Ok(Self { sides })
    }

    /// One side's verdict (the destination's ingress or the source's egress), or None when
    /// that side has no rule for this peer and port (its L3/L4 verdict stands).
    /// `peers` are the peer's identity and, for endpoint addresses, its CIDR alias.
    pub fn decide(
        &self,
        endpoint: EndpointId,
        direction: Direction,
        peers: &[Identity],
        port: u16,
        req: &impl RequestView,
    ) -> Option<L7Verdict> {
        let rules = self.sides.get(&(endpoint, direction))?;
        let covering: Vec<&CompiledRule> = rules.iter().filter(|r| r.covers(peers, port)).collect();
        let first = covering.first()?;
        if let Some(r) = covering.iter().find(|r| r.allows(req)) {
            return Some(L7Verdict {
                allowed: true,
                rule: r.rule,
                refused_upgrade: None,
            });
        }
        let refused = covering
            .iter()
            .find_map(|r| r.refused_upgrade(req).map(|p| (r.rule, p)));
        Some(match refused {
            Some((rule, protocol)) => L7Verdict {
                allowed: false,
                rule,
                refused_upgrade: Some(protocol.to_owned()),
            },
            None => L7Verdict {
                allowed: false,
                rule: first.rule,
                refused_upgrade: None,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mapstate::PortPrefix;
    use crate::model::HeaderMatch;

    struct Req {
        method: &'static str,
        path: &'static str,
        host: Option<&'static str>,
        headers: Vec<(&'static str, &'static str)>,
        upgrades: Vec<String>,
    }

    impl RequestView for Req {
        fn method(&self) -> &str {
            self.method
        }
        fn path(&self) -> &str {
            self.path
        }
        fn host(&self) -> Option<&str> {
            self.host
        }
        fn header(&self, name: &str) -> Option<&[u8]> {
            self.headers
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_bytes())
        }
        fn upgrades(&self) -> &[String] {
            &self.upgrades
        }
    }

    fn get(path: &'static str) -> Req {
        Req {
            method: "GET",
            path,
            host: Some("api.shop:8080"),
            headers: vec![],
            upgrades: vec![],
        }
    }

    fn upgrade(path: &'static str, protocols: &[&str]) -> Req {
        Req {
            upgrades: protocols.iter().map(|p| (*p).to_owned()).collect(),
            ..get(path)
        }
    }

    fn with_upgrades(mut h: HttpRule, upgrades: &[&str]) -> HttpRule {
        h.upgrades = upgrades.iter().map(|u| (*u).to_owned()).collect();
        h
    }

    const EP: EndpointId = EndpointId(1);
    const CLIENT: Identity = Identity(300);

    fn matcher(rules: Vec<L7Rule>) -> L7Matcher {
        let mut p = L7Policy::default();
        p.rules.insert((EP, Direction::Ingress), rules);
        L7Matcher::new(&p).unwrap()
    }

    fn http(method: Option<&str>, path: Option<&str>) -> HttpRule {
        HttpRule {
            method: method.map(String::from),
            path: path.map(String::from),
            ..HttpRule::default()
        }
    }

    fn rule(id: u32, peer: Identity, http: Option<Vec<HttpRule>>) -> L7Rule {
        L7Rule {
            keys: vec![(peer, PortPrefix::exact(8080))],
            http,
            rule: RuleId(id),
        }
    }

    fn decide(m: &L7Matcher, req: &Req) -> Option<L7Verdict> {
        m.decide(EP, Direction::Ingress, &[CLIENT], 8080, req)
    }

    #[test]
    fn method_and_path_are_anchored_regular_expressions() {
        let m = matcher(vec![rule(
            1,
            CLIENT,
            Some(vec![http(Some("GET"), Some("/public/.*"))]),
        )]);
        assert!(decide(&m, &get("/public/index.html")).unwrap().allowed);
        assert!(
            !decide(&m, &get("/private/public/x")).unwrap().allowed,
            "anchored at the start"
        );
        let post = Req {
            method: "POST",
            ..get("/public/x")
        };
        assert!(!decide(&m, &post).unwrap().allowed);
        let getx = Req {
            method: "GETX",
            ..get("/public/x")
        };
        assert!(!decide(&m, &getx).unwrap().allowed, "anchored at the end");
    }

    #[test]
    fn headers_must_be_present_or_equal() {
        let mut h = http(None, None);
        h.headers = vec![
            HeaderMatch {
                name: "X-Token".into(),
                value: Some("secret".into()),
            },
            HeaderMatch {
                name: "x-trace".into(),
                value: None,
            },
        ];
        let m = matcher(vec![rule(1, CLIENT, Some(vec![h]))]);
        let mut req = get("/");
        assert!(!decide(&m, &req).unwrap().allowed);
        req.headers = vec![("x-token", "secret"), ("X-Trace", "1")];
        assert!(decide(&m, &req).unwrap().allowed);
        req.headers = vec![("x-token", "Secret"), ("X-Trace", "1")];
        assert!(!decide(&m, &req).unwrap().allowed);
    }

    #[test]
    fn host_matches_with_or_without_port() {
        let h = HttpRule {
            host: Some("api\\.shop".into()),
            ..HttpRule::default()
        };
        let m = matcher(vec![rule(1, CLIENT, Some(vec![h]))]);
        assert!(decide(&m, &get("/")).unwrap().allowed);
        let other = Req {
            host: Some("evil.shop"),
            ..get("/")
        };
        assert!(!decide(&m, &other).unwrap().allowed);
        let none = Req {
            host: None,
            ..get("/")
        };
        assert!(!decide(&m, &none).unwrap().allowed);
    }

    #[test]
    fn an_l4_rule_for_the_same_peer_allows_every_request() {
        let m = matcher(vec![
            rule(1, CLIENT, Some(vec![http(Some("GET"), None)])),
            rule(2, Identity::ANY, None),
        ]);
        let post = Req {
            method: "POST",
            ..get("/")
        };
        let v = decide(&m, &post).unwrap();
        assert!(v.allowed);
        assert_eq!(v.rule, RuleId(2));
    }

    #[test]
    fn denial_names_the_rule_whose_http_rules_did_not_match() {
        let m = matcher(vec![rule(7, CLIENT, Some(vec![http(Some("GET"), None)]))]);
        let post = Req {
            method: "POST",
            ..get("/")
        };
        assert_eq!(
            decide(&m, &post),
            Some(L7Verdict {
                allowed: false,
                rule: RuleId(7),
                refused_upgrade: None,
            })
        );
    }

    #[test]
    fn websocket_upgrades_need_only_a_matching_rule() {
        let m = matcher(vec![rule(
            1,
            CLIENT,
            Some(vec![http(Some("GET"), Some("/public.*"))]),
        )]);
        for ws in ["websocket", "WebSocket"] {
            assert!(decide(&m, &upgrade("/public/ws", &[ws])).unwrap().allowed);
        }
        assert!(
            !decide(&m, &upgrade("/admin", &["websocket"]))
                .unwrap()
                .allowed
        );
    }

    #[test]
    fn other_upgrades_must_be_listed_by_the_matching_rule() {
        let m = matcher(vec![rule(
            4,
            CLIENT,
            Some(vec![
                http(Some("GET"), Some("/public.*")),
                with_upgrades(http(Some("GET"), Some("/spdy")), &["SPDY/3.1", "foo"]),
            ]),
        )]);
        // Listed by the rule that matches: allowed, whatever the case.
        assert!(
            decide(&m, &upgrade("/spdy", &["spdy/3.1"]))
                .unwrap()
                .allowed
        );
        assert!(
            decide(&m, &upgrade("/spdy", &["Foo", "websocket", "SPDY/3.1"]))
                .unwrap()
                .allowed
        );
        // Exactly as listed: another version, or a bare name, is another protocol.
        assert!(!decide(&m, &upgrade("/spdy", &["spdy/3"])).unwrap().allowed);
        assert!(!decide(&m, &upgrade("/spdy", &["spdy"])).unwrap().allowed);
        // Every protocol offered must be listed.
        let v = decide(&m, &upgrade("/spdy", &["spdy/3.1", "bar"])).unwrap();
        assert_eq!(
            v,
            L7Verdict {
                allowed: false,
                rule: RuleId(4),
                refused_upgrade: Some("bar".into()),
            }
        );
        // Listed by another HTTP rule than the one whose method and path match: refused.
        let v = decide(&m, &upgrade("/public/x", &["spdy/3.1"])).unwrap();
        assert!(!v.allowed);
        assert_eq!(v.refused_upgrade.as_deref(), Some("spdy/3.1"));
        // Denied for its path: the upgrade is not what is to blame.
        let v = decide(&m, &upgrade("/admin", &["spdy/3.1"])).unwrap();
        assert!(!v.allowed);
        assert_eq!(v.refused_upgrade, None);
        // The same request without the upgrade is allowed.
        assert!(decide(&m, &get("/public/x")).unwrap().allowed);
    }

    #[test]
    fn the_l4_wildcard_allows_websocket_upgrades_only() {
        let m = matcher(vec![
            rule(1, CLIENT, Some(vec![http(Some("GET"), Some("/public.*"))])),
            rule(2, Identity::ANY, None),
        ]);
        let v = decide(&m, &upgrade("/anything", &["websocket"])).unwrap();
        assert_eq!((v.allowed, v.rule), (true, RuleId(2)));
        let v = decide(&m, &upgrade("/anything", &["spdy/3.1"])).unwrap();
        assert_eq!(
            v,
            L7Verdict {
                allowed: false,
                rule: RuleId(2),
                refused_upgrade: Some("spdy/3.1".into()),
            }
        );
        // A rule that lists it still allows it next to the wildcard.
        let m = matcher(vec![
            rule(
                1,
                CLIENT,
                Some(vec![with_upgrades(http(None, None), &["spdy/3.1"])]),
            ),
            rule(2, Identity::ANY, None),
        ]);
        let v = decide(&m, &upgrade("/anything", &["spdy/3.1"])).unwrap();
        assert_eq!((v.allowed, v.rule), (true, RuleId(1)));
    }

    #[test]
    fn sides_and_peers_without_rules_have_no_opinion() {
        let m = matcher(vec![rule(1, CLIENT, Some(vec![http(Some("GET"), None)]))]);
        assert_eq!(
            m.decide(EP, Direction::Egress, &[CLIENT], 8080, &get("/")),
            None
        );
        assert_eq!(
            m.decide(EP, Direction::Ingress, &[Identity(999)], 8080, &get("/")),
            None
        );
        assert_eq!(
            m.decide(EP, Direction::Ingress, &[CLIENT], 9090, &get("/")),
            None
        );
    }

    #[test]
    fn invalid_regex_is_an_error_naming_the_field() {
        let mut p = L7Policy::default();
        p.rules.insert(
            (EP, Direction::Ingress),
            vec![rule(1, CLIENT, Some(vec![http(None, Some("(unclosed"))]))],
        );
        let e = L7Matcher::new(&p).unwrap_err();
        assert_eq!(e.field, "path");
    }
}
