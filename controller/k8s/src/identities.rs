//! Cluster-wide identities, as Cilium's CiliumIdentity: a `PalisadeIdentity` object per
//! number, named by the number, holding the labels. The API server is the arbiter: a node
//! creates the object for the first candidate number; `409 AlreadyExists` for the same labels
//! means another node got there first (and the number is the same for both), for other
//! labels it means try the next candidate. Candidates start at a hash of the labels, so
//! nodes racing for the same labels start at, and agree on, the same number.

use std::collections::BTreeMap;

use kube::api::{Api, DeleteParams, PostParams, Preconditions};
use kube::core::{ApiResource, DynamicObject, GroupVersionKind};
use palisade_common::identity::{FIRST_LABEL_IDENTITY, LABEL_IDENTITY_END};
use palisade_policies::identity::Identity;
use palisade_policies::labels::Labels;
use serde_json::json;

use crate::error::{K8sError, label_list};

pub const GROUP: &str = "palisade.io";
pub const VERSION: &str = "v1";
pub const KIND: &str = "PalisadeIdentity";
pub const PLURAL: &str = "palisadeidentities";
/// How many numbers are tried before giving up.
const TRIES: u32 = 64;

pub fn api_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(GROUP, VERSION, KIND), PLURAL)
}

/// The first candidate number for `labels`: FNV-1a over `k=v` pairs in order, into the
/// label scope. Stable across nodes, releases and architectures.
pub fn first_candidate(labels: &Labels) -> u32 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for (k, v) in labels {
        for b in k.bytes().chain([b'=']).chain(v.bytes()).chain([0]) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    let span = u64::from(LABEL_IDENTITY_END - FIRST_LABEL_IDENTITY);
    let offset = u32::try_from(h % span).unwrap_or(0);
    FIRST_LABEL_IDENTITY + offset
}

fn next(candidate: u32) -> u32 {
    if candidate + 1 >= LABEL_IDENTITY_END {
        FIRST_LABEL_IDENTITY
    } else {
        candidate + 1
    }
}

/// An identity object's number and labels, if it is one.
pub fn from_object(o: &DynamicObject) -> Option<(Identity, Labels)> {
    let id = o.metadata.name.as_deref()?.parse::<u32>().ok()?;
    if !(FIRST_LABEL_IDENTITY..LABEL_IDENTITY_END).contains(&id) {
        return None;
    }
    let labels: Labels = serde_json::from_value(o.data.get("spec")?.get("labels")?.clone()).ok()?;
    Some((Identity(id), labels))
}

/// Finds or makes the cluster's number for `labels`. `known`: the identity objects this node
/// has seen (so numbers known to be other labels' are skipped without asking).
pub async fn allocate(
    api: &Api<DynamicObject>,
    labels: &Labels,
    known: &BTreeMap<Identity, Labels>,
) -> Result<Identity, K8sError> {
    let mut candidate = first_candidate(labels);
    for _ in 0..TRIES {
        match known.get(&Identity(candidate)) {
            Some(l) if l == labels => return Ok(Identity(candidate)),
            Some(_) => {
                candidate = next(candidate);
                continue;
            }
            None => {}
        }
        let mut object = DynamicObject::new(&candidate.to_string(), &api_resource());
        object.data = json!({ "spec": { "labels": labels } });
        match api.create(&PostParams::default(), &object).await {
            Ok(_) => return Ok(Identity(candidate)),
            Err(kube::Error::Api(s)) if s.is_already_exists() => {
                let theirs =
                    api.get(&candidate.to_string())
                        .await
                        .map_err(|e| K8sError::Allocate {
                            candidate,
                            labels: label_list(labels),
                            reason: crate::error::describe(
                                "get",
                                "palisadeidentities.palisade.io",
                                &e,
                            ),
                        })?;
                if from_object(&theirs).is_some_and(|(_, l)| l == *labels) {
                    return Ok(Identity(candidate));
                }
                candidate = next(candidate);
            }
            Err(e) => {
                return Err(K8sError::Allocate {
                    candidate,
                    labels: label_list(labels),
                    reason: crate::error::describe("create", "palisadeidentities.palisade.io", &e),
                });
            }
        }
    }
    Err(K8sError::NoFreeIdentity {
        labels: label_list(labels),
        tries: TRIES,
    })
}

/// Deletes an identity object, only if it still holds `labels` (a number freed and taken
/// again by other labels in between is not touched).
pub async fn collect(
    api: &Api<DynamicObject>,
    id: Identity,
    labels: &Labels,
) -> Result<bool, kube::Error> {
    let name = id.0.to_string();
    let current = match api.get(&name).await {
        Ok(o) => o,
        Err(kube::Error::Api(s)) if s.is_not_found() => return Ok(false),
        Err(e) => return Err(e),
    };
    if from_object(&current).is_none_or(|(_, l)| l != *labels) {
        return Ok(false);
    }
    let params = DeleteParams {
        preconditions: Some(Preconditions {
            uid: current.metadata.uid.clone(),
            resource_version: current.metadata.resource_version.clone(),
        }),
        ..DeleteParams::default()
    };
    match api.delete(&name, &params).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(s)) if s.is_not_found() || s.is_conflict() => Ok(false),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_candidate_is_stable_and_in_the_label_scope() {
        let l: Labels = [("app".to_string(), "web".to_string())].into();
        let a = first_candidate(&l);
        assert_eq!(a, first_candidate(&l.clone()));
        assert!((FIRST_LABEL_IDENTITY..LABEL_IDENTITY_END).contains(&a));
        let other: Labels = [("app".to_string(), "db".to_string())].into();
        assert_ne!(a, first_candidate(&other));
        // `a=bc` and `ab=c` are different label sets.
        let x: Labels = [("a".to_string(), "bc".to_string())].into();
        let y: Labels = [("ab".to_string(), "c".to_string())].into();
        assert_ne!(first_candidate(&x), first_candidate(&y));
        assert_eq!(next(LABEL_IDENTITY_END - 1), FIRST_LABEL_IDENTITY);
    }
}
