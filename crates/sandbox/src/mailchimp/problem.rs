//! Mailchimp's error envelope: `application/problem+json` with `type`, `title`, `status`,
//! `detail` and `instance`, the instance repeated in `X-Request-Id`.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

/// The `type` URI Mailchimp currently sends.
const PROBLEM_TYPE: &str = "https://mailchimp.com/developer/marketing/docs/errors/";

/// A problem answer under construction.
#[derive(Debug, Clone)]
pub(crate) struct Problem {
    pub(crate) status: StatusCode,
    pub(crate) title: &'static str,
    pub(crate) detail: String,
    pub(crate) errors: Option<serde_json::Value>,
    pub(crate) allow: Option<&'static str>,
}

impl Problem {
    pub(crate) fn new(status: StatusCode, title: &'static str, detail: impl Into<String>) -> Self {
        Self {
            status,
            title,
            detail: detail.into(),
            errors: None,
            allow: None,
        }
    }

    pub(crate) fn not_found() -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "Resource Not Found",
            "The requested resource could not be found.",
        )
    }

    pub(crate) fn invalid(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "Invalid Resource", detail)
    }

    pub(crate) fn bad_request(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "Bad Request", detail)
    }

    pub(crate) fn compliance(email: &str) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "Member In Compliance State",
            format!(
                "{email} is in a compliance state due to unsubscribe, bounce, or compliance \
                 review and cannot be subscribed."
            ),
        )
    }

    pub(crate) fn forgotten(email: &str) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "Forgotten Email Not Subscribed",
            format!(
                "{email} was permanently deleted and cannot be re-imported. The contact must \
                 re-subscribe to get back on the list."
            ),
        )
    }

    pub(crate) fn exists(email: &str) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "Member Exists",
            format!("{email} is already a list member. Use PUT to insert or update list members."),
        )
    }

    pub(crate) fn too_many_requests() -> Self {
        Self::new(
            StatusCode::TOO_MANY_REQUESTS,
            "Too Many Requests",
            "You have exceeded the limit of 10 simultaneous connections.",
        )
    }

    pub(crate) fn with_errors(mut self, errors: serde_json::Value) -> Self {
        self.errors = Some(errors);
        self
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let instance = uuid::Uuid::new_v4().to_string();
        let mut body = json!({
            "type": PROBLEM_TYPE,
            "title": self.title,
            "status": self.status.as_u16(),
            "detail": self.detail,
            "instance": instance,
        });
        if let (Some(errors), Some(object)) = (self.errors, body.as_object_mut()) {
            object.insert("errors".to_owned(), errors);
        }
        let mut response = (self.status, body.to_string()).into_response();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json; charset=utf-8"),
        );
        if let Ok(value) = HeaderValue::from_str(&instance) {
            headers.insert("x-request-id", value);
        }
        headers.insert(
            header::LINK,
            HeaderValue::from_static(
                "<https://us1.api.mailchimp.com/schema/3.0/Definitions/ProblemDetailDocument.json>; rel=\"describedBy\"",
            ),
        );
        if let Some(allow) = self.allow {
            headers.insert(header::ALLOW, HeaderValue::from_static(allow));
        }
        response
    }
}
