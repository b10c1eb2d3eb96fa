//! Upstream response heads, read with the same strictness as requests: an upstream that frames
//! its answer ambiguously gets a 502, not a guess.

use super::Limits;
use super::fields::{self, Field, FramingError};

/// A response head from the upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponseHead {
    /// Minor version of HTTP/1.x: 0 or 1.
    pub version: u8,
    pub status: u16,
    /// The reason phrase; empty if it was missing or not ASCII.
    pub reason: String,
    /// All fields as received.
    pub headers: Vec<Field>,
    pub content_length: Option<u64>,
    pub chunked: bool,
    /// Whether the upstream keeps the connection after this response.
    pub keep_alive: bool,
    /// Lower-cased Connection tokens.
    pub connection: Vec<String>,
}

/// How a response's body is delimited, given the request it answers (RFC 9112 §6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResponseBody {
    None,
    ContentLength(u64),
    Chunked,
    /// Read until the upstream closes; the client connection closes after it.
    UntilClose,
}

impl ResponseHead {
    /// The first field called `name` (ASCII case-insensitive).
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.as_slice())
    }

    /// Whether this is an interim (1xx) response.
    pub fn is_interim(&self) -> bool {
        (100..200).contains(&self.status)
    }

    /// The body's framing when it answers a request with `request_method`.
    pub fn body(&self, request_method: &str) -> ResponseBody {
        if request_method == "HEAD" || self.is_interim() || matches!(self.status, 204 | 304) {
            return ResponseBody::None;
        }
        match (self.chunked, self.content_length) {
            (true, _) => ResponseBody::Chunked,
            (false, Some(n)) => ResponseBody::ContentLength(n),
            (false, None) => ResponseBody::UntilClose,
        }
    }
}

/// Why an upstream response head was rejected (the client gets 502).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResponseHeadError {
    #[error("response head larger than {limit} bytes")]
    TooLarge { limit: usize },
    #[error("more than {limit} header fields")]
    TooManyHeaders { limit: usize },
    #[error("malformed response head: {0}")]
    Syntax(httparse::Error),
    #[error("status code {status} outside 100..=599")]
    InvalidStatus { status: u16 },
    #[error("invalid response framing")]
    Framing(#[from] FramingError),
}

/// Parses a response head from the start of `buf`: `Ok(None)` until it is complete.
pub fn parse_response_head(
    buf: &[u8],
    limits: &Limits,
) -> Result<Option<(ResponseHead, usize)>, ResponseHeadError> {
    let window = &buf[..buf.len().min(limits.max_head_bytes)];
    // On the stack: no allocation per response.
    let mut slots = [httparse::EMPTY_HEADER; super::MAX_HEADERS_CAP];
    let mut response =
        httparse::Response::new(&mut slots[..limits.max_headers.min(super::MAX_HEADERS_CAP)]);
    let len = match response.parse(window) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() >= limits.max_head_bytes => {
            return Err(ResponseHeadError::TooLarge {
                limit: limits.max_head_bytes,
            });
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(ResponseHeadError::TooManyHeaders {
                limit: limits.max_headers,
            });
        }
        Err(e) => return Err(ResponseHeadError::Syntax(e)),
    };
    let (Some(version), Some(status)) = (response.version, response.code) else {
        // httparse fills both before it reports a complete head.
        return Err(ResponseHeadError::Syntax(httparse::Error::Status));
    };
    if !(100..=599).contains(&status) {
        return Err(ResponseHeadError::InvalidStatus { status });
    }
    let headers: Vec<Field> = response
        .headers
        .iter()
        .map(|h| (h.name.to_owned(), h.value.to_vec()))
        .collect();
    let framing = fields::framing(&headers, version)?;
    let connection = fields::connection_tokens(&headers);
    let head = ResponseHead {
        version,
        status,
        reason: response.reason.unwrap_or_default().to_owned(),
        content_length: framing.content_length,
        chunked: framing.chunked,
        keep_alive: fields::persists(version, &connection),
        connection,
        headers,
    };
    Ok(Some((head, len)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(raw: &str) -> Result<Option<(ResponseHead, usize)>, ResponseHeadError> {
        parse_response_head(raw.as_bytes(), &Limits::default())
    }

    fn head(raw: &str) -> ResponseHead {
        match parse(raw) {
            Ok(Some((head, len))) => {
                assert_eq!(len, raw.len());
                head
            }
            other => panic!("{raw:?}: {other:?}"),
        }
    }

    #[test]
    fn response_head_is_parsed() {
        let h = head("HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX: y\r\n\r\n");
        assert_eq!((h.version, h.status, h.reason.as_str()), (1, 200, "OK"));
        assert_eq!(h.header("x"), Some(&b"y"[..]));
        assert!(h.keep_alive);
        assert_eq!(h.body("GET"), ResponseBody::ContentLength(5));
        assert_eq!(parse("HTTP/1.1 200 OK\r\n"), Ok(None));
    }

    #[test]
    fn bodiless_responses_have_no_body_whatever_they_declare() {
        let h = head("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n");
        assert_eq!(h.body("HEAD"), ResponseBody::None);
        for status in ["100 Continue", "204 No Content", "304 Not Modified"] {
            let h = head(&format!(
                "HTTP/1.1 {status}\r\nTransfer-Encoding: chunked\r\n\r\n"
            ));
            assert_eq!(h.body("GET"), ResponseBody::None, "{status}");
        }
    }

    #[test]
    fn unframed_responses_run_until_close() {
        let h = head("HTTP/1.1 200 OK\r\n\r\n");
        assert_eq!(h.body("GET"), ResponseBody::UntilClose);
        let h = head("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n");
        assert_eq!(h.body("GET"), ResponseBody::Chunked);
    }

    #[test]
    fn keep_alive_follows_version_and_connection() {
        assert!(!head("HTTP/1.0 200 OK\r\n\r\n").keep_alive);
        assert!(head("HTTP/1.0 200 OK\r\nConnection: keep-alive\r\n\r\n").keep_alive);
        assert!(!head("HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n").keep_alive);
    }

    #[test]
    fn ambiguous_or_malformed_responses_are_rejected() {
        assert!(matches!(
            parse("HTTP/1.1 200 OK\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n"),
            Err(ResponseHeadError::Framing(
                FramingError::ContentLengthWithTransferEncoding
            ))
        ));
        assert!(matches!(
            parse("HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n"),
            Err(ResponseHeadError::Framing(
                FramingError::DuplicateContentLength
            ))
        ));
        assert!(matches!(
            parse("HTTP/1.1 200 OK\r\nX: a\r\n b\r\n\r\n"),
            Err(ResponseHeadError::Syntax(_))
        ));
        assert!(matches!(
            parse("HTTP/1.1 099 Low\r\n\r\n"),
            Err(ResponseHeadError::InvalidStatus { status: 99 })
        ));
        assert!(matches!(
            parse("HTTP/2 200 OK\r\n\r\n"),
            Err(ResponseHeadError::Syntax(httparse::Error::Version))
        ));
        assert!(matches!(
            parse("HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"),
            Err(ResponseHeadError::Framing(
                FramingError::TransferEncodingOnHttp10
            ))
        ));
    }

    #[test]
    fn oversized_response_heads_are_rejected() {
        let limits = Limits {
            max_head_bytes: 32,
            max_headers: 1,
            ..Limits::default()
        };
        let long = format!("HTTP/1.1 200 OK\r\nX: {}\r\n\r\n", "a".repeat(40));
        assert_eq!(
            parse_response_head(long.as_bytes(), &limits),
            Err(ResponseHeadError::TooLarge { limit: 32 })
        );
        assert_eq!(
            parse_response_head(b"HTTP/1.1 200 OK\r\nA: 1\r\nB: 2\r\n\r\n", &limits),
            Err(ResponseHeadError::TooManyHeaders { limit: 1 })
        );
    }
}
