//! The objects, one global resourceVersion, a bounded history of changes, and the open
//! watches. Everything here happens under one lock, so a watch registered together with a
//! snapshot or a replay of history misses nothing and sees nothing twice.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;

use serde_json::{Value, json};
use tokio::sync::mpsc::UnboundedSender;

use super::resources::{Registry, ResourceDef};
use super::selectors::{FieldSelector, LabelSelector};
use super::status::GroupResource;
use super::util;

/// `(namespace, name)`; the namespace is empty for cluster-scoped objects. Ordered as etcd
/// orders the keys, so lists come out in the real server's order.
pub type ObjKey = (String, String);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventType {
    Added,
    Modified,
    Deleted,
}

impl EventType {
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Added => "ADDED",
            EventType::Modified => "MODIFIED",
            EventType::Deleted => "DELETED",
        }
    }
}

/// One committed change.
#[derive(Debug)]
pub struct Change {
    pub rv: u64,
    pub storage: GroupResource,
    pub key: ObjKey,
    pub kind: EventType,
    /// The object after the change; for a deletion its last state, carrying the deletion's
    /// resourceVersion (as the real server sends it).
    pub obj: Arc<Value>,
    pub prev: Option<Arc<Value>>,
}

/// What a watch's queue carries.
#[derive(Debug)]
pub enum WatchItem {
    Event(EventType, Arc<Value>),
    /// A bookmark at this resourceVersion; everything up to it was delivered before it.
    Bookmark(u64),
    /// The bookmark that ends the initial events of a streaming list
    /// (`k8s.io/initial-events-end`).
    InitialEventsEnd(u64),
    /// Close the connection without a final chunk, as a dropped connection looks.
    Abort,
    /// The resource stopped being served (its CRD was deleted): end the stream cleanly.
    End,
}

/// Which objects a watch (or list) wants.
#[derive(Clone, Debug)]
pub struct Filter {
    pub def: ResourceDef,
    pub namespace: Option<String>,
    pub labels: LabelSelector,
    pub fields: FieldSelector,
}

impl Filter {
    /// `obj` in storage form.
    pub fn matches(&self, obj: &Value) -> bool {
        if let Some(ns) = &self.namespace
            && util::meta_str(obj, "namespace") != ns
        {
            return false;
        }
        if !self.labels.matches_object(obj) {
            return false;
        }
        if self.fields.is_empty() {
            return true;
        }
        let view = self.def.view_form(obj);
        self.fields.matches(|f| self.def.field(&view, f))
    }
}

struct Watcher {
    id: u64,
    filter: Filter,
    tx: UnboundedSender<WatchItem>,
}

/// A resourceVersion older than the history kept.
#[derive(Clone, Copy, Debug)]
pub struct TooOld {
    /// The oldest resourceVersion a watch can still start from.
    pub floor: u64,
}

pub struct Store {
    rv: u64,
    data: HashMap<GroupResource, BTreeMap<ObjKey, Arc<Value>>>,
    history: VecDeque<Arc<Change>>,
    /// Every change after this resourceVersion is in `history`.
    floor: u64,
    capacity: usize,
    watchers: Vec<Watcher>,
    next_watcher: u64,
    registry: Registry,
}

fn crd_storage() -> GroupResource {
    GroupResource::new("apiextensions.k8s.io", "customresourcedefinitions")
}

impl Store {
    pub fn new(capacity: usize) -> Store {
        Store {
            rv: 1,
            data: HashMap::new(),
            history: VecDeque::new(),
            floor: 1,
            capacity: capacity.max(1),
            watchers: Vec::new(),
            next_watcher: 1,
            registry: Registry::build(std::iter::empty()),
        }
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    pub fn resource_version(&self) -> u64 {
        self.rv
    }

    pub fn get(&self, storage: &GroupResource, key: &ObjKey) -> Option<Arc<Value>> {
        self.data.get(storage).and_then(|m| m.get(key)).cloned()
    }

    /// Every object of a storage, in key order.
    pub fn all(&self, storage: &GroupResource) -> BTreeMap<ObjKey, Arc<Value>> {
        self.data.get(storage).cloned().unwrap_or_default()
    }

    /// The objects of a storage as they were at `rv`, rebuilt by undoing later changes.
    pub fn snapshot_at(
        &self,
        storage: &GroupResource,
        rv: u64,
    ) -> Result<BTreeMap<ObjKey, Arc<Value>>, TooOld> {
        if rv < self.floor {
            return Err(TooOld { floor: self.floor });
        }
        let mut objs = self.all(storage);
        for c in self.history.iter().rev() {
            if c.rv <= rv {
                break;
            }
            if &c.storage != storage {
                continue;
            }
            match (&c.kind, &c.prev) {
                (EventType::Added, _) => {
                    objs.remove(&c.key);
                }
                (_, Some(prev)) => {
                    objs.insert(c.key.clone(), Arc::clone(prev));
                }
                (_, None) => {}
            }
        }
        Ok(objs)
    }

    /// Stores `obj` under `key`, stamping the next resourceVersion; returns what was stored.
    pub fn commit(&mut self, storage: &GroupResource, key: ObjKey, mut obj: Value) -> Arc<Value> {
        self.rv += 1;
        util::meta_mut(&mut obj).insert("resourceVersion".into(), json!(self.rv.to_string()));
        let obj = Arc::new(obj);
        let prev = self
            .data
            .entry(storage.clone())
            .or_default()
            .insert(key.clone(), Arc::clone(&obj));
        let kind = if prev.is_some() {
            EventType::Modified
        } else {
            EventType::Added
        };
        self.record(Change {
            rv: self.rv,
            storage: storage.clone(),
            key,
            kind,
            obj: Arc::clone(&obj),
            prev,
        });
        obj
    }

    /// Removes an object; returns its last state, carrying the deletion's resourceVersion.
    pub fn remove(&mut self, storage: &GroupResource, key: &ObjKey) -> Option<Arc<Value>> {
        let prev = self.data.get_mut(storage)?.remove(key)?;
        self.rv += 1;
        let mut last = (*prev).clone();
        util::meta_mut(&mut last).insert("resourceVersion".into(), json!(self.rv.to_string()));
        let last = Arc::new(last);
        self.record(Change {
            rv: self.rv,
            storage: storage.clone(),
            key: key.clone(),
            kind: EventType::Deleted,
            obj: Arc::clone(&last),
            prev: Some(prev),
        });
        Some(last)
    }

    fn record(&mut self, change: Change) {
        let change = Arc::new(change);
        self.fan_out(&change);
        let crd_changed = change.storage == crd_storage();
        self.history.push_back(change);
        while self.history.len() > self.capacity {
            if let Some(old) = self.history.pop_front() {
                self.floor = old.rv;
            }
        }
        if crd_changed {
            self.rebuild_registry();
        }
    }

    fn rebuild_registry(&mut self) {
        let crds = self.all(&crd_storage());
        self.registry = Registry::build(crds.values().map(|v| &**v));
        // Watches on a resource no longer served end, as the real server closes them when
        // it tears the resource's handler down.
        let registry = &self.registry;
        self.watchers.retain(|w| {
            let d = &w.filter.def;
            if registry.find(&d.group, &d.version, &d.plural).is_some() {
                true
            } else {
                let _ = w.tx.send(WatchItem::End);
                false
            }
        });
    }

    /// What one watcher makes of a change (the cacher's rule: an object that stops matching
    /// is DELETED for it, one that starts matching is ADDED).
    fn event_for(filter: &Filter, change: &Change) -> Option<(EventType, Arc<Value>)> {
        let cur = change.kind != EventType::Deleted && filter.matches(&change.obj);
        let old = change.prev.as_ref().is_some_and(|p| filter.matches(p));
        match (cur, old) {
            (true, false) => Some((EventType::Added, Arc::clone(&change.obj))),
            (true, true) => Some((EventType::Modified, Arc::clone(&change.obj))),
            (false, true) => {
                if change.kind == EventType::Deleted {
                    Some((EventType::Deleted, Arc::clone(&change.obj)))
                } else {
                    let mut o = (**change.prev.as_ref().expect("old matched")).clone();
                    util::meta_mut(&mut o)
                        .insert("resourceVersion".into(), json!(change.rv.to_string()));
                    Some((EventType::Deleted, Arc::new(o)))
                }
            }
            (false, false) => None,
        }
    }

    fn fan_out(&mut self, change: &Change) {
        self.watchers.retain(|w| {
            if w.filter.def.storage != change.storage {
                return true;
            }
            match Self::event_for(&w.filter, change) {
                Some((t, o)) => w.tx.send(WatchItem::Event(t, o)).is_ok(),
                None => true,
            }
        });
    }

    /// Registers a watch that first receives `initial` (synthetic ADDED events of a
    /// snapshot, or replayed history), then every later change.
    pub fn register(
        &mut self,
        filter: Filter,
        tx: UnboundedSender<WatchItem>,
        initial: Vec<WatchItem>,
    ) -> u64 {
        for item in initial {
            let _ = tx.send(item);
        }
        let id = self.next_watcher;
        self.next_watcher += 1;
        self.watchers.push(Watcher { id, filter, tx });
        id
    }

    /// The events a watch from `rv` replays: every change after it, as the filter sees it.
    pub fn replay_since(&self, filter: &Filter, rv: u64) -> Result<Vec<WatchItem>, TooOld> {
        if rv < self.floor {
            return Err(TooOld { floor: self.floor });
        }
        Ok(self
            .history
            .iter()
            .filter(|c| c.rv > rv && c.storage == filter.def.storage)
            .filter_map(|c| Self::event_for(filter, c))
            .map(|(t, o)| WatchItem::Event(t, o))
            .collect())
    }

    pub fn unregister(&mut self, id: u64) {
        self.watchers.retain(|w| w.id != id);
    }

    /// Queues a bookmark at the current resourceVersion on one watch.
    pub fn bookmark(&mut self, id: u64) {
        let rv = self.rv;
        if let Some(w) = self.watchers.iter().find(|w| w.id == id) {
            let _ = w.tx.send(WatchItem::Bookmark(rv));
        }
    }

    /// Aborts every open watch; returns how many there were.
    pub fn abort_watches(&mut self) -> usize {
        let n = self.watchers.len();
        for w in self.watchers.drain(..) {
            let _ = w.tx.send(WatchItem::Abort);
        }
        n
    }

    pub fn watch_count(&self) -> usize {
        self.watchers.iter().filter(|w| !w.tx.is_closed()).count()
    }

    /// Open watches on one resource, by its plural name (`pods`).
    pub fn watch_count_of(&self, plural: &str) -> usize {
        self.watchers
            .iter()
            .filter(|w| !w.tx.is_closed() && w.filter.def.plural == plural)
            .count()
    }

    /// Forgets all history: a watch or consistent list from any earlier resourceVersion now
    /// gets `410 Gone`. Open watches are not affected.
    pub fn compact(&mut self) {
        self.history.clear();
        self.floor = self.rv;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, app: &str) -> Value {
        json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": "ns", "labels": {"app": app}}})
    }

    fn pods_filter(store: &Store, sel: &str) -> Filter {
        Filter {
            def: store.registry().find("", "v1", "pods").unwrap().clone(),
            namespace: None,
            labels: LabelSelector::parse(sel).unwrap(),
            fields: FieldSelector::default(),
        }
    }

    #[test]
    fn snapshots_undo_later_changes() {
        let mut s = Store::new(100);
        let pods = GroupResource::new("", "pods");
        let k = |n: &str| ("ns".to_string(), n.to_string());
        s.commit(&pods, k("a"), pod("a", "web"));
        let at = s.resource_version();
        s.commit(&pods, k("a"), pod("a", "db"));
        s.commit(&pods, k("b"), pod("b", "web"));
        s.remove(&pods, &k("a"));
        let snap = s.snapshot_at(&pods, at).unwrap();
        assert_eq!(snap.len(), 1);
        assert_eq!(snap[&k("a")]["metadata"]["labels"]["app"], "web");
        assert_eq!(util::object_rv(&snap[&k("a")]), at);
        s.compact();
        assert!(s.snapshot_at(&pods, at).is_err());
        assert!(s.snapshot_at(&pods, s.resource_version()).is_ok());
    }

    #[test]
    fn selector_transitions_become_added_and_deleted() {
        let mut s = Store::new(100);
        let pods = GroupResource::new("", "pods");
        let f = pods_filter(&s, "app=web");
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        s.register(f, tx, Vec::new());
        let k = ("ns".to_string(), "a".to_string());
        s.commit(&pods, k.clone(), pod("a", "db"));
        s.commit(&pods, k.clone(), pod("a", "web"));
        s.commit(&pods, k.clone(), pod("a", "web2"));
        let mut got = Vec::new();
        while let Ok(WatchItem::Event(t, o)) = rx.try_recv() {
            got.push((
                t,
                o["metadata"]["labels"]["app"].clone(),
                util::object_rv(&o),
            ));
        }
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].0, EventType::Added);
        assert_eq!(got[1].0, EventType::Deleted);
        // The DELETED carries the last matching content with the change's resourceVersion.
        assert_eq!(got[1].1, "web");
        assert_eq!(got[1].2, s.resource_version());
    }

    #[test]
    fn history_is_bounded() {
        let mut s = Store::new(2);
        let pods = GroupResource::new("", "pods");
        let f = pods_filter(&s, "");
        let start = s.resource_version();
        for n in ["a", "b", "c"] {
            s.commit(&pods, ("ns".into(), n.into()), pod(n, "x"));
        }
        assert!(s.replay_since(&f, start).is_err());
        assert_eq!(s.replay_since(&f, start + 1).unwrap().len(), 2);
    }
}
