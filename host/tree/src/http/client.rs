//! The JSON-over-HTTP client every node uses to call another: a bearer token, a per-request
//! timeout, plain HTTP or HTTPS-only with the node's client certificate.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{AUTHORIZATION, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::{Client, ResponseFuture, connect::HttpConnector};
use hyper_util::rt::TokioExecutor;
use serde::{Serialize, de::DeserializeOwned};
use std::time::Duration;
use thiserror::Error;

use crate::tls::Tls;

#[derive(Debug, Error)]
pub enum ClientError {
    #[error("{method} {url}: {source}")]
    Transport { method: Method, url: String, source: hyper_util::client::legacy::Error },
    #[error("{method} {url}: timed out after {after:?}")]
    Timeout { method: Method, url: String, after: Duration },
    /// Any answer but a success; `location` is a redirect's `Location` header (unchecked: the
    /// caller decides whether to go there, `crate::managers` only to a configured manager).
    #[error("{method} {url}: HTTP {status}: {body}")]
    Status {
        method: Method,
        url: String,
        status: StatusCode,
        body: String,
        location: Option<String>,
    },
    #[error("{method} {url}: reading response: {source}")]
    Body { method: Method, url: String, source: hyper::Error },
    #[error("{method} {url}: response is not the expected JSON: {source}")]
    Decode { method: Method, url: String, source: serde_json::Error },
    #[error("bad request to {url}: {what}")]
    Request { url: String, what: String },
}

/// Plain HTTP, or HTTPS only (with a client certificate).
#[derive(Clone)]
enum Transport {
    Plain(Client<HttpConnector, Full<Bytes>>),
    Tls(Client<HttpsConnector<HttpConnector>, Full<Bytes>>),
}

impl Transport {
    fn request(&self, req: Request<Full<Bytes>>) -> ResponseFuture {
        match self {
            Transport::Plain(c) => c.request(req),
            Transport::Tls(c) => c.request(req),
        }
    }
}

/// A JSON-over-HTTP client with a bearer token and a per-request timeout.
#[derive(Clone)]
pub struct JsonClient {
    inner: Transport,
    token: String,
    timeout: Duration,
}

impl JsonClient {
    /// A plain-HTTP client presenting `token` (empty: none).
    pub fn new(token: &str, timeout: Duration) -> JsonClient {
        JsonClient::with_tls(token, timeout, None)
    }

    /// With `tls`, an HTTPS-only client that presents the node's certificate and trusts only
    /// servers certified by the cluster CA for the URL's host; without, plain HTTP.
    pub fn with_tls(token: &str, timeout: Duration, tls: Option<&Tls>) -> JsonClient {
        let mut conn = HttpConnector::new();
        conn.set_nodelay(true);
        conn.set_connect_timeout(Some(timeout));
        let inner = match tls {
            None => Transport::Plain(Client::builder(TokioExecutor::new()).build(conn)),
            Some(t) => {
                conn.enforce_http(false);
                let https = hyper_rustls::HttpsConnectorBuilder::new()
                    .with_tls_config((*t.client_config()).clone())
                    .https_only()
                    .enable_http1()
                    .wrap_connector(conn);
                Transport::Tls(Client::builder(TokioExecutor::new()).build(https))
            }
        };
        JsonClient { inner, token: token.to_string(), timeout }
    }

    /// `https` for a TLS client, else `http`.
    pub fn scheme(&self) -> &'static str {
        match self.inner {
            Transport::Plain(_) => "http",
            Transport::Tls(_) => "https",
        }
    }

    /// The base URL of a node at `host:port`, in this client's scheme.
    pub fn base_url(&self, address: &str) -> String {
        format!("{}://{address}", self.scheme())
    }

    /// Sends a request; `extra` adds headers (e.g. `Range`). Returns the response once its head
    /// arrived and its status is a success; the body is left to the caller.
    pub async fn send(
        &self,
        method: Method,
        url: &str,
        body: Option<Vec<u8>>,
        extra: &[(&'static str, String)],
    ) -> Result<Response<Incoming>, ClientError> {
        let mut b = Request::builder().method(method.clone()).uri(url);
        if !self.token.is_empty() {
            b = b.header(AUTHORIZATION, format!("Bearer {}", self.token));
        }
        if body.is_some() {
            b = b.header(CONTENT_TYPE, "application/json");
        }
        for (k, v) in extra {
            b = b.header(*k, v);
        }
        let req = b
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| ClientError::Request { url: url.into(), what: e.to_string() })?;
        let resp = tokio::time::timeout(self.timeout, self.inner.request(req))
            .await
            .map_err(|_| ClientError::Timeout {
                method: method.clone(),
                url: url.into(),
                after: self.timeout,
            })?
            .map_err(|source| ClientError::Transport {
                method: method.clone(),
                url: url.into(),
                source,
            })?;
        if !resp.status().is_success() {
            let status = resp.status();
            let location = resp
                .headers()
                .get(hyper::header::LOCATION)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            let body = match tokio::time::timeout(self.timeout, resp.into_body().collect()).await {
                Ok(Ok(b)) => String::from_utf8_lossy(&b.to_bytes()).into_owned(),
                _ => String::new(),
            };
            return Err(ClientError::Status { method, url: url.into(), status, body, location });
        }
        Ok(resp)
    }

    /// A JSON request and a JSON answer.
    pub async fn call<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        method: Method,
        url: &str,
        body: Option<&Req>,
    ) -> Result<Resp, ClientError> {
        let body = body.map(serde_json::to_vec).transpose().map_err(|source| {
            ClientError::Decode { method: method.clone(), url: url.into(), source }
        })?;
        let resp = self.send(method.clone(), url, body, &[]).await?;
        let bytes = tokio::time::timeout(self.timeout, resp.into_body().collect())
            .await
            .map_err(|_| ClientError::Timeout {
                method: method.clone(),
                url: url.into(),
                after: self.timeout,
            })?
            .map_err(|source| ClientError::Body {
                method: method.clone(),
                url: url.into(),
                source,
            })?
            .to_bytes();
        serde_json::from_slice(&bytes).map_err(|source| ClientError::Decode {
            method,
            url: url.into(),
            source,
        })
    }

    pub async fn get<Resp: DeserializeOwned>(&self, url: &str) -> Result<Resp, ClientError> {
        self.call::<(), Resp>(Method::GET, url, None).await
    }

    pub async fn post<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        url: &str,
        body: &Req,
    ) -> Result<Resp, ClientError> {
        self.call(Method::POST, url, Some(body)).await
    }

    pub async fn put<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        url: &str,
        body: &Req,
    ) -> Result<Resp, ClientError> {
        self.call(Method::PUT, url, Some(body)).await
    }
}
