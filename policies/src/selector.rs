//! The selector cache: each distinct peer clause of the policies (an endpoint selector, a CIDR
//! with its exceptions, an entity) resolved to the identities it selects, once. When
//! identities come and go, the cache is updated by the delta alone, and says which clauses
//! changed (added and removed identities), so only what depends on them is recompiled.
//! A `toFQDNs` clause selects the /32 CIDR identities of the addresses learned for its names
//! (the learned names given to the index). The cache follows learned names as it follows
//! identities: when names gain or lose addresses, only the `toFQDNs` clauses selecting one of
//! those names change, by those names' addresses alone ([`SelectorCache::update_names`]).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::Ipv4Addr;

use ipnetwork::Ipv4Network;

use crate::fqdn::{FqdnSelector, LearnedNames, selected_addresses};
use crate::identity::{Identity, IdentitySource, IdentityTable};
use crate::labels::Labels;
use crate::merge::{Side, merge_join};
use crate::model::{Entity, Peer};

/// Reserved identities inside the cluster (the `cluster` entity besides workloads).
const CLUSTER_RESERVED: [Identity; 7] = [
    Identity::HOST,
    Identity::REMOTE_NODE,
    Identity::HEALTH,
    Identity::INIT,
    Identity::UNMANAGED,
    Identity::KUBE_APISERVER,
    Identity::INGRESS,
];

/// Identities arranged for selection: workloads with their labels, CIDR identities by
/// (network, prefix length) so a CIDR clause is a range query instead of a scan.
#[derive(Debug, Default)]
pub struct IdentityIndex<'a> {
    workloads: Vec<(Identity, &'a Labels)>,
    /// (network address, prefix length) -> (identity, is it an endpoint-address alias).
    cidrs: BTreeMap<(u32, u8), Vec<(Identity, bool)>>,
    /// The names the DNS proxy learned, which `toFQDNs` clauses select from (none: they
    /// select nothing).
    fqdns: Option<&'a LearnedNames>,
}

impl<'a> IdentityIndex<'a> {
    pub fn new<I>(identities: I) -> Self
    where
        I: IntoIterator<Item = (&'a Identity, &'a IdentitySource)>,
    {
        let mut index = IdentityIndex::default();
        for (id, src) in identities {
            match src {
                IdentitySource::Workload { labels } => index.workloads.push((*id, labels)),
                IdentitySource::Cidr { prefix } => index.add_cidr(*prefix, *id, false),
                IdentitySource::CidrEndpointAlias { prefix } => index.add_cidr(*prefix, *id, true),
                IdentitySource::Reserved { .. } => {}
            }
        }
        index
    }

    /// The index, with `toFQDNs` clauses selecting from `fqdns`.
    #[must_use]
    pub fn with_fqdns(mut self, fqdns: &'a LearnedNames) -> Self {
        self.fqdns = Some(fqdns);
        self
    }

    fn add_cidr(&mut self, prefix: Ipv4Network, id: Identity, alias: bool) {
        self.cidrs
            .entry((u32::from(prefix.network()), prefix.prefix()))
            .or_default()
            .push((id, alias));
    }

    /// CIDR identities (and their aliases) whose prefix lies inside `outer`.
    fn cidrs_within(
        &self,
        outer: Ipv4Network,
    ) -> impl Iterator<Item = (Ipv4Network, Identity, bool)> + '_ {
        let first = u32::from(outer.network());
        let last = u32::from(outer.broadcast());
        self.cidrs
            .range((first, 0)..=(last, 32))
            .filter(move |((_, len), _)| *len >= outer.prefix())
            .flat_map(|((net, len), ids)| {
                let prefix = Ipv4Network::new((*net).into(), *len).expect("indexed from a network");
                ids.iter().map(move |(id, alias)| (prefix, *id, *alias))
            })
    }

    /// The identities of this index that `peer` selects. Constant answers (entities naming
    /// reserved identities, `world`'s stand-in for unknown addresses) are included whatever
    /// the index holds.
    pub fn select(&self, peer: &Peer) -> BTreeSet<Identity> {
        match peer {
            Peer::Fqdn(sel) => {
                let Some(fqdns) = self.fqdns else {
                    return BTreeSet::new();
                };
                let addresses: BTreeSet<u32> =
                    selected_addresses(sel, fqdns).map(u32::from).collect();
                addresses
                    .into_iter()
                    .filter_map(|a| self.cidrs.get(&(a, 32)))
                    .flatten()
                    .filter(|(_, alias)| !alias)
                    .map(|(id, _)| *id)
                    .collect()
            }
            Peer::Endpoints(sel) => self
                .workloads
                .iter()
                .filter(|(_, l)| sel.0.matches(l))
                .map(|(id, _)| *id)
                .collect(),
            Peer::Cidr { cidr, except } => {
                let mut out: BTreeSet<Identity> = self
                    .cidrs_within(*cidr)
                    .filter(|(p, _, _)| !except.iter().any(|e| contains(*e, *p)))
                    .map(|(_, id, _)| id)
                    .collect();
                // Unknown addresses resolve to `world`, which stands for 0.0.0.0/0.
                if cidr.prefix() == 0 {
                    out.insert(Identity::WORLD);
                }
                out
            }
            Peer::Entity(entity) => match entity {
                Entity::All => [Identity::ANY].into(),
                Entity::World => self
                    .cidrs
                    .values()
                    .flatten()
                    .filter(|(_, alias)| !alias)
                    .map(|(id, _)| *id)
                    .chain([Identity::WORLD])
                    .collect(),
                Entity::Cluster => self
                    .workloads
                    .iter()
                    .map(|(id, _)| *id)
                    .chain(CLUSTER_RESERVED)
                    .collect(),
                Entity::Host => [Identity::HOST].into(),
                Entity::RemoteNode => [Identity::REMOTE_NODE].into(),
                Entity::Init => [Identity::INIT].into(),
                Entity::Health => [Identity::HEALTH].into(),
                Entity::Unmanaged => [Identity::UNMANAGED].into(),
                Entity::KubeApiserver => [Identity::KUBE_APISERVER].into(),
                Entity::Ingress => [Identity::INGRESS].into(),
            },
        }
    }
}

/// An index built the first time a compile needs one (a compile whose clauses are all cached
/// never builds it).
pub struct LazyIndex<'a> {
    table: &'a IdentityTable,
    fqdns: &'a LearnedNames,
    index: std::cell::OnceCell<IdentityIndex<'a>>,
}

impl<'a> LazyIndex<'a> {
    pub fn new(table: &'a IdentityTable, fqdns: &'a LearnedNames) -> Self {
        Self {
            table,
            fqdns,
            index: std::cell::OnceCell::new(),
        }
    }

    pub fn get(&self) -> &IdentityIndex<'a> {
        self.index
            .get_or_init(|| IdentityIndex::new(self.table).with_fqdns(self.fqdns))
    }
}

fn contains(outer: Ipv4Network, inner: Ipv4Network) -> bool {
    outer.prefix() <= inner.prefix() && outer.contains(inner.network())
}

/// How the identity table changed between two compiles.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IdentityDelta {
    /// New identities, and identities whose source changed (listed in `removed` too).
    pub added: IdentityTable,
    pub removed: BTreeSet<Identity>,
}

impl IdentityDelta {
    /// One merge walk over both (sorted) tables.
    pub fn between(old: &IdentityTable, new: &IdentityTable) -> Self {
        let mut delta = IdentityDelta::default();
        for side in merge_join(old, new) {
            match side {
                Side::Left(id, _) => {
                    delta.removed.insert(*id);
                }
                Side::Right(id, src) => {
                    delta.added.insert(*id, src.clone());
                }
                Side::Both(id, was, now) if was != now => {
                    delta.removed.insert(*id);
                    delta.added.insert(*id, now.clone());
                }
                Side::Both(..) => {}
            }
        }
        delta
    }

    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty()
    }
}

/// What one clause's selection gained and lost.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SelectionChange {
    pub added: BTreeSet<Identity>,
    pub removed: BTreeSet<Identity>,
}

/// Each distinct peer clause, resolved once and kept up to date by identity deltas.
///
/// A `toFQDNs` clause selects the /32 CIDR identities of the addresses its names hold. So
/// that a learned answer costs work for its own names only (not a walk over every name and
/// identity), the cache keeps, per such clause, how many of its names hold each address, and
/// the /32 CIDR identity of each address.
#[derive(Clone, Debug, Default)]
pub struct SelectorCache {
    selections: HashMap<Peer, BTreeSet<Identity>>,
    /// Per cached `toFQDNs` clause: each address its names hold, with how many hold it.
    fqdn_holders: HashMap<FqdnSelector, HashMap<Ipv4Addr, u32>>,
    /// The /32 CIDR identity (never an endpoint alias) of each address that has one, both
    /// ways; built from the table when first needed, then followed by identity deltas.
    host_cidrs: Option<HostCidrs>,
}

#[derive(Clone, Debug, Default)]
struct HostCidrs {
    by_address: HashMap<Ipv4Addr, Identity>,
    by_identity: HashMap<Identity, Ipv4Addr>,
}

impl HostCidrs {
    fn of<'a>(identities: impl IntoIterator<Item = (&'a Identity, &'a IdentitySource)>) -> Self {
        let mut out = HostCidrs::default();
        for (id, src) in identities {
            out.insert(*id, src);
        }
        out
    }

    fn insert(&mut self, id: Identity, src: &IdentitySource) {
        if let IdentitySource::Cidr { prefix } = src
            && prefix.prefix() == 32
        {
            self.by_address.insert(prefix.ip(), id);
            self.by_identity.insert(id, prefix.ip());
        }
    }

    fn remove(&mut self, id: Identity) {
        if let Some(a) = self.by_identity.remove(&id) {
            self.by_address.remove(&a);
        }
    }
}

impl SelectorCache {
    /// The identities `peer` selects; resolved through `index` the first time it is asked for.
    pub fn select(&mut self, peer: &Peer, index: &LazyIndex<'_>) -> &BTreeSet<Identity> {
        if !self.selections.contains_key(peer) {
            if let Peer::Fqdn(sel) = peer {
                let mut holders: HashMap<Ipv4Addr, u32> = HashMap::new();
                for (_, addrs) in index.fqdns.iter().filter(|(n, _)| sel.matches(n)) {
                    for a in addrs {
                        *holders.entry(*a).or_default() += 1;
                    }
                }
                self.fqdn_holders.insert(sel.clone(), holders);
            }
            self.selections
                .insert(peer.clone(), index.get().select(peer));
        }
        &self.selections[peer]
    }

    /// The cached selection of `peer`, if it has been resolved.
    pub fn cached(&self, peer: &Peer) -> Option<&BTreeSet<Identity>> {
        self.selections.get(peer)
    }

    pub fn len(&self) -> usize {
        self.selections.len()
    }

    pub fn is_empty(&self) -> bool {
        self.selections.is_empty()
    }

    /// Applies an identity delta to every cached clause; returns the clauses whose selection
    /// changed, with what they gained and lost. `toFQDNs` clauses gain the new /32 CIDR
    /// identities of addresses their names held before the delta (what the names gain, they
    /// learn in [`SelectorCache::update_names`]).
    pub fn update(&mut self, delta: &IdentityDelta) -> HashMap<Peer, SelectionChange> {
        let mut changed = HashMap::new();
        if delta.is_empty() {
            return changed;
        }
        if let Some(h) = &mut self.host_cidrs {
            for id in &delta.removed {
                h.remove(*id);
            }
            for (id, src) in &delta.added {
                h.insert(*id, src);
            }
        }
        let added = IdentityIndex::new(&delta.added);
        let new_hosts = HostCidrs::of(&delta.added);
        for (peer, selected) in &mut self.selections {
            let mut change = SelectionChange::default();
            for id in &delta.removed {
                if selected.remove(id) {
                    change.removed.insert(*id);
                }
            }
            let gained = match peer {
                Peer::Fqdn(sel) => {
                    let holders = self.fqdn_holders.get(sel);
                    new_hosts
                        .by_address
                        .iter()
                        .filter(|(a, _)| holders.is_some_and(|h| h.contains_key(a)))
                        .map(|(_, id)| *id)
                        .collect()
                }
                _ => added.select(peer),
            };
            for id in gained {
                if selected.insert(id) {
                    change.added.insert(id);
                }
            }
            // An identity whose source changed may be selected before and after.
            let both: Vec<Identity> = change
                .added
                .intersection(&change.removed)
                .copied()
                .collect();
            for id in both {
                change.added.remove(&id);
                change.removed.remove(&id);
            }
            if !(change.added.is_empty() && change.removed.is_empty()) {
                changed.insert(peer.clone(), change);
            }
        }
        changed
    }

    /// Follows `names`, whose learned addresses changed from `before` to what `index` holds
    /// now, in every cached `toFQDNs` clause selecting one of them (after the identity delta
    /// of the same change, [`SelectorCache::update`]): an address a clause's names now hold
    /// and none held before brings its /32 CIDR identity in, one none of them holds any more
    /// takes it out. Adds what the selections gained and lost to `changed`. Costs work for
    /// the changed names' addresses only.
    pub fn update_names(
        &mut self,
        names: &BTreeSet<String>,
        before: &LearnedNames,
        index: &LazyIndex<'_>,
        changed: &mut HashMap<Peer, SelectionChange>,
    ) {
        if names.is_empty() || self.fqdn_holders.is_empty() {
            return;
        }
        let hosts = self
            .host_cidrs
            .get_or_insert_with(|| HostCidrs::of(index.table));
        let empty = BTreeSet::new();
        for (peer, selected) in &mut self.selections {
            let Peer::Fqdn(sel) = peer else { continue };
            let Some(holders) = self.fqdn_holders.get_mut(sel) else {
                continue;
            };
            let mut change = SelectionChange::default();
            for name in names.iter().filter(|n| sel.matches(n)) {
                let old = before.get(name).unwrap_or(&empty);
                let now = index.fqdns.get(name).unwrap_or(&empty);
                for a in old.difference(now) {
                    let Some(n) = holders.get_mut(a) else {
                        continue;
                    };
                    *n -= 1;
                    if *n == 0 {
                        holders.remove(a);
                        if let Some(id) = hosts.by_address.get(a)
                            && selected.remove(id)
                            && !change.added.remove(id)
                        {
                            change.removed.insert(*id);
                        }
                    }
                }
                for a in now.difference(old) {
                    let n = holders.entry(*a).or_default();
                    *n += 1;
                    if *n == 1
                        && let Some(id) = hosts.by_address.get(a)
                        && selected.insert(*id)
                        && !change.removed.remove(id)
                    {
                        change.added.insert(*id);
                    }
                }
            }
            if change.added.is_empty() && change.removed.is_empty() {
                continue;
            }
            let entry = changed.entry(peer.clone()).or_default();
            for id in change.added {
                if !entry.removed.remove(&id) {
                    entry.added.insert(id);
                }
            }
            for id in change.removed {
                if !entry.added.remove(&id) {
                    entry.removed.insert(id);
                }
            }
        }
        changed.retain(|_, c| !(c.added.is_empty() && c.removed.is_empty()));
    }

    /// Forgets every clause `keep` rejects (clauses no policy names any more).
    pub fn retain(&mut self, keep: impl Fn(&Peer) -> bool) {
        self.selections.retain(|p, _| keep(p));
        let selections = &self.selections;
        self.fqdn_holders
            .retain(|sel, _| selections.contains_key(&Peer::Fqdn(sel.clone())));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::labels::LabelSelector;
    use crate::model::EndpointSelector;

    fn workload(pairs: &[(&str, &str)]) -> IdentitySource {
        IdentitySource::Workload {
            labels: pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    fn cidr(s: &str) -> IdentitySource {
        IdentitySource::Cidr {
            prefix: s.parse().unwrap(),
        }
    }

    fn web() -> Peer {
        Peer::Endpoints(EndpointSelector(
            LabelSelector::everything().with_label("app", "web"),
        ))
    }

    #[test]
    fn a_fqdn_clause_selects_the_host_identities_of_the_learned_addresses() {
        let alias = IdentitySource::CidrEndpointAlias {
            prefix: "10.0.0.9/32".parse().unwrap(),
        };
        let table: IdentityTable = [
            (Identity(0x0100_0001), cidr("192.0.2.10/32")),
            (Identity(0x0100_0002), cidr("192.0.2.0/24")),
            (Identity(0x0100_0003), cidr("198.51.100.7/32")),
            (Identity(0x0100_0004), alias),
        ]
        .into();
        let names: LearnedNames = [
            (
                "api.example.test".to_string(),
                ["192.0.2.10".parse().unwrap(), "10.0.0.9".parse().unwrap()].into(),
            ),
            (
                "other.example.test".to_string(),
                ["198.51.100.7".parse().unwrap()].into(),
            ),
        ]
        .into();
        let peer = Peer::Fqdn(crate::fqdn::FqdnSelector::name("api.example.test").unwrap());
        // Only the /32 of a learned address, never a wider CIDR or an endpoint's alias.
        let index = IdentityIndex::new(&table).with_fqdns(&names);
        assert_eq!(index.select(&peer), [Identity(0x0100_0001)].into());
        // Without learned names it selects nothing.
        assert!(IdentityIndex::new(&table).select(&peer).is_empty());
    }

    #[test]
    fn a_learned_name_re_resolves_only_the_fqdn_clauses_selecting_it() {
        // 192.0.2.10 has its identity already (another name learned it): a new name for it
        // changes no identity, only the clauses selecting the name.
        let table: IdentityTable = [
            (Identity(0x0100_0001), cidr("192.0.2.10/32")),
            (Identity(0x0100_0002), cidr("192.0.2.11/32")),
        ]
        .into();
        let ip = |s: &str| s.parse::<std::net::Ipv4Addr>().unwrap();
        let before: LearnedNames = [
            ("old.example.test".to_string(), [ip("192.0.2.10")].into()),
            ("b.other.test".to_string(), [ip("192.0.2.11")].into()),
        ]
        .into();
        let pattern = Peer::Fqdn(crate::fqdn::FqdnSelector::pattern("*.example.test").unwrap());
        let other = Peer::Fqdn(crate::fqdn::FqdnSelector::name("b.other.test").unwrap());
        let mut cache = SelectorCache::default();
        let index = LazyIndex::new(&table, &before);
        cache.select(&pattern, &index);
        cache.select(&other, &index);
        cache.select(&web(), &index);
        // old.example.test moves to .11; b.other.test is unchanged.
        let after: LearnedNames = [
            ("old.example.test".to_string(), [ip("192.0.2.11")].into()),
            ("b.other.test".to_string(), [ip("192.0.2.11")].into()),
        ]
        .into();
        let names = crate::fqdn::changed_names(&before, &after);
        let mut changed = HashMap::new();
        cache.update_names(
            &names,
            &before,
            &LazyIndex::new(&table, &after),
            &mut changed,
        );
        assert_eq!(
            changed,
            [(
                pattern.clone(),
                SelectionChange {
                    added: [Identity(0x0100_0002)].into(),
                    removed: [Identity(0x0100_0001)].into(),
                }
            )]
            .into()
        );
        assert_eq!(
            cache.cached(&pattern),
            Some(&[Identity(0x0100_0002)].into())
        );
        assert_eq!(cache.cached(&other), Some(&[Identity(0x0100_0002)].into()));
    }

    #[test]
    fn an_address_stays_selected_while_one_of_the_clauses_names_holds_it() {
        let ten = Identity(0x0100_0001);
        let ip = |s: &str| s.parse::<std::net::Ipv4Addr>().unwrap();
        let both: LearnedNames = [
            ("a.example.test".to_string(), [ip("192.0.2.10")].into()),
            ("b.example.test".to_string(), [ip("192.0.2.10")].into()),
        ]
        .into();
        let table: IdentityTable = [(ten, cidr("192.0.2.10/32"))].into();
        let pattern = Peer::Fqdn(crate::fqdn::FqdnSelector::pattern("*.example.test").unwrap());
        let mut cache = SelectorCache::default();
        assert_eq!(
            cache.select(&pattern, &LazyIndex::new(&table, &both)),
            &[ten].into()
        );
        // a.example.test loses it: b.example.test still holds it.
        let one: LearnedNames = [("b.example.test".to_string(), [ip("192.0.2.10")].into())].into();
        let mut changed = HashMap::new();
        let names = crate::fqdn::changed_names(&both, &one);
        cache.update_names(&names, &both, &LazyIndex::new(&table, &one), &mut changed);
        assert!(changed.is_empty());
        assert_eq!(cache.cached(&pattern), Some(&[ten].into()));
        // b.example.test loses it too: it goes.
        let none = LearnedNames::new();
        let names = crate::fqdn::changed_names(&one, &none);
        cache.update_names(&names, &one, &LazyIndex::new(&table, &none), &mut changed);
        assert_eq!(changed[&pattern].removed, [ten].into());
        assert_eq!(cache.cached(&pattern), Some(&BTreeSet::new()));
        // Its identity goes; learned again, it is selected once the identity comes back.
        let empty = IdentityTable::new();
        cache.update(&IdentityDelta::between(&table, &empty));
        let mut changed = HashMap::new();
        let names = crate::fqdn::changed_names(&none, &one);
        cache.update_names(&names, &none, &LazyIndex::new(&empty, &one), &mut changed);
        assert!(changed.is_empty(), "no identity to select yet");
        let changed = cache.update(&IdentityDelta::between(&empty, &table));
        assert_eq!(changed[&pattern].added, [ten].into());
        assert_eq!(cache.cached(&pattern), Some(&[ten].into()));
    }

    #[test]
    fn a_cidr_clause_selects_the_prefixes_inside_it_but_not_its_exceptions() {
        let table: IdentityTable = [
            (Identity(0x0100_0001), cidr("10.0.0.0/8")),
            (Identity(0x0100_0002), cidr("10.1.0.0/16")),
            (Identity(0x0100_0003), cidr("10.1.2.0/24")),
            (Identity(0x0100_0004), cidr("11.0.0.0/8")),
        ]
        .into();
        let index = IdentityIndex::new(&table);
        let peer = Peer::Cidr {
            cidr: "10.0.0.0/8".parse().unwrap(),
            except: vec!["10.1.2.0/23".parse().unwrap()],
        };
        assert_eq!(
            index.select(&peer),
            [Identity(0x0100_0001), Identity(0x0100_0002)].into()
        );
        let inner = Peer::Cidr {
            cidr: "10.1.0.0/16".parse().unwrap(),
            except: vec![],
        };
        assert_eq!(
            index.select(&inner),
            [Identity(0x0100_0002), Identity(0x0100_0003)].into()
        );
    }

    #[test]
    fn identity_changes_flow_out_as_added_and_removed_per_clause() {
        let old: IdentityTable = [
            (Identity(300), workload(&[("app", "web")])),
            (Identity(301), workload(&[("app", "db")])),
        ]
        .into();
        let mut cache = SelectorCache::default();
        let names = LearnedNames::new();
        let index = LazyIndex::new(&old, &names);
        assert_eq!(cache.select(&web(), &index), &[Identity(300)].into());
        let db = Peer::Endpoints(EndpointSelector(
            LabelSelector::everything().with_label("app", "db"),
        ));
        cache.select(&db, &index);
        let new: IdentityTable = [
            (Identity(301), workload(&[("app", "db")])),
            (Identity(302), workload(&[("app", "web")])),
        ]
        .into();
        let changed = cache.update(&IdentityDelta::between(&old, &new));
        assert_eq!(
            changed.get(&web()),
            Some(&SelectionChange {
                added: [Identity(302)].into(),
                removed: [Identity(300)].into(),
            })
        );
        assert!(!changed.contains_key(&db), "db's selection did not change");
        assert_eq!(cache.cached(&web()), Some(&[Identity(302)].into()));
    }
}
