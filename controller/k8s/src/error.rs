//! The adapter's errors, and API errors said the way an operator acts on them.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum K8sError {
    #[error("reading the kubeconfig {path}: {source}")]
    Kubeconfig {
        path: PathBuf,
        #[source]
        source: kube::config::KubeconfigError,
    },
    #[error(
        "no Kubernetes configuration: not in a pod ({incluster}), and no usable kubeconfig ({kubeconfig}); pass --kubeconfig PATH"
    )]
    NoConfig {
        incluster: String,
        kubeconfig: String,
    },
    #[error("the Kubernetes client could not be built: {0}")]
    Client(#[source] kube::Error),
    #[error("allocating identity {candidate} for [{labels}]: {reason}")]
    Allocate {
        candidate: u32,
        labels: String,
        reason: String,
    },
    #[error("no free identity number for [{labels}] after {tries} candidates")]
    NoFreeIdentity { labels: String, tries: u32 },
    #[error("the engine stopped")]
    EngineGone,
}

/// An API error in one line an operator can act on: a missing permission names the verb and
/// the resource (`missing RBAC: cannot list pods ...`); a missing CRD says which to install.
pub fn describe(verb: &str, resource: &str, e: &kube::Error) -> String {
    match e {
        kube::Error::Api(s) if s.code == 403 => {
            format!("missing RBAC: cannot {verb} {resource}: {}", s.message)
        }
        kube::Error::Api(s) if s.code == 404 && resource.contains("palisade.io") => format!(
            "{resource} is not served: are Palisade's CRDs installed (kubectl apply -f policies/crds/)? {}",
            s.message
        ),
        kube::Error::Api(s) => format!("cannot {verb} {resource}: {} ({})", s.message, s.code),
        other => format!("cannot {verb} {resource}: {other}"),
    }
}

/// Labels as `k=v,k=v`, for messages.
pub fn label_list(labels: &palisade_policies::labels::Labels) -> String {
    labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}
