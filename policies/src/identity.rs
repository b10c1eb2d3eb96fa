//! Security identities: numbers derived from labels, shared by every endpoint with the same
//! security-relevant labels, reference-counted, and stable across agent restarts (the agent
//! persists `IdentityAllocator::snapshot`).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::Arc;

use ipnetwork::Ipv4Network;
use palisade_common::identity as reserved_ids;
use serde::{Deserialize, Serialize};

use crate::labels::{Labels, NAMESPACE_LABEL, NAMESPACE_LABELS_PREFIX};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Identity(pub u32);

impl Identity {
    /// Wildcard in policy keys: any peer.
    pub const ANY: Identity = Identity(reserved_ids::ANY);
    pub const HOST: Identity = Identity(reserved_ids::HOST);
    pub const WORLD: Identity = Identity(reserved_ids::WORLD);
    pub const UNMANAGED: Identity = Identity(reserved_ids::UNMANAGED);
    pub const HEALTH: Identity = Identity(reserved_ids::HEALTH);
    pub const INIT: Identity = Identity(reserved_ids::INIT);
    pub const REMOTE_NODE: Identity = Identity(reserved_ids::REMOTE_NODE);
    pub const KUBE_APISERVER: Identity = Identity(reserved_ids::KUBE_APISERVER);
    pub const INGRESS: Identity = Identity(reserved_ids::INGRESS);

    pub fn is_cidr(self) -> bool {
        self.0 & reserved_ids::SCOPE_MASK == reserved_ids::CIDR_SCOPE
    }

    pub fn is_cidr_endpoint_alias(self) -> bool {
        self.0 & reserved_ids::SCOPE_MASK == reserved_ids::CIDR_ENDPOINT_SCOPE
    }

    /// The endpoint-address alias of a CIDR identity.
    pub fn cidr_endpoint_alias(self) -> Identity {
        Identity((self.0 & !reserved_ids::SCOPE_MASK) | reserved_ids::CIDR_ENDPOINT_SCOPE)
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// The reserved identities, with their Cilium names.
pub const RESERVED: [(Identity, &str); 8] = [
    (Identity::HOST, "host"),
    (Identity::WORLD, "world"),
    (Identity::UNMANAGED, "unmanaged"),
    (Identity::HEALTH, "health"),
    (Identity::INIT, "init"),
    (Identity::REMOTE_NODE, "remote-node"),
    (Identity::KUBE_APISERVER, "kube-apiserver"),
    (Identity::INGRESS, "ingress"),
];

/// What an identity stands for.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum IdentitySource {
    Reserved {
        name: String,
    },
    /// Workloads with exactly these identity labels.
    Workload {
        labels: Labels,
    },
    /// Addresses outside the cluster whose most specific policy CIDR is `prefix`.
    Cidr {
        prefix: Ipv4Network,
    },
    /// Endpoint addresses whose most specific policy CIDR is `prefix` (looked up besides the
    /// endpoint's own identity so ipBlock rules apply to endpoint addresses).
    CidrEndpointAlias {
        prefix: Ipv4Network,
    },
}

impl IdentitySource {
    /// The labels of a workload identity, None otherwise.
    pub fn workload_labels(&self) -> Option<&Labels> {
        match self {
            IdentitySource::Workload { labels } => Some(labels),
            _ => None,
        }
    }

    /// Cilium-style label list: `k8s:app=web`, `reserved:host`, `cidr:10.0.0.0/8`.
    pub fn label_strings(&self) -> Vec<String> {
        match self {
            IdentitySource::Reserved { name } => vec![format!("reserved:{name}")],
            IdentitySource::Workload { labels } => {
                labels.iter().map(|(k, v)| format!("k8s:{k}={v}")).collect()
            }
            IdentitySource::Cidr { prefix } => {
                vec![format!("cidr:{prefix}"), "reserved:world".to_string()]
            }
            IdentitySource::CidrEndpointAlias { prefix } => {
                vec![
                    format!("cidr:{prefix}"),
                    "reserved:endpoint-address".to_string(),
                ]
            }
        }
    }
}

/// Every identity the compiler may meet, by number.
pub type IdentityTable = BTreeMap<Identity, IdentitySource>;

/// Pod labels that change with every rollout and so must not split identities (as Cilium).
const IGNORED_POD_LABELS: [&str; 5] = [
    "pod-template-hash",
    "controller-revision-hash",
    "pod-template-generation",
    "controller-uid",
    "batch.kubernetes.io/controller-uid",
];

/// The flat identity labels of a workload: its pod labels (minus rollout noise), its
/// namespace, and its namespace's labels (see `labels`).
pub fn workload_identity_labels(
    namespace: &str,
    namespace_labels: &Labels,
    pod_labels: &Labels,
) -> Labels {
    let mut out: Labels = pod_labels
        .iter()
        .filter(|(k, _)| !IGNORED_POD_LABELS.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    out.insert(NAMESPACE_LABEL.to_string(), namespace.to_string());
    for (k, v) in namespace_labels {
        out.insert(format!("{NAMESPACE_LABELS_PREFIX}{k}"), v.clone());
    }
    out
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error("no free identity left in the {scope} scope")]
    Exhausted { scope: &'static str },
    #[error("identity {id} is not allocated")]
    NotAllocated { id: Identity },
    #[error("snapshot maps identity {id} to two label sets")]
    DuplicateInSnapshot { id: Identity },
    #[error("snapshot identity {id} is outside the label scope")]
    OutOfScope { id: Identity },
    #[error("no cluster-wide identity is assigned to labels {labels:?} yet")]
    NotAssigned { labels: Labels },
    #[error("identity {id} is assigned to two label sets: {first:?} and {second:?}")]
    DuplicateAssignment {
        id: Identity,
        first: Labels,
        second: Labels,
    },
    #[error(
        "identity {id} is assigned to {labels:?}, but labels {holder:?} hold it here and have no other number"
    )]
    AssignmentTaken {
        id: Identity,
        labels: Labels,
        holder: Labels,
    },
}

#[derive(Clone, Debug)]
struct Allocation {
    id: Identity,
    refs: u32,
}

/// Persisted form: which labels own which number.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AllocatorSnapshot {
    pub workloads: Vec<(Identity, Labels)>,
    pub next_workload: u32,
}

/// Allocates workload identities (reference-counted) and CIDR identities (one per prefix
/// used by policy).
#[derive(Clone, Debug)]
pub struct IdentityAllocator {
    workloads: BTreeMap<Labels, Allocation>,
    workload_by_id: BTreeMap<Identity, Labels>,
    /// Numbers reserved by a restored snapshot but not (yet) referenced.
    reserved: BTreeMap<Labels, Identity>,
    next_workload: u32,
    cidrs: BTreeMap<Ipv4Network, Identity>,
    next_cidr: u32,
    /// Cluster scope: workload numbers come from `assigned` (the cluster's allocation) and
    /// are never chosen here.
    cluster: bool,
    assigned: BTreeMap<Labels, Identity>,
    /// Every identity in use, kept up to date by each change (a compile reads it at every
    /// change, often with thousands of CIDR identities, so it is never rebuilt). Shared with
    /// whoever names identities (the engine's catalog): a change copies it only while an
    /// older copy is still out there.
    table: Arc<IdentityTable>,
}

impl Default for IdentityAllocator {
    fn default() -> Self {
        Self {
            workloads: BTreeMap::new(),
            workload_by_id: BTreeMap::new(),
            reserved: BTreeMap::new(),
            next_workload: reserved_ids::FIRST_LABEL_IDENTITY,
            cidrs: BTreeMap::new(),
            next_cidr: 1,
            cluster: false,
            assigned: BTreeMap::new(),
            table: Arc::new(
                RESERVED
                    .into_iter()
                    .map(|(id, name)| {
                        (
                            id,
                            IdentitySource::Reserved {
                                name: name.to_string(),
                            },
                        )
                    })
                    .collect(),
            ),
        }
    }
}

impl IdentityAllocator {
    /// Restores numbers from a snapshot. Restored identities are reserved for their labels
    /// but hold no reference until `acquire`; `drop_unreferenced` releases the rest.
    pub fn restore(snapshot: &AllocatorSnapshot) -> Result<Self, IdentityError> {
        let mut a = Self::default();
        let mut seen = BTreeSet::new();
        for (id, labels) in &snapshot.workloads {
            if id.0 < reserved_ids::FIRST_LABEL_IDENTITY || id.0 >= reserved_ids::LABEL_IDENTITY_END
            {
                return Err(IdentityError::OutOfScope { id: *id });
            }
            if !seen.insert(*id) {
                return Err(IdentityError::DuplicateInSnapshot { id: *id });
            }
            a.reserved.insert(labels.clone(), *id);
        }
        a.next_workload = snapshot.next_workload.clamp(
            reserved_ids::FIRST_LABEL_IDENTITY,
            reserved_ids::LABEL_IDENTITY_END - 1,
        );
        Ok(a)
    }

    /// Takes workload numbers from the cluster's allocation (`assign`) from now on, never
    /// choosing one itself. Numbers restored from a snapshot were the cluster's, and stand
    /// until an assignment says otherwise.
    pub fn set_cluster_scope(&mut self) {
        self.cluster = true;
    }

    pub fn is_cluster_scope(&self) -> bool {
        self.cluster
    }

    /// The number the cluster gave `labels`, if any.
    pub fn assigned(&self, labels: &Labels) -> Option<Identity> {
        self.assigned.get(labels).copied()
    }

    /// Replaces the cluster's assignments (labels -> number). Identities in use whose labels
    /// now have another number take it; the (old, new) pairs are returned so their holders
    /// can be renumbered. Identities in use whose labels have no assignment keep theirs.
    /// Nothing changes on an error.
    pub fn assign(
        &mut self,
        assignments: BTreeMap<Labels, Identity>,
    ) -> Result<Vec<(Identity, Identity)>, IdentityError> {
        let mut by_id: BTreeMap<Identity, &Labels> = BTreeMap::new();
        for (labels, id) in &assignments {
            if id.0 < reserved_ids::FIRST_LABEL_IDENTITY || id.0 >= reserved_ids::LABEL_IDENTITY_END
            {
                return Err(IdentityError::OutOfScope { id: *id });
            }
            if let Some(first) = by_id.insert(*id, labels) {
                return Err(IdentityError::DuplicateAssignment {
                    id: *id,
                    first: first.clone(),
                    second: labels.clone(),
                });
            }
        }
        // Where every identity in use ends up.
        let mut after: BTreeMap<Identity, &Labels> = BTreeMap::new();
        let mut moves = Vec::new();
        for (labels, alloc) in &self.workloads {
            let id = assignments.get(labels).copied().unwrap_or(alloc.id);
            if let Some(holder) = after.insert(id, labels) {
                let (labels, holder) = if assignments.get(labels) == Some(&id) {
                    (labels, holder)
                } else {
                    (holder, labels)
                };
                return Err(IdentityError::AssignmentTaken {
                    id,
                    labels: labels.clone(),
                    holder: holder.clone(),
                });
            }
            if id != alloc.id {
                moves.push((labels.clone(), alloc.id, id));
            }
        }
        // An assignment for labels not in use must not be a number kept by others in use.
        for (labels, id) in &assignments {
            if let Some(holder) = after.get(id)
                && *holder != labels
            {
                return Err(IdentityError::AssignmentTaken {
                    id: *id,
                    labels: labels.clone(),
                    holder: (*holder).clone(),
                });
            }
        }
        for (labels, old, new) in &moves {
            self.workload_by_id.remove(old);
            Arc::make_mut(&mut self.table).remove(old);
            if let Some(a) = self.workloads.get_mut(labels) {
                a.id = *new;
            }
        }
        for (labels, _, new) in &moves {
            self.workload_by_id.insert(*new, labels.clone());
            Arc::make_mut(&mut self.table).insert(
                *new,
                IdentitySource::Workload {
                    labels: labels.clone(),
                },
            );
        }
        self.reserved
            .retain(|labels, id| assignments.get(labels).is_none_or(|a| a == id));
        self.assigned = assignments;
        Ok(moves.into_iter().map(|(_, old, new)| (old, new)).collect())
    }

    /// Forgets restored identities no endpoint came back for.
    pub fn drop_unreferenced(&mut self) {
        self.reserved.clear();
    }

    pub fn snapshot(&self) -> AllocatorSnapshot {
        let mut workloads: Vec<(Identity, Labels)> = self
            .workload_by_id
            .iter()
            .map(|(id, l)| (*id, l.clone()))
            .collect();
        workloads.extend(self.reserved.iter().map(|(l, id)| (*id, l.clone())));
        workloads.sort();
        AllocatorSnapshot {
            workloads,
            next_workload: self.next_workload,
        }
    }

    fn in_use(&self, id: Identity) -> bool {
        self.workload_by_id.contains_key(&id) || self.reserved.values().any(|r| *r == id)
    }

    /// Takes a reference on the identity for `labels`, allocating it if needed.
    pub fn acquire(&mut self, labels: &Labels) -> Result<Identity, IdentityError> {
        if let Some(a) = self.workloads.get_mut(labels) {
            a.refs += 1;
            return Ok(a.id);
        }
        let id = match (self.reserved.remove(labels), self.assigned.get(labels)) {
            (_, Some(id)) if self.cluster => *id,
            (Some(id), _) => id,
            (None, _) if self.cluster => {
                return Err(IdentityError::NotAssigned {
                    labels: labels.clone(),
                });
            }
            (None, _) => self.next_free_workload()?,
        };
        self.workloads
            .insert(labels.clone(), Allocation { id, refs: 1 });
        self.workload_by_id.insert(id, labels.clone());
        Arc::make_mut(&mut self.table).insert(
            id,
            IdentitySource::Workload {
                labels: labels.clone(),
            },
        );
        Ok(id)
    }

    fn next_free_workload(&mut self) -> Result<Identity, IdentityError> {
        let span = reserved_ids::LABEL_IDENTITY_END - reserved_ids::FIRST_LABEL_IDENTITY;
        for _ in 0..span {
            let candidate = Identity(self.next_workload);
            self.next_workload += 1;
            if self.next_workload >= reserved_ids::LABEL_IDENTITY_END {
                self.next_workload = reserved_ids::FIRST_LABEL_IDENTITY;
            }
            if !self.in_use(candidate) {
                return Ok(candidate);
            }
        }
        Err(IdentityError::Exhausted { scope: "label" })
    }

    /// Drops a reference; returns true when the identity was freed.
    pub fn release(&mut self, id: Identity) -> Result<bool, IdentityError> {
        let labels = self
            .workload_by_id
            .get(&id)
            .cloned()
            .ok_or(IdentityError::NotAllocated { id })?;
        let alloc = self
            .workloads
            .get_mut(&labels)
            .ok_or(IdentityError::NotAllocated { id })?;
        alloc.refs -= 1;
        if alloc.refs == 0 {
            self.workloads.remove(&labels);
            self.workload_by_id.remove(&id);
            Arc::make_mut(&mut self.table).remove(&id);
            return Ok(true);
        }
        Ok(false)
    }

    pub fn refs(&self, id: Identity) -> u32 {
        self.workload_by_id
            .get(&id)
            .and_then(|l| self.workloads.get(l))
            .map_or(0, |a| a.refs)
    }

    /// Makes the CIDR identities exactly those of `prefixes`: keeps existing numbers,
    /// allocates new ones, frees the rest. Costs a walk of both sets, and work only for the
    /// prefixes that come or go.
    pub fn sync_cidrs(&mut self, prefixes: &BTreeSet<Ipv4Network>) -> Result<(), IdentityError> {
        // One merge walk over both (sorted) sets finds the prefixes that go.
        let mut gone = Vec::new();
        let mut wanted = prefixes.iter().peekable();
        for p in self.cidrs.keys() {
            while wanted.next_if(|w| *w < p).is_some() {}
            if wanted.next_if_eq(&p).is_none() {
                gone.push(*p);
            }
        }
        for p in gone {
            if let Some(id) = self.cidrs.remove(&p) {
                Arc::make_mut(&mut self.table).remove(&id);
                Arc::make_mut(&mut self.table).remove(&id.cidr_endpoint_alias());
            }
        }
        if prefixes.len() == self.cidrs.len() {
            return Ok(());
        }
        for p in prefixes {
            if self.cidrs.contains_key(p) {
                continue;
            }
            let mut found = None;
            for _ in 1..reserved_ids::CIDR_SCOPE {
                let n = self.next_cidr;
                self.next_cidr = if n + 1 >= reserved_ids::CIDR_SCOPE {
                    1
                } else {
                    n + 1
                };
                let candidate = Identity(reserved_ids::CIDR_SCOPE | n);
                if !self.table.contains_key(&candidate) {
                    found = Some(candidate);
                    break;
                }
            }
            let id = found.ok_or(IdentityError::Exhausted { scope: "cidr" })?;
            self.cidrs.insert(*p, id);
            Arc::make_mut(&mut self.table).insert(id, IdentitySource::Cidr { prefix: *p });
            Arc::make_mut(&mut self.table).insert(
                id.cidr_endpoint_alias(),
                IdentitySource::CidrEndpointAlias { prefix: *p },
            );
        }
        Ok(())
    }

    pub fn cidr_identity(&self, prefix: &Ipv4Network) -> Option<Identity> {
        self.cidrs.get(prefix).copied()
    }

    /// Every identity in use: reserved, workload, CIDR and CIDR endpoint aliases.
    pub fn table(&self) -> &IdentityTable {
        &self.table
    }

    /// The table, shared: what it holds now, whatever changes later.
    pub fn shared_table(&self) -> Arc<IdentityTable> {
        Arc::clone(&self.table)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// The table as it would be built from the allocator's records.
    fn rebuilt(a: &IdentityAllocator) -> IdentityTable {
        let mut t: IdentityTable = RESERVED
            .into_iter()
            .map(|(id, name)| {
                (
                    id,
                    IdentitySource::Reserved {
                        name: name.to_string(),
                    },
                )
            })
            .collect();
        for (id, labels) in &a.workload_by_id {
            t.insert(
                *id,
                IdentitySource::Workload {
                    labels: labels.clone(),
                },
            );
        }
        for (prefix, id) in &a.cidrs {
            t.insert(*id, IdentitySource::Cidr { prefix: *prefix });
            t.insert(
                id.cidr_endpoint_alias(),
                IdentitySource::CidrEndpointAlias { prefix: *prefix },
            );
        }
        t
    }

    proptest::proptest! {
        /// Whatever sequence of changes, the kept table is the one the records give, and a
        /// copy shared before a change keeps what it held.
        #[test]
        fn the_kept_table_follows_every_change(
            ops in proptest::collection::vec((0u8..4, 0u8..6), 1..60),
        ) {
            let mut a = IdentityAllocator::default();
            let mut held: Vec<Identity> = Vec::new();
            for (op, n) in ops {
                let shared = a.shared_table();
                let before = (*shared).clone();
                match op {
                    0 => held.push(a.acquire(&labels(&[("app", &n.to_string())])).unwrap()),
                    1 if !held.is_empty() => {
                        let id = held.remove(usize::from(n) % held.len());
                        a.release(id).unwrap();
                    }
                    _ => {
                        let prefixes: BTreeSet<Ipv4Network> = (0..n)
                            .map(|i| Ipv4Network::new(std::net::Ipv4Addr::new(10, op, i, 0), 24).unwrap())
                            .collect();
                        a.sync_cidrs(&prefixes).unwrap();
                    }
                }
                proptest::prop_assert_eq!(a.table(), &rebuilt(&a));
                proptest::prop_assert_eq!(&*shared, &before);
            }
        }
    }

    #[test]
    fn cluster_scope_takes_the_clusters_numbers_and_never_invents_one() {
        let mut a = IdentityAllocator::default();
        a.set_cluster_scope();
        let web = labels(&[("app", "web")]);
        let db = labels(&[("app", "db")]);
        assert_eq!(
            a.acquire(&web),
            Err(IdentityError::NotAssigned {
                labels: web.clone()
            })
        );
        let moved = a
            .assign([(web.clone(), Identity(9000)), (db.clone(), Identity(9001))].into())
            .unwrap();
        assert!(moved.is_empty());
        assert_eq!(a.acquire(&web).unwrap(), Identity(9000));
        assert_eq!(a.acquire(&db).unwrap(), Identity(9001));
        // The two swap numbers (another node won the race for both): both move, nothing lost.
        let moved = a
            .assign([(web.clone(), Identity(9001)), (db.clone(), Identity(9000))].into())
            .unwrap();
        assert_eq!(moved.len(), 2);
        assert_eq!(a.acquire(&web).unwrap(), Identity(9001));
        assert_eq!(a.refs(Identity(9001)), 2);
        let t = a.table();
        assert_eq!(t[&Identity(9000)].workload_labels(), Some(&db));
    }

    #[test]
    fn a_bad_assignment_changes_nothing() {
        let mut a = IdentityAllocator::default();
        a.set_cluster_scope();
        let web = labels(&[("app", "web")]);
        let db = labels(&[("app", "db")]);
        a.assign([(web.clone(), Identity(300))].into()).unwrap();
        a.acquire(&web).unwrap();
        let dup = a.assign([(web.clone(), Identity(301)), (db.clone(), Identity(301))].into());
        assert!(matches!(
            dup,
            Err(IdentityError::DuplicateAssignment { .. })
        ));
        // db would take web's number while web, in use, has no other.
        let taken = a.assign([(db.clone(), Identity(300))].into());
        assert!(
            matches!(taken, Err(IdentityError::AssignmentTaken { .. })),
            "{taken:?}"
        );
        assert!(matches!(
            a.assign([(db.clone(), Identity(3))].into()),
            Err(IdentityError::OutOfScope { .. })
        ));
        assert_eq!(a.acquire(&web).unwrap(), Identity(300));
        assert_eq!(a.assigned(&web), Some(Identity(300)));
    }

    #[test]
    fn same_labels_share_one_identity_and_count_references() {
        let mut a = IdentityAllocator::default();
        let l = labels(&[("app", "web")]);
        let first = a.acquire(&l).unwrap();
        let second = a.acquire(&l).unwrap();
        assert_eq!(first, second);
        assert_eq!(first.0, reserved_ids::FIRST_LABEL_IDENTITY);
        assert_eq!(a.refs(first), 2);
        assert!(!a.release(first).unwrap());
        assert!(a.release(first).unwrap());
        assert_eq!(a.refs(first), 0);
        assert!(a.release(first).is_err());
    }

    #[test]
    fn different_labels_get_different_identities() {
        let mut a = IdentityAllocator::default();
        let x = a.acquire(&labels(&[("app", "web")])).unwrap();
        let y = a.acquire(&labels(&[("app", "db")])).unwrap();
        assert_ne!(x, y);
    }

    #[test]
    fn identities_survive_a_restart_through_the_snapshot() {
        let mut a = IdentityAllocator::default();
        let web = labels(&[("app", "web")]);
        let db = labels(&[("app", "db")]);
        let _ = a.acquire(&labels(&[("app", "gone")])).unwrap();
        let web_id = a.acquire(&web).unwrap();
        let db_id = a.acquire(&db).unwrap();
        let snap = a.snapshot();

        let mut b = IdentityAllocator::restore(&snap).unwrap();
        // Endpoints come back in a different order; numbers must not move.
        assert_eq!(b.acquire(&db).unwrap(), db_id);
        assert_eq!(b.acquire(&web).unwrap(), web_id);
        b.drop_unreferenced();
        // A new label set never reuses a number that was live before the restart.
        let fresh = b.acquire(&labels(&[("app", "new")])).unwrap();
        assert!(fresh != web_id && fresh != db_id);
    }

    #[test]
    fn restore_rejects_corrupt_snapshots() {
        let dup = AllocatorSnapshot {
            workloads: vec![
                (Identity(300), labels(&[("a", "1")])),
                (Identity(300), labels(&[("a", "2")])),
            ],
            next_workload: 301,
        };
        assert!(matches!(
            IdentityAllocator::restore(&dup),
            Err(IdentityError::DuplicateInSnapshot { .. })
        ));
        let reserved = AllocatorSnapshot {
            workloads: vec![(Identity(2), labels(&[("a", "1")]))],
            next_workload: 256,
        };
        assert!(IdentityAllocator::restore(&reserved).is_err());
    }

    #[test]
    fn cidr_identities_follow_the_prefix_set_and_keep_their_numbers() {
        let mut a = IdentityAllocator::default();
        let p1: Ipv4Network = "10.0.0.0/8".parse().unwrap();
        let p2: Ipv4Network = "10.1.0.0/16".parse().unwrap();
        a.sync_cidrs(&[p1, p2].into()).unwrap();
        let id1 = a.cidr_identity(&p1).unwrap();
        assert!(id1.is_cidr());
        assert!(id1.cidr_endpoint_alias().is_cidr_endpoint_alias());
        a.sync_cidrs(&[p1].into()).unwrap();
        assert_eq!(a.cidr_identity(&p1), Some(id1));
        assert_eq!(a.cidr_identity(&p2), None);
        let t = a.table();
        assert!(matches!(t.get(&id1), Some(IdentitySource::Cidr { .. })));
        assert!(matches!(
            t.get(&id1.cidr_endpoint_alias()),
            Some(IdentitySource::CidrEndpointAlias { .. })
        ));
        assert!(matches!(
            t.get(&Identity::HOST),
            Some(IdentitySource::Reserved { .. })
        ));
    }

    #[test]
    fn workload_labels_carry_namespace_and_its_labels_but_not_rollout_noise() {
        let l = workload_identity_labels(
            "prod",
            &labels(&[("team", "a"), ("kubernetes.io/metadata.name", "prod")]),
            &labels(&[("app", "web"), ("pod-template-hash", "abc123")]),
        );
        assert_eq!(l.get("app").map(String::as_str), Some("web"));
        assert_eq!(l.get(NAMESPACE_LABEL).map(String::as_str), Some("prod"));
        assert_eq!(
            l.get("io.cilium.k8s.namespace.labels.team")
                .map(String::as_str),
            Some("a")
        );
        assert!(!l.contains_key("pod-template-hash"));
    }
}
