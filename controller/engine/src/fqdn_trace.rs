//! `policy trace --to-fqdn`: what an endpoint's egress to a DNS name comes to. A name is not
//! an address, so the answer has three parts: which `toFQDNs` selectors of the policies
//! selecting the endpoint select the name, whether the DNS proxy answers the endpoint's
//! lookups of it, and, for every address the name's answers taught, the datapath's verdict as
//! `policy trace` gives it between two endpoints.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use palisade_policies::compile::{self, RuleOrigin};
use palisade_policies::fqdn::normalize_name;
use palisade_policies::identity::Identity;
use palisade_policies::model::{Direction, Peer, Peers, Protocol};

use crate::datapath::Datapath;
use crate::engine::Engine;
use crate::error::EngineError;
use crate::fqdn_learning::unix_now;
use crate::plumbing::Plumbing;
use crate::views::{TraceSide, trace_protocol};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FqdnTraceQuery {
    /// `NS/NAME` of the source endpoint.
    pub from: String,
    /// The DNS name, as a client would ask it (case and a trailing dot do not matter).
    pub name: String,
    pub port: u16,
    /// TCP (default), UDP, SCTP or ICMP.
    pub protocol: Option<String>,
}

/// Whether the DNS proxy answers the endpoint's lookups of the name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LookupVerdict {
    /// A `rules.dns` selector of a rule selecting the endpoint matches the name.
    Answered,
    /// The endpoint's lookups go through the DNS proxy, and no `rules.dns` selector matches
    /// the name: the proxy answers REFUSED.
    Refused,
    /// No rule selecting the endpoint has DNS rules: its lookups are not proxied, and teach
    /// nothing (addresses learned from other endpoints' lookups still count).
    NotProxied,
}

/// One address the name's answers taught, and the datapath's verdict on it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FqdnTraceAddress {
    pub address: Ipv4Addr,
    /// Seconds left of the longest-lived answer that taught it (0 once expired).
    pub ttl_remaining: u64,
    /// Expired, but kept while connections to it are open.
    pub held_by_connections: bool,
    pub egress: TraceSide,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FqdnTraceResult {
    /// `ns/name` of the source endpoint.
    pub endpoint: String,
    /// The name, normalized.
    pub name: String,
    pub protocol: Protocol,
    pub port: u16,
    pub source_identity: Identity,
    /// The endpoint's egress is in default deny.
    pub enforced: bool,
    /// The `toFQDNs` selectors that select the name, each with the rule holding it.
    pub selected_by: Vec<String>,
    pub lookup: LookupVerdict,
    /// The rules whose `rules.dns` answer the lookup (Answered), or that have DNS rules
    /// (Refused).
    pub lookup_rules: Vec<String>,
    pub addresses: Vec<FqdnTraceAddress>,
    /// A connection to the name, by whatever address a lookup gives now, is allowed.
    pub allowed: bool,
    /// Why, in words.
    pub reason: String,
}

impl<D: Datapath, P: Plumbing> Engine<D, P> {
    pub fn trace_fqdn(&self, req: &FqdnTraceQuery) -> Result<FqdnTraceResult, EngineError> {
        let src = self.find(&req.from)?;
        let name = normalize_name(&req.name).map_err(|reason| EngineError::InvalidDnsName {
            name: req.name.clone(),
            reason,
        })?;
        let (protocol, proto_num) = trace_protocol(req.protocol.as_deref())?;
        let what = format!("{}/{protocol}", req.port);
        let table = self.model.identities.table();
        let specs = compile::selecting_specs(self.policies(), table, &src.to_endpoint());
        let enforced = compile::enforced(&self.cfg.settings, &specs, Direction::Egress);

        let mut selected_by = Vec::new();
        let mut answering = Vec::new();
        let mut with_dns = Vec::new();
        for (policy, spec_index, spec) in &specs {
            for (rule_index, rule) in spec.egress.allow.iter().enumerate() {
                let origin = RuleOrigin::Policy {
                    policy: policy.id.clone(),
                    spec: *spec_index,
                    direction: Direction::Egress,
                    deny: false,
                    rule: rule_index,
                }
                .describe();
                if let Peers::Some(peers) = &rule.peers {
                    for peer in peers {
                        if let Peer::Fqdn(selector) = peer
                            && selector.matches(&name)
                        {
                            selected_by.push(format!("{origin} ({selector})"));
                        }
                    }
                }
                if let Some(names) = &rule.dns {
                    if let Some(selector) = names.iter().find(|n| n.matches(&name)) {
                        answering.push(format!("{origin} ({selector})"));
                    }
                    with_dns.push(origin);
                }
            }
        }
        let (lookup, lookup_rules) = match (answering.is_empty(), with_dns.is_empty()) {
            (false, _) => (LookupVerdict::Answered, answering),
            (true, false) => (LookupVerdict::Refused, with_dns),
            (true, true) => (LookupVerdict::NotProxied, Vec::new()),
        };

        // Every endpoint's answers for the name: toFQDNs peers select their union.
        let now = unix_now();
        let mut expiry: BTreeMap<Ipv4Addr, u64> = BTreeMap::new();
        for entry in self.model.fqdns.entries() {
            if entry.name == name {
                let slot = expiry.entry(entry.address).or_insert(0);
                *slot = (*slot).max(entry.expires);
            }
        }
        let mut addresses = Vec::new();
        for (address, expires) in expiry {
            let decision = self
                .applied
                .decide(src.id, Direction::Egress, address, proto_num, req.port)
                .ok_or_else(|| EngineError::EndpointNotInDatapath {
                    name: src.name.clone(),
                })?;
            addresses.push(FqdnTraceAddress {
                address,
                ttl_remaining: expires.saturating_sub(now),
                held_by_connections: expires <= now,
                egress: self.trace_side(src, Direction::Egress, &decision, table, &what),
            });
        }

        let ep = src.qualified_name();
        let (allowed, reason) = if !addresses.is_empty() {
            let denied = addresses.iter().filter(|a| !a.egress.allowed).count();
            if denied == 0 {
                (
                    true,
                    format!("every address learned for {name} is allowed from {ep} on {what}"),
                )
            } else {
                (
                    false,
                    format!(
                        "{denied} of the {} addresses learned for {name} are denied from {ep} on {what}",
                        addresses.len()
                    ),
                )
            }
        } else if !enforced {
            (
                true,
                format!("no policy puts {ep} in default deny for egress: allowed to any address"),
            )
        } else if selected_by.is_empty() {
            (
                false,
                format!(
                    "default deny: no toFQDNs selector of the policies selecting {ep} selects {name}"
                ),
            )
        } else {
            let how = match lookup {
                LookupVerdict::Answered => "a lookup of it by this endpoint",
                LookupVerdict::Refused | LookupVerdict::NotProxied => {
                    "a lookup of it that passes the DNS proxy (this endpoint's would not)"
                }
            };
            (
                false,
                format!(
                    "no address has been learned for {name} yet: {how} teaches them, and the answer is held until the datapath allows them"
                ),
            )
        };
        Ok(FqdnTraceResult {
            endpoint: ep,
            name,
            protocol,
            port: req.port,
            source_identity: src.identity,
            enforced,
            selected_by,
            lookup,
            lookup_rules,
            addresses,
            allowed,
            reason,
        })
    }
}
