//! Audit at every scope, and the namespace modes built on it.
//!
//! - **Agent-wide** (`Settings::audit`), **per namespace** (its mode, see [`NamespaceMode`])
//!   and **per endpoint**: the endpoint's datapath entry carries the audit flag, so whatever
//!   policy would drop at that endpoint is forwarded and reported as AUDIT, naming the rule
//!   (or the default deny) that would have dropped it.
//! - **Per policy** (`Policy::audit`, from the `palisade.io/audit: "true"` annotation or
//!   palisade.io/v1 `spec.audit: true`): the policy is *staged*. The datapath enforces the
//!   policies in force exactly as if it did not exist, and reports as AUDIT what it (with the
//!   others) would deny that they let through. [`compile`] compiles twice, with and without the
//!   staged policies, and [`merge_staged`] folds the second map state into the first as entry
//!   and endpoint flags (`Staged`, `StagedEnforcement`), so the datapath's one lookup answers
//!   both questions; `MapState::decide` answers them the way the BPF programs do.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::compile::{CompileInput, L7Policy, RuleTable, compile_with_l7};
use crate::endpoint::EndpointId;
use crate::mapstate::{Action, MapState, PolicyEntry, PolicyKey, Staged, StagedEnforcement};
use crate::model::{Direction, Policy, PolicyRef};

/// The annotation that puts a policy in audit (`"true"`), on a manifest's metadata. (An
/// endpoint is put in audit with `palisade endpoint audit`; a Pod annotation is not read.)
pub const AUDIT_ANNOTATION: &str = "palisade.io/audit";

/// The namespace label that carries a namespace's mode in Kubernetes (`discover`, `monitor`
/// or `protect`; absent: protect). The Kubernetes adapter reads it into the engine's
/// namespace mode, and it is not a security-relevant label: it never reaches identities (a
/// mode change must not renumber every workload of the namespace).
pub const MODE_LABEL: &str = "palisade.io/mode";

/// What a namespace does with policy, as NeuVector users know the modes.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum NamespaceMode {
    /// Everything is allowed and learned: the namespace's endpoints are in audit (nothing
    /// they send or receive is dropped by policy); their flows are what `policy suggest`
    /// turns into policy. AUDIT flows here are things to learn, not violations.
    Discover,
    /// The learned (or any applied) policy is evaluated in audit: what it would drop passes,
    /// as AUDIT flows that count as violations (`palisade_policy_violations_total`).
    Monitor,
    /// Policy is enforced (the default).
    #[default]
    Protect,
}

impl NamespaceMode {
    pub const ALL: [NamespaceMode; 3] = [
        NamespaceMode::Discover,
        NamespaceMode::Monitor,
        NamespaceMode::Protect,
    ];

    pub fn parse(s: &str) -> Option<NamespaceMode> {
        Some(match s {
            "discover" => NamespaceMode::Discover,
            "monitor" => NamespaceMode::Monitor,
            "protect" => NamespaceMode::Protect,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            NamespaceMode::Discover => "discover",
            NamespaceMode::Monitor => "monitor",
            NamespaceMode::Protect => "protect",
        }
    }

    /// Whether the namespace's endpoints are in audit.
    pub fn audits(self) -> bool {
        self != NamespaceMode::Protect
    }
}

impl fmt::Display for NamespaceMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The audit scopes besides the agent-wide one (which is `Settings::audit`) and the policies'
/// own flags.
#[derive(Clone, Copy, Debug)]
pub struct AuditScopes<'a> {
    /// Namespaces not in protect mode (absent: protect).
    pub namespaces: &'a BTreeMap<String, NamespaceMode>,
    /// Endpoints put in audit one by one.
    pub endpoints: &'a BTreeSet<EndpointId>,
}

impl AuditScopes<'_> {
    /// Why an endpoint is in audit, if it is: the first scope that says so.
    pub fn reason(&self, agent: bool, id: EndpointId, namespace: &str) -> Option<AuditReason> {
        if agent {
            Some(AuditReason::Agent)
        } else if let Some(mode) = self.namespaces.get(namespace).filter(|m| m.audits()) {
            Some(AuditReason::Namespace(*mode))
        } else if self.endpoints.contains(&id) {
            Some(AuditReason::Endpoint)
        } else {
            None
        }
    }
}

/// Which scope puts an endpoint in audit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuditReason {
    Agent,
    Namespace(NamespaceMode),
    Endpoint,
}

impl fmt::Display for AuditReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AuditReason::Agent => f.write_str("agent"),
            AuditReason::Namespace(mode) => write!(f, "namespace ({mode})"),
            AuditReason::Endpoint => f.write_str("endpoint"),
        }
    }
}

/// Compiles with every audit scope: the policies in force into map state and L7 policy (what
/// the datapath and the proxy enforce), the staged policies merged in as flags, and the audit
/// flag on every endpoint some scope puts in audit. Without staged policies this is
/// `compile_with_l7` plus the endpoint flags.
pub fn compile(
    input: &CompileInput<'_>,
    scopes: &AuditScopes<'_>,
    rules: &mut RuleTable,
) -> (MapState, L7Policy) {
    let (mut state, l7) = if input.policies.values().any(|p| p.audit) {
        let in_force: BTreeMap<PolicyRef, Policy> = input
            .policies
            .iter()
            .filter(|(_, p)| !p.audit)
            .map(|(r, p)| (r.clone(), p.clone()))
            .collect();
        let enforced = CompileInput {
            policies: &in_force,
            ..*input
        };
        let (mut state, l7) = compile_with_l7(&enforced, rules);
        let (all, _) = compile_with_l7(input, rules);
        merge_staged(&mut state, &all);
        (state, l7)
    } else {
        compile_with_l7(input, rules)
    };
    for (id, entry) in &mut state.endpoints {
        let namespace = input.endpoints.get(id).map_or("", |e| e.namespace.as_str());
        if scopes
            .reason(input.settings.audit, *id, namespace)
            .is_some()
        {
            entry.audit = true;
        }
    }
    (state, l7)
}

/// The entry a longest-prefix lookup of `key` finds in `policy` (`key` itself or its nearest
/// ancestor of the same endpoint, identity and direction).
fn lpm_at(policy: &BTreeMap<PolicyKey, PolicyEntry>, key: PolicyKey) -> Option<PolicyEntry> {
    let mut cur = Some(key);
    while let Some(k) = cur {
        if let Some(e) = policy.get(&k) {
            return Some(*e);
        }
        cur = k.parent();
    }
    None
}

/// What the merged map holds at a key where the policies in force answer `in_force` and all
/// policies (staged ones included) answer `all`.
fn combine(in_force: Option<PolicyEntry>, all: Option<PolicyEntry>) -> Option<PolicyEntry> {
    match (in_force, all) {
        (Some(e), _) if e.action == Action::Deny => Some(e),
        // What the policies in force allow, the staged ones deny: flows name the staged rule
        // (the allowing rule is not kept: what matches is audited, by that rule).
        (Some(e), Some(a)) if e.action == Action::Allow && a.action == Action::Deny => {
            Some(PolicyEntry {
                action: Action::Allow,
                rule: a.rule,
                staged: Staged::Deny,
            })
        }
        // A redirect goes through the proxy, which judges by the policies in force; a staged
        // redirect cannot be judged without the proxy: either way the entry stays as in force.
        (Some(e), _) => Some(e),
        (None, Some(a)) => Some(PolicyEntry {
            action: if a.action == Action::Deny {
                Action::Deny
            } else {
                Action::Allow
            },
            rule: a.rule,
            staged: Staged::Only,
        }),
        (None, None) => None,
    }
}

/// Folds `all` (compiled with the staged policies) into `in_force` (compiled without them,
/// from the same endpoints and identities): per endpoint and direction, every key either
/// holds gets the pair of answers the two states give there, so for any packet the merged
/// state's longest match is the key that both lookups would resolve through (see `combine`).
/// Endpoints `all` enforces in a direction that `in_force` does not get the staged default
/// deny.
pub fn merge_staged(in_force: &mut MapState, all: &MapState) {
    type Entries = BTreeMap<PolicyKey, PolicyEntry>;
    let side = |state: &MapState, ep: EndpointId, d: Direction| -> Entries {
        state
            .policy
            .iter()
            .filter(|(k, _)| k.endpoint == ep && k.direction == d)
            .map(|(k, e)| (*k, *e))
            .collect()
    };
    let endpoints: Vec<EndpointId> = in_force.endpoints.keys().copied().collect();
    for ep in endpoints {
        for d in Direction::BOTH {
            let (mine, theirs) = (side(in_force, ep, d), side(all, ep, d));
            if mine == theirs {
                continue;
            }
            let keys: BTreeSet<PolicyKey> = mine.keys().chain(theirs.keys()).copied().collect();
            for k in keys {
                match combine(lpm_at(&mine, k), lpm_at(&theirs, k)) {
                    Some(e) => in_force.policy.insert(k, e),
                    None => in_force.policy.remove(&k),
                };
            }
        }
        if let (Some(mine), Some(theirs)) =
            (in_force.endpoints.get_mut(&ep), all.endpoints.get(&ep))
        {
            mine.staged = StagedEnforcement {
                ingress: theirs.ingress_enforced && !mine.ingress_enforced,
                egress: theirs.egress_enforced && !mine.egress_enforced,
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::compile::{RuleOrigin, Settings, policy_cidrs};
    use crate::endpoint::Endpoint;
    use crate::identity::{IdentityAllocator, workload_identity_labels};
    use crate::labels::Labels;
    use crate::manifest::parse_manifests;
    use crate::mapstate::{RuleId, Verdict};

    /// A small cluster: namespaces a and b, five endpoints, policies from manifests.
    struct Cluster {
        alloc: IdentityAllocator,
        endpoints: BTreeMap<EndpointId, Endpoint>,
        policies: BTreeMap<PolicyRef, Policy>,
    }

    const PODS: [(&str, &str, [u8; 4]); 5] = [
        ("a", "app=web", [10, 0, 0, 1]),
        ("a", "app=api", [10, 0, 0, 2]),
        ("a", "app=db", [10, 0, 0, 3]),
        ("b", "app=web", [10, 0, 1, 1]),
        ("b", "app=batch", [10, 0, 1, 2]),
    ];

    impl Cluster {
        fn new(manifest: &str) -> Cluster {
            let mut alloc = IdentityAllocator::default();
            let mut endpoints = BTreeMap::new();
            for (i, (ns, label, ip)) in PODS.iter().enumerate() {
                let (k, v) = label.split_once('=').unwrap();
                let pod: Labels = [(k.to_string(), v.to_string())].into();
                let ns_labels: Labels =
                    [("kubernetes.io/metadata.name".to_string(), ns.to_string())].into();
                let identity = alloc
                    .acquire(&workload_identity_labels(ns, &ns_labels, &pod))
                    .unwrap();
                let id = EndpointId(u32::try_from(i).unwrap() + 1);
                endpoints.insert(
                    id,
                    Endpoint {
                        id,
                        name: format!("{ns}-{v}"),
                        namespace: (*ns).to_string(),
                        identity,
                        ip: Ipv4Addr::from(*ip),
                        ifindex: 100 + id.0,
                        named_ports: vec![],
                        link: crate::endpoint::LinkLayer::default(),
                    },
                );
            }
            let policies = parse_manifests(manifest)
                .unwrap()
                .into_iter()
                .map(|p| (p.id.clone(), p))
                .collect();
            Cluster {
                alloc,
                endpoints,
                policies,
            }
        }

        fn compile(&mut self, modes: &BTreeMap<String, NamespaceMode>) -> (MapState, RuleTable) {
            self.alloc
                .sync_cidrs(&policy_cidrs(self.policies.values()))
                .unwrap();
            let table = self.alloc.table();
            let host = [Ipv4Addr::new(10, 0, 0, 254)];
            let input = CompileInput {
                endpoints: &self.endpoints,
                identities: table,
                policies: &self.policies,
                host_addresses: &host,
                remote: &BTreeMap::new(),
                fqdns: &crate::fqdn::LearnedNames::new(),
                settings: Settings::default(),
            };
            let mut rules = RuleTable::default();
            let none = BTreeSet::new();
            let scopes = AuditScopes {
                namespaces: modes,
                endpoints: &none,
            };
            let (state, _) = compile(&input, &scopes, &mut rules);
            (state, rules)
        }

        /// The state of these policies all enforced (audit flags ignored).
        fn compile_all_enforced(&mut self) -> (MapState, RuleTable) {
            let saved = self.policies.clone();
            for p in self.policies.values_mut() {
                p.audit = false;
            }
            let out = self.compile(&BTreeMap::new());
            self.policies = saved;
            out
        }

        fn compile_in_force(&mut self) -> (MapState, RuleTable) {
            let saved = self.policies.clone();
            self.policies.retain(|_, p| !p.audit);
            let out = self.compile(&BTreeMap::new());
            self.policies = saved;
            out
        }
    }

    /// A rule in words, whichever table numbered it.
    fn named(rules: &RuleTable, id: RuleId) -> String {
        rules.get(id).map(RuleOrigin::describe).unwrap_or_default()
    }

    /// Every (endpoint, direction, peer, protocol, port) the tests ask about.
    fn questions() -> Vec<(EndpointId, Direction, Ipv4Addr, u8, u16)> {
        let peers: Vec<Ipv4Addr> = PODS
            .iter()
            .map(|(_, _, ip)| Ipv4Addr::from(*ip))
            .chain([
                Ipv4Addr::new(192, 0, 2, 7),
                Ipv4Addr::new(198, 51, 100, 9),
                Ipv4Addr::new(10, 0, 0, 254),
            ])
            .collect();
        let mut out = Vec::new();
        for ep in 1..=5 {
            for d in Direction::BOTH {
                for peer in &peers {
                    for (proto, port) in [(6, 80), (6, 443), (6, 5432), (6, 8080), (17, 53), (1, 8)]
                    {
                        out.push((EndpointId(ep), d, *peer, proto, port));
                    }
                }
            }
        }
        out
    }

    /// Rule snippets the generated policies are made of (ingress or egress side).
    const INGRESS: [&str; 6] = [
        "ingress: [{fromEndpoints: [{matchLabels: {app: web}}], toPorts: [{ports: [{port: \"80\"}]}]}]",
        "ingress: [{fromEndpoints: [{}]}]",
        "ingressDeny: [{fromEndpoints: [{matchLabels: {app: api}}], toPorts: [{ports: [{port: \"5432\"}]}]}]",
        "ingress: [{fromCIDR: [192.0.2.0/24], toPorts: [{ports: [{port: \"443\"}]}]}]",
        "ingress: [{fromEntities: [world]}]",
        "ingressDeny: [{fromEntities: [all], toPorts: [{ports: [{port: \"8080\"}]}]}]",
    ];
    const EGRESS: [&str; 5] = [
        "egress: [{toEndpoints: [{matchLabels: {app: db}}], toPorts: [{ports: [{port: \"5432\"}]}]}]",
        "egress: [{toCIDR: [198.51.100.0/24]}]",
        "egressDeny: [{toEndpoints: [{}], toPorts: [{ports: [{port: \"80\"}]}]}]",
        "egress: [{toEntities: [all], toPorts: [{ports: [{port: \"53\", protocol: UDP}]}]}]",
        "egress: []",
    ];
    const SUBJECTS: [&str; 4] = [
        "{}",
        "{matchLabels: {app: web}}",
        "{matchLabels: {app: db}}",
        "{matchLabels: {app: api}}",
    ];

    /// A deterministic little generator (xorshift), so failures reproduce.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self, n: usize) -> usize {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            usize::try_from(self.0 % u64::try_from(n).unwrap()).unwrap()
        }
    }

    fn generated_manifest(rng: &mut Rng) -> String {
        let mut docs = Vec::new();
        for i in 0..=rng.next(4) {
            let ns = if rng.next(3) == 0 { "b" } else { "a" };
            let audit = rng.next(2) == 0;
            let mut body = format!(
                "  endpointSelector: {}\n",
                SUBJECTS[rng.next(SUBJECTS.len())]
            );
            if rng.next(3) != 0 {
                body.push_str("  ");
                body.push_str(INGRESS[rng.next(INGRESS.len())]);
                body.push('\n');
            }
            if rng.next(2) == 0 {
                body.push_str("  ");
                body.push_str(EGRESS[rng.next(EGRESS.len())]);
                body.push('\n');
            }
            if !body.contains("gress") {
                body.push_str("  ingress: []\n");
            }
            let annotation = if audit {
                "\n  annotations: {palisade.io/audit: \"true\"}"
            } else {
                ""
            };
            docs.push(format!(
                "apiVersion: palisade.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: p{i}\n  namespace: {ns}{annotation}\nspec:\n{body}"
            ));
        }
        docs.join("---\n")
    }

    fn denied(v: Verdict) -> bool {
        matches!(v, Verdict::DeniedByRule | Verdict::DeniedByDefault)
    }

    /// The merged state answers, for every question, what the policies in force decide,
    /// and names a staged deny exactly when they allow it and all the policies together
    /// would deny it.
    #[test]
    fn merged_state_enforces_the_policies_in_force_and_reports_what_staged_ones_would_deny() {
        let mut rng = Rng(0x5eed_1234_abcd_0001);
        let mut staged_seen = 0;
        for case in 0..300 {
            let manifest = generated_manifest(&mut rng);
            let mut c = Cluster::new(&manifest);
            let (merged, rules) = c.compile(&BTreeMap::new());
            let (in_force, in_force_rules) = c.compile_in_force();
            let (all, all_rules) = c.compile_all_enforced();
            for (ep, d, peer, proto, port) in questions() {
                let m = merged.decide(ep, d, peer, proto, port).unwrap();
                let e = in_force.decide(ep, d, peer, proto, port).unwrap();
                let a = all.decide(ep, d, peer, proto, port).unwrap();
                let what =
                    format!("case {case} ep {ep} {d} peer {peer} {proto}/{port}\n{manifest}");
                assert_eq!(m.verdict, e.verdict, "{what}");
                // A staged deny names the staged rule instead of the one that allows.
                if m.staged_deny.is_none() {
                    assert_eq!(
                        m.matched.map(|(_, x)| (x.action, named(&rules, x.rule))),
                        e.matched
                            .map(|(_, x)| (x.action, named(&in_force_rules, x.rule))),
                        "{what}"
                    );
                } else {
                    assert_eq!(
                        m.matched.map(|(_, x)| x.action),
                        e.matched.map(|(_, x)| x.action)
                    );
                }
                let expect = (e.verdict == Verdict::Allowed && denied(a.verdict)).then(|| {
                    a.matched
                        .map_or(String::new(), |(_, x)| named(&all_rules, x.rule))
                });
                assert_eq!(m.staged_deny.map(|r| named(&rules, r)), expect, "{what}");
                if let Some(rule) = m.staged_deny.filter(|r| *r != RuleId::NONE) {
                    staged_seen += 1;
                    // The rule named belongs to a policy in audit.
                    let origin = rules.get(rule).expect("rule in the table");
                    let policy = origin.policy().expect("a policy's rule");
                    assert!(c.policies[policy].audit, "{what}");
                }
            }
        }
        assert!(
            staged_seen > 100,
            "the cases exercise staged denies ({staged_seen})"
        );
    }

    #[test]
    fn without_staged_policies_the_merge_changes_nothing() {
        let manifest = "apiVersion: palisade.io/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: a}\nspec:\n  endpointSelector: {}\n  ingress: [{fromEndpoints: [{}]}]\n";
        let mut c = Cluster::new(manifest);
        let (merged, _) = c.compile(&BTreeMap::new());
        assert_eq!(merged, c.compile_in_force().0);
        assert!(merged.policy.values().all(|e| e.staged == Staged::Same));
    }

    #[test]
    fn a_staged_default_deny_audits_what_nothing_allows() {
        let manifest = "apiVersion: palisade.io/v1\nkind: NetworkPolicy\nmetadata: {name: lock, namespace: a, annotations: {palisade.io/audit: \"true\"}}\nspec:\n  endpointSelector: {matchLabels: {app: db}}\n  ingress: [{fromEndpoints: [{matchLabels: {app: api}}]}]\n";
        let mut c = Cluster::new(manifest);
        let (s, rules) = c.compile(&BTreeMap::new());
        let db = EndpointId(3);
        assert!(s.endpoints[&db].staged.ingress && !s.endpoints[&db].ingress_enforced);
        let web = s
            .decide(db, Direction::Ingress, Ipv4Addr::new(10, 0, 0, 1), 6, 5432)
            .unwrap();
        assert_eq!(
            (web.verdict, web.staged_deny),
            (Verdict::Allowed, Some(RuleId::NONE))
        );
        let api = s
            .decide(db, Direction::Ingress, Ipv4Addr::new(10, 0, 0, 2), 6, 5432)
            .unwrap();
        assert_eq!((api.verdict, api.staged_deny), (Verdict::Allowed, None));
        // The policy in force's view names no rule of the staged policy.
        assert!(api.matched.is_none());
        assert!(
            rules.iter().any(
                |(_, o)| matches!(o, RuleOrigin::Policy { policy, .. } if policy.name == "lock")
            )
        );
    }

    #[test]
    fn namespace_modes_and_endpoints_put_endpoints_in_audit() {
        let mut c = Cluster::new(
            "apiVersion: palisade.io/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: a}\nspec:\n  endpointSelector: {}\n  ingress: []\n",
        );
        let modes: BTreeMap<String, NamespaceMode> = [
            ("a".to_string(), NamespaceMode::Monitor),
            ("b".to_string(), NamespaceMode::Protect),
        ]
        .into();
        let (s, _) = c.compile(&modes);
        for (id, e) in &s.endpoints {
            assert_eq!(e.audit, c.endpoints[id].namespace == "a", "{id}");
        }
        let one: BTreeSet<EndpointId> = [EndpointId(5)].into();
        let scopes = AuditScopes {
            namespaces: &modes,
            endpoints: &one,
        };
        assert_eq!(
            scopes.reason(false, EndpointId(1), "a"),
            Some(AuditReason::Namespace(NamespaceMode::Monitor))
        );
        assert_eq!(
            scopes.reason(false, EndpointId(5), "b"),
            Some(AuditReason::Endpoint)
        );
        assert_eq!(scopes.reason(false, EndpointId(4), "b"), None);
        assert_eq!(
            scopes.reason(true, EndpointId(4), "b"),
            Some(AuditReason::Agent)
        );
    }

    #[test]
    fn modes_parse_from_the_words_they_print() {
        for m in NamespaceMode::ALL {
            assert_eq!(NamespaceMode::parse(m.as_str()), Some(m));
        }
        assert_eq!(NamespaceMode::parse("learn"), None);
        assert_eq!(NamespaceMode::default(), NamespaceMode::Protect);
    }

    #[test]
    fn a_spec_field_or_the_annotation_puts_a_policy_in_audit() {
        let spec = "apiVersion: palisade.io/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: a}\nspec:\n  audit: true\n  endpointSelector: {}\n  ingress: []\n";
        assert!(parse_manifests(spec).unwrap()[0].audit);
        let k8s = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: a, annotations: {palisade.io/audit: \"true\"}}\nspec: {podSelector: {}}\n";
        assert!(parse_manifests(k8s).unwrap()[0].audit);
        let cilium = spec
            .replace("palisade.io/v1", "cilium.io/v2")
            .replace("kind: NetworkPolicy", "kind: CiliumNetworkPolicy");
        let err = parse_manifests(&cilium).unwrap_err();
        assert_eq!(err.field.as_deref(), Some("spec.audit"));
        let plain = spec.replace("  audit: true\n", "");
        assert!(!parse_manifests(&plain).unwrap()[0].audit);
    }
}
