//! The name cache: what each endpoint's DNS answers taught, and until when. Plain data with
//! pure operations; the engine owns it, persists it, and compiles `toFQDNs` peers from its
//! union ([`FqdnCache::names`]).
//!
//! Lifetimes, as Cilium's: an address lives for its answer's TTL, but at least the configured
//! minimum (`--fqdn-min-ttl`); a newer answer extends it. Once expired it goes, unless the
//! datapath still tracks a connection to it from an endpoint that learned it: then it stays
//! until the connections end. Each endpoint keeps at most `max_per_name` addresses per name;
//! an answer beyond that evicts the addresses that would expire first, and the eviction is
//! counted.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use palisade_policies::endpoint::EndpointId;
use palisade_policies::fqdn::LearnedNames;
use serde::{Deserialize, Serialize};

/// One learned address, as it is persisted and listed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FqdnEntry {
    pub endpoint: EndpointId,
    pub name: String,
    pub address: Ipv4Addr,
    /// Unix time (seconds) at which the answer's lifetime ends.
    pub expires: u64,
}

/// Lifetimes and limits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FqdnLimits {
    /// The shortest lifetime an address gets, whatever its TTL (seconds).
    pub min_ttl: u32,
    /// Addresses one endpoint keeps per name.
    pub max_per_name: usize,
}

impl Default for FqdnLimits {
    fn default() -> Self {
        Self {
            min_ttl: 3_600,
            max_per_name: 50,
        }
    }
}

/// What one answer changed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LearnOutcome {
    /// Addresses evicted because a name had too many.
    pub evicted: usize,
    /// The names whose addresses over every endpoint ([`FqdnCache::names`]) changed: all
    /// the compile has to follow.
    pub changed_names: BTreeSet<String>,
}

/// An endpoint's addresses for one name, with the time each expires.
type Addresses = BTreeMap<Ipv4Addr, u64>;

/// What an endpoint held for some names before a change, to put back if it fails.
#[derive(Clone, Debug, Default)]
pub struct FqdnUndo {
    slots: Vec<(EndpointId, String, Option<Addresses>)>,
    kept: BTreeSet<(EndpointId, String)>,
}

impl FqdnUndo {
    /// Keeps what `endpoint` holds for `names` now (the first time each is asked for).
    pub fn keep(&mut self, cache: &FqdnCache, endpoint: EndpointId, names: &[String]) {
        for name in names {
            if self.kept.insert((endpoint, name.clone())) {
                let held = cache
                    .by_endpoint
                    .get(&endpoint)
                    .and_then(|n| n.get(name))
                    .cloned();
                self.slots.push((endpoint, name.clone(), held));
            }
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FqdnCache {
    by_endpoint: BTreeMap<EndpointId, BTreeMap<String, Addresses>>,
    /// Every name with every endpoint's addresses for it, kept up to date by each change
    /// (the compile reads it at every learned answer).
    learned: LearnedNames,
}

impl FqdnCache {
    pub fn restore(entries: &[FqdnEntry]) -> Self {
        let mut c = Self::default();
        for e in entries {
            let slot = c
                .by_endpoint
                .entry(e.endpoint)
                .or_default()
                .entry(e.name.clone())
                .or_default()
                .entry(e.address)
                .or_insert(0);
            *slot = (*slot).max(e.expires);
        }
        c.rebuild_names();
        c
    }

    pub fn entries(&self) -> Vec<FqdnEntry> {
        let mut out = Vec::new();
        for (ep, names) in &self.by_endpoint {
            for (name, addrs) in names {
                for (addr, expires) in addrs {
                    out.push(FqdnEntry {
                        endpoint: *ep,
                        name: name.clone(),
                        address: *addr,
                        expires: *expires,
                    });
                }
            }
        }
        out
    }

    /// Every name with every endpoint's addresses for it.
    pub fn names(&self) -> &LearnedNames {
        &self.learned
    }

    fn rebuild_names(&mut self) {
        let mut out = LearnedNames::new();
        for names in self.by_endpoint.values() {
            for (name, addrs) in names {
                out.entry(name.clone())
                    .or_default()
                    .extend(addrs.keys().copied());
            }
        }
        self.learned = out;
    }

    /// Recomputes `name`'s addresses over every endpoint; returns whether they changed.
    fn refresh_name(&mut self, name: &str) -> bool {
        let now: BTreeSet<Ipv4Addr> = self
            .by_endpoint
            .values()
            .filter_map(|names| names.get(name))
            .flat_map(BTreeMap::keys)
            .copied()
            .collect();
        if now.is_empty() {
            return self.learned.remove(name).is_some();
        }
        if self.learned.get(name) == Some(&now) {
            return false;
        }
        self.learned.insert(name.to_string(), now);
        true
    }

    /// Puts back what `undo` kept.
    pub fn undo(&mut self, undo: FqdnUndo) {
        for (endpoint, name, held) in undo.slots {
            match held {
                Some(addrs) => {
                    self.by_endpoint
                        .entry(endpoint)
                        .or_default()
                        .insert(name.clone(), addrs);
                }
                None => {
                    if let Some(names) = self.by_endpoint.get_mut(&endpoint) {
                        names.remove(&name);
                        if names.is_empty() {
                            self.by_endpoint.remove(&endpoint);
                        }
                    }
                }
            }
            self.refresh_name(&name);
        }
    }

    /// Records an answer `endpoint` got at `now`: every name of it gets every address, living
    /// `ttl` seconds (at least the minimum).
    pub fn learn(
        &mut self,
        endpoint: EndpointId,
        names: &[String],
        addresses: &[Ipv4Addr],
        ttl: u32,
        now: u64,
        limits: FqdnLimits,
    ) -> LearnOutcome {
        // An answer without addresses (NXDOMAIN, a CNAME alone) teaches nothing; recording its
        // names would leave empty entries a restart does not bring back.
        if addresses.is_empty() {
            return LearnOutcome::default();
        }
        let mut outcome = LearnOutcome::default();
        let expires = now + u64::from(ttl.max(limits.min_ttl));
        let per_name = self.by_endpoint.entry(endpoint).or_default();
        for name in names {
            let addrs = per_name.entry(name.clone()).or_default();
            for a in addresses {
                let e = addrs.entry(*a).or_insert(0);
                *e = (*e).max(expires);
            }
            while addrs.len() > limits.max_per_name.max(1) {
                // The one that would expire first goes (never one of this answer's, whose
                // lifetimes are the longest, unless the answer alone is over the limit).
                let Some((&oldest, _)) = addrs.iter().min_by_key(|(a, e)| (**e, **a)) else {
                    break;
                };
                addrs.remove(&oldest);
                outcome.evicted += 1;
            }
        }
        for name in names {
            if self.refresh_name(name) {
                outcome.changed_names.insert(name.clone());
            }
        }
        outcome
    }

    /// Removes what expired by `now`, except addresses `open` says an endpoint still has
    /// connections to; and everything of endpoints not in `live`. Returns whether an address
    /// left the cache as a whole (the compile may change).
    pub fn expire(
        &mut self,
        now: u64,
        live: &BTreeSet<EndpointId>,
        open: &BTreeSet<(EndpointId, Ipv4Addr)>,
    ) -> bool {
        let before: BTreeSet<Ipv4Addr> = self.learned.values().flatten().copied().collect();
        self.by_endpoint.retain(|ep, _| live.contains(ep));
        for (ep, names) in &mut self.by_endpoint {
            for addrs in names.values_mut() {
                addrs.retain(|a, expires| *expires > now || open.contains(&(*ep, *a)));
            }
            names.retain(|_, addrs| !addrs.is_empty());
        }
        self.by_endpoint.retain(|_, names| !names.is_empty());
        self.rebuild_names();
        let after: BTreeSet<Ipv4Addr> = self.learned.values().flatten().copied().collect();
        before != after
    }

    /// Whether some endpoint has learned `address` for `name`.
    pub fn holds(&self, name: &str, address: Ipv4Addr) -> bool {
        self.learned.get(name).is_some_and(|a| a.contains(&address))
    }

    /// What the cache holds for `endpoint`'s `names` and `addresses` (those an answer
    /// taught, after `learn`): the entries a journal records.
    pub fn entries_of(
        &self,
        endpoint: EndpointId,
        names: &[String],
        addresses: &[Ipv4Addr],
    ) -> Vec<FqdnEntry> {
        let Some(per_name) = self.by_endpoint.get(&endpoint) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for name in names {
            let Some(addrs) = per_name.get(name) else {
                continue;
            };
            for a in addresses {
                if let Some(expires) = addrs.get(a) {
                    out.push(FqdnEntry {
                        endpoint,
                        name: name.clone(),
                        address: *a,
                        expires: *expires,
                    });
                }
            }
        }
        out
    }

    /// Whether anything has expired by `now` (so `expire` is worth running).
    pub fn has_expired(&self, now: u64) -> bool {
        self.by_endpoint
            .values()
            .flat_map(BTreeMap::values)
            .flat_map(BTreeMap::values)
            .any(|e| *e <= now)
    }

    pub fn len(&self) -> usize {
        self.by_endpoint
            .values()
            .flat_map(BTreeMap::values)
            .map(BTreeMap::len)
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EP: EndpointId = EndpointId(1);
    const A: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
    const B: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 2);

    fn limits(min_ttl: u32, max: usize) -> FqdnLimits {
        FqdnLimits {
            min_ttl,
            max_per_name: max,
        }
    }

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| (*s).to_string()).collect()
    }

    #[test]
    fn an_answer_lives_its_ttl_but_at_least_the_minimum() {
        let mut c = FqdnCache::default();
        let o = c.learn(EP, &names(&["a.test"]), &[A], 5, 100, limits(30, 10));
        assert_eq!(o.changed_names, ["a.test".to_string()].into());
        assert_eq!(c.entries()[0].expires, 130);
        c.learn(EP, &names(&["a.test"]), &[A], 600, 100, limits(30, 10));
        assert_eq!(c.entries()[0].expires, 700);
        let o = c.learn(EP, &names(&["a.test"]), &[A], 1, 100, limits(30, 10));
        assert!(o.changed_names.is_empty());
        assert_eq!(
            c.entries()[0].expires,
            700,
            "a shorter answer never shortens"
        );
    }

    #[test]
    fn expired_addresses_go_unless_a_connection_holds_them() {
        let live: BTreeSet<_> = [EP].into();
        let mut c = FqdnCache::default();
        c.learn(EP, &names(&["a.test"]), &[A, B], 10, 0, limits(0, 10));
        assert!(!c.expire(5, &live, &BTreeSet::new()));
        assert!(c.has_expired(10));
        let open: BTreeSet<_> = [(EP, B)].into();
        assert!(c.expire(10, &live, &open));
        assert_eq!(c.names()["a.test"], [B].into());
        assert!(c.expire(11, &live, &BTreeSet::new()));
        assert!(c.is_empty());
    }

    #[test]
    fn a_deleted_endpoints_names_go() {
        let mut c = FqdnCache::default();
        c.learn(EP, &names(&["a.test"]), &[A], 10, 0, limits(0, 10));
        assert!(c.expire(0, &BTreeSet::new(), &BTreeSet::new()));
        assert!(c.is_empty());
    }

    #[test]
    fn too_many_addresses_for_a_name_evict_the_oldest_and_are_counted() {
        let mut c = FqdnCache::default();
        c.learn(EP, &names(&["a.test"]), &[A], 10, 0, limits(0, 1));
        let o = c.learn(EP, &names(&["a.test"]), &[B], 10, 5, limits(0, 1));
        assert_eq!(o.evicted, 1);
        assert_eq!(c.names()["a.test"], [B].into());
    }

    #[test]
    fn an_answer_without_addresses_teaches_nothing() {
        // Found by the dns_message fuzz target: it left an empty name behind.
        let mut c = FqdnCache::default();
        let o = c.learn(EP, &names(&["a.test"]), &[], 10, 0, limits(0, 5));
        assert_eq!(o, LearnOutcome::default());
        assert_eq!(c, FqdnCache::default());
        assert_eq!(FqdnCache::restore(&c.entries()), c);
    }

    #[test]
    fn the_cache_survives_its_snapshot() {
        let mut c = FqdnCache::default();
        c.learn(
            EP,
            &names(&["a.test", "cdn.test"]),
            &[A],
            10,
            0,
            limits(0, 5),
        );
        c.learn(
            EndpointId(2),
            &names(&["a.test"]),
            &[B],
            10,
            0,
            limits(0, 5),
        );
        let back = FqdnCache::restore(&c.entries());
        assert_eq!(back, c);
        assert_eq!(back.names()["a.test"], [A, B].into());
        assert_eq!(back.len(), 3);
    }

    #[test]
    fn undo_puts_back_what_answers_changed() {
        let mut c = FqdnCache::default();
        c.learn(EP, &names(&["a.test"]), &[A], 10, 0, limits(0, 1));
        c.learn(
            EndpointId(2),
            &names(&["a.test"]),
            &[A],
            10,
            0,
            limits(0, 1),
        );
        let before = c.clone();
        let mut undo = FqdnUndo::default();
        undo.keep(&c, EP, &names(&["a.test", "new.test"]));
        // Evicts A for EP (one per name), and teaches a new name.
        c.learn(
            EP,
            &names(&["a.test", "new.test"]),
            &[B],
            10,
            5,
            limits(0, 1),
        );
        assert_eq!(c.names()["a.test"], [A, B].into());
        c.undo(undo);
        assert_eq!(c, before);
        assert_eq!(c.names(), before.names());
        assert!(!c.names().contains_key("new.test"));
    }

    mod props {
        use proptest::prelude::*;

        use super::*;
        use palisade_policies::fqdn::changed_names;

        /// (endpoint, name, address) of one learned answer, from small pools so they overlap.
        fn answer() -> impl Strategy<Value = (u32, String, Ipv4Addr)> {
            (1u32..4, 0u8..5, 1u8..6).prop_map(|(ep, n, a)| {
                (
                    ep,
                    format!("n{n}.example.test"),
                    Ipv4Addr::new(192, 0, 2, a),
                )
            })
        }

        proptest! {
            /// Without evictions, the names whose addresses an answer changes (what the
            /// compile follows, over every endpoint) are exactly those that gain an address
            /// no endpoint held for them: the learn path's quick check is the full one.
            #[test]
            fn names_that_gain_an_address_are_the_changed_names(
                earlier in proptest::collection::vec(answer(), 0..20),
                batch in proptest::collection::vec(answer(), 1..6),
            ) {
                let limits = FqdnLimits { min_ttl: 0, max_per_name: 100 };
                let mut cache = FqdnCache::default();
                for (ep, name, a) in &earlier {
                    cache.learn(EndpointId(*ep), std::slice::from_ref(name), &[*a], 60, 0, limits);
                }
                let before = cache.clone();
                let mut gained = BTreeSet::new();
                for (ep, name, a) in &batch {
                    if !cache.holds(name, *a) {
                        gained.insert(name.clone());
                    }
                    let o = cache.learn(EndpointId(*ep), std::slice::from_ref(name), &[*a], 60, 1, limits);
                    prop_assert_eq!(o.evicted, 0);
                }
                prop_assert_eq!(changed_names(before.names(), cache.names()), gained);
                // The kept names are those of the entries.
                let rebuilt = FqdnCache::restore(&cache.entries());
                prop_assert_eq!(rebuilt.names(), cache.names());
            }
        }
    }
}
