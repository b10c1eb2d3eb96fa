//! The agent's bounded flow buffer: the newest `capacity` flows, and a broadcast for
//! followers; beside it, the connection log that keeps their aggregate for learning, and the
//! count of audit violations.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use palisade_api::flow::Flow;
use palisade_policies::learn::{ConnectionLog, Group, LogLimits, LogSnapshot};
use tokio::sync::broadcast;

use super::learn::{dns_observation, observation};

pub struct StoredFlow {
    pub wall: SystemTime,
    pub flow: Arc<Flow>,
}

pub struct FlowStore {
    /// The buffer and the next sequence number.
    inner: Mutex<(VecDeque<StoredFlow>, u64)>,
    capacity: usize,
    live: broadcast::Sender<Arc<Flow>>,
    /// The aggregate of connections, for `policy suggest`, `what-if` and `map`.
    log: Mutex<ConnectionLog>,
    /// Namespaces in discover mode: their AUDIT flows are learning, not violations.
    discovering: Mutex<BTreeSet<String>>,
    /// AUDIT flows elsewhere, by the namespace of the endpoint that judged them.
    violations: Mutex<BTreeMap<String, u64>>,
}

fn unix_seconds(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl FlowStore {
    pub fn new(capacity: usize) -> Self {
        Self::with_log(capacity, ConnectionLog::new(LogLimits::default()))
    }

    /// A store whose connection log starts as `log` (restored from the state directory).
    pub fn with_log(capacity: usize, log: ConnectionLog) -> Self {
        let (live, _) = broadcast::channel(4096);
        Self {
            inner: Mutex::new((VecDeque::with_capacity(capacity.min(1 << 16)), 1)),
            capacity: capacity.max(1),
            live,
            log: Mutex::new(log),
            discovering: Mutex::new(BTreeSet::new()),
            violations: Mutex::new(BTreeMap::new()),
        }
    }

    /// The namespaces in discover mode now (the engine's catalog says).
    pub fn set_discovering(&self, namespaces: BTreeSet<String>) {
        *lock(&self.discovering) = namespaces;
    }

    /// AUDIT flows of namespaces not in discover mode, by namespace.
    pub fn violations(&self) -> BTreeMap<String, u64> {
        lock(&self.violations).clone()
    }

    /// The connection log's aggregates with either end in `namespace` (all when None), last
    /// seen at or after `since` (Unix seconds); expired ones are forgotten first.
    pub fn connections(
        &self,
        namespace: Option<&str>,
        since: Option<u64>,
        now: SystemTime,
    ) -> LogSnapshot {
        let mut log = lock(&self.log);
        log.expire(unix_seconds(now));
        log.snapshot_where(|a: &Group, b: &Group, last| {
            super::learn::touches(namespace, a, b) && since.is_none_or(|s| last >= s)
        })
    }

    /// The whole log, when it changed since the last call (for saving it).
    pub fn log_if_changed(&self, now: SystemTime) -> Option<LogSnapshot> {
        let mut log = lock(&self.log);
        log.expire(unix_seconds(now));
        log.take_changed().then(|| log.snapshot())
    }

    pub fn log_limits(&self) -> LogLimits {
        lock(&self.log).limits()
    }

    /// Stores a flow, numbering it (datapath and proxy flows share one sequence).
    pub fn push(&self, wall: SystemTime, mut flow: Flow) {
        if let Some(o) = observation(&flow) {
            lock(&self.log).record(o, unix_seconds(wall));
        } else if let Some(o) = dns_observation(&flow) {
            lock(&self.log).record_dns(o, unix_seconds(wall));
        }
        if flow.verdict == "AUDIT" && !flow.endpoint.namespace.is_empty() {
            let ns = &flow.endpoint.namespace;
            if !lock(&self.discovering).contains(ns) {
                *lock(&self.violations).entry(ns.clone()).or_default() += 1;
            }
        }
        let flow = {
            let mut guard = self
                .inner
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let (q, next) = &mut *guard;
            flow.seq = *next;
            *next += 1;
            let flow = Arc::new(flow);
            if q.len() == self.capacity {
                q.pop_front();
            }
            q.push_back(StoredFlow {
                wall,
                flow: Arc::clone(&flow),
            });
            flow
        };
        // No followers is fine.
        let _ = self.live.send(flow);
    }

    pub fn len(&self) -> usize {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .0
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The newest `last` flows (all if None) newer than `since` that satisfy `keep`, oldest first.
    pub fn snapshot(
        &self,
        last: Option<usize>,
        since: Option<SystemTime>,
        keep: impl Fn(&Flow) -> bool,
    ) -> Vec<Arc<Flow>> {
        let guard = self
            .inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut out: Vec<Arc<Flow>> = guard
            .0
            .iter()
            .rev()
            .filter(|s| since.is_none_or(|t| s.wall >= t))
            .filter(|s| keep(&s.flow))
            .take(last.unwrap_or(usize::MAX))
            .map(|s| Arc::clone(&s.flow))
            .collect();
        out.reverse();
        out
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Flow>> {
        self.live.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use palisade_api::flow::{FlowIp, FlowL4, FlowPeer};
    use std::net::Ipv4Addr;
    use std::time::Duration;

    fn flow(seq: u64) -> Flow {
        Flow {
            seq,
            time: String::new(),
            verdict: if seq.is_multiple_of(2) {
                "DROPPED"
            } else {
                "FORWARDED"
            }
            .into(),
            drop_reason: None,
            drop_reason_code: None,
            event: "drop".into(),
            direction: "ingress".into(),
            endpoint: FlowPeer::default(),
            source: FlowPeer::default(),
            destination: FlowPeer::default(),
            ip: FlowIp {
                source: Ipv4Addr::LOCALHOST,
                destination: Ipv4Addr::LOCALHOST,
            },
            l4: FlowL4 {
                protocol: "TCP".into(),
                source_port: 1,
                destination_port: 2,
                tcp_flags: vec![],
            },
            policy: None,
            packet_bytes: 0,
            http: None,
            tunnel: None,
            dns: None,
        }
    }

    #[test]
    fn keeps_only_the_newest_flows() {
        let s = FlowStore::new(3);
        let t0 = SystemTime::UNIX_EPOCH;
        for i in 0..5 {
            s.push(t0 + Duration::from_secs(i), flow(i));
        }
        assert_eq!(s.len(), 3);
        let seqs: Vec<u64> = s
            .snapshot(None, None, |_| true)
            .iter()
            .map(|f| f.seq)
            .collect();
        assert_eq!(seqs, vec![3, 4, 5]);
    }

    #[test]
    fn snapshot_applies_last_since_and_filter() {
        let s = FlowStore::new(10);
        let t0 = SystemTime::UNIX_EPOCH;
        for i in 0..10 {
            s.push(t0 + Duration::from_secs(i), flow(i));
        }
        let seqs: Vec<u64> = s
            .snapshot(Some(2), None, |f| f.verdict == "DROPPED")
            .iter()
            .map(|f| f.seq)
            .collect();
        assert_eq!(seqs, vec![7, 9]);
        let seqs: Vec<u64> = s
            .snapshot(None, Some(t0 + Duration::from_secs(7)), |_| true)
            .iter()
            .map(|f| f.seq)
            .collect();
        assert_eq!(seqs, vec![8, 9, 10]);
    }

    #[tokio::test]
    async fn followers_receive_new_flows() {
        let s = FlowStore::new(10);
        let mut rx = s.subscribe();
        s.push(SystemTime::now(), flow(42));
        assert_eq!(rx.recv().await.unwrap().seq, 1);
    }
}
