//! An HTTP proxy between the agent and `moto_server` that injects faults
//! into chosen S3 requests and records every request it sees.
//!
//! Rules pick requests by S3 operation, key and occurrence ("the 2nd
//! UploadPart", "every GetObject of system/db/latest") and say what goes
//! wrong: an S3 error response, a reset connection, a stall, a truncated
//! or slowed body, a shifted `Date` header, or a pause while the test
//! changes the bucket behind the agent's back.
//!
//! In [`ProxyMode::R2`] the proxy also rejects what Cloudflare R2 rejects
//! and moto accepts: request checksum headers, and multipart uploads whose
//! parts are not all the same size but the last.
//!
//! Bodies stream through in both directions; the proxy holds at most one
//! chunk of a body, except a CompleteMultipartUpload request in R2 mode,
//! which it reads whole (up to [`MAX_COMPLETE_BODY`]) to check the parts.
//! The proxy listens on 127.0.0.1 only, runs on a runtime of its own, and
//! stops, closing every connection, when the value is dropped.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::fmt;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use futures::StreamExt;
use http::header::{HeaderName, HeaderValue, CONTENT_LENGTH, CONTENT_TYPE, DATE, EXPECT, RANGE};
use http::{Method, Request, Response, StatusCode, Uri};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use hyper::body::{Body, Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use nix::sys::socket::{setsockopt, sockopt};
use tokio::net::TcpListener;
use tokio::runtime::Runtime;
use tokio::sync::Notify;

/// The largest CompleteMultipartUpload body the R2 mode reads; 10,000
/// parts take about 1 MiB of XML.
pub const MAX_COMPLETE_BODY: usize = 2 << 20;

/// How long a [`Hold`] keeps a request when the test never releases it.
const HOLD_LIMIT: Duration = Duration::from_secs(60);

/// The largest chunk a slowed body sends at once.
const TRICKLE_CHUNK: usize = 16 << 10;

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type ProxyBody = BoxBody<Bytes, ConnectionCut>;

/// Which S3 requests the proxy lets through unchanged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProxyMode {
    /// Forward everything that no rule changes, as moto would answer it.
    Plain,
    /// Reject what Cloudflare R2 rejects, before any rule applies.
    R2,
}

/// Returns the S3 flavour the suite runs against, from `MATRIX_TEST_S3`:
/// `r2` puts an R2-mode proxy in front of moto, and `moto` or unset lets
/// the agent talk to moto directly.
pub fn s3_flavour() -> ProxyMode {
    match std::env::var("MATRIX_TEST_S3").as_deref() {
        Err(_) | Ok("") | Ok("moto") => ProxyMode::Plain,
        Ok("r2") => ProxyMode::R2,
        Ok(other) => panic!("MATRIX_TEST_S3 is {other:?}; expected `moto` or `r2`"),
    }
}

/// S3 operations, told apart by method, query parameters and headers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Operation {
    CreateBucket,
    HeadBucket,
    CreateMultipartUpload,
    UploadPart,
    UploadPartCopy,
    CompleteMultipartUpload,
    AbortMultipartUpload,
    ListParts,
    ListMultipartUploads,
    PutObject,
    CopyObject,
    GetObject,
    HeadObject,
    DeleteObject,
    DeleteObjects,
    ListObjectsV2,
    ListObjects,
    Other,
}

impl Operation {
    fn classify(method: &Method, key: &str, query: &Query, copy_source: bool) -> Operation {
        let has_key = !key.is_empty();
        let upload = query.has("uploadId");
        let part = query.has("partNumber");
        match *method {
            Method::PUT if upload && part && copy_source => Operation::UploadPartCopy,
            Method::PUT if upload && part => Operation::UploadPart,
            Method::PUT if has_key && copy_source => Operation::CopyObject,
            Method::PUT if has_key => Operation::PutObject,
            Method::PUT => Operation::CreateBucket,
            Method::POST if query.has("uploads") => Operation::CreateMultipartUpload,
            Method::POST if upload => Operation::CompleteMultipartUpload,
            Method::POST if query.has("delete") => Operation::DeleteObjects,
            Method::DELETE if upload => Operation::AbortMultipartUpload,
            Method::DELETE if has_key => Operation::DeleteObject,
            Method::GET if has_key && upload => Operation::ListParts,
            Method::GET if has_key => Operation::GetObject,
            Method::GET if query.has("uploads") => Operation::ListMultipartUploads,
            Method::GET if query.get("list-type") == Some("2") => Operation::ListObjectsV2,
            Method::GET => Operation::ListObjects,
            Method::HEAD if has_key => Operation::HeadObject,
            Method::HEAD => Operation::HeadBucket,
            _ => Operation::Other,
        }
    }
}

/// What happens to a request a rule picked.
#[derive(Clone)]
pub enum Fault {
    /// Answer with this status and an S3 XML error body, without
    /// forwarding the request.
    Error { status: u16, code: &'static str },
    /// Read the request, then reset the connection (RST) without a
    /// response and without forwarding.
    Reset,
    /// Forward the request, then reset the connection instead of sending
    /// the response: the bucket did the work and the client never learns.
    ResetAfterForward,
    /// Forward, send the response head and the first `after` body bytes,
    /// then reset the connection.
    ResetBody { after: u64 },
    /// Forward, send the response head with its full Content-Length and
    /// the first `after` body bytes, then close the connection cleanly.
    TruncateBody { after: u64 },
    /// Forward, then hold the response back for this long.
    Stall(Duration),
    /// Forward, send the head and the first `after` body bytes, then send
    /// nothing for `pause` before the rest.
    StallBody { after: u64, pause: Duration },
    /// Forward, sending the response body at about this many bytes a
    /// second.
    TrickleBody { bytes_per_second: u64 },
    /// Forward the request body to the bucket at about this many bytes a
    /// second.
    TrickleUpload { bytes_per_second: u64 },
    /// Forward, moving the response's `Date` header by this many seconds
    /// (positive: the bucket's clock is ahead).
    ShiftDate { seconds: i64 },
    /// Keep the request until the test releases the hold, then forward it.
    Hold(Hold),
}

impl Fault {
    /// An S3 error response with the code S3 or R2 sends for `status`.
    pub fn error(status: u16) -> Fault {
        let code = match status {
            400 => "InvalidRequest",
            403 => "AccessDenied",
            404 => "NoSuchKey",
            412 => "PreconditionFailed",
            429 => "TooManyRequests",
            500 => "InternalError",
            501 => "NotImplemented",
            503 => "SlowDown",
            _ => "InternalError",
        };
        Fault::Error { status, code }
    }
}

impl fmt::Debug for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Fault::Error { status, code } => write!(f, "Error({status} {code})"),
            Fault::Reset => write!(f, "Reset"),
            Fault::ResetAfterForward => write!(f, "ResetAfterForward"),
            Fault::ResetBody { after } => write!(f, "ResetBody(after {after} bytes)"),
            Fault::TruncateBody { after } => write!(f, "TruncateBody(after {after} bytes)"),
            Fault::Stall(duration) => write!(f, "Stall({duration:?})"),
            Fault::StallBody { after, pause } => {
                write!(f, "StallBody(after {after} bytes for {pause:?})")
            }
            Fault::TrickleBody { bytes_per_second } => {
                write!(f, "TrickleBody({bytes_per_second} B/s)")
            }
            Fault::TrickleUpload { bytes_per_second } => {
                write!(f, "TrickleUpload({bytes_per_second} B/s)")
            }
            Fault::ShiftDate { seconds } => write!(f, "ShiftDate({seconds:+}s)"),
            Fault::Hold(_) => write!(f, "Hold"),
        }
    }
}

/// Which of the requests a rule matches it applies to, counting from 1.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Occurrence {
    /// Only the n-th.
    Nth(usize),
    /// The first n.
    First(usize),
    /// The n-th and every one after it.
    From(usize),
    Every,
}

impl Occurrence {
    fn includes(self, count: usize) -> bool {
        match self {
            Occurrence::Nth(n) => count == n,
            Occurrence::First(n) => count <= n,
            Occurrence::From(n) => count >= n,
            Occurrence::Every => true,
        }
    }
}

/// Selects requests: an operation, optionally a key and a Range header,
/// and which occurrences.
#[derive(Clone, Debug)]
pub struct Rule {
    operation: Option<Operation>,
    key_part: Option<String>,
    ranged: Option<bool>,
    occurrence: Occurrence,
}

impl Rule {
    /// Matches every request of `operation`.
    pub fn on(operation: Operation) -> Rule {
        Rule {
            operation: Some(operation),
            key_part: None,
            ranged: None,
            occurrence: Occurrence::Every,
        }
    }

    /// Matches every request, whatever its operation.
    pub fn any() -> Rule {
        Rule {
            operation: None,
            key_part: None,
            ranged: None,
            occurrence: Occurrence::Every,
        }
    }

    /// Narrows the rule to keys that contain `part`, such as a relative key
    /// (`system/db/latest`) or a folder (`system/db/staging/`).
    pub fn key_contains(mut self, part: &str) -> Rule {
        self.key_part = Some(part.to_owned());
        self
    }

    /// Narrows the rule to requests with (`true`) or without a Range header.
    pub fn ranged(mut self, ranged: bool) -> Rule {
        self.ranged = Some(ranged);
        self
    }

    pub fn nth(mut self, n: usize) -> Rule {
        self.occurrence = Occurrence::Nth(n);
        self
    }

    pub fn first(mut self, n: usize) -> Rule {
        self.occurrence = Occurrence::First(n);
        self
    }

    pub fn from(mut self, n: usize) -> Rule {
        self.occurrence = Occurrence::From(n);
        self
    }

    fn matches(&self, request: &RequestFacts) -> bool {
        self.operation.is_none_or(|op| op == request.operation)
            && self
                .key_part
                .as_ref()
                .is_none_or(|part| request.key.contains(part.as_str()))
            && self.ranged.is_none_or(|ranged| ranged == request.ranged)
    }
}

/// A rule added to a proxy, for asking how often it fired.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RuleId(usize);

struct ActiveRule {
    rule: Rule,
    fault: Fault,
    matched: usize,
    fired: usize,
}

/// A point where the proxy keeps a request until the test releases it.
///
/// The test waits with [`Hold::wait_until_held`], changes the bucket, and
/// calls [`Hold::release`]. A request held for [`HOLD_LIMIT`] goes on by
/// itself, so a test that fails half-way never wedges the agent.
#[derive(Clone, Default)]
pub struct Hold {
    state: Arc<HoldState>,
}

#[derive(Default)]
struct HoldState {
    held: Mutex<usize>,
    held_changed: Condvar,
    release: Notify,
}

impl Hold {
    pub fn new() -> Hold {
        Hold::default()
    }

    /// Waits until a request is held; returns false after `limit`.
    pub fn wait_until_held(&self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        let mut held = self.state.held.lock().expect("hold lock");
        while *held == 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            held = self
                .state
                .held_changed
                .wait_timeout(held, left)
                .expect("hold lock")
                .0;
        }
        true
    }

    /// Lets the held request go on to the bucket.
    pub fn release(&self) {
        self.state.release.notify_one();
    }

    async fn keep(&self) {
        {
            let mut held = self.state.held.lock().expect("hold lock");
            *held += 1;
            self.state.held_changed.notify_all();
        }
        let _ = tokio::time::timeout(HOLD_LIMIT, self.state.release.notified()).await;
    }
}

/// One request as the proxy saw it, and what it did with it.
#[derive(Clone, Debug)]
pub struct Exchange {
    pub operation: Operation,
    pub method: String,
    /// The object key, percent-decoded, with the customer prefix; empty
    /// for requests on the bucket itself.
    pub key: String,
    /// The query string as sent.
    pub query: String,
    /// Request headers, with the credentials in `authorization` and
    /// `x-amz-security-token` replaced by `[redacted]`.
    pub headers: Vec<(String, String)>,
    /// Body bytes the proxy read from the agent.
    pub request_bytes: u64,
    /// Status sent back; `None` when the connection was reset instead.
    pub status: Option<u16>,
    /// The fault applied, if any.
    pub fault: Option<String>,
}

impl Exchange {
    /// Returns a header's value; names compare case-insensitively.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.as_str())
    }

    /// Returns a query parameter's value as sent.
    pub fn query_parameter(&self, name: &str) -> Option<&str> {
        self.query.split('&').find_map(|pair| {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            (key == name).then_some(value)
        })
    }
}

/// Sizes of the parts of one multipart upload, by part number, as R2
/// would check them at completion.
type PartSizes = BTreeMap<u32, u64>;

struct Shared {
    upstream: String,
    mode: ProxyMode,
    client: Client<HttpConnector, ProxyBody>,
    rules: Mutex<Vec<ActiveRule>>,
    exchanges: Mutex<Vec<Exchange>>,
    uploads: Mutex<HashMap<String, PartSizes>>,
}

/// A running proxy on 127.0.0.1 in front of one S3 endpoint.
pub struct FaultProxy {
    port: u16,
    shared: Arc<Shared>,
    runtime: Option<Runtime>,
}

impl FaultProxy {
    /// Starts a proxy in front of `upstream`, an `http://127.0.0.1:PORT`
    /// endpoint.
    pub fn start(upstream: &str, mode: ProxyMode) -> FaultProxy {
        assert!(
            upstream.starts_with("http://127.0.0.1:"),
            "the fault proxy only forwards to loopback, not to {upstream}"
        );
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("fault-proxy")
            .enable_all()
            .build()
            .expect("building the proxy's runtime");
        let listener = runtime
            .block_on(TcpListener::bind((Ipv4Addr::LOCALHOST, 0)))
            .expect("binding the proxy to 127.0.0.1");
        let port = listener
            .local_addr()
            .expect("reading the bound port")
            .port();

        let client = {
            let _entered = runtime.enter();
            Client::builder(TokioExecutor::new())
                .pool_idle_timeout(Duration::from_secs(30))
                .build_http()
        };
        let shared = Arc::new(Shared {
            upstream: upstream.trim_end_matches('/').to_owned(),
            mode,
            client,
            rules: Mutex::new(Vec::new()),
            exchanges: Mutex::new(Vec::new()),
            uploads: Mutex::new(HashMap::new()),
        });
        runtime.spawn(accept_connections(listener, Arc::clone(&shared)));

        FaultProxy {
            port,
            shared,
            runtime: Some(runtime),
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn mode(&self) -> ProxyMode {
        self.shared.mode
    }

    /// Returns the endpoint URL to give the agent.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Adds a rule. When several rules pick one request, the one added
    /// first applies; every matching rule counts the request.
    pub fn inject(&self, rule: Rule, fault: Fault) -> RuleId {
        let mut rules = self.shared.rules.lock().expect("rules lock");
        rules.push(ActiveRule {
            rule,
            fault,
            matched: 0,
            fired: 0,
        });
        RuleId(rules.len() - 1)
    }

    /// Returns how many requests the rule changed so far.
    pub fn fired(&self, id: RuleId) -> usize {
        self.shared.rules.lock().expect("rules lock")[id.0].fired
    }

    /// Stops every fault; later requests pass unchanged (R2 checks stay).
    pub fn clear_faults(&self) {
        for active in self.shared.rules.lock().expect("rules lock").iter_mut() {
            active.occurrence_exhausted();
        }
    }

    /// Returns every request seen so far, oldest first.
    pub fn exchanges(&self) -> Vec<Exchange> {
        self.shared
            .exchanges
            .lock()
            .expect("exchanges lock")
            .clone()
    }

    /// Returns the requests of one operation seen so far, oldest first.
    pub fn exchanges_of(&self, operation: Operation) -> Vec<Exchange> {
        self.exchanges()
            .into_iter()
            .filter(|exchange| exchange.operation == operation)
            .collect()
    }
}

impl ActiveRule {
    fn occurrence_exhausted(&mut self) {
        // A rule whose n-th occurrence has passed never fires again, which
        // keeps rule ids valid for `fired`.
        self.rule.occurrence = Occurrence::Nth(0);
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            // Ends the accept loop and every connection task, closing
            // their sockets.
            runtime.shutdown_timeout(Duration::from_secs(2));
        }
    }
}

async fn accept_connections(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                eprintln!("fault proxy: accept failed: {error}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let connection = stream.as_raw_fd();
        let shared = Arc::clone(&shared);
        tokio::spawn(async move {
            let service = service_fn(move |request| {
                let shared = Arc::clone(&shared);
                async move { handle(request, shared, connection).await }
            });
            // A reset or cut connection ends here with an error, on purpose.
            let _ = hyper::server::conn::http1::Builder::new()
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// The parsed query string: names and values, undecoded.
struct Query(Vec<(String, String)>);

impl Query {
    fn parse(query: &str) -> Query {
        Query(
            query
                .split('&')
                .filter(|pair| !pair.is_empty())
                .map(|pair| {
                    let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
                    (name.to_owned(), value.to_owned())
                })
                .collect(),
        )
    }

    fn has(&self, name: &str) -> bool {
        self.0.iter().any(|(key, _)| key == name)
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    }
}

/// What a rule can match on.
struct RequestFacts {
    operation: Operation,
    key: String,
    ranged: bool,
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        let escaped = match bytes.get(index..index + 3) {
            Some([b'%', high, low]) => std::str::from_utf8(&[*high, *low])
                .ok()
                .and_then(|hex| u8::from_str_radix(hex, 16).ok()),
            _ => None,
        };
        match escaped {
            Some(byte) => {
                decoded.push(byte);
                index += 3;
            }
            None => {
                decoded.push(bytes[index]);
                index += 1;
            }
        }
    }
    String::from_utf8_lossy(&decoded).into_owned()
}

/// Splits a path-style path, `/bucket/key`, into the decoded key.
fn object_key(path: &str) -> String {
    let path = path.trim_start_matches('/');
    match path.split_once('/') {
        Some((_bucket, key)) => percent_decode(key),
        None => String::new(),
    }
}

fn redacted_headers(request: &Request<Incoming>) -> Vec<(String, String)> {
    request
        .headers()
        .iter()
        .map(|(name, value)| {
            let value = match name.as_str() {
                "authorization" | "x-amz-security-token" => "[redacted]".to_owned(),
                _ => String::from_utf8_lossy(value.as_bytes()).into_owned(),
            };
            (name.as_str().to_owned(), value)
        })
        .collect()
}

fn is_checksum_header(name: &HeaderName) -> bool {
    let name = name.as_str();
    name.starts_with("x-amz-checksum-")
        || name == "x-amz-sdk-checksum-algorithm"
        || name == "x-amz-trailer"
}

fn error_response(status: u16, code: &str, message: &str, resource: &str) -> Response<ProxyBody> {
    let body = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>{code}</Code>\
         <Message>{message}</Message><Resource>{resource}</Resource>\
         <RequestId>fault-proxy</RequestId></Error>"
    );
    let mut response = Response::new(full_body(Bytes::from(body)));
    *response.status_mut() = StatusCode::from_u16(status).expect("a valid status code");
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/xml"));
    response
}

fn full_body(bytes: Bytes) -> ProxyBody {
    Full::new(bytes)
        .map_err(|never: Infallible| match never {})
        .boxed()
}

fn empty_body() -> ProxyBody {
    Empty::new()
        .map_err(|never: Infallible| match never {})
        .boxed()
}

/// Makes the next close of the connection send RST instead of FIN.
fn arm_reset(connection: RawFd) {
    // SAFETY: the connection task that calls this owns the socket and keeps
    // it open until this request's handling returns.
    let socket = unsafe { BorrowedFd::borrow_raw(connection) };
    let linger = nix::libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    let _ = setsockopt(&socket, sockopt::Linger, &linger);
}

/// An error that ends the connection; hyper closes the socket on it.
#[derive(Debug)]
pub struct ConnectionCut(String);

impl ConnectionCut {
    fn new(why: impl Into<String>) -> ConnectionCut {
        ConnectionCut(why.into())
    }
}

impl fmt::Display for ConnectionCut {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "connection cut by the fault proxy: {}", self.0)
    }
}

impl std::error::Error for ConnectionCut {}

async fn handle(
    request: Request<Incoming>,
    shared: Arc<Shared>,
    connection: RawFd,
) -> Result<Response<ProxyBody>, ConnectionCut> {
    let path = request.uri().path().to_owned();
    let query_text = request.uri().query().unwrap_or_default().to_owned();
    let query = Query::parse(&query_text);
    let key = object_key(&path);
    let facts = RequestFacts {
        operation: Operation::classify(
            request.method(),
            &key,
            &query,
            request.headers().contains_key("x-amz-copy-source"),
        ),
        key,
        ranged: request.headers().contains_key(RANGE),
    };
    let index = {
        let mut exchanges = shared.exchanges.lock().expect("exchanges lock");
        exchanges.push(Exchange {
            operation: facts.operation,
            method: request.method().to_string(),
            key: facts.key.clone(),
            query: query_text.clone(),
            headers: redacted_headers(&request),
            request_bytes: 0,
            status: None,
            fault: None,
        });
        exchanges.len() - 1
    };
    let received = Arc::new(AtomicU64::new(0));
    let record = |status: Option<u16>, fault: Option<String>| {
        let mut exchanges = shared.exchanges.lock().expect("exchanges lock");
        let exchange = &mut exchanges[index];
        exchange.request_bytes = received.load(Ordering::SeqCst);
        exchange.status = status;
        if fault.is_some() {
            exchange.fault = fault;
        }
    };

    if shared.mode == ProxyMode::R2 {
        if let Some(name) = request
            .headers()
            .keys()
            .find(|name| is_checksum_header(name))
        {
            let message = format!("Header '{name}' with value is not implemented");
            drain(request.into_body(), &received).await;
            record(Some(501), Some("R2 rejects checksum headers".to_owned()));
            return Ok(error_response(501, "NotImplemented", &message, &path));
        }
    }

    let fault = pick_fault(&shared, &facts);
    let fault_name = fault.as_ref().map(|fault| format!("{fault:?}"));
    match &fault {
        Some(Fault::Error { status, code }) => {
            drain(request.into_body(), &received).await;
            record(Some(*status), fault_name);
            return Ok(error_response(
                *status,
                code,
                "Injected by the fault proxy",
                &path,
            ));
        }
        Some(Fault::Reset) => {
            drain(request.into_body(), &received).await;
            record(None, fault_name);
            arm_reset(connection);
            return Err(ConnectionCut::new("reset before the response"));
        }
        Some(Fault::Hold(hold)) => hold.keep().await,
        _ => {}
    }

    let upload_rate = match &fault {
        Some(Fault::TrickleUpload { bytes_per_second }) => Some(*bytes_per_second),
        _ => None,
    };
    let forwarded = forward(&shared, request, &facts, &query, &received, upload_rate).await;
    let response = match forwarded {
        Ok(response) => response,
        Err(Rejection::R2(response)) => {
            record(
                Some(response.status().as_u16()),
                Some("R2 rejects the parts".to_owned()),
            );
            return Ok(response);
        }
        Err(Rejection::Upstream(error)) => {
            eprintln!("fault proxy: forwarding {path} failed: {error}");
            record(Some(502), fault_name);
            return Ok(error_response(
                502,
                "BadGateway",
                "The fault proxy could not reach the bucket",
                &path,
            ));
        }
    };

    let status = response.status().as_u16();
    let (mut parts, body) = response.into_parts();
    let body = match fault {
        Some(Fault::ResetAfterForward) => {
            drop(body);
            record(None, fault_name);
            arm_reset(connection);
            return Err(ConnectionCut::new("reset instead of the response"));
        }
        Some(Fault::Stall(duration)) => {
            tokio::time::sleep(duration).await;
            pass_through(body)
        }
        Some(Fault::ResetBody { after }) => shaped_body(
            body,
            BodyShape::Cut {
                after,
                reset: Some(connection),
            },
        ),
        Some(Fault::TruncateBody { after }) => {
            shaped_body(body, BodyShape::Cut { after, reset: None })
        }
        Some(Fault::StallBody { after, pause }) => {
            shaped_body(body, BodyShape::Pause { after, pause })
        }
        Some(Fault::TrickleBody { bytes_per_second }) => {
            shaped_body(body, BodyShape::Trickle { bytes_per_second })
        }
        Some(Fault::ShiftDate { seconds }) => {
            let upstream_date = parts
                .headers
                .get(DATE)
                .and_then(|date| date.to_str().ok())
                .and_then(|date| httpdate::parse_http_date(date).ok())
                .unwrap_or_else(SystemTime::now);
            let magnitude = Duration::from_secs(seconds.unsigned_abs());
            let shifted = if seconds >= 0 {
                upstream_date + magnitude
            } else {
                upstream_date - magnitude
            };
            let value = HeaderValue::from_str(&httpdate::fmt_http_date(shifted))
                .expect("an HTTP date is a valid header value");
            parts.headers.insert(DATE, value);
            pass_through(body)
        }
        _ => pass_through(body),
    };
    record(Some(status), fault_name);
    Ok(Response::from_parts(parts, body))
}

/// Picks the fault of the first rule that fires for this request, after
/// counting the request for every rule that matches it.
fn pick_fault(shared: &Shared, facts: &RequestFacts) -> Option<Fault> {
    let mut rules = shared.rules.lock().expect("rules lock");
    let mut chosen = None;
    for active in rules.iter_mut() {
        if !active.rule.matches(facts) {
            continue;
        }
        active.matched += 1;
        if chosen.is_none() && active.rule.occurrence.includes(active.matched) {
            active.fired += 1;
            chosen = Some(active.fault.clone());
        }
    }
    chosen
}

/// Reads a request body to its end, counting and discarding it.
async fn drain(mut body: Incoming, received: &AtomicU64) {
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => {
                if let Some(data) = frame.data_ref() {
                    received.fetch_add(data.len() as u64, Ordering::SeqCst);
                }
            }
            Err(_) => return,
        }
    }
}

enum Rejection {
    /// The response R2 would send instead of forwarding.
    R2(Response<ProxyBody>),
    /// The bucket could not be reached.
    Upstream(BoxError),
}

async fn forward(
    shared: &Shared,
    request: Request<Incoming>,
    facts: &RequestFacts,
    query: &Query,
    received: &Arc<AtomicU64>,
    upload_rate: Option<u64>,
) -> Result<Response<Incoming>, Rejection> {
    let (mut parts, body) = request.into_parts();
    let path_and_query = parts
        .uri
        .path_and_query()
        .map(|value| value.as_str().to_owned())
        .unwrap_or_else(|| "/".to_owned());
    let uri: Uri = format!("{}{path_and_query}", shared.upstream)
        .parse()
        .map_err(|error| Rejection::Upstream(Box::new(error)))?;
    parts.uri = uri;
    // moto answers at once; waiting for 100 Continue would only add a
    // round trip the agent does not expect.
    parts.headers.remove(EXPECT);

    let upload_id = query.get("uploadId").map(percent_decode);
    let body =
        if shared.mode == ProxyMode::R2 && facts.operation == Operation::CompleteMultipartUpload {
            let bytes = read_limited(body, received)
                .await
                .map_err(Rejection::Upstream)?;
            if let Some(upload_id) = &upload_id {
                if let Err(message) = check_r2_parts(shared, upload_id, &bytes) {
                    return Err(Rejection::R2(error_response(
                        400,
                        "InvalidPart",
                        &message,
                        parts.uri.path(),
                    )));
                }
            }
            full_body(bytes)
        } else if body.is_end_stream() {
            empty_body()
        } else {
            let shape = match upload_rate {
                Some(bytes_per_second) => BodyShape::Trickle { bytes_per_second },
                None => BodyShape::Pass,
            };
            counted_body(body, shape, Arc::clone(received))
        };

    let copy_range = parts
        .headers
        .get("x-amz-copy-source-range")
        .and_then(|value| value.to_str().ok())
        .and_then(parse_byte_range);
    let copy_source = parts
        .headers
        .get("x-amz-copy-source")
        .and_then(|value| value.to_str().ok())
        .map(str::to_owned);
    let part_number = query.get("partNumber").and_then(|n| n.parse::<u32>().ok());

    let response = shared
        .client
        .request(Request::from_parts(parts, body))
        .await
        .map_err(|error| Rejection::Upstream(Box::new(error)))?;

    if shared.mode == ProxyMode::R2 && response.status().is_success() {
        let operation = facts.operation;
        match (operation, &upload_id, part_number) {
            (Operation::UploadPart, Some(upload_id), Some(number)) => {
                let size = received.load(Ordering::SeqCst);
                record_part(shared, upload_id, number, size);
            }
            (Operation::UploadPartCopy, Some(upload_id), Some(number)) => {
                let size = match copy_range {
                    Some(size) => Some(size),
                    None => match copy_source {
                        Some(source) => source_size(shared, &source).await,
                        None => None,
                    },
                };
                if let Some(size) = size {
                    record_part(shared, upload_id, number, size);
                }
            }
            (Operation::CompleteMultipartUpload | Operation::AbortMultipartUpload, Some(id), _) => {
                shared.uploads.lock().expect("uploads lock").remove(id);
            }
            _ => {}
        }
    }
    Ok(response)
}

fn record_part(shared: &Shared, upload_id: &str, number: u32, size: u64) {
    shared
        .uploads
        .lock()
        .expect("uploads lock")
        .entry(upload_id.to_owned())
        .or_default()
        .insert(number, size);
}

/// Returns the size of a `bytes=first-last` range.
fn parse_byte_range(text: &str) -> Option<u64> {
    let (first, last) = text.strip_prefix("bytes=")?.split_once('-')?;
    let first: u64 = first.trim().parse().ok()?;
    let last: u64 = last.trim().parse().ok()?;
    (last >= first).then(|| last - first + 1)
}

/// Asks the bucket for the size of a copy source, `bucket/key`.
async fn source_size(shared: &Shared, source: &str) -> Option<u64> {
    let source = source.trim_start_matches('/');
    let uri: Uri = format!("{}/{source}", shared.upstream).parse().ok()?;
    let request = Request::head(uri).body(empty_body()).ok()?;
    let response = shared.client.request(request).await.ok()?;
    response
        .headers()
        .get(CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

async fn read_limited(mut body: Incoming, received: &AtomicU64) -> Result<Bytes, BoxError> {
    let mut bytes = Vec::new();
    while let Some(frame) = body.frame().await {
        if let Some(data) = frame?.data_ref() {
            received.fetch_add(data.len() as u64, Ordering::SeqCst);
            bytes.extend_from_slice(data);
            if bytes.len() > MAX_COMPLETE_BODY {
                return Err("CompleteMultipartUpload body larger than 2 MiB".into());
            }
        }
    }
    Ok(Bytes::from(bytes))
}

/// Lists the part numbers of a CompleteMultipartUpload body in order.
fn listed_parts(body: &str) -> Vec<u32> {
    body.split("<PartNumber>")
        .skip(1)
        .filter_map(|rest| rest.split_once("</PartNumber>"))
        .filter_map(|(number, _)| number.trim().parse().ok())
        .collect()
}

/// Applies R2's rule for completing an upload: every part but the last has
/// the same size, and the last is no larger. Parts the proxy never saw
/// uploaded are left for the bucket to reject.
fn check_r2_parts(shared: &Shared, upload_id: &str, body: &[u8]) -> Result<(), String> {
    let listed = listed_parts(&String::from_utf8_lossy(body));
    let uploads = shared.uploads.lock().expect("uploads lock");
    let Some(sizes) = uploads.get(upload_id) else {
        return Ok(());
    };
    let listed_sizes: Option<Vec<(u32, u64)>> = listed
        .iter()
        .map(|number| sizes.get(number).map(|size| (*number, *size)))
        .collect();
    let Some(listed_sizes) = listed_sizes else {
        return Ok(());
    };
    r2_part_rule(&listed_sizes)
}

/// Checks part sizes, given in completion order, against R2's rule.
pub fn r2_part_rule(parts: &[(u32, u64)]) -> Result<(), String> {
    let Some(((_, first), rest)) = parts.split_first() else {
        return Ok(());
    };
    let Some(((last_number, last), middle)) = rest.split_last() else {
        return Ok(());
    };
    if let Some((number, size)) = middle.iter().find(|(_, size)| size != first) {
        return Err(format!(
            "All non-trailing parts must have the same length: part {number} has {size} \
             bytes, part 1 of the list has {first}"
        ));
    }
    if last > first {
        return Err(format!(
            "The last part {last_number} ({last} bytes) is larger than the others ({first} bytes)"
        ));
    }
    Ok(())
}

/// How the proxy reshapes a body it forwards.
#[derive(Clone, Copy, Debug)]
enum BodyShape {
    Pass,
    /// End after `after` bytes with an error; with `reset`, the connection
    /// is reset rather than closed.
    Cut {
        after: u64,
        reset: Option<RawFd>,
    },
    Pause {
        after: u64,
        pause: Duration,
    },
    Trickle {
        bytes_per_second: u64,
    },
}

struct Shaper {
    body: Incoming,
    pending: Bytes,
    sent: u64,
    shape: BodyShape,
    paused: bool,
    counter: Option<Arc<AtomicU64>>,
}

impl Shaper {
    async fn next_frame(&mut self) -> Option<Result<Frame<Bytes>, ConnectionCut>> {
        if self.pending.is_empty() {
            match self.body.frame().await? {
                Err(error) => return Some(Err(ConnectionCut::new(error.to_string()))),
                Ok(frame) => match frame.into_data() {
                    Ok(data) => self.pending = data,
                    Err(trailers) => return Some(Ok(trailers)),
                },
            }
            if self.pending.is_empty() {
                return Some(Ok(Frame::data(Bytes::new())));
            }
        }

        let take = match self.shape {
            BodyShape::Pass => self.pending.len(),
            BodyShape::Cut { after, reset } => {
                if self.sent >= after {
                    if let Some(connection) = reset {
                        arm_reset(connection);
                    }
                    return Some(Err(ConnectionCut::new("body cut short")));
                }
                self.pending.len().min((after - self.sent) as usize)
            }
            BodyShape::Pause { after, pause } => {
                if !self.paused && self.sent >= after {
                    self.paused = true;
                    tokio::time::sleep(pause).await;
                }
                if self.paused {
                    self.pending.len()
                } else {
                    self.pending.len().min((after - self.sent) as usize)
                }
            }
            BodyShape::Trickle { bytes_per_second } => {
                let take = self.pending.len().min(TRICKLE_CHUNK);
                let seconds = take as f64 / bytes_per_second.max(1) as f64;
                tokio::time::sleep(Duration::from_secs_f64(seconds)).await;
                take
            }
        };
        let chunk = self.pending.split_to(take);
        self.sent += chunk.len() as u64;
        if let Some(counter) = &self.counter {
            counter.fetch_add(chunk.len() as u64, Ordering::SeqCst);
        }
        Some(Ok(Frame::data(chunk)))
    }
}

fn shaped_body(body: Incoming, shape: BodyShape) -> ProxyBody {
    stream_body(Shaper {
        body,
        pending: Bytes::new(),
        sent: 0,
        shape,
        paused: false,
        counter: None,
    })
}

fn counted_body(body: Incoming, shape: BodyShape, counter: Arc<AtomicU64>) -> ProxyBody {
    stream_body(Shaper {
        body,
        pending: Bytes::new(),
        sent: 0,
        shape,
        paused: false,
        counter: Some(counter),
    })
}

fn stream_body(shaper: Shaper) -> ProxyBody {
    let frames = futures::stream::unfold(shaper, |mut shaper| async move {
        let frame = shaper.next_frame().await?;
        Some((frame, shaper))
    });
    // After an error the stream must end, or hyper would poll on.
    let frames = frames.scan(false, |failed, frame| {
        let item = (!*failed).then(|| {
            *failed = frame.is_err();
            frame
        });
        futures::future::ready(item)
    });
    BodyExt::boxed(StreamBody::new(frames))
}

fn pass_through(body: Incoming) -> ProxyBody {
    body.map_err(|error| ConnectionCut::new(error.to_string()))
        .boxed()
}

impl fmt::Debug for FaultProxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let address = SocketAddr::from((Ipv4Addr::LOCALHOST, self.port));
        write!(f, "FaultProxy({address}, {:?})", self.shared.mode)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_parts_with_smaller_last_pass() {
        assert_eq!(r2_part_rule(&[(1, 5), (2, 5), (3, 2)]), Ok(()));
        assert_eq!(r2_part_rule(&[(1, 5)]), Ok(()));
        assert_eq!(r2_part_rule(&[(1, 5), (2, 5)]), Ok(()));
    }

    #[test]
    fn unequal_middle_part_fails() {
        assert!(r2_part_rule(&[(1, 5), (2, 6), (3, 2)]).is_err());
    }

    #[test]
    fn larger_last_part_fails() {
        assert!(r2_part_rule(&[(1, 5), (2, 5), (3, 6)]).is_err());
        assert!(r2_part_rule(&[(1, 5), (2, 6)]).is_err());
    }

    #[test]
    fn completion_body_lists_parts_in_order() {
        let body = "<CompleteMultipartUpload><Part><ETag>\"a\"</ETag><PartNumber>1</PartNumber>\
                    </Part><Part><PartNumber>2</PartNumber><ETag>\"b\"</ETag></Part>\
                    </CompleteMultipartUpload>";
        assert_eq!(listed_parts(body), vec![1, 2]);
    }

    #[test]
    fn keys_are_decoded_after_the_bucket() {
        assert_eq!(
            object_key("/matrix-backups/matrixos-sync/u/system/db/latest"),
            "matrixos-sync/u/system/db/latest"
        );
        assert_eq!(object_key("/matrix-backups/a%2Fb%20c"), "a/b c");
        assert_eq!(object_key("/matrix-backups"), "");
    }

    #[test]
    fn byte_ranges_have_inclusive_ends() {
        assert_eq!(parse_byte_range("bytes=0-4"), Some(5));
        assert_eq!(parse_byte_range("bytes=5-4"), None);
    }
}
