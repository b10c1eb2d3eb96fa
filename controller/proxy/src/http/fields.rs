//! Header fields that decide message framing and connection handling, read the same strict way
//! for requests and responses: a message whose length two parties could read differently is
//! rejected, never guessed at (request smuggling lives in those differences).

use super::path::excerpt;

/// A header field as received: name (case preserved) and value (OWS trimmed by httparse).
pub type Field = (String, Vec<u8>);

/// Why a message's framing headers were rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FramingError {
    #[error("both Content-Length and Transfer-Encoding are present")]
    ContentLengthWithTransferEncoding,
    #[error("more than one Content-Length field")]
    DuplicateContentLength,
    #[error("invalid Content-Length {value:?}")]
    InvalidContentLength { value: String },
    #[error("unsupported transfer coding in {value:?}: only `chunked` is implemented")]
    UnsupportedTransferEncoding { value: String },
    #[error("invalid Transfer-Encoding {value:?}: `chunked` must appear exactly once")]
    InvalidTransferEncoding { value: String },
    #[error("Transfer-Encoding on an HTTP/1.0 message")]
    TransferEncodingOnHttp10,
}

impl FramingError {
    /// The status a request with this framing gets: 501 for codings we do not implement (RFC
    /// 9112 §6.1), 400 for everything else.
    pub fn request_status(&self) -> u16 {
        match self {
            FramingError::UnsupportedTransferEncoding { .. } => 501,
            _ => 400,
        }
    }
}

/// How a message declares its body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Framing {
    pub content_length: Option<u64>,
    pub chunked: bool,
}

/// Reads Content-Length and Transfer-Encoding strictly (see [`FramingError`]).
pub(super) fn framing(fields: &[Field], version: u8) -> Result<Framing, FramingError> {
    let content_length = content_length(fields)?;
    let chunked = transfer_encoding_is_chunked(fields)?;
    if chunked && version == 0 {
        return Err(FramingError::TransferEncodingOnHttp10);
    }
    if chunked && content_length.is_some() {
        return Err(FramingError::ContentLengthWithTransferEncoding);
    }
    Ok(Framing {
        content_length,
        chunked,
    })
}

/// Exactly one field of 1*DIGIT that fits in a u64; equal duplicates are refused too, since a
/// peer that folds them differently would frame the message differently.
fn content_length(fields: &[Field]) -> Result<Option<u64>, FramingError> {
    let mut values = values(fields, "content-length");
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(FramingError::DuplicateContentLength);
    }
    parse_decimal(value)
        .map(Some)
        .ok_or_else(|| FramingError::InvalidContentLength {
            value: lossy(value),
        })
}

fn parse_decimal(value: &[u8]) -> Option<u64> {
    if value.is_empty() {
        return None;
    }
    value.iter().try_fold(0u64, |acc, &b| {
        let digit = char::from(b).to_digit(10)?;
        acc.checked_mul(10)?.checked_add(u64::from(digit))
    })
}

/// Whether Transfer-Encoding (all fields, as one list) is exactly `chunked`.
fn transfer_encoding_is_chunked(fields: &[Field]) -> Result<bool, FramingError> {
    let mut codings = Vec::new();
    let mut seen = false;
    for value in values(fields, "transfer-encoding") {
        seen = true;
        codings.extend(list_items(value));
    }
    if !seen {
        return Ok(false);
    }
    let joined = || {
        values(fields, "transfer-encoding")
            .map(lossy)
            .collect::<Vec<_>>()
            .join(", ")
    };
    if codings.iter().any(|c| !c.is_empty() && c != "chunked") {
        return Err(FramingError::UnsupportedTransferEncoding { value: joined() });
    }
    if codings.len() != 1 || codings[0] != "chunked" {
        return Err(FramingError::InvalidTransferEncoding { value: joined() });
    }
    Ok(true)
}

/// The lower-cased tokens of all Connection fields.
pub(super) fn connection_tokens(fields: &[Field]) -> Vec<String> {
    values(fields, "connection")
        .flat_map(list_items)
        .filter(|token| !token.is_empty())
        .collect()
}

/// Whether the connection persists after this message (RFC 9112 §9.3).
pub(super) fn persists(version: u8, tokens: &[String]) -> bool {
    let has = |t: &str| tokens.iter().any(|token| token == t);
    match version {
        0 => has("keep-alive") && !has("close"),
        _ => !has("close"),
    }
}

/// Values of the fields called `name` (ASCII case-insensitive), in order.
pub(super) fn values<'a>(fields: &'a [Field], name: &'a str) -> impl Iterator<Item = &'a [u8]> {
    fields
        .iter()
        .filter(move |(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_slice())
}

/// Fields never forwarded as received: hop-by-hop ones (RFC 9110 §7.6.1), the framing the
/// proxy writes itself after reading the body its own way, and `HTTP2-Settings`, which only
/// goes with an h2c upgrade offer (RFC 7540 §3.2, deprecated by RFC 9113), an offer the proxy
/// never passes on.
pub(super) fn is_dropped_when_forwarding(name: &str, connection_tokens: &[String]) -> bool {
    const HOP_BY_HOP: [&str; 8] = [
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "transfer-encoding",
        "upgrade",
        "content-length",
        "http2-settings",
    ];
    HOP_BY_HOP.iter().any(|h| name.eq_ignore_ascii_case(h))
        || connection_tokens
            .iter()
            .any(|token| name.eq_ignore_ascii_case(token))
}

/// An Upgrade protocol (RFC 9110 §7.8): `name` or `name/version`, both tokens.
pub(super) fn is_protocol(item: &str) -> bool {
    let is_token = |t: &str| !t.is_empty() && t.bytes().all(is_tchar);
    match item.split_once('/') {
        Some((name, version)) => is_token(name) && is_token(version),
        None => is_token(item),
    }
}

/// Whether an Upgrade protocol is HTTP/2 over cleartext, whatever its case or version.
pub(super) fn is_h2c(protocol: &str) -> bool {
    let name = protocol.split_once('/').map_or(protocol, |(name, _)| name);
    name.eq_ignore_ascii_case("h2c")
}

/// RFC 9110 §5.6.2 tchar.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Comma-separated list items, trimmed and lower-cased; empty items are kept so a caller can
/// refuse them.
fn list_items(value: &[u8]) -> impl Iterator<Item = String> + '_ {
    value
        .split(|&b| b == b',')
        .map(|item| String::from_utf8_lossy(item.trim_ascii()).to_ascii_lowercase())
}

pub(super) fn lossy(value: &[u8]) -> String {
    excerpt(&String::from_utf8_lossy(value))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(list: &[(&str, &str)]) -> Vec<Field> {
        list.iter()
            .map(|(n, v)| ((*n).to_owned(), v.as_bytes().to_vec()))
            .collect()
    }

    fn framing_of(list: &[(&str, &str)]) -> Result<Framing, FramingError> {
        framing(&fields(list), 1)
    }

    #[test]
    fn content_length_must_be_one_plain_decimal() {
        assert_eq!(
            framing_of(&[("Content-Length", "0042")])
                .unwrap()
                .content_length,
            Some(42)
        );
        assert_eq!(
            framing_of(&[("content-length", "18446744073709551615")])
                .unwrap()
                .content_length,
            Some(u64::MAX)
        );
        for bad in [
            "+5",
            "-5",
            "5 5",
            "0x5",
            "",
            "5,5",
            "18446744073709551616",
            "1e3",
        ] {
            assert!(
                matches!(
                    framing_of(&[("Content-Length", bad)]),
                    Err(FramingError::InvalidContentLength { .. })
                ),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn duplicate_content_length_is_refused_even_when_equal() {
        assert_eq!(
            framing_of(&[("Content-Length", "5"), ("content-length", "5")]),
            Err(FramingError::DuplicateContentLength)
        );
    }

    #[test]
    fn transfer_encoding_must_be_exactly_chunked() {
        assert!(
            framing_of(&[("Transfer-Encoding", "ChUnKeD")])
                .unwrap()
                .chunked
        );
        for bad in ["chunked, chunked", "chunked,", ""] {
            assert!(
                matches!(
                    framing_of(&[("Transfer-Encoding", bad)]),
                    Err(FramingError::InvalidTransferEncoding { .. })
                ),
                "{bad:?}"
            );
        }
        assert!(matches!(
            framing_of(&[
                ("Transfer-Encoding", "chunked"),
                ("Transfer-Encoding", "chunked")
            ]),
            Err(FramingError::InvalidTransferEncoding { .. })
        ));
        for bad in ["gzip, chunked", "identity", "chunked, gzip", "chunked;q=1"] {
            let err = framing_of(&[("Transfer-Encoding", bad)]).unwrap_err();
            assert!(
                matches!(err, FramingError::UnsupportedTransferEncoding { .. }),
                "{bad:?}"
            );
            assert_eq!(err.request_status(), 501);
        }
    }

    #[test]
    fn both_lengths_or_chunked_http10_are_refused() {
        assert_eq!(
            framing_of(&[("Content-Length", "1"), ("Transfer-Encoding", "chunked")]),
            Err(FramingError::ContentLengthWithTransferEncoding)
        );
        assert_eq!(
            framing(&fields(&[("Transfer-Encoding", "chunked")]), 0),
            Err(FramingError::TransferEncodingOnHttp10)
        );
    }

    #[test]
    fn persistence_depends_on_version_and_tokens() {
        let tokens = connection_tokens(&fields(&[
            ("Connection", "Keep-Alive, foo"),
            ("connection", " "),
        ]));
        assert_eq!(tokens, ["keep-alive", "foo"]);
        assert!(persists(0, &tokens));
        assert!(!persists(0, &[]));
        assert!(persists(1, &[]));
        assert!(!persists(1, &["close".to_owned()]));
        assert!(is_dropped_when_forwarding("Foo", &tokens));
        assert!(is_dropped_when_forwarding("Transfer-Encoding", &[]));
        assert!(is_dropped_when_forwarding("HTTP2-Settings", &[]));
        assert!(!is_dropped_when_forwarding("Accept", &tokens));
    }
}
