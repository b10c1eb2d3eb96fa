//! Request targets: which forms are accepted, and path normalization (the rules are listed in
//! the parent module's documentation).

/// Longest excerpt of untrusted input quoted in an error message.
const EXCERPT: usize = 128;

/// Why a request target or path was rejected (answered with 400 Bad Request).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error(
        "request target {target:?} is neither origin-form (/path) nor absolute-form (http://host/path)"
    )]
    UnsupportedForm { target: String },
    #[error("asterisk-form target `*` is only valid with OPTIONS, not with {method}")]
    AsteriskWithoutOptions { method: String },
    #[error("absolute-form target has an invalid authority {authority:?}")]
    InvalidAuthority { authority: String },
    #[error("path does not start with '/'")]
    NotAbsolutePath,
    #[error("invalid percent-escape at byte {offset} of the path")]
    InvalidPercentEncoding { offset: usize },
    #[error("raw backslash at byte {offset} of the path")]
    Backslash { offset: usize },
    #[error("control byte or space {byte:#04x} at byte {offset} of the request target")]
    InvalidByte { byte: u8, offset: usize },
    #[error("fragment ('#') at byte {offset} of the request target")]
    Fragment { offset: usize },
    #[error("'?' at byte {offset} of a path: the query must be split off first")]
    QueryInPath { offset: usize },
}

/// A request target split into what policy sees and what is forwarded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// Normalized path, or `*` for `OPTIONS *`.
    pub path: String,
    /// The query as received, without the `?`.
    pub query: Option<String>,
    /// Lower-cased authority of an absolute-form target.
    pub authority: Option<String>,
}

/// Splits and normalizes a request target (origin-, absolute- or asterisk-form).
pub fn parse_target(method: &str, target: &str) -> Result<Target, PathError> {
    if target == "*" {
        if method != "OPTIONS" {
            return Err(PathError::AsteriskWithoutOptions {
                method: excerpt(method),
            });
        }
        return Ok(Target {
            path: "*".to_owned(),
            query: None,
            authority: None,
        });
    }
    if let Some(rest) = strip_prefix_ignore_case(target, "http://") {
        return parse_absolute_form(rest);
    }
    if !target.starts_with('/') {
        return Err(PathError::UnsupportedForm {
            target: excerpt(target),
        });
    }
    let (path, query) = split_query(target)?;
    Ok(Target {
        path: normalize_path(path)?,
        query,
        authority: None,
    })
}

/// `rest` is what follows `http://`: authority, then an optional path and query.
fn parse_absolute_form(rest: &str) -> Result<Target, PathError> {
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, path_and_query) = rest.split_at(end);
    if !is_valid_authority(authority) {
        return Err(PathError::InvalidAuthority {
            authority: excerpt(authority),
        });
    }
    let (path, query) = split_query(path_and_query)?;
    // `http://host` and `http://host?q` address the root.
    let path = if path.is_empty() { "/" } else { path };
    Ok(Target {
        path: normalize_path(path)?,
        query,
        authority: Some(authority.to_ascii_lowercase()),
    })
}

fn split_query(target: &str) -> Result<(&str, Option<String>), PathError> {
    let Some((path, query)) = target.split_once('?') else {
        return Ok((target, None));
    };
    let query_start = path.len() + 1;
    for (i, &b) in query.as_bytes().iter().enumerate() {
        let offset = query_start + i;
        match b {
            b'#' => return Err(PathError::Fragment { offset }),
            b if is_control_or_space(b) => return Err(PathError::InvalidByte { byte: b, offset }),
            _ => {}
        }
    }
    Ok((path, Some(query.to_owned())))
}

/// True for a non-empty `host[:port]` made only of RFC 3986 authority characters, without
/// userinfo (`@`): user information in a target or Host header only serves to confuse.
pub(super) fn is_valid_authority(authority: &str) -> bool {
    !authority.is_empty()
        && authority
            .bytes()
            .all(|b| is_unreserved(b) || is_sub_delim(b) || matches!(b, b':' | b'[' | b']' | b'%'))
}

/// Normalizes an origin-form path (no query) so that every spelling of a path that a server
/// would treat alike reaches policy, and the upstream, as one string.
pub fn normalize_path(raw: &str) -> Result<String, PathError> {
    if !raw.starts_with('/') {
        return Err(PathError::NotAbsolutePath);
    }
    let decoded = decode_unreserved(raw)?;
    let collapsed = collapse_slashes(&decoded);
    Ok(remove_dot_segments(&collapsed))
}

/// Decodes escapes of unreserved characters, upper-cases the hex of the others, and escapes
/// raw bytes that RFC 3986 does not allow in a path (non-ASCII and `"<>^`{|}`), so each
/// character has exactly one spelling.
fn decode_unreserved(raw: &str) -> Result<String, PathError> {
    let bytes = raw.as_bytes();
    let mut out = String::with_capacity(raw.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        match b {
            b'%' => {
                let value = bytes
                    .get(i + 1..i + 3)
                    .and_then(hex_pair)
                    .ok_or(PathError::InvalidPercentEncoding { offset: i })?;
                if is_unreserved(value) {
                    out.push(char::from(value));
                } else {
                    push_escape(&mut out, value);
                }
                i += 3;
                continue;
            }
            b'\\' => return Err(PathError::Backslash { offset: i }),
            b'?' => return Err(PathError::QueryInPath { offset: i }),
            b'#' => return Err(PathError::Fragment { offset: i }),
            b if is_control_or_space(b) => {
                return Err(PathError::InvalidByte { byte: b, offset: i });
            }
            b if b >= 0x80
                || matches!(b, b'"' | b'<' | b'>' | b'^' | b'`' | b'{' | b'|' | b'}') =>
            {
                push_escape(&mut out, b);
            }
            b => out.push(char::from(b)),
        }
        i += 1;
    }
    Ok(out)
}

fn collapse_slashes(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    for c in path.chars() {
        if c == '/' && out.ends_with('/') {
            continue;
        }
        out.push(c);
    }
    out
}

/// RFC 3986 §5.2.4 on a path that starts with `/` and has no empty segments except possibly
/// the last (a trailing slash): `.` segments vanish, `..` removes the previous segment and
/// never climbs above the root; a final `.` or `..` leaves a trailing slash.
fn remove_dot_segments(path: &str) -> String {
    let segments: Vec<&str> = path[1..].split('/').collect();
    let last = segments.len() - 1;
    let mut out: Vec<&str> = Vec::with_capacity(segments.len());
    for (i, segment) in segments.into_iter().enumerate() {
        match segment {
            "." => {}
            ".." => {
                out.pop();
            }
            other => {
                out.push(other);
                continue;
            }
        }
        if i == last {
            out.push("");
        }
    }
    let mut normalized = String::with_capacity(path.len());
    for segment in out {
        normalized.push('/');
        normalized.push_str(segment);
    }
    if normalized.is_empty() {
        normalized.push('/');
    }
    normalized
}

fn hex_pair(pair: &[u8]) -> Option<u8> {
    let high = char::from(*pair.first()?).to_digit(16)?;
    let low = char::from(*pair.get(1)?).to_digit(16)?;
    u8::try_from(high * 16 + low).ok()
}

fn push_escape(out: &mut String, byte: u8) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    out.push('%');
    out.push(char::from(HEX[usize::from(byte >> 4)]));
    out.push(char::from(HEX[usize::from(byte & 0x0f)]));
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn is_sub_delim(b: u8) -> bool {
    matches!(
        b,
        b'!' | b'$' | b'&' | b'\'' | b'(' | b')' | b'*' | b'+' | b',' | b';' | b'='
    )
}

fn is_control_or_space(b: u8) -> bool {
    b <= 0x20 || b == 0x7f
}

fn strip_prefix_ignore_case<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    let head = s.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &s[prefix.len()..])
}

/// At most [`EXCERPT`] bytes of `s`, cut on a character boundary.
pub(super) fn excerpt(s: &str) -> String {
    if s.len() <= EXCERPT {
        return s.to_owned();
    }
    let mut end = EXCERPT;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &s[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norm(raw: &str) -> String {
        match normalize_path(raw) {
            Ok(path) => path,
            Err(e) => panic!("{raw:?} was rejected: {e}"),
        }
    }

    #[test]
    fn equivalent_spellings_normalize_to_one_path() {
        for raw in [
            "/a",
            "/./a",
            "//a",
            "/b/../a",
            "/%2e%2e/a",
            "/%2E/a",
            "/%61",
            "/.%2e/a",
            "///a",
            "/b/c/../../a",
            "/../../a",
            "/b/%2E%2E/a",
        ] {
            assert_eq!(norm(raw), "/a", "{raw}");
        }
    }

    #[test]
    fn dot_segments_follow_rfc3986() {
        assert_eq!(norm("/"), "/");
        assert_eq!(norm("/.."), "/");
        assert_eq!(norm("/."), "/");
        assert_eq!(norm("/a/b/.."), "/a/");
        assert_eq!(norm("/a/b/."), "/a/b/");
        assert_eq!(norm("/a/./b/../c"), "/a/c");
        assert_eq!(norm("/a/.../b"), "/a/.../b");
        assert_eq!(norm("/a/..b/c."), "/a/..b/c.");
        assert_eq!(norm("/a/"), "/a/");
    }

    #[test]
    fn repeated_slashes_collapse_before_dot_segments() {
        assert_eq!(norm("/a//b"), "/a/b");
        assert_eq!(norm("/a//../b"), "/b");
        assert_eq!(norm("/a///"), "/a/");
    }

    #[test]
    fn only_unreserved_escapes_are_decoded() {
        assert_eq!(norm("/%41%7a%30%2D%2e%5F%7E"), "/Az0-._~");
        assert_eq!(norm("/a%2Fb"), "/a%2Fb");
        assert_eq!(norm("/a%2fb"), "/a%2Fb");
        assert_eq!(norm("/a%2F..%2Fb"), "/a%2F..%2Fb");
        assert_eq!(norm("/%252e"), "/%252e");
        assert_eq!(norm("/%3f%23%00"), "/%3F%23%00");
    }

    #[test]
    fn characters_not_allowed_in_paths_are_escaped() {
        assert_eq!(norm("/é"), "/%C3%A9");
        assert_eq!(norm("/{x}|^`\"<>"), "/%7Bx%7D%7C%5E%60%22%3C%3E");
        assert_eq!(norm("/a:b@c!$&'()*+,;="), "/a:b@c!$&'()*+,;=");
    }

    #[test]
    fn invalid_escapes_are_rejected() {
        for (raw, offset) in [
            ("/%zz", 1),
            ("/a%4", 2),
            ("/a%", 2),
            ("/%g1", 1),
            ("/%1", 1),
        ] {
            assert_eq!(
                normalize_path(raw),
                Err(PathError::InvalidPercentEncoding { offset }),
                "{raw}"
            );
        }
    }

    #[test]
    fn backslash_control_bytes_and_space_are_rejected() {
        assert_eq!(
            normalize_path("/a\\b"),
            Err(PathError::Backslash { offset: 2 })
        );
        assert_eq!(
            normalize_path("/a\0"),
            Err(PathError::InvalidByte { byte: 0, offset: 2 })
        );
        assert_eq!(
            normalize_path("/a b"),
            Err(PathError::InvalidByte {
                byte: b' ',
                offset: 2
            })
        );
        assert_eq!(
            normalize_path("/\x7f"),
            Err(PathError::InvalidByte {
                byte: 0x7f,
                offset: 1
            })
        );
        assert_eq!(
            normalize_path("/a#f"),
            Err(PathError::Fragment { offset: 2 })
        );
        assert_eq!(
            normalize_path("/a?q"),
            Err(PathError::QueryInPath { offset: 2 })
        );
        assert_eq!(normalize_path("a"), Err(PathError::NotAbsolutePath));
        assert_eq!(normalize_path(""), Err(PathError::NotAbsolutePath));
    }

    #[test]
    fn normalization_is_idempotent() {
        for raw in ["/a/%2e%2e/%2F/./b%2f//c/..", "/%7e/é/{}", "/a/b/../"] {
            let once = norm(raw);
            assert_eq!(norm(&once), once, "{raw}");
        }
    }

    #[test]
    fn origin_form_splits_the_query_off_unnormalized() {
        let target = parse_target("GET", "/a/../b?x=%2e%2E&y=/../").unwrap();
        assert_eq!(target.path, "/b");
        assert_eq!(target.query.as_deref(), Some("x=%2e%2E&y=/../"));
        assert_eq!(target.authority, None);
        let target = parse_target("GET", "/a?").unwrap();
        assert_eq!(target.query.as_deref(), Some(""));
    }

    #[test]
    fn absolute_form_takes_the_host_from_the_target() {
        let target = parse_target("GET", "HTTP://Example.COM:8080/x/./y?q=1").unwrap();
        assert_eq!(target.authority.as_deref(), Some("example.com:8080"));
        assert_eq!(target.path, "/x/y");
        assert_eq!(target.query.as_deref(), Some("q=1"));
        let target = parse_target("GET", "http://h").unwrap();
        assert_eq!((target.path.as_str(), target.query), ("/", None));
        let target = parse_target("GET", "http://h?q").unwrap();
        assert_eq!(
            (target.path.as_str(), target.query.as_deref()),
            ("/", Some("q"))
        );
    }

    #[test]
    fn absolute_form_with_userinfo_or_empty_host_is_rejected() {
        assert!(matches!(
            parse_target("GET", "http://user@h/"),
            Err(PathError::InvalidAuthority { .. })
        ));
        assert!(matches!(
            parse_target("GET", "http:///a"),
            Err(PathError::InvalidAuthority { .. })
        ));
        assert!(matches!(
            parse_target("GET", "https://h/"),
            Err(PathError::UnsupportedForm { .. })
        ));
    }

    #[test]
    fn asterisk_form_only_with_options() {
        assert_eq!(parse_target("OPTIONS", "*").unwrap().path, "*");
        assert!(matches!(
            parse_target("GET", "*"),
            Err(PathError::AsteriskWithoutOptions { .. })
        ));
    }

    #[test]
    fn other_target_forms_and_fragments_are_rejected() {
        assert!(matches!(
            parse_target("GET", "example.com:443"),
            Err(PathError::UnsupportedForm { .. })
        ));
        assert_eq!(
            parse_target("GET", "/a?b#c"),
            Err(PathError::Fragment { offset: 4 })
        );
        assert_eq!(
            parse_target("GET", "/a#c"),
            Err(PathError::Fragment { offset: 2 })
        );
    }

    #[test]
    fn excerpts_are_cut_on_char_boundaries() {
        let long = "é".repeat(100);
        let cut = excerpt(&long);
        assert!(cut.len() <= EXCERPT + 3);
        assert!(cut.ends_with("..."));
    }
}
