//! Host side of the `endpoint` interface: operator-named endpoints a plugin was granted.
//!
//! The plugin only ever names an endpoint; the address, the timeout and the response limit
//! come from the operator's manifest. Calls block the calling thread (plugins run on
//! blocking threads); HTTP goes through hyper on a private current-thread runtime in a
//! scoped thread, so a call works whether or not the caller is inside a tokio runtime.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};

use crate::bindings::endpoint::{self, Error, ErrorKind, HttpRequest, HttpResponse};
use crate::sandbox::HostState;

/// Where an endpoint is, and how it is spoken to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EndpointAddress {
    /// HTTP/1.1 over TCP to `host:port`.
    Http(String),
    /// A raw TCP stream to `host:port`.
    Tcp(String),
    /// A Unix stream socket.
    Unix(PathBuf),
}

/// One granted endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub address: EndpointAddress,
    pub timeout: Duration,
    pub max_response_bytes: u64,
}

/// The endpoints one plugin was granted, by name.
#[derive(Debug, Clone, Default)]
pub struct Endpoints {
    pub(crate) by_name: BTreeMap<String, Endpoint>,
}

impl Endpoints {
    pub fn new(by_name: BTreeMap<String, Endpoint>) -> Self {
        Self { by_name }
    }

    fn get(&self, name: &str) -> Result<&Endpoint, Error> {
        self.by_name.get(name).ok_or_else(|| Error {
            kind: ErrorKind::NotGranted,
            message: format!("endpoint `{name}` is not granted to this plugin"),
        })
    }
}

fn fail(kind: ErrorKind, name: &str, cause: impl std::fmt::Display) -> Error {
    Error { kind, message: format!("endpoint `{name}`: {cause}") }
}

fn io_fail(name: &str, e: std::io::Error) -> Error {
    let kind = match e.kind() {
        std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock => ErrorKind::Timeout,
        _ => ErrorKind::Unreachable,
    };
    fail(kind, name, e)
}

/// Send `request` on a stream, half-close, read until the peer closes (bounded).
fn converse<S: Read + Write>(
    name: &str,
    mut stream: S,
    request: &[u8],
    limit: u64,
    shutdown: impl FnOnce(&S) -> std::io::Result<()>,
) -> Result<Vec<u8>, Error> {
    stream.write_all(request).map_err(|e| io_fail(name, e))?;
    stream.flush().map_err(|e| io_fail(name, e))?;
    shutdown(&stream).map_err(|e| io_fail(name, e))?;
    let mut answer = Vec::new();
    (&mut stream).take(limit + 1).read_to_end(&mut answer).map_err(|e| io_fail(name, e))?;
    if answer.len() as u64 > limit {
        return Err(fail(ErrorKind::TooLarge, name, format!("answer exceeds {limit} bytes")));
    }
    Ok(answer)
}

fn exchange(name: &str, endpoint: &Endpoint, request: &[u8]) -> Result<Vec<u8>, Error> {
    let timeout = Some(endpoint.timeout);
    match &endpoint.address {
        EndpointAddress::Tcp(address) => {
            let addr = address.to_socket_addrs().map_err(|e| io_fail(name, e))?.next().ok_or_else(
                || fail(ErrorKind::Unreachable, name, format!("`{address}` resolves to nothing")),
            )?;
            let stream = TcpStream::connect_timeout(&addr, endpoint.timeout)
                .map_err(|e| io_fail(name, e))?;
            stream
                .set_read_timeout(timeout)
                .and_then(|_| stream.set_write_timeout(timeout))
                .map_err(|e| io_fail(name, e))?;
            converse(name, stream, request, endpoint.max_response_bytes, |s| {
                s.shutdown(Shutdown::Write)
            })
        }
        EndpointAddress::Unix(path) => {
            let stream = UnixStream::connect(path).map_err(|e| io_fail(name, e))?;
            stream
                .set_read_timeout(timeout)
                .and_then(|_| stream.set_write_timeout(timeout))
                .map_err(|e| io_fail(name, e))?;
            converse(name, stream, request, endpoint.max_response_bytes, |s| {
                s.shutdown(Shutdown::Write)
            })
        }
        EndpointAddress::Http(_) => {
            Err(fail(ErrorKind::WrongKind, name, "is an HTTP endpoint; use `http`"))
        }
    }
}

fn http(name: &str, endpoint: &Endpoint, request: HttpRequest) -> Result<HttpResponse, Error> {
    let EndpointAddress::Http(address) = &endpoint.address else {
        return Err(fail(ErrorKind::WrongKind, name, "is a stream endpoint; use `exchange`"));
    };
    let mut builder =
        hyper::Request::builder().method(request.method.as_str()).uri(request.path.as_str());
    // `Host` is the endpoint's address unless the plugin names the virtual host itself (a
    // cache purges by site): exactly one `Host` either way — servers refuse two. Only the
    // header changes; the connection still goes to the operator's address.
    if !request.headers.iter().any(|(header, _)| header.eq_ignore_ascii_case("host")) {
        builder = builder.header(hyper::header::HOST, address.as_str());
    }
    for (header, value) in &request.headers {
        builder = builder.header(header.as_str(), value.as_str());
    }
    let request = builder
        .body(Full::new(bytes::Bytes::from(request.body)))
        .map_err(|e| fail(ErrorKind::Protocol, name, format!("bad request: {e}")))?;
    let limit = endpoint.max_response_bytes;
    let exchange = async move {
        let stream =
            tokio::net::TcpStream::connect(address.as_str()).await.map_err(|e| io_fail(name, e))?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .map_err(|e| fail(ErrorKind::Protocol, name, e))?;
        tokio::spawn(connection);
        let response =
            sender.send_request(request).await.map_err(|e| fail(ErrorKind::Protocol, name, e))?;
        let status = response.status().as_u16();
        let headers = response
            .headers()
            .iter()
            .map(|(k, v)| {
                (k.as_str().to_string(), String::from_utf8_lossy(v.as_bytes()).into_owned())
            })
            .collect();
        let body = Limited::new(response.into_body(), limit as usize)
            .collect()
            .await
            .map_err(|e| {
                if e.is::<http_body_util::LengthLimitError>() {
                    fail(ErrorKind::TooLarge, name, format!("answer exceeds {limit} bytes"))
                } else {
                    fail(ErrorKind::Protocol, name, e)
                }
            })?
            .to_bytes()
            .to_vec();
        Ok(HttpResponse { status, headers, body })
    };
    let timeout = endpoint.timeout;
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| fail(ErrorKind::Unreachable, name, e))?;
                runtime.block_on(async {
                    tokio::time::timeout(timeout, exchange).await.unwrap_or_else(|_| {
                        Err(fail(ErrorKind::Timeout, name, format!("no answer within {timeout:?}")))
                    })
                })
            })
            .join()
            .unwrap_or_else(|_| Err(fail(ErrorKind::Protocol, name, "HTTP client panicked")))
    })
}

impl endpoint::Host for HostState {
    fn granted(&mut self) -> wasmtime::Result<Vec<String>> {
        Ok(self.endpoints.by_name.keys().cloned().collect())
    }

    fn http(
        &mut self,
        name: String,
        request: HttpRequest,
    ) -> wasmtime::Result<Result<HttpResponse, Error>> {
        let result = self.endpoints.get(&name).and_then(|endpoint| http(&name, endpoint, request));
        if let Err(e) = &result {
            tracing::debug!(plugin = &*self.plugin, "{}", e.message);
        }
        Ok(result)
    }

    fn exchange(
        &mut self,
        name: String,
        request: Vec<u8>,
    ) -> wasmtime::Result<Result<Vec<u8>, Error>> {
        let result =
            self.endpoints.get(&name).and_then(|endpoint| exchange(&name, endpoint, &request));
        if let Err(e) = &result {
            tracing::debug!(plugin = &*self.plugin, "{}", e.message);
        }
        Ok(result)
    }
}
