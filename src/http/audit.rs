//! Operator endpoints: `GET /audit` (the decision log as a read-only page, with filters
//! and a chart of outcomes per day) and `GET /metrics` (Prometheus).
//!
//! Both show what mail did to whom, so neither is public: without `http.audit_token` they
//! answer loopback peers only, and not what came through a proxy; with a token every
//! request needs
//! `Authorization: Bearer TOKEN`, loopback included — behind a reverse proxy on the same
//! host every client arrives from loopback, so there the token is the only real check.
//!
//! Everything shown here came from mail (names, subjects, addresses): all of it is
//! escaped, the page runs no script and loads nothing (`default-src 'none'`), and the
//! chart is inline SVG drawn here.
//!
//! The SQL below only reads the audit tables; it lives here rather than in `store/`
//! because this page was added beside the store without changing it, and belongs in
//! `store/queries.rs` when that file is next touched.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::Duration;

use axum::extract::{ConnectInfo, Query, State};
use axum::http::{Extensions, HeaderMap, HeaderValue, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use sqlx::Row;

use super::{AppState, security_headers};
use crate::metrics::{self, MailboxLag, Snapshot};
use crate::outbox::templates::html_escape;
use crate::store::{Context, Store, StoreError};

/// Days in the outcome chart, today (UTC) included.
pub const CHART_DAYS: i64 = 14;
const DEFAULT_LIMIT: i64 = 50;
const MAX_LIMIT: i64 = 500;
const DAY: i64 = 86_400;
const DB_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a request to an operator endpoint was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denied {
    /// No token configured and the peer is not on loopback (or unknown).
    NotLoopback,
    /// A token is configured and the request has no `Authorization: Bearer`.
    MissingToken,
    /// A token is configured and the request's does not match.
    WrongToken,
    /// No token configured and the request came through a proxy (it carries
    /// `Forwarded`, `X-Forwarded-For` or `X-Real-IP`): its client is not local.
    Proxied,
}

impl Denied {
    fn message(self) -> &'static str {
        match self {
            Denied::NotLoopback => {
                "This page answers local clients only. Set http.audit_token to allow others (with Authorization: Bearer)."
            }
            Denied::MissingToken => "This page needs an Authorization: Bearer header.",
            Denied::WrongToken => "The bearer token is not valid.",
            Denied::Proxied => {
                "This page answers local clients only, and this request came through a proxy. Set http.audit_token to allow others (with Authorization: Bearer)."
            }
        }
    }
}

/// The access rule of `/audit` and `/metrics`. `peer` is `None` when the server was
/// started without connection info: refused, never assumed local. `proxied`: the
/// request says it came through a proxy ([`proxied`]).
pub fn authorize(
    peer: Option<SocketAddr>,
    proxied: bool,
    authorization: Option<&HeaderValue>,
    token: Option<&SecretString>,
) -> Result<(), Denied> {
    match token {
        Some(token) => {
            let presented = authorization
                .and_then(|v| v.to_str().ok())
                .and_then(bearer)
                .ok_or(Denied::MissingToken)?;
            if tokens_match(presented, token.expose_secret()) {
                Ok(())
            } else {
                Err(Denied::WrongToken)
            }
        }
        None if proxied => Err(Denied::Proxied),
        // `to_canonical`: an IPv4 client of a dual-stack listener is `::ffff:127.0.0.1`.
        None if peer.is_some_and(|p| p.ip().to_canonical().is_loopback()) => Ok(()),
        None => Err(Denied::NotLoopback),
    }
}

/// Whether a request says it came through a proxy, which forwards its client's address
/// in one of these headers (nginx, Apache, Caddy, HAProxy as usually set up).
pub fn proxied(headers: &HeaderMap) -> bool {
    ["forwarded", "x-forwarded-for", "x-real-ip"]
        .iter()
        .any(|h| headers.contains_key(*h))
}

/// The credentials of `Bearer CREDENTIALS` (the scheme is case-insensitive, RFC 9110).
fn bearer(value: &str) -> Option<&str> {
    let (scheme, credentials) = value.trim().split_once(' ')?;
    let credentials = credentials.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !credentials.is_empty()).then_some(credentials)
}

/// Compares in constant time: both sides are hashed to 32 bytes first, so neither the
/// position of the first difference nor the token's length shows in the timing.
fn tokens_match(presented: &str, expected: &str) -> bool {
    let a = Sha256::digest(presented.as_bytes());
    let b = Sha256::digest(expected.as_bytes());
    let diff = a
        .iter()
        .zip(b.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

pub(super) fn guard(
    state: &AppState,
    extensions: &Extensions,
    headers: &HeaderMap,
) -> Result<(), Denied> {
    let peer = extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(a)| *a);
    let result = authorize(
        peer,
        proxied(headers),
        headers.get(header::AUTHORIZATION),
        state.pipeline.config().http.audit_token.as_ref(),
    );
    if let Err(denied) = result {
        tracing::debug!(peer = ?peer, reason = ?denied, "operator page refused");
    }
    result
}

fn forbidden(denied: Denied) -> Response {
    let mut response = (StatusCode::FORBIDDEN, format!("{}\n", denied.message())).into_response();
    security_headers(&mut response, "text/plain; charset=utf-8");
    response
}

/// `GET /metrics`.
pub async fn metrics(
    State(state): State<AppState>,
    extensions: Extensions,
    headers: HeaderMap,
) -> Response {
    if let Err(denied) = guard(&state, &extensions, &headers) {
        return forbidden(denied);
    }
    let database = match tokio::time::timeout(DB_TIMEOUT, metrics::gather(state.pipeline.store()))
        .await
    {
        Ok(Ok(counts)) => Some(counts),
        Ok(Err(e)) => {
            tracing::warn!(error = %crate::outbox::error_chain(&e), "metrics: cannot read the database");
            None
        }
        Err(_) => {
            tracing::warn!("metrics: the database did not answer in time");
            None
        }
    };
    let now = crate::now();
    let snapshot = Snapshot {
        database,
        mailboxes: state
            .health
            .snapshot()
            .iter()
            .map(|(name, h)| MailboxLag::from_health(name, h, now))
            .collect(),
        processing: metrics::PROCESSING.snapshot(),
    };
    let mut response = (StatusCode::OK, metrics::render(&snapshot)).into_response();
    security_headers(&mut response, "text/plain; version=0.0.4; charset=utf-8");
    response
}

/// The page's GET parameters, as typed (anything is accepted; see [`Filter::from_query`]).
#[derive(Debug, Default, Deserialize)]
pub struct AuditQuery {
    pub address: Option<String>,
    pub desk: Option<String>,
    pub action: Option<String>,
    pub reason: Option<String>,
    /// Only decisions older than this audit id (the "older" link).
    pub before: Option<String>,
    pub limit: Option<String>,
}

/// The filters in canonical form; empty strings mean "any".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Filter {
    pub address: String,
    pub desk: String,
    pub action: String,
    pub reason: String,
    pub before: Option<i64>,
    pub limit: i64,
}

impl Filter {
    pub fn from_query(q: &AuditQuery) -> Filter {
        fn text(v: &Option<String>) -> &str {
            v.as_deref().map(str::trim).unwrap_or_default()
        }
        let address = text(&q.address);
        // The audit index holds canonical addresses; something that does not parse is
        // still searched for (lowercased) and simply finds nothing.
        let address = crate::address::EmailAddress::parse(address)
            .map(|a| a.as_str().to_string())
            .unwrap_or_else(|_| address.to_lowercase());
        Filter {
            address,
            desk: text(&q.desk).to_ascii_uppercase(),
            action: text(&q.action).to_ascii_lowercase(),
            reason: text(&q.reason).to_ascii_lowercase(),
            before: text(&q.before).parse().ok().filter(|b: &i64| *b > 0),
            limit: text(&q.limit)
                .parse()
                .unwrap_or(DEFAULT_LIMIT)
                .clamp(1, MAX_LIMIT),
        }
    }

    /// The query string of this filter (without `before`), percent-encoded.
    fn query_string(&self) -> String {
        let mut parts = Vec::new();
        for (k, v) in [
            ("address", &self.address),
            ("desk", &self.desk),
            ("action", &self.action),
            ("reason", &self.reason),
        ] {
            if !v.is_empty() {
                parts.push(format!("{k}={}", percent_encode(v)));
            }
        }
        if self.limit != DEFAULT_LIMIT {
            parts.push(format!("limit={}", self.limit));
        }
        parts.join("&")
    }
}

fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b'@') {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// One audit row as the page shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct DecisionRow {
    pub id: i64,
    pub at: i64,
    pub desk: Option<String>,
    pub action: String,
    pub reason: String,
    pub request: Option<String>,
    pub subject: Option<String>,
    /// The stored decision (the `explain` JSON; other shapes for release and expiry).
    pub decision: serde_json::Value,
}

/// The filter condition shared by the list and the chart: `$1`..`$4` are address, desk,
/// action and reason, `''` meaning any.
const FILTER_SQL: &str = "($1 = '' OR a.id IN (SELECT x.audit_id FROM audit_addresses x WHERE x.address = $1)) \
     AND ($2 = '' OR a.desk = $2) AND ($3 = '' OR a.action = $3) AND ($4 = '' OR a.reason = $4)";

/// Newest first, `limit + 1` rows (the extra one says whether there is an older page).
/// Walks the audit table backwards by id and stops after `limit` matches.
pub async fn recent_decisions(store: &Store, f: &Filter) -> Result<Vec<DecisionRow>, StoreError> {
    let mut conn = store.acquire().await?;
    let sql = format!(
        "SELECT a.id, a.created_at, a.desk, a.action, a.reason, a.request_key, a.decision, l.subject \
         FROM audit a LEFT JOIN ledger l ON l.id = a.ledger_id \
         WHERE {FILTER_SQL} AND a.id < $5 ORDER BY a.id DESC LIMIT $6"
    );
    let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(&f.address)
        .bind(&f.desk)
        .bind(&f.action)
        .bind(&f.reason)
        .bind(f.before.unwrap_or(i64::MAX))
        .bind(f.limit + 1)
        .fetch_all(&mut *conn)
        .await
        .ctx("list recent decisions")?;
    rows.iter()
        .map(|r| {
            let decision: String = r.try_get(6).ctx("read audit")?;
            Ok(DecisionRow {
                id: r.try_get(0).ctx("read audit")?,
                at: r.try_get(1).ctx("read audit")?,
                desk: r.try_get(2).ctx("read audit")?,
                action: r.try_get(3).ctx("read audit")?,
                reason: r.try_get(4).ctx("read audit")?,
                request: r.try_get(5).ctx("read audit")?,
                subject: r.try_get(7).ctx("read audit")?,
                decision: serde_json::from_str(&decision).unwrap_or(serde_json::Value::Null),
            })
        })
        .collect()
}

/// Decisions per UTC day and action from `since` on (a range on the `audit_created` index).
pub async fn outcomes_per_day(
    store: &Store,
    f: &Filter,
    since: i64,
) -> Result<BTreeMap<i64, BTreeMap<String, u64>>, StoreError> {
    let mut conn = store.acquire().await?;
    let sql = format!(
        "SELECT a.created_at / {DAY}, a.action, COUNT(*) FROM audit a \
         WHERE {FILTER_SQL} AND a.created_at >= $5 GROUP BY 1, 2"
    );
    let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(&f.address)
        .bind(&f.desk)
        .bind(&f.action)
        .bind(&f.reason)
        .bind(since)
        .fetch_all(&mut *conn)
        .await
        .ctx("count decisions per day")?;
    let mut out: BTreeMap<i64, BTreeMap<String, u64>> = BTreeMap::new();
    for r in &rows {
        let day: i64 = r.try_get(0).ctx("read decision counts")?;
        let action: String = r.try_get(1).ctx("read decision counts")?;
        let n: i64 = r.try_get(2).ctx("read decision counts")?;
        *out.entry(day).or_default().entry(action).or_default() += n.max(0) as u64;
    }
    Ok(out)
}

/// `GET /audit`.
pub async fn page(
    State(state): State<AppState>,
    extensions: Extensions,
    headers: HeaderMap,
    uri: Uri,
) -> Response {
    if let Err(denied) = guard(&state, &extensions, &headers) {
        return forbidden(denied);
    }
    // Parsed after the access check, so a refused client learns nothing from a 400.
    let query = match Query::<AuditQuery>::try_from_uri(&uri) {
        Ok(Query(q)) => q,
        Err(e) => {
            let mut response = (StatusCode::BAD_REQUEST, format!("{e}\n")).into_response();
            security_headers(&mut response, "text/plain; charset=utf-8");
            return response;
        }
    };
    let filter = Filter::from_query(&query);
    let now = crate::now();
    let today = now.div_euclid(DAY);
    let first_day = today - (CHART_DAYS - 1);
    let store = state.pipeline.store();
    let loaded = tokio::time::timeout(DB_TIMEOUT, async {
        let rows = recent_decisions(store, &filter).await?;
        let chart = outcomes_per_day(store, &filter, first_day * DAY).await?;
        Ok::<_, StoreError>((rows, chart))
    })
    .await;
    let (mut rows, chart) = match loaded {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => {
            tracing::error!(error = %crate::outbox::error_chain(&e), "audit page: cannot read the database");
            return unavailable();
        }
        Err(_) => {
            tracing::error!("audit page: the database did not answer in time");
            return unavailable();
        }
    };
    let more = rows.len() as i64 > filter.limit;
    rows.truncate(filter.limit as usize);
    let desks: Vec<String> = state
        .pipeline
        .config()
        .policy
        .desks
        .iter()
        .map(|d| d.key.to_string())
        .collect();
    let body = render_page(&PageData {
        filter: &filter,
        desks: &desks,
        rows: &rows,
        more,
        chart: &chart,
        first_day,
        days: CHART_DAYS,
    });
    let mut response = (StatusCode::OK, body).into_response();
    security_headers(&mut response, "text/html; charset=utf-8");
    response
}

fn unavailable() -> Response {
    let mut response = (
        StatusCode::SERVICE_UNAVAILABLE,
        shell(
            "Audit log unavailable",
            "<p>The audit log cannot be read right now; the error is in intake's log. Try again in a moment.</p>",
        ),
    )
        .into_response();
    security_headers(&mut response, "text/html; charset=utf-8");
    response
}

/// The actions the filter offers, in the order of the decision contract, then the
/// audit-only events.
const ACTIONS: [&str; 7] = [
    "create_request",
    "add_comment",
    "hold_for_verification",
    "reject",
    "ignore",
    "release",
    "expire",
];

fn colour(action: &str) -> &'static str {
    match action {
        "create_request" => "#2e7d32",
        "add_comment" => "#1565c0",
        "hold_for_verification" => "#b26a00",
        "reject" => "#c62828",
        "ignore" => "#6d6d6d",
        "release" => "#00838f",
        "expire" => "#6a1b9a",
        _ => "#37474f",
    }
}

/// Everything the page shows.
pub struct PageData<'a> {
    pub filter: &'a Filter,
    pub desks: &'a [String],
    pub rows: &'a [DecisionRow],
    pub more: bool,
    /// UTC day number → action → decisions.
    pub chart: &'a BTreeMap<i64, BTreeMap<String, u64>>,
    pub first_day: i64,
    pub days: i64,
}

fn format_time(ts: i64, with_time: bool) -> String {
    let fmt_full =
        time::macros::format_description!("[year]-[month]-[day] [hour]:[minute]:[second]");
    let fmt_day = time::macros::format_description!("[year]-[month]-[day]");
    time::OffsetDateTime::from_unix_timestamp(ts)
        .ok()
        .and_then(|t| {
            if with_time {
                t.format(&fmt_full).ok()
            } else {
                t.format(&fmt_day).ok()
            }
        })
        .unwrap_or_else(|| ts.to_string())
}

fn shell(title: &str, body: &str) -> String {
    format!(
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <meta name=\"robots\" content=\"noindex\">\n\
         <title>{title}</title>\n<style>\n\
         body {{ font-family: system-ui, sans-serif; line-height: 1.4; max-width: 90em; margin: 1.5em auto; padding: 0 1em; color: #1a1a1a; }}\n\
         form {{ display: flex; flex-wrap: wrap; gap: .8em 1.2em; align-items: flex-end; margin: 1em 0; }}\n\
         form div {{ display: flex; flex-direction: column; }}\n\
         label {{ font-weight: 600; font-size: .9em; }}\n\
         input, select, button {{ font: inherit; padding: .3em; }}\n\
         table {{ border-collapse: collapse; width: 100%; font-size: .92em; }}\n\
         caption {{ text-align: left; font-weight: 600; padding: .4em 0; }}\n\
         th, td {{ border-bottom: 1px solid #ccc; padding: .35em .5em; text-align: left; vertical-align: top; }}\n\
         th {{ background: #f2f2f2; }}\n\
         td.when {{ white-space: nowrap; }}\n\
         .why {{ color: #444; font-size: .9em; }}\n\
         ul.people {{ margin: 0; padding-left: 1.1em; }}\n\
         .legend {{ list-style: none; padding: 0; display: flex; flex-wrap: wrap; gap: 1em; }}\n\
         .swatch {{ display: inline-block; width: .9em; height: .9em; margin-right: .3em; vertical-align: middle; }}\n\
         svg {{ max-width: 100%; height: auto; }}\n\
         a:focus, input:focus, select:focus, button:focus {{ outline: 3px solid #1565c0; outline-offset: 1px; }}\n\
         </style>\n</head>\n<body>\n<main>\n<h1>{title}</h1>\n{body}\n</main>\n</body>\n</html>\n",
        title = html_escape(title),
    )
}

/// The whole `/audit` page. Every value from the database is escaped here.
pub fn render_page(d: &PageData<'_>) -> String {
    let f = d.filter;
    let mut b = String::new();
    let _ = writeln!(
        b,
        "<p>Decisions intake made, newest first. Times are UTC. Read-only.</p>"
    );
    b.push_str(&render_form(f, d.desks));
    b.push_str(&render_chart(d.chart, d.first_day, d.days));
    b.push_str(&render_table(d.rows));
    // Paging: the "older" link continues after the last row shown.
    let mut nav = Vec::new();
    let base = f.query_string();
    if f.before.is_some() {
        let href = if base.is_empty() {
            "/audit".to_string()
        } else {
            format!("/audit?{base}")
        };
        nav.push(format!(
            "<a href=\"{}\" id=\"newest\">Newest decisions</a>",
            html_escape(&href)
        ));
    }
    if let (true, Some(last)) = (d.more, d.rows.last()) {
        let sep = if base.is_empty() { "" } else { "&" };
        let href = format!("/audit?{base}{sep}before={}", last.id);
        nav.push(format!(
            "<a href=\"{}\" id=\"older\" rel=\"next\">Older decisions</a>",
            html_escape(&href)
        ));
    }
    if !nav.is_empty() {
        let _ = writeln!(
            b,
            "<nav aria-label=\"Pages\"><p>{}</p></nav>",
            nav.join(" · ")
        );
    }
    shell("Audit log", &b)
}

fn render_form(f: &Filter, desks: &[String]) -> String {
    let mut b = String::new();
    b.push_str(
        "<form method=\"get\" action=\"/audit\" role=\"search\" aria-label=\"Filter decisions\">\n",
    );
    let _ = writeln!(
        b,
        "<div><label for=\"address\">Address</label>\
         <input type=\"text\" id=\"address\" name=\"address\" value=\"{}\" size=\"30\" autocomplete=\"off\" spellcheck=\"false\"></div>",
        html_escape(&f.address)
    );
    let mut desk_options: Vec<&str> = desks.iter().map(String::as_str).collect();
    if !f.desk.is_empty() && !desk_options.contains(&f.desk.as_str()) {
        desk_options.push(&f.desk);
    }
    b.push_str(&select("desk", "Desk", "any desk", &desk_options, &f.desk));
    let mut actions: Vec<&str> = ACTIONS.to_vec();
    if !f.action.is_empty() && !actions.contains(&f.action.as_str()) {
        actions.push(&f.action);
    }
    b.push_str(&select(
        "action",
        "Action",
        "any action",
        &actions,
        &f.action,
    ));
    let _ = writeln!(
        b,
        "<div><label for=\"reason\">Reason</label>\
         <input type=\"text\" id=\"reason\" name=\"reason\" value=\"{}\" list=\"reasons\" size=\"26\" autocomplete=\"off\" spellcheck=\"false\"></div>",
        html_escape(&f.reason)
    );
    b.push_str("<datalist id=\"reasons\">");
    for r in crate::policy::Reason::ALL {
        let _ = write!(b, "<option value=\"{}\">", r.code());
    }
    b.push_str("</datalist>\n");
    let limits = ["25", "50", "100", "200", "500"];
    let current = f.limit.to_string();
    let mut limit_options: Vec<&str> = limits.to_vec();
    if !limit_options.contains(&current.as_str()) {
        limit_options.push(&current);
    }
    b.push_str(&select_plain("limit", "Rows", &limit_options, &current));
    b.push_str("<div><button type=\"submit\" id=\"filter\">Show</button></div>\n");
    b.push_str("<div><a href=\"/audit\" id=\"clear\">Clear filters</a></div>\n</form>\n");
    b
}

fn select(name: &str, label: &str, any: &str, options: &[&str], current: &str) -> String {
    let mut b = format!(
        "<div><label for=\"{name}\">{label}</label><select id=\"{name}\" name=\"{name}\">\
         <option value=\"\">{any}</option>"
    );
    for o in options {
        let selected = if *o == current { " selected" } else { "" };
        let o = html_escape(o);
        let _ = write!(b, "<option value=\"{o}\"{selected}>{o}</option>");
    }
    b.push_str("</select></div>\n");
    b
}

fn select_plain(name: &str, label: &str, options: &[&str], current: &str) -> String {
    let mut b =
        format!("<div><label for=\"{name}\">{label}</label><select id=\"{name}\" name=\"{name}\">");
    for o in options {
        let selected = if *o == current { " selected" } else { "" };
        let o = html_escape(o);
        let _ = write!(b, "<option value=\"{o}\"{selected}>{o}</option>");
    }
    b.push_str("</select></div>\n");
    b
}

fn json_str<'v>(v: &'v serde_json::Value, path: &[&str]) -> Option<&'v str> {
    path.iter()
        .try_fold(v, |v, k| v.get(*k))
        .and_then(|v| v.as_str())
        .filter(|s| !s.is_empty())
}

/// "Name <address>" (escaped), or just the address.
fn person(address: &str, name: Option<&str>) -> String {
    match name {
        Some(n) => format!(
            "<span class=\"name\">{}</span> &lt;{}&gt;",
            html_escape(n),
            html_escape(address)
        ),
        None => html_escape(address),
    }
}

fn render_table(rows: &[DecisionRow]) -> String {
    if rows.is_empty() {
        return "<p id=\"no-decisions\">No decisions match these filters.</p>\n".to_string();
    }
    let mut b = String::new();
    let _ = writeln!(
        b,
        "<table id=\"decisions\">\n<caption>{} decision{} shown</caption>\n<thead><tr>\
         <th scope=\"col\">When (UTC)</th><th scope=\"col\">Desk</th><th scope=\"col\">Action</th>\
         <th scope=\"col\">Reason</th><th scope=\"col\">Request</th><th scope=\"col\">Requester</th>\
         <th scope=\"col\">Subject</th><th scope=\"col\">Addresses</th></tr></thead>\n<tbody>",
        rows.len(),
        if rows.len() == 1 { "" } else { "s" }
    );
    for r in rows {
        let d = &r.decision;
        let requester_address =
            json_str(d, &["requester", "address"]).or_else(|| json_str(d, &["address"]));
        let requester = requester_address
            .map(|a| person(a, json_str(d, &["requester", "display_name"])))
            .unwrap_or_default();
        let requester_outcome = match (
            json_str(d, &["requester", "account"]),
            json_str(d, &["requester", "reason"]),
        ) {
            (Some(account), Some(reason)) => format!(
                "<div class=\"why\">account: {} ({})</div>",
                html_escape(account),
                html_escape(reason)
            ),
            _ => String::new(),
        };
        let explanation = json_str(d, &["explanation"])
            .map(|e| format!("<div class=\"why\">{}</div>", html_escape(e)))
            .unwrap_or_default();
        let mut people = String::new();
        for p in d
            .get("participants")
            .and_then(|p| p.as_array())
            .into_iter()
            .flatten()
        {
            let Some(address) = json_str(p, &["address"]) else {
                continue;
            };
            let _ = write!(
                people,
                "<li>{} — {} ({})</li>",
                person(address, json_str(p, &["display_name"])),
                html_escape(json_str(p, &["outcome"]).unwrap_or("?")),
                html_escape(json_str(p, &["reason"]).unwrap_or("?"))
            );
        }
        for e in d
            .get("emails")
            .and_then(|p| p.as_array())
            .into_iter()
            .flatten()
        {
            if let Some(to) = json_str(e, &["to"]) {
                let _ = write!(
                    people,
                    "<li>{} — mail: {}</li>",
                    html_escape(to),
                    html_escape(json_str(e, &["kind"]).unwrap_or("?"))
                );
            }
        }
        if !people.is_empty() {
            people = format!("<ul class=\"people\">{people}</ul>");
        }
        let _ = writeln!(
            b,
            "<tr class=\"decision\" data-id=\"{id}\">\
             <td class=\"when\"><time datetime=\"{iso}\">{when}</time></td>\
             <td class=\"desk\">{desk}</td>\
             <td class=\"action\">{action}{explanation}</td>\
             <td class=\"reason\">{reason}</td>\
             <td class=\"request\">{request}</td>\
             <td class=\"requester\">{requester}{requester_outcome}</td>\
             <td class=\"subject\">{subject}</td>\
             <td class=\"addresses\">{people}</td></tr>",
            id = r.id,
            iso = html_escape(&format_time(r.at, true).replacen(' ', "T", 1)) + "Z",
            when = html_escape(&format_time(r.at, true)),
            desk = html_escape(r.desk.as_deref().unwrap_or("")),
            action = html_escape(&r.action),
            reason = html_escape(&r.reason),
            request = html_escape(r.request.as_deref().unwrap_or("")),
            subject = html_escape(r.subject.as_deref().unwrap_or("")),
        );
    }
    b.push_str("</tbody>\n</table>\n");
    b
}

/// A stacked bar per day (one `<rect>` per action with decisions that day), with a
/// legend and the same numbers as a table for screen readers and copying.
pub fn render_chart(
    chart: &BTreeMap<i64, BTreeMap<String, u64>>,
    first_day: i64,
    days: i64,
) -> String {
    const SLOT: i64 = 44;
    const BAR: i64 = 28;
    const PLOT: f64 = 140.0;
    const LEFT: i64 = 40;
    const TOP: i64 = 12;
    let width = LEFT + SLOT * days + 8;
    let height = TOP + PLOT as i64 + 34;
    let day_total = |day: i64| -> u64 { chart.get(&day).map(|m| m.values().sum()).unwrap_or(0) };
    let max = (first_day..first_day + days)
        .map(day_total)
        .max()
        .unwrap_or(0)
        .max(1);
    // Actions in a stable order: the known ones first, then any others alphabetically.
    let mut actions: Vec<String> = ACTIONS.iter().map(|a| a.to_string()).collect();
    for m in chart.values() {
        for a in m.keys() {
            if !actions.contains(a) {
                actions.push(a.clone());
            }
        }
    }
    let present: Vec<&String> = actions
        .iter()
        .filter(|a| {
            (first_day..first_day + days).any(|day| {
                chart
                    .get(&day)
                    .and_then(|m| m.get(*a))
                    .is_some_and(|n| *n > 0)
            })
        })
        .collect();

    let mut b = String::new();
    b.push_str("<section aria-labelledby=\"chart-heading\">\n<h2 id=\"chart-heading\">Outcomes per day</h2>\n");
    let total: u64 = (first_day..first_day + days).map(day_total).sum();
    let _ = writeln!(
        b,
        "<svg id=\"chart\" xmlns=\"http://www.w3.org/2000/svg\" role=\"img\" viewBox=\"0 0 {width} {height}\" \
         width=\"{width}\" height=\"{height}\" aria-labelledby=\"chart-title chart-desc\">\
         <title id=\"chart-title\">Decisions per day, last {days} days</title>\
         <desc id=\"chart-desc\">{total} decisions from {from} to {to} (UTC), stacked by action; the table below has the numbers.</desc>",
        from = format_time(first_day * DAY, false),
        to = format_time((first_day + days - 1) * DAY, false),
    );
    // Axis and the top value.
    let base = TOP as f64 + PLOT;
    let _ = write!(
        b,
        "<line x1=\"{LEFT}\" y1=\"{base}\" x2=\"{x2}\" y2=\"{base}\" stroke=\"#888\" stroke-width=\"1\"/>\
         <text x=\"{tx}\" y=\"{ty}\" font-size=\"11\" text-anchor=\"end\" fill=\"#444\">{max}</text>\
         <text x=\"{tx}\" y=\"{base}\" font-size=\"11\" text-anchor=\"end\" fill=\"#444\">0</text>",
        x2 = width - 4,
        tx = LEFT - 6,
        ty = TOP + 10,
    );
    for i in 0..days {
        let day = first_day + i;
        let date = format_time(day * DAY, false);
        let x = LEFT + i * SLOT + (SLOT - BAR) / 2;
        let _ = write!(b, "<g class=\"day\" data-day=\"{date}\">");
        let mut y = base;
        if let Some(counts) = chart.get(&day) {
            for a in &present {
                let n = counts.get(*a).copied().unwrap_or(0);
                if n == 0 {
                    continue;
                }
                let h = (n as f64 / max as f64 * PLOT).max(1.0);
                y -= h;
                let _ = write!(
                    b,
                    "<rect class=\"bar\" data-action=\"{action}\" data-count=\"{n}\" x=\"{x}\" y=\"{y:.1}\" \
                     width=\"{BAR}\" height=\"{h:.1}\" fill=\"{fill}\"><title>{date}: {action} {n}</title></rect>",
                    action = html_escape(a),
                    fill = colour(a),
                );
            }
        }
        // Month-day under each bar.
        let _ = write!(
            b,
            "<text x=\"{cx}\" y=\"{ly}\" font-size=\"10\" text-anchor=\"middle\" fill=\"#444\">{md}</text></g>",
            cx = x + BAR / 2,
            ly = base + 14.0,
            md = date.get(5..).unwrap_or(&date),
        );
    }
    b.push_str("</svg>\n");
    if !present.is_empty() {
        b.push_str("<ul class=\"legend\" aria-label=\"Legend\">");
        for a in &present {
            let _ = write!(
                b,
                "<li><svg width=\"12\" height=\"12\" aria-hidden=\"true\"><rect width=\"12\" height=\"12\" fill=\"{}\"/></svg> {}</li>",
                colour(a),
                html_escape(a)
            );
        }
        b.push_str("</ul>\n");
    }
    // The same numbers as a table.
    b.push_str("<details><summary>Outcomes per day as a table</summary>\n<table id=\"chart-table\"><thead><tr><th scope=\"col\">Day (UTC)</th>");
    for a in &present {
        let _ = write!(b, "<th scope=\"col\">{}</th>", html_escape(a));
    }
    b.push_str("<th scope=\"col\">Total</th></tr></thead><tbody>");
    for i in 0..days {
        let day = first_day + i;
        let _ = write!(
            b,
            "<tr><th scope=\"row\">{}</th>",
            format_time(day * DAY, false)
        );
        for a in &present {
            let n = chart
                .get(&day)
                .and_then(|m| m.get(*a))
                .copied()
                .unwrap_or(0);
            let _ = write!(b, "<td>{n}</td>");
        }
        let _ = write!(b, "<td>{}</td></tr>", day_total(day));
    }
    b.push_str("</tbody></table></details>\n</section>\n");
    b
}

#[cfg(test)]
#[path = "audit_tests.rs"]
mod tests;
