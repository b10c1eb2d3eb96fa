//! HTTP for L7 tests: a real HTTP/1.1 server (hyper) inside an endpoint namespace that
//! records what reached it, and a raw-socket client that sends exact bytes (smuggling tests
//! need bytes no well-behaved client library would produce) and reads responses.

use std::io::{Read as _, Write as _};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
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
