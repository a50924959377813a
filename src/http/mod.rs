//! The HTTP server: verification pages, `/healthz`, and the operator endpoints `/audit`
//! and `/metrics` (see [`audit`]). Plain, accessible HTML with no external assets
//! (nothing to load from elsewhere, nothing to track).
//!
//! `GET /verify/{token}` never changes anything — mail scanners and link previews fetch
//! links — it shows what confirming does and a form; `POST` confirms.

pub mod audit;

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Form, Json, Router};
use serde::Deserialize;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::health::Health;
use crate::outbox::templates::html_escape;
use crate::pipeline::Pipeline;
use crate::verify::{self, Confirmation, TokenState};

#[derive(Clone)]
pub struct AppState {
    pub pipeline: Pipeline,
    pub health: Health,
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/verify/{token}", get(verify_page).post(confirm))
        .route("/healthz", get(healthz))
        .route("/audit", get(audit::page))
        .route("/metrics", get(audit::metrics))
        .with_state(state)
}

/// Serves until `shutdown`. Handlers see the peer address (`ConnectInfo`): `/audit` and
/// `/metrics` answer only loopback peers unless a token is configured.
///
/// These pages are reachable from outside (the links are mailed to customers), so no
/// client may hold a connection for long: one must send its request headers within
/// `http.read_timeout` (an idle keep-alive connection is closed after it too), a request
/// must be read and answered within twice that (a body dripped in), and a connection
/// lives at most [`CONNECTION_LIFETIME`] (then it finishes its request and closes; cut
/// [`SHUTDOWN_GRACE`] later, as for a client that never reads its responses). At most
/// `http.max_connections` are served at once; more wait in the kernel's accept queue.
pub async fn serve(
    listener: TcpListener,
    state: AppState,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    use hyper_util::rt::{TokioIo, TokioTimer};

    let http = state.pipeline.config().http.clone();
    let limit = http.read_timeout * 2;
    let app = router(state).layer(axum::middleware::from_fn(
        move |req: axum::extract::Request, next: axum::middleware::Next| within(limit, req, next),
    ));
    let slots = Arc::new(Semaphore::new(http.max_connections));
    let connections = tokio_util::task::TaskTracker::new();
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(http.read_timeout);
    loop {
        let slot = tokio::select! {
            slot = Arc::clone(&slots).acquire_owned() => match slot {
                Ok(s) => s,
                Err(_) => break,
            },
            _ = shutdown.cancelled() => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) if is_connection_error(&e) => continue,
                Err(e) => {
                    // Out of file descriptors, say: wait rather than spin.
                    tracing::error!(error = %e, "cannot accept HTTP connections");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                        _ = shutdown.cancelled() => break,
                    }
                }
            },
            _ = shutdown.cancelled() => break,
        };
        let service = app
            .clone()
            .layer(axum::Extension(axum::extract::ConnectInfo(peer)));
        let conn = builder.serve_connection(
            TokioIo::new(stream),
            hyper_util::service::TowerToHyperService::new(service),
        );
        let stop = shutdown.clone();
        connections.spawn(async move {
            let mut conn = std::pin::pin!(conn);
            let ended = tokio::select! {
                ended = conn.as_mut() => Some(ended),
                _ = stop.cancelled() => None,
                _ = tokio::time::sleep(CONNECTION_LIFETIME) => None,
            };
            let ended = match ended {
                Some(e) => Some(e),
                None => {
                    // The request in progress finishes, then the connection closes.
                    conn.as_mut().graceful_shutdown();
                    tokio::time::timeout(SHUTDOWN_GRACE, conn).await.ok()
                }
            };
            match ended {
                Some(Ok(())) => {}
                Some(Err(e)) => tracing::debug!(error = %e, %peer, "HTTP connection ended"),
                None => tracing::debug!(%peer, "HTTP connection cut off"),
            }
            drop(slot);
        });
    }
    // New clients are refused at once, not left waiting in the accept queue.
    drop(listener);
    connections.close();
    connections.wait().await;
    Ok(())
}

/// How long one connection may serve requests.
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(300);

/// How long requests in progress may run on at shutdown (or at the end of a
/// connection's lifetime) before the connection is cut.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Runs a request's handler (which reads its body) for at most `limit`: 408 after it.
async fn within(
    limit: Duration,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    match tokio::time::timeout(limit, next.run(req)).await {
        Ok(response) => response,
        Err(_) => {
            let mut r = page(
                StatusCode::REQUEST_TIMEOUT,
                "Request timed out",
                "<p>The request took too long. Please try again.</p>",
            );
            r.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
            r
        }
    }
}

/// An accept error about one connection (the client gave up first), not the listener.
fn is_connection_error(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionRefused | ConnectionAborted | ConnectionReset
    )
}

fn page(status: StatusCode, title: &str, body: &str) -> Response {
    let html = format!(
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <title>{title}</title>\n<style>\n\
         body {{ font-family: system-ui, sans-serif; line-height: 1.5; max-width: 36em; margin: 2em auto; padding: 0 1em; color: #1a1a1a; }}\n\
         label {{ display: block; margin-top: 1em; font-weight: 600; }}\n\
         input[type=text] {{ font: inherit; padding: .4em; width: 100%; box-sizing: border-box; }}\n\
         button {{ font: inherit; margin-top: 1em; padding: .5em 1.2em; }}\n\
         </style>\n</head>\n<body>\n<main>\n<h1>{title}</h1>\n{body}\n</main>\n</body>\n</html>\n",
        title = html_escape(title),
    );
    let mut response = (status, html).into_response();
    security_headers(&mut response, "text/html; charset=utf-8");
    response
}

/// The headers of every page we serve: no scripts or outside resources, no framing,
/// no caching, and no Referer (a verification token is in the URL: never hand it to
/// another site).
fn security_headers(response: &mut Response, content_type: &'static str) {
    let headers = response.headers_mut();
    let set = HeaderValue::from_static;
    headers.insert(header::CONTENT_TYPE, set(content_type));
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        set(
            "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    headers.insert(header::REFERRER_POLICY, set("no-referrer"));
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, set("nosniff"));
    headers.insert(header::CACHE_CONTROL, set("no-store"));
}

fn error_page(e: &dyn std::error::Error) -> Response {
    tracing::error!(error = %crate::outbox::error_chain(e), "verification page failed");
    page(
        StatusCode::SERVICE_UNAVAILABLE,
        "Please try again",
        "<p>Something went wrong on our side. Nothing was changed; please open the link again in a few minutes.</p>",
    )
}

/// The account behind the link was closed since it was sent.
fn deactivated_page() -> Response {
    page(
        StatusCode::FORBIDDEN,
        "This address cannot be confirmed",
        "<p>The account for this address is closed. Write to us if you think this is a mistake.</p>",
    )
}

async fn verify_page(State(state): State<AppState>, Path(token): Path<String>) -> Response {
    match verify::inspect(&state.pipeline, &token, crate::now()).await {
        Ok(TokenState::Valid(info)) => {
            let address = html_escape(&info.address);
            let name = html_escape(info.display_name.as_deref().unwrap_or_default());
            let (title, what) = if info.purpose == "invitation" {
                (
                    "Confirm your address",
                    format!(
                        "<p>You were added to a request as <strong>{address}</strong>. \
                         Confirm that this is your address to activate your account.</p>"
                    ),
                )
            } else {
                (
                    "Confirm your address",
                    format!(
                        "<p>You wrote to us from <strong>{address}</strong>. When you confirm that \
                         this is your address, your account becomes active and the requests \
                         waiting for this confirmation are opened.</p>"
                    ),
                )
            };
            let held = match verify::held(&state.pipeline, &info).await {
                Ok(h) => h,
                Err(e) => return error_page(&e),
            };
            // Each request waiting, ticked: one the person did not write (forged in
            // their name while the link waited) they untick, and it is not opened.
            // `listed` always goes with the form: a request held after the page was
            // opened is not ticked, so it is not opened.
            let mut listed = if held.is_empty() {
                String::new()
            } else {
                let items: Vec<String> = held
                    .iter()
                    .map(|(key, subject)| {
                        let key = html_escape(&key.to_string());
                        format!(
                            "<li><label><input type=\"checkbox\" name=\"open:{key}\" value=\"1\" checked> \
                             {key}: {}</label></li>",
                            html_escape(subject)
                        )
                    })
                    .collect();
                format!(
                    "<p>Requests waiting for this confirmation; untick any you did not send, and it will not be opened:</p>\n\
                     <ul id=\"held\">{}</ul>\n",
                    items.join("")
                )
            };
            listed.push_str("<input type=\"hidden\" name=\"listed\" value=\"1\">\n");
            // The form posts back to this page's own URL (no `action`): behind a proxy
            // that serves intake under a path prefix, `/verify/...` would miss it.
            page(
                StatusCode::OK,
                title,
                &format!(
                    "{what}\n<p>Opening this page changed nothing; only the button below does.</p>\n\
                     <form method=\"post\">\n{listed}\
                     <label for=\"display_name\">Your name, as it should be shown (optional)</label>\n\
                     <input type=\"text\" id=\"display_name\" name=\"display_name\" value=\"{name}\" maxlength=\"200\" autocomplete=\"name\">\n\
                     <button type=\"submit\" id=\"confirm\">Confirm my address</button>\n\
                     </form>"
                ),
            )
        }
        Ok(TokenState::Expired(_)) => page(
            StatusCode::GONE,
            "This link has expired",
            "<p>Links in our mail work for a limited time. Write to us again and you will receive a new one.</p>",
        ),
        Ok(TokenState::Used(_)) => page(
            StatusCode::GONE,
            "This link was already used",
            "<p>This address has already been confirmed with this link. There is nothing more to do.</p>",
        ),
        Ok(TokenState::Deactivated(_)) => deactivated_page(),
        Ok(TokenState::Unknown) => unknown_page(),
        Err(e) => error_page(&e),
    }
}

fn unknown_page() -> Response {
    page(
        StatusCode::NOT_FOUND,
        "This link is not valid",
        "<p>We do not know this link. Check that you opened it completely; some mail programs break long links.</p>",
    )
}

#[derive(Debug, Deserialize)]
struct ConfirmForm {
    display_name: Option<String>,
    /// Present when the page listed the held requests: then only those ticked
    /// (`open:KEY`) are opened. Without it (a form from before the list), all are.
    listed: Option<String>,
    #[serde(flatten)]
    ticked: std::collections::HashMap<String, String>,
}

async fn confirm(
    State(state): State<AppState>,
    Path(token): Path<String>,
    Form(form): Form<ConfirmForm>,
) -> Response {
    let name = form.display_name.filter(|n| !n.trim().is_empty());
    let only: Option<Vec<crate::keys::RequestKey>> = form.listed.map(|_| {
        form.ticked
            .keys()
            .filter_map(|k| k.strip_prefix("open:"))
            .filter_map(|k| crate::keys::RequestKey::parse(k).ok())
            .collect()
    });
    match verify::confirm(
        &state.pipeline,
        &token,
        name.as_deref(),
        only.as_deref(),
        crate::now(),
    )
    .await
    {
        Ok(Confirmation::Confirmed {
            address,
            released,
            left_held,
        }) => {
            let list = |keys: &[crate::keys::RequestKey]| -> String {
                keys.iter()
                    .map(|k| format!("<li>{}</li>", html_escape(&k.to_string())))
                    .collect()
            };
            let mut opened = String::new();
            if !released.is_empty() {
                opened.push_str(&format!(
                    "<p>These requests are now open:</p>\n<ul id=\"released\">{}</ul>\n",
                    list(&released)
                ));
            }
            if !left_held.is_empty() {
                opened.push_str(&format!(
                    "<p>These were not opened, and will expire:</p>\n<ul id=\"left-held\">{}</ul>\n",
                    list(&left_held)
                ));
            }
            page(
                StatusCode::OK,
                "Thank you — your address is confirmed",
                &format!(
                    "<p id=\"confirmed\"><strong>{}</strong> is confirmed.</p>\n{opened}",
                    html_escape(&address)
                ),
            )
        }
        Ok(Confirmation::Expired) => page(
            StatusCode::GONE,
            "This link has expired",
            "<p>Links in our mail work for a limited time. Write to us again and you will receive a new one.</p>",
        ),
        Ok(Confirmation::Used) => page(
            StatusCode::GONE,
            "This link was already used",
            "<p>This address has already been confirmed with this link. There is nothing more to do.</p>",
        ),
        Ok(Confirmation::Deactivated) => deactivated_page(),
        Ok(Confirmation::Unknown) => unknown_page(),
        Err(e) => error_page(&e),
    }
}

/// `GET /healthz`: whether the database answers and each mailbox works. Why not is
/// for operators only (the rule of `/audit`): the errors name hosts, users and what
/// servers replied, and this page is often reachable from outside.
async fn healthz(
    State(state): State<AppState>,
    extensions: axum::http::Extensions,
    headers: axum::http::HeaderMap,
) -> Response {
    let operator = audit::guard(&state, &extensions, &headers).is_ok();
    let database =
        tokio::time::timeout(Duration::from_secs(5), state.pipeline.store().ping()).await;
    let (db_ok, db_error) = match database {
        Ok(Ok(())) => (true, None),
        // Only the outermost message: the full chain (addresses, server replies) is in
        // the log.
        Ok(Err(e)) => (false, Some(e.to_string())),
        Err(_) => (false, Some("timed out".to_string())),
    };
    let mut sources = state.health.snapshot();
    let sources_ok = sources.values().all(|s| s.ok);
    let ok = db_ok && sources_ok;
    let db_error = db_error.filter(|_| operator);
    if !operator {
        for s in sources.values_mut() {
            s.last_error = None;
        }
    }
    let body = serde_json::json!({
        "status": if ok { "ok" } else { "degraded" },
        "database": { "ok": db_ok, "error": db_error },
        "mailboxes": sources,
    });
    let status = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body)).into_response()
}
