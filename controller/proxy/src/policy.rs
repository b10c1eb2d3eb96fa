//! The proxy's view of policy: the `ProxyPolicy` the engine publishes, read afresh for every
//! request (so a policy change reaches connections already open), with who the two ends of a
//! connection are looked up again only when a new policy arrives.

use std::net::SocketAddrV4;
use std::sync::{Arc, Mutex};

use palisade_policies::l7::{Ends, ProxyPolicy, RequestView};
use tokio::sync::watch;

use crate::http::{Decision, RequestHead};

struct HeadView<'a>(&'a RequestHead);

impl RequestView for HeadView<'_> {
    fn method(&self) -> &str {
        &self.0.method
    }
    fn path(&self) -> &str {
        &self.0.path
    }
    fn host(&self) -> Option<&str> {
        self.0.host.as_deref()
    }
    fn header(&self, name: &str) -> Option<&[u8]> {
        self.0.header(name)
    }
    fn upgrades(&self) -> &[String] {
        &self.0.upgrades
    }
}

/// Judges the requests of one connection.
pub struct ConnectionJudge {
    policy: watch::Receiver<Arc<ProxyPolicy>>,
    client: SocketAddrV4,
    destination: SocketAddrV4,
    /// The ends as the policy they were looked up in saw them. Uncontended: one connection
    /// is served by one task, which judges its requests one at a time.
    ends: Mutex<Option<(Arc<ProxyPolicy>, Ends)>>,
}

impl ConnectionJudge {
    pub fn new(
        policy: watch::Receiver<Arc<ProxyPolicy>>,
        client: SocketAddrV4,
        destination: SocketAddrV4,
    ) -> Self {
        Self {
            policy,
            client,
            destination,
            ends: Mutex::new(None),
        }
    }

    /// The verdict of the policy current now.
    pub fn judge(&self, head: &RequestHead) -> Decision {
        let policy = Arc::clone(&self.policy.borrow());
        let mut cached = self
            .ends
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let ends = match &*cached {
            Some((p, ends)) if Arc::ptr_eq(p, &policy) => *ends,
            _ => {
                let ends = policy.ends(self.client, self.destination);
                *cached = Some((Arc::clone(&policy), ends));
                ends
            }
        };
        let verdict = policy.judge_ends(&ends, &HeadView(head));
        let rule = verdict.rule.0;
        match (verdict.allowed, verdict.refused_upgrade) {
            (true, _) if verdict.audit => Decision::Audit { rule },
            (true, _) => Decision::Allow { rule },
            (false, Some(protocol)) => Decision::DenyUpgrade { rule, protocol },
            (false, None) => Decision::Deny { rule },
        }
    }
}
