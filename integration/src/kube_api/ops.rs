//! The verbs, on the store: what the generic registry store of kube-apiserver does for get,
//! list, create, update, patch and delete, with the lifecycle rules clients can see
//! (finalizers, graceful Pod deletion, namespace and CRD clean-up, CRDs becoming Established).

use std::collections::BTreeMap;
use std::sync::Arc;

use serde_json::{Value, json};

use super::patch::{self, JsonPatchError};
use super::resources::{Builtin, ResourceDef};
use super::status::{self, ApiError, FieldError, GroupResource};
use super::store::{Filter, ObjKey, Store, TooOld, WatchItem};
use super::strategy::{self, FieldValidation, Target};
use super::util;

fn key(def: &ResourceDef, namespace: &str, name: &str) -> ObjKey {
    (
        if def.namespaced {
            namespace.to_string()
        } else {
            String::new()
        },
        name.to_string(),
    )
}

fn namespaces() -> GroupResource {
    GroupResource::new("", "namespaces")
}

fn crds() -> GroupResource {
    GroupResource::new("apiextensions.k8s.io", "customresourcedefinitions")
}

/// Allocates the next free ClusterIP in 10.96.0.0/16 (the real default range is a /12).
fn cluster_ip_allocator(store: &Store) -> impl FnMut() -> String + use<> {
    let used: Vec<String> = store
        .all(&GroupResource::new("", "services"))
        .values()
        .filter_map(|s| s["spec"]["clusterIP"].as_str().map(str::to_string))
        .collect();
    move || {
        (10u32..65_000)
            .map(|n| format!("10.96.{}.{}", n / 256, n % 256))
            .find(|ip| !used.contains(ip))
            .unwrap_or_else(|| "10.96.255.254".to_string())
    }
}

pub fn get(
    store: &Store,
    def: &ResourceDef,
    namespace: &str,
    name: &str,
) -> Result<Value, ApiError> {
    store
        .get(&def.storage, &key(def, namespace, name))
        .map(|o| def.view_form(&o))
        .ok_or_else(|| ApiError::not_found(&def.gr(), name))
}

/// Options of a list.
#[derive(Clone, Debug, Default)]
pub struct ListOptions {
    pub limit: Option<usize>,
    pub continue_token: Option<String>,
    pub resource_version: Option<String>,
    pub resource_version_match: Option<String>,
}

fn list_options_invalid(errors: &[FieldError]) -> ApiError {
    ApiError::invalid("ListOptions", "meta.k8s.io", "", errors)
}

/// `metav1.ValidateListOptions` for a list (not a watch).
fn validate_list(opts: &ListOptions) -> Result<(), ApiError> {
    let mut errs = Vec::new();
    if let Some(m) = opts
        .resource_version_match
        .as_deref()
        .filter(|m| !m.is_empty())
    {
        let rv = opts.resource_version.as_deref().unwrap_or("");
        if rv.is_empty() {
            errs.push(FieldError::forbidden(
                "resourceVersionMatch",
                "resourceVersionMatch is forbidden unless resourceVersion is provided",
            ));
        }
        if opts
            .continue_token
            .as_deref()
            .is_some_and(|c| !c.is_empty())
        {
            errs.push(FieldError::forbidden(
                "resourceVersionMatch",
                "resourceVersionMatch is forbidden when continue is provided",
            ));
        }
        if m != "Exact" && m != "NotOlderThan" {
            errs.push(FieldError::not_supported(
                "resourceVersionMatch",
                &json!(m),
                &[
                    "Exact".to_string(),
                    "NotOlderThan".to_string(),
                    String::new(),
                ],
            ));
        }
        if m == "Exact" && rv == "0" {
            errs.push(FieldError::forbidden(
                "resourceVersionMatch",
                "resourceVersionMatch \"exact\" is forbidden for resourceVersion \"0\"",
            ));
        }
    }
    if errs.is_empty() {
        Ok(())
    } else {
        Err(list_options_invalid(&errs))
    }
}

/// The filter of a list or watch, its selectors parsed and checked.
pub fn filter(
    def: &ResourceDef,
    namespace: Option<&str>,
    labels: &str,
    fields: &str,
) -> Result<Filter, ApiError> {
    let labels = super::selectors::LabelSelector::parse(labels).map_err(ApiError::bad_request)?;
    let fields = super::selectors::FieldSelector::parse(fields).map_err(ApiError::bad_request)?;
    def.check_field_selector(fields.fields())
        .map_err(ApiError::bad_request)?;
    Ok(Filter {
        def: def.clone(),
        namespace: namespace
            .filter(|n| !n.is_empty() && def.namespaced)
            .map(str::to_string),
        labels,
        fields,
    })
}

fn encode_continue(rv: u64, start: &ObjKey) -> String {
    let start = if start.0.is_empty() {
        format!("{}\u{0}", start.1)
    } else {
        format!("{}/{}\u{0}", start.0, start.1)
    };
    let body = json!({"v": "meta.k8s.io/v1", "rv": rv, "start": start});
    util::base64_encode(body.to_string().as_bytes())
}

fn decode_continue(token: &str) -> Result<(u64, String), ApiError> {
    let bytes = util::base64_decode(token).map_err(|i| {
        ApiError::bad_request(format!(
            "continue key is not valid: illegal base64 data at input byte {i}"
        ))
    })?;
    let v: Value = serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::bad_request(format!("continue key is not valid: {e}")))?;
    if v["v"] != "meta.k8s.io/v1" {
        return Err(ApiError::bad_request(
            "continue key is not valid: incorrect encoded start resourceVersion (version meta.k8s.io/v1)",
        ));
    }
    let rv = v["rv"].as_u64().filter(|rv| *rv > 0).ok_or_else(|| {
        ApiError::bad_request("continue key is not valid: incorrect encoded start resourceVersion (version meta.k8s.io/v1)")
    })?;
    Ok((rv, v["start"].as_str().unwrap_or("").to_string()))
}

fn key_string(k: &ObjKey) -> String {
    if k.0.is_empty() {
        format!("{}\u{0}", k.1)
    } else {
        format!("{}/{}\u{0}", k.0, k.1)
    }
}

/// What a list answers: the items (view form) and the list metadata.
pub struct Listed {
    pub items: Vec<Value>,
    pub metadata: Value,
}

/// Why a list cannot be answered yet: the resourceVersion asked for is ahead of the store.
pub enum ListWait {
    Error(ApiError),
    /// Not there yet; the caller may wait for the store to reach it, then ask again.
    Ahead {
        asked: u64,
        current: u64,
    },
}

impl From<ApiError> for ListWait {
    fn from(e: ApiError) -> ListWait {
        ListWait::Error(e)
    }
}

pub fn list(store: &Store, f: &Filter, opts: &ListOptions) -> Result<Listed, ListWait> {
    validate_list(opts)?;
    let def = &f.def;
    let (rv, start, objs) = if let Some(token) =
        opts.continue_token.as_deref().filter(|c| !c.is_empty())
    {
        if opts
            .resource_version
            .as_deref()
            .is_some_and(|rv| !rv.is_empty() && rv != "0")
        {
            return Err(ApiError::bad_request(
                "specifying resource version is not allowed when using continue",
            )
            .into());
        }
        let (rv, start) = decode_continue(token)?;
        let objs = store.snapshot_at(&def.storage, rv).map_err(|_| {
            ApiError::expired("The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter, or use the continue token in this response to retrieve the remainder of the results. Continuing with the provided token results in an inconsistent list - objects that were created, modified, or deleted between the time the first chunk was returned and now may show up in the list.")
        })?;
        (rv, Some(start), objs)
    } else {
        let current = store.resource_version();
        match opts
            .resource_version
            .as_deref()
            .filter(|r| !r.is_empty() && *r != "0")
        {
            None => (current, None, store.all(&def.storage)),
            Some(r) => {
                let asked: u64 = r
                    .parse()
                    .map_err(|_| ApiError::bad_request(format!("invalid resource version: {r}")))?;
                if opts.resource_version_match.as_deref() == Some("Exact") {
                    if asked > current {
                        return Err(ListWait::Ahead { asked, current });
                    }
                    let objs =
                        store
                            .snapshot_at(&def.storage, asked)
                            .map_err(|TooOld { .. }| {
                                ApiError::expired(
                                    "The resourceVersion for the provided list is too old.",
                                )
                            })?;
                    (asked, None, objs)
                } else {
                    if asked > current {
                        return Err(ListWait::Ahead { asked, current });
                    }
                    (current, None, store.all(&def.storage))
                }
            }
        }
    };
    let matching: Vec<(&ObjKey, &Arc<Value>)> = objs
        .iter()
        .filter(|(k, _)| start.as_ref().is_none_or(|s| key_string(k) >= *s))
        .filter(|(_, o)| f.matches(o))
        .collect();
    let limit = opts.limit.filter(|l| *l > 0).unwrap_or(usize::MAX);
    let page: Vec<Value> = matching
        .iter()
        .take(limit)
        .map(|(_, o)| def.view_form(o))
        .collect();
    let mut metadata = json!({ "resourceVersion": rv.to_string() });
    if matching.len() > page.len() {
        let next = matching[page.len()].0;
        metadata["continue"] = json!(encode_continue(rv, next));
        if f.labels.is_empty() && f.fields.is_empty() {
            metadata["remainingItemCount"] = json!(matching.len() - page.len());
        }
    }
    Ok(Listed {
        items: page,
        metadata,
    })
}

fn namespace_check(
    store: &Store,
    def: &ResourceDef,
    namespace: &str,
    name: &str,
) -> Result<(), ApiError> {
    if !def.namespaced {
        return Ok(());
    }
    match store.get(&namespaces(), &(String::new(), namespace.to_string())) {
        None => Err(ApiError::not_found(&namespaces(), namespace)),
        Some(ns) if !util::meta_str(&ns, "deletionTimestamp").is_empty() => {
            let mut e = ApiError::new(
                403,
                "Forbidden",
                format!(
                    "{} {name:?} is forbidden: unable to create new content in namespace {namespace} because it is being terminated",
                    def.gr()
                ),
            );
            e.details = Some(json!({"name": name, "kind": def.plural, "causes": [{
                "reason": "NamespaceTerminating",
                "message": format!("namespace {namespace} is being terminated"),
                "field": "metadata.namespace"
            }]}));
            Err(e)
        }
        Some(_) => Ok(()),
    }
}

/// Creates an object (`obj` decoded, in the view's form) in `namespace`.
pub fn create(
    store: &mut Store,
    def: &ResourceDef,
    namespace: &str,
    mut obj: Value,
    dry_run: bool,
) -> Result<Value, ApiError> {
    let body_ns = util::meta_str(&obj, "namespace");
    if def.namespaced && !body_ns.is_empty() && body_ns != namespace {
        return Err(ApiError::bad_request(
            "the namespace of the provided object does not match the namespace sent on the request",
        ));
    }
    if !util::meta_str(&obj, "resourceVersion").is_empty() {
        return Err(ApiError::internal(
            "resourceVersion should not be set on objects to be created",
        ));
    }
    if util::meta_str(&obj, "name").is_empty() {
        let prefix = util::meta_str(&obj, "generateName").to_string();
        if !prefix.is_empty() {
            let taken = |n: &str| store.get(&def.storage, &key(def, namespace, n)).is_some();
            let mut name = format!("{prefix}{}", util::name_suffix());
            for _ in 0..8 {
                if !taken(&name) {
                    break;
                }
                name = format!("{prefix}{}", util::name_suffix());
            }
            util::meta_mut(&mut obj).insert("name".into(), json!(name));
        }
    }
    let mut alloc = cluster_ip_allocator(store);
    strategy::defaults(def, &mut obj, &mut alloc);
    strategy::validate(def, &obj, true)?;
    let name = util::meta_str(&obj, "name").to_string();
    namespace_check(store, def, namespace, &name)?;
    let k = key(def, namespace, &name);
    if store.get(&def.storage, &k).is_some() {
        return Err(ApiError::already_exists(&def.gr(), &name));
    }
    strategy::prepare_create(def, &mut obj, namespace);
    if dry_run {
        return Ok(obj);
    }
    let stored = store.commit(&def.storage, k.clone(), def.stored_form(obj));
    let answer = def.view_form(&stored);
    if def.builtin() == Some(Builtin::Crd) {
        establish(store, &k);
    }
    Ok(answer)
}

/// What the apiextensions controllers do right after a CRD is written: names accepted, the
/// CRD Established (a second write, as on the real server).
fn establish(store: &mut Store, k: &ObjKey) {
    let Some(crd) = store.get(&crds(), k) else {
        return;
    };
    let mut next = (*crd).clone();
    let names = next["spec"]["names"].clone();
    let now = util::now_rfc3339();
    let cond = |t: &str, reason: &str, message: &str| json!({"type": t, "status": "True", "lastTransitionTime": now, "reason": reason, "message": message});
    let mut stored: Vec<Value> = next["status"]["storedVersions"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    if let Some(v) = next["spec"]["versions"]
        .as_array()
        .and_then(|vs| vs.iter().find(|v| v["storage"] == true))
        && !stored.contains(&v["name"])
    {
        stored.push(v["name"].clone());
    }
    let established = next["status"]["conditions"]
        .as_array()
        .is_some_and(|cs| cs.iter().any(|c| c["type"] == "Established"));
    let conditions = if established {
        next["status"]["conditions"].clone()
    } else {
        json!([
            cond("NamesAccepted", "NoConflicts", "no conflicts found"),
            cond(
                "Established",
                "InitialNamesAccepted",
                "the initial names have been accepted"
            ),
        ])
    };
    next["status"] =
        json!({"conditions": conditions, "acceptedNames": names, "storedVersions": stored});
    if next != *crd {
        store.commit(&crds(), k.clone(), next);
    }
}

/// Replaces an object (PUT). Returns the stored object and whether it was created.
pub fn update(
    store: &mut Store,
    def: &ResourceDef,
    namespace: &str,
    name: &str,
    mut obj: Value,
    target: Target,
    dry_run: bool,
) -> Result<(Value, bool), ApiError> {
    let body_name = util::meta_str(&obj, "name").to_string();
    if body_name.is_empty() {
        util::meta_mut(&mut obj).insert("name".into(), json!(name));
    } else if body_name != name {
        return Err(ApiError::bad_request(format!(
            "the name of the object ({body_name}) does not match the name on the URL ({name})"
        )));
    }
    let body_ns = util::meta_str(&obj, "namespace");
    if def.namespaced && !body_ns.is_empty() && body_ns != namespace {
        return Err(ApiError::bad_request(
            "the namespace of the provided object does not match the namespace sent on the request",
        ));
    }
    let k = key(def, namespace, name);
    let Some(old_stored) = store.get(&def.storage, &k) else {
        if def.allow_create_on_update() && target == Target::Main {
            util::meta_mut(&mut obj).remove("resourceVersion");
            return create(store, def, namespace, obj, dry_run).map(|o| (o, true));
        }
        return Err(ApiError::not_found(&def.gr(), name));
    };
    let old = def.view_form(&old_stored);
    let rv = util::meta_str(&obj, "resourceVersion").to_string();
    if rv.is_empty() {
        if !def.allow_unconditional_update() {
            return Err(ApiError::invalid(
                &def.kind,
                &def.group,
                name,
                &[FieldError::invalid_shown(
                    "metadata.resourceVersion",
                    "0x0",
                    "must be specified for an update",
                )],
            ));
        }
    } else if rv != util::meta_str(&old, "resourceVersion") {
        return Err(ApiError::conflict(&def.gr(), name));
    }
    let uid = util::meta_str(&obj, "uid");
    if !uid.is_empty() && uid != util::meta_str(&old, "uid") {
        return Err(ApiError::conflict_because(
            &def.gr(),
            name,
            &format!(
                "Precondition failed: UID in precondition: {uid}, UID in object meta: {}",
                util::meta_str(&old, "uid")
            ),
        ));
    }
    let mut alloc = cluster_ip_allocator(store);
    if target == Target::Main {
        strategy::defaults(def, &mut obj, &mut alloc);
    }
    strategy::prepare_update(def, &old, &mut obj, target);
    strategy::validate(def, &obj, false)?;
    strategy::check_pod_update(def, &old, &obj)?;
    util::meta_mut(&mut obj).insert(
        "resourceVersion".into(),
        json!(util::meta_str(&old, "resourceVersion")),
    );
    if obj == old {
        // Nothing changed: the real server writes nothing and bumps no resourceVersion.
        return Ok((old, false));
    }
    if dry_run {
        return Ok((obj, false));
    }
    let finalized = !util::meta_str(&obj, "deletionTimestamp").is_empty()
        && obj["metadata"]["finalizers"]
            .as_array()
            .is_none_or(Vec::is_empty);
    if finalized {
        // The last finalizer of an object being deleted: the real server writes no update
        // but deletes it (`deleteWithoutFinalizers`), so watchers see one DELETED.
        let last = finish_delete(store, def, &k).expect("present");
        return Ok((def.view_form(&last), false));
    }
    let stored = store.commit(&def.storage, k.clone(), def.stored_form(obj));
    let answer = def.view_form(&stored);
    if def.builtin() == Some(Builtin::Crd) {
        establish(store, &k);
    }
    Ok((answer, false))
}

/// A patch's media type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PatchType {
    Json,
    Merge,
    Strategic,
    Apply,
}

impl PatchType {
    pub fn from_content_type(ct: &str) -> Option<PatchType> {
        match ct.split(';').next().unwrap_or("").trim() {
            "application/json-patch+json" => Some(PatchType::Json),
            "application/merge-patch+json" => Some(PatchType::Merge),
            "application/strategic-merge-patch+json" => Some(PatchType::Strategic),
            "application/apply-patch+yaml" | "application/apply-patch+cbor" => {
                Some(PatchType::Apply)
            }
            _ => None,
        }
    }
}

/// Patches an object. Returns the stored object and whether it was created (apply only).
#[expect(
    clippy::too_many_arguments,
    reason = "one argument per part of a PATCH request"
)]
pub fn patch(
    store: &mut Store,
    def: &ResourceDef,
    namespace: &str,
    name: &str,
    kind: PatchType,
    body: &Value,
    target: Target,
    fv: FieldValidation,
    dry_run: bool,
) -> Result<(Value, bool, Vec<String>), ApiError> {
    let k = key(def, namespace, name);
    let current = store.get(&def.storage, &k).map(|o| def.view_form(&o));
    let Some(mut obj) = current.clone() else {
        if kind == PatchType::Apply && target == Target::Main {
            let (decoded, warnings) = strategy::decode(def, body.clone(), fv)?;
            let mut decoded = decoded;
            util::meta_mut(&mut decoded).insert("name".into(), json!(name));
            let created = create(store, def, namespace, decoded, dry_run)?;
            return Ok((created, true, warnings));
        }
        return Err(ApiError::not_found(&def.gr(), name));
    };
    match kind {
        PatchType::Merge => patch::merge_patch(&mut obj, body),
        PatchType::Strategic => {
            if def.builtin().is_none() {
                return Err(ApiError::new(
                    415,
                    "UnsupportedMediaType",
                    "the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml",
                ));
            }
            patch::strategic_merge(&mut obj, body).map_err(ApiError::bad_request)?;
        }
        PatchType::Json => patch::json_patch(&mut obj, body).map_err(|e| match e {
            JsonPatchError::Decode(m) => ApiError::bad_request(m),
            JsonPatchError::Apply(m) => ApiError::new(422, "Invalid", m),
        })?,
        PatchType::Apply => {
            for f in ["apiVersion", "kind"] {
                if body
                    .get(f)
                    .and_then(Value::as_str)
                    .is_none_or(str::is_empty)
                {
                    return Err(ApiError::bad_request(format!(
                        "error decoding YAML: {} must be set for apply",
                        if f == "kind" { "kind" } else { "apiVersion" }
                    )));
                }
            }
            patch::apply(&mut obj, body);
        }
    }
    if !obj.is_object() {
        return Err(ApiError::new(
            422,
            "Invalid",
            format!("the patch leaves no object: {} is not a {}", obj, def.kind),
        ));
    }
    // A patch may carry a resourceVersion: it is then a precondition, like a PUT's.
    let patched_rv = util::meta_str(&obj, "resourceVersion").to_string();
    let current_rv = current
        .as_ref()
        .map(|c| util::meta_str(c, "resourceVersion").to_string())
        .unwrap_or_default();
    if !patched_rv.is_empty() && patched_rv != current_rv {
        return Err(ApiError::conflict(&def.gr(), name));
    }
    util::meta_mut(&mut obj).insert("resourceVersion".into(), json!(current_rv));
    let (decoded, warnings) = strategy::decode(def, obj, fv)?;
    let (stored, created) = update(store, def, namespace, name, decoded, target, dry_run)?;
    Ok((stored, created, warnings))
}

/// The parts of `DeleteOptions` that matter here.
#[derive(Clone, Debug, Default)]
pub struct DeleteOptions {
    pub grace_period_seconds: Option<i64>,
    pub precondition_uid: Option<String>,
    pub precondition_rv: Option<String>,
    pub dry_run: bool,
}

impl DeleteOptions {
    pub fn from_body(body: &Value) -> DeleteOptions {
        DeleteOptions {
            grace_period_seconds: body["gracePeriodSeconds"].as_i64(),
            precondition_uid: body["preconditions"]["uid"].as_str().map(str::to_string),
            precondition_rv: body["preconditions"]["resourceVersion"]
                .as_str()
                .map(str::to_string),
            dry_run: body["dryRun"]
                .as_array()
                .is_some_and(|d| d.iter().any(|x| x == "All")),
        }
    }
}

/// Removes an object whose deletion is complete, with what that removal brings along.
fn finish_delete(store: &mut Store, def: &ResourceDef, k: &ObjKey) -> Option<Arc<Value>> {
    match def.builtin() {
        Some(Builtin::Namespace) => {
            let ns = k.1.clone();
            let storages: Vec<GroupResource> = {
                let mut v: Vec<GroupResource> = Vec::new();
                for g in store.registry().groups() {
                    for ver in &g.versions {
                        for d in store.registry().resources(&g.name, ver) {
                            if d.namespaced && !v.contains(&d.storage) {
                                v.push(d.storage.clone());
                            }
                        }
                    }
                }
                v
            };
            for s in storages {
                let keys: Vec<ObjKey> = store
                    .all(&s)
                    .keys()
                    .filter(|(n, _)| *n == ns)
                    .cloned()
                    .collect();
                for key in keys {
                    store.remove(&s, &key);
                }
            }
        }
        Some(Builtin::Crd) => {
            if let Some(crd) = store.get(&crds(), k) {
                let gr = GroupResource::new(
                    crd["spec"]["group"].as_str().unwrap_or(""),
                    crd["spec"]["names"]["plural"].as_str().unwrap_or(""),
                );
                let keys: Vec<ObjKey> = store.all(&gr).keys().cloned().collect();
                for key in keys {
                    store.remove(&gr, &key);
                }
            }
        }
        _ => {}
    }
    store.remove(&def.storage, k)
}

fn mark_deleting(store: &mut Store, def: &ResourceDef, k: &ObjKey, grace: i64) -> Arc<Value> {
    let cur = store.get(&def.storage, k).expect("caller checked");
    let mut next = (*cur).clone();
    let meta = util::meta_mut(&mut next);
    meta.insert(
        "deletionTimestamp".into(),
        json!(util::rfc3339_after(grace)),
    );
    meta.insert("deletionGracePeriodSeconds".into(), json!(grace));
    if let Some(g) = meta
        .get("generation")
        .and_then(Value::as_i64)
        .filter(|g| *g > 0)
    {
        meta.insert("generation".into(), json!(g + 1));
    }
    match def.builtin() {
        Some(Builtin::Namespace) => next["status"] = json!({"phase": "Terminating"}),
        Some(Builtin::Crd) => {
            if let Some(cs) = next["status"]["conditions"].as_array_mut() {
                cs.push(json!({"type": "Terminating", "status": "True", "lastTransitionTime": util::now_rfc3339(),
                    "reason": "InstanceDeletionInProgress", "message": "CustomResource deletion is in progress"}));
            }
        }
        _ => {}
    }
    store.commit(&def.storage, k.clone(), next)
}

/// Deletes an object. Returns the response body (the object, or a `Status`).
pub fn delete(
    store: &mut Store,
    def: &ResourceDef,
    namespace: &str,
    name: &str,
    opts: &DeleteOptions,
) -> Result<Value, ApiError> {
    let k = key(def, namespace, name);
    let cur = store
        .get(&def.storage, &k)
        .ok_or_else(|| ApiError::not_found(&def.gr(), name))?;
    if let Some(uid) = &opts.precondition_uid
        && uid != util::meta_str(&cur, "uid")
    {
        return Err(ApiError::conflict_because(
            &def.gr(),
            name,
            &format!(
                "Precondition failed: UID in precondition: {uid}, UID in object meta: {}",
                util::meta_str(&cur, "uid")
            ),
        ));
    }
    if let Some(rv) = &opts.precondition_rv
        && rv != util::meta_str(&cur, "resourceVersion")
    {
        return Err(ApiError::conflict_because(
            &def.gr(),
            name,
            &format!(
                "Precondition failed: ResourceVersion in precondition: {rv}, ResourceVersion in object meta: {}",
                util::meta_str(&cur, "resourceVersion")
            ),
        ));
    }
    if opts.dry_run {
        return Ok(def.view_form(&cur));
    }
    let has_finalizers = cur["metadata"]["finalizers"]
        .as_array()
        .is_some_and(|f| !f.is_empty());
    let deleting = !util::meta_str(&cur, "deletionTimestamp").is_empty();
    if has_finalizers {
        if deleting {
            return Ok(def.view_form(&cur));
        }
        let marked = mark_deleting(store, def, &k, 0);
        return Ok(def.view_form(&marked));
    }
    match def.builtin() {
        Some(Builtin::Namespace | Builtin::Crd) => {
            let marked = mark_deleting(store, def, &k, 0);
            finish_delete(store, def, &k);
            Ok(def.view_form(&marked))
        }
        Some(Builtin::Pod) => {
            let grace = opts
                .grace_period_seconds
                .or_else(|| cur["spec"]["terminationGracePeriodSeconds"].as_i64())
                .unwrap_or(30);
            let bound = cur["spec"]["nodeName"]
                .as_str()
                .is_some_and(|n| !n.is_empty());
            let phase = cur["status"]["phase"].as_str().unwrap_or("");
            if bound && grace > 0 && phase != "Succeeded" && phase != "Failed" {
                // Graceful: marked first, then removed by the (simulated, instant) kubelet.
                let marked = mark_deleting(store, def, &k, grace);
                store.remove(&def.storage, &k);
                return Ok(def.view_form(&marked));
            }
            let last = store.remove(&def.storage, &k).expect("present");
            Ok(def.view_form(&last))
        }
        _ => {
            let last = store.remove(&def.storage, &k).expect("present");
            if def.returns_deleted_object() {
                Ok(def.view_form(&last))
            } else {
                Ok(status::deleted_status(
                    &def.gr(),
                    name,
                    util::meta_str(&last, "uid"),
                ))
            }
        }
    }
}

/// Deletes every object a list would return; answers with the list of what was deleted.
pub fn delete_collection(
    store: &mut Store,
    f: &Filter,
    opts: &DeleteOptions,
) -> Result<Value, ApiError> {
    let def = &f.def;
    let victims: Vec<ObjKey> = store
        .all(&def.storage)
        .iter()
        .filter(|(_, o)| f.matches(o))
        .map(|(k, _)| k.clone())
        .collect();
    let mut items = Vec::new();
    for k in victims {
        let out = delete(store, def, &k.0, &k.1, opts)?;
        if out["kind"] != "Status" {
            items.push(out);
        }
    }
    Ok(json!({
        "kind": format!("{}List", def.kind),
        "apiVersion": def.api_version(),
        "metadata": {"resourceVersion": store.resource_version().to_string()},
        "items": items,
    }))
}

/// How a watch starts.
#[derive(Clone, Debug, Default)]
pub struct WatchOptions {
    pub resource_version: Option<String>,
    pub resource_version_match: Option<String>,
    pub send_initial_events: Option<bool>,
    pub allow_bookmarks: bool,
}

/// What `start_watch` could not do.
pub enum WatchStart {
    Error(ApiError),
    /// The resourceVersion is compacted away: answer 200 with one ERROR event.
    Expired(ApiError),
    Ahead {
        asked: u64,
        current: u64,
    },
}

/// `validateWatchOptions`.
fn validate_watch(opts: &WatchOptions) -> Result<(), ApiError> {
    let mut errs = Vec::new();
    let m = opts
        .resource_version_match
        .as_deref()
        .filter(|m| !m.is_empty());
    if opts.send_initial_events.is_some() && m != Some("NotOlderThan") {
        errs.push(FieldError::forbidden(
            "resourceVersionMatch",
            "sendInitialEvents requires setting resourceVersionMatch to NotOlderThan",
        ));
    }
    if let Some(m) = m {
        if opts.send_initial_events.is_none() {
            errs.push(FieldError::forbidden(
                "resourceVersionMatch",
                "resourceVersionMatch is forbidden for watch unless sendInitialEvents is provided",
            ));
        }
        if m != "NotOlderThan" {
            errs.push(FieldError::not_supported(
                "resourceVersionMatch",
                &json!(m),
                &["NotOlderThan".to_string()],
            ));
        }
    }
    if errs.is_empty() {
        Ok(())
    } else {
        Err(list_options_invalid(&errs))
    }
}

/// Registers a watch; its queue gets the initial events first. Returns the watch id.
pub fn start_watch(
    store: &mut Store,
    f: Filter,
    opts: &WatchOptions,
    tx: tokio::sync::mpsc::UnboundedSender<WatchItem>,
) -> Result<u64, WatchStart> {
    validate_watch(opts).map_err(WatchStart::Error)?;
    let rv = opts.resource_version.as_deref().unwrap_or("");
    let current = store.resource_version();
    let snapshot = |store: &Store, f: &Filter| -> Vec<WatchItem> {
        store
            .all(&f.def.storage)
            .values()
            .filter(|o| f.matches(o))
            .map(|o| WatchItem::Event(super::store::EventType::Added, Arc::clone(o)))
            .collect()
    };
    let initial = match (opts.send_initial_events, rv) {
        (Some(true), _) => {
            if let Ok(asked) = rv.parse::<u64>()
                && asked > current
            {
                return Err(WatchStart::Ahead { asked, current });
            }
            let mut items = snapshot(store, &f);
            if opts.allow_bookmarks {
                items.push(WatchItem::InitialEventsEnd(current));
            }
            items
        }
        (Some(false), "" | "0") => Vec::new(),
        (None, "" | "0") => snapshot(store, &f),
        (_, r) => {
            let asked: u64 = r.parse().map_err(|_| {
                WatchStart::Error(ApiError::bad_request(format!(
                    "invalid resource version: {r}"
                )))
            })?;
            if asked > current {
                return Err(WatchStart::Ahead { asked, current });
            }
            store.replay_since(&f, asked).map_err(|TooOld { floor }| {
                WatchStart::Expired(ApiError::expired(format!(
                    "too old resource version: {asked} ({floor})"
                )))
            })?
        }
    };
    Ok(store.register(f, tx, initial))
}

/// Stores an object as given, bypassing decoding, defaulting and status rules (what a test
/// wants when it plays kubelet or a controller): uid and creationTimestamp are filled when
/// absent, the generation follows spec changes. Returns the stored object (view form).
pub fn upsert_raw(store: &mut Store, def: &ResourceDef, mut obj: Value) -> Result<Value, ApiError> {
    let name = util::meta_str(&obj, "name").to_string();
    if name.is_empty() {
        return Err(ApiError::invalid(
            &def.kind,
            &def.group,
            "",
            &[FieldError::required(
                "metadata.name",
                "name or generateName is required",
            )],
        ));
    }
    let namespace = util::meta_str(&obj, "namespace").to_string();
    if def.namespaced && namespace.is_empty() {
        return Err(ApiError::bad_request(format!(
            "{} {name:?} needs metadata.namespace",
            def.kind
        )));
    }
    obj["apiVersion"] = json!(def.api_version());
    obj["kind"] = json!(def.kind);
    let k = key(def, &namespace, &name);
    let old = store.get(&def.storage, &k).map(|o| def.view_form(&o));
    let meta = util::meta_mut(&mut obj);
    meta.remove("resourceVersion");
    if let Some(o) = &old {
        for f in ["uid", "creationTimestamp"] {
            if !meta.contains_key(f)
                && let Some(v) = o["metadata"].get(f)
            {
                meta.insert(f.into(), v.clone());
            }
        }
    } else {
        meta.entry("uid").or_insert_with(|| json!(util::new_uid()));
        meta.entry("creationTimestamp")
            .or_insert_with(|| json!(util::now_rfc3339()));
    }
    if def.tracks_generation() && !obj["metadata"].get("generation").is_some_and(Value::is_i64) {
        let g = match &old {
            None => 1,
            Some(o) => {
                let strip = |v: &Value| {
                    let mut m = v.as_object().cloned().unwrap_or_default();
                    m.remove("metadata");
                    m.remove("status");
                    m
                };
                let g = o["metadata"]["generation"].as_i64().unwrap_or(1);
                if strip(o) == strip(&obj) { g } else { g + 1 }
            }
        };
        util::meta_mut(&mut obj).insert("generation".into(), json!(g));
    }
    if def.builtin() == Some(Builtin::Namespace) {
        let mut none = || String::new();
        strategy::defaults(def, &mut obj, &mut none);
        if obj.get("status").is_none() {
            obj["status"] = json!({"phase": "Active"});
        }
    }
    let stored = store.commit(&def.storage, k.clone(), def.stored_form(obj));
    if def.builtin() == Some(Builtin::Crd) {
        establish(store, &k);
    }
    Ok(def.view_form(&stored))
}

/// Removes an object at once (no finalizers, no grace), with what its removal brings along
/// for namespaces and CRDs.
pub fn remove_raw(
    store: &mut Store,
    def: &ResourceDef,
    namespace: &str,
    name: &str,
) -> Result<Value, ApiError> {
    let k = key(def, namespace, name);
    finish_delete(store, def, &k)
        .map(|o| def.view_form(&o))
        .ok_or_else(|| ApiError::not_found(&def.gr(), name))
}

/// The objects of a storage in one namespace (or all), in storage form.
pub fn objects(store: &Store, storage: &GroupResource) -> BTreeMap<ObjKey, Arc<Value>> {
    store.all(storage)
}
