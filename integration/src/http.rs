//! HTTP for L7 tests: a real HTTP/1.1 server (hyper) inside an endpoint namespace that
//! records what reached it, a raw server that switches protocols whenever asked (h2c
//! included, as a naive h2c server would), and a raw-socket client that sends exact bytes
//! (smuggling tests need bytes no well-behaved client library would produce) and reads
//! responses.

use std::io::{Read as _, Write as _};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::{BodyExt as _, Full};
use hyper::body::Bytes;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;

use crate::traffic;

/// What the backend saw: `METHOD PATH BODY_BYTES` per request.
pub type Seen = Arc<Mutex<Vec<String>>>;

/// A backend answering `200` with `METHOD PATH BODY_BYTES`, until the test process ends.
pub fn backend(netns: &str, port: u16) -> Seen {
    let seen: Seen = Arc::new(Mutex::new(Vec::new()));
    let log = Arc::clone(&seen);
    let netns = netns.to_string();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        traffic::in_netns(&netns, move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::bind((Ipv4Addr::UNSPECIFIED, port))
                    .await
                    .expect("bind backend");
                ready_tx.send(()).expect("ready");
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        continue;
                    };
                    let log = Arc::clone(&log);
                    tokio::spawn(async move {
                        let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
                            let log = Arc::clone(&log);
                            async move {
                                let (method, path) =
                                    (req.method().to_string(), req.uri().path().to_string());
                                let query = req
                                    .uri()
                                    .query()
                                    .map(|q| format!("?{q}"))
                                    .unwrap_or_default();
                                let body = req
                                    .into_body()
                                    .collect()
                                    .await
                                    .map_or(0, |b| b.to_bytes().len());
                                let line = format!("{method} {path}{query} {body}");
                                log.lock().unwrap().push(line.clone());
                                Ok::<_, std::convert::Infallible>(Response::new(Full::new(
                                    Bytes::from(line),
                                )))
                            }
                        });
                        let _ = http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), svc)
                            .with_upgrades()
                            .await;
                    });
                }
            });
        });
    });
    ready_rx
        .recv_timeout(Duration::from_secs(5))
        .expect("backend did not start");
    seen
}

/// What [`upgrading_backend`] answers to tunnel bytes after switching to h2c: it would have
/// served them as HTTP/2 requests, none of which the proxy judged.
pub const UNJUDGED: &str = "UNJUDGED";

/// A raw HTTP/1.1 server that honours every upgrade it is offered, until the test process
/// ends. Logs `METHOD PATH` per request, with ` upgrade=VALUE` and ` http2-settings` when the
/// request carried those fields. A request asking (Connection: upgrade) for `h2c` gets `101`
/// to h2c, and every later read on that connection is logged as [`UNJUDGED`] and answered
/// with `UNJUDGED\n`, as requests nobody judged would be. Any other upgrade gets `101` to the
/// first protocol offered, then an echo (`echo:` + the bytes read; logged as `TUNNEL N`).
/// Everything else is `200` with `METHOD PATH` as the body, keep-alive.
pub fn upgrading_backend(netns: &str, port: u16) -> Seen {
    let listener = traffic::in_netns(netns, move || {
        TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)).expect("bind upgrading backend")
    });
    let seen: Seen = Arc::new(Mutex::new(Vec::new()));
    let log = Arc::clone(&seen);
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            let log = Arc::clone(&log);
            std::thread::spawn(move || serve_upgrades(stream, &log));
        }
    });
    seen
}

fn serve_upgrades(mut stream: TcpStream, log: &Seen) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut req = httparse::Request::new(&mut headers);
        let Ok(parsed) = req.parse(&buf) else { return };
        let httparse::Status::Complete(head_len) = parsed else {
            match stream.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
            continue;
        };
        let field = |name: &str| {
            req.headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case(name))
                .map(|h| String::from_utf8_lossy(h.value).into_owned())
        };
        let mut line = format!(
            "{} {}",
            req.method.unwrap_or_default(),
            req.path.unwrap_or_default()
        );
        let upgrade = field("upgrade");
        if let Some(u) = &upgrade {
            line.push_str(" upgrade=");
            line.push_str(u);
        }
        if field("http2-settings").is_some() {
            line.push_str(" http2-settings");
        }
        let switching = field("connection").is_some_and(|c| {
            c.split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
        });
        let offered: Vec<String> = upgrade
            .iter()
            .flat_map(|u| u.split(','))
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty())
            .collect();
        let body = field("content-length")
            .and_then(|v| v.parse::<usize>().ok())
            .unwrap_or(0);
        while buf.len() < head_len + body {
            match stream.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        buf.drain(..head_len + body);
        log.lock().unwrap().push(line.clone());
        if switching && let Some(protocol) = offered.first() {
            let h2c = offered.iter().any(|p| p.eq_ignore_ascii_case("h2c"));
            let protocol = if h2c { "h2c" } else { protocol.as_str() };
            let answer = format!(
                "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: {protocol}\r\n\r\n"
            );
            if stream.write_all(answer.as_bytes()).is_err() {
                return;
            }
            tunnel(stream, buf, h2c, log);
            return;
        }
        let answer = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{line}",
            line.len()
        );
        if stream.write_all(answer.as_bytes()).is_err() {
            return;
        }
    }
}

/// After a 101: what `early` holds and every later read is tunnel data.
fn tunnel(mut stream: TcpStream, early: Vec<u8>, h2c: bool, log: &Seen) {
    let mut data = early;
    let mut chunk = [0u8; 16 * 1024];
    loop {
        if !data.is_empty() {
            let answer = if h2c {
                log.lock().unwrap().push(UNJUDGED.to_string());
                format!("{UNJUDGED}\n").into_bytes()
            } else {
                log.lock().unwrap().push(format!("TUNNEL {}", data.len()));
                [&b"echo:"[..], &data].concat()
            };
            if stream.write_all(&answer).is_err() {
                return;
            }
            data.clear();
        }
        match stream.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => data.extend_from_slice(&chunk[..n]),
        }
    }
}

/// A parsed response.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

/// A client connection opened from inside an endpoint namespace.
pub struct Client {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Client {
    pub fn connect(netns: &str, ip: Ipv4Addr, port: u16) -> std::io::Result<Client> {
        traffic::in_netns(netns, move || {
            let stream =
                TcpStream::connect_timeout(&SocketAddr::from((ip, port)), Duration::from_secs(3))?;
            stream.set_read_timeout(Some(Duration::from_secs(5)))?;
            Ok(Client {
                stream,
                buf: Vec::new(),
            })
        })
    }

    /// Like [`Client::connect`], from local port `local_port` (bound with SO_REUSEADDR, so
    /// a port whose last connection is closing can be taken again at once).
    pub fn connect_from(
        netns: &str,
        local_port: u16,
        ip: Ipv4Addr,
        port: u16,
    ) -> std::io::Result<Client> {
        traffic::in_netns(netns, move || {
            let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
            sock.set_reuse_address(true)?;
            sock.bind(&SocketAddr::from((Ipv4Addr::UNSPECIFIED, local_port)).into())?;
            sock.connect_timeout(
                &SocketAddr::from((ip, port)).into(),
                Duration::from_secs(10),
            )?;
            let stream: TcpStream = sock.into();
            stream.set_read_timeout(Some(Duration::from_secs(5)))?;
            Ok(Client {
                stream,
                buf: Vec::new(),
            })
        })
    }

    pub fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes)
    }

    /// Reads one response (Content-Length or chunked or until close). Err when the
    /// connection closed or timed out before a complete response.
    pub fn read_reply(&mut self) -> std::io::Result<Reply> {
        loop {
            let mut headers = [httparse::EMPTY_HEADER; 64];
            let mut resp = httparse::Response::new(&mut headers);
            if let httparse::Status::Complete(head_len) = resp
                .parse(&self.buf)
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()))?
            {
                let status = resp.code.unwrap_or(0);
                let headers: Vec<(String, String)> = resp
                    .headers
                    .iter()
                    .map(|h| {
                        (
                            h.name.to_ascii_lowercase(),
                            String::from_utf8_lossy(h.value).into_owned(),
                        )
                    })
                    .collect();
                let get = |n: &str| headers.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
                let body_start = head_len;
                if let Some(len) = get("content-length").and_then(|v| v.parse::<usize>().ok()) {
                    while self.buf.len() < body_start + len {
                        self.fill()?;
                    }
                    let body = String::from_utf8_lossy(&self.buf[body_start..body_start + len])
                        .into_owned();
                    self.buf.drain(..body_start + len);
                    return Ok(Reply {
                        status,
                        headers,
                        body,
                    });
                }
                if get("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
                    let mut body = Vec::new();
                    let mut pos = body_start;
                    loop {
                        match httparse::parse_chunk_size(&self.buf[pos..]) {
                            Ok(httparse::Status::Complete((used, 0))) => {
                                while self.buf.len() < pos + used + 2 {
                                    self.fill()?;
                                }
                                self.buf.drain(..pos + used + 2);
                                return Ok(Reply {
                                    status,
                                    headers,
                                    body: String::from_utf8_lossy(&body).into_owned(),
                                });
                            }
                            Ok(httparse::Status::Complete((used, size))) => {
                                let size = usize::try_from(size).map_err(|_| {
                                    std::io::Error::new(
                                        std::io::ErrorKind::InvalidData,
                                        "chunk too large",
                                    )
                                })?;
                                while self.buf.len() < pos + used + size + 2 {
                                    self.fill()?;
                                }
                                body.extend_from_slice(&self.buf[pos + used..pos + used + size]);
                                pos += used + size + 2;
                            }
                            Ok(httparse::Status::Partial) => self.fill()?,
                            Err(_) => {
                                return Err(std::io::Error::new(
                                    std::io::ErrorKind::InvalidData,
                                    "bad chunk",
                                ));
                            }
                        }
                    }
                }
                // Close-delimited (or no body for statuses without one).
                if status == 204 || status == 304 || (100..200).contains(&status) {
                    self.buf.drain(..body_start);
                    return Ok(Reply {
                        status,
                        headers,
                        body: String::new(),
                    });
                }
                while self.fill().is_ok() {}
                let body = String::from_utf8_lossy(&self.buf[body_start..]).into_owned();
                self.buf.clear();
                return Ok(Reply {
                    status,
                    headers,
                    body,
                });
            }
            self.fill()?;
        }
    }

    /// Raw bytes (a tunnel's, after a 101) up to and including `end`.
    pub fn read_until(&mut self, end: &[u8]) -> std::io::Result<Vec<u8>> {
        loop {
            if let Some(at) = self.buf.windows(end.len()).position(|w| w == end) {
                return Ok(self.buf.drain(..at + end.len()).collect());
            }
            self.fill()?;
        }
    }

    fn fill(&mut self) -> std::io::Result<()> {
        // Reads straight into the buffer's tail, then keeps only what arrived.
        let start = self.buf.len();
        self.buf.resize(start + 65536, 0);
        let read = self.stream.read(&mut self.buf[start..]);
        self.buf.truncate(start + read.as_ref().map_or(0, |n| *n));
        let n = read?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "connection closed",
            ));
        }
        Ok(())
    }

    /// True when the server closed the connection (read returns EOF within the timeout).
    pub fn closed(&mut self) -> bool {
        let mut chunk = [0u8; 1024];
        loop {
            match self.stream.read(&mut chunk) {
                Ok(0) => return true,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
                Err(_) => return false,
            }
        }
    }
}

/// One GET on a fresh connection; the status, or None when no response came.
pub fn get(netns: &str, ip: Ipv4Addr, port: u16, path: &str, extra_headers: &str) -> Option<Reply> {
    let mut c = Client::connect(netns, ip, port).ok()?;
    c.send(format!("GET {path} HTTP/1.1\r\nHost: {ip}\r\n{extra_headers}\r\n").as_bytes())
        .ok()?;
    c.read_reply().ok()
}
