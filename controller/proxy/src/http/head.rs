//! Request heads: httparse for the syntax, then the checks that make a head safe to judge and
//! forward (framing, Host, target form, version).

use super::Limits;
use super::fields::{self, Field, FramingError, lossy};
use super::path::{self, PathError, excerpt};

/// How a request's body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFraming {
    None,
    ContentLength(u64),
    Chunked,
}

impl BodyFraming {
    /// Whether body bytes follow the head (`Content-Length: 0` has none).
    pub fn has_body(self) -> bool {
        match self {
            BodyFraming::None | BodyFraming::ContentLength(0) => false,
            BodyFraming::ContentLength(_) | BodyFraming::Chunked => true,
        }
    }
}

/// A request head that passed every check: what `judge` sees and what is forwarded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestHead {
    pub method: String,
    /// The request target as received.
    pub target: String,
    /// The normalized path (`*` for `OPTIONS *`); forwarded in place of the received one.
    pub path: String,
    /// The query as received, without `?`.
    pub query: Option<String>,
    /// Minor version of HTTP/1.x: 0 or 1.
    pub version: u8,
    /// All fields as received (names keep their case), Host and framing included.
    pub headers: Vec<Field>,
    /// Lower-cased authority: from an absolute-form target, else from Host.
    pub host: Option<String>,
    pub body: BodyFraming,
    /// The protocols an HTTP/1.1 request whose Connection lists `upgrade` asks to switch to
    /// (its Upgrade fields as one list, items as received), `h2c` removed: that offer is never
    /// honoured, so the request goes on as plain HTTP/1.1. Empty for an ordinary request.
    pub upgrades: Vec<String>,
    /// Whether the client wants the connection kept after the response.
    pub keep_alive: bool,
    /// Lower-cased Connection tokens: the fields they name are hop-by-hop.
    pub connection: Vec<String>,
}

impl RequestHead {
    /// The first field called `name` (ASCII case-insensitive).
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.as_slice())
    }
}

/// Why a request head was rejected; [`HeadError::status`] is the answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeadError {
    #[error("request head larger than {limit} bytes")]
    TooLarge { limit: usize },
    #[error("more than {limit} header fields")]
    TooManyHeaders { limit: usize },
    #[error("malformed request head: {0}")]
    Syntax(httparse::Error),
    #[error("unsupported protocol version {version:?}")]
    UnsupportedVersion { version: String },
    #[error("CONNECT is not supported: the destination is already known")]
    Connect,
    #[error("invalid request target")]
    Target(#[from] PathError),
    #[error("invalid message framing")]
    Framing(#[from] FramingError),
    #[error("HTTP/1.1 request without a Host field")]
    MissingHost,
    #[error("more than one Host field")]
    DuplicateHost,
    #[error("invalid Host {value:?}")]
    InvalidHost { value: String },
    #[error("invalid Upgrade {value:?}: protocols are `name` or `name/version` tokens")]
    InvalidUpgrade { value: String },
}

impl HeadError {
    /// The status the client is answered with before the connection is closed.
    pub fn status(&self) -> u16 {
        match self {
            HeadError::TooLarge { .. } | HeadError::TooManyHeaders { .. } => 431,
            HeadError::UnsupportedVersion { .. } => 505,
            HeadError::Connect => 405,
            HeadError::Framing(e) => e.request_status(),
            HeadError::Syntax(_)
            | HeadError::Target(_)
            | HeadError::MissingHost
            | HeadError::DuplicateHost
            | HeadError::InvalidHost { .. }
            | HeadError::InvalidUpgrade { .. } => 400,
        }
    }
}

/// Parses a request head from the start of `buf`: `Ok(None)` until it is complete, then the
/// head and its length in bytes. Only the first `limits.max_head_bytes` bytes are looked at.
pub fn parse_request_head(
    buf: &[u8],
    limits: &Limits,
) -> Result<Option<(RequestHead, usize)>, HeadError> {
    let window = &buf[..buf.len().min(limits.max_head_bytes)];
    // Parse slots live on the stack, uninitialised: no allocation and no zeroing per request.
    let mut slots =
        [const { std::mem::MaybeUninit::<httparse::Header<'_>>::uninit() }; super::MAX_HEADERS_CAP];
    let mut request = httparse::Request::new(&mut []);
    let len = match request.parse_with_uninit_headers(
        window,
        &mut slots[..limits.max_headers.min(super::MAX_HEADERS_CAP)],
    ) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() >= limits.max_head_bytes => {
            return Err(HeadError::TooLarge {
                limit: limits.max_head_bytes,
            });
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(HeadError::TooManyHeaders {
                limit: limits.max_headers,
            });
        }
        Err(httparse::Error::Version) => return Err(version_error(window)),
        Err(e) => return Err(HeadError::Syntax(e)),
    };
    let (Some(method), Some(target), Some(version)) =
        (request.method, request.path, request.version)
    else {
        // httparse fills all three before it reports a complete head.
        return Err(HeadError::Syntax(httparse::Error::Token));
    };
    let headers = request
        .headers
        .iter()
        .map(|h| (h.name.to_owned(), h.value.to_vec()))
        .collect();
    build_head(method, target, version, headers).map(|head| Some((head, len)))
}

fn build_head(
    method: &str,
    target: &str,
    version: u8,
    headers: Vec<Field>,
) -> Result<RequestHead, HeadError> {
    if method == "CONNECT" {
        return Err(HeadError::Connect);
    }
    let parsed = path::parse_target(method, target)?;
    let framing = fields::framing(&headers, version)?;
    let body = match (framing.chunked, framing.content_length) {
        (true, _) => BodyFraming::Chunked,
        (false, Some(n)) => BodyFraming::ContentLength(n),
        (false, None) => BodyFraming::None,
    };
    let host_field = host_field(&headers, version)?;
    let connection = fields::connection_tokens(&headers);
    let upgrades = upgrades(&headers, version, &connection)?;
    Ok(RequestHead {
        method: method.to_owned(),
        target: target.to_owned(),
        path: parsed.path,
        query: parsed.query,
        version,
        // RFC 9112 §3.2.2: an absolute-form target overrides Host.
        host: parsed.authority.or(host_field),
        body,
        upgrades,
        keep_alive: fields::persists(version, &connection),
        connection,
        headers,
    })
}

/// The Host field, lower-cased: exactly one on HTTP/1.1 (RFC 9112 §3.2), at most one before.
fn host_field(headers: &[Field], version: u8) -> Result<Option<String>, HeadError> {
    let mut hosts = fields::values(headers, "host");
    let Some(value) = hosts.next() else {
        return match version {
            0 => Ok(None),
            _ => Err(HeadError::MissingHost),
        };
    };
    if hosts.next().is_some() {
        return Err(HeadError::DuplicateHost);
    }
    match std::str::from_utf8(value) {
        Ok(host) if path::is_valid_authority(host) => Ok(Some(host.to_ascii_lowercase())),
        _ => Err(HeadError::InvalidHost {
            value: lossy(value),
        }),
    }
}

/// The protocols asked for, if the request really asks to switch: HTTP/1.1 with Upgrade named
/// in Connection (RFC 9110 §7.8 has HTTP/1.0 upgrades ignored). Every Upgrade field counts,
/// as one list; empty items are skipped, anything but `name` or `name/version` (tokens) is
/// refused. `h2c` is dropped: HTTP/2 after a 101 would carry requests no rule ever sees
/// (h2c smuggling), so that offer is stripped and the request forwarded as plain HTTP/1.1.
fn upgrades(
    headers: &[Field],
    version: u8,
    connection: &[String],
) -> Result<Vec<String>, HeadError> {
    if version == 0 || !connection.iter().any(|t| t == "upgrade") {
        return Ok(Vec::new());
    }
    let mut protocols = Vec::new();
    for value in fields::values(headers, "upgrade") {
        let invalid = || HeadError::InvalidUpgrade {
            value: lossy(value),
        };
        let text = std::str::from_utf8(value).map_err(|_| invalid())?;
        for item in text.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            if !fields::is_protocol(item) {
                return Err(invalid());
            }
            if !fields::is_h2c(item) {
                protocols.push(item.to_owned());
            }
        }
    }
    Ok(protocols)
}

/// httparse says `Version` both for `HTTP/2.0` (a version we do not speak: 505) and for
/// garbage where the version should be (400); the request line tells them apart.
fn version_error(head: &[u8]) -> HeadError {
    let line_end = head
        .iter()
        .position(|&b| b == b'\r' || b == b'\n')
        .unwrap_or(head.len());
    let line = String::from_utf8_lossy(&head[..line_end]);
    match line.trim_start().split(' ').nth(2) {
        Some(version) if version.starts_with("HTTP/") => HeadError::UnsupportedVersion {
            version: excerpt(version),
        },
        _ => HeadError::Syntax(httparse::Error::Version),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(raw: &str) -> Result<Option<(RequestHead, usize)>, HeadError> {
        parse_request_head(raw.as_bytes(), &Limits::default())
    }

    fn head(raw: &str) -> RequestHead {
        match parse(raw) {
            Ok(Some((head, len))) => {
                assert_eq!(len, raw.len(), "head length");
                head
            }
            other => panic!("{raw:?}: {other:?}"),
        }
    }

    fn status(raw: &str) -> u16 {
        match parse(raw) {
            Err(e) => e.status(),
            other => panic!("{raw:?} was accepted: {other:?}"),
        }
    }

    #[test]
    fn complete_head_is_parsed_and_normalized() {
        let h =
            head("GET /a/./b/../c?x=1 HTTP/1.1\r\nHost: Example.com\r\nX-A: 1\r\nx-a: 2\r\n\r\n");
        assert_eq!(h.method, "GET");
        assert_eq!(h.target, "/a/./b/../c?x=1");
        assert_eq!(h.path, "/a/c");
        assert_eq!(h.query.as_deref(), Some("x=1"));
        assert_eq!(h.version, 1);
        assert_eq!(h.host.as_deref(), Some("example.com"));
        assert_eq!(h.header("X-a"), Some(&b"1"[..]));
        assert_eq!(h.body, BodyFraming::None);
        assert!(h.keep_alive);
        assert!(h.upgrades.is_empty());
    }

    #[test]
    fn incomplete_head_asks_for_more() {
        assert_eq!(parse("GET / HTTP/1.1\r\nHost: a\r\n"), Ok(None));
        assert_eq!(parse(""), Ok(None));
    }

    #[test]
    fn body_after_the_head_is_not_part_of_it() {
        let raw = "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabcGET";
        let (h, len) = parse(raw).unwrap().unwrap();
        assert_eq!(&raw[len..], "abcGET");
        assert_eq!(h.body, BodyFraming::ContentLength(3));
    }

    #[test]
    fn oversized_heads_and_too_many_fields_get_431() {
        let limits = Limits {
            max_head_bytes: 64,
            max_headers: 2,
            ..Limits::default()
        };
        let long = format!("GET /{} HTTP/1.1\r\n", "a".repeat(100));
        assert_eq!(
            parse_request_head(long.as_bytes(), &limits),
            Err(HeadError::TooLarge { limit: 64 })
        );
        let many = "GET / HTTP/1.1\r\nHost: a\r\nA: 1\r\nB: 2\r\n\r\n";
        let err = parse_request_head(many.as_bytes(), &limits).unwrap_err();
        assert_eq!(err, HeadError::TooManyHeaders { limit: 2 });
        assert_eq!(err.status(), 431);
        let exact = "GET / HTTP/1.1\r\nHost: a\r\nA: 1\r\n\r\n";
        assert!(
            parse_request_head(exact.as_bytes(), &limits)
                .unwrap()
                .is_some()
        );
    }

    #[test]
    fn framing_conflicts_get_400_and_unknown_codings_501() {
        assert_eq!(
            status(
                "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n"
            ),
            400
        );
        assert_eq!(
            status("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n"),
            400
        );
        assert_eq!(
            status("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\n"),
            400
        );
        assert_eq!(
            status("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"),
            501
        );
        assert_eq!(
            status("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, chunked\r\n\r\n"),
            400
        );
        assert_eq!(
            status("POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n"),
            400
        );
    }

    #[test]
    fn syntax_errors_get_400() {
        for raw in [
            "GET / HTTP/1.1\r\nHost: a\r\nX-Folded: a\r\n b\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nBad Name: a\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nX: a\0b\r\n\r\n",
            "G(T / HTTP/1.1\r\nHost: a\r\n\r\n",
            "GET /a\x01 HTTP/1.1\r\nHost: a\r\n\r\n",
            "GET  / HTTP/1.1\r\nHost: a\r\n\r\n",
            "GET / XTTP/1.1\r\nHost: a\r\n\r\n",
            "GET /a\\b HTTP/1.1\r\nHost: a\r\n\r\n",
            "GET /%zz HTTP/1.1\r\nHost: a\r\n\r\n",
            "GET * HTTP/1.1\r\nHost: a\r\n\r\n",
        ] {
            assert_eq!(status(raw), 400, "{raw:?}");
        }
    }

    #[test]
    fn other_versions_get_505() {
        assert_eq!(status("GET / HTTP/2.0\r\n\r\n"), 505);
        assert_eq!(status("GET / HTTP/1.2\r\nHost: a\r\n\r\n"), 505);
    }

    #[test]
    fn connect_gets_405() {
        assert_eq!(
            status("CONNECT example.com:443 HTTP/1.1\r\nHost: example.com\r\n\r\n"),
            405
        );
    }

    #[test]
    fn host_is_required_once_on_http11() {
        assert_eq!(parse("GET / HTTP/1.1\r\n\r\n"), Err(HeadError::MissingHost));
        assert_eq!(
            parse("GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n"),
            Err(HeadError::DuplicateHost)
        );
        assert!(matches!(
            parse("GET / HTTP/1.1\r\nHost: user@a\r\n\r\n"),
            Err(HeadError::InvalidHost { .. })
        ));
        assert_eq!(head("GET / HTTP/1.0\r\n\r\n").host, None);
    }

    #[test]
    fn absolute_form_overrides_host() {
        let h = head("GET http://B.example/x/../y HTTP/1.1\r\nHost: a.example\r\n\r\n");
        assert_eq!(h.host.as_deref(), Some("b.example"));
        assert_eq!(h.path, "/y");
    }

    #[test]
    fn keep_alive_follows_version_and_connection() {
        assert!(!head("GET / HTTP/1.0\r\n\r\n").keep_alive);
        assert!(head("GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n").keep_alive);
        assert!(!head("GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n").keep_alive);
    }

    #[test]
    fn upgrade_needs_http11_and_connection_upgrade() {
        let ws = "GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n";
        assert_eq!(head(ws).upgrades, ["websocket"]);
        let no_token = "GET /ws HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\n\r\n";
        assert!(head(no_token).upgrades.is_empty());
        let old = "GET /ws HTTP/1.0\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n";
        assert!(head(old).upgrades.is_empty());
    }

    #[test]
    fn upgrade_fields_are_one_list_without_h2c() {
        let many = "GET / HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: SPDY/3.1, , H2C\r\n\
                    Upgrade: websocket,h2c/1\r\n\r\n";
        assert_eq!(head(many).upgrades, ["SPDY/3.1", "websocket"]);
        let h2c = "GET / HTTP/1.1\r\nHost: a\r\nConnection: Upgrade, HTTP2-Settings\r\n\
                   Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n\r\n";
        let h = head(h2c);
        assert!(
            h.upgrades.is_empty(),
            "an ordinary request: {:?}",
            h.upgrades
        );
        assert!(h.keep_alive);
    }

    #[test]
    fn malformed_upgrade_gets_400() {
        for value in ["a b", "a/", "/1", "a/b/c", "web[socket"] {
            let raw = format!(
                "GET / HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: {value}\r\n\r\n"
            );
            assert!(
                matches!(parse(&raw), Err(HeadError::InvalidUpgrade { .. })),
                "{value:?}"
            );
            assert_eq!(status(&raw), 400);
        }
        // Without Connection: upgrade the field is dropped unread.
        assert!(
            head("GET / HTTP/1.1\r\nHost: a\r\nUpgrade: a b\r\n\r\n")
                .upgrades
                .is_empty()
        );
    }

    #[test]
    fn has_body_ignores_empty_content_length() {
        assert!(!BodyFraming::ContentLength(0).has_body());
        assert!(BodyFraming::ContentLength(1).has_body());
        assert!(BodyFraming::Chunked.has_body());
        assert!(!BodyFraming::None.has_body());
    }
}
