//! The CLI's side of the API: HTTP/1.1 over the agent's unix socket.

use std::path::{Path, PathBuf};

use http_body_util::{BodyExt as _, Full};
pub use hyper::StatusCode;
use hyper::body::Bytes;
use hyper::{Method, Request};
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

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio::net::UnixListener;

    use super::*;

    /// Answers one request with `status` and `body`, as the agent would.
    fn agent_answering(
        status: &'static str,
        body: String,
    ) -> (PathBuf, tokio::task::JoinHandle<()>) {
        let dir = std::env::temp_dir().join(format!(
            "palisade-api-client-{}-{}",
            std::process::id(),
            body.len()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("agent.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        let task = tokio::spawn(async move {
            let (mut conn, _) = listener.accept().await.unwrap();
            let mut buf = vec![0u8; 4096];
            let _ = conn.read(&mut buf).await.unwrap();
            let answer = format!(
                "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            conn.write_all(answer.as_bytes()).await.unwrap();
        });
        (socket, task)
    }

    #[tokio::test]
    async fn a_rejected_manifest_arrives_whole() {
        let m = ManifestError {
            document: 2,
            object: Some("NetworkPolicy x/a".into()),
            field: Some("spec.ingress[0].from[0].ipBlock.cidr".into()),
            reason: "invalid CIDR \"10.0.0.0/33\"".into(),
        };
        let body = serde_json::to_string(&ErrorBody {
            error: m.to_string(),
            manifest: Some(m.clone()),
        })
        .unwrap();
        let (socket, server) = agent_answering("400 Bad Request", body);
        let err = Client::new(&socket)
            .post::<_, serde_json::Value>("/v1/policies", &serde_json::json!({"manifest": ""}))
            .await
            .unwrap_err();
        server.await.unwrap();
        match &err {
            ClientError::Manifest(got) => assert_eq!(got, &m),
            other => panic!("expected the manifest error, got {other:?}"),
        }
        assert_eq!(
            err.to_string(),
            "document 2 (NetworkPolicy x/a): spec.ingress[0].from[0].ipBlock.cidr: invalid CIDR \"10.0.0.0/33\""
        );
        assert_eq!(err.status(), Some(StatusCode::BAD_REQUEST));
    }

    #[tokio::test]
    async fn other_errors_keep_their_message_and_status() {
        let body = serde_json::to_string(&ErrorBody {
            error: "no endpoint named \"db\"".into(),
            manifest: None,
        })
        .unwrap();
        let (socket, server) = agent_answering("404 Not Found", body);
        let err = Client::new(&socket)
            .get::<serde_json::Value>("/v1/endpoints/db")
            .await
            .unwrap_err();
        server.await.unwrap();
        assert_eq!(err.to_string(), "no endpoint named \"db\"");
        assert_eq!(err.status(), Some(StatusCode::NOT_FOUND));
    }

    #[tokio::test]
    async fn a_missing_agent_is_named() {
        let err = Client::new(Path::new("/nonexistent/palisade.sock"))
            .get::<serde_json::Value>("/v1/status")
            .await
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("the palisade agent is not running"),
            "{err}"
        );
    }
}
