//! The part of Kubernetes JSONPath that printer columns and selectable fields use:
//! `.a.b`, `.a[0]`, `.a[-1]`, `.a[*].b`, `.a['b.c']`, `.a[?(@.type=="Ready")].status`
//! (filters compare a field with a string or number by `==` or `!=`), with an optional `$`
//! or `{...}` around it.

use serde_json::Value;

#[derive(Clone, Debug, PartialEq)]
enum Step {
    Field(String),
    Index(i64),
    All,
    Filter {
        path: Vec<String>,
        equal: bool,
        value: Value,
    },
}

/// A compiled path.
#[derive(Clone, Debug, PartialEq)]
pub struct JsonPath {
    steps: Vec<Step>,
}

impl JsonPath {
    pub fn parse(src: &str) -> Result<JsonPath, String> {
        let mut s = src.trim();
        if let Some(inner) = s.strip_prefix('{').and_then(|r| r.strip_suffix('}')) {
            s = inner.trim();
        }
        s = s.strip_prefix('$').unwrap_or(s);
        let b = s.as_bytes();
        let mut i = 0;
        let mut steps = Vec::new();
        while i < b.len() {
            match b[i] {
                b'.' => {
                    i += 1;
                    let start = i;
                    while i < b.len() && b[i] != b'.' && b[i] != b'[' {
                        if b[i] == b'\\' {
                            i += 1;
                        }
                        i += 1;
                    }
                    let name = s[start..i.min(b.len())].replace("\\.", ".");
                    if name.is_empty() {
                        if i >= b.len() && steps.is_empty() {
                            break; // "." alone is the whole object
                        }
                        return Err(format!("invalid JSONPath {src:?}: empty field name"));
                    }
                    steps.push(Step::Field(name));
                }
                b'[' => {
                    let end = matching_bracket(s, i)
                        .ok_or_else(|| format!("invalid JSONPath {src:?}: unclosed '['"))?;
                    let inner = s[i + 1..end].trim();
                    steps.push(
                        parse_bracket(inner)
                            .map_err(|e| format!("invalid JSONPath {src:?}: {e}"))?,
                    );
                    i = end + 1;
                }
                _ => {
                    return Err(format!(
                        "invalid JSONPath {src:?}: unexpected {:?} at {i}",
                        char::from(b[i])
                    ));
                }
            }
        }
        Ok(JsonPath { steps })
    }

    /// Every value the path reaches, in document order.
    pub fn find<'a>(&self, root: &'a Value) -> Vec<&'a Value> {
        let mut cur = vec![root];
        for step in &self.steps {
            let mut next = Vec::new();
            for v in cur {
                match step {
                    Step::Field(name) => {
                        if let Some(x) = v.get(name) {
                            next.push(x);
                        }
                    }
                    Step::Index(n) => {
                        if let Some(arr) = v.as_array() {
                            let idx = if *n < 0 {
                                i64::try_from(arr.len()).unwrap_or(0) + n
                            } else {
                                *n
                            };
                            if let Some(x) = usize::try_from(idx).ok().and_then(|i| arr.get(i)) {
                                next.push(x);
                            }
                        }
                    }
                    Step::All => match v {
                        Value::Array(arr) => next.extend(arr.iter()),
                        Value::Object(map) => next.extend(map.values()),
                        _ => {}
                    },
                    Step::Filter { path, equal, value } => {
                        if let Some(arr) = v.as_array() {
                            next.extend(arr.iter().filter(|item| {
                                let mut x = Some(*item);
                                for p in path {
                                    x = x.and_then(|x| x.get(p));
                                }
                                x.is_some_and(|x| (x == value) == *equal)
                            }));
                        }
                    }
                }
            }
            cur = next;
        }
        cur
    }
}

fn matching_bracket(s: &str, open: usize) -> Option<usize> {
    let mut depth = 0;
    let mut quote: Option<char> = None;
    for (i, c) in s[open..].char_indices() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), _) => {}
            (None, '\'' | '"') => quote = Some(c),
            (None, '[') => depth += 1,
            (None, ']') => {
                depth -= 1;
                if depth == 0 {
                    return Some(open + i);
                }
            }
            _ => {}
        }
    }
    None
}

fn unquote(s: &str) -> Option<String> {
    let s = s.trim();
    for q in ['\'', '"'] {
        if let Some(inner) = s.strip_prefix(q).and_then(|r| r.strip_suffix(q)) {
            return Some(inner.to_string());
        }
    }
    None
}

fn parse_bracket(inner: &str) -> Result<Step, String> {
    if inner == "*" {
        return Ok(Step::All);
    }
    if let Some(name) = unquote(inner) {
        return Ok(Step::Field(name));
    }
    if let Some(filter) = inner.strip_prefix("?(").and_then(|r| r.strip_suffix(')')) {
        let (lhs, equal, rhs) = if let Some((l, r)) = filter.split_once("==") {
            (l, true, r)
        } else if let Some((l, r)) = filter.split_once("!=") {
            (l, false, r)
        } else {
            return Err(format!("unsupported filter {filter:?}"));
        };
        let lhs = lhs.trim();
        let path = lhs
            .strip_prefix("@.")
            .ok_or_else(|| format!("filter must start with '@.': {lhs:?}"))?
            .split('.')
            .map(str::to_string)
            .collect();
        let value = match unquote(rhs) {
            Some(s) => Value::String(s),
            None => serde_json::from_str(rhs.trim())
                .map_err(|_| format!("unsupported filter value {:?}", rhs.trim()))?,
        };
        return Ok(Step::Filter { path, equal, value });
    }
    inner
        .parse::<i64>()
        .map(Step::Index)
        .map_err(|_| format!("unsupported subscript [{inner}]"))
}

/// A value as JSONPath's text output prints it: strings bare, everything else as Go's `fmt`
/// prints decoded JSON (`map[a:b]`, `[x y]`, `true`, `3`).
pub fn print(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "<nil>".to_string(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::Array(a) => format!("[{}]", a.iter().map(print).collect::<Vec<_>>().join(" ")),
        Value::Object(m) => {
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort();
            format!(
                "map[{}]",
                keys.iter()
                    .map(|k| format!("{k}:{}", print(&m[*k])))
                    .collect::<Vec<_>>()
                    .join(" ")
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn printer_column_paths() {
        let obj = json!({
            "metadata": {"name": "p", "labels": {"app.kubernetes.io/name": "x"}},
            "spec": {"ports": [{"port": 80}, {"port": 443}]},
            "status": {"conditions": [
                {"type": "Valid", "status": "True"},
                {"type": "Ready", "status": "False"}
            ]}
        });
        let get = |p: &str| -> Vec<Value> {
            JsonPath::parse(p)
                .unwrap()
                .find(&obj)
                .into_iter()
                .cloned()
                .collect()
        };
        assert_eq!(get(".metadata.name"), vec![json!("p")]);
        assert_eq!(get("{.metadata.name}"), vec![json!("p")]);
        assert_eq!(
            get(r#".status.conditions[?(@.type=="Valid")].status"#),
            vec![json!("True")]
        );
        assert_eq!(
            get(".status.conditions[?(@.type!='Valid')].type"),
            vec![json!("Ready")]
        );
        assert_eq!(get(".spec.ports[*].port"), vec![json!(80), json!(443)]);
        assert_eq!(get(".spec.ports[-1].port"), vec![json!(443)]);
        assert_eq!(
            get(".metadata.labels['app.kubernetes.io/name']"),
            vec![json!("x")]
        );
        assert_eq!(
            get(r".metadata.labels.app\.kubernetes\.io/name"),
            vec![json!("x")]
        );
        assert!(get(".status.missing").is_empty());
        assert!(JsonPath::parse(".a[").is_err());
        assert_eq!(
            print(&json!({"b": 1, "a": [true, "x"]})),
            "map[a:[true x] b:1]"
        );
    }
}
