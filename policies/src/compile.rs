//! The policy compiler: endpoints + identities + policies -> map state.
//!
//! For each endpoint and direction, every rule of every policy spec that selects the endpoint
//! becomes policy-map entries keyed by peer identity, protocol and port block. Peers are
//! resolved to identities once per distinct selector (the selector cache). Afterwards, within
//! each (endpoint, direction, identity), an entry covered by a less specific entry of higher
//! precedence takes that entry's action ("deny is pushed down"), so the datapath's longest-prefix
//! match is always the right answer.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::Ipv4Addr;

use ipnetwork::Ipv4Network;
use serde::{Deserialize, Serialize};

use crate::endpoint::{Endpoint, EndpointId};
use crate::fqdn::{FqdnSelector, LearnedNames, selected_addresses};
use crate::identity::{Identity, IdentitySource, IdentityTable};
use crate::labels::Labels;
use crate::mapstate::{
    Action, EndpointEntry, IpcacheEntry, MapState, PolicyEntry, PolicyKey, PortPrefix, RuleId,
    Staged, StagedEnforcement, port_range_prefixes,
};
use crate::model::{
    Direction, Peer, Peers, Policy, PolicyRef, PolicySpec, Port, PortSpec, Protocol, Rule,
};
use crate::selector::{LazyIndex, SelectorCache};

/// Agent-wide policy enforcement mode (Cilium's `enable-policy`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EnforcementMode {
    /// An endpoint enforces a direction once a policy selecting it asks for default deny.
    #[default]
    Default,
    /// Every endpoint enforces both directions, selected or not.
    Always,
    /// Nothing is enforced, whatever the policies say.
    Never,
}

impl EnforcementMode {
    pub fn parse(s: &str) -> Option<EnforcementMode> {
        Some(match s {
            "default" => EnforcementMode::Default,
            "always" => EnforcementMode::Always,
            "never" => EnforcementMode::Never,
            _ => return None,
        })
    }

    /// The word `parse` reads.
    pub fn as_str(self) -> &'static str {
        match self {
            EnforcementMode::Default => "default",
            EnforcementMode::Always => "always",
            EnforcementMode::Never => "never",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Settings {
    pub enforcement: EnforcementMode,
    /// Traffic from the node itself may always reach its endpoints (health checks, probes),
    /// as Cilium's `allow-localhost` default.
    pub allow_host_ingress: bool,
    /// Audit mode: policy drops are reported but traffic is forwarded.
    pub audit: bool,
    /// Port of the L7 proxy; None while no proxy runs (redirects then drop, failing closed).
    pub proxy_port: Option<u16>,
    /// Port of the DNS proxy (UDP and TCP); None while none runs (DNS rules then drop).
    #[serde(default)]
    pub dns_proxy_port: Option<u16>,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            enforcement: EnforcementMode::Default,
            allow_host_ingress: true,
            audit: false,
            proxy_port: None,
            dns_proxy_port: None,
        }
    }
}

/// Where a policy map entry came from.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum RuleOrigin {
    Policy {
        policy: PolicyRef,
        spec: usize,
        direction: Direction,
        deny: bool,
        rule: usize,
    },
    /// The agent's allow-from-host setting.
    HostAccess,
}

impl RuleOrigin {
    pub fn policy(&self) -> Option<&PolicyRef> {
        match self {
            RuleOrigin::Policy { policy, .. } => Some(policy),
            RuleOrigin::HostAccess => None,
        }
    }

    /// Human-readable: `demo/allow-frontend ingress rule 0` or `host access (agent setting)`.
    pub fn describe(&self) -> String {
        match self {
            RuleOrigin::Policy {
                policy,
                spec,
                direction,
                deny,
                rule,
            } => {
                let spec = if *spec > 0 {
                    format!(" spec {spec}")
                } else {
                    String::new()
                };
                let kind = if *deny { "deny rule" } else { "rule" };
                format!("{policy}{spec} {direction} {kind} {rule}")
            }
            RuleOrigin::HostAccess => "host access (agent setting)".to_string(),
        }
    }
}

/// Stable numbers for rule origins, so an unchanged rule keeps its id across recompiles and
/// its map entries are not rewritten.
#[derive(Clone, Debug, Default)]
pub struct RuleTable {
    by_origin: BTreeMap<RuleOrigin, RuleId>,
    by_id: BTreeMap<RuleId, RuleOrigin>,
    next: u32,
}

impl RuleTable {
    pub fn intern(&mut self, origin: &RuleOrigin) -> RuleId {
        if let Some(id) = self.by_origin.get(origin) {
            return *id;
        }
        self.next += 1;
        let id = RuleId(self.next);
        self.by_origin.insert(origin.clone(), id);
        self.by_id.insert(id, origin.clone());
        id
    }

    pub fn get(&self, id: RuleId) -> Option<&RuleOrigin> {
        self.by_id.get(&id)
    }

    /// Every rule the table knows, by id.
    pub fn iter(&self) -> impl Iterator<Item = (RuleId, &RuleOrigin)> {
        self.by_id.iter().map(|(id, o)| (*id, o))
    }

    /// Forgets origins no map entry refers to any more.
    pub fn retain_used(&mut self, state: &MapState) {
        self.retain_used_with(state, &L7Policy::default());
    }

    /// Forgets origins neither a map entry nor an L7 rule refers to any more.
    pub fn retain_used_with(&mut self, state: &MapState, l7: &L7Policy) {
        let used: BTreeSet<RuleId> = state
            .policy
            .values()
            .map(|e| e.rule)
            .chain(l7.rules.values().flatten().map(|r| r.rule))
            .collect();
        self.by_id.retain(|id, _| used.contains(id));
        self.by_origin.retain(|_, id| used.contains(id));
    }

    /// Keeps the rules `used` accepts.
    pub fn retain(&mut self, used: impl Fn(RuleId) -> bool) {
        self.by_id.retain(|id, _| used(*id));
        self.by_origin.retain(|_, id| used(*id));
    }

    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }
}

pub struct CompileInput<'a> {
    pub endpoints: &'a BTreeMap<EndpointId, Endpoint>,
    pub identities: &'a IdentityTable,
    pub policies: &'a BTreeMap<PolicyRef, Policy>,
    /// The node's own addresses (identity `host`).
    pub host_addresses: &'a [Ipv4Addr],
    /// Addresses of the cluster outside this node, with their identities: other nodes' pods
    /// (their workload identity) and other nodes (`remote-node`). An endpoint of this node
    /// with the same address wins.
    pub remote: &'a BTreeMap<Ipv4Addr, Identity>,
    /// Names the DNS proxy learned and their addresses, for `toFQDNs` peers.
    pub fqdns: &'a LearnedNames,
    pub settings: Settings,
}

/// Every prefix a policy names (CIDRs and their exceptions): each gets a CIDR identity.
pub fn policy_cidrs<'a>(policies: impl IntoIterator<Item = &'a Policy>) -> BTreeSet<Ipv4Network> {
    let mut out = BTreeSet::new();
    for p in policies {
        for spec in &p.specs {
            for d in Direction::BOTH {
                let dp = spec.direction(d);
                for rule in dp.allow.iter().chain(&dp.deny) {
                    if let Peers::Some(peers) = &rule.peers {
                        for peer in peers {
                            if let Peer::Cidr { cidr, except } = peer {
                                out.insert(*cidr);
                                out.extend(except.iter().copied());
                            }
                        }
                    }
                }
            }
        }
    }
    out
}

/// Every address a `toFQDNs` peer of some policy selects now: each gets a CIDR identity of its
/// own (a /32), which the peer then selects.
pub fn fqdn_prefixes<'a>(
    policies: impl IntoIterator<Item = &'a Policy>,
    names: &LearnedNames,
) -> BTreeSet<Ipv4Network> {
    let mut out = BTreeSet::new();
    for p in policies {
        for spec in &p.specs {
            for rule in &spec.egress.allow {
                if let Peers::Some(peers) = &rule.peers {
                    for peer in peers {
                        if let Peer::Fqdn(sel) = peer {
                            out.extend(selected_addresses(sel, names).map(Ipv4Network::from));
                        }
                    }
                }
            }
        }
    }
    out
}

/// Whether any policy has `toFQDNs` peers or DNS rules: only then are names worth learning.
pub fn uses_dns(policies: &BTreeMap<PolicyRef, Policy>) -> bool {
    policies.values().flat_map(|p| &p.specs).any(|s| {
        s.egress.allow.iter().any(|r| {
            r.dns.is_some()
                || matches!(&r.peers, Peers::Some(ps) if ps.iter().any(|p| matches!(p, Peer::Fqdn(_))))
        })
    })
}

/// The workload labels of an endpoint's identity (empty if the identity is not a workload's).
pub(crate) fn endpoint_labels<'a>(
    identities: &'a IdentityTable,
    ep: &Endpoint,
) -> Option<&'a Labels> {
    identities
        .get(&ep.identity)
        .and_then(IdentitySource::workload_labels)
}

/// Policy specs selecting an endpoint, in policy order.
pub fn selecting_specs<'a>(
    policies: &'a BTreeMap<PolicyRef, Policy>,
    identities: &IdentityTable,
    ep: &Endpoint,
) -> Vec<(&'a Policy, usize, &'a PolicySpec)> {
    let Some(labels) = endpoint_labels(identities, ep) else {
        return Vec::new();
    };
    policies
        .values()
        .flat_map(|p| p.specs.iter().enumerate().map(move |(i, s)| (p, i, s)))
        .filter(|(_, _, s)| s.subject.0.matches(labels))
        .collect()
}

/// Whether an endpoint enforces a direction, given the specs that select it.
pub fn enforced(
    settings: &Settings,
    specs: &[(&Policy, usize, &PolicySpec)],
    d: Direction,
) -> bool {
    match settings.enforcement {
        EnforcementMode::Never => false,
        EnforcementMode::Always => true,
        EnforcementMode::Default => specs.iter().any(|(_, _, s)| s.direction(d).default_deny),
    }
}

/// (protocol, port block) pairs for one port clause, with named ports resolved by `resolve`.
fn port_blocks(spec: &PortSpec, named: &[(Protocol, u16)]) -> Vec<(Option<u8>, PortPrefix)> {
    let protocols: Vec<Protocol> = match spec.protocol {
        Protocol::Any => vec![Protocol::Tcp, Protocol::Udp, Protocol::Sctp],
        p => vec![p],
    };
    match &spec.port {
        Port::Any if spec.protocol == Protocol::Any => vec![(None, PortPrefix::ANY)],
        Port::Any => protocols
            .iter()
            .map(|p| (p.number(), PortPrefix::ANY))
            .collect(),
        Port::Range { port, end } => {
            let blocks = port_range_prefixes(*port, *end);
            protocols
                .iter()
                .flat_map(|p| blocks.iter().map(move |b| (p.number(), *b)))
                .collect()
        }
        Port::Named(_) => named
            .iter()
            .filter(|(p, _)| spec.protocol == Protocol::Any || *p == spec.protocol)
            .map(|(p, n)| (p.number(), PortPrefix::exact(*n)))
            .collect(),
    }
}

fn named_ports_of(ep: &Endpoint, name: &str) -> Vec<(Protocol, u16)> {
    ep.named_ports
        .iter()
        .filter(|np| np.name == name)
        .map(|np| (np.protocol, np.port))
        .collect()
}

/// Entries of one endpoint and direction, before push-down.
type DirectionEntries = BTreeMap<PolicyKey, PolicyEntry>;

fn insert(entries: &mut DirectionEntries, key: PolicyKey, entry: PolicyEntry) {
    match entries.get(&key) {
        Some(existing) if existing.action.rank() >= entry.action.rank() => {}
        _ => {
            entries.insert(key, entry);
        }
    }
}

struct RuleContext<'a, 'b, 'c> {
    input: &'b CompileInput<'a>,
    index: &'b LazyIndex<'c>,
    ep: &'b Endpoint,
    direction: Direction,
}

/// Every policy-map key a rule covers for the endpoint and direction in `ctx`.
fn rule_keys(
    ctx: &RuleContext<'_, '_, '_>,
    cache: &mut SelectorCache,
    rule: &Rule,
) -> Vec<PolicyKey> {
    let peers: Vec<Identity> = match &rule.peers {
        Peers::All => vec![Identity::ANY],
        Peers::Some(list) => {
            let mut ids = Vec::new();
            for p in list {
                ids.extend(cache.select(p, ctx.index).iter().copied());
            }
            ids.sort_unstable();
            ids.dedup();
            ids
        }
    };
    let key = |identity, protocol, port| PolicyKey {
        endpoint: ctx.ep.id,
        identity,
        direction: ctx.direction,
        protocol,
        port,
    };
    let mut keys = Vec::new();
    if rule.ports.is_empty() {
        keys.extend(peers.iter().map(|id| key(*id, None, PortPrefix::ANY)));
        return keys;
    }
    for spec in &rule.ports {
        match (&spec.port, ctx.direction) {
            // Egress to a named port: the number is the destination's, so it is resolved per
            // destination endpoint and keyed by that endpoint's identity.
            (Port::Named(name), Direction::Egress) => {
                for dst in ctx.input.endpoints.values() {
                    if !(peers.binary_search(&Identity::ANY).is_ok()
                        || peers.binary_search(&dst.identity).is_ok())
                    {
                        continue;
                    }
                    for (proto, block) in port_blocks(spec, &named_ports_of(dst, name)) {
                        keys.push(key(dst.identity, proto, block));
                    }
                }
            }
            (Port::Named(name), Direction::Ingress) => {
                let named = named_ports_of(ctx.ep, name);
                for (proto, block) in port_blocks(spec, &named) {
                    keys.extend(peers.iter().map(|id| key(*id, proto, block)));
                }
            }
            _ => {
                for (proto, block) in port_blocks(spec, &[]) {
                    keys.extend(peers.iter().map(|id| key(*id, proto, block)));
                }
            }
        }
    }
    keys
}

/// Gives every entry the action of its highest-precedence less specific entry, when that
/// outranks its own (e.g. a deny on all ports covers an allow on port 80). Less specific
/// entries share endpoint, identity and direction, so only runs of entries with more than one
/// key per (endpoint, identity, direction) need looking at.
fn push_down(entries: &mut DirectionEntries) {
    let mut updates: Vec<(PolicyKey, PolicyEntry)> = Vec::new();
    let keys: Vec<(PolicyKey, PolicyEntry)> = entries.iter().map(|(k, e)| (*k, *e)).collect();
    let same_run = |a: &PolicyKey, b: &PolicyKey| {
        (a.endpoint, a.identity, a.direction) == (b.endpoint, b.identity, b.direction)
    };
    for run in keys.chunk_by(|(a, _), (b, _)| same_run(a, b)) {
        if run.len() < 2 {
            continue;
        }
        let in_run: HashMap<PolicyKey, PolicyEntry> = run.iter().copied().collect();
        for (k, e) in run {
            let mut best = *e;
            let mut cur = k.parent();
            while let Some(p) = cur {
                if let Some(pe) = in_run.get(&p)
                    && pe.action.rank() > best.action.rank()
                {
                    best = *pe;
                }
                cur = p.parent();
            }
            if best != *e {
                updates.push((*k, best));
            }
        }
    }
    entries.extend(updates);
}

pub(crate) fn build_ipcache(input: &CompileInput<'_>) -> BTreeMap<Ipv4Network, IpcacheEntry> {
    let mut ipcache = BTreeMap::new();
    let world = Ipv4Network::new(Ipv4Addr::UNSPECIFIED, 0).expect("/0 is a valid prefix");
    ipcache.insert(
        world,
        IpcacheEntry {
            identity: Identity::WORLD,
            endpoint: None,
            cidr_identity: None,
        },
    );
    let cidrs: Vec<(Ipv4Network, Identity)> = input
        .identities
        .iter()
        .filter_map(|(id, src)| match src {
            IdentitySource::Cidr { prefix } => Some((*prefix, *id)),
            _ => None,
        })
        .collect();
    for (prefix, id) in &cidrs {
        if prefix.prefix() > 0 {
            ipcache.insert(
                *prefix,
                IpcacheEntry {
                    identity: *id,
                    endpoint: None,
                    cidr_identity: None,
                },
            );
        }
    }
    for addr in input.host_addresses {
        ipcache.insert(
            Ipv4Network::from(*addr),
            IpcacheEntry {
                identity: Identity::HOST,
                endpoint: None,
                cidr_identity: None,
            },
        );
    }
    // The most specific policy CIDR holding a cluster address, as its endpoint-address alias:
    // ipBlock rules apply to pod addresses too. Looked up by prefix length, longest first.
    let by_prefix: HashMap<(u32, u8), Identity> = cidrs
        .iter()
        .map(|(p, id)| ((u32::from(p.network()), p.prefix()), *id))
        .collect();
    let mut lengths: Vec<u8> = cidrs.iter().map(|(p, _)| p.prefix()).collect();
    lengths.sort_unstable_by(|a, b| b.cmp(a));
    lengths.dedup();
    let alias = |ip: Ipv4Addr| {
        lengths.iter().find_map(|len| {
            let mask = u32::MAX.checked_shl(32 - u32::from(*len)).unwrap_or(0);
            by_prefix
                .get(&(u32::from(ip) & mask, *len))
                .map(|id| id.cidr_endpoint_alias())
        })
    };
    for (ip, identity) in input.remote {
        if input.host_addresses.contains(ip) {
            continue;
        }
        ipcache.insert(
            Ipv4Network::from(*ip),
            IpcacheEntry {
                identity: *identity,
                endpoint: None,
                cidr_identity: alias(*ip),
            },
        );
    }
    for ep in input.endpoints.values() {
        let most_specific = alias(ep.ip);
        ipcache.insert(
            Ipv4Network::from(ep.ip),
            IpcacheEntry {
                identity: ep.identity,
                endpoint: Some(ep.id),
                cidr_identity: most_specific,
            },
        );
    }
    ipcache
}

/// Compiles the whole map state. `rules` keeps rule ids stable between compiles; call
/// `RuleTable::retain_used` on the result afterwards.
pub fn compile(input: &CompileInput<'_>, rules: &mut RuleTable) -> MapState {
    compile_with_l7(input, rules).0
}

/// One allow rule as the L7 proxy sees it: the (peer identity, TCP port block) pairs it
/// covers, and its HTTP rules (`None`: every request).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct L7Rule {
    pub keys: Vec<(Identity, PortPrefix)>,
    pub http: Option<Vec<crate::model::HttpRule>>,
    pub rule: RuleId,
}

/// One egress allow rule as the DNS proxy sees it: the (peer identity, protocol, port block)
/// keys it covers, and the names it lets be asked (`None`: every name).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DnsRule {
    pub keys: Vec<(Identity, Option<u8>, PortPrefix)>,
    pub names: Option<Vec<FqdnSelector>>,
    pub rule: RuleId,
}

/// The allow rules of every (endpoint, direction) that has HTTP rules, and the egress allow
/// rules of every endpoint that has DNS rules.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct L7Policy {
    pub rules: BTreeMap<(EndpointId, Direction), Vec<L7Rule>>,
    #[serde(default)]
    pub dns: BTreeMap<EndpointId, Vec<DnsRule>>,
}

const TCP: u8 = 6;
const UDP: u8 = 17;

/// What one endpoint compiles to: its endpoint-map entry, its policy-map entries (both
/// directions), and its L7 rules.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EndpointCompiled {
    pub entry: Option<EndpointEntry>,
    pub policy: BTreeMap<PolicyKey, PolicyEntry>,
    pub l7: Vec<(Direction, Vec<L7Rule>)>,
    /// Its egress rules, for the DNS proxy, where any of them has DNS rules.
    pub dns: Option<Vec<DnsRule>>,
    /// Some rule of it allows egress to a named port: its entries depend on every endpoint's
    /// identity and named ports, not only on its own.
    pub named_egress: bool,
}

impl EndpointCompiled {
    /// Every rule its entries and L7 rules refer to.
    pub fn rules(&self) -> BTreeSet<RuleId> {
        self.policy
            .values()
            .map(|e| e.rule)
            .chain(self.l7.iter().flat_map(|(_, rs)| rs.iter().map(|r| r.rule)))
            .chain(self.dns.iter().flatten().map(|r| r.rule))
            .collect()
    }
}

/// Identities and selections a compile shares between endpoints.
pub(crate) struct Shared<'a, 'b, 'c> {
    pub input: &'b CompileInput<'a>,
    pub index: &'b LazyIndex<'c>,
}

/// Compiles one endpoint, given the specs selecting it (in policy order).
pub(crate) fn compile_endpoint(
    shared: &Shared<'_, '_, '_>,
    cache: &mut SelectorCache,
    rules: &mut RuleTable,
    ep: &Endpoint,
    specs: &[(&Policy, usize, &PolicySpec)],
) -> EndpointCompiled {
    let input = shared.input;
    let mut out = EndpointCompiled::default();
    let mut flags = [false; 2];
    for (di, direction) in Direction::BOTH.into_iter().enumerate() {
        // An endpoint still holding `init` (its labels not known yet) is enforced both
        // ways: until it is known, only what policy allows the `init` entity reaches it.
        let is_enforced = enforced(&input.settings, specs, direction)
            || (ep.identity == Identity::INIT
                && input.settings.enforcement != EnforcementMode::Never);
        flags[di] = is_enforced;
        if input.settings.enforcement == EnforcementMode::Never {
            continue;
        }
        let ctx = RuleContext {
            input,
            index: shared.index,
            ep,
            direction,
        };
        let mut entries = DirectionEntries::new();
        let mut l7_candidates: Vec<L7Rule> = Vec::new();
        let mut dns_candidates: Vec<DnsRule> = Vec::new();
        for (policy, spec_index, spec) in specs {
            let dp = spec.direction(direction);
            for (deny, list) in [(false, &dp.allow), (true, &dp.deny)] {
                for (rule_index, rule) in list.iter().enumerate() {
                    let origin = RuleOrigin::Policy {
                        policy: policy.id.clone(),
                        spec: *spec_index,
                        direction,
                        deny,
                        rule: rule_index,
                    };
                    let action = if deny {
                        Action::Deny
                    } else if rule.dns.is_some() {
                        Action::Redirect {
                            proxy_port: input.settings.dns_proxy_port.unwrap_or(0),
                        }
                    } else if rule.http.is_some() {
                        Action::Redirect {
                            proxy_port: input.settings.proxy_port.unwrap_or(0),
                        }
                    } else {
                        Action::Allow
                    };
                    let entry = PolicyEntry {
                        action,
                        rule: rules.intern(&origin),
                        staged: Staged::Same,
                    };
                    if direction == Direction::Egress
                        && rule.ports.iter().any(|p| matches!(p.port, Port::Named(_)))
                    {
                        out.named_egress = true;
                    }
                    let keys = rule_keys(&ctx, cache, rule);
                    for k in &keys {
                        insert(&mut entries, *k, entry);
                    }
                    if !deny && direction == Direction::Egress {
                        dns_candidates.push(DnsRule {
                            keys: keys
                                .iter()
                                .filter(|k| matches!(k.protocol, None | Some(TCP | UDP)))
                                .map(|k| (k.identity, k.protocol, k.port))
                                .collect(),
                            names: rule.dns.clone(),
                            rule: entry.rule,
                        });
                    }
                    if !deny && rule.dns.is_none() {
                        l7_candidates.push(L7Rule {
                            keys: keys
                                .iter()
                                .filter(|k| matches!(k.protocol, None | Some(TCP)))
                                .map(|k| (k.identity, k.port))
                                .collect(),
                            http: rule.http.clone(),
                            rule: entry.rule,
                        });
                    }
                }
            }
        }
        // Where any rule of this endpoint and direction has HTTP rules, the proxy needs
        // every allow rule: one without HTTP rules allows all requests of its peers and
        // ports (Cilium's L4 wildcard).
        if l7_candidates.iter().any(|c| c.http.is_some()) {
            out.l7.push((direction, l7_candidates));
        }
        // Likewise the DNS proxy: a rule without DNS rules lets every name be asked.
        if dns_candidates.iter().any(|c| c.names.is_some()) {
            out.dns = Some(dns_candidates);
        }
        if direction == Direction::Ingress && is_enforced && input.settings.allow_host_ingress {
            let entry = PolicyEntry {
                action: Action::Allow,
                rule: rules.intern(&RuleOrigin::HostAccess),
                staged: Staged::Same,
            };
            let key = PolicyKey {
                endpoint: ep.id,
                identity: Identity::HOST,
                direction,
                protocol: None,
                port: PortPrefix::ANY,
            };
            insert(&mut entries, key, entry);
        }
        push_down(&mut entries);
        out.policy.extend(entries);
    }
    out.entry = Some(EndpointEntry {
        ifindex: ep.ifindex,
        identity: ep.identity,
        ip: ep.ip,
        ingress_enforced: flags[0],
        egress_enforced: flags[1],
        audit: input.settings.audit,
        staged: StagedEnforcement::default(),
        link: ep.link,
    });
    out
}

/// The specs (policy, spec index) selecting a workload identity's labels, in policy order.
pub(crate) fn specs_selecting(
    policies: &BTreeMap<PolicyRef, Policy>,
    labels: &Labels,
) -> Vec<(PolicyRef, usize)> {
    policies
        .values()
        .flat_map(|p| p.specs.iter().enumerate().map(move |(i, s)| (p, i, s)))
        .filter(|(_, _, s)| s.subject.0.matches(labels))
        .map(|(p, i, _)| (p.id.clone(), i))
        .collect()
}

/// Resolves (policy, spec index) pairs against the policies.
pub(crate) fn resolve_specs<'p>(
    policies: &'p BTreeMap<PolicyRef, Policy>,
    refs: &[(PolicyRef, usize)],
) -> Vec<(&'p Policy, usize, &'p PolicySpec)> {
    refs.iter()
        .filter_map(|(r, i)| {
            let p = policies.get(r)?;
            Some((p, *i, p.specs.get(*i)?))
        })
        .collect()
}

/// Compiles map state and the L7 policy the proxy enforces, from the same rules.
pub fn compile_with_l7(input: &CompileInput<'_>, rules: &mut RuleTable) -> (MapState, L7Policy) {
    let mut l7 = L7Policy::default();
    let mut state = MapState {
        ipcache: build_ipcache(input),
        ..MapState::default()
    };
    let index = LazyIndex::new(input.identities, input.fqdns);
    let shared = Shared {
        input,
        index: &index,
    };
    let mut cache = SelectorCache::default();
    // Endpoints of one identity are selected by the same specs.
    let mut subjects: HashMap<Identity, Vec<(PolicyRef, usize)>> = HashMap::new();
    for ep in input.endpoints.values() {
        let refs = subjects.entry(ep.identity).or_insert_with(|| {
            endpoint_labels(input.identities, ep)
                .map(|l| specs_selecting(input.policies, l))
                .unwrap_or_default()
        });
        let specs = resolve_specs(input.policies, refs);
        let compiled = compile_endpoint(&shared, &mut cache, rules, ep, &specs);
        state.policy.extend(compiled.policy);
        if let Some(entry) = compiled.entry {
            state.endpoints.insert(ep.id, entry);
        }
        if let Some(dns) = compiled.dns {
            l7.dns.insert(ep.id, dns);
        }
        for (d, r) in compiled.l7 {
            l7.rules.insert((ep.id, d), r);
        }
    }
    (state, l7)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::endpoint::{LinkLayer, NamedPort};
    use crate::identity::{IdentityAllocator, workload_identity_labels};
    use crate::labels::{
        LabelSelector, NAMESPACE_LABEL, NAMESPACE_LABELS_PREFIX, Operator, Requirement,
    };
    use crate::mapstate::{Verdict, diff};
    use crate::model::{DirectionPolicy, EndpointSelector, Entity, PolicyKind};

    const TCP: u8 = 6;
    const UDP: u8 = 17;

    /// A little cluster: namespaces with labels, endpoints, policies.
    struct Cluster {
        alloc: IdentityAllocator,
        namespaces: BTreeMap<String, Labels>,
        endpoints: BTreeMap<EndpointId, Endpoint>,
        policies: BTreeMap<PolicyRef, Policy>,
        remote: BTreeMap<Ipv4Addr, Identity>,
        settings: Settings,
        rules: RuleTable,
    }

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    impl Cluster {
        fn new() -> Self {
            let mut namespaces = BTreeMap::new();
            namespaces.insert(
                "x".to_string(),
                labels(&[("kubernetes.io/metadata.name", "x"), ("team", "blue")]),
            );
            namespaces.insert(
                "y".to_string(),
                labels(&[("kubernetes.io/metadata.name", "y"), ("team", "red")]),
            );
            Self {
                alloc: IdentityAllocator::default(),
                namespaces,
                endpoints: BTreeMap::new(),
                policies: BTreeMap::new(),
                remote: BTreeMap::new(),
                settings: Settings::default(),
                rules: RuleTable::default(),
            }
        }

        fn pod(
            &mut self,
            id: u32,
            ns: &str,
            pod_labels: &[(&str, &str)],
            ip: [u8; 4],
        ) -> EndpointId {
            self.pod_with_ports(id, ns, pod_labels, ip, vec![])
        }

        fn pod_with_ports(
            &mut self,
            id: u32,
            ns: &str,
            pod_labels: &[(&str, &str)],
            ip: [u8; 4],
            named_ports: Vec<NamedPort>,
        ) -> EndpointId {
            let l = workload_identity_labels(ns, &self.namespaces[ns], &labels(pod_labels));
            let identity = self.alloc.acquire(&l).unwrap();
            let eid = EndpointId(id);
            self.endpoints.insert(
                eid,
                Endpoint {
                    id: eid,
                    name: format!("pod{id}"),
                    namespace: ns.to_string(),
                    identity,
                    ip: Ipv4Addr::from(ip),
                    ifindex: 100 + id,
                    named_ports,
                    link: LinkLayer::default(),
                },
            );
            eid
        }

        fn apply(&mut self, p: Policy) {
            self.policies.insert(p.id.clone(), p);
        }

        fn compile(&mut self) -> MapState {
            self.compile_with_l7().0
        }

        fn compile_with_l7(&mut self) -> (MapState, L7Policy) {
            let cidrs = policy_cidrs(self.policies.values());
            self.alloc.sync_cidrs(&cidrs).unwrap();
            let table = self.alloc.table();
            let host = [Ipv4Addr::new(10, 0, 0, 254)];
            let input = CompileInput {
                endpoints: &self.endpoints,
                identities: table,
                policies: &self.policies,
                host_addresses: &host,
                remote: &self.remote,
                settings: self.settings,
                fqdns: &LearnedNames::new(),
            };
            let (state, l7) = compile_with_l7(&input, &mut self.rules);
            self.rules.retain_used_with(&state, &l7);
            (state, l7)
        }
    }

    fn ip(a: [u8; 4]) -> Ipv4Addr {
        Ipv4Addr::from(a)
    }

    fn in_ns(ns: &str, sel: LabelSelector) -> EndpointSelector {
        EndpointSelector(sel.with_label(NAMESPACE_LABEL, ns))
    }

    fn pods(pairs: &[(&str, &str)]) -> LabelSelector {
        let mut s = LabelSelector::everything();
        for (k, v) in pairs {
            s = s.with_label(*k, *v);
        }
        s
    }

    fn rule(peers: Peers, ports: Vec<PortSpec>) -> Rule {
        Rule {
            peers,
            ports,
            http: None,
            dns: None,
        }
    }

    fn tcp(port: u16) -> PortSpec {
        PortSpec {
            protocol: Protocol::Tcp,
            port: Port::Range { port, end: port },
        }
    }

    fn policy(
        ns: &str,
        name: &str,
        subject: EndpointSelector,
        ingress: Option<Vec<Rule>>,
        egress: Option<Vec<Rule>>,
    ) -> Policy {
        let dir = |rules: Option<Vec<Rule>>| match rules {
            Some(allow) => DirectionPolicy {
                default_deny: true,
                allow,
                deny: vec![],
            },
            None => DirectionPolicy::default(),
        };
        Policy {
            id: PolicyRef {
                kind: PolicyKind::KubernetesNetworkPolicy,
                namespace: Some(ns.into()),
                name: name.into(),
            },
            specs: vec![PolicySpec {
                subject,
                ingress: dir(ingress),
                egress: dir(egress),
                description: None,
            }],
            audit: false,
        }
    }

    fn verdict(
        s: &MapState,
        ep: EndpointId,
        d: Direction,
        peer: [u8; 4],
        proto: u8,
        port: u16,
    ) -> Verdict {
        s.decide(ep, d, ip(peer), proto, port).unwrap().verdict
    }

    fn allowed(
        s: &MapState,
        ep: EndpointId,
        d: Direction,
        peer: [u8; 4],
        proto: u8,
        port: u16,
    ) -> bool {
        matches!(verdict(s, ep, d, peer, proto, port), Verdict::Allowed)
    }

    #[test]
    fn endpoints_without_policy_allow_everything() {
        let mut c = Cluster::new();
        let a = c.pod(1, "x", &[("app", "a")], [10, 0, 0, 1]);
        let s = c.compile();
        assert!(!s.endpoints[&a].ingress_enforced && !s.endpoints[&a].egress_enforced);
        assert!(s.policy.is_empty());
        assert!(allowed(&s, a, Direction::Ingress, [192, 0, 2, 1], TCP, 80));
    }

    #[test]
    fn an_endpoint_whose_labels_are_not_known_yet_is_enforced_both_ways_and_selected_by_nothing() {
        let mut c = Cluster::new();
        let known = c.pod(1, "x", &[("app", "a")], [10, 0, 0, 1]);
        let pending = EndpointId(2);
        c.endpoints.insert(
            pending,
            Endpoint {
                id: pending,
                name: "ctr".into(),
                namespace: "x".into(),
                identity: Identity::INIT,
                ip: ip([10, 0, 0, 2]),
                ifindex: 102,
                named_ports: vec![],
                link: LinkLayer::default(),
            },
        );
        // Even a policy that allows everything to and from every pod of the namespace does
        // not select it: it could be any pod until its labels are known.
        let all = || Some(vec![rule(Peers::All, vec![])]);
        c.apply(policy("x", "open", in_ns("x", pods(&[])), all(), all()));
        let s = c.compile();
        assert!(s.endpoints[&pending].ingress_enforced && s.endpoints[&pending].egress_enforced);
        for d in Direction::BOTH {
            assert!(!allowed(&s, pending, d, [10, 0, 0, 1], TCP, 80), "{d:?}");
            assert!(!allowed(&s, pending, d, [192, 0, 2, 1], UDP, 53), "{d:?}");
        }
        assert!(allowed(
            &s,
            known,
            Direction::Ingress,
            [10, 0, 0, 2],
            TCP,
            80
        ));
        c.settings.enforcement = EnforcementMode::Never;
        let s = c.compile();
        assert!(
            !s.endpoints[&pending].ingress_enforced,
            "enforcement off is off for all"
        );
    }

    #[test]
    fn pods_of_other_nodes_are_peers_by_identity_and_ipblocks_reach_them() {
        let mut c = Cluster::new();
        let web = c.pod(1, "x", &[("app", "web")], [10, 0, 0, 1]);
        // A client and an intruder on another node: only their identities are known here.
        let client_labels =
            workload_identity_labels("x", &c.namespaces["x"], &labels(&[("app", "client")]));
        let client = c.alloc.acquire(&client_labels).unwrap();
        let intruder_labels =
            workload_identity_labels("x", &c.namespaces["x"], &labels(&[("app", "intruder")]));
        let intruder = c.alloc.acquire(&intruder_labels).unwrap();
        c.remote.insert(ip([10, 1, 0, 5]), client);
        c.remote.insert(ip([10, 1, 0, 6]), intruder);
        c.remote.insert(ip([192, 168, 7, 2]), Identity::REMOTE_NODE);
        c.apply(policy(
            "x",
            "web",
            in_ns("x", pods(&[("app", "web")])),
            Some(vec![
                rule(
                    Peers::Some(vec![Peer::Endpoints(in_ns(
                        "x",
                        pods(&[("app", "client")]),
                    ))]),
                    vec![tcp(80)],
                ),
                rule(
                    Peers::Some(vec![Peer::Cidr {
                        cidr: "10.1.0.6/32".parse().unwrap(),
                        except: vec![],
                    }]),
                    vec![tcp(22)],
                ),
            ]),
            None,
        ));
        let s = c.compile();
        assert_eq!(s.ipcache[&"10.1.0.5/32".parse().unwrap()].identity, client);
        assert_eq!(
            s.ipcache[&"192.168.7.2/32".parse().unwrap()].identity,
            Identity::REMOTE_NODE
        );
        assert!(allowed(&s, web, Direction::Ingress, [10, 1, 0, 5], TCP, 80));
        assert!(!allowed(
            &s,
            web,
            Direction::Ingress,
            [10, 1, 0, 6],
            TCP,
            80
        ));
        assert!(!allowed(
            &s,
            web,
            Direction::Ingress,
            [192, 168, 7, 2],
            TCP,
            80
        ));
        assert!(
            allowed(&s, web, Direction::Ingress, [10, 1, 0, 6], TCP, 22),
            "an ipBlock holding another node's pod applies to it"
        );
        assert!(!allowed(
            &s,
            web,
            Direction::Ingress,
            [10, 1, 0, 5],
            TCP,
            22
        ));
    }

    #[test]
    fn selected_endpoint_denies_what_is_not_allowed_but_host_may_reach_it() {
        let mut c = Cluster::new();
        let a = c.pod(1, "x", &[("app", "a")], [10, 0, 0, 1]);
        let b = c.pod(2, "x", &[("app", "b")], [10, 0, 0, 2]);
        c.apply(policy(
            "x",
            "deny-all",
            in_ns("x", pods(&[("app", "a")])),
            Some(vec![]),
            None,
        ));
        let s = c.compile();
        assert!(s.endpoints[&a].ingress_enforced);
        assert!(!s.endpoints[&a].egress_enforced);
        assert!(!s.endpoints[&b].ingress_enforced);
        assert_eq!(
            verdict(&s, a, Direction::Ingress, [10, 0, 0, 2], TCP, 80),
            Verdict::DeniedByDefault
        );
        assert!(
            allowed(&s, a, Direction::Ingress, [10, 0, 0, 254], TCP, 80),
            "host access"
        );
        assert!(allowed(&s, b, Direction::Ingress, [10, 0, 0, 1], TCP, 80));
        assert!(allowed(&s, a, Direction::Egress, [10, 0, 0, 2], TCP, 80));
    }

    #[test]
    fn pod_selector_allows_matching_pods_of_the_policy_namespace_only() {
        let mut c = Cluster::new();
        let server = c.pod(1, "x", &[("app", "server")], [10, 0, 0, 1]);
        let _ = c.pod(2, "x", &[("app", "client")], [10, 0, 0, 2]);
        let _ = c.pod(3, "x", &[("app", "other")], [10, 0, 0, 3]);
        let _ = c.pod(4, "y", &[("app", "client")], [10, 0, 0, 4]);
        c.apply(policy(
            "x",
            "allow-client",
            in_ns("x", pods(&[("app", "server")])),
            Some(vec![rule(
                Peers::Some(vec![Peer::Endpoints(in_ns(
                    "x",
                    pods(&[("app", "client")]),
                ))]),
                vec![],
            )]),
            None,
        ));
        let s = c.compile();
        assert!(allowed(
            &s,
            server,
            Direction::Ingress,
            [10, 0, 0, 2],
            TCP,
            80
        ));
        assert!(allowed(
            &s,
            server,
            Direction::Ingress,
            [10, 0, 0, 2],
            UDP,
            53
        ));
        assert!(!allowed(
            &s,
            server,
            Direction::Ingress,
            [10, 0, 0, 3],
            TCP,
            80
        ));
        assert!(
            !allowed(&s, server, Direction::Ingress, [10, 0, 0, 4], TCP, 80),
            "other namespace"
        );
        assert!(
            !allowed(&s, server, Direction::Ingress, [192, 0, 2, 9], TCP, 80),
            "world"
        );
    }

    #[test]
    fn namespace_selector_and_both_in_one_peer() {
        let mut c = Cluster::new();
        let server = c.pod(1, "x", &[("app", "server")], [10, 0, 0, 1]);
        let _ = c.pod(2, "y", &[("app", "client")], [10, 0, 0, 2]);
        let _ = c.pod(3, "y", &[("app", "other")], [10, 0, 0, 3]);
        let _ = c.pod(4, "x", &[("app", "client")], [10, 0, 0, 4]);
        let red = LabelSelector::everything()
            .with_label("team", "red")
            .prefixed(NAMESPACE_LABELS_PREFIX)
            .with_requirement(Requirement {
                key: NAMESPACE_LABEL.into(),
                operator: Operator::Exists,
                values: BTreeSet::default(),
            });
        c.apply(policy(
            "x",
            "from-red",
            in_ns("x", pods(&[("app", "server")])),
            Some(vec![rule(
                Peers::Some(vec![Peer::Endpoints(EndpointSelector(red.clone()))]),
                vec![],
            )]),
            None,
        ));
        let s = c.compile();
        assert!(allowed(
            &s,
            server,
            Direction::Ingress,
            [10, 0, 0, 2],
            TCP,
            80
        ));
        assert!(allowed(
            &s,
            server,
            Direction::Ingress,
            [10, 0, 0, 3],
            TCP,
            80
        ));
        assert!(!allowed(
            &s,
            server,
            Direction::Ingress,
            [10, 0, 0, 4],
            TCP,
            80
        ));

        let mut both = red;
        both.match_labels.insert("app".into(), "client".into());
        c.apply(policy(
            "x",
            "from-red",
            in_ns("x", pods(&[("app", "server")])),
            Some(vec![rule(
                Peers::Some(vec![Peer::Endpoints(EndpointSelector(both))]),
                vec![],
            )]),
            None,
        ));
        let s = c.compile();
        assert!(allowed(
            &s,
            server,
            Direction::Ingress,
            [10, 0, 0, 2],
            TCP,
            80
        ));
        assert!(!allowed(
            &s,
            server,
            Direction::Ingress,
            [10, 0, 0, 3],
            TCP,
            80
        ));
        assert!(!allowed(
            &s,
            server,
            Direction::Ingress,
            [10, 0, 0, 4],
            TCP,
            80
        ));
    }

    #[test]
    fn ip_block_with_except_applies_to_external_and_endpoint_addresses() {
        let mut c = Cluster::new();
        let server = c.pod(1, "x", &[("app", "server")], [10, 0, 0, 1]);
        let _ = c.pod(2, "x", &[("app", "c")], [10, 0, 1, 2]);
        let _ = c.pod(3, "x", &[("app", "c")], [10, 0, 2, 3]);
        c.apply(policy(
            "x",
            "cidr",
            in_ns("x", pods(&[("app", "server")])),
            Some(vec![rule(
                Peers::Some(vec![Peer::Cidr {
                    cidr: "10.0.0.0/16".parse().unwrap(),
                    except: vec!["10.0.2.0/24".parse().unwrap()],
                }]),
                vec![tcp(80)],
            )]),
            None,
        ));
        let s = c.compile();
        // Endpoint addresses: same identity, different verdicts by address.
        assert!(allowed(
            &s,
            server,
            Direction::Ingress,
            [10, 0, 1, 2],
            TCP,
            80
        ));
        assert!(!allowed(
            &s,
            server,
            Direction::Ingress,
            [10, 0, 2, 3],
            TCP,
            80
        ));
        // External addresses.
        assert!(allowed(
            &s,
            server,
            Direction::Ingress,
            [10, 0, 9, 9],
            TCP,
            80
        ));
        assert!(!allowed(
            &s,
            server,
            Direction::Ingress,
            [10, 0, 2, 9],
            TCP,
            80
        ));
        assert!(!allowed(
            &s,
            server,
            Direction::Ingress,
            [10, 1, 0, 1],
            TCP,
            80
        ));
        assert!(!allowed(
            &s,
            server,
            Direction::Ingress,
            [10, 0, 1, 2],
            TCP,
            81
        ));
    }

    #[test]
    fn deny_beats_allow_even_when_the_allow_is_more_specific() {
        let mut c = Cluster::new();
        let server = c.pod(1, "x", &[("app", "server")], [10, 0, 0, 1]);
        let _ = c.pod(2, "x", &[("app", "client")], [10, 0, 0, 2]);
        c.apply(policy(
            "x",
            "allow-80",
            in_ns("x", pods(&[("app", "server")])),
            Some(vec![rule(
                Peers::Some(vec![Peer::Endpoints(in_ns(
                    "x",
                    pods(&[("app", "client")]),
                ))]),
                vec![tcp(80)],
            )]),
            None,
        ));
        let mut deny = policy(
            "x",
            "deny-client",
            in_ns("x", pods(&[("app", "server")])),
            None,
            None,
        );
        deny.id.kind = PolicyKind::NetworkPolicy;
        deny.specs[0].ingress.deny = vec![rule(
            Peers::Some(vec![Peer::Endpoints(in_ns(
                "x",
                pods(&[("app", "client")]),
            ))]),
            vec![],
        )];
        c.apply(deny);
        let s = c.compile();
        assert_eq!(
            verdict(&s, server, Direction::Ingress, [10, 0, 0, 2], TCP, 80),
            Verdict::DeniedByRule
        );
        let d = s
            .decide(server, Direction::Ingress, ip([10, 0, 0, 2]), TCP, 80)
            .unwrap();
        let origin = c.rules.get(d.matched.unwrap().1.rule).unwrap();
        assert_eq!(origin.policy().unwrap().name, "deny-client");
    }

    #[test]
    fn deny_only_policy_does_not_switch_on_default_deny() {
        let mut c = Cluster::new();
        let server = c.pod(1, "x", &[("app", "server")], [10, 0, 0, 1]);
        let _ = c.pod(2, "x", &[("app", "client")], [10, 0, 0, 2]);
        let mut deny = policy(
            "x",
            "deny-22",
            in_ns("x", pods(&[("app", "server")])),
            None,
            None,
        );
        deny.id.kind = PolicyKind::NetworkPolicy;
        deny.specs[0].ingress.deny = vec![rule(Peers::All, vec![tcp(22)])];
        c.apply(deny);
        let s = c.compile();
        assert!(!s.endpoints[&server].ingress_enforced);
        assert!(allowed(
            &s,
            server,
            Direction::Ingress,
            [10, 0, 0, 2],
            TCP,
            80
        ));
        assert_eq!(
            verdict(&s, server, Direction::Ingress, [10, 0, 0, 2], TCP, 22),
            Verdict::DeniedByRule
        );
    }

    #[test]
    fn port_ranges_cover_exactly_their_ports() {
        let mut c = Cluster::new();
        let server = c.pod(1, "x", &[("app", "server")], [10, 0, 0, 1]);
        c.apply(policy(
            "x",
            "range",
            in_ns("x", pods(&[("app", "server")])),
            Some(vec![rule(
                Peers::All,
                vec![PortSpec {
                    protocol: Protocol::Udp,
                    port: Port::Range {
                        port: 1000,
                        end: 2000,
                    },
                }],
            )]),
            None,
        ));
        let s = c.compile();
        for (port, ok) in [
            (999, false),
            (1000, true),
            (1500, true),
            (2000, true),
            (2001, false),
        ] {
            assert_eq!(
                allowed(&s, server, Direction::Ingress, [192, 0, 2, 1], UDP, port),
                ok,
                "port {port}"
            );
        }
        assert!(!allowed(
            &s,
            server,
            Direction::Ingress,
            [192, 0, 2, 1],
            TCP,
            1500
        ));
    }

    #[test]
    fn named_ports_resolve_on_the_destination() {
        let mut c = Cluster::new();
        let http = |n| {
            vec![NamedPort {
                name: "http".into(),
                protocol: Protocol::Tcp,
                port: n,
            }]
        };
        let s1 = c.pod_with_ports(1, "x", &[("app", "server")], [10, 0, 0, 1], http(8080));
        let _ = c.pod_with_ports(2, "x", &[("app", "server2")], [10, 0, 0, 2], http(9090));
        let client = c.pod(3, "x", &[("app", "client")], [10, 0, 0, 3]);
        let named = PortSpec {
            protocol: Protocol::Tcp,
            port: Port::Named("http".into()),
        };
        c.apply(policy(
            "x",
            "in",
            in_ns("x", pods(&[("app", "server")])),
            Some(vec![rule(Peers::All, vec![named.clone()])]),
            None,
        ));
        c.apply(policy(
            "x",
            "out",
            in_ns("x", pods(&[("app", "client")])),
            None,
            Some(vec![rule(Peers::All, vec![named])]),
        ));
        let s = c.compile();
        assert!(allowed(
            &s,
            s1,
            Direction::Ingress,
            [10, 0, 0, 3],
            TCP,
            8080
        ));
        assert!(!allowed(
            &s,
            s1,
            Direction::Ingress,
            [10, 0, 0, 3],
            TCP,
            9090
        ));
        assert!(allowed(
            &s,
            client,
            Direction::Egress,
            [10, 0, 0, 1],
            TCP,
            8080
        ));
        assert!(allowed(
            &s,
            client,
            Direction::Egress,
            [10, 0, 0, 2],
            TCP,
            9090
        ));
        assert!(!allowed(
            &s,
            client,
            Direction::Egress,
            [10, 0, 0, 2],
            TCP,
            8080
        ));
        assert!(!allowed(
            &s,
            client,
            Direction::Egress,
            [192, 0, 2, 1],
            TCP,
            8080
        ));
    }

    #[test]
    fn entities_select_reserved_and_cidr_identities() {
        let mut c = Cluster::new();
        let a = c.pod(1, "x", &[("app", "a")], [10, 0, 0, 1]);
        let _ = c.pod(2, "x", &[("app", "b")], [10, 0, 0, 2]);
        let mut p = policy("x", "world", in_ns("x", pods(&[("app", "a")])), None, None);
        p.specs[0].egress = DirectionPolicy {
            default_deny: true,
            allow: vec![rule(Peers::Some(vec![Peer::Entity(Entity::World)]), vec![])],
            deny: vec![],
        };
        c.apply(p.clone());
        let s = c.compile();
        assert!(allowed(&s, a, Direction::Egress, [192, 0, 2, 1], TCP, 80));
        assert!(
            !allowed(&s, a, Direction::Egress, [10, 0, 0, 2], TCP, 80),
            "world is not pods"
        );
        assert!(
            !allowed(&s, a, Direction::Egress, [10, 0, 0, 254], TCP, 80),
            "world is not host"
        );

        p.specs[0].egress.allow = vec![rule(
            Peers::Some(vec![Peer::Entity(Entity::Cluster)]),
            vec![],
        )];
        c.apply(p.clone());
        let s = c.compile();
        assert!(!allowed(&s, a, Direction::Egress, [192, 0, 2, 1], TCP, 80));
        assert!(allowed(&s, a, Direction::Egress, [10, 0, 0, 2], TCP, 80));
        assert!(allowed(&s, a, Direction::Egress, [10, 0, 0, 254], TCP, 80));

        p.specs[0].egress.allow = vec![rule(Peers::Some(vec![Peer::Entity(Entity::All)]), vec![])];
        c.apply(p);
        let s = c.compile();
        assert!(allowed(&s, a, Direction::Egress, [192, 0, 2, 1], TCP, 80));
    }

    #[test]
    fn enforcement_modes_override_selection() {
        let mut c = Cluster::new();
        let a = c.pod(1, "x", &[("app", "a")], [10, 0, 0, 1]);
        c.settings.enforcement = EnforcementMode::Always;
        let s = c.compile();
        assert!(s.endpoints[&a].ingress_enforced && s.endpoints[&a].egress_enforced);
        assert_eq!(
            verdict(&s, a, Direction::Egress, [192, 0, 2, 1], TCP, 80),
            Verdict::DeniedByDefault
        );

        c.settings.enforcement = EnforcementMode::Never;
        c.apply(policy(
            "x",
            "deny-all",
            in_ns("x", pods(&[])),
            Some(vec![]),
            Some(vec![]),
        ));
        let s = c.compile();
        assert!(!s.endpoints[&a].ingress_enforced && !s.endpoints[&a].egress_enforced);
        assert!(s.policy.is_empty());
    }

    #[test]
    fn unrelated_policy_change_rewrites_no_existing_entry() {
        let mut c = Cluster::new();
        let _ = c.pod(1, "x", &[("app", "a")], [10, 0, 0, 1]);
        let _ = c.pod(2, "x", &[("app", "b")], [10, 0, 0, 2]);
        c.apply(policy(
            "x",
            "zz-a",
            in_ns("x", pods(&[("app", "a")])),
            Some(vec![rule(Peers::All, vec![tcp(80)])]),
            None,
        ));
        let before = c.compile();
        c.apply(policy(
            "x",
            "aa-b",
            in_ns("x", pods(&[("app", "b")])),
            Some(vec![rule(Peers::All, vec![tcp(81)])]),
            None,
        ));
        let after = c.compile();
        let d = diff(&before, &after);
        assert!(d.policy_removals.is_empty());
        assert!(
            d.policy_upserts
                .iter()
                .all(|(k, _)| k.endpoint == EndpointId(2)),
            "{d:?}"
        );
    }

    #[test]
    fn http_rules_redirect_their_ports_and_feed_the_proxy_every_allow_rule() {
        let mut c = Cluster::new();
        c.settings.proxy_port = Some(15001);
        let server = c.pod(1, "x", &[("app", "server")], [10, 0, 0, 1]);
        let client = c.pod(2, "x", &[("app", "client")], [10, 0, 0, 2]);
        let mut p = policy(
            "x",
            "l7",
            in_ns("x", pods(&[("app", "server")])),
            Some(vec![
                Rule {
                    peers: Peers::Some(vec![Peer::Endpoints(in_ns(
                        "x",
                        pods(&[("app", "client")]),
                    ))]),
                    ports: vec![tcp(80)],
                    http: Some(vec![crate::model::HttpRule {
                        method: Some("GET".into()),
                        ..Default::default()
                    }]),
                    dns: None,
                },
                rule(Peers::All, vec![tcp(9090)]),
            ]),
            None,
        );
        p.id.kind = PolicyKind::NetworkPolicy;
        c.apply(p);
        let (state, l7) = c.compile_with_l7();
        assert_eq!(
            state
                .decide(server, Direction::Ingress, ip([10, 0, 0, 2]), TCP, 80)
                .unwrap()
                .verdict,
            Verdict::Redirected { proxy_port: 15001 }
        );
        assert_eq!(
            verdict(&state, server, Direction::Ingress, [10, 0, 0, 2], TCP, 9090),
            Verdict::Allowed
        );
        let rules = &l7.rules[&(server, Direction::Ingress)];
        assert_eq!(rules.len(), 2);
        assert!(rules[0].http.is_some() && rules[1].http.is_none());
        assert!(
            rules[0]
                .keys
                .contains(&(c.endpoints[&client].identity, PortPrefix::exact(80)))
        );
        assert!(!l7.rules.contains_key(&(client, Direction::Egress)));
    }

    #[test]
    fn label_change_moves_endpoint_between_identities_and_policies() {
        let mut c = Cluster::new();
        let server = c.pod(1, "x", &[("app", "server")], [10, 0, 0, 1]);
        let client = c.pod(2, "x", &[("app", "client")], [10, 0, 0, 2]);
        c.apply(policy(
            "x",
            "allow-client",
            in_ns("x", pods(&[("app", "server")])),
            Some(vec![rule(
                Peers::Some(vec![Peer::Endpoints(in_ns(
                    "x",
                    pods(&[("app", "client")]),
                ))]),
                vec![],
            )]),
            None,
        ));
        let before = c.compile();
        assert!(allowed(
            &before,
            server,
            Direction::Ingress,
            [10, 0, 0, 2],
            TCP,
            80
        ));

        // Relabel the client: new identity, the ipcache moves and the allow no longer applies.
        let old = c.endpoints[&client].identity;
        c.alloc.release(old).unwrap();
        let l = workload_identity_labels("x", &c.namespaces["x"], &labels(&[("app", "intruder")]));
        let new = c.alloc.acquire(&l).unwrap();
        c.endpoints.get_mut(&client).unwrap().identity = new;
        let after = c.compile();
        assert!(!allowed(
            &after,
            server,
            Direction::Ingress,
            [10, 0, 0, 2],
            TCP,
            80
        ));
        let d = diff(&before, &after);
        assert_eq!(d.ipcache_upserts.len(), 1);
        assert_eq!(d.ipcache_upserts[0].1.identity, new);
    }
}
