//! `policy what-if`: recorded connections and requests judged again, against the policies in
//! force and against those plus proposed ones, by the same compiler (`audit::compile`) and the
//! same decisions the datapath and the proxy make (`MapState::decide`, `ProxyPolicy::judge`).
//! Nothing is applied: identities for new CIDRs are allocated in a copy of the allocator, rule
//! numbers in a copy of the rule table.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddrV4};

use palisade_policies::{
    audit::{self, AuditScopes},
    compile::{self, CompileInput, RuleTable},
    l7::{ProxyPolicy, RequestView},
    mapstate::{MapState, RuleId, Verdict},
    model::{Direction, Policy, PolicyRef},
};

use crate::datapath::Datapath;
use crate::engine::Engine;
use crate::error::EngineError;
use crate::plumbing::Plumbing;

/// An HTTP request as a flow recorded it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpQuery {
    pub method: String,
    pub path: String,
    pub host: Option<String>,
}

/// One recorded connection (or request), as the side that judged it saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplayQuery {
    /// `ns/name` of the endpoint whose datapath (or whose L7 rules) judged it.
    pub endpoint: String,
    pub direction: Direction,
    /// The far end's address (for a request judged at the destination: the client's).
    pub peer: Ipv4Addr,
    pub protocol: u8,
    /// Destination port (0 for ICMP).
    pub port: u16,
    pub http: Option<HttpQuery>,
}

/// What one set of policies says about a query.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Judged {
    /// Policy lets it through (allow or redirect to the proxy; for a request: the proxy
    /// forwards it).
    pub allowed: bool,
    /// Allowed, but a policy in audit would deny it (reported as AUDIT).
    pub staged_deny: bool,
    /// The endpoint is in audit: a denial is reported as AUDIT, not dropped.
    pub endpoint_audit: bool,
    /// The deciding rule in words; None for defaults.
    pub rule: Option<String>,
    /// The verdict in words (`allowed by ...`, `default deny`, ...).
    pub reason: String,
}

/// A query judged twice.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Replayed {
    pub before: Judged,
    pub after: Judged,
}

struct HttpView<'a>(&'a HttpQuery);

impl RequestView for HttpView<'_> {
    fn method(&self) -> &str {
        &self.0.method
    }
    fn path(&self) -> &str {
        &self.0.path
    }
    fn host(&self) -> Option<&str> {
        self.0.host.as_deref()
    }
    fn header(&self, _: &str) -> Option<&[u8]> {
        None
    }
}

/// A compile of one set of policies, with what names its rules.
struct Compiled {
    state: MapState,
    proxy: ProxyPolicy,
    rules: RuleTable,
}

impl Compiled {
    fn rule(&self, id: RuleId) -> Option<String> {
        self.rules.get(id).map(compile::RuleOrigin::describe)
    }

    fn judge(&self, endpoint: palisade_policies::endpoint::EndpointId, q: &ReplayQuery) -> Judged {
        let ep = self.state.endpoints.get(&endpoint);
        let endpoint_audit = ep.is_some_and(|e| e.audit);
        let Some(ep) = ep else {
            return Judged {
                allowed: false,
                staged_deny: false,
                endpoint_audit,
                rule: None,
                reason: "the endpoint is not in the datapath".into(),
            };
        };
        if let Some(http) = &q.http {
            let (client, server) = match q.direction {
                Direction::Ingress => (
                    SocketAddrV4::new(q.peer, 0),
                    SocketAddrV4::new(ep.ip, q.port),
                ),
                Direction::Egress => (
                    SocketAddrV4::new(ep.ip, 0),
                    SocketAddrV4::new(q.peer, q.port),
                ),
            };
            let v = self.proxy.judge(client, server, &HttpView(http));
            let rule = self.rule(v.rule);
            let reason = match (&rule, v.allowed) {
                (Some(r), true) => format!("forwarded by the L7 proxy: {r}"),
                (None, true) => "forwarded by the L7 proxy (no HTTP rule applies)".into(),
                (Some(r), false) => format!("denied by the L7 proxy: no HTTP rule of {r} matches"),
                (None, false) => "denied by the L7 proxy".into(),
            };
            return Judged {
                allowed: v.allowed,
                staged_deny: false,
                endpoint_audit,
                rule,
                reason,
            };
        }
        let Some(d) = self
            .state
            .decide(endpoint, q.direction, q.peer, q.protocol, q.port)
        else {
            return Judged {
                allowed: false,
                staged_deny: false,
                endpoint_audit,
                rule: None,
                reason: "the endpoint is not in the datapath".into(),
            };
        };
        let rule = d.matched.and_then(|(_, e)| self.rule(e.rule));
        let (allowed, reason) = match d.verdict {
            Verdict::Allowed => (
                true,
                rule.as_ref().map_or_else(
                    || "allowed (no policy restricts it)".to_string(),
                    |r| format!("allowed by {r}"),
                ),
            ),
            Verdict::Redirected { .. } => (
                true,
                format!(
                    "redirected to the L7 proxy by {}",
                    rule.clone().unwrap_or_default()
                ),
            ),
            Verdict::DeniedByRule => (
                false,
                format!("denied by {}", rule.clone().unwrap_or_default()),
            ),
            Verdict::DeniedByDefault => (false, format!("default deny ({})", q.direction)),
        };
        let (staged_deny, reason, rule) = match d.staged_deny {
            Some(staged) => {
                let by = self
                    .rule(staged)
                    .unwrap_or_else(|| "the default deny of a policy in audit".into());
                (true, format!("audited: {by} would deny it"), Some(by))
            }
            None => (false, reason, rule),
        };
        Judged {
            allowed,
            staged_deny,
            endpoint_audit,
            rule,
            reason,
        }
    }
}

impl<D: Datapath, P: Plumbing> Engine<D, P> {
    /// Compiles `policies` as `sync` would compile the model, without changing anything.
    fn compile_as_if(
        &self,
        policies: &BTreeMap<PolicyRef, Policy>,
    ) -> Result<Compiled, EngineError> {
        let names = self.model.fqdns.names();
        let mut identities = self.model.identities.clone();
        let mut cidrs = compile::policy_cidrs(policies.values());
        cidrs.extend(compile::fqdn_prefixes(policies.values(), names));
        identities.sync_cidrs(&cidrs)?;
        let table = identities.table();
        let endpoints = self.compile_endpoints();
        let remote = self.remote_addresses();
        let input = CompileInput {
            endpoints: &endpoints,
            identities: table,
            policies,
            host_addresses: &self.host_addresses,
            remote: &remote,
            fqdns: names,
            settings: self.cfg.settings,
        };
        let audit_endpoints = self.audit_endpoints();
        let scopes = AuditScopes {
            namespaces: &self.model.namespace_modes,
            endpoints: &audit_endpoints,
        };
        let mut rules = self.rules.clone();
        let (state, l7) = audit::compile(&input, &scopes, &mut rules);
        let proxy = ProxyPolicy::new(&l7, &state)?;
        Ok(Compiled {
            state,
            proxy,
            rules,
        })
    }

    /// Judges each query against the policies in force, and against them plus `proposed`
    /// (replacing policies of the same kind, namespace and name). None for a query whose
    /// endpoint no longer exists.
    pub fn what_if(
        &self,
        proposed: Vec<Policy>,
        queries: &[ReplayQuery],
    ) -> Result<Vec<Option<Replayed>>, EngineError> {
        if proposed.is_empty() {
            return Err(EngineError::EmptyManifest);
        }
        let before = self.compile_as_if(&self.model.policies)?;
        let mut with = self.model.policies.clone();
        for p in proposed {
            with.insert(p.id.clone(), p);
        }
        let after = self.compile_as_if(&with)?;
        Ok(queries
            .iter()
            .map(|q| {
                let rec = self.model.endpoints.get(&q.endpoint)?;
                Some(Replayed {
                    before: before.judge(rec.id, q),
                    after: after.judge(rec.id, q),
                })
            })
            .collect())
    }
}
