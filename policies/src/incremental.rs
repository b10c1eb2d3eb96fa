//! Incremental compilation: the same answer as `compile::compile_with_l7`, recomputing only
//! the endpoints a change touches.
//!
//! The compiler keeps what it compiled last (the inputs, the selector cache, which specs
//! select each identity, what each endpoint's entries depend on). Given the new inputs it
//! finds what changed (policies, identities, endpoints, learned DNS names), turns identity
//! and name changes into per-clause added/removed deltas in the selector cache (a name whose
//! addresses changed updates only the `toFQDNs` clauses selecting it), and recompiles only
//! the endpoints that are new or changed, selected by a changed policy, or selected by a spec
//! naming a clause whose selection changed (and, when endpoints come, go or change, those
//! whose egress rules name ports, which depend on every endpoint's). DNS rules are compiled
//! with the endpoint that has them: [`Compiler::l7`] holds the DNS proxy's rules too. [`diff`] turns the result into map operations
//! against what the maps hold, reading only the touched endpoints' entries.

use ipnetwork::Ipv4Network;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use crate::compile::{
    CompileInput, EndpointCompiled, L7Policy, RuleTable, Settings, Shared, build_ipcache,
    compile_endpoint, endpoint_labels, resolve_specs, specs_selecting,
};
use crate::endpoint::{Endpoint, EndpointId};
use crate::fqdn::{LearnedNames, changed_names};
use crate::identity::{Identity, IdentityTable};
use crate::mapstate::{IpcacheEntry, MapDiff, MapState, PolicyKey, PortPrefix, RuleId};
use crate::merge::{Side, merge_join};
use crate::model::{Direction, Peer, Peers, Policy, PolicyRef};
use crate::selector::{IdentityDelta, LazyIndex, SelectorCache};

/// What the last compile saw.
#[derive(Clone, Debug)]
struct Previous {
    endpoints: BTreeMap<EndpointId, Endpoint>,
    identities: IdentityTable,
    policies: BTreeMap<PolicyRef, Policy>,
    fqdns: LearnedNames,
    settings: Settings,
}

/// What changed in the inputs since the last compile, as an incremental compile found it.
struct Changes {
    identities: IdentityDelta,
    names: BTreeSet<String>,
    policies: Vec<PolicyRef>,
}

/// What an endpoint's compiled entries depend on beyond its own record.
#[derive(Clone, Debug, Default)]
struct EndpointMeta {
    rules: BTreeSet<RuleId>,
    named_egress: bool,
}

/// The outcome of one compile: the recompiled endpoints, and the complete ipcache.
#[derive(Clone, Debug, Default)]
pub struct Delta {
    /// Everything was recompiled: `endpoints` holds every endpoint, and whatever the maps hold
    /// beyond it goes.
    pub full: bool,
    /// Recompiled endpoints; `None`: the endpoint is gone.
    pub endpoints: BTreeMap<EndpointId, Option<EndpointCompiled>>,
    pub ipcache: BTreeMap<Ipv4Network, IpcacheEntry>,
}

#[derive(Debug, Default)]
pub struct Compiler {
    prev: Option<Previous>,
    cache: SelectorCache,
    /// Specs selecting each identity an endpoint holds, in policy order.
    subjects: HashMap<Identity, Vec<(PolicyRef, usize)>>,
    meta: BTreeMap<EndpointId, EndpointMeta>,
    /// How many endpoints refer to each rule.
    rule_use: HashMap<RuleId, usize>,
    l7: L7Policy,
}

/// The peer clauses a policy names.
fn peers_of(policy: &Policy) -> impl Iterator<Item = &Peer> {
    policy.specs.iter().flat_map(|spec| {
        Direction::BOTH.into_iter().flat_map(move |d| {
            let dp = spec.direction(d);
            dp.allow
                .iter()
                .chain(&dp.deny)
                .flat_map(|rule| match &rule.peers {
                    Peers::All => [].iter(),
                    Peers::Some(list) => list.iter(),
                })
        })
    })
}

impl Compiler {
    /// Forgets everything: the next compile is a full one.
    pub fn reset(&mut self) {
        *self = Compiler::default();
    }

    /// The L7 policy of everything compiled so far.
    pub fn l7(&self) -> &L7Policy {
        &self.l7
    }

    /// Whether some compiled entry or L7 rule refers to `rule`.
    pub fn uses(&self, rule: RuleId) -> bool {
        self.rule_use.contains_key(&rule)
    }

    /// How many distinct peer clauses the selector cache holds.
    pub fn cached_selectors(&self) -> usize {
        self.cache.len()
    }

    /// Compiles `input`, recomputing what changed since the last call.
    pub fn compile(&mut self, input: &CompileInput<'_>, rules: &mut RuleTable) -> Delta {
        let full = self
            .prev
            .as_ref()
            .is_none_or(|p| p.settings != input.settings);
        let index = LazyIndex::new(input.identities, input.fqdns);
        let (touched, changes) = if full {
            self.reset();
            (input.endpoints.keys().copied().collect(), None)
        } else {
            let (touched, changes) = self.touched(input, &index);
            (touched, Some(changes))
        };
        let shared = Shared {
            input,
            index: &index,
        };
        let mut delta = Delta {
            full,
            endpoints: BTreeMap::new(),
            ipcache: build_ipcache(input),
        };
        for id in touched {
            self.forget(id);
            let Some(ep) = input.endpoints.get(&id) else {
                delta.endpoints.insert(id, None);
                continue;
            };
            let refs = self.subjects.entry(ep.identity).or_insert_with(|| {
                endpoint_labels(input.identities, ep)
                    .map(|l| specs_selecting(input.policies, l))
                    .unwrap_or_default()
            });
            let specs = resolve_specs(input.policies, refs);
            let compiled = compile_endpoint(&shared, &mut self.cache, rules, ep, &specs);
            let meta = EndpointMeta {
                rules: compiled.rules(),
                named_egress: compiled.named_egress,
            };
            for r in &meta.rules {
                *self.rule_use.entry(*r).or_default() += 1;
            }
            for (d, l7) in &compiled.l7 {
                self.l7.rules.insert((id, *d), l7.clone());
            }
            if let Some(dns) = &compiled.dns {
                self.l7.dns.insert(id, dns.clone());
            }
            self.meta.insert(id, meta);
            delta.endpoints.insert(id, Some(compiled));
        }
        // Identities no endpoint holds any more need no subjects.
        let held: HashSet<Identity> = input.endpoints.values().map(|e| e.identity).collect();
        self.subjects.retain(|id, _| held.contains(id));
        self.remember(input, changes);
        delta
    }

    /// Drops what an endpoint's last compile contributed.
    fn forget(&mut self, id: EndpointId) {
        if let Some(meta) = self.meta.remove(&id) {
            for r in meta.rules {
                if let Some(n) = self.rule_use.get_mut(&r) {
                    *n -= 1;
                    if *n == 0 {
                        self.rule_use.remove(&r);
                    }
                }
            }
        }
        for d in Direction::BOTH {
            self.l7.rules.remove(&(id, d));
        }
        self.l7.dns.remove(&id);
    }

    /// Keeps the inputs of this compile, changing only what changed: after an incremental
    /// compile, only the identities, names and policies `changes` lists are copied (a learned
    /// DNS answer changes one name and an identity or two among thousands).
    fn remember(&mut self, input: &CompileInput<'_>, changes: Option<Changes>) {
        let prev = self.prev.get_or_insert_with(|| Previous {
            endpoints: BTreeMap::new(),
            identities: IdentityTable::new(),
            policies: BTreeMap::new(),
            fqdns: LearnedNames::new(),
            settings: input.settings,
        });
        prev.settings = input.settings;
        sync_map(&mut prev.endpoints, input.endpoints);
        let Some(changes) = changes else {
            sync_map(&mut prev.identities, input.identities);
            sync_map(&mut prev.policies, input.policies);
            sync_map(&mut prev.fqdns, input.fqdns);
            return;
        };
        for id in &changes.identities.removed {
            prev.identities.remove(id);
        }
        prev.identities.extend(changes.identities.added);
        for r in changes.policies {
            match input.policies.get(&r) {
                Some(p) => prev.policies.insert(r, p.clone()),
                None => prev.policies.remove(&r),
            };
        }
        for name in changes.names {
            match input.fqdns.get(&name) {
                Some(a) => prev.fqdns.insert(name, a.clone()),
                None => prev.fqdns.remove(&name),
            };
        }
    }

    /// The endpoints whose entries may differ from the last compile's.
    fn touched(
        &mut self,
        input: &CompileInput<'_>,
        index: &LazyIndex<'_>,
    ) -> (BTreeSet<EndpointId>, Changes) {
        let prev = self
            .prev
            .as_ref()
            .expect("an incremental compile has a previous one");
        let mut touched = BTreeSet::new();

        // Endpoints that came, went or changed.
        for (id, ep) in input.endpoints {
            if prev.endpoints.get(id) != Some(ep) {
                touched.insert(*id);
            }
        }
        for id in prev.endpoints.keys() {
            if !input.endpoints.contains_key(id) {
                touched.insert(*id);
            }
        }
        if !touched.is_empty() {
            // Egress to named ports depends on every endpoint's identity and ports.
            touched.extend(
                self.meta
                    .iter()
                    .filter(|(_, m)| m.named_egress)
                    .map(|(id, _)| *id),
            );
        }

        // Identities: the selector cache follows, and says which clauses changed.
        let identity_delta = IdentityDelta::between(&prev.identities, input.identities);
        let mut changed_clauses = self.cache.update(&identity_delta);
        // Learned names: the `toFQDNs` clauses selecting a name whose addresses changed.
        let names = changed_names(&prev.fqdns, input.fqdns);
        self.cache
            .update_names(&names, &prev.fqdns, index, &mut changed_clauses);
        for id in &identity_delta.removed {
            self.subjects.remove(id);
        }

        // Policies that came, went or changed: the specs selecting each identity follow.
        let changed_policies: BTreeSet<&PolicyRef> = input
            .policies
            .iter()
            .filter(|(r, p)| prev.policies.get(*r) != Some(*p))
            .map(|(r, _)| r)
            .chain(
                prev.policies
                    .keys()
                    .filter(|r| !input.policies.contains_key(*r)),
            )
            .collect();
        let mut touched_identities: HashSet<Identity> = HashSet::new();
        if !changed_policies.is_empty() {
            for (identity, refs) in &mut self.subjects {
                let before = refs.len();
                refs.retain(|(r, _)| !changed_policies.contains(r));
                let mut changed = refs.len() != before;
                if let Some(labels) = input
                    .identities
                    .get(identity)
                    .and_then(crate::identity::IdentitySource::workload_labels)
                {
                    for r in &changed_policies {
                        if let Some(p) = input.policies.get(*r) {
                            for (i, spec) in p.specs.iter().enumerate() {
                                if spec.subject.0.matches(labels) {
                                    refs.push(((*r).clone(), i));
                                    changed = true;
                                }
                            }
                        }
                    }
                }
                if changed {
                    refs.sort();
                    touched_identities.insert(*identity);
                }
            }
            // Clauses no policy names any more.
            let named: HashSet<&Peer> = input.policies.values().flat_map(peers_of).collect();
            self.cache.retain(|p| named.contains(p));
        }

        // Identities selected by a spec naming a clause whose selection changed.
        if !changed_clauses.is_empty() {
            let mut affected: HashMap<&PolicyRef, bool> = HashMap::new();
            for (identity, refs) in &self.subjects {
                let hit = refs.iter().any(|(r, _)| {
                    *affected.entry(r).or_insert_with(|| {
                        input.policies.get(r).is_some_and(|p| {
                            peers_of(p).any(|peer| changed_clauses.contains_key(peer))
                        })
                    })
                });
                if hit {
                    touched_identities.insert(*identity);
                }
            }
        }
        if !touched_identities.is_empty() {
            touched.extend(
                input
                    .endpoints
                    .values()
                    .filter(|e| touched_identities.contains(&e.identity))
                    .map(|e| e.id),
            );
        }
        let changes = Changes {
            policies: changed_policies.into_iter().cloned().collect(),
            identities: identity_delta,
            names,
        };
        (touched, changes)
    }
}

/// Makes `kept` equal to `now`, cloning only the entries that differ.
fn sync_map<K: Ord + Clone, V: PartialEq + Clone>(kept: &mut BTreeMap<K, V>, now: &BTreeMap<K, V>) {
    kept.retain(|k, _| now.contains_key(k));
    for (k, v) in now {
        if kept.get(k) != Some(v) {
            kept.insert(k.clone(), v.clone());
        }
    }
}

/// The first policy key of an endpoint, in key order.
fn first_key(endpoint: EndpointId) -> PolicyKey {
    PolicyKey {
        endpoint,
        identity: Identity(0),
        direction: Direction::Ingress,
        protocol: None,
        port: PortPrefix::ANY,
    }
}

/// The map operations taking `applied` (what the maps hold) to the state `delta` describes:
/// only the recompiled endpoints' entries are read, unless the delta is a full one.
pub fn diff(applied: &MapState, delta: &Delta) -> MapDiff {
    if delta.full {
        let mut desired = MapState {
            ipcache: delta.ipcache.clone(),
            ..MapState::default()
        };
        for (id, c) in &delta.endpoints {
            if let Some(c) = c {
                desired
                    .policy
                    .extend(c.policy.iter().map(|(k, v)| (*k, *v)));
                if let Some(e) = c.entry {
                    desired.endpoints.insert(*id, e);
                }
            }
        }
        return crate::mapstate::diff(applied, &desired);
    }
    let mut out = MapDiff::default();
    for (id, c) in &delta.endpoints {
        let empty = BTreeMap::new();
        let new = c.as_ref().map_or(&empty, |c| &c.policy);
        let old = applied
            .policy
            .range(first_key(*id)..)
            .take_while(|(k, _)| k.endpoint == *id);
        let old: BTreeMap<&PolicyKey, _> = old.collect();
        out.policy_removals
            .extend(old.keys().filter(|k| !new.contains_key(**k)).map(|k| **k));
        for (k, v) in new {
            if old.get(k) != Some(&v) {
                out.policy_upserts.push((*k, *v));
            }
        }
        let new_entry = c.as_ref().and_then(|c| c.entry);
        match (applied.endpoints.get(id), new_entry) {
            (Some(old), None) => out.endpoint_removals.push((*id, *old)),
            (old, Some(new)) if old != Some(&new) => out.endpoint_upserts.push((*id, new)),
            _ => {}
        }
    }
    // One merge walk over both (sorted) ipcaches: thousands of learned addresses are
    // thousands of entries, compared at every change.
    for side in merge_join(&applied.ipcache, &delta.ipcache) {
        match side {
            Side::Left(k, _) => out.ipcache_removals.push(*k),
            Side::Right(k, v) => out.ipcache_upserts.push((*k, *v)),
            Side::Both(k, held, wanted) if held != wanted => {
                out.ipcache_upserts.push((*k, *wanted));
            }
            Side::Both(..) => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use proptest::prelude::*;

    use super::*;
    use crate::compile::{EnforcementMode, compile_with_l7};
    use crate::endpoint::{LinkLayer, NamedPort};
    use crate::fqdn::FqdnSelector;
    use crate::identity::{IdentityAllocator, IdentitySource, workload_identity_labels};
    use crate::l7::DnsPolicy;
    use crate::labels::{LabelSelector, Labels, NAMESPACE_LABEL};
    use crate::mapstate;
    use crate::model::{
        DirectionPolicy, EndpointSelector, Entity, HttpRule, PolicyKind, PolicySpec, Port,
        PortSpec, Protocol, Rule,
    };

    const APPS: [&str; 3] = ["a", "b", "c"];
    const NAMESPACES: [&str; 2] = ["x", "y"];

    /// One change to the little cluster.
    #[derive(Clone, Debug)]
    enum Step {
        /// Endpoint slot, namespace, app; replaces what the slot held.
        Join(u32, usize, usize),
        Leave(u32),
        /// Policy slot, shape, namespace, subject app, peer app, port.
        Apply(usize, usize, usize, usize, usize, u16),
        Delete(usize),
        Enforcement(usize),
        Remote(u8, Option<usize>),
        /// Name slot, address slot: the DNS proxy learned the address for the name.
        Learn(usize, usize),
        /// That address of that name expired.
        Expire(usize, usize),
    }

    /// Learned names: two under `*.a.test`, one beside them.
    const NAMES: [&str; 3] = ["api.a.test", "www.a.test", "x.b.test"];
    /// Addresses names learn: some inside the CIDR policies' prefixes (and their
    /// exceptions), some shared between names.
    const ADDRESSES: [[u8; 4]; 4] = [
        [10, 100, 80, 5],
        [10, 101, 7, 1],
        [192, 0, 2, 1],
        [192, 0, 2, 2],
    ];

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            3 => (0..6u32, 0..2usize, 0..3usize).prop_map(|(s, n, a)| Step::Join(s, n, a)),
            1 => (0..6u32).prop_map(Step::Leave),
            4 => (0..5usize, 0..11usize, 0..2usize, 0..3usize, 0..3usize, 79..82u16)
                .prop_map(|(s, k, n, a, b, p)| Step::Apply(s, k, n, a, b, p)),
            1 => (0..5usize).prop_map(Step::Delete),
            1 => (0..3usize).prop_map(Step::Enforcement),
            1 => (0..3u8, proptest::option::of(0..3usize)).prop_map(|(i, a)| Step::Remote(i, a)),
            3 => (0..3usize, 0..4usize).prop_map(|(n, a)| Step::Learn(n, a)),
            2 => (0..3usize, 0..4usize).prop_map(|(n, a)| Step::Expire(n, a)),
        ]
    }

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
            .collect()
    }

    fn app(ns: Option<&str>, app: &str) -> EndpointSelector {
        let s = LabelSelector::everything().with_label("app", app);
        EndpointSelector(match ns {
            Some(ns) => s.with_label(NAMESPACE_LABEL, ns),
            None => s,
        })
    }

    fn tcp(port: u16) -> PortSpec {
        PortSpec {
            protocol: Protocol::Tcp,
            port: Port::Range { port, end: port },
        }
    }

    /// Policies of eleven shapes: pod peers, CIDR peers with an exception, entities, deny
    /// rules, named ports both ways, HTTP rules, an egress-only policy, `toFQDNs` peers by
    /// name and by pattern, DNS rules (to pods, and to the cluster beside a `toFQDNs` rule).
    fn policy(
        slot: usize,
        shape: usize,
        ns: usize,
        subject: usize,
        peer: usize,
        port: u16,
    ) -> Policy {
        let ns = NAMESPACES[ns];
        let peers = |p: Vec<Peer>| Peers::Some(p);
        let rule = |peers, ports| Rule {
            peers,
            ports,
            http: None,
            dns: None,
        };
        let pods = peers(vec![Peer::Endpoints(app(Some(ns), APPS[peer]))]);
        let cidr = peers(vec![Peer::Cidr {
            cidr: format!("10.{}.0.0/16", 100 + peer).parse().unwrap(),
            except: vec![format!("10.{}.{port}.0/24", 100 + peer).parse().unwrap()],
        }]);
        let named = |name: &str| PortSpec {
            protocol: Protocol::Tcp,
            port: Port::Named(name.into()),
        };
        let (mut ingress, mut egress, mut ingress_deny) = (vec![], vec![], vec![]);
        match shape {
            0 => ingress.push(rule(pods, vec![tcp(port)])),
            1 => ingress.push(rule(cidr, vec![tcp(port), tcp(port + 1)])),
            2 => egress.push(rule(peers(vec![Peer::Entity(Entity::World)]), vec![])),
            3 => {
                ingress.push(rule(Peers::All, vec![]));
                ingress_deny.push(rule(pods, vec![tcp(port)]));
            }
            4 => egress.push(rule(pods, vec![named("http")])),
            5 => ingress.push(rule(pods, vec![named("http")])),
            6 => ingress.push(Rule {
                peers: pods,
                ports: vec![tcp(port)],
                http: Some(vec![HttpRule {
                    method: Some("GET".into()),
                    path: Some(format!("/v{port}/.*")),
                    host: None,
                    headers: vec![],
                    upgrades: vec![],
                }]),
                dns: None,
            }),
            7 => egress.push(rule(
                peers(vec![Peer::Entity(Entity::Cluster)]),
                vec![tcp(53)],
            )),
            8 => egress.push(rule(
                peers(vec![Peer::Fqdn(FqdnSelector::name(NAMES[peer]).unwrap())]),
                vec![tcp(port)],
            )),
            9 => {
                egress.push(Rule {
                    peers: peers(vec![Peer::Entity(Entity::Cluster)]),
                    ports: vec![PortSpec {
                        protocol: Protocol::Udp,
                        port: Port::Range { port: 53, end: 53 },
                    }],
                    http: None,
                    dns: Some(vec![FqdnSelector::pattern("*.a.test").unwrap()]),
                });
                egress.push(rule(
                    peers(vec![Peer::Fqdn(FqdnSelector::pattern("*.a.test").unwrap())]),
                    vec![],
                ));
            }
            _ => {
                egress.push(Rule {
                    peers: pods,
                    ports: vec![PortSpec {
                        protocol: Protocol::Any,
                        port: Port::Range { port: 53, end: 53 },
                    }],
                    http: None,
                    dns: Some(vec![FqdnSelector::name(NAMES[peer]).unwrap()]),
                });
                egress.push(rule(
                    peers(vec![
                        Peer::Fqdn(FqdnSelector::pattern("**.test").unwrap()),
                        Peer::Cidr {
                            cidr: "192.0.2.0/24".parse().unwrap(),
                            except: vec![],
                        },
                    ]),
                    vec![tcp(443)],
                ));
            }
        }
        let dir = |allow: Vec<Rule>, deny: Vec<Rule>| DirectionPolicy {
            default_deny: !allow.is_empty() || !deny.is_empty(),
            allow,
            deny,
        };
        Policy {
            id: PolicyRef {
                kind: PolicyKind::NetworkPolicy,
                namespace: Some(ns.into()),
                name: format!("p{slot}"),
            },
            specs: vec![PolicySpec {
                subject: app(Some(ns), APPS[subject]),
                ingress: dir(ingress, ingress_deny),
                egress: dir(egress, vec![]),
                description: None,
            }],
            // Staged policies are compiled whole by the engine (audit::compile), never here.
            audit: false,
        }
    }

    #[derive(Default)]
    struct World {
        alloc: IdentityAllocator,
        endpoints: BTreeMap<EndpointId, Endpoint>,
        slots: BTreeMap<usize, PolicyRef>,
        policies: BTreeMap<PolicyRef, Policy>,
        remote: BTreeMap<Ipv4Addr, Identity>,
        names: LearnedNames,
        settings: Settings,
    }

    impl World {
        fn identity(&mut self, ns: &str, a: &str) -> Identity {
            let ns_labels = labels(&[("kubernetes.io/metadata.name", ns)]);
            self.alloc
                .acquire(&workload_identity_labels(
                    ns,
                    &ns_labels,
                    &labels(&[("app", a)]),
                ))
                .unwrap()
        }

        fn step(&mut self, s: &Step) {
            match s {
                Step::Join(slot, ns, a) => {
                    let identity = self.identity(NAMESPACES[*ns], APPS[*a]);
                    let id = EndpointId(slot + 1);
                    self.endpoints.insert(
                        id,
                        Endpoint {
                            id,
                            name: format!("ep{slot}"),
                            namespace: NAMESPACES[*ns].into(),
                            identity,
                            ip: Ipv4Addr::new(10, 0, 0, u8::try_from(slot + 1).unwrap()),
                            ifindex: 100 + slot,
                            named_ports: vec![NamedPort {
                                name: "http".into(),
                                protocol: Protocol::Tcp,
                                port: 8000 + u16::try_from(*slot).unwrap(),
                            }],
                            link: LinkLayer::default(),
                        },
                    );
                }
                Step::Leave(slot) => {
                    self.endpoints.remove(&EndpointId(slot + 1));
                }
                Step::Apply(slot, shape, ns, subject, peer, port) => {
                    let p = policy(*slot, *shape, *ns, *subject, *peer, *port);
                    if let Some(old) = self.slots.insert(*slot, p.id.clone()) {
                        self.policies.remove(&old);
                    }
                    self.policies.insert(p.id.clone(), p);
                }
                Step::Delete(slot) => {
                    if let Some(old) = self.slots.remove(slot) {
                        self.policies.remove(&old);
                    }
                }
                Step::Enforcement(m) => {
                    self.settings.enforcement = [
                        EnforcementMode::Default,
                        EnforcementMode::Always,
                        EnforcementMode::Never,
                    ][*m];
                }
                Step::Learn(n, a) => {
                    self.names
                        .entry(NAMES[*n].to_string())
                        .or_default()
                        .insert(Ipv4Addr::from(ADDRESSES[*a]));
                }
                Step::Expire(n, a) => {
                    if let Some(ips) = self.names.get_mut(NAMES[*n]) {
                        ips.remove(&Ipv4Addr::from(ADDRESSES[*a]));
                        if ips.is_empty() {
                            self.names.remove(NAMES[*n]);
                        }
                    }
                }
                Step::Remote(i, a) => {
                    let ip = Ipv4Addr::new(10, 101, *i, 7);
                    match a {
                        Some(a) => {
                            let id = self.identity("y", APPS[*a]);
                            self.remote.insert(ip, id);
                        }
                        None => {
                            self.remote.remove(&ip);
                        }
                    }
                }
            }
        }

        /// The identity table a compile sees: workload identities only while something holds
        /// them (so identities also go away).
        fn table(&mut self) -> IdentityTable {
            // As the engine: policy CIDRs, and a /32 for every address a `toFQDNs` peer selects.
            let mut cidrs = crate::compile::policy_cidrs(self.policies.values());
            cidrs.extend(crate::compile::fqdn_prefixes(
                self.policies.values(),
                &self.names,
            ));
            self.alloc.sync_cidrs(&cidrs).unwrap();
            let held: BTreeSet<Identity> = self
                .endpoints
                .values()
                .map(|e| e.identity)
                .chain(self.remote.values().copied())
                .collect();
            self.alloc
                .table()
                .iter()
                .filter(|(id, src)| {
                    !matches!(src, IdentitySource::Workload { .. }) || held.contains(*id)
                })
                .map(|(id, src)| (*id, src.clone()))
                .collect()
        }
    }

    fn check(steps: &[Step]) -> Result<(), TestCaseError> {
        let mut world = World::default();
        let mut compiler = Compiler::default();
        let mut rules = RuleTable::default();
        let mut applied = MapState::default();
        let host = [Ipv4Addr::new(10, 0, 0, 254)];
        for s in steps {
            world.step(s);
            let table = world.table();
            let input = CompileInput {
                endpoints: &world.endpoints,
                identities: &table,
                policies: &world.policies,
                host_addresses: &host,
                remote: &world.remote,
                fqdns: &world.names,
                settings: world.settings,
            };
            let delta = compiler.compile(&input, &mut rules);
            let ops = diff(&applied, &delta);
            // The full compile, with the same rule numbers.
            let (full, full_l7) = compile_with_l7(&input, &mut rules.clone());
            prop_assert_eq!(&ops, &mapstate::diff(&applied, &full), "after {:?}", s);
            applied.apply_diff(&ops);
            prop_assert_eq!(&applied, &full, "after {:?}", s);
            prop_assert_eq!(compiler.l7(), &full_l7, "after {:?}", s);
            // The DNS proxy's policy, as the engine builds it from each.
            prop_assert_eq!(
                DnsPolicy::new(compiler.l7(), &applied),
                DnsPolicy::new(&full_l7, &full),
                "after {:?}",
                s
            );
            for e in full.policy.values() {
                prop_assert!(compiler.uses(e.rule));
            }
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]
        #[test]
        fn incremental_compile_equals_full_compile(steps in proptest::collection::vec(step(), 1..40)) {
            check(&steps)?;
        }
    }

    /// Compiles `world` once more: whether it was a full compile, and the endpoints recompiled.
    fn recompiled(
        world: &mut World,
        compiler: &mut Compiler,
        rules: &mut RuleTable,
    ) -> (bool, Vec<EndpointId>) {
        let table = world.table();
        let input = CompileInput {
            endpoints: &world.endpoints,
            identities: &table,
            policies: &world.policies,
            host_addresses: &[],
            remote: &world.remote,
            fqdns: &world.names,
            settings: world.settings,
        };
        let d = compiler.compile(&input, rules);
        (d.full, d.endpoints.keys().copied().collect())
    }

    #[test]
    fn a_policy_change_recompiles_only_the_endpoints_it_selects() {
        let mut world = World::default();
        for (slot, a) in [(0, 0), (1, 1), (2, 2)] {
            world.step(&Step::Join(slot, 0, a));
        }
        world.step(&Step::Apply(0, 0, 0, 0, 1, 80));
        let mut compiler = Compiler::default();
        let mut rules = RuleTable::default();
        let mut compile = |world: &mut World| recompiled(world, &mut compiler, &mut rules);
        assert_eq!(
            compile(&mut world),
            (true, vec![EndpointId(1), EndpointId(2), EndpointId(3)])
        );
        // The policy selects app a (endpoint 1); its port changes.
        world.step(&Step::Apply(0, 0, 0, 0, 1, 81));
        assert_eq!(compile(&mut world), (false, vec![EndpointId(1)]));
        // Nothing changed: nothing recompiled.
        assert_eq!(compile(&mut world), (false, vec![]));
        // A new peer of app b joins with b's identity (already known): only the new endpoint.
        world.step(&Step::Join(3, 0, 1));
        assert_eq!(compile(&mut world), (false, vec![EndpointId(4)]));
        // The last app-b endpoints leave: b's identity goes, the policy's clause loses it, and
        // the endpoint it selects is recompiled.
        world.step(&Step::Leave(1));
        world.step(&Step::Leave(3));
        assert_eq!(
            compile(&mut world),
            (false, vec![EndpointId(1), EndpointId(2), EndpointId(4)])
        );
    }

    #[test]
    fn a_learned_name_recompiles_only_the_endpoints_whose_rules_select_it() {
        let mut world = World::default();
        for (slot, a) in [(0, 0), (1, 1), (2, 2)] {
            world.step(&Step::Join(slot, 0, a));
        }
        // a: toFQDNs api.a.test; b: toFQDNs *.a.test with a DNS rule; c: pods, no names.
        world.step(&Step::Apply(0, 8, 0, 0, 0, 80));
        world.step(&Step::Apply(1, 9, 0, 1, 0, 80));
        world.step(&Step::Apply(2, 0, 0, 2, 0, 80));
        let mut compiler = Compiler::default();
        let mut rules = RuleTable::default();
        let mut compile = |world: &mut World| recompiled(world, &mut compiler, &mut rules);
        let (a, b) = (EndpointId(1), EndpointId(2));
        assert_eq!(compile(&mut world), (true, vec![a, b, EndpointId(3)]));
        // A new address for api.a.test: both names' clauses gain its identity.
        world.step(&Step::Learn(0, 2));
        assert_eq!(compile(&mut world), (false, vec![a, b]));
        // www.a.test learns the same address: no selection changes.
        world.step(&Step::Learn(1, 2));
        assert_eq!(compile(&mut world), (false, vec![]));
        // www.a.test learns another: only the pattern's endpoint.
        world.step(&Step::Learn(1, 3));
        assert_eq!(compile(&mut world), (false, vec![b]));
        // api.a.test's address expires, but www.a.test keeps it (and its identity): only the
        // name's endpoint loses it.
        world.step(&Step::Expire(0, 2));
        assert_eq!(compile(&mut world), (false, vec![a]));
    }
}
