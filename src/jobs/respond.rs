//! The answers about jobs, pure: each builds an `http::Response<Bytes>` (the pipeline maps
//! the body into its own type, `ProxyBody::full`). JSON bodies are serialized from structs,
//! so every string is escaped. Answers about jobs carry `Cache-Control: no-store` — except a
//! finished job's result, which is the upstream's response with its own headers.

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{Response, StatusCode};
use serde::Serialize;

use super::callback::CallbackRefused;
use super::{JobId, JobView, StartError};

/// Names the job on its answers.
pub const JOB_HEADER: HeaderName = HeaderName::from_static("x-edgecache-job");

#[derive(Serialize)]
struct Status<'a> {
    id: String,
    status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    location: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<&'a str>,
}

#[derive(Serialize)]
struct Problem<'a> {
    error: &'a str,
    reason: &'a str,
}

fn json(status: StatusCode, body: Vec<u8>) -> Response<Bytes> {
    let mut resp = Response::new(Bytes::from(body));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

fn to_json(value: &impl Serialize) -> Vec<u8> {
    serde_json::to_vec(value).expect("plain structs serialize")
}

/// The first answer of a request that became job `id`: `202 Accepted`,
/// `Location: /_edgecache/jobs/{id}`, `{"id":…,"status":"pending","location":…}`.
pub fn accepted(id: &JobId) -> Response<Bytes> {
    let location = id.location();
    let mut resp = json(
        StatusCode::ACCEPTED,
        to_json(&Status {
            id: id.to_string(),
            status: "pending",
            location: Some(location.clone()),
            reason: None,
        }),
    );
    let h = resp.headers_mut();
    h.insert(
        header::LOCATION,
        HeaderValue::try_from(location).expect("a path of hex digits"),
    );
    h.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    h.insert(JOB_HEADER, id.header_value());
    resp
}

/// `GET /_edgecache/jobs/{id}`, given what [`super::Jobs::get`] said: pending → `202`
/// `{"id":…,"status":"pending"}` with `Retry-After: 1`; done → the result (its status,
/// headers and body) with `X-Edgecache-Job`; failed → `502` `{"id":…,"status":"failed",
/// "reason":…}`; unknown → [`not_found`]. For `HEAD` the pipeline drops the body as usual.
pub fn job(id: &JobId, view: Option<JobView>) -> Response<Bytes> {
    let mut resp = match view {
        None => return not_found(),
        Some(JobView::Pending { .. }) => {
            let mut resp = json(
                StatusCode::ACCEPTED,
                to_json(&Status {
                    id: id.to_string(),
                    status: "pending",
                    location: None,
                    reason: None,
                }),
            );
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            resp
        }
        Some(JobView::Done(result)) => {
            let mut resp = Response::new(result.body.clone());
            *resp.status_mut() = result.status;
            *resp.headers_mut() = result.headers.clone();
            resp
        }
        Some(JobView::Failed { reason }) => {
            json(StatusCode::BAD_GATEWAY, failed_body(id, &reason).to_vec())
        }
    };
    resp.headers_mut().insert(JOB_HEADER, id.header_value());
    resp
}

/// The JSON of a failed job: its URL's `502` body and its callbacks' body.
pub fn failed_body(id: &JobId, reason: &str) -> Bytes {
    Bytes::from(to_json(&Status {
        id: id.to_string(),
        status: "failed",
        location: None,
        reason: Some(reason),
    }))
}

/// `404` for a job URL naming no job held (unknown, malformed, forgotten, or lost to a
/// restart).
pub fn not_found() -> Response<Bytes> {
    json(
        StatusCode::NOT_FOUND,
        to_json(&Problem {
            error: "unknown job",
            reason: "no such job: unknown, expired, or lost to a restart",
        }),
    )
}

/// `405` for a job URL asked with anything but `GET` or `HEAD`.
pub fn method_not_allowed() -> Response<Bytes> {
    let mut resp = json(
        StatusCode::METHOD_NOT_ALLOWED,
        to_json(&Problem {
            error: "method not allowed",
            reason: "job URLs answer GET and HEAD",
        }),
    );
    resp.headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
    resp
}

/// `400` for a request whose `callback` was refused, before anything went upstream:
/// `{"error":"callback refused","reason":…}`.
pub fn callback_refused(why: &CallbackRefused) -> Response<Bytes> {
    json(
        StatusCode::BAD_REQUEST,
        to_json(&Problem {
            error: "callback refused",
            reason: &why.to_string(),
        }),
    )
}

/// `503` when no job could be made, with `Retry-After` (when the registry is full: until
/// the first job in it goes, in whole seconds, at least 1).
pub fn unavailable(why: &StartError) -> Response<Bytes> {
    let mut resp = json(
        StatusCode::SERVICE_UNAVAILABLE,
        to_json(&Problem {
            error: "no job available",
            reason: &why.to_string(),
        }),
    );
    let secs = match why {
        StartError::Full { retry_after } => retry_after.as_secs_f64().ceil().max(1.0) as u64,
        _ => 1,
    };
    resp.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(secs));
    resp
}
