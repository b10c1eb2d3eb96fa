//! The HTTP/1.1 core of Palisade's L7 proxy: one client connection in, requests judged one by
//! one, allowed ones forwarded to one upstream, every request recorded.
//!
//! [`serve_connection`] is the only async entry point. Everything that reads untrusted bytes is
//! also a plain function, tested and fuzzed on its own: [`parse_request_head`],
//! [`parse_target`] / [`normalize_path`], [`ChunkedDecoder`] and [`parse_response_head`].
//!
//! # What policy sees is what the upstream gets
//!
//! The judged head is re-serialized for the upstream, never copied: the request line carries
//! the normalized path and the query as received, `Host` carries the judged authority, framing
//! is written from what was parsed (chunk by chunk for chunked bodies, size lines without
//! extensions), and hop-by-hop fields (`Connection`, the fields it names, `Keep-Alive`, `TE`,
//! `Upgrade`, `Proxy-Connection`, and `HTTP2-Settings`) are dropped and rewritten for the
//! proxy's own connections.
//!
//! # Upgrades
//!
//! An HTTP/1.1 request whose Connection lists `upgrade` asks to switch to the protocols of its
//! Upgrade fields (one list; anything but `name` or `name/version` tokens is a 400).
//!
//! - `h2c` is never honoured: it is stripped from the list before the request is judged, and
//!   `HTTP2-Settings` is never forwarded. After a 101 the client would speak HTTP/2 through a
//!   byte tunnel, every request on it unjudged (h2c smuggling); Envoy never passes h2c either.
//!   A request left with no protocol is an ordinary request and is forwarded as one, so the
//!   upstream never sees an h2c offer and never answers 101 to it.
//! - `judge` sees the rest ([`RequestHead::upgrades`]); policy allows `websocket` with any rule
//!   that allows the request, and other protocols only when an HTTP rule lists them (the
//!   answer to a refused one is 403, as for any denied request). What was judged is what the
//!   upstream is offered.
//! - The connection becomes a tunnel only when the upstream answers 101 switching to protocols
//!   the request offered (a 101 to a request that offered none, or to another protocol, is a
//!   502). Any other answer continues as plain HTTP.
//! - Each tunnel is reported twice as a [`TunnelRecord`]: when it opens and when it closes,
//!   with the bytes relayed each way.
//!
//! # Path normalization
//!
//! - The target is origin-form (`/path?query`); absolute-form (`http://host/path`) is accepted,
//!   its authority (lower-cased, no userinfo) overriding `Host`, and forwarded in origin-form;
//!   `*` only with `OPTIONS`; anything else (authority-form, `https://...`) is a 400.
//! - The query is split off at the first `?` and forwarded as received; it must not contain
//!   control bytes or a fragment (`#` anywhere in the target is a 400).
//! - Escapes of unreserved characters (ALPHA DIGIT `-` `.` `_` `~`) are decoded; other escapes
//!   are kept with upper-case hex (`%2f` becomes `%2F` and still separates nothing). A `%` not
//!   followed by two hex digits is a 400.
//! - A raw backslash, control byte (NUL included), DEL or space is a 400. Raw bytes that RFC
//!   3986 does not allow in a path (non-ASCII, `"<>^`{|}`) are percent-encoded, so each has
//!   one spelling.
//! - Runs of `/` collapse into one, then dot segments are removed as in RFC 3986 §5.2.4: `.`
//!   vanishes, `..` removes the previous segment and never climbs above `/`, and a final `.`
//!   or `..` leaves a trailing `/`. Collapsing first makes `/a//../b` read as `/a/../b`.
//! - So `/./a`, `//a`, `/b/../a`, `/%2e%2e/a`, `/%2E/a` and `/%61` are all `/a`, and
//!   normalizing twice changes nothing.
//!
//! # Connection handling
//!
//! - Requests are read, judged and answered strictly in order; pipelined ones wait in the read
//!   buffer. `judge` runs for every request, so a policy change reaches open connections.
//! - A denied request gets `403 Forbidden`. The connection stays open only if the request has
//!   no body (its bytes were never read) and the client wants keep-alive.
//! - Malformed requests get 400 (431 for oversized heads, 405 for CONNECT, 501 for transfer
//!   codings other than `chunked`, 505 for versions other than HTTP/1.0 and 1.1, 408 for a head
//!   or body that stalls) and the connection is closed: after a framing error the rest of the
//!   stream cannot be trusted. Every error the proxy answers itself closes the connection,
//!   except 403 as above.
//! - Upstream failures before a response started are 502 (504 for timeouts) and close the
//!   client connection; after it started, the client connection is closed mid-response.
//! - The upstream connection is opened for the first allowed request (or taken idle from
//!   [`Upstreams`], left by an earlier client connection) and kept while the upstream allows
//!   it: it is the proxy's own, asked to stay open whatever the client wants. When the client
//!   connection ends, an idle one goes back to [`Upstreams`]. It is checked for closure (or
//!   unexpected bytes) before reuse, and a request without a body whose reused connection
//!   closed before answering is retried once on a new connection.
//! - The request body and the response are relayed concurrently, so an upstream may answer
//!   before it has read the whole body (interim 1xx responses are relayed to HTTP/1.1 clients).
//!   If the response ends before the request body does, both connections are closed.
//! - A `Connection: close` from either side closes the client connection after the response;
//!   so does a response delimited by closing. HTTP/1.0 clients keep the connection only with
//!   `Connection: keep-alive`, and get a chunked response as plain data, then a close.
//! - An allowed upgrade whose upstream answers 101 turns the connection into a tunnel with no
//!   inactivity timeout (websockets idle legitimately); when one direction ends, the other has
//!   [`Limits::close_linger`] to finish. Any other answer continues as plain HTTP.
//! - `CONNECT` gets 405: the destination is already known, and a tunnel to anywhere else is
//!   not the proxy's to open.
//! - Closing after an error response shuts down the write side, then drains the client for
//!   up to [`Limits::close_linger`] so that unread request bytes do not make the kernel reset
//!   the connection before the client has read the response.

mod chunked;
mod fields;
mod head;
mod path;
mod response;
mod serve;
mod stream;
mod wire;

#[cfg(test)]
mod tests;

use std::time::Duration;

pub use chunked::{ChunkEvent, ChunkedDecoder, ChunkedError, MAX_CHUNK_LINE};
pub use fields::{Field, FramingError};
pub use head::{BodyFraming, HeadError, RequestHead, parse_request_head};
pub use path::{PathError, Target, normalize_path, parse_target};
pub use response::{ResponseBody, ResponseHead, ResponseHeadError, parse_response_head};
pub use serve::{ProxyError, Unpooled, Upstreams, serve_connection};

/// Ceiling on [`Limits::max_headers`]: parse slots live on the stack (no allocation per
/// request), so their number is fixed at build time.
pub const MAX_HEADERS_CAP: usize = 128;

/// Bounds on what one client connection may make the proxy hold or wait for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Largest request or response head, and largest trailer section.
    pub max_head_bytes: usize,
    /// Most fields in a head or trailer section (at most [`MAX_HEADERS_CAP`]).
    pub max_headers: usize,
    /// Time to receive a whole request head once its first byte arrived.
    pub head_timeout: Duration,
    /// Time to wait for the next request on an idle connection (the first one included).
    pub idle_timeout: Duration,
    /// Longest inactivity while a body streams, either way.
    pub body_timeout: Duration,
    pub upstream_connect_timeout: Duration,
    /// Time from the end of the request to the final response head.
    pub upstream_response_timeout: Duration,
    /// How long a closing connection is drained, and how long a tunnel's second direction
    /// may run on after the first ended.
    pub close_linger: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_head_bytes: 16 * 1024,
            max_headers: 100,
            head_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_mins(1),
            body_timeout: Duration::from_secs(30),
            upstream_connect_timeout: Duration::from_secs(5),
            upstream_response_timeout: Duration::from_mins(1),
            close_linger: Duration::from_secs(2),
        }
    }
}

/// What policy says about one request; `rule` is an opaque id reported back in the record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Allow {
        rule: u32,
    },
    /// Policy denies it, but the side that denies is in audit: forwarded, and recorded as
    /// audited, naming the denying rule.
    Audit {
        rule: u32,
    },
    Deny {
        rule: u32,
    },
    /// Denied because no rule allows switching to `protocol` (one of
    /// [`RequestHead::upgrades`]); the record says so.
    DenyUpgrade {
        rule: u32,
        protocol: String,
    },
}

/// What a connection reports, as it happens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    Request(RequestRecord),
    Tunnel(TunnelRecord),
}

/// One request's outcome, reported once per request (allowed, denied or malformed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestRecord {
    /// Empty when the request line could not be read.
    pub method: String,
    /// The normalized path; for a malformed request, the target as received (shortened).
    pub path: String,
    pub host: Option<String>,
    /// The status the client got, or was getting when the exchange failed.
    pub status: u16,
    pub allowed: bool,
    /// Forwarded although policy denies it: the denying side is in audit (`rule` denies it).
    pub audited: bool,
    /// The deciding rule; 0 when policy was not consulted.
    pub rule: u32,
    /// From the complete request head to the response head sent.
    pub latency: Duration,
    /// Why the proxy answered with an error, why policy denied it when that needs saying (a
    /// refused upgrade names its protocol), or why the exchange was cut short.
    pub error: Option<String>,
}

impl RequestRecord {
    /// Whether policy denied the request (its answer was the proxy's own 403), rather than
    /// the proxy refusing it as malformed.
    pub fn policy_denied(&self) -> bool {
        !self.allowed && self.status == 403
    }
}

/// Whether a tunnel has just opened or has ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TunnelEvent {
    Opened,
    Closed,
}

/// A tunnel a 101 turned the connection into: reported when it opens (counts zero) and again
/// when it closes, with what it relayed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TunnelRecord {
    pub event: TunnelEvent,
    /// The protocol the upstream switched to, as its 101 named it (its Upgrade field).
    pub protocol: String,
    /// The deciding rule of the request that opened the tunnel.
    pub rule: u32,
    /// Bytes relayed from the client to the upstream, early ones included.
    pub bytes_to_server: u64,
    /// Bytes relayed from the upstream to the client, after the 101 head.
    pub bytes_to_client: u64,
    /// How long the tunnel was open; zero when it opens.
    pub duration: Duration,
    /// Why the tunnel ended abnormally (a failed read or write on either side).
    pub error: Option<String>,
}
