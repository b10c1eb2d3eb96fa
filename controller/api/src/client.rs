//! The CLI's side of the API: HTTP/1.1 over the agent's unix socket.

use std::path::{Path, PathBuf};

use http_body_util::{BodyExt as _, Full};
use hyper::body::Bytes;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::net::UnixStream;

use palisade_policies::manifest::ManifestError;

use crate::types::ErrorBody;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "the palisade agent is not running (no API socket at {0}); start it with `palisade-agent --local`"
    )]
    NotRunning(PathBuf),
    #[error("permission denied on {0}: the agent API is root-only")]
    PermissionDenied(PathBuf),
    #[error("cannot reach the agent at {socket}: {source}")]
    Connect {
        socket: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The agent refused a manifest: the document, object, field and reason it named.
    #[error(transparent)]
    Manifest(ManifestError),
    /// The agent answered with an error.
    #[error("{message}")]
    Api { status: StatusCode, message: String },
    #[error("talking to the agent: {0}")]
    Http(#[from] hyper::Error),
    #[error("building a request for {path}: {source}")]
    Request {
        path: String,
        #[source]
        source: hyper::http::Error,
    },
    #[error("unexpected answer from the agent: {0}")]
    Decode(#[from] serde_json::Error),
}

impl ClientError {
    /// The HTTP status of an error answer.
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            ClientError::Api { status, .. } => Some(*status),
            ClientError::Manifest(_) => Some(StatusCode::BAD_REQUEST),
            _ => None,
        }
    }
}

async fn body_bytes(resp: hyper::Response<hyper::body::Incoming>) -> Result<Bytes, ClientError> {
    Ok(resp.into_body().collect().await?.to_bytes())
}

pub struct Client {
    socket: PathBuf,
}

impl Client {
    pub fn new(socket: &Path) -> Self {
        Self {
            socket: socket.to_path_buf(),
        }
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<hyper::Response<hyper::body::Incoming>, ClientError> {
        let stream = UnixStream::connect(&self.socket)
            .await
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
                    ClientError::NotRunning(self.socket.clone())
                }
                std::io::ErrorKind::PermissionDenied => {
                    ClientError::PermissionDenied(self.socket.clone())
                }
                _ => ClientError::Connect {
                    socket: self.socket.clone(),
                    source: e,
                },
            })?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        let req = Request::builder()
            .method(method)
            .uri(format!("http://palisade{path}"))
            .header("host", "palisade")
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|source| ClientError::Request {
                path: path.to_string(),
                source,
            })?;
        let resp = sender.send_request(req).await?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status();
        let bytes = body_bytes(resp).await?;
        Err(match serde_json::from_slice::<ErrorBody>(&bytes) {
            Ok(ErrorBody {
                manifest: Some(m), ..
            }) => ClientError::Manifest(m),
            Ok(b) => ClientError::Api {
                status,
                message: b.error,
            },
            Err(_) => ClientError::Api {
                status,
                message: format!("HTTP {status}: {}", String::from_utf8_lossy(&bytes)),
            },
        })
    }

    async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<T, ClientError> {
        let bytes = body_bytes(self.send(method, path, body).await?).await?;
        let bytes = if bytes.is_empty() {
            Bytes::from_static(b"null")
        } else {
            bytes
        };
        Ok(serde_json::from_slice(&bytes)?)
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.call(Method::GET, path, None).await
    }

    pub async fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ClientError> {
        self.call(Method::POST, path, Some(serde_json::to_vec(body)?))
            .await
    }

    pub async fn delete<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.call(Method::DELETE, path, None).await
    }

    /// POSTs and hands each line of the streamed answer to `on_line` as it arrives; stops
    /// early when `on_line` returns false.
    pub async fn post_lines<B: Serialize>(
        &self,
        path: &str,
        body: &B,
        mut on_line: impl FnMut(&str) -> bool,
    ) -> Result<(), ClientError> {
        let resp = self
            .send(Method::POST, path, Some(serde_json::to_vec(body)?))
            .await?;
        let mut body = resp.into_body();
        let mut buf: Vec<u8> = Vec::new();
        while let Some(frame) = body.frame().await {
            let frame = frame?;
            if let Ok(data) = frame.into_data() {
                buf.extend_from_slice(&data);
                while let Some(pos) = buf.iter().position(|b| *b == b'\n') {
                    let line: Vec<u8> = buf.drain(..=pos).collect();
                    if !on_line(String::from_utf8_lossy(&line[..line.len() - 1]).as_ref()) {
                        return Ok(());
                    }
                }
            }
        }
        Ok(())
    }
}
