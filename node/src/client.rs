//! The CLI's side of the control API: HTTP/1.1 over the agent's Unix socket.

use std::path::PathBuf;

use anyhow::{Context, anyhow, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;

use crate::config::DEFAULT_DATA_DIR;

/// Where the agent's control socket is: `unix:///path` or a plain path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Host(pub PathBuf);

impl Host {
    pub fn parse(s: Option<&str>) -> anyhow::Result<Host> {
        match s {
            None => Ok(Host(PathBuf::from(DEFAULT_DATA_DIR).join("weft.sock"))),
            Some(s) => {
                let path = s.strip_prefix("unix://").unwrap_or(s);
                if path.is_empty() || s.contains("://") && !s.starts_with("unix://") {
                    bail!("--host {s:?}: expected unix:///path/to/weft.sock");
                }
                Ok(Host(PathBuf::from(path)))
            }
        }
    }
}

#[derive(Debug, Clone)]
pub struct Client {
    host: Host,
}

/// An error answer of the agent: status and its one-line message.
#[derive(Debug)]
pub struct ApiError {
    pub status: u16,
    pub message: String,
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ApiError {}

impl Client {
    pub fn new(host: Host) -> Self {
        Client { host }
    }

    /// The agent's control socket.
    pub fn socket_path(&self) -> &std::path::Path {
        &self.host.0
    }

    /// Sends one request; returns the body of a 2xx answer.
    pub async fn call(&self, method: Method, path: &str, body: Bytes) -> anyhow::Result<Bytes> {
        let sock = &self.host.0;
        let stream = tokio::net::UnixStream::connect(sock).await.map_err(|e| {
            anyhow!(
                "cannot reach a weft agent at unix://{} ({e}); start one with `weft agent --data-dir DIR` or point -H/WEFT_HOST at its socket",
                sock.display()
            )
        })?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .context("control socket handshake")?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, "weft")
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(Full::new(body))
            .expect("valid request");
        let exchange = async {
            let resp = sender.send_request(req).await.context("control API request")?;
            let status = resp.status();
            let bytes = resp.into_body().collect().await.context("control API answer")?.to_bytes();
            anyhow::Ok((status, bytes))
        };
        let (status, bytes) = tokio::time::timeout(std::time::Duration::from_secs(60), exchange)
            .await
            .map_err(|_| anyhow!("the agent at unix://{} did not answer within 60 s", sock.display()))??;
        if !status.is_success() {
            let text = String::from_utf8_lossy(&bytes);
            let message = serde_json::from_slice::<serde_json::Value>(&bytes)
                .ok()
                .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string))
                .unwrap_or_else(|| {
                    let first = text.lines().next().unwrap_or("").trim();
                    if first.is_empty() {
                        format!("agent answered {status}")
                    } else {
                        format!("agent answered {status}: {first}")
                    }
                });
            return Err(ApiError { status: status.as_u16(), message }.into());
        }
        Ok(bytes)
    }

    pub async fn get_json<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        let b = self.call(Method::GET, path, Bytes::new()).await?;
        serde_json::from_slice(&b).context("unexpected answer from the agent")
    }

    pub async fn send_json<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: &impl serde::Serialize,
    ) -> anyhow::Result<T> {
        let b = self.call(method, path, Bytes::from(serde_json::to_vec(body)?)).await?;
        serde_json::from_slice(&b).context("unexpected answer from the agent")
    }
}

/// Percent-encodes one URL path segment or query value.
pub fn enc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_forms() {
        assert_eq!(Host::parse(Some("unix:///tmp/w.sock")).unwrap(), Host("/tmp/w.sock".into()));
        assert_eq!(Host::parse(Some("/tmp/w.sock")).unwrap(), Host("/tmp/w.sock".into()));
        assert!(Host::parse(Some("tcp://1.2.3.4:2375")).is_err());
        assert_eq!(Host::parse(None).unwrap(), Host("/var/lib/weft/weft.sock".into()));
        assert_eq!(enc("a b/c"), "a%20b%2Fc");
    }
}
