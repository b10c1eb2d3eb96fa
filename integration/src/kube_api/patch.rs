//! The patch types the server accepts: JSON merge patch (RFC 7386), JSON patch (RFC 6902),
//! strategic merge patch (merge keys for the lists of the built-in types served here, the
//! `$patch`, `$setElementOrder` and `$deleteFromPrimitiveList` directives), and server-side
//! apply taken as a merge of the applied configuration.

use serde_json::{Map, Value};

/// RFC 7386: objects merge, `null` deletes, anything else replaces.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(p) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let t = target.as_object_mut().expect("made an object");
    for (k, v) in p {
        if v.is_null() {
            t.remove(k);
        } else {
            merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
        }
    }
}

/// Server-side apply, approximated: the applied configuration is merged into the live object
/// (objects deep-merged, lists and scalars replaced); `null` in applied configuration is
/// ignored rather than deleting.
pub fn apply(target: &mut Value, applied: &Value) {
    match (target.as_object_mut(), applied) {
        (Some(t), Value::Object(a)) => {
            for (k, v) in a {
                if v.is_null() {
                    continue;
                }
                match t.get_mut(k) {
                    Some(existing) if existing.is_object() && v.is_object() => apply(existing, v),
                    _ => {
                        t.insert(k.clone(), v.clone());
                    }
                }
            }
        }
        _ => *target = applied.clone(),
    }
}

/// Why a JSON patch failed: decoding (400) or applying (422).
#[derive(Debug)]
pub enum JsonPatchError {
    Decode(String),
    Apply(String),
}

fn unescape_token(t: &str) -> String {
    t.replace("~1", "/").replace("~0", "~")
}

fn tokens(pointer: &str) -> Result<Vec<String>, JsonPatchError> {
    if pointer.is_empty() {
        return Ok(Vec::new());
    }
    let Some(rest) = pointer.strip_prefix('/') else {
        return Err(JsonPatchError::Apply(format!(
            "JSON pointer {pointer:?} must start with '/'"
        )));
    };
    Ok(rest.split('/').map(unescape_token).collect())
}

fn get_mut<'a>(root: &'a mut Value, toks: &[String]) -> Option<&'a mut Value> {
    let mut cur = root;
    for t in toks {
        cur = match cur {
            Value::Object(m) => m.get_mut(t)?,
            Value::Array(a) => a.get_mut(t.parse::<usize>().ok()?)?,
            _ => return None,
        };
    }
    Some(cur)
}

fn remove_at(root: &mut Value, path: &str) -> Result<Value, JsonPatchError> {
    let toks = tokens(path)?;
    let (last, parent) = toks
        .split_last()
        .ok_or_else(|| JsonPatchError::Apply("cannot remove the whole document".to_string()))?;
    let missing = || {
        JsonPatchError::Apply(format!(
            "remove operation does not apply: doc is missing path: {path:?}"
        ))
    };
    match get_mut(root, parent).ok_or_else(missing)? {
        Value::Object(m) => m.remove(last).ok_or_else(missing),
        Value::Array(a) => {
            let i = last.parse::<usize>().map_err(|_| missing())?;
            if i < a.len() {
                Ok(a.remove(i))
            } else {
                Err(missing())
            }
        }
        _ => Err(missing()),
    }
}

fn add_at(root: &mut Value, path: &str, value: Value, replace: bool) -> Result<(), JsonPatchError> {
    let toks = tokens(path)?;
    let op = if replace { "replace" } else { "add" };
    let Some((last, parent)) = toks.split_last() else {
        *root = value;
        return Ok(());
    };
    let missing = || {
        JsonPatchError::Apply(format!(
            "{op} operation does not apply: doc is missing path: {path:?}"
        ))
    };
    match get_mut(root, parent).ok_or_else(missing)? {
        Value::Object(m) => {
            if replace && !m.contains_key(last) {
                return Err(missing());
            }
            m.insert(last.clone(), value);
            Ok(())
        }
        Value::Array(a) => {
            if last == "-" && !replace {
                a.push(value);
                return Ok(());
            }
            let i = last.parse::<usize>().map_err(|_| missing())?;
            if replace {
                *a.get_mut(i).ok_or_else(missing)? = value;
            } else if i <= a.len() {
                a.insert(i, value);
            } else {
                return Err(missing());
            }
            Ok(())
        }
        _ => Err(missing()),
    }
}

/// RFC 6902.
pub fn json_patch(target: &mut Value, patch: &Value) -> Result<(), JsonPatchError> {
    let ops = patch.as_array().ok_or_else(|| {
        JsonPatchError::Decode(
            "json: cannot unmarshal object into Go value of type jsonpatch.Patch".to_string(),
        )
    })?;
    let mut doc = target.clone();
    for op in ops {
        let name = op.get("op").and_then(Value::as_str).unwrap_or("");
        let path = op
            .get("path")
            .and_then(Value::as_str)
            .ok_or_else(|| JsonPatchError::Apply(format!("{name} operation missing path")))?;
        let value = || {
            op.get("value")
                .cloned()
                .ok_or_else(|| JsonPatchError::Apply(format!("{name} operation missing value")))
        };
        let from = || {
            op.get("from")
                .and_then(Value::as_str)
                .ok_or_else(|| JsonPatchError::Apply(format!("{name} operation missing from")))
        };
        match name {
            "add" => add_at(&mut doc, path, value()?, false)?,
            "replace" => add_at(&mut doc, path, value()?, true)?,
            "remove" => {
                remove_at(&mut doc, path)?;
            }
            "move" => {
                let v = remove_at(&mut doc, from()?)?;
                add_at(&mut doc, path, v, false)?;
            }
            "copy" => {
                let toks = tokens(from()?)?;
                let v = get_mut(&mut doc, &toks)
                    .ok_or_else(|| {
                        JsonPatchError::Apply(format!(
                            "copy operation does not apply: doc is missing from path: {:?}",
                            from().unwrap_or("")
                        ))
                    })?
                    .clone();
                add_at(&mut doc, path, v, false)?;
            }
            "test" => {
                let toks = tokens(path)?;
                let want = value()?;
                if get_mut(&mut doc, &toks).map(|v| &*v) != Some(&want) {
                    return Err(JsonPatchError::Apply(format!(
                        "testing value {path} failed: test failed"
                    )));
                }
            }
            other => {
                return Err(JsonPatchError::Apply(format!("Unexpected kind: {other}")));
            }
        }
    }
    *target = doc;
    Ok(())
}

/// The merge key of a list at a path of a built-in type (field names joined by `.`, list
/// items not named), as the types' `patchMergeKey` tags say; `None` means the list is
/// replaced.
fn merge_key(path: &str) -> Option<&'static str> {
    let last = path.rsplit('.').next().unwrap_or(path);
    Some(match last {
        "containers"
        | "initContainers"
        | "ephemeralContainers"
        | "volumes"
        | "env"
        | "imagePullSecrets"
        | "readinessGates"
        | "secrets" => "name",
        "volumeMounts" => "mountPath",
        "volumeDevices" => "devicePath",
        "ports" if path.contains("containers") || path.ends_with("Containers.ports") => {
            "containerPort"
        }
        "ports" if path.starts_with("spec.ports") || path == "spec.ports" => "port",
        "conditions" => "type",
        "ownerReferences" => "uid",
        "podIPs" | "hostIPs" => "ip",
        "addresses" if path.starts_with("status") => "type",
        "taints" => "key",
        _ => return None,
    })
}

/// Lists merged as sets of primitives.
fn primitive_set(path: &str) -> bool {
    path == "metadata.finalizers"
}

/// Strategic merge patch for the built-in types: lists with a merge key merge item by
/// item, `$patch: delete|replace` directives apply, `$setElementOrder/...` and
/// `$retainKeys` are honoured as ordering/retention hints.
pub fn strategic_merge(target: &mut Value, patch: &Value) -> Result<(), String> {
    smp(target, patch, "")
}

fn smp(target: &mut Value, patch: &Value, path: &str) -> Result<(), String> {
    let Value::Object(p) = patch else {
        *target = patch.clone();
        return Ok(());
    };
    match p.get("$patch").and_then(Value::as_str) {
        Some("replace") => {
            let mut clean = p.clone();
            clean.remove("$patch");
            *target = Value::Object(clean);
            return Ok(());
        }
        Some("delete") => {
            *target = Value::Null;
            return Ok(());
        }
        Some(other) => return Err(format!("Unknown patch type: {other}")),
        None => {}
    }
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let retain: Option<Vec<String>> = p.get("$retainKeys").and_then(Value::as_array).map(|a| {
        a.iter()
            .filter_map(|x| x.as_str().map(str::to_string))
            .collect()
    });
    let t = target.as_object_mut().expect("made an object");
    if let Some(keep) = &retain {
        t.retain(|k, _| keep.contains(k) || p.contains_key(k));
    }
    for (k, v) in p {
        if k.starts_with('$') {
            if let Some(field) = k.strip_prefix("$deleteFromPrimitiveList/")
                && let (Some(Value::Array(list)), Some(del)) = (t.get_mut(field), v.as_array())
            {
                list.retain(|x| !del.contains(x));
            }
            continue;
        }
        let child = if path.is_empty() {
            k.clone()
        } else {
            format!("{path}.{k}")
        };
        if v.is_null() {
            t.remove(k);
            continue;
        }
        match (t.get_mut(k), v) {
            (Some(Value::Array(cur)), Value::Array(items)) => {
                if let Some(key) = merge_key(&child) {
                    merge_list(cur, items, key, &child)?;
                    if let Some(order) = p
                        .get(&format!("$setElementOrder/{k}"))
                        .and_then(Value::as_array)
                    {
                        reorder(cur, order, key);
                    }
                } else if primitive_set(&child) {
                    for i in items {
                        if !cur.contains(i) {
                            cur.push(i.clone());
                        }
                    }
                } else {
                    cur.clone_from(items);
                }
            }
            (Some(existing), Value::Object(_)) if existing.is_object() => {
                smp(existing, v, &child)?;
                if existing.is_null() {
                    t.remove(k);
                }
            }
            _ => {
                let mut fresh = Value::Null;
                smp(&mut fresh, v, &child)?;
                strip_directives(&mut fresh);
                t.insert(k.clone(), fresh);
            }
        }
    }
    Ok(())
}

fn merge_list(cur: &mut Vec<Value>, items: &[Value], key: &str, path: &str) -> Result<(), String> {
    for item in items {
        let Some(k) = item.get(key) else {
            if item.get("$patch").and_then(Value::as_str) == Some("replace") {
                cur.clear();
                continue;
            }
            return Err(format!(
                "map: {item} does not contain declared merge key: {key}"
            ));
        };
        let pos = cur.iter().position(|c| c.get(key) == Some(k));
        let delete = item.get("$patch").and_then(Value::as_str) == Some("delete");
        match (pos, delete) {
            (Some(i), true) => {
                cur.remove(i);
            }
            (None, true) => {}
            (Some(i), false) => smp(&mut cur[i], item, path)?,
            (None, false) => {
                let mut fresh = item.clone();
                strip_directives(&mut fresh);
                cur.push(fresh);
            }
        }
    }
    Ok(())
}

fn reorder(cur: &mut [Value], order: &[Value], key: &str) {
    let pos = |v: &Value| {
        v.get(key)
            .and_then(|k| order.iter().position(|o| o.get(key) == Some(k)))
            .unwrap_or(usize::MAX)
    };
    cur.sort_by_key(pos);
}

fn strip_directives(v: &mut Value) {
    match v {
        Value::Object(m) => {
            m.retain(|k, _| !k.starts_with('$'));
            m.values_mut().for_each(strip_directives);
        }
        Value::Array(a) => a.iter_mut().for_each(strip_directives),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn merge_patch_deletes_with_null() {
        let mut t = json!({"a": {"b": 1, "c": 2}, "l": [1, 2]});
        merge_patch(&mut t, &json!({"a": {"b": null, "d": 3}, "l": [3]}));
        assert_eq!(t, json!({"a": {"c": 2, "d": 3}, "l": [3]}));
    }

    #[test]
    fn json_patch_ops() {
        let mut t = json!({"metadata": {"labels": {"a": "1"}}, "l": [1, 2]});
        json_patch(
            &mut t,
            &json!([
                {"op": "add", "path": "/metadata/labels/b~1c", "value": "2"},
                {"op": "replace", "path": "/l/0", "value": 9},
                {"op": "add", "path": "/l/-", "value": 3},
                {"op": "remove", "path": "/metadata/labels/a"},
                {"op": "test", "path": "/l/1", "value": 2},
                {"op": "copy", "from": "/l/0", "path": "/x"},
                {"op": "move", "from": "/x", "path": "/y"}
            ]),
        )
        .unwrap();
        assert_eq!(
            t,
            json!({"metadata": {"labels": {"b/c": "2"}}, "l": [9, 2, 3], "y": 9})
        );
        let before = t.clone();
        let err = json_patch(&mut t, &json!([{"op": "remove", "path": "/nope"}])).unwrap_err();
        assert!(matches!(err, JsonPatchError::Apply(_)));
        assert_eq!(t, before, "a failed patch changes nothing");
        assert!(matches!(
            json_patch(&mut t, &json!({})),
            Err(JsonPatchError::Decode(_))
        ));
    }

    #[test]
    fn strategic_merge_merges_containers_by_name() {
        let mut t = json!({"spec": {"containers": [
            {"name": "a", "image": "x"}, {"name": "b", "image": "y"}
        ], "tolerations": [{"key": "k"}]}, "metadata": {"finalizers": ["f1"]}});
        strategic_merge(
            &mut t,
            &json!({
                "spec": {"$setElementOrder/containers": [{"name": "b"}, {"name": "a"}, {"name": "c"}],
                "containers": [
                    {"name": "a", "image": "x2"},
                    {"name": "c", "image": "z"},
                    {"name": "b", "$patch": "delete"}
                ], "tolerations": [{"key": "j"}]},
                "metadata": {"finalizers": ["f2"]}
            }),
        )
        .unwrap();
        assert_eq!(
            t["spec"]["containers"],
            json!([{"name": "a", "image": "x2"}, {"name": "c", "image": "z"}])
        );
        assert_eq!(t["spec"]["tolerations"], json!([{"key": "j"}]));
        assert_eq!(t["metadata"]["finalizers"], json!(["f1", "f2"]));
    }

    #[test]
    fn apply_merges_and_replaces_lists() {
        let mut t = json!({"status": {"conditions": [{"type": "A"}], "x": 1}, "spec": {"a": 1}});
        apply(&mut t, &json!({"status": {"conditions": [{"type": "B"}]}}));
        assert_eq!(
            t,
            json!({"status": {"conditions": [{"type": "B"}], "x": 1}, "spec": {"a": 1}})
        );
    }
}
