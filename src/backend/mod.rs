//! Worker backends: the HTTP client, the request mapping ([`request`]) and the
//! classification of what came back ([`BackendError`]).
//!
//! The client is reqwest (on hyper-util's pooled client): one shared pool with keep-alive,
//! proxies off (loopback backends must never go through `HTTP_PROXY`), redirects off (a
//! worker that redirects is misconfigured, and following it would hide that).

pub mod health;
pub mod probe;
pub mod request;
pub mod upstreams;

use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use reqwest::{StatusCode, header::HeaderMap};

use crate::{
    config::{BackendConfig, BackendLimits},
    metrics::BackendMetrics,
};

/// How much of a failed response's body goes into `x-sidecar-last-error`, in bytes.
const ERROR_SNIPPET_BYTES: usize = 256;

/// One worker backend.
pub struct Backend {
    /// Label in metrics, logs and `x-sidecar-backend`.
    pub label: String,
    /// Where deliveries are POSTed.
    pub url: reqwest::Url,
    /// Per-request timeout (`timeout_ms`).
    pub timeout: Duration,
    /// Pre-resolved metric handles.
    pub metrics: BackendMetrics,
}

impl Backend {
    /// Builds a backend from its config.
    ///
    /// # Errors
    /// When the URL does not parse (config validation rejects that earlier).
    pub fn new(cfg: &BackendConfig) -> Result<Self, url::ParseError> {
        let label = cfg.label();
        Ok(Self {
            url: reqwest::Url::parse(&cfg.url)?,
            timeout: Duration::from_millis(cfg.timeout_ms),
            metrics: BackendMetrics::new(&label),
            label,
        })
    }
}

/// Why a backend request did not succeed. [`BackendError::is_retryable`] says whether
/// another attempt makes sense.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BackendError {
    /// The backend answered with a non-2xx status.
    #[error("HTTP {status}{}", snippet_suffix(.body))]
    Status {
        /// The status code.
        status: StatusCode,
        /// `Retry-After` on a 429 or 503, if it parsed.
        retry_after: Option<Duration>,
        /// The start of the response body, for the dead-letter header.
        body: String,
    },
    /// No complete response within the backend's `timeout_ms`.
    #[error("timed out after {} ms", .0.as_millis())]
    Timeout(Duration),
    /// The request never reached the worker: connection refused, connect timeout, DNS
    /// failure, TLS handshake failure, or a pooled connection that closed before the request
    /// was written. It says the worker is not there, nothing about the message: not an
    /// attempt, and the backend is marked unreachable (the rule of Dapr's app-health checks
    /// and Envoy's `connect-failure` retry policy).
    #[error("not delivered: {0}")]
    NotDelivered(String),
    /// The connection failed after the request was sent (reset, closed early, bad
    /// response): the worker may have processed it.
    #[error("transport error: {0}")]
    Transport(String),
    /// The sidecar could not make the request for a reason of its own: out of file
    /// descriptors (EMFILE, ENFILE) or local addresses (EADDRNOTAVAIL). It is neither the
    /// worker's fault nor the message's: not an attempt, not a backend failure.
    #[error("local resource error (not an attempt): {0}")]
    Local(String),
}

/// Parses a `Retry-After` value: delta-seconds or an HTTP-date (RFC 9110 §10.2.3).
/// A date in the past gives zero. Returns `None` for anything else.
#[must_use]
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// True when `e` or one of its sources is an I/O error that says this process ran out of
/// something: descriptors (EMFILE, ENFILE) or local addresses (EADDRNOTAVAIL).
#[must_use]
pub fn is_local_resource_error(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut current = Some(e);
    while let Some(err) = current {
        if let Some(io) = err.downcast_ref::<std::io::Error>()
            && (matches!(io.raw_os_error(), Some(libc::EMFILE | libc::ENFILE))
                || io.kind() == std::io::ErrorKind::AddrNotAvailable)
        {
            return true;
        }
        current = err.source();
    }
    false
}

fn snippet_suffix(body: &str) -> String {
    if body.is_empty() {
        String::new()
    } else {
        format!(": {body}")
    }
}

impl BackendError {
    /// Retryable: 408, 429, 5xx (and any other non-4xx status), timeouts, refused or reset
    /// connections. Not retryable: every other 4xx, which says the message itself is bad.
    #[must_use]
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Status { status, .. } => {
                !status.is_client_error()
                    || *status == StatusCode::REQUEST_TIMEOUT
                    || *status == StatusCode::TOO_MANY_REQUESTS
            }
            Self::Timeout(_) | Self::NotDelivered(_) | Self::Transport(_) | Self::Local(_) => true,
        }
    }

    /// True when the request never reached the worker ([`BackendError::NotDelivered`]): not
    /// an attempt; the delivery goes to another backend, or waits for one.
    #[must_use]
    pub fn is_not_delivered(&self) -> bool {
        matches!(self, Self::NotDelivered(_))
    }

    /// True when the request was never made for a reason of the sidecar's own
    /// ([`BackendError::Local`]): the delivery goes back to the waiting room, unattempted.
    #[must_use]
    pub fn is_local(&self) -> bool {
        matches!(self, Self::Local(_))
    }

    /// True when the worker shed the request as overloaded: a timeout, 429 or 503. The
    /// concurrency limiter reads it as a sign of too many requests in flight.
    #[must_use]
    pub fn is_overload(&self) -> bool {
        matches!(self, Self::Timeout(_)) || matches!(self.status_code(), 429 | 503)
    }

    /// The HTTP status, or 0 when there was no response.
    #[must_use]
    pub fn status_code(&self) -> u16 {
        match self {
            Self::Status { status, .. } => status.as_u16(),
            _ => 0,
        }
    }

    /// The `Retry-After` the backend asked for, if any.
    #[must_use]
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Status { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// The `outcome` label of `amqp_sidecar_backend_requests_total`.
    #[must_use]
    pub fn outcome_label(&self) -> &'static str {
        match self {
            Self::Timeout(_) => "timeout",
            Self::NotDelivered(_) => "connect_error",
            Self::Local(_) => "local_error",
            e if e.is_retryable() => "retryable",
            _ => "rejected",
        }
    }
}

/// The settings every client to the backends shares (the delivery client, health checks):
/// the backends' TLS, no proxy (loopback backends must never go through `HTTP_PROXY`), no
/// redirects (a worker that redirects is misconfigured).
///
/// # Errors
/// When a TLS file of `limits` cannot be used.
pub fn client_builder(limits: &BackendLimits) -> Result<reqwest::ClientBuilder, String> {
    crate::tls::install_provider();
    let tls = crate::tls::from_files(
        limits.ca_file.as_deref(),
        limits.client_cert_file.as_deref(),
        limits.client_key_file.as_deref(),
    )
    .map_err(|e| e.to_string())?;
    Ok(reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none()))
}

/// The shared HTTP client.
#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    max_response_bytes: usize,
}

impl Client {
    /// A pooled keep-alive client.
    ///
    /// # Errors
    /// When a TLS file of `limits` cannot be used (validation reports that first, with its
    /// key), or reqwest cannot build its client.
    pub fn new(limits: &BackendLimits, pool_per_host: usize) -> Result<Self, String> {
        let http = client_builder(limits)?
            .connect_timeout(Duration::from_millis(limits.connect_timeout_ms))
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(pool_per_host)
            .tcp_nodelay(true)
            .build()
            .map_err(|e| e.to_string())?;
        Ok(Self {
            http,
            max_response_bytes: limits.max_response_bytes,
        })
    }

    /// The underlying reqwest client (for probes: same TLS, proxy and redirect settings).
    #[must_use]
    pub fn http(&self) -> &reqwest::Client {
        &self.http
    }

    /// POSTs `body` with `headers` to `backend`, reads at most `backend.max_response_bytes`
    /// of the response, and records the request's metrics.
    ///
    /// # Errors
    /// A [`BackendError`] for any non-2xx status or transport failure.
    pub async fn post(
        &self,
        backend: &Backend,
        headers: HeaderMap,
        body: Bytes,
    ) -> Result<StatusCode, BackendError> {
        let started = Instant::now();
        let result = self.exchange(backend, headers, body).await;
        backend
            .metrics
            .duration
            .record(started.elapsed().as_secs_f64());
        let outcome = match &result {
            Ok(_) => "success",
            Err(e) => e.outcome_label(),
        };
        backend.metrics.requests(outcome).increment(1);
        result
    }

    async fn exchange(
        &self,
        backend: &Backend,
        headers: HeaderMap,
        body: Bytes,
    ) -> Result<StatusCode, BackendError> {
        let timeout = backend.timeout;
        let map_err = |e: reqwest::Error| classify(e.without_url(), timeout);
        let mut response = self
            .http
            .post(backend.url.clone())
            .headers(headers)
            .body(body)
            .timeout(timeout)
            .send()
            .await
            .map_err(map_err)?;
        let status = response.status();
        let retry_after = if status == StatusCode::TOO_MANY_REQUESTS
            || status == StatusCode::SERVICE_UNAVAILABLE
        {
            response
                .headers()
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| parse_retry_after(v, SystemTime::now()))
        } else {
            None
        };
        // Read (and discard) the body up to the limit so the connection can be reused; the
        // load of this request counts until its body ends, as in linkerd2-proxy.
        let mut snippet = Vec::new();
        let mut read = 0usize;
        while read <= self.max_response_bytes {
            match response.chunk().await {
                Ok(Some(chunk)) => {
                    // Only a failure's body is kept (for x-sidecar-last-error).
                    if !status.is_success() && snippet.len() < ERROR_SNIPPET_BYTES {
                        let take = (ERROR_SNIPPET_BYTES - snippet.len()).min(chunk.len());
                        snippet.extend_from_slice(&chunk[..take]);
                    }
                    read += chunk.len();
                }
                Ok(None) => break,
                // Once the status line and headers are in, the status is the answer: a body
                // cut short or stalled (the request timeout) does not change the outcome.
                Err(e) => {
                    tracing::debug!(backend = %backend.label, %status, error = %error_chain(&e.without_url()), "response body cut short");
                    if !status.is_success() {
                        snippet.extend_from_slice(b" (body cut short)");
                    }
                    break;
                }
            }
        }
        if status.is_success() {
            return Ok(status);
        }
        let body = String::from_utf8_lossy(&snippet)
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect::<String>()
            .trim()
            .to_owned();
        Err(BackendError::Status {
            status,
            retry_after,
            body,
        })
    }
}

/// Sorts a failed request into the kinds of [`BackendError`]. The URL must already be
/// removed (it can hold credentials).
///
/// Connecting comes first: a connect timeout, a DNS failure and a TLS handshake failure are
/// all connect errors in reqwest (the connector fails), so the request was never written.
/// hyper reports a request it never sent on a connection that closed as "canceled". A TLS
/// error later on (TLS 1.3 servers check a client certificate after the client's side of
/// the handshake is done, and answer the request with an alert) also means the worker
/// never saw the request: a TLS server hands nothing to the application before the session
/// is up. Everything else after the connection was made may have reached the worker.
fn classify(e: reqwest::Error, timeout: Duration) -> BackendError {
    if is_local_resource_error(&e) {
        BackendError::Local(error_chain(&e))
    } else if e.is_connect() || never_sent(&e) || tls_failure(&e) {
        BackendError::NotDelivered(error_chain(&e))
    } else if e.is_timeout() {
        BackendError::Timeout(timeout)
    } else {
        BackendError::Transport(error_chain(&e))
    }
}

/// True when hyper says the request was canceled before it was sent (its connection closed
/// first); hyper-util retries that once on a fresh connection when it can, so this is what
/// is left when the retry failed too. hyper also reports "canceled" when its connection
/// task is gone, which could in theory follow a written request; that is rare enough
/// (a hyper-internal failure) to accept.
fn never_sent(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut current = Some(e);
    while let Some(err) = current {
        if let Some(h) = err.downcast_ref::<hyper::Error>()
            && h.is_canceled()
        {
            return true;
        }
        current = err.source();
    }
    false
}

/// True when `e`'s chain holds a TLS error that rejects the session itself: a certificate
/// that is not trusted or not presented, an incompatible peer, or an alert that refuses the
/// handshake or the client's certificate (TLS 1.3 servers send those after the client's
/// side of the handshake is done). No TLS server hands the request to its application
/// before the session is up, so the worker never saw it. Other TLS errors (a bad record
/// later on) may come after the worker processed the request, and stay attempts.
/// tokio-rustls wraps the error in an `io::Error`, whose `source()` skips it, so
/// `get_ref()` is checked too.
fn tls_failure(e: &(dyn std::error::Error + 'static)) -> bool {
    use rustls::AlertDescription as A;
    let rejects_session = |e: &rustls::Error| match e {
        rustls::Error::InvalidCertificate(_)
        | rustls::Error::NoCertificatesPresented
        | rustls::Error::PeerIncompatible(_) => true,
        rustls::Error::AlertReceived(alert) => matches!(
            alert,
            A::CertificateRequired
                | A::BadCertificate
                | A::UnsupportedCertificate
                | A::CertificateRevoked
                | A::CertificateExpired
                | A::CertificateUnknown
                | A::UnknownCA
                | A::AccessDenied
                | A::HandshakeFailure
                | A::ProtocolVersion
                | A::InsufficientSecurity
        ),
        _ => false,
    };
    let mut current = Some(e);
    while let Some(err) = current {
        let tls = err.downcast_ref::<rustls::Error>().or_else(|| {
            err.downcast_ref::<std::io::Error>()
                .and_then(std::io::Error::get_ref)
                .and_then(|w| w.downcast_ref::<rustls::Error>())
        });
        if tls.is_some_and(rejects_session) {
            return true;
        }
        current = err.source();
    }
    false
}

/// An error and its sources on one line (reqwest's Display hides the cause).
pub(crate) fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(code: u16) -> BackendError {
        BackendError::Status {
            status: StatusCode::from_u16(code).expect("valid"),
            retry_after: None,
            body: String::new(),
        }
    }

    #[test]
    fn classification() {
        for code in [408, 429, 500, 502, 503, 504] {
            assert!(status(code).is_retryable(), "{code}");
            assert_eq!(status(code).outcome_label(), "retryable");
        }
        for code in [400, 401, 404, 409, 422] {
            assert!(!status(code).is_retryable(), "{code}");
            assert_eq!(status(code).outcome_label(), "rejected");
        }
        assert!(BackendError::Timeout(Duration::from_secs(1)).is_retryable());
        assert_eq!(
            BackendError::NotDelivered("refused".into()).outcome_label(),
            "connect_error"
        );
        assert!(BackendError::NotDelivered("refused".into()).is_not_delivered());
        assert_eq!(
            BackendError::Transport("reset".into()).outcome_label(),
            "retryable"
        );
        assert_eq!(BackendError::Timeout(Duration::ZERO).status_code(), 0);
        assert!(BackendError::Local("EMFILE".into()).is_local());
        assert_eq!(
            BackendError::Local("EMFILE".into()).outcome_label(),
            "local_error"
        );
    }

    #[test]
    fn local_resource_errors_are_found_in_the_source_chain() {
        #[derive(Debug, thiserror::Error)]
        #[error("client error")]
        struct Wrapper(#[source] std::io::Error);
        for code in [libc::EMFILE, libc::ENFILE, libc::EADDRNOTAVAIL] {
            let e = Wrapper(std::io::Error::from_raw_os_error(code));
            assert!(is_local_resource_error(&e), "errno {code}");
        }
        for code in [libc::ECONNREFUSED, libc::ECONNRESET, libc::ETIMEDOUT] {
            let e = Wrapper(std::io::Error::from_raw_os_error(code));
            assert!(!is_local_resource_error(&e), "errno {code}");
        }
    }

    /// Real sockets, not mocks: each kind of failure produced by a server that behaves so.
    mod with_real_sockets {
        use std::net::SocketAddr;

        use tokio::{
            io::{AsyncReadExt, AsyncWriteExt},
            net::{TcpListener, TcpStream},
        };

        use super::*;
        use crate::config::BackendConfig;

        async fn post(url: String, timeout_ms: u64) -> Result<StatusCode, BackendError> {
            let client = Client::new(&BackendLimits::default(), 1).expect("client");
            let backend = Backend::new(&BackendConfig {
                timeout_ms,
                ..BackendConfig::new(url)
            })
            .expect("backend");
            client
                .post(&backend, HeaderMap::new(), Bytes::from_static(b"hello"))
                .await
        }

        /// A server that reads one whole request (headers and the 5-byte body), then runs
        /// `then` on the connection.
        async fn server<F, Fut>(then: F) -> SocketAddr
        where
            F: FnOnce(TcpStream) -> Fut + Send + 'static,
            Fut: std::future::Future<Output = ()> + Send,
        {
            let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            let addr = listener.local_addr().expect("addr");
            tokio::spawn(async move {
                let (mut stream, _) = listener.accept().await.expect("accept");
                let mut seen = Vec::new();
                let mut buf = [0u8; 1024];
                while !seen.ends_with(b"hello") {
                    let n = stream.read(&mut buf).await.expect("read");
                    if n == 0 {
                        return;
                    }
                    seen.extend_from_slice(&buf[..n]);
                }
                then(stream).await;
            });
            addr
        }

        #[tokio::test]
        async fn refused_is_not_delivered() {
            let port = TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind")
                .local_addr()
                .expect("addr")
                .port();
            let e = post(format!("http://127.0.0.1:{port}/"), 2_000)
                .await
                .expect_err("refused");
            assert!(e.is_not_delivered(), "{e}");
            assert_eq!(e.outcome_label(), "connect_error");
        }

        #[tokio::test]
        async fn dns_failure_is_not_delivered() {
            let e = post("http://no-such-host.invalid/".into(), 2_000)
                .await
                .expect_err("no such host");
            assert!(e.is_not_delivered(), "{e}");
        }

        #[tokio::test]
        async fn a_failed_tls_handshake_is_not_delivered() {
            // A plain-HTTP server behind an https:// URL: the handshake fails.
            let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            let addr = listener.local_addr().expect("addr");
            tokio::spawn(async move {
                let (mut stream, _) = listener.accept().await.expect("accept");
                let _ = stream
                    .write_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n")
                    .await;
            });
            let e = post(format!("https://{addr}/"), 2_000)
                .await
                .expect_err("not TLS");
            assert!(e.is_not_delivered(), "{e}");
        }

        /// The failure a request to a [`server`] running `then` ends in.
        async fn failure<F, Fut>(then: F, timeout_ms: u64) -> BackendError
        where
            F: FnOnce(TcpStream) -> Fut + Send + 'static,
            Fut: std::future::Future<Output = ()> + Send,
        {
            let addr = server(then).await;
            post(format!("http://{addr}/"), timeout_ms)
                .await
                .expect_err("a failure")
        }

        #[tokio::test]
        async fn a_reset_after_the_request_was_written_may_have_been_processed() {
            // RST instead of FIN.
            let reset = |stream: TcpStream| async move {
                let _ = stream.set_zero_linger();
                drop(stream);
            };
            let e = failure(reset, 2_000).await;
            assert!(matches!(e, BackendError::Transport(_)), "{e:?}");
            assert!(e.is_retryable() && !e.is_not_delivered());
        }

        #[tokio::test]
        async fn a_timeout_after_the_request_was_written_is_an_attempt() {
            let stall = |stream: TcpStream| async move {
                tokio::time::sleep(std::time::Duration::from_secs(5)).await;
                drop(stream);
            };
            let e = failure(stall, 300).await;
            assert!(matches!(e, BackendError::Timeout(_)), "{e:?}");
            assert!(!e.is_not_delivered());
        }

        #[tokio::test]
        async fn a_503_is_an_attempt() {
            let answer = |mut stream: TcpStream| async move {
                let _ = stream
                    .write_all(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n")
                    .await;
            };
            let e = failure(answer, 2_000).await;
            assert_eq!(e.status_code(), 503);
            assert!(e.is_retryable() && !e.is_not_delivered());
        }
    }
}
