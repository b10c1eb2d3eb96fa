//! A container's labels, from its runtime. Podman (and containerd's `ctr`) pass no labels to
//! CNI plugins, and podman holds a container while its network is set up, so asking during
//! ADD would wait on ADD itself. So the agent asks after ADD, by container id, until the
//! runtime answers: `podman container inspect`, else `ctr containers info` in each containerd
//! namespace. Until then the endpoint keeps the `init` identity, enforced both ways.
//!
//! The label `palisade.io/namespace` names the endpoint's namespace (default `default`); the
//! others become its labels. Labels that are not valid Kubernetes labels are left out, and
//! said so.

use std::collections::BTreeMap;
use std::time::Duration;

use palisade_engine::{AskError, Command, EngineError, ask};
use palisade_policies::labels::{self, Labels};
use tokio::process::Command as Process;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

/// The label that names the endpoint's namespace.
pub const NAMESPACE_LABEL: &str = "palisade.io/namespace";
/// How long the agent keeps asking.
const ASK_FOR: Duration = Duration::from_mins(1);
const RETRY_EVERY: Duration = Duration::from_millis(200);
/// One runtime call's bound.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// Runs a runtime's command; its stdout when it succeeded.
async fn output(program: &str, args: &[&str]) -> Option<Vec<u8>> {
    let mut cmd = Process::new(program);
    cmd.args(args).kill_on_drop(true);
    let out = tokio::time::timeout(CALL_TIMEOUT, cmd.output())
        .await
        .ok()?
        .ok()?;
    out.status.success().then_some(out.stdout)
}

/// The labels podman knows for `id` (a full or short container id, or a name).
async fn podman(id: &str) -> Option<BTreeMap<String, String>> {
    let out = output(
        "podman",
        &[
            "container",
            "inspect",
            "--format",
            "{{json .Config.Labels}}",
            id,
        ],
    )
    .await?;
    let labels: Option<BTreeMap<String, String>> = serde_json::from_slice(&out).ok()?;
    Some(labels.unwrap_or_default())
}

/// Where the runtimes are asked.
#[derive(Clone, Debug)]
pub struct Runtimes {
    /// containerd's socket (`ctr --address`).
    pub containerd_socket: std::path::PathBuf,
}

impl Default for Runtimes {
    fn default() -> Self {
        Self {
            containerd_socket: "/run/containerd/containerd.sock".into(),
        }
    }
}

/// The labels containerd knows for `id`. `ctr run --cni` names attachments
/// `<namespace>-<container>`.
async fn containerd(socket: &str, id: &str) -> Option<BTreeMap<String, String>> {
    #[derive(serde::Deserialize)]
    struct Info {
        #[serde(rename = "Labels", default)]
        labels: Option<BTreeMap<String, String>>,
    }
    // ctr takes ten seconds to give up on a socket nobody listens on (a stale one is common:
    // Debian's package leaves it when containerd is stopped); connecting says so at once.
    if tokio::net::UnixStream::connect(socket).await.is_err() {
        return None;
    }
    let namespaces = output(
        "ctr",
        &["--address", socket, "namespaces", "list", "--quiet"],
    )
    .await?;
    for ns in String::from_utf8_lossy(&namespaces).lines() {
        let candidates = [Some(id), id.strip_prefix(&format!("{ns}-"))];
        for container in candidates.into_iter().flatten() {
            if let Some(out) = output(
                "ctr",
                &[
                    "--address",
                    socket,
                    "--namespace",
                    ns,
                    "containers",
                    "info",
                    container,
                ],
            )
            .await
                && let Ok(info) = serde_json::from_slice::<Info>(&out)
            {
                return Some(info.labels.unwrap_or_default());
            }
        }
    }
    None
}

/// Splits a runtime's labels into the endpoint's namespace and its valid labels.
pub fn endpoint_labels(runtime: BTreeMap<String, String>) -> (Option<String>, Labels) {
    let mut namespace = None;
    let mut out = Labels::new();
    for (k, v) in runtime {
        if k == NAMESPACE_LABEL {
            namespace = Some(v);
            continue;
        }
        match labels::validate_key(&k).and_then(|()| labels::validate_value(&k, &v)) {
            Ok(()) => {
                out.insert(k, v);
            }
            Err(e) => warn!(label = %k, error = %e, "container label left out: not a valid label"),
        }
    }
    (namespace, out)
}

/// Asks the runtimes for the container's labels until one answers, then gives them to the
/// endpoint. Stops when the endpoint is gone or has labels from elsewhere, and when the agent
/// stops: it holds the engine only weakly, so it never keeps a stopping engine alive.
pub async fn resolve_labels(
    runtimes: Runtimes,
    engine: mpsc::WeakSender<Command>,
    key: String,
    container_id: String,
) {
    let started = tokio::time::Instant::now();
    let socket = runtimes.containerd_socket.display().to_string();
    loop {
        if engine.strong_count() == 0 {
            return;
        }
        let found = match podman(&container_id).await {
            Some(l) => Some(("podman", l)),
            None => containerd(&socket, &container_id)
                .await
                .map(|l| ("containerd", l)),
        };
        if let Some((runtime, runtime_labels)) = found {
            let Some(engine) = engine.upgrade() else {
                return;
            };
            let (namespace, labels) = endpoint_labels(runtime_labels);
            let namespace = namespace.unwrap_or_else(|| "default".to_string());
            match ask(&engine, |r| {
                Command::EndpointResolve(key.clone(), namespace.clone(), labels, r)
            })
            .await
            {
                Ok(v) => {
                    info!(endpoint = %key, runtime, identity = v.identity.0, namespace = %v.namespace, "container labels from its runtime");
                }
                Err(
                    AskError::Engine(
                        EngineError::NoSuchEndpoint { .. } | EngineError::LabelsKnown { .. },
                    )
                    | AskError::EngineGone,
                ) => {}
                Err(e) => {
                    warn!(endpoint = %key, error = %e, "container labels not applied; it keeps the init identity (set them with `palisade endpoint label`)");
                }
            }
            return;
        }
        if started.elapsed() > ASK_FOR {
            warn!(endpoint = %key, container = %container_id, "no runtime knows the container's labels; it keeps the init identity (set them with `palisade endpoint label`)");
            return;
        }
        debug!(endpoint = %key, "container labels not known yet");
        tokio::time::sleep(RETRY_EVERY).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_namespace_label_is_taken_out_and_bad_labels_left_out() {
        let runtime: BTreeMap<String, String> = [
            ("app".to_string(), "web".to_string()),
            (NAMESPACE_LABEL.to_string(), "shop".to_string()),
            ("bad key!".to_string(), "x".to_string()),
        ]
        .into();
        let (ns, labels) = endpoint_labels(runtime);
        assert_eq!(ns.as_deref(), Some("shop"));
        assert_eq!(labels.len(), 1);
        assert_eq!(labels["app"], "web");
    }
}
