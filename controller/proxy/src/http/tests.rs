//! `serve_connection` end to end over in-memory pipes: a test client on one side, test
//! upstreams (one per `connect` call) on the other.

use std::fmt::Write as _;
use std::future::Future;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use palisade_policies::compile::{L7Policy, L7Rule};
use palisade_policies::endpoint::EndpointId;
use palisade_policies::identity::Identity;
use palisade_policies::l7::ProxyPolicy;
use palisade_policies::mapstate::{IpcacheEntry, MapState, PortPrefix, RuleId};
use palisade_policies::model::{Direction, HttpRule};
use tokio::io::{
    AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader, DuplexStream,
};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use super::*;
use crate::policy::ConnectionJudge;

/// Pipe capacity unless a test wants a small one.
const PIPE: usize = 64 * 1024;
/// Longest a test waits for one step before it fails (virtual time in paused tests).
const STEP: Duration = Duration::from_mins(2);

type Records = Arc<Mutex<Vec<RequestRecord>>>;
type Tunnels = Arc<Mutex<Vec<TunnelRecord>>>;

/// One end of a pipe, read through a buffer.
struct Peer {
    io: BufReader<DuplexStream>,
}

impl Peer {
    fn new(stream: DuplexStream) -> Self {
        Peer {
            io: BufReader::new(stream),
        }
    }

    async fn send(&mut self, bytes: &[u8]) {
        step(self.io.get_mut().write_all(bytes))
            .await
            .expect("write to the proxy");
    }

    /// Reads a head up to and including its empty line.
    async fn head(&mut self) -> String {
        let mut head = String::new();
        loop {
            let mut line = String::new();
            let n = step(self.io.read_line(&mut line))
                .await
                .expect("read a head line");
            assert!(n > 0, "connection ended inside a head: {head:?}");
            head.push_str(&line);
            if line == "\r\n" {
                return head;
            }
        }
    }

    /// Reads a head and the Content-Length body that follows it.
    async fn message(&mut self) -> (String, Vec<u8>) {
        let head = self.head().await;
        let body = self.exact(content_length(&head).unwrap_or(0)).await;
        (head, body)
    }

    async fn exact(&mut self, n: usize) -> Vec<u8> {
        let mut buf = vec![0; n];
        step(self.io.read_exact(&mut buf))
            .await
            .expect("read a body");
        buf
    }

    /// Reads until the peer closes.
    async fn rest(&mut self) -> Vec<u8> {
        let mut buf = Vec::new();
        step(self.io.read_to_end(&mut buf))
            .await
            .expect("read to the end");
        buf
    }

    /// Reads raw bytes until `end` has been seen.
    async fn until(&mut self, end: &[u8]) -> Vec<u8> {
        let mut buf = Vec::new();
        while !buf.ends_with(end) {
            let mut byte = [0u8; 1];
            let n = step(self.io.read(&mut byte)).await.expect("read");
            assert!(
                n > 0,
                "ended before {end:?}: {:?}",
                String::from_utf8_lossy(&buf)
            );
            buf.push(byte[0]);
        }
        buf
    }

    async fn expect_closed(&mut self) {
        assert_eq!(self.rest().await, b"", "expected the connection to close");
    }

    /// Nothing arrives within a short while (real time).
    async fn expect_quiet(&mut self) {
        let mut byte = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_millis(50), self.io.read(&mut byte)).await;
        assert!(read.is_err(), "unexpected bytes or close: {read:?}");
    }
}

async fn step<F: Future>(fut: F) -> F::Output {
    tokio::time::timeout(STEP, fut)
        .await
        .unwrap_or_else(|_| panic!("test step took longer than {STEP:?}"))
}

fn content_length(head: &str) -> Option<usize> {
    head.lines().find_map(|line| {
        let (name, value) = line.split_once(':')?;
        name.eq_ignore_ascii_case("content-length")
            .then(|| value.trim().parse().ok())?
    })
}

fn status_of(head: &str) -> u16 {
    head.get(9..12)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {head:?}"))
}

struct Proxy {
    client: Peer,
    upstreams: mpsc::UnboundedReceiver<DuplexStream>,
    records: Records,
    tunnels: Tunnels,
    task: JoinHandle<Result<(), ProxyError>>,
}

impl Proxy {
    async fn upstream(&mut self) -> Peer {
        let stream = step(self.upstreams.recv())
            .await
            .expect("proxy connected upstream");
        Peer::new(stream)
    }

    fn no_more_upstreams(&mut self) {
        assert!(
            self.upstreams.try_recv().is_err(),
            "proxy opened another upstream connection"
        );
    }

    fn records(&self) -> Vec<RequestRecord> {
        self.records.lock().expect("records lock").clone()
    }

    fn tunnels(&self) -> Vec<TunnelRecord> {
        self.tunnels.lock().expect("tunnels lock").clone()
    }

    async fn result(self) -> Result<(), ProxyError> {
        drop(self.client);
        step(self.task).await.expect("serve task panicked")
    }
}

fn limits() -> Limits {
    Limits {
        close_linger: Duration::from_millis(50),
        ..Limits::default()
    }
}

fn allow_all(_: &RequestHead) -> Decision {
    Decision::Allow { rule: 1 }
}

/// Denies `/secret` (rule 7), allows the rest (rule 1).
fn deny_secret(head: &RequestHead) -> Decision {
    if head.path == "/secret" {
        Decision::Deny { rule: 7 }
    } else {
        Decision::Allow { rule: 1 }
    }
}

fn start(judge: impl Fn(&RequestHead) -> Decision + Send + 'static, limits: Limits) -> Proxy {
    start_with(judge, limits, PIPE)
}

/// A proxy whose every `connect` hands it a fresh pipe whose other end goes to the test.
fn start_with(
    judge: impl Fn(&RequestHead) -> Decision + Send + 'static,
    limits: Limits,
    pipe: usize,
) -> Proxy {
    let (tx, upstreams) = mpsc::unbounded_channel();
    let connect = move || {
        let (ours, theirs) = tokio::io::duplex(pipe);
        let handed = tx.send(theirs);
        async move {
            handed
                .map(|()| ours)
                .map_err(|_| io::Error::other("test stopped accepting upstreams"))
        }
    };
    let (client, records, tunnels, task) = spawn(judge, limits, pipe, connect);
    Proxy {
        client,
        upstreams,
        records,
        tunnels,
        task,
    }
}

fn spawn<Co, Fut>(
    judge: impl Fn(&RequestHead) -> Decision + Send + 'static,
    limits: Limits,
    pipe: usize,
    connect: Co,
) -> (Peer, Records, Tunnels, JoinHandle<Result<(), ProxyError>>)
where
    Co: FnMut() -> Fut + Send + 'static,
    Fut: Future<Output = io::Result<DuplexStream>> + Send + 'static,
{
    spawn_with(judge, limits, pipe, Unpooled(connect))
}

fn spawn_with<Up>(
    judge: impl Fn(&RequestHead) -> Decision + Send + 'static,
    limits: Limits,
    pipe: usize,
    upstreams: Up,
) -> (Peer, Records, Tunnels, JoinHandle<Result<(), ProxyError>>)
where
    Up: Upstreams + Send + 'static,
    Up::Stream: Send,
{
    let (client, proxy_side) = tokio::io::duplex(pipe);
    let records = Records::default();
    let tunnels = Tunnels::default();
    let (requests, opened) = (records.clone(), tunnels.clone());
    let task = tokio::spawn(async move {
        let record = move |r| match r {
            Record::Request(r) => requests.lock().expect("records lock").push(r),
            Record::Tunnel(t) => opened.lock().expect("tunnels lock").push(t),
        };
        serve_connection(proxy_side, upstreams, judge, record, &limits).await
    });
    (Peer::new(client), records, tunnels, task)
}

/// The real policy path, matcher included: client 10.0.0.2 (identity 300) calling
/// 10.0.0.3:80, whose ingress admits it with `http` as its HTTP rules (rule 5).
fn policy_judge(http: Vec<HttpRule>) -> impl Fn(&RequestHead) -> Decision + Send + 'static {
    let mut state = MapState::default();
    for (net, endpoint, identity) in [("10.0.0.2/32", 1, 300), ("10.0.0.3/32", 2, 301)] {
        state.ipcache.insert(
            net.parse().expect("test network"),
            IpcacheEntry {
                identity: Identity(identity),
                endpoint: Some(EndpointId(endpoint)),
                cidr_identity: None,
            },
        );
    }
    let mut l7 = L7Policy::default();
    l7.rules.insert(
        (EndpointId(2), Direction::Ingress),
        vec![L7Rule {
            keys: vec![(Identity(300), PortPrefix::exact(80))],
            http: Some(http),
            rule: RuleId(5),
        }],
    );
    let policy = Arc::new(ProxyPolicy::new(&l7, &state).expect("test policy"));
    // The receiver keeps the last value after the sender is gone.
    let (_, policy) = watch::channel(policy);
    let judge = ConnectionJudge::new(
        policy,
        "10.0.0.2:40000".parse().expect("client"),
        "10.0.0.3:80".parse().expect("destination"),
    );
    move |head| judge.judge(head)
}

/// `GET /public.*`, and `/attach` with SPDY/3.1 upgrades.
fn public_and_attach() -> impl Fn(&RequestHead) -> Decision + Send + 'static {
    policy_judge(vec![
        HttpRule {
            method: Some("GET".into()),
            path: Some("/public.*".into()),
            ..HttpRule::default()
        },
        HttpRule {
            path: Some("/attach".into()),
            upgrades: vec!["spdy/3.1".into()],
            ..HttpRule::default()
        },
    ])
}

const GET_OK: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";

#[tokio::test]
async fn allowed_get_is_forwarded_normalized_and_the_upstream_reused() {
    let mut proxy = start(allow_all, limits());
    proxy
        .client
        .send(b"GET /a/./b/../c//d?x=%2e&y=/../ HTTP/1.1\r\nHost: Svc\r\nAccept: */*\r\n\r\n")
        .await;
    let mut upstream = proxy.upstream().await;
    let (request, _) = upstream.message().await;
    assert_eq!(
        request,
        "GET /a/c/d?x=%2e&y=/../ HTTP/1.1\r\nhost: svc\r\nAccept: */*\r\n\r\n"
    );
    upstream
        .send(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Up: 1\r\n\r\nhello")
        .await;
    let (response, body) = proxy.client.message().await;
    assert_eq!(
        response,
        "HTTP/1.1 200 OK\r\nX-Up: 1\r\ncontent-length: 5\r\n\r\n"
    );
    assert_eq!(body, b"hello");

    proxy
        .client
        .send(b"GET /second HTTP/1.1\r\nHost: svc\r\n\r\n")
        .await;
    let (request, _) = upstream.message().await;
    assert!(request.starts_with("GET /second HTTP/1.1\r\n"), "{request}");
    upstream.send(GET_OK).await;
    let (_, body) = proxy.client.message().await;
    assert_eq!(body, b"ok");
    proxy.no_more_upstreams();

    let records = proxy.records();
    assert_eq!(records.len(), 2);
    assert_eq!(
        (
            records[0].method.as_str(),
            records[0].path.as_str(),
            records[0].host.as_deref()
        ),
        ("GET", "/a/c/d", Some("svc"))
    );
    assert!(
        records
            .iter()
            .all(|r| r.allowed && r.rule == 1 && r.status == 200 && r.error.is_none())
    );
    assert!(proxy.result().await.is_ok());
}

#[tokio::test]
async fn denied_request_without_body_gets_403_and_the_connection_stays_open() {
    let mut proxy = start(deny_secret, limits());
    proxy
        .client
        .send(b"GET /./secret HTTP/1.1\r\nHost: svc\r\n\r\n")
        .await;
    let (response, body) = proxy.client.message().await;
    assert_eq!(
        response,
        "HTTP/1.1 403 Forbidden\r\ncontent-type: text/plain\r\ncontent-length: 14\r\n\r\n"
    );
    assert_eq!(body, b"Access denied\n");
    // A denied HEAD gets the same head and no body.
    proxy
        .client
        .send(b"HEAD /secret HTTP/1.1\r\nHost: svc\r\n\r\n")
        .await;
    let head = proxy.client.head().await;
    assert_eq!(status_of(&head), 403);
    proxy.no_more_upstreams();

    proxy
        .client
        .send(b"GET /open HTTP/1.1\r\nHost: svc\r\n\r\n")
        .await;
    let mut upstream = proxy.upstream().await;
    let (request, _) = upstream.message().await;
    assert!(request.starts_with("GET /open "), "{request}");
    upstream.send(GET_OK).await;
    assert_eq!(status_of(&proxy.client.message().await.0), 200);

    let records = proxy.records();
    assert_eq!(records.len(), 3);
    assert_eq!(
        (records[0].status, records[0].allowed, records[0].rule),
        (403, false, 7)
    );
    assert_eq!(records[0].path, "/secret");
}

#[tokio::test]
async fn denied_request_with_a_body_gets_403_and_close() {
    for request in [
        &b"POST /secret HTTP/1.1\r\nHost: svc\r\nContent-Length: 5\r\n\r\nhello"[..],
        b"POST /secret HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    ] {
        let mut proxy = start(deny_secret, limits());
        proxy.client.send(request).await;
        let (response, body) = proxy.client.message().await;
        assert_eq!(status_of(&response), 403);
        assert!(response.contains("\r\nconnection: close\r\n"), "{response}");
        assert_eq!(body, b"Access denied\n");
        proxy.client.expect_closed().await;
        proxy.no_more_upstreams();
        assert!(proxy.result().await.is_ok());
    }
}

#[tokio::test]
async fn keep_alive_mixes_allowed_and_denied_requests() {
    let mut proxy = start(deny_secret, limits());
    proxy
        .client
        .send(b"GET /one HTTP/1.1\r\nHost: svc\r\n\r\n")
        .await;
    let mut upstream = proxy.upstream().await;
    assert!(upstream.message().await.0.starts_with("GET /one "));
    upstream.send(GET_OK).await;
    assert_eq!(status_of(&proxy.client.message().await.0), 200);

    proxy
        .client
        .send(b"DELETE /secret HTTP/1.1\r\nHost: svc\r\n\r\n")
        .await;
    assert_eq!(status_of(&proxy.client.message().await.0), 403);

    proxy
        .client
        .send(b"GET /two HTTP/1.1\r\nHost: svc\r\n\r\n")
        .await;
    assert!(upstream.message().await.0.starts_with("GET /two "));
    upstream.send(GET_OK).await;
    assert_eq!(status_of(&proxy.client.message().await.0), 200);
    proxy.no_more_upstreams();
    let statuses: Vec<u16> = proxy.records().iter().map(|r| r.status).collect();
    assert_eq!(statuses, [200, 403, 200]);
}

#[tokio::test]
async fn pipelined_requests_are_answered_in_order() {
    let mut proxy = start(deny_secret, limits());
    proxy
        .client
        .send(
            b"GET /one HTTP/1.1\r\nHost: svc\r\n\r\n\
              GET /secret HTTP/1.1\r\nHost: svc\r\n\r\n\
              POST /two HTTP/1.1\r\nHost: svc\r\nContent-Length: 3\r\n\r\nabc\
              GET /three HTTP/1.1\r\nHost: svc\r\n\r\n",
        )
        .await;
    let mut upstream = proxy.upstream().await;
    assert!(upstream.message().await.0.starts_with("GET /one "));
    // The next request waits for this one's answer.
    upstream.expect_quiet().await;
    upstream
        .send(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\none")
        .await;
    let (request, body) = upstream.message().await;
    assert!(request.starts_with("POST /two "), "{request}");
    assert_eq!(body, b"abc");
    upstream
        .send(b"HTTP/1.1 201 Created\r\nContent-Length: 3\r\n\r\ntwo")
        .await;
    assert!(upstream.message().await.0.starts_with("GET /three "));
    upstream
        .send(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nthree")
        .await;

    let mut answers = Vec::new();
    for _ in 0..4 {
        let (head, body) = proxy.client.message().await;
        answers.push((status_of(&head), String::from_utf8(body).unwrap()));
    }
    assert_eq!(
        answers,
        [
            (200, "one".to_owned()),
            (403, "Access denied\n".to_owned()),
            (201, "two".to_owned()),
            (200, "three".to_owned())
        ]
    );
}

#[tokio::test]
async fn content_length_body_is_copied_exactly() {
    let mut proxy = start(allow_all, limits());
    proxy
        .client
        .send(b"PUT /f HTTP/1.1\r\nHost: svc\r\nContent-Length: 10\r\n\r\n0123456789GET /next HTTP/1.1\r\nHost: svc\r\n\r\n")
        .await;
    let mut upstream = proxy.upstream().await;
    let (request, body) = upstream.message().await;
    assert_eq!(
        request,
        "PUT /f HTTP/1.1\r\nhost: svc\r\ncontent-length: 10\r\n\r\n"
    );
    assert_eq!(body, b"0123456789");
    upstream.expect_quiet().await;
    upstream.send(GET_OK).await;
    assert!(upstream.message().await.0.starts_with("GET /next "));
}

#[tokio::test]
async fn chunked_body_is_forwarded_chunk_by_chunk() {
    let mut proxy = start(allow_all, limits());
    proxy
        .client
        .send(
            b"POST /up HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: Chunked\r\n\r\n\
              5;name=value\r\nhello\r\n6\r\n world\r\n0\r\nX-Checksum: 42\r\nContent-Length: 1\r\n\r\n",
        )
        .await;
    let mut upstream = proxy.upstream().await;
    let head = upstream.head().await;
    assert_eq!(
        head,
        "POST /up HTTP/1.1\r\nhost: svc\r\ntransfer-encoding: chunked\r\n\r\n"
    );
    let body = upstream.until(b"\r\n\r\n").await;
    assert_eq!(
        String::from_utf8(body).unwrap(),
        "5\r\nhello\r\n6\r\n world\r\n0\r\nX-Checksum: 42\r\n\r\n"
    );
    upstream.send(GET_OK).await;
    assert_eq!(status_of(&proxy.client.message().await.0), 200);
}

#[tokio::test]
async fn multi_megabyte_chunked_upload_streams_through_small_pipes() {
    const PIECE: usize = 64 * 1024;
    const PIECES: usize = 64;
    let mut proxy = start_with(allow_all, limits(), 4096);
    let mut client = proxy.client;
    let finished = Arc::new(AtomicBool::new(false));
    let finished_writing = finished.clone();
    let writer = tokio::spawn(async move {
        client
            .send(b"POST /big HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: chunked\r\n\r\n")
            .await;
        for i in 0..PIECES {
            let piece = vec![u8::try_from(i % 251).unwrap(); PIECE];
            client.send(format!("{PIECE:x}\r\n").as_bytes()).await;
            client.send(&piece).await;
            client.send(b"\r\n").await;
        }
        client.send(b"0\r\n\r\n").await;
        finished_writing.store(true, Ordering::SeqCst);
        client
    });
    proxy.client = Peer::new(tokio::io::duplex(1).0);
    let mut upstream = proxy.upstream().await;
    upstream.head().await;

    // Decode what arrives with the same decoder the proxy uses (tested on its own above).
    let mut decoder = ChunkedDecoder::new(&Limits::default());
    let mut pending = Vec::new();
    let mut data_len = 0usize;
    let mut checksum = 0u64;
    let mut streamed_before_client_finished = false;
    while !decoder.is_done() {
        let mut buf = [0u8; 8192];
        let n = step(upstream.io.read(&mut buf)).await.unwrap();
        assert!(n > 0, "upstream stream ended early");
        pending.extend_from_slice(&buf[..n]);
        let mut used = 0;
        loop {
            match decoder.decode(&pending[used..]).unwrap() {
                ChunkEvent::Incomplete => break,
                ChunkEvent::Data { len } => {
                    checksum += pending[used..used + len]
                        .iter()
                        .map(|&b| u64::from(b))
                        .sum::<u64>();
                    data_len += len;
                    used += len;
                }
                ChunkEvent::End { consumed, .. } => {
                    used += consumed;
                    break;
                }
                ChunkEvent::ChunkStart { consumed, .. }
                | ChunkEvent::ChunkEnd { consumed }
                | ChunkEvent::LastChunk { consumed } => used += consumed,
            }
        }
        pending.drain(..used);
        if data_len >= PIECE * 4 && !finished.load(Ordering::SeqCst) {
            streamed_before_client_finished = true;
        }
    }
    assert!(
        streamed_before_client_finished,
        "the body was buffered, not streamed"
    );
    assert_eq!(data_len, PIECE * PIECES);
    let expected: u64 = (0..PIECES).map(|i| (i % 251) as u64 * PIECE as u64).sum();
    assert_eq!(checksum, expected);

    upstream.send(GET_OK).await;
    let mut client = step(writer).await.unwrap();
    assert_eq!(status_of(&client.message().await.0), 200);
}

/// Sends one raw request and expects `status`, a close, and no upstream connection.
async fn expect_rejected(request: &[u8], status: u16, limits: Limits) {
    let mut proxy = start(allow_all, limits);
    proxy.client.send(request).await;
    let (head, _) = proxy.client.message().await;
    assert_eq!(
        status_of(&head),
        status,
        "{:?}",
        String::from_utf8_lossy(request)
    );
    assert!(head.contains("\r\nconnection: close\r\n"), "{head}");
    proxy.client.expect_closed().await;
    proxy.no_more_upstreams();
    let records = proxy.records();
    assert_eq!(records.len(), 1);
    assert_eq!((records[0].status, records[0].allowed), (status, false));
    assert!(records[0].error.is_some());
    assert!(proxy.result().await.is_ok());
}

#[tokio::test]
async fn ambiguous_framing_gets_400_and_close() {
    for framing in [
        "Content-Length: 3\r\nTransfer-Encoding: chunked",
        "Content-Length: 3\r\nContent-Length: 4",
        "Content-Length: 3\r\nContent-Length: 3",
        "Content-Length: 3, 3",
        "Content-Length: +3",
        "Content-Length: -3",
        "Content-Length: 3 3",
        "Content-Length: abc",
        "Content-Length: 99999999999999999999",
        "Transfer-Encoding: chunked, chunked",
        "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked",
    ] {
        let request = format!("POST / HTTP/1.1\r\nHost: svc\r\n{framing}\r\n\r\nabc");
        expect_rejected(request.as_bytes(), 400, limits()).await;
    }
}

#[tokio::test]
async fn unsupported_transfer_codings_get_501_and_close() {
    for coding in ["gzip, chunked", "identity", "chunked, gzip"] {
        let request =
            format!("POST / HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: {coding}\r\n\r\n");
        expect_rejected(request.as_bytes(), 501, limits()).await;
    }
}

#[tokio::test]
async fn malformed_heads_get_400_and_close() {
    for request in [
        &b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"[..],
        b"GET / HTTP/1.1\r\nHost: svc\r\nX-Folded: a\r\n b\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: svc\r\nBad Name: a\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: svc\r\nX: a\x00b\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: svc\r\nX: a\rb\r\n\r\n",
        b"G@T / HTTP/1.1\r\nHost: svc\r\n\r\n",
        b"GET /a\x7fb HTTP/1.1\r\nHost: svc\r\n\r\n",
        b"GET /a\\b HTTP/1.1\r\nHost: svc\r\n\r\n",
        b"GET /%zz HTTP/1.1\r\nHost: svc\r\n\r\n",
        b"GET /a%2 HTTP/1.1\r\nHost: svc\r\n\r\n",
        b"GET /a#frag HTTP/1.1\r\nHost: svc\r\n\r\n",
        b"GET example.com HTTP/1.1\r\nHost: svc\r\n\r\n",
        b"GET * HTTP/1.1\r\nHost: svc\r\n\r\n",
        b"GET / HTTP/1.1\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
        b"GET / XTTP/1.1\r\nHost: svc\r\n\r\n",
    ] {
        expect_rejected(request, 400, limits()).await;
    }
}

#[tokio::test]
async fn oversized_heads_get_431_and_close() {
    let long = format!(
        "GET / HTTP/1.1\r\nHost: svc\r\nX-Big: {}\r\n\r\n",
        "a".repeat(20_000)
    );
    expect_rejected(long.as_bytes(), 431, limits()).await;
    let mut many = String::from("GET / HTTP/1.1\r\nHost: svc\r\n");
    for i in 0..100 {
        write!(many, "X-{i}: {i}\r\n").unwrap();
    }
    many.push_str("\r\n");
    expect_rejected(many.as_bytes(), 431, limits()).await;
}

#[tokio::test]
async fn other_versions_get_505_and_connect_gets_405() {
    expect_rejected(b"GET / HTTP/2.0\r\nHost: svc\r\n\r\n", 505, limits()).await;
    expect_rejected(b"GET / HTTP/1.2\r\nHost: svc\r\n\r\n", 505, limits()).await;
    expect_rejected(
        b"CONNECT svc:443 HTTP/1.1\r\nHost: svc:443\r\n\r\n",
        405,
        limits(),
    )
    .await;
}

#[tokio::test]
async fn malformed_chunked_body_gets_400_and_close() {
    for body in [
        &b"zz\r\nhello\r\n0\r\n\r\n"[..],
        b"5\r\nhelloX0\r\n\r\n",
        b"5;a\nb\r\nhello\r\n0\r\n\r\n",
        b"5\r\nhello\r\n0\r\nBad Trailer\r\n\r\n",
    ] {
        let mut proxy = start(allow_all, limits());
        proxy
            .client
            .send(b"POST / HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: chunked\r\n\r\n")
            .await;
        proxy.client.send(body).await;
        let mut upstream = proxy.upstream().await;
        upstream.head().await;
        let (head, _) = proxy.client.message().await;
        assert_eq!(status_of(&head), 400, "{:?}", String::from_utf8_lossy(body));
        proxy.client.expect_closed().await;
        let records = proxy.records();
        assert!(
            records[0]
                .error
                .as_deref()
                .unwrap_or("")
                .contains("chunked"),
            "{records:?}"
        );
        // The upstream connection is dropped with the half-sent request.
        assert!(upstream.rest().await.len() < 64);
    }
}

#[tokio::test(start_paused = true)]
async fn trickled_head_gets_408_and_close() {
    let mut proxy = start(allow_all, limits());
    let (mut client_read, mut client_write) = tokio::io::split(proxy.client.io.into_inner());
    let trickle = tokio::spawn(async move {
        for &byte in b"GET / HTTP/1.1\r\nHost: svc\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaa" {
            if client_write.write_all(&[byte]).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    });
    let started = tokio::time::Instant::now();
    let mut response = Vec::new();
    step(client_read.read_to_end(&mut response)).await.unwrap();
    let response = String::from_utf8(response).unwrap();
    assert!(
        response.starts_with("HTTP/1.1 408 Request Timeout\r\n"),
        "{response}"
    );
    assert!(started.elapsed() >= Duration::from_secs(10));
    assert!(started.elapsed() < Duration::from_secs(12));
    trickle.abort();
    proxy.client = Peer::new(tokio::io::duplex(1).0);
    proxy.no_more_upstreams();
    assert_eq!(proxy.records()[0].status, 408);
}

#[tokio::test(start_paused = true)]
async fn idle_keep_alive_connection_is_closed_after_idle_timeout() {
    let mut proxy = start(allow_all, limits());
    proxy
        .client
        .send(b"GET / HTTP/1.1\r\nHost: svc\r\n\r\n")
        .await;
    let mut upstream = proxy.upstream().await;
    upstream.message().await;
    upstream.send(GET_OK).await;
    proxy.client.message().await;
    let idle_since = tokio::time::Instant::now();
    proxy.client.expect_closed().await;
    assert!(idle_since.elapsed() >= Duration::from_mins(1));
    assert_eq!(proxy.records().len(), 1);
    assert!(proxy.result().await.is_ok());
}

#[tokio::test]
async fn upstream_connect_failure_gets_502() {
    let connect =
        || async { Err::<DuplexStream, _>(io::Error::from(io::ErrorKind::ConnectionRefused)) };
    let (mut client, records, _tunnels, task) = spawn(allow_all, limits(), PIPE, connect);
    client.send(b"GET / HTTP/1.1\r\nHost: svc\r\n\r\n").await;
    let (head, _) = client.message().await;
    assert_eq!(status_of(&head), 502);
    client.expect_closed().await;
    let records = records.lock().unwrap().clone();
    assert_eq!((records[0].status, records[0].allowed), (502, true));
    assert!(
        records[0].error.as_deref().unwrap().contains("refused"),
        "{records:?}"
    );
    drop(client);
    assert!(task.await.unwrap().is_ok());
}

#[tokio::test(start_paused = true)]
async fn upstream_connect_timeout_gets_504() {
    let connect = || std::future::pending::<io::Result<DuplexStream>>();
    let (mut client, _records, _tunnels, _task) = spawn(allow_all, limits(), PIPE, connect);
    client.send(b"GET / HTTP/1.1\r\nHost: svc\r\n\r\n").await;
    let started = tokio::time::Instant::now();
    assert_eq!(status_of(&client.message().await.0), 504);
    assert!(started.elapsed() >= Duration::from_secs(5));
}

#[tokio::test(start_paused = true)]
async fn missing_upstream_response_gets_504() {
    let mut proxy = start(allow_all, limits());
    proxy
        .client
        .send(b"GET / HTTP/1.1\r\nHost: svc\r\n\r\n")
        .await;
    let mut upstream = proxy.upstream().await;
    upstream.message().await;
    let started = tokio::time::Instant::now();
    let (head, _) = proxy.client.message().await;
    assert_eq!(status_of(&head), 504);
    assert!(started.elapsed() >= Duration::from_mins(1));
    proxy.client.expect_closed().await;
}

#[tokio::test(start_paused = true)]
async fn stalled_request_body_gets_408() {
    let mut proxy = start(allow_all, limits());
    proxy
        .client
        .send(b"POST / HTTP/1.1\r\nHost: svc\r\nContent-Length: 10\r\n\r\n123")
        .await;
    let mut upstream = proxy.upstream().await;
    upstream.head().await;
    let (head, _) = proxy.client.message().await;
    assert_eq!(status_of(&head), 408);
    proxy.client.expect_closed().await;
}

#[tokio::test]
async fn malformed_upstream_response_gets_502() {
    let mut proxy = start(allow_all, limits());
    proxy
        .client
        .send(b"GET / HTTP/1.1\r\nHost: svc\r\n\r\n")
        .await;
    let mut upstream = proxy.upstream().await;
    upstream.message().await;
    upstream
        .send(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n")
        .await;
    assert_eq!(status_of(&proxy.client.message().await.0), 502);
    proxy.client.expect_closed().await;
}

#[tokio::test]
async fn websocket_upgrade_becomes_a_tunnel() {
    let mut proxy = start(allow_all, limits());
    proxy
        .client
        .send(b"GET /ws HTTP/1.1\r\nHost: svc\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Key: k\r\n\r\nearly")
        .await;
    let mut upstream = proxy.upstream().await;
    let head = upstream.head().await;
    assert_eq!(
        head,
        "GET /ws HTTP/1.1\r\nhost: svc\r\nSec-WebSocket-Key: k\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n"
    );
    upstream
        .send(b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\nfrom-server")
        .await;
    let head = proxy.client.head().await;
    assert_eq!(
        head,
        "HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n"
    );
    assert_eq!(proxy.client.exact(11).await, b"from-server");
    assert_eq!(upstream.exact(5).await, b"early");
    proxy.client.send(b"from-client").await;
    assert_eq!(upstream.exact(11).await, b"from-client");
    upstream.send(b"more").await;
    assert_eq!(proxy.client.exact(4).await, b"more");
    // The client leaving ends the tunnel: the upstream sees the close.
    let records = proxy.records();
    assert_eq!(records[0].status, 101);
    let tunnels = proxy.tunnels.clone();
    assert!(proxy.result().await.is_ok());
    upstream.expect_closed().await;
    let tunnels = tunnels.lock().expect("tunnels lock").clone();
    assert_eq!(
        tunnels,
        [
            TunnelRecord {
                event: TunnelEvent::Opened,
                protocol: "websocket".into(),
                rule: 1,
                bytes_to_server: 0,
                bytes_to_client: 0,
                duration: Duration::ZERO,
                error: None,
            },
            TunnelRecord {
                event: TunnelEvent::Closed,
                protocol: "websocket".into(),
                rule: 1,
                // "early" + "from-client"; "from-server" + "more".
                bytes_to_server: 16,
                bytes_to_client: 15,
                duration: tunnels[1].duration,
                error: None,
            },
        ]
    );
}

const H2C_OFFER: &[u8] = b"GET /public/x HTTP/1.1\r\nHost: svc\r\nUpgrade: h2c\r\n\
    HTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\nConnection: Upgrade, HTTP2-Settings\r\n\r\n";

#[tokio::test]
async fn an_h2c_offer_is_stripped_and_every_later_request_judged() {
    let mut proxy = start(public_and_attach(), limits());
    proxy.client.send(H2C_OFFER).await;
    let mut upstream = proxy.upstream().await;
    let (request, _) = upstream.message().await;
    // Neither the offer nor its settings reach the upstream: a plain HTTP/1.1 request.
    assert_eq!(request, "GET /public/x HTTP/1.1\r\nhost: svc\r\n\r\n");
    upstream.send(GET_OK).await;
    let (head, body) = proxy.client.message().await;
    assert_eq!(head, "HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n");
    assert_eq!(body, b"ok");

    // Still HTTP/1.1 on the same connection, and still judged request by request.
    proxy
        .client
        .send(b"GET /admin HTTP/1.1\r\nHost: svc\r\n\r\n")
        .await;
    let (head, body) = proxy.client.message().await;
    assert_eq!(status_of(&head), 403);
    assert_eq!(body, b"Access denied\n");
    upstream.expect_quiet().await;
    proxy
        .client
        .send(b"GET /public/y HTTP/1.1\r\nHost: svc\r\n\r\n")
        .await;
    assert!(upstream.message().await.0.starts_with("GET /public/y "));
    upstream.send(GET_OK).await;
    assert_eq!(status_of(&proxy.client.message().await.0), 200);
    proxy.no_more_upstreams();

    let records = proxy.records();
    let outcomes: Vec<_> = records
        .iter()
        .map(|r| (r.path.as_str(), r.status, r.allowed, r.rule))
        .collect();
    assert_eq!(
        outcomes,
        [
            ("/public/x", 200, true, 5),
            ("/admin", 403, false, 5),
            ("/public/y", 200, true, 5)
        ]
    );
    assert!(records[1].policy_denied());
    assert!(proxy.tunnels().is_empty());
}

#[tokio::test]
async fn a_101_to_a_stripped_h2c_offer_is_a_502() {
    // An upstream that switches anyway (it was never offered anything) is not followed.
    let mut proxy = start(public_and_attach(), limits());
    proxy.client.send(H2C_OFFER).await;
    let mut upstream = proxy.upstream().await;
    upstream.message().await;
    upstream
        .send(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\nUNJUDGED")
        .await;
    let (head, _) = proxy.client.message().await;
    assert_eq!(status_of(&head), 502);
    proxy.client.expect_closed().await;
    assert!(proxy.tunnels().is_empty());
    let error = proxy.records()[0].error.clone().unwrap_or_default();
    assert!(error.contains("asked for no upgrade"), "{error}");
}

#[tokio::test]
async fn an_upgrade_no_rule_lists_gets_403_without_reaching_the_upstream() {
    let mut proxy = start(public_and_attach(), limits());
    proxy
        .client
        .send(b"GET /public/x HTTP/1.1\r\nHost: svc\r\nConnection: Upgrade\r\nUpgrade: websocket, spdy/3.1\r\n\r\n")
        .await;
    let (head, body) = proxy.client.message().await;
    assert_eq!(status_of(&head), 403);
    assert_eq!(body, b"Access denied\n");
    proxy.no_more_upstreams();
    let records = proxy.records();
    assert_eq!((records[0].allowed, records[0].rule), (false, 5));
    assert!(records[0].policy_denied());
    let error = records[0].error.clone().unwrap_or_default();
    assert!(
        error.contains("\"spdy/3.1\""),
        "names the protocol: {error}"
    );
    // Nothing was read past the head: the connection goes on.
    proxy
        .client
        .send(b"GET /public/y HTTP/1.1\r\nHost: svc\r\n\r\n")
        .await;
    let mut upstream = proxy.upstream().await;
    assert!(upstream.message().await.0.starts_with("GET /public/y "));
    upstream.send(GET_OK).await;
    assert_eq!(status_of(&proxy.client.message().await.0), 200);
}

#[tokio::test]
async fn an_upgrade_the_rule_lists_tunnels_after_the_101() {
    let mut proxy = start(public_and_attach(), limits());
    proxy
        .client
        .send(b"POST /attach HTTP/1.1\r\nHost: svc\r\nConnection: Upgrade\r\nUpgrade: SPDY/3.1\r\nContent-Length: 0\r\n\r\n")
        .await;
    let mut upstream = proxy.upstream().await;
    let head = upstream.head().await;
    assert_eq!(
        head,
        "POST /attach HTTP/1.1\r\nhost: svc\r\ncontent-length: 0\r\nconnection: upgrade\r\nupgrade: SPDY/3.1\r\n\r\n"
    );
    upstream
        .send(
            b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: spdy/3.1\r\n\r\n",
        )
        .await;
    let head = proxy.client.head().await;
    assert_eq!(status_of(&head), 101);
    proxy.client.send(b"frames up").await;
    assert_eq!(upstream.exact(9).await, b"frames up");
    upstream.send(b"frames down!").await;
    assert_eq!(proxy.client.exact(12).await, b"frames down!");
    let opened = proxy.tunnels();
    assert_eq!(opened.len(), 1);
    assert_eq!(
        (opened[0].event, opened[0].protocol.as_str(), opened[0].rule),
        (TunnelEvent::Opened, "spdy/3.1", 5)
    );
    // The upstream ending its side ends the tunnel once the client has finished too.
    drop(upstream);
    proxy.client.expect_closed().await;
    let tunnels = proxy.tunnels.clone();
    assert!(proxy.result().await.is_ok());
    let closed = tunnels.lock().expect("tunnels lock")[1].clone();
    assert_eq!(closed.event, TunnelEvent::Closed);
    assert_eq!((closed.bytes_to_server, closed.bytes_to_client), (9, 12));
}

#[tokio::test]
async fn websockets_need_only_an_allowed_request_and_tunnel_only_after_a_101() {
    let ws = b"GET /public/ws HTTP/1.1\r\nHost: svc\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n";
    let mut proxy = start(public_and_attach(), limits());
    proxy.client.send(ws).await;
    let mut upstream = proxy.upstream().await;
    assert!(upstream.head().await.contains("\r\nupgrade: websocket\r\n"));
    // Not switching: plain HTTP goes on, and no tunnel is reported.
    upstream.send(GET_OK).await;
    assert_eq!(status_of(&proxy.client.message().await.0), 200);
    assert!(proxy.tunnels().is_empty());
    // A websocket to a path no rule allows is denied like any request to it.
    proxy
        .client
        .send(b"GET /admin HTTP/1.1\r\nHost: svc\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
        .await;
    assert_eq!(status_of(&proxy.client.message().await.0), 403);
    proxy.client.send(ws).await;
    upstream.head().await;
    upstream
        .send(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: WebSocket\r\n\r\nhi")
        .await;
    assert_eq!(status_of(&proxy.client.head().await), 101);
    assert_eq!(proxy.client.exact(2).await, b"hi");
    let tunnels = proxy.tunnels();
    assert_eq!(tunnels.len(), 1);
    assert_eq!(tunnels[0].protocol, "WebSocket");
    proxy.no_more_upstreams();
    let records = proxy.records();
    let statuses: Vec<u16> = records.iter().map(|r| r.status).collect();
    assert_eq!(statuses, [200, 403, 101]);
    assert!(
        records[1].error.is_none(),
        "denied for its path: {records:?}"
    );
}

#[tokio::test]
async fn a_switch_to_a_protocol_not_offered_is_a_502() {
    for answer in [
        &b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n"[..],
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n\r\n",
    ] {
        let mut proxy = start(allow_all, limits());
        proxy
            .client
            .send(b"GET /ws HTTP/1.1\r\nHost: svc\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
            .await;
        let mut upstream = proxy.upstream().await;
        upstream.head().await;
        upstream.send(answer).await;
        let (head, _) = proxy.client.message().await;
        assert_eq!(
            status_of(&head),
            502,
            "{:?}",
            String::from_utf8_lossy(answer)
        );
        proxy.client.expect_closed().await;
        assert!(proxy.tunnels().is_empty());
    }
}

#[tokio::test]
async fn connect_gets_405_and_a_malformed_upgrade_400_whatever_the_policy() {
    for (request, status) in [
        (
            &b"CONNECT svc:443 HTTP/1.1\r\nHost: svc:443\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"[..],
            405,
        ),
        (
            b"GET /public/x HTTP/1.1\r\nHost: svc\r\nConnection: Upgrade\r\nUpgrade: web socket\r\n\r\n",
            400,
        ),
    ] {
        let mut proxy = start(public_and_attach(), limits());
        proxy.client.send(request).await;
        let (head, _) = proxy.client.message().await;
        assert_eq!(status_of(&head), status);
        proxy.client.expect_closed().await;
        proxy.no_more_upstreams();
        let records = proxy.records();
        assert!(!records[0].allowed && !records[0].policy_denied());
    }
}

#[tokio::test]
async fn refused_upgrade_continues_as_http() {
    let mut proxy = start(allow_all, limits());
    proxy
        .client
        .send(b"GET /ws HTTP/1.1\r\nHost: svc\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
        .await;
    let mut upstream = proxy.upstream().await;
    upstream.head().await;
    upstream.send(GET_OK).await;
    assert_eq!(status_of(&proxy.client.message().await.0), 200);
    proxy
        .client
        .send(b"GET /next HTTP/1.1\r\nHost: svc\r\n\r\n")
        .await;
    assert!(upstream.message().await.0.starts_with("GET /next "));
}

#[tokio::test]
async fn denied_upgrade_gets_403() {
    let deny_ws = |head: &RequestHead| match head.upgrades.as_slice() {
        [] => Decision::Allow { rule: 1 },
        _ => Decision::Deny { rule: 3 },
    };
    let mut proxy = start(deny_ws, limits());
    proxy
        .client
        .send(b"GET /ws HTTP/1.1\r\nHost: svc\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
        .await;
    assert_eq!(status_of(&proxy.client.message().await.0), 403);
    proxy.no_more_upstreams();
}

#[tokio::test]
async fn http10_closes_unless_keep_alive_was_asked_for() {
    let mut proxy = start(allow_all, limits());
    proxy.client.send(b"GET /old HTTP/1.0\r\n\r\n").await;
    let mut upstream = proxy.upstream().await;
    // The upstream connection is the proxy's own, kept for later requests.
    assert_eq!(
        upstream.message().await.0,
        "GET /old HTTP/1.0\r\nconnection: keep-alive\r\n\r\n"
    );
    upstream
        .send(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok")
        .await;
    let (head, body) = proxy.client.message().await;
    assert!(head.contains("\r\nconnection: close\r\n"), "{head}");
    assert_eq!(body, b"ok");
    proxy.client.expect_closed().await;

    let mut proxy = start(allow_all, limits());
    for _ in 0..2 {
        proxy
            .client
            .send(b"GET /old HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            .await;
    }
    let mut upstream = proxy.upstream().await;
    for _ in 0..2 {
        let (request, _) = upstream.message().await;
        assert_eq!(
            request,
            "GET /old HTTP/1.0\r\nconnection: keep-alive\r\n\r\n"
        );
        upstream
            .send(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            .await;
        let (head, _) = proxy.client.message().await;
        assert!(head.contains("\r\nconnection: keep-alive\r\n"), "{head}");
    }
}

#[tokio::test]
async fn chunked_response_is_rechunked_or_dechunked_for_http10() {
    let chunked =
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3;x\r\nabc\r\n0\r\nT: 1\r\n\r\n";
    let mut proxy = start(allow_all, limits());
    proxy
        .client
        .send(b"GET / HTTP/1.1\r\nHost: svc\r\n\r\n")
        .await;
    let mut upstream = proxy.upstream().await;
    upstream.message().await;
    upstream.send(chunked).await;
    let head = proxy.client.head().await;
    assert_eq!(
        head,
        "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
    );
    assert_eq!(
        proxy.client.until(b"\r\n\r\n").await,
        b"3\r\nabc\r\n0\r\nT: 1\r\n\r\n"
    );

    let mut proxy = start(allow_all, limits());
    proxy
        .client
        .send(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        .await;
    let mut upstream = proxy.upstream().await;
    upstream.message().await;
    upstream.send(chunked).await;
    let head = proxy.client.head().await;
    assert_eq!(head, "HTTP/1.1 200 OK\r\nconnection: close\r\n\r\n");
    assert_eq!(proxy.client.rest().await, b"abc");
}

#[tokio::test]
async fn connection_close_from_either_side_closes_after_the_response() {
    let mut proxy = start(allow_all, limits());
    proxy
        .client
        .send(b"GET / HTTP/1.1\r\nHost: svc\r\nConnection: close\r\n\r\n")
        .await;
    let mut upstream = proxy.upstream().await;
    assert_eq!(
        upstream.message().await.0,
        "GET / HTTP/1.1\r\nhost: svc\r\n\r\n"
    );
    upstream.send(GET_OK).await;
    let (head, body) = proxy.client.message().await;
    assert!(head.contains("\r\nconnection: close\r\n"), "{head}");
    assert_eq!(body, b"ok");
    proxy.client.expect_closed().await;

    let mut proxy = start(allow_all, limits());
    proxy
        .client
        .send(b"GET / HTTP/1.1\r\nHost: svc\r\n\r\n")
        .await;
    let mut upstream = proxy.upstream().await;
    upstream.message().await;
    upstream
        .send(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok")
        .await;
    let (head, _) = proxy.client.message().await;
    assert!(head.contains("\r\nconnection: close\r\n"), "{head}");
    proxy.client.expect_closed().await;
}

#[tokio::test]
async fn bodiless_responses_carry_no_body() {
    let mut proxy = start(allow_all, limits());
    let mut upstream = None;
    for (request, response) in [
        (
            &b"HEAD / HTTP/1.1\r\nHost: svc\r\n\r\n"[..],
            &b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"[..],
        ),
        (
            b"GET / HTTP/1.1\r\nHost: svc\r\n\r\n",
            b"HTTP/1.1 204 No Content\r\n\r\n",
        ),
        (
            b"GET / HTTP/1.1\r\nHost: svc\r\n\r\n",
            b"HTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n",
        ),
    ] {
        proxy.client.send(request).await;
        if upstream.is_none() {
            upstream = Some(proxy.upstream().await);
        }
        let Some(up) = upstream.as_mut() else {
            unreachable!()
        };
        up.message().await;
        up.send(response).await;
        // Only the head arrives; the next answer follows right after it.
        proxy.client.head().await;
    }
    proxy
        .client
        .send(b"GET /last HTTP/1.1\r\nHost: svc\r\n\r\n")
        .await;
    let Some(mut up) = upstream else {
        unreachable!()
    };
    up.message().await;
    up.send(GET_OK).await;
    assert_eq!(proxy.client.message().await.1, b"ok");
}

#[tokio::test]
async fn response_delimited_by_close_closes_the_client() {
    let mut proxy = start(allow_all, limits());
    proxy
        .client
        .send(b"GET / HTTP/1.1\r\nHost: svc\r\n\r\n")
        .await;
    let mut upstream = proxy.upstream().await;
    upstream.message().await;
    upstream
        .send(b"HTTP/1.1 200 OK\r\n\r\nstreamed until the end")
        .await;
    drop(upstream);
    let head = proxy.client.head().await;
    assert_eq!(head, "HTTP/1.1 200 OK\r\nconnection: close\r\n\r\n");
    assert_eq!(proxy.client.rest().await, b"streamed until the end");
    assert!(proxy.result().await.is_ok());
}

#[tokio::test]
async fn answer_before_the_whole_body_closes_the_connection() {
    let mut proxy = start(allow_all, limits());
    proxy
        .client
        .send(b"POST / HTTP/1.1\r\nHost: svc\r\nContent-Length: 10\r\n\r\n123")
        .await;
    let mut upstream = proxy.upstream().await;
    upstream.head().await;
    assert_eq!(upstream.exact(3).await, b"123");
    upstream
        .send(b"HTTP/1.1 413 Content Too Large\r\nContent-Length: 0\r\n\r\n")
        .await;
    let head = proxy.client.head().await;
    assert_eq!(status_of(&head), 413);
    assert!(head.contains("\r\nconnection: close\r\n"), "{head}");
    proxy.client.expect_closed().await;
    assert_eq!(proxy.records()[0].status, 413);
    upstream.expect_closed().await;
}

#[tokio::test]
async fn interim_responses_are_not_sent_to_http10_clients() {
    let mut proxy = start(allow_all, limits());
    proxy
        .client
        .send(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        .await;
    let mut upstream = proxy.upstream().await;
    upstream.head().await;
    upstream
        .send(b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        .await;
    let (head, body) = proxy.client.message().await;
    assert_eq!(status_of(&head), 200);
    assert_eq!(body, b"ok");
}

#[tokio::test]
async fn interim_continue_is_relayed_before_the_body() {
    let mut proxy = start(allow_all, limits());
    proxy
        .client
        .send(b"PUT / HTTP/1.1\r\nHost: svc\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\n")
        .await;
    let mut upstream = proxy.upstream().await;
    let head = upstream.head().await;
    assert!(head.contains("Expect: 100-continue\r\n"), "{head}");
    upstream.send(b"HTTP/1.1 100 Continue\r\n\r\n").await;
    assert_eq!(proxy.client.head().await, "HTTP/1.1 100 Continue\r\n\r\n");
    proxy.client.send(b"data").await;
    assert_eq!(upstream.exact(4).await, b"data");
    upstream.send(GET_OK).await;
    assert_eq!(status_of(&proxy.client.message().await.0), 200);
}

#[tokio::test]
async fn upstream_closing_mid_response_closes_the_client() {
    let mut proxy = start(allow_all, limits());
    proxy
        .client
        .send(b"GET / HTTP/1.1\r\nHost: svc\r\n\r\n")
        .await;
    let mut upstream = proxy.upstream().await;
    upstream.message().await;
    upstream
        .send(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly ten b")
        .await;
    drop(upstream);
    let head = proxy.client.head().await;
    assert_eq!(status_of(&head), 200);
    assert_eq!(proxy.client.rest().await, b"only ten b");
    let records = proxy.records();
    assert_eq!(records[0].status, 200);
    assert!(records[0].error.is_some());
    assert!(matches!(
        proxy.result().await,
        Err(ProxyError::UpstreamTruncatedBody)
    ));
}

#[tokio::test]
async fn upstream_closed_between_requests_is_reopened() {
    let mut proxy = start(allow_all, limits());
    proxy
        .client
        .send(b"GET /one HTTP/1.1\r\nHost: svc\r\n\r\n")
        .await;
    let mut first = proxy.upstream().await;
    first.message().await;
    first.send(GET_OK).await;
    proxy.client.message().await;
    drop(first);

    proxy
        .client
        .send(b"GET /two HTTP/1.1\r\nHost: svc\r\n\r\n")
        .await;
    let mut second = proxy.upstream().await;
    assert!(second.message().await.0.starts_with("GET /two "));
    second.send(GET_OK).await;
    assert_eq!(status_of(&proxy.client.message().await.0), 200);
}

#[tokio::test]
async fn request_racing_an_upstream_close_is_retried_once() {
    let mut proxy = start(allow_all, limits());
    proxy
        .client
        .send(b"GET /one HTTP/1.1\r\nHost: svc\r\n\r\n")
        .await;
    let mut first = proxy.upstream().await;
    first.message().await;
    first.send(GET_OK).await;
    proxy.client.message().await;

    proxy
        .client
        .send(b"GET /two HTTP/1.1\r\nHost: svc\r\n\r\n")
        .await;
    // The upstream takes the request, then closes without answering.
    first.message().await;
    drop(first);
    let mut second = proxy.upstream().await;
    assert!(second.message().await.0.starts_with("GET /two "));
    second.send(GET_OK).await;
    assert_eq!(status_of(&proxy.client.message().await.0), 200);
    assert_eq!(proxy.records().len(), 2);
}

#[tokio::test]
async fn judge_is_consulted_for_every_request() {
    let open = Arc::new(AtomicBool::new(true));
    let gate = open.clone();
    let judge = move |_: &RequestHead| {
        if gate.load(Ordering::SeqCst) {
            Decision::Allow { rule: 1 }
        } else {
            Decision::Deny { rule: 2 }
        }
    };
    let mut proxy = start(judge, limits());
    proxy
        .client
        .send(b"GET / HTTP/1.1\r\nHost: svc\r\n\r\n")
        .await;
    let mut upstream = proxy.upstream().await;
    upstream.message().await;
    upstream.send(GET_OK).await;
    assert_eq!(status_of(&proxy.client.message().await.0), 200);
    open.store(false, Ordering::SeqCst);
    proxy
        .client
        .send(b"GET / HTTP/1.1\r\nHost: svc\r\n\r\n")
        .await;
    assert_eq!(status_of(&proxy.client.message().await.0), 403);
    let rules: Vec<u32> = proxy.records().iter().map(|r| r.rule).collect();
    assert_eq!(rules, [1, 2]);
}

#[tokio::test]
async fn records_measure_latency_to_the_response_head() {
    let mut proxy = start(allow_all, limits());
    proxy
        .client
        .send(b"GET / HTTP/1.1\r\nHost: svc\r\n\r\n")
        .await;
    let mut upstream = proxy.upstream().await;
    upstream.message().await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    upstream.send(GET_OK).await;
    proxy.client.message().await;
    let latency = proxy.records()[0].latency;
    assert!(latency >= Duration::from_millis(20), "{latency:?}");
}

#[test]
fn serve_connection_future_is_send() {
    fn assert_send<T: Send>(_: &T) {}
    let limits = Limits::default();
    let (client, _peer) = tokio::io::duplex(1);
    let future = serve_connection(
        client,
        Unpooled(|| async { Ok::<_, io::Error>(tokio::io::duplex(1).0) }),
        allow_all,
        |_record: Record| {},
        &limits,
    );
    assert_send(&future);
}

/// Upstreams shared by client connections, as the listener's pool shares them: idle ones in
/// a list, new ones handed to the test.
struct SharedUpstreams {
    idle: Arc<Mutex<Vec<DuplexStream>>>,
    opened: mpsc::UnboundedSender<DuplexStream>,
}

impl Upstreams for SharedUpstreams {
    type Stream = DuplexStream;

    fn take_idle(&mut self) -> Option<DuplexStream> {
        self.idle.lock().expect("idle lock").pop()
    }

    fn connect(&mut self) -> impl Future<Output = io::Result<DuplexStream>> + Send {
        let (ours, theirs) = tokio::io::duplex(PIPE);
        let handed = self.opened.send(theirs);
        async move {
            handed
                .map(|()| ours)
                .map_err(|_| io::Error::other("test stopped accepting upstreams"))
        }
    }

    fn release(&mut self, stream: DuplexStream) {
        self.idle.lock().expect("idle lock").push(stream);
    }
}

/// Serves one client connection with upstreams shared through `idle`.
fn start_shared(
    idle: &Arc<Mutex<Vec<DuplexStream>>>,
) -> (
    Peer,
    mpsc::UnboundedReceiver<DuplexStream>,
    JoinHandle<Result<(), ProxyError>>,
) {
    let (opened, upstreams) = mpsc::unbounded_channel();
    let shared = SharedUpstreams {
        idle: Arc::clone(idle),
        opened,
    };
    let (client, _records, _tunnels, task) = spawn_with(allow_all, limits(), PIPE, shared);
    (client, upstreams, task)
}

#[tokio::test]
async fn a_closing_clients_upstream_serves_the_next_client_connection() {
    let idle = Arc::default();
    let (mut client, mut opened, task) = start_shared(&idle);
    client
        .send(b"GET /1 HTTP/1.1\r\nHost: svc\r\nConnection: close\r\n\r\n")
        .await;
    let mut upstream = Peer::new(step(opened.recv()).await.expect("opened"));
    assert_eq!(
        upstream.message().await.0,
        "GET /1 HTTP/1.1\r\nhost: svc\r\n\r\n"
    );
    upstream.send(GET_OK).await;
    let (head, body) = client.message().await;
    assert!(head.contains("\r\nconnection: close\r\n"), "{head}");
    assert_eq!(body, b"ok");
    client.expect_closed().await;
    drop(client);
    step(task).await.expect("served").expect("ended well");
    assert_eq!(
        idle.lock().expect("idle").len(),
        1,
        "the upstream is left idle"
    );

    // An HTTP/1.0 client, on the same upstream connection.
    let (mut client, mut opened, task) = start_shared(&idle);
    client.send(b"GET /2 HTTP/1.0\r\n\r\n").await;
    assert_eq!(
        upstream.message().await.0,
        "GET /2 HTTP/1.0\r\nconnection: keep-alive\r\n\r\n"
    );
    upstream.send(GET_OK).await;
    assert_eq!(client.message().await.1, b"ok");
    client.expect_closed().await;
    drop(client);
    step(task).await.expect("served").expect("ended well");
    assert!(opened.try_recv().is_err(), "no new upstream connection");
    assert_eq!(idle.lock().expect("idle").len(), 1);
}

#[tokio::test]
async fn an_idle_upstream_that_closed_or_asked_to_close_is_not_reused() {
    let idle: Arc<Mutex<Vec<DuplexStream>>> = Arc::default();
    // Closed by the server while idle.
    let (ours, theirs) = tokio::io::duplex(PIPE);
    drop(theirs);
    idle.lock().expect("idle").push(ours);
    let (mut client, mut opened, task) = start_shared(&idle);
    client
        .send(b"GET / HTTP/1.1\r\nHost: svc\r\nConnection: close\r\n\r\n")
        .await;
    let mut upstream = Peer::new(step(opened.recv()).await.expect("a new one is opened"));
    upstream.message().await;
    // The server wants this one closed: it goes back to nobody.
    upstream
        .send(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok")
        .await;
    assert_eq!(client.message().await.1, b"ok");
    drop(client);
    step(task).await.expect("served").expect("ended well");
    assert!(idle.lock().expect("idle").is_empty());
}

#[tokio::test]
async fn an_upstream_cut_mid_response_is_not_left_idle() {
    let idle: Arc<Mutex<Vec<DuplexStream>>> = Arc::default();
    let (mut client, mut opened, task) = start_shared(&idle);
    client.send(b"GET / HTTP/1.1\r\nHost: svc\r\n\r\n").await;
    let mut upstream = Peer::new(step(opened.recv()).await.expect("opened"));
    upstream.message().await;
    upstream
        .send(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nok")
        .await;
    client.head().await;
    // The client leaves in the middle of the body; the rest has nowhere to go.
    drop(client);
    upstream.send(b"12345678").await;
    assert!(step(task).await.expect("served").is_err());
    assert!(idle.lock().expect("idle").is_empty());
}
