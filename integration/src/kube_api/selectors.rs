//! Label selectors (`labels.Parse` syntax: `a=b`, `a==b`, `a!=b`, `a in (x,y)`, `a notin (x)`,
//! `a`, `!a`, `a>1`, `a<2`) and field selectors (`a=b`, `a==b`, `a!=b`), as the API server
//! parses and applies them.

use std::collections::BTreeMap;

use serde_json::Value;

#[derive(Clone, Debug, PartialEq, Eq)]
enum Op {
    Eq(String),
    NotEq(String),
    In(Vec<String>),
    NotIn(Vec<String>),
    Exists,
    DoesNotExist,
    Gt(i64),
    Lt(i64),
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Requirement {
    key: String,
    op: Op,
}

/// A parsed label selector; the empty selector matches everything.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LabelSelector {
    requirements: Vec<Requirement>,
}

impl LabelSelector {
    pub fn parse(s: &str) -> Result<LabelSelector, String> {
        let mut p = Lexer::new(s);
        let mut requirements = Vec::new();
        loop {
            p.skip_ws();
            if p.at_end() {
                if !requirements.is_empty() && p.trailing_comma {
                    return Err(
                        "unable to parse requirement: found '', expected: identifier".to_string(),
                    );
                }
                break;
            }
            requirements.push(p.requirement()?);
            p.skip_ws();
            if p.at_end() {
                break;
            }
            if p.eat(',') {
                p.trailing_comma = true;
                continue;
            }
            return Err(format!(
                "found '{}', expected: ',' or 'end of string'",
                p.rest_token()
            ));
        }
        Ok(LabelSelector { requirements })
    }

    pub fn is_empty(&self) -> bool {
        self.requirements.is_empty()
    }

    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.requirements.iter().all(|r| {
            let v = labels.get(&r.key);
            match &r.op {
                Op::Eq(x) => v == Some(x),
                Op::NotEq(x) => v != Some(x),
                Op::In(xs) => v.is_some_and(|v| xs.contains(v)),
                Op::NotIn(xs) => v.is_none_or(|v| !xs.contains(v)),
                Op::Exists => v.is_some(),
                Op::DoesNotExist => v.is_none(),
                Op::Gt(n) => v
                    .and_then(|v| v.parse::<i64>().ok())
                    .is_some_and(|v| v > *n),
                Op::Lt(n) => v
                    .and_then(|v| v.parse::<i64>().ok())
                    .is_some_and(|v| v < *n),
            }
        })
    }

    /// Matches an object's `metadata.labels`.
    pub fn matches_object(&self, obj: &Value) -> bool {
        self.is_empty() || self.matches(&labels_of(obj))
    }
}

pub fn labels_of(obj: &Value) -> BTreeMap<String, String> {
    obj.get("metadata")
        .and_then(|m| m.get("labels"))
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or("").to_string()))
                .collect()
        })
        .unwrap_or_default()
}

struct Lexer<'a> {
    s: &'a str,
    pos: usize,
    trailing_comma: bool,
}

impl<'a> Lexer<'a> {
    fn new(s: &'a str) -> Lexer<'a> {
        Lexer {
            s,
            pos: 0,
            trailing_comma: false,
        }
    }

    fn rest(&self) -> &'a str {
        &self.s[self.pos..]
    }

    fn at_end(&self) -> bool {
        self.pos >= self.s.len()
    }

    fn skip_ws(&mut self) {
        let trimmed = self.rest().trim_start();
        self.pos = self.s.len() - trimmed.len();
    }

    fn eat(&mut self, c: char) -> bool {
        if self.rest().starts_with(c) {
            self.pos += c.len_utf8();
            true
        } else {
            false
        }
    }

    fn eat_str(&mut self, t: &str) -> bool {
        if self.rest().starts_with(t) {
            self.pos += t.len();
            true
        } else {
            false
        }
    }

    fn rest_token(&self) -> String {
        self.rest()
            .chars()
            .take_while(|c| !c.is_whitespace())
            .collect()
    }

    fn ident(&mut self) -> String {
        let rest = self.rest();
        let end = rest
            .find(|c: char| c.is_whitespace() || "=!(),<>".contains(c))
            .unwrap_or(rest.len());
        self.pos += end;
        rest[..end].to_string()
    }

    fn requirement(&mut self) -> Result<Requirement, String> {
        self.trailing_comma = false;
        if self.eat('!') {
            self.skip_ws();
            let key = self.ident();
            validate_key(&key)?;
            return Ok(Requirement {
                key,
                op: Op::DoesNotExist,
            });
        }
        let key = self.ident();
        if key.is_empty() {
            return Err(format!(
                "unable to parse requirement: found '{}', expected: identifier",
                self.rest_token()
            ));
        }
        validate_key(&key)?;
        self.skip_ws();
        let op = if self.at_end() || self.rest().starts_with(',') {
            Op::Exists
        } else if self.eat_str("==") || self.eat('=') {
            Op::Eq(self.value()?)
        } else if self.eat_str("!=") {
            Op::NotEq(self.value()?)
        } else if self.eat('>') {
            Op::Gt(self.number()?)
        } else if self.eat('<') {
            Op::Lt(self.number()?)
        } else if self.rest().starts_with("notin") {
            self.pos += "notin".len();
            Op::NotIn(self.set()?)
        } else if self.rest().starts_with("in") {
            self.pos += "in".len();
            Op::In(self.set()?)
        } else {
            return Err(format!(
                "unable to parse requirement: found '{}', expected: in, notin, =, ==, !=, gt, lt",
                self.rest_token()
            ));
        };
        Ok(Requirement { key, op })
    }

    fn value(&mut self) -> Result<String, String> {
        self.skip_ws();
        let v = self.ident();
        if self.rest().starts_with(['=', '!', '(', ')', '<', '>']) {
            return Err(format!(
                "unable to parse requirement: found '{}', expected: ',' or 'end of string'",
                self.rest_token()
            ));
        }
        validate_value(&v)?;
        Ok(v)
    }

    fn number(&mut self) -> Result<i64, String> {
        self.skip_ws();
        let v = self.ident();
        v.parse()
            .map_err(|_| format!("unable to parse requirement: for 'Gt', 'Lt' operators, the value must be an integer: {v:?}"))
    }

    fn set(&mut self) -> Result<Vec<String>, String> {
        self.skip_ws();
        if !self.eat('(') {
            return Err(format!(
                "unable to parse requirement: found '{}', expected: '('",
                self.rest_token()
            ));
        }
        let mut values = Vec::new();
        loop {
            self.skip_ws();
            let v = self.ident();
            validate_value(&v)?;
            values.push(v);
            self.skip_ws();
            if self.eat(')') {
                break;
            }
            if !self.eat(',') {
                return Err(format!(
                    "unable to parse requirement: found '{}', expected: ',', ')' or identifier",
                    self.rest_token()
                ));
            }
        }
        Ok(values)
    }
}

fn validate_key(key: &str) -> Result<(), String> {
    super::validation::label_key(key).map_err(|e| format!("unable to parse requirement: {e}"))
}

fn validate_value(v: &str) -> Result<(), String> {
    super::validation::label_value(v).map_err(|e| format!("unable to parse requirement: {e}"))
}

/// A parsed field selector: a conjunction of `field=value` / `field!=value` terms.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FieldSelector {
    terms: Vec<(String, bool, String)>,
}

impl FieldSelector {
    pub fn parse(s: &str) -> Result<FieldSelector, String> {
        let mut terms = Vec::new();
        for part in split_unescaped(s, ',') {
            let part = part.trim();
            if part.is_empty() {
                continue;
            }
            let (field, eq, value) = if let Some((f, v)) = part.split_once("!=") {
                (f, false, v)
            } else if let Some((f, v)) = part.split_once("==") {
                (f, true, v)
            } else if let Some((f, v)) = part.split_once('=') {
                (f, true, v)
            } else {
                return Err(format!(
                    "invalid selector: '{s}'; can't understand '{part}'"
                ));
            };
            terms.push((field.trim().to_string(), eq, unescape(value.trim())));
        }
        Ok(FieldSelector { terms })
    }

    pub fn is_empty(&self) -> bool {
        self.terms.is_empty()
    }

    /// The field names used, for the caller to check against the resource's supported ones.
    pub fn fields(&self) -> impl Iterator<Item = &str> {
        self.terms.iter().map(|(f, _, _)| f.as_str())
    }

    pub fn matches(&self, value_of: impl Fn(&str) -> String) -> bool {
        self.terms
            .iter()
            .all(|(f, eq, v)| (value_of(f) == *v) == *eq)
    }
}

fn split_unescaped(s: &str, sep: char) -> Vec<String> {
    let mut out = vec![String::new()];
    let mut escaped = false;
    for c in s.chars() {
        if escaped {
            out.last_mut().expect("one part").push('\\');
            out.last_mut().expect("one part").push(c);
            escaped = false;
        } else if c == '\\' {
            escaped = true;
        } else if c == sep {
            out.push(String::new());
        } else {
            out.last_mut().expect("one part").push(c);
        }
    }
    out
}

fn unescape(s: &str) -> String {
    let mut out = String::new();
    let mut escaped = false;
    for c in s.chars() {
        if escaped {
            out.push(c);
            escaped = false;
        } else if c == '\\' {
            escaped = true;
        } else {
            out.push(c);
        }
    }
    out
}

/// A field of an object as field selectors see it: strings as they are, booleans and numbers
/// printed, absent fields empty.
pub fn field_value(obj: &Value, path: &str) -> String {
    let mut cur = obj;
    for part in path.split('.') {
        match cur.get(part) {
            Some(v) => cur = v,
            None => return String::new(),
        }
    }
    match cur {
        Value::String(s) => s.clone(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        _ => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
            .collect()
    }

    #[test]
    fn label_selector_operators() {
        let l = labels(&[("app", "web"), ("tier", "front"), ("n", "5")]);
        for (sel, want) in [
            ("", true),
            ("app=web", true),
            ("app==web", true),
            ("app!=web", false),
            ("app in (web, db)", true),
            ("app notin (web)", false),
            ("tier,app=web", true),
            ("!tier", false),
            ("!missing", true),
            ("missing", false),
            ("n>4", true),
            ("n<5", false),
            ("missing!=x", true),
            ("missing notin (x)", true),
            ("app.kubernetes.io/name=x", false),
        ] {
            let s = LabelSelector::parse(sel).unwrap_or_else(|e| panic!("{sel}: {e}"));
            assert_eq!(s.matches(&l), want, "{sel}");
        }
    }

    #[test]
    fn bad_label_selectors_are_errors() {
        for sel in ["a=b=c", "a in b", "a in (b", "=b", "a=b,", "a=b c"] {
            assert!(LabelSelector::parse(sel).is_err(), "{sel}");
        }
    }

    #[test]
    fn field_selectors() {
        let pod = serde_json::json!({"metadata": {"name": "p", "namespace": "ns"}, "spec": {"nodeName": "n1", "hostNetwork": true}});
        let f = FieldSelector::parse("spec.nodeName=n1,metadata.namespace!=kube-system").unwrap();
        assert!(f.matches(|p| field_value(&pod, p)));
        let f = FieldSelector::parse("spec.nodeName==n2").unwrap();
        assert!(!f.matches(|p| field_value(&pod, p)));
        let f = FieldSelector::parse("spec.hostNetwork=true").unwrap();
        assert!(f.matches(|p| field_value(&pod, p)));
        assert!(FieldSelector::parse("nonsense").is_err());
    }
}
