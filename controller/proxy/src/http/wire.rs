//! Heads as the proxy writes them. Nothing is copied through as received: the request line
//! carries the normalized path, framing is written from what was parsed, and hop-by-hop fields
//! describe the proxy's own connections.

use super::fields;
use super::head::{BodyFraming, RequestHead};
use super::response::ResponseHead;

/// What the proxy does with a client connection after a response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Persistence {
    KeepAlive,
    Close,
    /// 101 Switching Protocols: the connection becomes a tunnel.
    Upgrade,
}

/// How the body of a relayed response is framed for the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ClientBody {
    /// No body follows; a HEAD or 304 answer keeps the length it declared.
    None,
    ContentLength(u64),
    Chunked,
    /// Delimited by closing the connection.
    Unframed,
}

/// The head forwarded upstream for an allowed request.
pub(super) fn request_head(head: &RequestHead) -> Vec<u8> {
    let mut out = Vec::with_capacity(512);
    out.extend_from_slice(head.method.as_bytes());
    out.push(b' ');
    out.extend_from_slice(head.path.as_bytes());
    if let Some(query) = &head.query {
        out.push(b'?');
        out.extend_from_slice(query.as_bytes());
    }
    out.extend_from_slice(format!(" HTTP/1.{}\r\n", head.version).as_bytes());
    // The authority that was judged, also for an absolute-form target.
    if let Some(host) = &head.host {
        field(&mut out, "host", host.as_bytes());
    }
    for (name, value) in &head.headers {
        if !name.eq_ignore_ascii_case("host")
            && !fields::is_dropped_when_forwarding(name, &head.connection)
        {
            field(&mut out, name, value);
        }
    }
    match head.body {
        BodyFraming::None => {}
        BodyFraming::ContentLength(n) => {
            field(&mut out, "content-length", n.to_string().as_bytes());
        }
        BodyFraming::Chunked => field(&mut out, "transfer-encoding", b"chunked"),
    }
    // Only what was judged is offered: `h2c` never is (see `RequestHead::upgrades`).
    // Otherwise the upstream connection is the proxy's own and is kept for later requests,
    // this client's or another's, whether or not the client keeps its connection.
    if !head.upgrades.is_empty() {
        field(&mut out, "connection", b"upgrade");
        field(&mut out, "upgrade", head.upgrades.join(", ").as_bytes());
    } else if head.version == 0 {
        field(&mut out, "connection", b"keep-alive");
    }
    out.extend_from_slice(b"\r\n");
    out
}

/// The head relayed to the client for an upstream response (interim or final). The status
/// line says HTTP/1.1, the proxy's own version; the Connection field describes the client
/// connection, whatever the upstream's was.
pub(super) fn response_head(
    response: &ResponseHead,
    body: ClientBody,
    persistence: Persistence,
    client_version: u8,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(512);
    out.extend_from_slice(
        format!("HTTP/1.1 {} {}\r\n", response.status, response.reason).as_bytes(),
    );
    for (name, value) in &response.headers {
        if !fields::is_dropped_when_forwarding(name, &response.connection) {
            field(&mut out, name, value);
        }
    }
    write_response_framing(&mut out, response, body, client_version);
    match persistence {
        Persistence::Upgrade => {
            field(&mut out, "connection", b"upgrade");
            if let Some(upgrade) = response.header("upgrade") {
                field(&mut out, "upgrade", upgrade);
            }
        }
        Persistence::Close => field(&mut out, "connection", b"close"),
        Persistence::KeepAlive if client_version == 0 => {
            field(&mut out, "connection", b"keep-alive");
        }
        Persistence::KeepAlive => {}
    }
    out.extend_from_slice(b"\r\n");
    out
}

fn write_response_framing(
    out: &mut Vec<u8>,
    response: &ResponseHead,
    body: ClientBody,
    client_version: u8,
) {
    match body {
        ClientBody::ContentLength(n) => field(out, "content-length", n.to_string().as_bytes()),
        ClientBody::Chunked => field(out, "transfer-encoding", b"chunked"),
        ClientBody::Unframed => {}
        // 1xx and 204 must not declare a length (RFC 9110 §8.6); HEAD and 304 answers say
        // what a GET would have carried.
        ClientBody::None if response.is_interim() || response.status == 204 => {}
        ClientBody::None => {
            if let Some(n) = response.content_length {
                field(out, "content-length", n.to_string().as_bytes());
            } else if response.chunked && client_version == 1 {
                field(out, "transfer-encoding", b"chunked");
            }
        }
    }
}

/// A response the proxy makes itself: a short text body (left out for HEAD) with its length.
pub(super) fn local_response(
    status: u16,
    persistence: Persistence,
    client_version: u8,
    head_request: bool,
) -> Vec<u8> {
    let reason = reason(status);
    let body = match status {
        403 => "Access denied\n".to_owned(),
        _ => format!("{reason}\n"),
    };
    let mut out = format!("HTTP/1.1 {status} {reason}\r\n").into_bytes();
    field(&mut out, "content-type", b"text/plain");
    field(
        &mut out,
        "content-length",
        body.len().to_string().as_bytes(),
    );
    if status == 405 {
        // RFC 9110 §15.5.6: a 405 lists what is allowed; every method but CONNECT is.
        field(
            &mut out,
            "allow",
            b"GET, HEAD, POST, PUT, DELETE, OPTIONS, TRACE, PATCH",
        );
    }
    match persistence {
        Persistence::KeepAlive if client_version == 0 => {
            field(&mut out, "connection", b"keep-alive");
        }
        Persistence::KeepAlive | Persistence::Upgrade => {}
        Persistence::Close => field(&mut out, "connection", b"close"),
    }
    out.extend_from_slice(b"\r\n");
    if !head_request {
        out.extend_from_slice(body.as_bytes());
    }
    out
}

fn reason(status: u16) -> &'static str {
    match status {
        400 => "Bad Request",
        403 => "Forbidden",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        431 => "Request Header Fields Too Large",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        504 => "Gateway Timeout",
        505 => "HTTP Version Not Supported",
        _ => "Error",
    }
}

fn field(out: &mut Vec<u8>, name: &str, value: &[u8]) {
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::{Limits, parse_request_head, parse_response_head};

    fn text(bytes: &[u8]) -> String {
        String::from_utf8_lossy(bytes).into_owned()
    }

    fn request(raw: &str) -> RequestHead {
        parse_request_head(raw.as_bytes(), &Limits::default())
            .unwrap()
            .unwrap()
            .0
    }

    fn response(raw: &str) -> ResponseHead {
        parse_response_head(raw.as_bytes(), &Limits::default())
            .unwrap()
            .unwrap()
            .0
    }

    #[test]
    fn forwarded_request_carries_what_was_judged() {
        let head = request(
            "GET http://B/a/%2e%2e/c?q=%2e HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, X-Hop\r\n\
             X-Hop: 1\r\nKeep-Alive: 5\r\nTE: trailers\r\nX-End: 2\r\nContent-Length: 0\r\n\r\n",
        );
        assert_eq!(
            text(&request_head(&head)),
            "GET /c?q=%2e HTTP/1.1\r\nhost: b\r\nX-End: 2\r\ncontent-length: 0\r\n\r\n"
        );
    }

    #[test]
    fn forwarded_request_states_its_own_persistence() {
        // The client's wish to close is its own connection's: the upstream one is kept.
        let close = request(
            "POST / HTTP/1.1\r\nHost: a\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n",
        );
        assert_eq!(
            text(&request_head(&close)),
            "POST / HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\n"
        );
        for old in [
            "GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
            "GET / HTTP/1.0\r\n\r\n",
        ] {
            assert_eq!(
                text(&request_head(&request(old))),
                "GET / HTTP/1.0\r\nconnection: keep-alive\r\n\r\n"
            );
        }
        let ws = request(
            "GET /ws HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n",
        );
        assert_eq!(
            text(&request_head(&ws)),
            "GET /ws HTTP/1.1\r\nhost: a\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n"
        );
    }

    #[test]
    fn an_h2c_offer_is_never_forwarded() {
        let h2c = request(
            "GET /public/x HTTP/1.1\r\nHost: a\r\nConnection: Upgrade, HTTP2-Settings\r\n\
             Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\nAccept: */*\r\n\r\n",
        );
        assert_eq!(
            text(&request_head(&h2c)),
            "GET /public/x HTTP/1.1\r\nhost: a\r\nAccept: */*\r\n\r\n"
        );
        // Without Connection naming it, HTTP2-Settings still goes: it only serves h2c.
        let mixed = request(
            "GET /ws HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: h2c, websocket\r\n\
             HTTP2-Settings: AAMA\r\n\r\n",
        );
        assert_eq!(
            text(&request_head(&mixed)),
            "GET /ws HTTP/1.1\r\nhost: a\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n"
        );
    }

    #[test]
    fn relayed_response_is_reframed_for_the_client() {
        let head = response(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: x\r\nX: 1\r\nA: b\r\n\r\n",
        );
        assert_eq!(
            text(&response_head(
                &head,
                ClientBody::Chunked,
                Persistence::KeepAlive,
                1
            )),
            "HTTP/1.1 200 OK\r\nA: b\r\ntransfer-encoding: chunked\r\n\r\n"
        );
        assert_eq!(
            text(&response_head(
                &head,
                ClientBody::Unframed,
                Persistence::Close,
                0
            )),
            "HTTP/1.1 200 OK\r\nA: b\r\nconnection: close\r\n\r\n"
        );
        let head = response("HTTP/1.0 200 OK\r\nContent-Length: 3\r\n\r\n");
        assert_eq!(
            text(&response_head(
                &head,
                ClientBody::None,
                Persistence::KeepAlive,
                0
            )),
            "HTTP/1.1 200 OK\r\ncontent-length: 3\r\nconnection: keep-alive\r\n\r\n"
        );
        let head = response("HTTP/1.1 204 No Content\r\nContent-Length: 3\r\n\r\n");
        assert_eq!(
            text(&response_head(
                &head,
                ClientBody::None,
                Persistence::KeepAlive,
                1
            )),
            "HTTP/1.1 204 No Content\r\n\r\n"
        );
    }

    #[test]
    fn switching_protocols_keeps_the_upgrade() {
        let head = response(
            "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Accept: x\r\n\r\n",
        );
        assert_eq!(
            text(&response_head(
                &head,
                ClientBody::None,
                Persistence::Upgrade,
                1
            )),
            "HTTP/1.1 101 Switching Protocols\r\nSec-WebSocket-Accept: x\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n"
        );
    }

    #[test]
    fn local_responses_have_a_short_body_except_for_head() {
        assert_eq!(
            text(&local_response(403, Persistence::KeepAlive, 1, false)),
            "HTTP/1.1 403 Forbidden\r\ncontent-type: text/plain\r\ncontent-length: 14\r\n\r\nAccess denied\n"
        );
        assert_eq!(
            text(&local_response(403, Persistence::Close, 1, true)),
            "HTTP/1.1 403 Forbidden\r\ncontent-type: text/plain\r\ncontent-length: 14\r\nconnection: close\r\n\r\n"
        );
        let not_allowed = text(&local_response(405, Persistence::Close, 1, false));
        assert!(not_allowed.contains("\r\nallow: GET"), "{not_allowed}");
    }
}
