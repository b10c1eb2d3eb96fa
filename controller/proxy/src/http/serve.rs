//! One client connection: read a head, judge it, answer or forward it, record it, repeat.

use std::future::Future;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering};
use std::time::Duration;

use futures::FutureExt as _;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt as _, ReadHalf, WriteHalf};
use tokio::time::Instant;

use super::chunked::ChunkedError;
use super::head::{BodyFraming, HeadError, RequestHead, parse_request_head};
use super::path::excerpt;
use super::response::{ResponseBody, ResponseHead, ResponseHeadError, parse_response_head};
use super::stream::{self, ChunkedOutput, CopyError, Inbound};
use super::wire::{self, ClientBody, Persistence};
use super::{Decision, Limits, Record, RequestRecord, TunnelEvent, TunnelRecord};

/// Most bytes drained from a client while closing after an error.
const LINGER_MAX_BYTES: usize = 256 * 1024;

/// Why an exchange failed. Before a response started, [`ProxyError::status`] is what the
/// client is answered with; after, the client connection is cut.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("client connection failed")]
    ClientIo(#[source] io::Error),
    #[error("client sent no request body bytes for {timeout:?}")]
    ClientBodyTimeout { timeout: Duration },
    #[error("client closed the connection before the request body was complete")]
    ClientTruncatedBody,
    #[error("malformed chunked request body")]
    ClientChunked(#[source] ChunkedError),
    #[error("client read nothing of the response for {timeout:?}")]
    ClientWriteTimeout { timeout: Duration },
    #[error("connecting to the upstream failed")]
    UpstreamConnect(#[source] io::Error),
    #[error("connecting to the upstream took longer than {timeout:?}")]
    UpstreamConnectTimeout { timeout: Duration },
    #[error("upstream connection failed")]
    UpstreamIo(#[source] io::Error),
    #[error("upstream read nothing of the request for {timeout:?}")]
    UpstreamWriteTimeout { timeout: Duration },
    #[error("upstream closed the connection before responding")]
    UpstreamClosedBeforeResponse,
    #[error("upstream closed the connection in the middle of a response head")]
    UpstreamTruncatedHead,
    #[error("upstream sent no response head within {timeout:?} of the request")]
    UpstreamResponseTimeout { timeout: Duration },
    #[error("malformed upstream response head")]
    UpstreamHead(#[source] ResponseHeadError),
    #[error("upstream switched protocols on a request that asked for no upgrade")]
    UnexpectedUpgrade,
    #[error("upstream switched protocols without naming the protocol (no Upgrade field)")]
    UpgradeWithoutProtocol,
    #[error("upstream switched to {protocol:?}, which the request did not offer")]
    UpgradeNotOffered { protocol: String },
    #[error("upstream closed the connection before the response body was complete")]
    UpstreamTruncatedBody,
    #[error("malformed chunked response body")]
    UpstreamChunked(#[source] ChunkedError),
    #[error("upstream sent no response body bytes for {timeout:?}")]
    UpstreamBodyTimeout { timeout: Duration },
}

impl ProxyError {
    /// The status answering this failure when no response has started.
    pub fn status(&self) -> u16 {
        match self {
            ProxyError::ClientIo(_)
            | ProxyError::ClientTruncatedBody
            | ProxyError::ClientChunked(_) => 400,
            ProxyError::ClientBodyTimeout { .. } | ProxyError::ClientWriteTimeout { .. } => 408,
            ProxyError::UpstreamConnectTimeout { .. }
            | ProxyError::UpstreamWriteTimeout { .. }
            | ProxyError::UpstreamResponseTimeout { .. } => 504,
            ProxyError::UpstreamConnect(_)
            | ProxyError::UpstreamIo(_)
            | ProxyError::UpstreamClosedBeforeResponse
            | ProxyError::UpstreamTruncatedHead
            | ProxyError::UpstreamHead(_)
            | ProxyError::UnexpectedUpgrade
            | ProxyError::UpgradeWithoutProtocol
            | ProxyError::UpgradeNotOffered { .. }
            | ProxyError::UpstreamTruncatedBody
            | ProxyError::UpstreamChunked(_)
            | ProxyError::UpstreamBodyTimeout { .. } => 502,
        }
    }
}

/// Which way bytes were copied, to blame the right side for a failed copy.
#[derive(Debug, Clone, Copy)]
enum Direction {
    ToUpstream,
    ToClient,
}

impl CopyError {
    fn blame(self, direction: Direction, idle: Duration) -> ProxyError {
        let timeout = idle;
        match (direction, self) {
            (Direction::ToUpstream, CopyError::Read(e)) => ProxyError::ClientIo(e),
            (Direction::ToUpstream, CopyError::ReadTimeout) => {
                ProxyError::ClientBodyTimeout { timeout }
            }
            (Direction::ToUpstream, CopyError::Truncated) => ProxyError::ClientTruncatedBody,
            (Direction::ToUpstream, CopyError::Chunked(e)) => ProxyError::ClientChunked(e),
            (Direction::ToUpstream, CopyError::Write(e)) => ProxyError::UpstreamIo(e),
            (Direction::ToUpstream, CopyError::WriteTimeout) => {
                ProxyError::UpstreamWriteTimeout { timeout }
            }
            (Direction::ToClient, CopyError::Read(e)) => ProxyError::UpstreamIo(e),
            (Direction::ToClient, CopyError::ReadTimeout) => {
                ProxyError::UpstreamBodyTimeout { timeout }
            }
            (Direction::ToClient, CopyError::Truncated) => ProxyError::UpstreamTruncatedBody,
            (Direction::ToClient, CopyError::Chunked(e)) => ProxyError::UpstreamChunked(e),
            (Direction::ToClient, CopyError::Write(e)) => ProxyError::ClientIo(e),
            (Direction::ToClient, CopyError::WriteTimeout) => {
                ProxyError::ClientWriteTimeout { timeout }
            }
        }
    }

    /// Whether the reading side (rather than the writing side) failed.
    fn is_read_side(&self) -> bool {
        !matches!(self, CopyError::Write(_) | CopyError::WriteTimeout)
    }
}

/// Where a client connection's upstream connections come from, and where the ones it leaves
/// idle go.
pub trait Upstreams {
    type Stream: AsyncRead + AsyncWrite + Unpin;
    /// An idle connection to the same upstream that another client connection left, if any.
    /// It is checked before use, and dropped if it closed meanwhile.
    fn take_idle(&mut self) -> Option<Self::Stream>;
    /// Opens a new connection. Send, so that a connection can be served on any runtime.
    fn connect(&mut self) -> impl Future<Output = io::Result<Self::Stream>> + Send;
    /// Takes back a connection left idle between requests, its last response read whole.
    fn release(&mut self, stream: Self::Stream);
}

/// Upstreams that no other client connection shares: each one opened by the function, and
/// closed when its client connection ends.
pub struct Unpooled<F>(pub F);

impl<F, Fut, U> Upstreams for Unpooled<F>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = io::Result<U>> + Send,
    U: AsyncRead + AsyncWrite + Unpin,
{
    type Stream = U;

    fn take_idle(&mut self) -> Option<U> {
        None
    }

    fn connect(&mut self) -> impl Future<Output = io::Result<U>> + Send {
        (self.0)()
    }

    fn release(&mut self, _stream: U) {}
}

/// Serves one client connection until it ends.
///
/// `upstreams` gives the upstream connection: lazily, on the first allowed request, and again
/// when the previous one closed; it gets back the one left idle when the client connection
/// ends. `judge` is consulted for every request, `record` is called once per request and
/// twice per tunnel (opened, closed). Returns `Err` only when the connection ended
/// abnormally: a client I/O failure, or a response or tunnel cut short. Requests answered
/// with an error status end in `Ok`, with the error in their record.
pub async fn serve_connection<C, Up>(
    client: C,
    upstreams: Up,
    judge: impl Fn(&RequestHead) -> Decision,
    record: impl FnMut(Record),
    limits: &Limits,
) -> Result<(), ProxyError>
where
    C: AsyncRead + AsyncWrite + Unpin,
    Up: Upstreams,
{
    let (reader, writer) = tokio::io::split(client);
    let mut connection = Connection {
        client: Inbound::new(reader),
        client_out: writer,
        upstream: None,
        upstreams,
        judge,
        record,
        limits,
        audited: false,
    };
    let served = connection.serve().await;
    // Whatever ended the client connection, an upstream idle between requests can serve
    // another one.
    connection.release_upstream();
    served
}

/// The upstream connection: its read side buffered, like the client's.
struct Upstream<U> {
    input: Inbound<ReadHalf<U>>,
    output: WriteHalf<U>,
}

impl<U: AsyncRead + AsyncWrite + Unpin> Upstream<U> {
    fn new(stream: U) -> Self {
        let (reader, writer) = tokio::io::split(stream);
        Upstream {
            input: Inbound::new(reader),
            output: writer,
        }
    }

    /// Whether the connection is idle and still open: a read that would complete now means
    /// the upstream closed or sent bytes nobody asked for, either way it is not reusable.
    fn is_reusable(&mut self) -> bool {
        self.input.buffered().is_empty() && self.input.fill().now_or_never().is_none()
    }

    /// The connection whole again; only for one [`Upstream::is_reusable`] found idle, whose
    /// read buffer is empty.
    fn into_stream(self) -> U {
        self.input.into_inner().unsplit(self.output)
    }
}

/// What comes next on a client connection.
enum Next {
    KeepAlive,
    /// Close after shutting down and draining.
    Close,
    /// The connection is over (a tunnel ended): drop it.
    Finished,
}

/// What reading a request head produced.
enum Incoming {
    Request {
        head: RequestHead,
        len: usize,
    },
    Malformed(HeadError),
    /// A head started but was not complete within `head_timeout`.
    TimedOut,
    /// The client closed, or stayed idle past `idle_timeout`.
    Closed,
}

/// A relayed response and whether the request body reached the upstream whole.
struct Outcome {
    relayed: Relayed,
    body_complete: bool,
}

/// What one forwarded request led to.
enum Exchange {
    Relayed(Outcome),
    Failed {
        error: ProxyError,
        /// The status already sent to the client, if the final response head went out.
        sent: Option<u16>,
        /// Whether nothing of the request body was read and nothing of a response received:
        /// the request may go again on a fresh upstream connection.
        retry_safe: bool,
    },
}

/// What the exchange loop and the response relay tell each other.
#[derive(Default)]
struct Progress {
    /// 0 until the final response head goes out, then its status.
    sent: AtomicU16,
    /// Whether the request body has been forwarded whole.
    body_done: AtomicBool,
}

impl Progress {
    fn sent_status(&self) -> Option<u16> {
        Some(self.sent.load(Ordering::Relaxed)).filter(|&status| status != 0)
    }

    fn mark_sent(&self, status: u16) {
        self.sent.store(status, Ordering::Relaxed);
    }
}

/// A final response relayed in full (or a 101 relayed before tunnelling).
struct Relayed {
    status: u16,
    client_keep_alive: bool,
    upstream_reusable: bool,
    head_sent: Instant,
    /// After a 101: the protocol the upstream switched to.
    upgraded: Option<String>,
}

/// Bytes a tunnel relayed, each way; counted as they go, so a direction cut off after the
/// grace period still reports what it moved.
#[derive(Default)]
struct TunnelBytes {
    to_server: AtomicU64,
    to_client: AtomicU64,
}

struct Connection<'l, C, Up: Upstreams, J, Re> {
    client: Inbound<ReadHalf<C>>,
    client_out: WriteHalf<C>,
    upstream: Option<Upstream<Up::Stream>>,
    upstreams: Up,
    judge: J,
    record: Re,
    limits: &'l Limits,
    /// The request being served was let through by audit mode (policy denied it).
    audited: bool,
}

impl<C, Up, J, Re> Connection<'_, C, Up, J, Re>
where
    C: AsyncRead + AsyncWrite + Unpin,
    Up: Upstreams,
    J: Fn(&RequestHead) -> Decision,
    Re: FnMut(Record),
{
    async fn serve(&mut self) -> Result<(), ProxyError> {
        loop {
            let head = match self.read_head().await? {
                Incoming::Request { head, len } => {
                    self.client.consume(len);
                    head
                }
                Incoming::Closed => return Ok(()),
                Incoming::Malformed(error) => {
                    self.release_upstream();
                    let status = error.status();
                    return self.reject(status, error_chain(&error)).await;
                }
                Incoming::TimedOut => {
                    self.release_upstream();
                    let why = format!(
                        "request head not complete within {:?}",
                        self.limits.head_timeout
                    );
                    return self.reject(408, why).await;
                }
            };
            match self.handle(&head).await? {
                Next::KeepAlive => {}
                Next::Close => {
                    // Before lingering: the upstream is free as soon as the response is out.
                    self.release_upstream();
                    self.linger_close().await;
                    return Ok(());
                }
                Next::Finished => return Ok(()),
            }
        }
    }

    /// Reads until a complete head, an invalid one, a timeout or the end of the connection.
    async fn read_head(&mut self) -> Result<Incoming, ProxyError> {
        let mut deadline = None;
        // Bytes already known to hold no line end: parsing again before a new line arrives
        // cannot complete the head, and a client trickling bytes would make it quadratic.
        let mut scanned = 0;
        loop {
            let buffered = self.client.buffered();
            if !buffered.is_empty() {
                let oversized = buffered.len() >= self.limits.max_head_bytes;
                if oversized || buffered[scanned..].contains(&b'\n') {
                    match parse_request_head(buffered, self.limits) {
                        Ok(Some((head, len))) => return Ok(Incoming::Request { head, len }),
                        Ok(None) => {}
                        Err(error) => return Ok(Incoming::Malformed(error)),
                    }
                }
                scanned = buffered.len();
                deadline.get_or_insert_with(|| Instant::now() + self.limits.head_timeout);
            }
            let read = match deadline {
                None => tokio::time::timeout(self.limits.idle_timeout, self.client.fill()).await,
                Some(at) => match tokio::time::timeout_at(at, self.client.fill()).await {
                    Ok(read) => Ok(read),
                    Err(_) => return Ok(Incoming::TimedOut),
                },
            };
            match read {
                Err(_idle) => return Ok(Incoming::Closed),
                Ok(Ok(0)) => return Ok(Incoming::Closed),
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(ProxyError::ClientIo(e)),
            }
        }
    }

    /// Answers a request that could not be read with `status`, records it, and closes.
    async fn reject(&mut self, status: u16, why: String) -> Result<(), ProxyError> {
        let (method, path) = request_line_hint(self.client.buffered());
        let started = Instant::now();
        let response = wire::local_response(status, Persistence::Close, 1, false);
        // Recorded before the client can read the answer, so a client that asks for its flow
        // right after finds it.
        (self.record)(Record::Request(RequestRecord {
            method,
            path,
            host: None,
            status,
            allowed: false,
            audited: false,
            rule: 0,
            latency: started.elapsed(),
            error: Some(why),
        }));
        self.write_client(&response).await?;
        self.linger_close().await;
        Ok(())
    }

    async fn handle(&mut self, head: &RequestHead) -> Result<Next, ProxyError> {
        let started = Instant::now();
        let decision = (self.judge)(head);
        self.audited = matches!(decision, Decision::Audit { .. });
        match decision {
            Decision::Deny { rule } => self.deny(head, rule, started, None).await,
            Decision::DenyUpgrade { rule, protocol } => {
                let why = format!("upgrade to {protocol:?} is not allowed by any HTTP rule");
                self.deny(head, rule, started, Some(why)).await
            }
            Decision::Allow { rule } | Decision::Audit { rule } => {
                self.forward(head, rule, started).await
            }
        }
    }

    /// Answers 403; `why` explains a denial that needs explaining (a refused upgrade).
    async fn deny(
        &mut self,
        head: &RequestHead,
        rule: u32,
        started: Instant,
        why: Option<String>,
    ) -> Result<Next, ProxyError> {
        // The body was never read; closing is the only way to stay in step with the client.
        let keep = head.keep_alive && !head.body.has_body();
        let persistence = if keep {
            Persistence::KeepAlive
        } else {
            Persistence::Close
        };
        let response = wire::local_response(403, persistence, head.version, head.method == "HEAD");
        // Recorded before the client can read the 403, so a client that asks for its flow right
        // after finds it; a client gone before the answer reached it is the proxy's error.
        self.record_request(head, 403, false, rule, started.elapsed(), why);
        self.write_client(&response).await?;
        Ok(if keep { Next::KeepAlive } else { Next::Close })
    }

    async fn forward(
        &mut self,
        head: &RequestHead,
        rule: u32,
        started: Instant,
    ) -> Result<Next, ProxyError> {
        let request = wire::request_head(head);
        let mut retried = false;
        loop {
            let (mut upstream, reused) = match self.take_upstream().await {
                Ok(taken) => taken,
                Err(error) => return self.fail(head, rule, started, error, None).await,
            };
            let exchange = exchange(
                &mut self.client,
                &mut self.client_out,
                &mut upstream,
                head,
                &request,
                self.limits,
            )
            .await;
            // A failed exchange drops `upstream`: its state is unknown.
            match exchange {
                Exchange::Failed {
                    retry_safe: true, ..
                } if reused && !retried && !head.body.has_body() => {
                    // The idle upstream closed as the request went out: a race every
                    // keep-alive client has, not a failure of the request.
                    retried = true;
                }
                Exchange::Failed { error, sent, .. } => {
                    return self.fail(head, rule, started, error, sent).await;
                }
                Exchange::Relayed(outcome) => {
                    return self.finish(head, rule, started, outcome, upstream).await;
                }
            }
        }
    }

    /// Records a relayed response and decides what happens to both connections.
    async fn finish(
        &mut self,
        head: &RequestHead,
        rule: u32,
        started: Instant,
        outcome: Outcome,
        upstream: Upstream<Up::Stream>,
    ) -> Result<Next, ProxyError> {
        let Outcome {
            relayed,
            body_complete,
        } = outcome;
        let latency = relayed.head_sent.saturating_duration_since(started);
        self.record_request(head, relayed.status, true, rule, latency, None);
        if let Some(protocol) = relayed.upgraded {
            if !body_complete {
                // Tunnelling now would pass the rest of a framed body through as raw bytes.
                return Ok(Next::Close);
            }
            return self.tunnel(protocol, rule, upstream).await;
        }
        if relayed.upstream_reusable && body_complete {
            self.upstream = Some(upstream);
        }
        Ok(if relayed.client_keep_alive && body_complete {
            Next::KeepAlive
        } else {
            Next::Close
        })
    }

    /// Relays bytes both ways until the tunnel ends, reporting it when it opens and closes.
    async fn tunnel(
        &mut self,
        protocol: String,
        rule: u32,
        upstream: Upstream<Up::Stream>,
    ) -> Result<Next, ProxyError> {
        let report = |event, bytes: &TunnelBytes, duration, error| {
            Record::Tunnel(TunnelRecord {
                event,
                protocol: protocol.clone(),
                rule,
                bytes_to_server: bytes.to_server.load(Ordering::Relaxed),
                bytes_to_client: bytes.to_client.load(Ordering::Relaxed),
                duration,
                error,
            })
        };
        let bytes = TunnelBytes::default();
        (self.record)(report(TunnelEvent::Opened, &bytes, Duration::ZERO, None));
        let opened = Instant::now();
        let grace = self.limits.close_linger;
        let result = tunnel(
            &mut self.client,
            &mut self.client_out,
            upstream,
            grace,
            &bytes,
        )
        .await;
        let error = result.as_ref().err().map(|e| error_chain(e));
        (self.record)(report(TunnelEvent::Closed, &bytes, opened.elapsed(), error));
        result.map(|()| Next::Finished)
    }

    /// Records a failed exchange; answers it if no response started, else cuts the client.
    async fn fail(
        &mut self,
        head: &RequestHead,
        rule: u32,
        started: Instant,
        error: ProxyError,
        sent: Option<u16>,
    ) -> Result<Next, ProxyError> {
        if let Some(status) = sent {
            self.record_request(
                head,
                status,
                true,
                rule,
                started.elapsed(),
                Some(error_chain(&error)),
            );
            return Err(error);
        }
        let status = error.status();
        let response = wire::local_response(
            status,
            Persistence::Close,
            head.version,
            head.method == "HEAD",
        );
        // Recorded before the client can read the answer (as a denial is).
        self.record_request(
            head,
            status,
            true,
            rule,
            started.elapsed(),
            Some(error_chain(&error)),
        );
        self.write_client(&response).await?;
        Ok(Next::Close)
    }

    /// Takes this connection's idle upstream connection if it is still usable, else one
    /// another client connection left, else opens one; says whether it was reused.
    async fn take_upstream(&mut self) -> Result<(Upstream<Up::Stream>, bool), ProxyError> {
        if let Some(mut upstream) = self.upstream.take()
            && upstream.is_reusable()
        {
            return Ok((upstream, true));
        }
        while let Some(stream) = self.upstreams.take_idle() {
            let mut upstream = Upstream::new(stream);
            if upstream.is_reusable() {
                return Ok((upstream, true));
            }
        }
        let timeout = self.limits.upstream_connect_timeout;
        let stream = match tokio::time::timeout(timeout, self.upstreams.connect()).await {
            Err(_) => return Err(ProxyError::UpstreamConnectTimeout { timeout }),
            Ok(Err(e)) => return Err(ProxyError::UpstreamConnect(e)),
            Ok(Ok(stream)) => stream,
        };
        Ok((Upstream::new(stream), false))
    }

    /// Hands the upstream connection left idle after the last response to `upstreams`, for
    /// other client connections, if it is still usable.
    fn release_upstream(&mut self) {
        if let Some(mut upstream) = self.upstream.take()
            && upstream.is_reusable()
        {
            self.upstreams.release(upstream.into_stream());
        }
    }

    async fn write_client(&mut self, bytes: &[u8]) -> Result<(), ProxyError> {
        let idle = self.limits.body_timeout;
        stream::write_within(&mut self.client_out, bytes, Some(idle))
            .await
            .map_err(|e| e.blame(Direction::ToClient, idle))
    }

    fn record_request(
        &mut self,
        head: &RequestHead,
        status: u16,
        allowed: bool,
        rule: u32,
        latency: Duration,
        error: Option<String>,
    ) {
        (self.record)(Record::Request(RequestRecord {
            method: head.method.clone(),
            path: head.path.clone(),
            host: head.host.clone(),
            status,
            allowed,
            audited: allowed && self.audited,
            rule,
            latency,
            error,
        }));
    }

    /// Shuts the write side, then drains what the client still sends for a while: closing a
    /// socket with unread bytes makes the kernel reset the connection, and the reset can
    /// destroy the response before the client has read it.
    async fn linger_close(&mut self) {
        let drain = async {
            // Errors only mean the client is gone already.
            let _ = self.client_out.shutdown().await;
            self.client.consume_all();
            let mut drained = 0;
            while drained < LINGER_MAX_BYTES {
                match self.client.fill().await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        drained += n;
                        self.client.consume_all();
                    }
                }
            }
        };
        let _ = tokio::time::timeout(self.limits.close_linger, drain).await;
    }
}

/// Forwards one request on `upstream` and relays the answer: the request body streams up
/// while the response streams down.
async fn exchange<C, U>(
    client: &mut Inbound<ReadHalf<C>>,
    client_out: &mut WriteHalf<C>,
    upstream: &mut Upstream<U>,
    head: &RequestHead,
    request: &[u8],
    limits: &Limits,
) -> Exchange
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let idle = limits.body_timeout;
    if let Err(e) = stream::write_within(&mut upstream.output, request, Some(idle)).await {
        return Exchange::Failed {
            error: e.blame(Direction::ToUpstream, idle),
            sent: None,
            retry_safe: true,
        };
    }
    let progress = Progress::default();
    let sent_status = || progress.sent_status();
    let Upstream { input, output } = upstream;
    let body = copy_request_body(client, output, head.body, limits);
    let relay = relay_response(input, client_out, head, limits, &progress);
    let response_deadline = tokio::time::sleep(limits.upstream_response_timeout);
    tokio::pin!(body, relay, response_deadline);
    // None while the body streams; then whether it reached the upstream whole.
    let mut body_complete: Option<bool> = None;
    loop {
        tokio::select! {
            // Body first: when both are ready, a body that has just ended counts as complete.
            biased;
            result = &mut body, if body_complete.is_none() => match result {
                Ok(()) => {
                    body_complete = Some(true);
                    progress.body_done.store(true, Ordering::Relaxed);
                    response_deadline.as_mut().reset(Instant::now() + limits.upstream_response_timeout);
                }
                Err(e) if e.is_read_side() => return Exchange::Failed {
                    error: e.blame(Direction::ToUpstream, idle),
                    sent: sent_status(),
                    retry_safe: false,
                },
                // The upstream stopped reading; it may still answer (say, 413).
                Err(_) => {
                    body_complete = Some(false);
                    response_deadline.as_mut().reset(Instant::now() + limits.upstream_response_timeout);
                }
            },
            result = &mut relay => {
                return match result {
                    Ok(relayed) => Exchange::Relayed(Outcome {
                        relayed,
                        body_complete: body_complete.unwrap_or(false),
                    }),
                    Err(error) => {
                        let retry_safe = matches!(error, ProxyError::UpstreamClosedBeforeResponse);
                        Exchange::Failed { error, sent: sent_status(), retry_safe }
                    }
                };
            },
            () = &mut response_deadline, if body_complete.is_some() && sent_status().is_none() => {
                // The final head may have started out while this select was waiting.
                if sent_status().is_none() {
                    return Exchange::Failed {
                        error: ProxyError::UpstreamResponseTimeout {
                            timeout: limits.upstream_response_timeout,
                        },
                        sent: None,
                        retry_safe: false,
                    };
                }
            },
        }
    }
}

async fn copy_request_body<R, W>(
    client: &mut Inbound<R>,
    upstream: &mut W,
    body: BodyFraming,
    limits: &Limits,
) -> Result<(), CopyError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    match body {
        BodyFraming::None => Ok(()),
        BodyFraming::ContentLength(len) => {
            stream::copy_exact(client, upstream, len, limits.body_timeout).await
        }
        BodyFraming::Chunked => {
            stream::copy_chunked(client, upstream, limits, ChunkedOutput::Rechunk).await
        }
    }
}

/// Relays interim responses, then the final one, head and body.
async fn relay_response<R, W>(
    upstream: &mut Inbound<R>,
    client: &mut W,
    request: &RequestHead,
    limits: &Limits,
    progress: &Progress,
) -> Result<Relayed, ProxyError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let idle = limits.body_timeout;
    loop {
        let response = read_response_head(upstream, limits).await?;
        if response.status == 101 {
            let protocol = switched_protocol(request, &response)?;
            let bytes = wire::response_head(&response, ClientBody::None, Persistence::Upgrade, 1);
            progress.mark_sent(101);
            write(client, &bytes, idle).await?;
            return Ok(Relayed {
                status: 101,
                client_keep_alive: false,
                upstream_reusable: false,
                head_sent: Instant::now(),
                upgraded: Some(protocol),
            });
        }
        if response.is_interim() {
            // RFC 9110 §15.2: no 1xx to an HTTP/1.0 client.
            if request.version == 1 {
                let bytes =
                    wire::response_head(&response, ClientBody::None, Persistence::KeepAlive, 1);
                write(client, &bytes, idle).await?;
            }
            continue;
        }
        return relay_final(upstream, client, request, &response, limits, progress).await;
    }
}

/// The protocol a 101 switches to: every protocol its Upgrade field names must be one the
/// request offered (and so one policy judged), compared case-insensitively (RFC 9110 §7.8).
fn switched_protocol(request: &RequestHead, response: &ResponseHead) -> Result<String, ProxyError> {
    if request.upgrades.is_empty() {
        return Err(ProxyError::UnexpectedUpgrade);
    }
    let value = response
        .header("upgrade")
        .map(|v| String::from_utf8_lossy(v).into_owned())
        .unwrap_or_default();
    let named: Vec<&str> = value
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .collect();
    if named.is_empty() {
        return Err(ProxyError::UpgradeWithoutProtocol);
    }
    let offered = |p: &str| request.upgrades.iter().any(|o| o.eq_ignore_ascii_case(p));
    if let Some(other) = named.iter().find(|p| !offered(p)) {
        return Err(ProxyError::UpgradeNotOffered {
            protocol: excerpt(other),
        });
    }
    Ok(named.join(", "))
}

/// Most body bytes sent together with a response head.
const INLINE_BODY_MAX: usize = 64 * 1024;

async fn relay_final<R, W>(
    upstream: &mut Inbound<R>,
    client: &mut W,
    request: &RequestHead,
    response: &ResponseHead,
    limits: &Limits,
    progress: &Progress,
) -> Result<Relayed, ProxyError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let idle = limits.body_timeout;
    let body = response.body(&request.method);
    let dechunk = body == ResponseBody::Chunked && request.version == 0;
    // An answer that comes before the whole request body was forwarded ends the connection
    // (the rest of the body will not be read): the head says so.
    let client_keep_alive = request.keep_alive
        && response.keep_alive
        && body != ResponseBody::UntilClose
        && !dechunk
        && progress.body_done.load(Ordering::Relaxed);
    let client_body = match body {
        ResponseBody::None => ClientBody::None,
        ResponseBody::ContentLength(n) => ClientBody::ContentLength(n),
        ResponseBody::Chunked if dechunk => ClientBody::Unframed,
        ResponseBody::Chunked => ClientBody::Chunked,
        ResponseBody::UntilClose => ClientBody::Unframed,
    };
    let persistence = if client_keep_alive {
        Persistence::KeepAlive
    } else {
        Persistence::Close
    };
    let mut bytes = wire::response_head(response, client_body, persistence, request.version);
    // A Content-Length body already read along with the head goes out in the same write: one
    // syscall and one segment instead of two for the common small response.
    let mut len_left = match body {
        ResponseBody::ContentLength(len) => len,
        _ => 0,
    };
    if len_left > 0 {
        let inline = upstream
            .buffered()
            .len()
            .min(usize::try_from(len_left).unwrap_or(usize::MAX))
            .min(INLINE_BODY_MAX);
        bytes.extend_from_slice(&upstream.buffered()[..inline]);
        upstream.consume(inline);
        len_left -= inline as u64;
    }
    progress.mark_sent(response.status);
    write(client, &bytes, idle).await?;
    let head_sent = Instant::now();
    let copied = match body {
        ResponseBody::None => Ok(()),
        ResponseBody::ContentLength(_) => {
            stream::copy_exact(upstream, client, len_left, idle).await
        }
        ResponseBody::Chunked => {
            let output = if dechunk {
                ChunkedOutput::Dechunk
            } else {
                ChunkedOutput::Rechunk
            };
            stream::copy_chunked(upstream, client, limits, output).await
        }
        ResponseBody::UntilClose => {
            stream::copy_until_close(upstream, client, Some(idle), None).await
        }
    };
    copied.map_err(|e| e.blame(Direction::ToClient, idle))?;
    Ok(Relayed {
        status: response.status,
        client_keep_alive,
        // The upstream was asked to keep the connection whatever the client wants (see
        // `wire::request_head`). Bytes after the response would be answers to nothing: do
        // not reuse.
        upstream_reusable: response.keep_alive
            && body != ResponseBody::UntilClose
            && upstream.buffered().is_empty(),
        head_sent,
        upgraded: None,
    })
}

async fn read_response_head<R: AsyncRead + Unpin>(
    upstream: &mut Inbound<R>,
    limits: &Limits,
) -> Result<ResponseHead, ProxyError> {
    loop {
        if !upstream.buffered().is_empty() {
            match parse_response_head(upstream.buffered(), limits) {
                Ok(Some((response, len))) => {
                    upstream.consume(len);
                    return Ok(response);
                }
                Ok(None) => {}
                Err(e) => return Err(ProxyError::UpstreamHead(e)),
            }
        }
        match upstream.fill().await {
            Ok(0) if upstream.buffered().is_empty() => {
                return Err(ProxyError::UpstreamClosedBeforeResponse);
            }
            Ok(0) => return Err(ProxyError::UpstreamTruncatedHead),
            Ok(_) => {}
            Err(e) => return Err(ProxyError::UpstreamIo(e)),
        }
    }
}

async fn write<W: AsyncWrite + Unpin>(
    client: &mut W,
    bytes: &[u8],
    idle: Duration,
) -> Result<(), ProxyError> {
    stream::write_within(client, bytes, Some(idle))
        .await
        .map_err(|e| e.blame(Direction::ToClient, idle))
}

/// Copies bytes both ways after a 101, starting with what each side sent early, counting them
/// in `bytes`. When one direction ends (its write side shut down in turn), the other gets
/// `grace` to finish.
async fn tunnel<C, U>(
    client: &mut Inbound<ReadHalf<C>>,
    client_out: &mut WriteHalf<C>,
    upstream: Upstream<U>,
    grace: Duration,
    bytes: &TunnelBytes,
) -> Result<(), ProxyError>
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let Upstream {
        input: mut upstream_in,
        output: mut upstream_out,
    } = upstream;
    let up = pump(
        client,
        &mut upstream_out,
        Direction::ToUpstream,
        &bytes.to_server,
    );
    let down = pump(
        &mut upstream_in,
        client_out,
        Direction::ToClient,
        &bytes.to_client,
    );
    tokio::pin!(up, down);
    let rest = tokio::select! {
        result = &mut up => { result?; tokio::time::timeout(grace, down).await }
        result = &mut down => { result?; tokio::time::timeout(grace, up).await }
    };
    // A direction still open after the grace period is simply dropped.
    rest.unwrap_or(Ok(()))
}

/// One direction of a tunnel, without inactivity timeout; ends by shutting down `dst`.
async fn pump<R, W>(
    src: &mut Inbound<R>,
    dst: &mut W,
    direction: Direction,
    counted: &AtomicU64,
) -> Result<(), ProxyError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    // Only used to label errors: there is no inactivity timeout in a tunnel.
    let unbounded = Duration::MAX;
    stream::copy_until_close(src, dst, None, Some(counted))
        .await
        .map_err(|e| e.blame(direction, unbounded))?;
    dst.shutdown().await.map_err(|e| match direction {
        Direction::ToUpstream => ProxyError::UpstreamIo(e),
        Direction::ToClient => ProxyError::ClientIo(e),
    })
}

/// The method and target of a request line that failed to parse, for its record.
fn request_line_hint(buf: &[u8]) -> (String, String) {
    let line_end = buf
        .iter()
        .position(|&b| b == b'\r' || b == b'\n')
        .unwrap_or(buf.len());
    let line = String::from_utf8_lossy(&buf[..line_end.min(2048)]);
    let mut parts = line.split(' ');
    let method = parts.next().unwrap_or_default();
    let target = parts.next().unwrap_or_default();
    (excerpt(method), excerpt(target))
}

/// An error and its sources, one sentence each.
fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
