//! This node's pods as the CNI path needs them: when palisade-cni attaches a pod, the agent
//! asks here for its labels and named ports, so the endpoint has its identity from its first
//! packet. A pod is answered only once the cluster has numbered its labels and the engine
//! knows the number, so the attachment never waits on the API server itself.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use palisade_policies::endpoint::NamedPort;
use palisade_policies::labels::Labels;
use tokio::sync::{mpsc, watch};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalPod {
    pub labels: Labels,
    pub named_ports: Vec<NamedPort>,
}

#[derive(Clone)]
pub struct PodDirectory {
    pods: Arc<Mutex<BTreeMap<String, LocalPod>>>,
    /// Bumped on every update, so waiters wake.
    generation: watch::Sender<u64>,
    /// Endpoint keys (`ns/name`) the CNI path attached, for the adapter to label.
    attached: mpsc::UnboundedSender<String>,
}

impl PodDirectory {
    pub fn new() -> (Self, mpsc::UnboundedReceiver<String>) {
        let (attached, rx) = mpsc::unbounded_channel();
        (
            Self {
                pods: Arc::default(),
                generation: watch::Sender::new(0),
                attached,
            },
            rx,
        )
    }

    /// Replaces what is known: this node's numbered pods, by `ns/name`.
    pub fn publish(&self, pods: BTreeMap<String, LocalPod>) {
        *self
            .pods
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = pods;
        self.generation.send_modify(|g| *g += 1);
    }

    fn get(&self, key: &str) -> Option<LocalPod> {
        self.pods
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(key)
            .cloned()
    }

    /// The pod's labels and ports once known, waiting up to `wait` for them.
    pub async fn labels_for(&self, key: &str, wait: Duration) -> Option<LocalPod> {
        let mut changes = self.generation.subscribe();
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if let Some(p) = self.get(key) {
                return Some(p);
            }
            match tokio::time::timeout_at(deadline, changes.changed()).await {
                Ok(Ok(())) => {}
                _ => return None,
            }
        }
    }

    /// The CNI path attached `key`: its labels should reach it even if it got none at ADD.
    pub fn attached(&self, key: &str) {
        // A closed channel means the adapter stopped; the agent is shutting down.
        let _ = self.attached.send(key.to_string());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_pod_is_answered_once_published_and_not_before() {
        let (dir, mut attached) = PodDirectory::new();
        assert_eq!(
            dir.labels_for("shop/web", Duration::from_millis(20)).await,
            None
        );
        let waiter = {
            let dir = dir.clone();
            tokio::spawn(async move { dir.labels_for("shop/web", Duration::from_secs(5)).await })
        };
        let pod = LocalPod {
            labels: [("app".into(), "web".into())].into(),
            named_ports: vec![],
        };
        dir.publish([("shop/web".to_string(), pod.clone())].into());
        assert_eq!(waiter.await.unwrap(), Some(pod));
        dir.attached("shop/web");
        assert_eq!(attached.recv().await.as_deref(), Some("shop/web"));
    }
}
