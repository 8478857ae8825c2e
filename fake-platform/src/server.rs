//! The HTTP side: one handler that records each request and dispatches it,
//! and an accept loop that can drop a connection on cue.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Extension, State};
use axum::http::{header, HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Router;
use chrono::Utc;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;

use crate::bucket::MetaWriter;
use crate::record::{lock, RecordedRequest, RequestLog, REGISTER_PATH};
use crate::registration::{parse_registration, vps_meta_document};
use crate::script::{Script, ScriptedResponse};

const BUNDLE_NAME: &str = "matrix-host-bundle.tar.gz";
const CHECKSUM_NAME: &str = "matrix-host-bundle.tar.gz.sha256";
const PERSISTENCE_WARNING: &str = "vps_meta_persistence_failed";
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The directory that contains the bundle of one image version.
#[derive(Clone, Debug)]
pub(crate) struct BundleSource {
    pub(crate) image_version: String,
    pub(crate) directory: PathBuf,
}

/// Everything the handler reads or changes.
pub(crate) struct Shared {
    pub(crate) token: String,
    pub(crate) known_machine: Option<String>,
    pub(crate) bundle: Option<BundleSource>,
    pub(crate) meta_writer: Option<MetaWriter>,
    pub(crate) script: Mutex<Script>,
    pub(crate) log: RequestLog,
}

/// Lets a handler close the connection its request came on.
#[derive(Clone, Default)]
struct ConnectionControl {
    close: Arc<Notify>,
}

/// The handler's decision, before it becomes a response.
struct Reply {
    /// `None` drops the connection.
    status: Option<StatusCode>,
    content_type: &'static str,
    body: Bytes,
    detail: String,
}

impl Reply {
    fn json(status: StatusCode, body: Value, detail: impl Into<String>) -> Reply {
        Reply {
            status: Some(status),
            content_type: "application/json",
            body: Bytes::from(body.to_string()),
            detail: detail.into(),
        }
    }

    fn error(status: StatusCode, detail: impl Into<String>) -> Reply {
        let detail = detail.into();
        Reply::json(status, json!({ "error": detail }), detail)
    }
}

/// Accepts connections until the task is aborted; aborting it also aborts
/// every open connection, because their tasks live in its `JoinSet`.
pub(crate) async fn serve(listener: TcpListener, tls: Option<TlsAcceptor>, shared: Arc<Shared>) {
    let router = Router::new().fallback(handle).with_state(shared);
    let mut connections = JoinSet::new();
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _peer)) => stream,
            Err(error) => {
                // Typically EMFILE; a pause lets connections close.
                tracing::warn!("accepting a connection failed: {error}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        while connections.try_join_next().is_some() {}

        let control = ConnectionControl::default();
        let app = router.clone().layer(Extension(control.clone()));
        let tls = tls.clone();
        connections.spawn(async move {
            let Some(acceptor) = tls else {
                return serve_connection(stream, app, control).await;
            };
            match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                Ok(Ok(stream)) => serve_connection(stream, app, control).await,
                Ok(Err(error)) => tracing::debug!("TLS handshake failed: {error}"),
                Err(_) => tracing::debug!("TLS handshake timed out"),
            }
        });
    }
}

async fn serve_connection<I>(io: I, app: Router, control: ConnectionControl)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let connection = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(io), TowerToHyperService::new(app));
    tokio::select! {
        result = connection => {
            if let Err(error) = result {
                tracing::debug!("connection ended with an error: {error}");
            }
        }
        () = control.close.notified() => {
            tracing::debug!("dropping the connection as scripted");
        }
    }
}

/// Records the request, then sends the reply.
async fn handle(
    State(shared): State<Arc<Shared>>,
    Extension(control): Extension<ConnectionControl>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let received_at = Utc::now();
    let path = uri.path().to_string();
    let reply = if path == REGISTER_PATH {
        if method == Method::POST {
            register(&shared, &headers, &body).await
        } else {
            Reply::error(StatusCode::METHOD_NOT_ALLOWED, "use POST")
        }
    } else if let Some(rest) = path.strip_prefix("/system-bundles/") {
        if method == Method::GET || method == Method::HEAD {
            bundle_file(&shared, rest).await
        } else {
            Reply::error(StatusCode::METHOD_NOT_ALLOWED, "use GET")
        }
    } else {
        Reply::error(StatusCode::NOT_FOUND, format!("no route for {path}"))
    };

    let status_text = reply
        .status
        .map_or("dropped".to_string(), |status| status.as_u16().to_string());
    tracing::info!("{method} {path}: {status_text} ({})", reply.detail);
    shared
        .log
        .push(record(&method, path, &headers, &body, received_at, &reply));

    let Some(status) = reply.status else {
        control.close.notify_one();
        // The connection task drops this future with the connection.
        return std::future::pending().await;
    };
    let mut response = Response::new(Body::from(reply.body));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(reply.content_type),
    );
    response.into_response()
}

fn record(
    method: &Method,
    path: String,
    headers: &HeaderMap,
    body: &Bytes,
    received_at: chrono::DateTime<Utc>,
    reply: &Reply,
) -> RecordedRequest {
    let mut recorded_headers = std::collections::BTreeMap::new();
    for (name, value) in headers {
        let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
        recorded_headers
            .entry(name.as_str().to_string())
            .and_modify(|joined: &mut String| {
                joined.push_str(", ");
                joined.push_str(&value);
            })
            .or_insert(value);
    }
    let json_body = serde_json::from_slice::<Value>(body).ok();
    let body_text = if json_body.is_none() && !body.is_empty() {
        Some(String::from_utf8_lossy(body).into_owned())
    } else {
        None
    };
    RecordedRequest {
        sequence: 0,
        received_at,
        method: method.to_string(),
        path,
        headers: recorded_headers,
        body: json_body,
        body_text,
        status: reply.status.map(|status| status.as_u16()),
        detail: reply.detail.clone(),
    }
}

/// Handles `POST /vps/register`: authorization, then validation, then the
/// machine check, and only then the next scripted response. Requests
/// rejected before the script is reached leave the script unchanged.
async fn register(shared: &Shared, headers: &HeaderMap, body: &[u8]) -> Reply {
    if let Err(reason) = check_bearer(headers, &shared.token) {
        return Reply::error(StatusCode::UNAUTHORIZED, reason);
    }
    let registration = match parse_registration(body) {
        Ok(registration) => registration,
        Err(reason) => return Reply::error(StatusCode::BAD_REQUEST, reason),
    };
    if let Some(known) = &shared.known_machine {
        if *known != registration.machine_id {
            return Reply::error(
                StatusCode::NOT_FOUND,
                format!("unknown machine {}", registration.machine_id),
            );
        }
    }

    let scripted = lock(&shared.script).next_response();
    match scripted {
        ScriptedResponse::Register => {
            let Some(writer) = &shared.meta_writer else {
                return registered(&[], "registered; no bucket configured");
            };
            let document = vps_meta_document(&writer.target().user_id, &registration, Utc::now());
            match writer.write_vps_meta(&document).await {
                Ok(()) => registered(
                    &[],
                    format!("registered; wrote {}", writer.target().vps_meta_key()),
                ),
                Err(error) => {
                    tracing::warn!("{error}");
                    registered(&[PERSISTENCE_WARNING], format!("registered; {error}"))
                }
            }
        }
        ScriptedResponse::RegisterWithoutMeta => registered(
            &[PERSISTENCE_WARNING],
            "registered; vps-meta.json not written, as scripted",
        ),
        ScriptedResponse::Status(code) => {
            let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let reason = status.canonical_reason().unwrap_or("scripted status");
            Reply::json(
                status,
                json!({ "error": reason }),
                format!("scripted status {code}"),
            )
        }
        ScriptedResponse::DropConnection => Reply {
            status: None,
            content_type: "text/plain",
            body: Bytes::new(),
            detail: "connection dropped, as scripted".to_string(),
        },
    }
}

fn registered(warnings: &[&str], detail: impl Into<String>) -> Reply {
    let mut body = json!({ "registered": true, "status": "running" });
    if !warnings.is_empty() {
        body["warnings"] = json!(warnings);
    }
    Reply::json(StatusCode::OK, body, detail)
}

/// Accepts exactly `Authorization: Bearer <token>`; the scheme name is
/// case-insensitive (RFC 9110, section 11.1).
fn check_bearer(headers: &HeaderMap, token: &str) -> Result<(), &'static str> {
    let value = headers
        .get(header::AUTHORIZATION)
        .ok_or("missing Authorization header")?
        .to_str()
        .map_err(|_| "Authorization header is not ASCII")?;
    let (scheme, credentials) = value
        .split_once(' ')
        .ok_or("Authorization header is not 'Bearer <token>'")?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err("Authorization scheme is not Bearer");
    }
    if credentials != token {
        return Err("invalid or expired registration token");
    }
    Ok(())
}

/// Serves `GET /system-bundles/<imageVersion>/<file>` for the configured
/// version's bundle and checksum, read from disk on every request.
async fn bundle_file(shared: &Shared, rest: &str) -> Reply {
    let Some((version, file)) = rest.split_once('/') else {
        return Reply::error(StatusCode::NOT_FOUND, "no bundle file named");
    };
    let Some(bundle) = shared
        .bundle
        .as_ref()
        .filter(|bundle| bundle.image_version == version)
    else {
        return Reply::error(StatusCode::NOT_FOUND, format!("unknown version {version}"));
    };
    let content_type = match file {
        BUNDLE_NAME => "application/gzip",
        CHECKSUM_NAME => "text/plain; charset=utf-8",
        _ => return Reply::error(StatusCode::NOT_FOUND, format!("no bundle file {file}")),
    };
    let path = bundle.directory.join(file);
    match tokio::fs::read(&path).await {
        Ok(bytes) => Reply {
            status: Some(StatusCode::OK),
            content_type,
            detail: format!("served {} ({} bytes)", path.display(), bytes.len()),
            body: Bytes::from(bytes),
        },
        Err(error) => Reply::error(
            StatusCode::NOT_FOUND,
            format!("cannot read {}: {error}", path.display()),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers_with(authorization: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(header::AUTHORIZATION, authorization.parse().unwrap());
        headers
    }

    #[test]
    fn bearer_token_must_match() {
        assert!(check_bearer(&headers_with("Bearer secret-1"), "secret-1").is_ok());
        assert!(check_bearer(&headers_with("bearer secret-1"), "secret-1").is_ok());
        assert!(check_bearer(&headers_with("Bearer secret-2"), "secret-1").is_err());
        assert!(check_bearer(&headers_with("Basic secret-1"), "secret-1").is_err());
        assert!(check_bearer(&headers_with("Bearer  secret-1"), "secret-1").is_err());
        assert!(check_bearer(&HeaderMap::new(), "secret-1").is_err());
    }
}
