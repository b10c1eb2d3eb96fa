//! What one agent of the cluster does for all: the agent holding the `coordination.k8s.io`
//! Lease writes each palisade.io policy's `Valid` condition, records an Event for every
//! rejected policy object (any kind), and collects identity objects no pod has used for a
//! while. Every agent enforces on its own; only these writes are the leader's.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::{Event, EventSource, ObjectReference};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, Time};
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::core::DynamicObject;
use palisade_policies::identity::Identity;
use palisade_policies::labels::Labels;
use serde_json::json;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::error::describe;
use crate::identities;
use crate::translate::PolicyObjectKind;
use crate::view::Validity;
use crate::watchers::policy_api_resource;

/// The condition palisade.io policies carry.
pub const CONDITION: &str = "Valid";
/// The Event reason of a rejected policy object.
pub const REJECTED_REASON: &str = "PolicyRejected";

#[derive(Clone, Debug)]
pub struct StatusConfig {
    /// Where the Lease lives (the agent's namespace).
    pub namespace: String,
    pub lease_name: String,
    /// This agent (its node's name).
    pub holder: String,
    pub lease_duration: Duration,
    pub renew_every: Duration,
    /// How long an identity object must be unused before the leader deletes it.
    pub identity_gc_grace: Duration,
}

/// One policy object's state, as the adapter's view has it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectStatus {
    pub kind: PolicyObjectKind,
    pub namespace: Option<String>,
    pub name: String,
    pub uid: String,
    pub generation: i64,
    pub validity: Validity,
    /// The `Valid` condition it carries now: status, reason, message, observedGeneration.
    pub current: Option<(String, String, String, i64)>,
}

/// What the leader acts on, published by the adapter after every batch.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StatusSnapshot {
    pub objects: Vec<ObjectStatus>,
    /// Identity objects no pod uses now.
    pub unused_identities: Vec<(Identity, Labels)>,
    /// Every watcher has listed once: only then is "unused" meaningful.
    pub synced: bool,
}

/// The condition an object should carry.
fn desired(o: &ObjectStatus) -> (String, String, String, i64) {
    match &o.validity {
        Validity::Valid => (
            "True".into(),
            "Enforced".into(),
            "the policy is valid and enforced".into(),
            o.generation,
        ),
        Validity::Invalid(why) => (
            "False".into(),
            "Invalid".into(),
            format!("{why}; the previous version, if any, is still enforced"),
            o.generation,
        ),
    }
}

struct Leader {
    leases: Api<Lease>,
    cfg: StatusConfig,
    leading: bool,
    warned: bool,
}

impl Leader {
    /// Takes or renews the Lease; whether this agent holds it now.
    async fn hold(&mut self) -> bool {
        let now = MicroTime(Timestamp::now());
        let duration = i32::try_from(self.cfg.lease_duration.as_secs()).unwrap_or(i32::MAX);
        let result = match self.leases.get_opt(&self.cfg.lease_name).await {
            Ok(None) => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(self.cfg.lease_name.clone()),
                        namespace: Some(self.cfg.namespace.clone()),
                        ..ObjectMeta::default()
                    },
                    spec: Some(LeaseSpec {
                        holder_identity: Some(self.cfg.holder.clone()),
                        lease_duration_seconds: Some(duration),
                        acquire_time: Some(now.clone()),
                        renew_time: Some(now),
                        lease_transitions: Some(0),
                        ..LeaseSpec::default()
                    }),
                };
                self.leases
                    .create(&PostParams::default(), &lease)
                    .await
                    .map(|_| true)
            }
            Ok(Some(mut lease)) => {
                let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
                let mine = spec.holder_identity.as_deref() == Some(self.cfg.holder.as_str());
                let held_for = i64::from(spec.lease_duration_seconds.unwrap_or(duration));
                let expired = spec
                    .renew_time
                    .as_ref()
                    .is_none_or(|t| Timestamp::now().as_second() > t.0.as_second() + held_for);
                if mine || expired || spec.holder_identity.is_none() {
                    if !mine {
                        spec.acquire_time = Some(now.clone());
                        spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
                    }
                    spec.holder_identity = Some(self.cfg.holder.clone());
                    spec.lease_duration_seconds = Some(duration);
                    spec.renew_time = Some(now);
                    // The resourceVersion read above makes this a compare-and-swap.
                    self.leases
                        .replace(&self.cfg.lease_name, &PostParams::default(), &lease)
                        .await
                        .map(|_| true)
                } else {
                    Ok(false)
                }
            }
            Err(e) => Err(e),
        };
        let now_leading = match result {
            Ok(l) => {
                self.warned = false;
                l
            }
            Err(kube::Error::Api(s)) if s.is_conflict() || s.is_already_exists() => false,
            Err(e) => {
                if !self.warned {
                    warn!(error = %describe("update", "leases.coordination.k8s.io", &e), "cannot take or renew the status lease; this agent writes no status");
                    self.warned = true;
                }
                false
            }
        };
        if now_leading != self.leading {
            info!(leader = now_leading, lease = %self.cfg.lease_name, "policy status leadership");
        }
        self.leading = now_leading;
        now_leading
    }
}

/// Runs until the adapter stops publishing.
pub async fn run(
    client: Client,
    cfg: StatusConfig,
    mut snapshots: watch::Receiver<Arc<StatusSnapshot>>,
) {
    let mut leader = Leader {
        leases: Api::namespaced(client.clone(), &cfg.namespace),
        cfg: cfg.clone(),
        leading: false,
        warned: false,
    };
    let identities_api =
        Api::<DynamicObject>::all_with(client.clone(), &identities::api_resource());
    // (uid, generation) of rejections already recorded as Events.
    let mut recorded: BTreeSet<(String, i64)> = BTreeSet::new();
    // Conditions written, so a write is not repeated before the watch reports it.
    let mut written: BTreeMap<String, (String, String, String, i64)> = BTreeMap::new();
    let mut unused_since: BTreeMap<Identity, Instant> = BTreeMap::new();
    let mut renew = tokio::time::interval(cfg.renew_every);
    loop {
        tokio::select! {
            _ = renew.tick() => {}
            changed = snapshots.changed() => if changed.is_err() { return },
        }
        if !leader.hold().await {
            continue;
        }
        let snap = snapshots.borrow_and_update().clone();
        for o in &snap.objects {
            let want = desired(o);
            let key = format!("{}/{}", o.uid, o.generation);
            if o.kind.has_status()
                && o.current.as_ref() != Some(&want)
                && written.get(&key) != Some(&want)
            {
                match write_condition(&client, o, &want).await {
                    Ok(()) => {
                        written.insert(key, want.clone());
                    }
                    Err(e) => {
                        warn!(policy = %o.name, error = %describe("patch", &format!("{}/status", o.kind.plural()), &e), "policy status not written");
                    }
                }
            }
            if let Validity::Invalid(why) = &o.validity
                && recorded.insert((o.uid.clone(), o.generation))
                && let Err(e) = record_event(&client, &cfg.holder, o, why).await
            {
                warn!(policy = %o.name, error = %describe("create", "events", &e), "rejection event not recorded");
            }
        }
        if snap.synced {
            collect_identities(
                &identities_api,
                &snap,
                &mut unused_since,
                cfg.identity_gc_grace,
            )
            .await;
        }
    }
}

async fn write_condition(
    client: &Client,
    o: &ObjectStatus,
    (status, reason, message, generation): &(String, String, String, i64),
) -> Result<(), kube::Error> {
    let ar = policy_api_resource(o.kind);
    let api: Api<DynamicObject> = match &o.namespace {
        Some(ns) => Api::namespaced_with(client.clone(), ns, &ar),
        None => Api::all_with(client.clone(), &ar),
    };
    let transition = if o.current.as_ref().map(|c| &c.0) == Some(status) {
        None
    } else {
        Some(Timestamp::now().to_string())
    };
    let mut condition = json!({
        "type": CONDITION,
        "status": status,
        "reason": reason,
        "message": message,
        "observedGeneration": generation,
    });
    condition["lastTransitionTime"] =
        json!(transition.unwrap_or_else(|| Timestamp::now().to_string()));
    let patch = json!({ "status": { "conditions": [condition] } });
    api.patch_status(&o.name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map(drop)?;
    debug!(policy = %o.name, status = %status, "policy status written");
    Ok(())
}

/// Creates a Warning Event from this node's agent about `object`, in `namespace`.
async fn create_warning(
    client: &Client,
    node: &str,
    namespace: &str,
    object: ObjectReference,
    reason: &str,
    message: String,
) -> Result<(), kube::Error> {
    let now = Timestamp::now();
    let event = Event {
        metadata: ObjectMeta {
            generate_name: object.name.as_ref().map(|n| format!("{n}.")),
            namespace: Some(namespace.into()),
            ..ObjectMeta::default()
        },
        involved_object: object,
        reason: Some(reason.into()),
        message: Some(message),
        type_: Some("Warning".into()),
        source: Some(EventSource {
            component: Some("palisade-agent".into()),
            host: Some(node.into()),
        }),
        first_timestamp: Some(Time(now)),
        last_timestamp: Some(Time(now)),
        count: Some(1),
        reporting_component: Some("palisade.io/agent".into()),
        reporting_instance: Some(node.into()),
        ..Event::default()
    };
    Api::<Event>::namespaced(client.clone(), namespace)
        .create(&PostParams::default(), &event)
        .await
        .map(drop)
}

async fn record_event(
    client: &Client,
    node: &str,
    o: &ObjectStatus,
    why: &str,
) -> Result<(), kube::Error> {
    // Events of cluster-scoped objects live in `default`, as the API server's own do.
    let ns = o.namespace.clone().unwrap_or_else(|| "default".into());
    let object = ObjectReference {
        api_version: Some(o.kind.api_version().into()),
        kind: Some(o.kind.kind().into()),
        name: Some(o.name.clone()),
        namespace: o.namespace.clone(),
        uid: Some(o.uid.clone()),
        ..ObjectReference::default()
    };
    let message = format!("{why}; enforcement is unchanged");
    create_warning(client, node, &ns, object, REJECTED_REASON, message).await
}

/// The Event reason of a pod annotation the agent cannot read.
pub const BAD_ANNOTATION_REASON: &str = "InvalidAnnotation";

/// A Warning Event on a pod of this node: `why` names the annotation and the value.
pub async fn record_pod_event(
    client: &Client,
    node: &str,
    namespace: &str,
    name: &str,
    why: &str,
) -> Result<(), kube::Error> {
    let object = ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("Pod".into()),
        name: Some(name.into()),
        namespace: Some(namespace.into()),
        ..ObjectReference::default()
    };
    create_warning(
        client,
        node,
        namespace,
        object,
        BAD_ANNOTATION_REASON,
        why.into(),
    )
    .await
}

async fn collect_identities(
    api: &Api<DynamicObject>,
    snap: &StatusSnapshot,
    unused_since: &mut BTreeMap<Identity, Instant>,
    grace: Duration,
) {
    let now = Instant::now();
    let unused: BTreeMap<Identity, &Labels> = snap
        .unused_identities
        .iter()
        .map(|(i, l)| (*i, l))
        .collect();
    unused_since.retain(|id, _| unused.contains_key(id));
    for (id, labels) in unused {
        let since = *unused_since.entry(id).or_insert(now);
        if now.duration_since(since) < grace {
            continue;
        }
        match identities::collect(api, id, labels).await {
            Ok(true) => {
                info!(identity = id.0, "unused identity collected");
                unused_since.remove(&id);
            }
            Ok(false) => {
                unused_since.remove(&id);
            }
            Err(e) => {
                warn!(identity = id.0, error = %describe("delete", "palisadeidentities.palisade.io", &e), "unused identity not collected");
            }
        }
    }
}
