//! Cilium's `rules.http` entries, and palisade.io/v1's one addition to them: `upgrades`, the
//! protocols besides websocket a matching request may switch to.

use serde::Deserialize;
use serde::de::IgnoredAny;

use super::cilium::ApiGroup;
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
    /// palisade.io/v1 only.
    upgrades: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct HeaderMatchDoc {
    name: String,
    value: Option<String>,
    mismatch: Option<IgnoredAny>,
    secret: Option<IgnoredAny>,
}

pub(crate) fn http_rule(
    doc: &HttpRuleDoc,
    group: ApiGroup,
    path: &FieldPath,
) -> Result<HttpRule, Invalid> {
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
    let upgrades_path = path.key("upgrades");
    let upgrades = match (&doc.upgrades, group) {
        (None, _) => Vec::new(),
        // Cilium has no such field: a cilium.io/v2 manifest using it is as wrong as any other
        // unknown field, and must not mean something else here than in Cilium.
        (Some(_), ApiGroup::Cilium) => {
            return Err(upgrades_path.invalid(Problem::PalisadeOnlyField("upgrades")));
        }
        (Some(list), ApiGroup::Palisade) => list
            .iter()
            .enumerate()
            .map(|(i, text)| upgrade(text).map_err(|p| upgrades_path.index(i).invalid(p)))
            .collect::<Result<_, _>>()?,
    };
    Ok(HttpRule {
        method: regex_field("method", &doc.method)?,
        path: regex_field("path", &doc.path)?,
        host: regex_field("host", &doc.host)?,
        headers,
        upgrades,
    })
}

/// An upgrade protocol (RFC 9110 §7.8: `name` or `name/version`, both tokens), lower-cased:
/// protocol names compare case-insensitively.
fn upgrade(text: &str) -> Result<String, Problem> {
    let invalid = |why| Problem::InvalidUpgrade {
        value: text.to_string(),
        why,
    };
    let (name, version) = match text.split_once('/') {
        Some((name, version)) => (name, Some(version)),
        None => (text, None),
    };
    if name.is_empty() || !name.bytes().all(is_tchar) {
        return Err(invalid(
            "a protocol name is a token: letters, digits and !#$%&'*+-.^_`|~",
        ));
    }
    if version.is_some_and(|v| v.is_empty() || !v.bytes().all(is_tchar)) {
        return Err(invalid(
            "a protocol version after `/` is a token: letters, digits and !#$%&'*+-.^_`|~",
        ));
    }
    if name.eq_ignore_ascii_case("h2c") {
        return Err(invalid(
            "h2c is never honoured: the proxy strips that offer, since HTTP/2 on the connection \
             would escape the HTTP rules",
        ));
    }
    Ok(text.to_ascii_lowercase())
}

/// The matcher anchors these expressions, so they are checked the way it will compile them.
fn validate_regex(field: &'static str, re: &str) -> Result<(), Problem> {
    crate::l7::anchored_regex(re)
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
    if !name.bytes().all(is_tchar) {
        return Err("a header name may contain only letters, digits and !#$%&'*+-.^_`|~");
    }
    Ok(())
}

/// RFC 9110 §5.6.2 tchar.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule_in(group: ApiGroup, yaml: &str) -> Result<HttpRule, Invalid> {
        let doc: HttpRuleDoc = serde_norway::from_str(yaml).expect("test YAML");
        http_rule(&doc, group, &FieldPath::root().key("http").index(0))
    }

    fn rule(yaml: &str) -> Result<HttpRule, Invalid> {
        rule_in(ApiGroup::Palisade, yaml)
    }

    #[test]
    fn upgrades_are_lower_cased_protocol_tokens() {
        let r = rule("{path: /ws, upgrades: [SPDY/3.1, foo, websocket]}").unwrap();
        assert_eq!(r.upgrades, ["spdy/3.1", "foo", "websocket"]);
        assert!(rule("{}").unwrap().upgrades.is_empty());
        assert!(rule("{upgrades: []}").unwrap().upgrades.is_empty());
    }

    #[test]
    fn a_bad_upgrade_token_names_the_field() {
        for bad in ["", "spdy 3", "spdy/", "/3", "a/b/c", "x,y", "h2c", "H2C/1"] {
            let err = rule(&format!("upgrades: [websocket, '{bad}']")).unwrap_err();
            assert_eq!(err.field.as_deref(), Some("http[0].upgrades[1]"), "{bad:?}");
            assert!(
                matches!(err.problem, Problem::InvalidUpgrade { .. }),
                "{bad:?}: {:?}",
                err.problem
            );
        }
        let err = rule("upgrades: [h2c]").unwrap_err();
        assert!(
            err.problem.to_string().contains("never honoured"),
            "{err:?}"
        );
    }

    #[test]
    fn upgrades_are_unknown_to_cilium() {
        let err = rule_in(ApiGroup::Cilium, "{path: /ws, upgrades: [spdy/3.1]}").unwrap_err();
        assert_eq!(err.field.as_deref(), Some("http[0].upgrades"));
        assert!(
            err.problem
                .to_string()
                .starts_with("unknown field `upgrades`"),
            "{}",
            err.problem
        );
        assert!(rule_in(ApiGroup::Cilium, "{path: /ws}").is_ok());
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
    fn a_regex_too_large_to_match_with_is_refused() {
        // Found by fuzzing: 100 such paths made one 6.5 KB manifest take 2 s to parse.
        let err = rule("{path: '[^/]{2,3}{2,3}{2,3}{2,3}{2,3}{2,3}{2,3}{2,3}'}").unwrap_err();
        assert_eq!(err.field.as_deref(), Some("http[0].path"));
        assert!(
            err.problem.to_string().contains("size limit"),
            "{}",
            err.problem
        );
        // The same comment trick as the flow filters': valid alone, not once anchored.
        assert!(rule("{path: '(?x)/admin #'}").is_err());
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
