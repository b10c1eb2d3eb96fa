//! Cilium's `rules.http` entries.

use serde::Deserialize;
use serde::de::IgnoredAny;

use super::error::{FieldPath, Invalid, Problem};
use crate::model::{HeaderMatch, HttpRule};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct HttpRuleDoc {
    method: Option<String>,
    path: Option<String>,
    host: Option<String>,
    headers: Option<Vec<String>>,
    header_matches: Option<Vec<HeaderMatchDoc>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct HeaderMatchDoc {
    name: String,
    value: Option<String>,
    mismatch: Option<IgnoredAny>,
    secret: Option<IgnoredAny>,
}

pub(crate) fn http_rule(doc: &HttpRuleDoc, path: &FieldPath) -> Result<HttpRule, Invalid> {
    let regex_field =
        |field: &'static str, value: &Option<String>| -> Result<Option<String>, Invalid> {
            match value {
                Some(re) => {
                    validate_regex(field, re).map_err(|p| path.key(field).invalid(p))?;
                    Ok(Some(re.clone()))
                }
                None => Ok(None),
            }
        };
    let mut headers = Vec::new();
    let headers_path = path.key("headers");
    for (i, text) in doc.headers.iter().flatten().enumerate() {
        headers.push(header(text).map_err(|p| headers_path.index(i).invalid(p))?);
    }
    let matches_path = path.key("headerMatches");
    for (i, m) in doc.header_matches.iter().flatten().enumerate() {
        headers.push(header_match(m, &matches_path.index(i))?);
    }
    Ok(HttpRule {
        method: regex_field("method", &doc.method)?,
        path: regex_field("path", &doc.path)?,
        host: regex_field("host", &doc.host)?,
        headers,
    })
}

/// The matcher anchors these expressions, so they are checked the way it will compile them.
fn validate_regex(field: &'static str, re: &str) -> Result<(), Problem> {
    regex::Regex::new(&format!("^(?:{re})$"))
        .map(drop)
        .map_err(|e| Problem::InvalidRegex {
            field,
            value: re.to_string(),
            why: regex_reason(&e),
        })
}

/// regex's syntax errors draw the pattern with a caret over several lines; the last line says
/// what is wrong.
fn regex_reason(err: &regex::Error) -> String {
    let text = err.to_string();
    text.lines()
        .rev()
        .find_map(|l| l.trim().strip_prefix("error:"))
        .map(|l| l.trim().to_string())
        .unwrap_or(text)
}

/// `Name` (must be present) or `Name: value` (must equal).
fn header(text: &str) -> Result<HeaderMatch, Problem> {
    let (name, value) = match text.split_once(':') {
        Some((name, value)) => (name.trim(), Some(value.trim())),
        None => (text.trim(), None),
    };
    validate_header_name(name).map_err(|why| Problem::InvalidHeader {
        value: text.to_string(),
        why,
    })?;
    Ok(HeaderMatch {
        name: name.to_string(),
        value: value.map(str::to_string),
    })
}

fn header_match(doc: &HeaderMatchDoc, path: &FieldPath) -> Result<HeaderMatch, Invalid> {
    if doc.mismatch.is_some() {
        return Err(path
            .key("mismatch")
            .invalid(Problem::Unsupported("mismatch")));
    }
    if doc.secret.is_some() {
        return Err(path.key("secret").invalid(Problem::Unsupported("secret")));
    }
    validate_header_name(&doc.name).map_err(|why| {
        path.key("name").invalid(Problem::InvalidHeader {
            value: doc.name.clone(),
            why,
        })
    })?;
    Ok(HeaderMatch {
        name: doc.name.clone(),
        value: doc.value.clone(),
    })
}

/// An HTTP field name is an RFC 9110 token.
fn validate_header_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("the header name is empty");
    }
    let tchar = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
    if !name.bytes().all(tchar) {
        return Err("a header name may contain only letters, digits and !#$%&'*+-.^_`|~");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(yaml: &str) -> Result<HttpRule, Invalid> {
        let doc: HttpRuleDoc = serde_norway::from_str(yaml).expect("test YAML");
        http_rule(&doc, &FieldPath::root().key("http").index(0))
    }

    #[test]
    fn method_path_and_host_are_kept_as_written() {
        let r =
            rule("{method: GET|HEAD, path: '/api/v[12]/.*', host: '.*\\.example\\.com'}").unwrap();
        assert_eq!(r.method.as_deref(), Some("GET|HEAD"));
        assert_eq!(r.path.as_deref(), Some("/api/v[12]/.*"));
        assert_eq!(r.host.as_deref(), Some(".*\\.example\\.com"));
        assert!(r.headers.is_empty());
    }

    #[test]
    fn an_invalid_regex_names_its_field_on_one_line() {
        for field in ["method", "path", "host"] {
            let err = rule(&format!("{{{field}: '[a-'}}")).unwrap_err();
            assert_eq!(err.field, Some(format!("http[0].{field}")));
            let msg = err.problem.to_string();
            assert!(
                msg.starts_with(&format!(
                    "{field} \"[a-\" is not a valid regular expression: "
                )),
                "{msg}"
            );
            assert!(!msg.contains('\n'));
        }
    }

    #[test]
    fn headers_are_presence_or_exact_value_matches() {
        let r = rule("headers: ['X-Token', 'X-Env: prod', 'X-Empty:']").unwrap();
        assert_eq!(
            r.headers,
            vec![
                HeaderMatch {
                    name: "X-Token".into(),
                    value: None
                },
                HeaderMatch {
                    name: "X-Env".into(),
                    value: Some("prod".into())
                },
                HeaderMatch {
                    name: "X-Empty".into(),
                    value: Some(String::new())
                },
            ]
        );
    }

    #[test]
    fn malformed_header_is_rejected() {
        for bad in ["", "X Token", ": value"] {
            let err = rule(&format!("headers: ['ok', '{bad}']")).unwrap_err();
            assert_eq!(err.field.as_deref(), Some("http[0].headers[1]"), "{bad:?}");
            assert!(matches!(err.problem, Problem::InvalidHeader { .. }));
        }
    }

    #[test]
    fn header_matches_become_exact_matches() {
        let r = rule("headerMatches: [{name: X-Env, value: prod}, {name: X-Any}]").unwrap();
        assert_eq!(
            r.headers,
            vec![
                HeaderMatch {
                    name: "X-Env".into(),
                    value: Some("prod".into())
                },
                HeaderMatch {
                    name: "X-Any".into(),
                    value: None
                },
            ]
        );
    }

    #[test]
    fn header_match_secret_and_mismatch_are_not_supported() {
        for (field, yaml) in [
            ("mismatch", "{name: X, value: v, mismatch: LOG}"),
            ("secret", "{name: X, secret: {name: s, namespace: n}}"),
        ] {
            let err = rule(&format!("headerMatches: [{yaml}]")).unwrap_err();
            assert_eq!(err.field, Some(format!("http[0].headerMatches[0].{field}")));
            assert_eq!(
                err.problem.to_string(),
                format!("{field} is not supported by palisade")
            );
        }
    }
}
