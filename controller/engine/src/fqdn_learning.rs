//! Learning DNS answers into the maps, and letting them expire. An answer that teaches an
//! address some `toFQDNs` peer selects is a change like any other: the model (with the
//! cache) is compiled and the diff written before the DNS proxy is answered, so the answer
//! reaches the client only once the datapath allows its addresses. Answers that arrive
//! together are learned together (one compile, one map write). One that teaches nothing new
//! to the compile (a known address, a name no policy selects) only refreshes lifetimes.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use palisade_policies::fqdn::changed_names;
use palisade_policies::identity::Identity;
use palisade_policies::model::Direction;
use palisade_policies::model::{Peer, Peers};

use crate::datapath::Datapath;
use crate::engine::Engine;
use crate::error::EngineError;
use crate::fqdn::{FqdnCache, FqdnUndo};
use crate::plumbing::Plumbing;
use tracing::warn;

/// An answer the DNS proxy read, for the endpoint at `client`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LearnRequest {
    pub client: Ipv4Addr,
    pub names: Vec<String>,
    pub addresses: Vec<Ipv4Addr>,
    pub ttl: u32,
}

/// What learning one answer did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LearnReport {
    /// The maps changed (a new address some `toFQDNs` peer selects).
    pub synced: bool,
    /// Addresses evicted because a name had more than the limit.
    pub evicted: usize,
}

/// Where one batch of learned answers spent its time on the engine's task, until the last of
/// its answers could be released (the maps allow their addresses).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LearnStages {
    /// Answers in the batch.
    pub answers: usize,
    /// Finding the asking endpoints, updating the name cache, deciding whether maps change.
    pub learn: Duration,
    /// Identities, compile and diff (zero when the maps did not change).
    pub compile: Duration,
    /// Map writes and the revision bump.
    pub write: Duration,
    /// Catalog, L7 and DNS proxy policies handed out.
    pub publish: Duration,
    /// Recording what the batch taught for a restart (a write to the page cache), building
    /// the state to save and handing it to the store's writer (whose disk sync nobody waits
    /// on).
    pub persist: Duration,
}

/// One learned address, for `palisade fqdn list`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FqdnView {
    /// `ns/name` of the endpoint that asked.
    pub endpoint: String,
    pub name: String,
    pub address: Ipv4Addr,
    /// Unix time the answer's lifetime ends.
    pub expires: u64,
    /// Seconds left of it (0 once expired).
    pub ttl_remaining: u64,
    /// Expired, but kept while the endpoint has connections to it.
    pub held_by_connections: bool,
    /// The address's CIDR identity, when some `toFQDNs` peer selects it.
    pub identity: Option<Identity>,
}

pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl<D: Datapath, P: Plumbing> Engine<D, P> {
    /// Whether some `toFQDNs` selector of some policy selects one of `names`: only then does
    /// a change of their addresses change the compile.
    fn fqdn_selects_any(&self, names: &BTreeSet<String>) -> bool {
        if names.is_empty() {
            return false;
        }
        self.model
            .policies
            .values()
            .flat_map(|p| &p.specs)
            .flat_map(|s| &s.egress.allow)
            .filter_map(|r| match &r.peers {
                Peers::Some(peers) => Some(peers),
                Peers::All => None,
            })
            .flatten()
            .any(|peer| matches!(peer, Peer::Fqdn(sel) if names.iter().any(|n| sel.matches(n))))
    }

    /// Whether the compile would see a change between the cache now and `cache`: some name a
    /// `toFQDNs` selector selects gained or lost addresses (the compile follows each name's
    /// addresses, not only the set of all of them: an address known for one name is news to
    /// the rule of another).
    fn fqdn_compile_changes(&self, cache: &FqdnCache) -> bool {
        let changed = changed_names(self.model.fqdns.names(), cache.names());
        self.fqdn_selects_any(&changed)
    }

    /// Learns one answer (see [`Engine::fqdn_learn_all`]).
    pub(crate) fn fqdn_learn(&mut self, req: &LearnRequest) -> Result<LearnReport, EngineError> {
        self.fqdn_learn_all(std::slice::from_ref(req))
            .pop()
            .expect("one result per request")
    }

    /// Learns answers the DNS proxy holds, together: one compile and one map write for all
    /// of them, so a burst of lookups costs a sync per batch, not per answer, and every
    /// answer's addresses are in the maps when this returns. Each gets its own report (an
    /// answer is `synced` when it taught something and the batch's maps changed). If the
    /// batch's sync fails, each answer is learned alone, so one answer the maps cannot take
    /// fails only itself, with its own error.
    pub(crate) fn fqdn_learn_all(
        &mut self,
        reqs: &[LearnRequest],
    ) -> Vec<Result<LearnReport, EngineError>> {
        let started = Instant::now();
        let now = unix_now();
        // Learned in place; what the answers change is kept to put back if the maps cannot
        // take it.
        let mut undo = FqdnUndo::default();
        let mut taught = Vec::with_capacity(reqs.len());
        let mut reports = Vec::with_capacity(reqs.len());
        let mut evicted = 0;
        let mut journal = Vec::new();
        // Names whose addresses over every endpoint changed: only they can change the compile.
        let mut changed = BTreeSet::new();
        for req in reqs {
            let Some(endpoint) = self
                .model
                .endpoints
                .values()
                .find(|r| r.ip == req.client)
                .map(|r| r.id)
            else {
                taught.push(false);
                reports.push(Err(EngineError::NoSuchEndpoint {
                    name: req.client.to_string(),
                }));
                continue;
            };
            let cache = &mut self.model.fqdns;
            undo.keep(cache, endpoint, &req.names);
            // What the answer changes (new addresses, longer lifetimes) is recorded for a
            // restart; a repeat within the same second changes nothing.
            let before = cache.entries_of(endpoint, &req.names, &req.addresses);
            let outcome = cache.learn(
                endpoint,
                &req.names,
                &req.addresses,
                req.ttl,
                now,
                self.cfg.fqdn,
            );
            evicted += outcome.evicted;
            journal.extend(
                cache
                    .entries_of(endpoint, &req.names, &req.addresses)
                    .into_iter()
                    .filter(|e| !before.contains(e)),
            );
            taught.push(!outcome.changed_names.is_empty() || outcome.evicted > 0);
            reports.push(Ok(LearnReport {
                synced: false,
                evicted: outcome.evicted,
            }));
            changed.extend(outcome.changed_names);
        }
        let synced = taught.contains(&true) && self.fqdn_selects_any(&changed);
        let mut stages = LearnStages {
            answers: reqs.len(),
            learn: started.elapsed(),
            ..LearnStages::default()
        };
        if synced {
            // Only the name cache and the identities (which a sync moves) change: they alone
            // are kept for the undo, not the whole model.
            let identities = self.model.identities.clone();
            if let Err(e) = self.sync() {
                self.model.fqdns.undo(undo);
                self.model.identities = identities;
                if reqs.len() == 1 {
                    return vec![Err(e)];
                }
                return reqs.iter().map(|r| self.fqdn_learn(r)).collect();
            }
            let times = self.sync_times;
            (stages.compile, stages.write, stages.publish) =
                (times.compile, times.write, times.publish);
            for (report, taught) in reports.iter_mut().zip(taught) {
                if let Ok(r) = report {
                    r.synced = taught;
                }
            }
        } else {
            self.fqdn_dirty = true;
        }
        // Before any answer is released, what it taught is recorded where a restarted agent
        // finds it, so none of the connections that follow a lookup can be dropped by a
        // restart (docs/dns.md, "Lifetimes"). If it cannot be, the answers fail (SERVFAIL):
        // the maps allow their addresses, but no client learns of them.
        let recording = Instant::now();
        if let Some(store) = &mut self.store
            && !journal.is_empty()
            && let Err(e) = store.record_learned(&journal)
        {
            let why = e.to_string();
            warn!(error = %why, "learned DNS answers could not be recorded; they are refused");
            for report in &mut reports {
                if report.is_ok() {
                    *report = Err(EngineError::Persist(crate::store::PersistError::new(
                        std::io::Error::other(why.clone()),
                    )));
                }
            }
        }
        if synced {
            // The state with the answers, for the writer (after the journal line, so the
            // save covers it and empties the journal).
            self.persist();
        }
        stages.persist += recording.elapsed();
        if let Some(m) = &self.outputs_metrics() {
            m.fqdn_evicted(evicted);
            m.fqdn_learned(&stages);
        }
        reports
    }

    /// Drops what expired (but what open connections still use) and what deleted endpoints
    /// learned. Returns whether the maps changed.
    pub(crate) fn fqdn_expire(&mut self) -> Result<bool, EngineError> {
        let now = unix_now();
        let live: BTreeSet<_> = self.model.endpoints.values().map(|r| r.id).collect();
        let open: BTreeSet<_> = if self.model.fqdns.has_expired(now) {
            self.datapath
                .connections()?
                .into_iter()
                .filter(|c| c.scope == Direction::Egress && c.open)
                .map(|c| (c.endpoint, *c.destination.ip()))
                .collect()
        } else {
            BTreeSet::new()
        };
        let mut cache = self.model.fqdns.clone();
        if !cache.expire(now, &live, &open) && cache == self.model.fqdns {
            return Ok(false);
        }
        if self.fqdn_compile_changes(&cache) {
            self.transact(move |m| {
                m.fqdns = cache;
                Ok(())
            })?;
            return Ok(true);
        }
        self.model.fqdns = cache;
        self.fqdn_dirty = true;
        Ok(false)
    }

    /// Saves lifetimes refreshed since the last save (nobody waits on this save).
    pub(crate) fn fqdn_flush(&mut self) {
        if self.fqdn_dirty {
            self.fqdn_dirty = false;
            self.persist();
            self.saved = None;
        }
    }

    pub(crate) fn fqdn_list(&self) -> Vec<FqdnView> {
        let now = unix_now();
        let by_id: std::collections::BTreeMap<_, _> = self
            .model
            .endpoints
            .values()
            .map(|r| (r.id, r.qualified_name()))
            .collect();
        self.model
            .fqdns
            .entries()
            .into_iter()
            .map(|e| FqdnView {
                endpoint: by_id
                    .get(&e.endpoint)
                    .cloned()
                    .unwrap_or_else(|| format!("endpoint {}", e.endpoint.0)),
                name: e.name,
                address: e.address,
                expires: e.expires,
                ttl_remaining: e.expires.saturating_sub(now),
                held_by_connections: e.expires <= now,
                identity: self
                    .model
                    .identities
                    .cidr_identity(&ipnetwork::Ipv4Network::from(e.address)),
            })
            .collect()
    }
}
