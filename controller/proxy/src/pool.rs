//! Idle upstream connections kept for later client connections, as nginx's `keepalive` and
//! Envoy's connection pools keep them: a client that opens a connection per request (or an
//! HTTP/1.0 client) then costs one handshake, not two.
//!
//! The pool is plain bookkeeping over values keyed by who may reuse them; the listener keys
//! them by everything the datapath judges an upstream connection by (the client's identity
//! and address, and the destination), so a reused connection is one the same client could
//! have opened itself.

use std::collections::HashMap;
use std::hash::Hash;
use std::time::{Duration, Instant};

/// How much a pool keeps, and for how long.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolLimits {
    /// Most idle values under one key.
    pub per_key: usize,
    /// Most idle values in all.
    pub total: usize,
    /// A value idle longer than this is dropped: servers close idle connections too (nginx
    /// after 75 s, many after 5 s), and one closing as it is reused costs a retry.
    pub idle_timeout: Duration,
}

impl Default for PoolLimits {
    fn default() -> Self {
        PoolLimits {
            per_key: 32,
            total: 256,
            idle_timeout: Duration::from_secs(4),
        }
    }
}

/// Idle values by key, most recently released taken first (its socket is the warmest, and
/// the oldest ones age out).
#[derive(Debug)]
pub struct IdlePool<K, T> {
    limits: PoolLimits,
    /// Per key, oldest first, each with when it was released.
    idle: HashMap<K, Vec<(Instant, T)>>,
    count: usize,
}

impl<K: Eq + Hash, T> IdlePool<K, T> {
    pub fn new(limits: PoolLimits) -> Self {
        IdlePool {
            limits,
            idle: HashMap::new(),
            count: 0,
        }
    }

    /// The most recently released value under `key` that is not expired and that `usable`
    /// accepts. Values refused or expired on the way are dropped.
    pub fn take(
        &mut self,
        key: &K,
        now: Instant,
        mut usable: impl FnMut(&mut T) -> bool,
    ) -> Option<T> {
        let values = self.idle.get_mut(key)?;
        let mut found = None;
        while let Some((released, mut value)) = values.pop() {
            self.count -= 1;
            if now.saturating_duration_since(released) < self.limits.idle_timeout
                && usable(&mut value)
            {
                found = Some(value);
                break;
            }
        }
        if values.is_empty() {
            self.idle.remove(key);
        }
        found
    }

    /// Keeps `value` idle under `key`; hands it back when the pool has no room for it (the
    /// caller closes it).
    pub fn put(&mut self, key: K, value: T, now: Instant) -> Result<(), T> {
        if self.count >= self.limits.total {
            return Err(value);
        }
        let values = self.idle.entry(key).or_default();
        if values.len() >= self.limits.per_key {
            return Err(value);
        }
        values.push((now, value));
        self.count += 1;
        Ok(())
    }

    /// Removes and returns every value idle for the timeout or longer.
    pub fn expire(&mut self, now: Instant) -> Vec<T> {
        let timeout = self.limits.idle_timeout;
        let mut expired = Vec::new();
        self.idle.retain(|_, values| {
            // Oldest first: the expired ones are a prefix.
            let live = values
                .iter()
                .position(|(released, _)| now.saturating_duration_since(*released) < timeout)
                .unwrap_or(values.len());
            expired.extend(values.drain(..live).map(|(_, value)| value));
            !values.is_empty()
        });
        self.count -= expired.len();
        expired
    }

    /// How many values are idle.
    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(per_key: usize, total: usize) -> IdlePool<&'static str, u32> {
        IdlePool::new(PoolLimits {
            per_key,
            total,
            idle_timeout: Duration::from_secs(4),
        })
    }

    #[test]
    fn the_most_recently_released_value_of_the_key_is_taken_first() {
        let now = Instant::now();
        let mut p = pool(8, 8);
        p.put("a", 1, now).unwrap();
        p.put("a", 2, now).unwrap();
        p.put("b", 3, now).unwrap();
        assert_eq!(p.take(&"a", now, |_| true), Some(2));
        assert_eq!(p.take(&"a", now, |_| true), Some(1));
        assert_eq!(p.take(&"a", now, |_| true), None);
        assert_eq!(p.take(&"c", now, |_| true), None);
        assert_eq!(p.len(), 1);
    }

    #[test]
    fn refused_and_expired_values_are_dropped_on_the_way() {
        let start = Instant::now();
        let mut p = pool(8, 8);
        p.put("a", 1, start).unwrap();
        p.put("a", 2, start + Duration::from_secs(3)).unwrap();
        p.put("a", 3, start + Duration::from_secs(3)).unwrap();
        let now = start + Duration::from_secs(5);
        // 3 is refused, 2 is fresh enough, 1 stays (not reached).
        assert_eq!(p.take(&"a", now, |v| *v != 3), Some(2));
        assert_eq!(p.len(), 1);
        // 1 has been idle 5 s: expired, so nothing is left.
        assert_eq!(p.take(&"a", now, |_| true), None);
        assert!(p.is_empty());
    }

    #[test]
    fn a_full_pool_hands_the_value_back() {
        let now = Instant::now();
        let mut p = pool(2, 3);
        p.put("a", 1, now).unwrap();
        p.put("a", 2, now).unwrap();
        assert_eq!(p.put("a", 3, now), Err(3), "two per key");
        p.put("b", 4, now).unwrap();
        assert_eq!(p.put("c", 5, now), Err(5), "three in all");
        assert_eq!(p.take(&"a", now, |_| true), Some(2));
        p.put("c", 5, now).unwrap();
    }

    #[test]
    fn expiry_removes_exactly_the_values_idle_for_the_timeout() {
        let start = Instant::now();
        let mut p = pool(8, 8);
        p.put("a", 1, start).unwrap();
        p.put("b", 2, start + Duration::from_secs(1)).unwrap();
        p.put("a", 3, start + Duration::from_secs(2)).unwrap();
        let mut expired = p.expire(start + Duration::from_secs(5));
        expired.sort_unstable();
        assert_eq!(expired, vec![1, 2]);
        assert_eq!(p.len(), 1);
        assert_eq!(p.take(&"b", start, |_| true), None);
        assert_eq!(
            p.take(&"a", start + Duration::from_secs(5), |_| true),
            Some(3)
        );
    }
}
