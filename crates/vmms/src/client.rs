//! The API client the CLI uses: HTTP/1.1 (hyper) over the service's unix socket, or over TCP
//! with a bearer token. One connection per request (the CLI makes a handful).

use crate::api::CONSOLE_PROTOCOL;
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{header, Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use std::path::PathBuf;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Where the service is.
#[derive(Debug, Clone)]
pub enum Endpoint {
    Unix(PathBuf),
    Tcp { addr: String, token: Option<String> },
}

impl Endpoint {
    /// `http://HOST:PORT` (or `tcp:HOST:PORT`) is TCP; anything else is a unix socket path.
    pub fn parse(s: &str, token: Option<String>) -> Result<Endpoint, String> {
        let tcp = s
            .strip_prefix("http://")
            .or_else(|| s.strip_prefix("tcp:"))
            .map(|a| a.trim_end_matches('/'));
        match tcp {
            Some(a) if !a.is_empty() && !a.contains('/') => Ok(Endpoint::Tcp {
                addr: a.to_string(),
                token,
            }),
            Some(_) => Err(format!(
                "invalid API address '{s}' (expected http://HOST:PORT)"
            )),
            None if s.is_empty() => Err("empty API socket path".into()),
            None => Ok(Endpoint::Unix(PathBuf::from(s))),
        }
    }

    fn describe(&self) -> String {
        match self {
            Endpoint::Unix(p) => format!("unix:{}", p.display()),
            Endpoint::Tcp { addr, .. } => format!("tcp:{addr}"),
        }
    }
}

/// Failures before an HTTP answer.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the service at {0}: {1} (is `verdigris serve` running? --api/VERDIGRIS_API selects the socket)")]
    Unreachable(String, String),
    #[error("talking to the service: {0}")]
    Protocol(String),
}

/// An HTTP answer with a JSON (or empty) body.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub body: Value,
}

impl Reply {
    /// The `error` field of an error body (or the status text).
    pub fn error_message(&self) -> String {
        self.body
            .get("error")
            .and_then(Value::as_str)
            .map(str::to_string)
            .unwrap_or_else(|| format!("the service answered {}", self.status))
    }
}

/// A unix or TCP stream.
pub enum Stream {
    Unix(tokio::net::UnixStream),
    Tcp(tokio::net::TcpStream),
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Unix(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Stream::Unix(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Unix(s) => Pin::new(s).poll_flush(cx),
            Stream::Tcp(s) => Pin::new(s).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Unix(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// Percent-encodes one path segment (VM names may hold spaces and any Unicode). Hand-written:
/// a dozen lines against another dependency.
pub fn encode_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Encodes a query value.
pub fn encode_query(s: &str) -> String {
    encode_segment(s)
}

#[derive(Debug, Clone)]
pub struct Client {
    pub endpoint: Endpoint,
}

impl Client {
    pub fn new(endpoint: Endpoint) -> Self {
        Client { endpoint }
    }

    async fn connect(&self) -> Result<Stream, ClientError> {
        let unreachable =
            |e: std::io::Error| ClientError::Unreachable(self.endpoint.describe(), e.to_string());
        match &self.endpoint {
            Endpoint::Unix(p) => tokio::net::UnixStream::connect(p)
                .await
                .map(Stream::Unix)
                .map_err(unreachable),
            Endpoint::Tcp { addr, .. } => tokio::net::TcpStream::connect(addr.as_str())
                .await
                .map(Stream::Tcp)
                .map_err(unreachable),
        }
    }

    fn build(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Request<Full<Bytes>>, ClientError> {
        let host = match &self.endpoint {
            Endpoint::Unix(_) => "localhost".to_string(),
            Endpoint::Tcp { addr, .. } => addr.clone(),
        };
        let mut b = Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, host)
            .header(
                header::USER_AGENT,
                concat!("verdigris/", env!("CARGO_PKG_VERSION")),
            );
        if let Endpoint::Tcp { token: Some(t), .. } = &self.endpoint {
            b = b.header(header::AUTHORIZATION, format!("Bearer {t}"));
        }
        let body = match body {
            Some(v) => {
                b = b.header(header::CONTENT_TYPE, "application/json");
                Bytes::from(serde_json::to_vec(v).unwrap_or_default())
            }
            None => Bytes::new(),
        };
        b.body(Full::new(body))
            .map_err(|e| ClientError::Protocol(e.to_string()))
    }

    /// Sends a request and returns the answer's head and streaming body.
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Response<Incoming>, ClientError> {
        let req = self.build(method, path, body)?;
        let io = TokioIo::new(self.connect().await?);
        let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
            .await
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        tokio::spawn(async move {
            let _ = conn.with_upgrades().await;
        });
        sender
            .send_request(req)
            .await
            .map_err(|e| ClientError::Protocol(e.to_string()))
    }

    /// A request with a JSON answer.
    pub async fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Reply, ClientError> {
        let resp = self.send(method, path, body).await?;
        let status = resp.status();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| ClientError::Protocol(e.to_string()))?
            .to_bytes();
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()))
        };
        Ok(Reply { status, body })
    }

    /// Attaches to a VM's serial console: a raw two-way byte stream, or the error answer.
    pub async fn console(
        &self,
        vm: &str,
    ) -> Result<Result<TokioIo<hyper::upgrade::Upgraded>, Reply>, ClientError> {
        let mut req = self.build(
            Method::GET,
            &format!("/v1/vms/{}/console", encode_segment(vm)),
            None,
        )?;
        req.headers_mut().insert(
            header::CONNECTION,
            header::HeaderValue::from_static("upgrade"),
        );
        req.headers_mut().insert(
            header::UPGRADE,
            header::HeaderValue::from_static(CONSOLE_PROTOCOL),
        );
        let io = TokioIo::new(self.connect().await?);
        let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
            .await
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        tokio::spawn(async move {
            let _ = conn.with_upgrades().await;
        });
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
            let status = resp.status();
            let bytes = resp
                .into_body()
                .collect()
                .await
                .map(|c| c.to_bytes())
                .unwrap_or_default();
            let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            return Ok(Err(Reply { status, body }));
        }
        let up = hyper::upgrade::on(resp)
            .await
            .map_err(|e| ClientError::Protocol(format!("console upgrade: {e}")))?;
        Ok(Ok(TokioIo::new(up)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_and_encoding() {
        assert!(matches!(
            Endpoint::parse("/run/x.sock", None),
            Ok(Endpoint::Unix(_))
        ));
        assert!(matches!(
            Endpoint::parse("http://127.0.0.1:8080", None),
            Ok(Endpoint::Tcp { .. })
        ));
        assert!(matches!(
            Endpoint::parse("tcp:[::1]:80", None),
            Ok(Endpoint::Tcp { .. })
        ));
        assert!(Endpoint::parse("http://", None).is_err());
        assert!(Endpoint::parse("http://a/b", None).is_err());
        assert!(Endpoint::parse("", None).is_err());
        assert_eq!(encode_segment("web 01/é"), "web%2001%2F%C3%A9");
        assert_eq!(encode_segment("a-b_c.d~"), "a-b_c.d~");
    }
}
