//! Structural-schema handling of custom resources, as apiextensions-apiserver does it on
//! every write: defaults applied, unknown fields pruned (reported, so that
//! `fieldValidation=Strict` can refuse them), `null` dropped where not nullable, then
//! validation of type, required, enum, bounds, lengths, item counts and patterns. Not done:
//! `format`, `oneOf`/`anyOf`/`allOf`/`not`, and CEL rules (`x-kubernetes-validations`).

use serde_json::{Map, Value};

use super::status::FieldError;

/// The outcome of one pass over an object.
#[derive(Debug, Default)]
pub struct Checked {
    /// Paths of fields pruned because the schema does not know them (`spec.foo`).
    pub unknown: Vec<String>,
    pub errors: Vec<FieldError>,
}

/// Defaults, prunes and validates a whole custom resource against its version's
/// `openAPIV3Schema`. `apiVersion`, `kind` and `metadata` are the server's to check.
pub fn check(schema: &Value, obj: &mut Value) -> Checked {
    let mut out = Checked::default();
    let Some(map) = obj.as_object_mut() else {
        return out;
    };
    let props = schema.get("properties").and_then(Value::as_object);
    let preserve = preserves(schema);
    apply_defaults(schema, map);
    let keys: Vec<String> = map.keys().cloned().collect();
    for k in keys {
        if matches!(k.as_str(), "apiVersion" | "kind" | "metadata") {
            continue;
        }
        match props.and_then(|p| p.get(&k)) {
            Some(sub) => {
                let mut v = map.remove(&k).expect("key listed");
                if v.is_null() && !nullable(sub) {
                    continue;
                }
                walk(sub, &mut v, &k, &mut out);
                map.insert(k, v);
            }
            None if preserve => {}
            None => {
                map.remove(&k);
                out.unknown.push(k);
            }
        }
    }
    required(schema, map, "", &mut out);
    out
}

fn preserves(schema: &Value) -> bool {
    schema
        .get("x-kubernetes-preserve-unknown-fields")
        .and_then(Value::as_bool)
        == Some(true)
}

fn nullable(schema: &Value) -> bool {
    schema.get("nullable").and_then(Value::as_bool) == Some(true)
}

fn apply_defaults(schema: &Value, map: &mut Map<String, Value>) {
    if let Some(props) = schema.get("properties").and_then(Value::as_object) {
        for (k, sub) in props {
            if !map.contains_key(k)
                && let Some(d) = sub.get("default")
            {
                map.insert(k.clone(), d.clone());
            }
        }
    }
}

fn required(schema: &Value, map: &Map<String, Value>, path: &str, out: &mut Checked) {
    if let Some(req) = schema.get("required").and_then(Value::as_array) {
        for r in req.iter().filter_map(Value::as_str) {
            if !map.contains_key(r) {
                out.errors.push(FieldError::required(&join(path, r), ""));
            }
        }
    }
}

fn join(path: &str, k: &str) -> String {
    if path.is_empty() {
        k.to_string()
    } else {
        format!("{path}.{k}")
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn walk(schema: &Value, v: &mut Value, path: &str, out: &mut Checked) {
    let int_or_string = schema
        .get("x-kubernetes-int-or-string")
        .and_then(Value::as_bool)
        == Some(true);
    let want = schema.get("type").and_then(Value::as_str).unwrap_or("");
    let got = type_name(v);
    if int_or_string {
        if got != "integer" && got != "string" {
            out.errors.push(FieldError::type_invalid(
                path,
                &Value::String(got.to_string()),
                &format!("{path} in body must be of type integer,string: {got:?}"),
            ));
            return;
        }
    } else if !want.is_empty() && want != got && !(want == "number" && got == "integer") {
        out.errors.push(FieldError::type_invalid(
            path,
            &Value::String(got.to_string()),
            &format!("{path} in body must be of type {want}: {got:?}"),
        ));
        return;
    }
    match v {
        Value::Object(map) => walk_object(schema, map, path, out),
        Value::Array(items) => {
            bounds_count(schema, items.len(), path, "items", out);
            if let Some(item_schema) = schema.get("items") {
                for (i, item) in items.iter_mut().enumerate() {
                    walk(item_schema, item, &format!("{path}[{i}]"), out);
                }
            }
        }
        Value::String(s) => {
            let len = s.chars().count();
            if let Some(min) = schema.get("minLength").and_then(Value::as_u64)
                && (len as u64) < min
            {
                out.errors.push(FieldError::invalid(
                    path,
                    v,
                    &format!("{path} in body should be at least {min} chars long"),
                ));
                return;
            }
            if let Some(max) = schema.get("maxLength").and_then(Value::as_u64)
                && len as u64 > max
            {
                out.errors.push(FieldError::invalid(
                    path,
                    v,
                    &format!("{path} in body may not be longer than {max}"),
                ));
                return;
            }
            if let Some(p) = schema.get("pattern").and_then(Value::as_str)
                && let Ok(re) = regex::Regex::new(p)
                && !re.is_match(s)
            {
                out.errors.push(FieldError::invalid(
                    path,
                    v,
                    &format!("{path} in body should match '{p}'"),
                ));
            }
        }
        Value::Number(n) => {
            let x = n.as_f64().unwrap_or(0.0);
            if let Some(min) = schema.get("minimum").and_then(Value::as_f64)
                && x < min
            {
                out.errors.push(FieldError::invalid(
                    path,
                    v,
                    &format!(
                        "{path} in body should be greater than or equal to {}",
                        num(min)
                    ),
                ));
            }
            if let Some(max) = schema.get("maximum").and_then(Value::as_f64)
                && x > max
            {
                out.errors.push(FieldError::invalid(
                    path,
                    v,
                    &format!(
                        "{path} in body should be less than or equal to {}",
                        num(max)
                    ),
                ));
            }
        }
        _ => {}
    }
    if let Some(allowed) = schema.get("enum").and_then(Value::as_array)
        && !allowed.contains(v)
    {
        let names: Vec<String> = allowed
            .iter()
            .map(|a| a.as_str().map_or_else(|| a.to_string(), str::to_string))
            .collect();
        out.errors.push(FieldError::not_supported(path, v, &names));
    }
}

fn num(x: f64) -> String {
    if x.fract() == 0.0 && x.abs() < 1e15 {
        format!("{x:.0}")
    } else {
        x.to_string()
    }
}

fn bounds_count(schema: &Value, n: usize, path: &str, what: &str, out: &mut Checked) {
    let (lo, hi) = if what == "items" {
        ("minItems", "maxItems")
    } else {
        ("minProperties", "maxProperties")
    };
    if let Some(min) = schema.get(lo).and_then(Value::as_u64)
        && (n as u64) < min
    {
        out.errors.push(FieldError::invalid(
            path,
            &Value::from(n),
            &format!("{path} in body should have at least {min} {what}"),
        ));
    }
    if let Some(max) = schema.get(hi).and_then(Value::as_u64)
        && n as u64 > max
    {
        out.errors.push(FieldError::invalid(
            path,
            &Value::from(n),
            &format!("{path} in body should have at most {max} {what}"),
        ));
    }
}

fn walk_object(schema: &Value, map: &mut Map<String, Value>, path: &str, out: &mut Checked) {
    let embedded = schema
        .get("x-kubernetes-embedded-resource")
        .and_then(Value::as_bool)
        == Some(true);
    let props = schema.get("properties").and_then(Value::as_object);
    let additional = schema.get("additionalProperties");
    let preserve = preserves(schema) || additional.and_then(Value::as_bool) == Some(true);
    apply_defaults(schema, map);
    let keys: Vec<String> = map.keys().cloned().collect();
    for k in keys {
        if embedded && matches!(k.as_str(), "apiVersion" | "kind" | "metadata") {
            continue;
        }
        let child = join(path, &k);
        let sub = props
            .and_then(|p| p.get(&k))
            .or_else(|| additional.filter(|a| a.is_object()));
        match sub {
            Some(sub) => {
                let mut v = map.remove(&k).expect("key listed");
                if v.is_null() && !nullable(sub) {
                    continue;
                }
                walk(sub, &mut v, &child, out);
                map.insert(k, v);
            }
            None if preserve
                || props.is_none()
                    && additional.is_none()
                    && schema.get("type").and_then(Value::as_str) != Some("object") => {}
            None => {
                map.remove(&k);
                out.unknown.push(child);
            }
        }
    }
    bounds_count(schema, map.len(), path, "properties", out);
    required(schema, map, path, out);
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn schema() -> Value {
        json!({"type": "object", "properties": {
            "spec": {"type": "object", "required": ["color"], "properties": {
                "color": {"type": "string", "enum": ["red", "blue"]},
                "size": {"type": "integer", "minimum": 1, "default": 3},
                "tags": {"type": "array", "maxItems": 2, "items": {"type": "string", "pattern": "^[a-z]+$"}},
                "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": true},
                "port": {"x-kubernetes-int-or-string": true}
            }},
            "status": {"type": "object", "properties": {"ok": {"type": "boolean"}}}
        }})
    }

    #[test]
    fn prunes_defaults_and_validates() {
        let mut obj = json!({"apiVersion": "x/v1", "kind": "W", "metadata": {"name": "w"},
            "spec": {"color": "red", "extra": 1, "labels": {"a": "b"}, "free": {"any": [1]}, "port": "http", "tags": null},
            "bogus": true});
        let c = check(&schema(), &mut obj);
        assert!(c.errors.is_empty(), "{:?}", c.errors);
        assert_eq!(
            c.unknown,
            vec!["bogus".to_string(), "spec.extra".to_string()]
        );
        assert_eq!(obj["spec"]["size"], 3);
        assert!(obj["spec"].get("tags").is_none(), "null dropped");
        assert_eq!(obj["spec"]["free"]["any"], json!([1]));

        let mut bad =
            json!({"spec": {"color": "green", "size": 0, "tags": ["A", "b", "c"], "port": true}});
        let c = check(&schema(), &mut bad);
        let msgs: Vec<String> = c
            .errors
            .iter()
            .map(|e| format!("{}: {}", e.field, e.message))
            .collect();
        assert!(
            msgs.contains(
                &"spec.color: Unsupported value: \"green\": supported values: \"red\", \"blue\""
                    .to_string()
            ),
            "{msgs:?}"
        );
        assert!(msgs.contains(&"spec.size: Invalid value: 0: spec.size in body should be greater than or equal to 1".to_string()), "{msgs:?}");
        assert!(
            msgs.iter().any(|m| m.starts_with(
                "spec.tags: Invalid value: 3: spec.tags in body should have at most 2 items"
            )),
            "{msgs:?}"
        );
        assert!(
            msgs.iter()
                .any(|m| m.starts_with("spec.tags[0]: Invalid value: \"A\"")),
            "{msgs:?}"
        );
        assert!(
            msgs.iter()
                .any(|m| m.starts_with("spec.port: Invalid value: \"boolean\"")),
            "{msgs:?}"
        );

        let mut missing = json!({"spec": {}});
        let c = check(&schema(), &mut missing);
        assert_eq!(c.errors[0].field, "spec.color");
        assert_eq!(c.errors[0].message, "Required value");
    }
}
