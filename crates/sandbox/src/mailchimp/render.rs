//! JSON shapes of Mailchimp answers: members, lists, webhooks; timestamps; and the
//! `fields` / `exclude_fields` projection.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, NaiveDateTime, Utc};
use serde::Serialize;
use serde_json::{Map, Value, json};

use super::store::{ListState, MemberRecord, MergeFields, Status, full_name};

/// `2021-03-02T19:04:19+00:00`, or `""` for 0 (unset).
pub(crate) fn time(micros: i64) -> String {
    if micros == 0 {
        return String::new();
    }
    DateTime::<Utc>::from_timestamp_micros(micros)
        .map(|time| time.format("%Y-%m-%dT%H:%M:%S+00:00").to_string())
        .unwrap_or_default()
}

/// Parses a timestamp query parameter to microseconds. Accepts RFC 3339 (a `+` that arrived
/// unencoded as a space too) and a bare `YYYY-MM-DD HH:MM:SS` / `YYYY-MM-DDTHH:MM:SS` as UTC.
pub(crate) fn parse_time(text: &str) -> Option<i64> {
    let text = text.trim();
    if let Ok(time) = DateTime::parse_from_rfc3339(text) {
        return Some(time.timestamp_micros());
    }
    if let Some((head, offset)) = text.rsplit_once(' ')
        && let Ok(time) = DateTime::parse_from_rfc3339(&format!("{head}+{offset}"))
    {
        return Some(time.timestamp_micros());
    }
    for format in ["%Y-%m-%d %H:%M:%S", "%Y-%m-%dT%H:%M:%S"] {
        if let Ok(time) = NaiveDateTime::parse_from_str(text, format) {
            return Some(time.and_utc().timestamp_micros());
        }
    }
    None
}

#[derive(Serialize)]
struct Link {
    rel: &'static str,
    href: String,
    method: &'static str,
    #[serde(rename = "targetSchema", skip_serializing_if = "Option::is_none")]
    target_schema: Option<&'static str>,
}

// Plain structs rather than `json!` values: pages of 1000 members are serialized often.
#[derive(Serialize)]
struct MemberStats {
    avg_open_rate: f64,
    avg_click_rate: f64,
}

#[derive(Serialize, Default)]
struct Location {
    latitude: f64,
    longitude: f64,
    gmtoff: i32,
    dstoff: i32,
    country_code: &'static str,
    timezone: &'static str,
    region: &'static str,
}

#[derive(Serialize)]
struct Tag<'a> {
    id: usize,
    name: &'a str,
}

/// A member as Mailchimp serializes it. `_links` only on single-member answers, to keep pages of
/// 1000 members small.
#[derive(Serialize)]
pub(crate) struct MemberView<'a> {
    id: String,
    email_address: &'a str,
    unique_email_id: String,
    contact_id: String,
    full_name: String,
    web_id: u32,
    email_type: &'a str,
    status: Status,
    unsubscribe_reason: &'a str,
    consents_to_one_to_one_messaging: bool,
    merge_fields: &'a MergeFields,
    interests: Map<String, Value>,
    stats: MemberStats,
    ip_signup: &'a str,
    timestamp_signup: String,
    ip_opt: &'a str,
    timestamp_opt: String,
    member_rating: u8,
    last_changed: String,
    language: &'a str,
    vip: bool,
    email_client: &'static str,
    location: Location,
    marketing_permissions: [Value; 0],
    source: &'a str,
    tags_count: usize,
    tags: Vec<Tag<'a>>,
    list_id: &'a str,
    #[serde(rename = "_links", skip_serializing_if = "Option::is_none")]
    links: Option<Vec<Link>>,
}

impl<'a> MemberView<'a> {
    pub(crate) fn new(member: &'a MemberRecord, list_id: &'a str, with_links: bool) -> Self {
        let id = member.hash_hex();
        let links = with_links.then(|| {
            let base = format!("https://us1.api.mailchimp.com/3.0/lists/{list_id}/members");
            let this = format!("{base}/{id}");
            vec![
                Link {
                    rel: "self",
                    href: this.clone(),
                    method: "GET",
                    target_schema: None,
                },
                Link {
                    rel: "parent",
                    href: base,
                    method: "GET",
                    target_schema: None,
                },
                Link {
                    rel: "update",
                    href: this.clone(),
                    method: "PATCH",
                    target_schema: None,
                },
                Link {
                    rel: "upsert",
                    href: this.clone(),
                    method: "PUT",
                    target_schema: None,
                },
                Link {
                    rel: "delete",
                    href: this.clone(),
                    method: "DELETE",
                    target_schema: None,
                },
                Link {
                    rel: "delete_permanent",
                    href: format!("{this}/actions/delete-permanent"),
                    method: "POST",
                    target_schema: None,
                },
            ]
        });
        let contact_id = hex::encode(<md5::Md5 as md5::Digest>::digest(
            [b"contact:".as_slice(), &member.hash].concat(),
        ));
        Self {
            id,
            email_address: &member.email,
            unique_email_id: member.unique_email_id_hex(),
            contact_id,
            full_name: full_name(member),
            web_id: member.web_id,
            email_type: member.email_type,
            status: member.status,
            unsubscribe_reason: &member.unsubscribe_reason,
            consents_to_one_to_one_messaging: true,
            merge_fields: &member.merge_fields,
            interests: Map::new(),
            stats: MemberStats {
                avg_open_rate: 0.0,
                avg_click_rate: 0.0,
            },
            ip_signup: &member.ip_signup,
            timestamp_signup: time(member.timestamp_signup),
            ip_opt: &member.ip_opt,
            timestamp_opt: time(member.timestamp_opt),
            member_rating: member.member_rating,
            last_changed: time(member.last_changed),
            language: &member.language,
            vip: member.vip,
            email_client: "",
            location: Location::default(),
            marketing_permissions: [],
            source: member.source,
            tags_count: member.tags.len(),
            tags: member
                .tags
                .iter()
                .enumerate()
                .map(|(index, name)| Tag {
                    id: index + 1,
                    name,
                })
                .collect(),
            list_id,
            links,
        }
    }
}

/// A list (audience) with its stats.
pub(crate) fn list_json(list: &ListState) -> Value {
    let subscribed = list.count(Status::Subscribed);
    let unsubscribed = list.count(Status::Unsubscribed);
    let cleaned = list.count(Status::Cleaned);
    let audience = subscribed + unsubscribed + cleaned;
    let rate = |part: u64| {
        if audience == 0 {
            0.0
        } else {
            part as f64 * 100.0 / audience as f64
        }
    };
    json!({
        "id": list.id,
        "web_id": list.web_id,
        "name": list.name,
        "contact": {
            "company": "Optout Sandbox", "address1": "675 Ponce de Leon Ave NE", "address2": "Suite 5000",
            "city": "Atlanta", "state": "GA", "zip": "30308", "country": "US", "phone": ""
        },
        "permission_reminder": "You are receiving this email because you opted in via our website.",
        "use_archive_bar": true,
        "campaign_defaults": {
            "from_name": "Optout Sandbox", "from_email": "news@example.com", "subject": "", "language": "en"
        },
        "notify_on_subscribe": "",
        "notify_on_unsubscribe": "",
        "date_created": time(list.date_created),
        "list_rating": 0,
        "email_type_option": false,
        "subscribe_url_short": format!("http://eepurl.com/{}", &list.id[..6.min(list.id.len())]),
        "subscribe_url_long": format!("https://example.us1.list-manage.com/subscribe?u=0&id={}", list.id),
        "beamer_address": format!("us1-{}@inbound.mailchimp.com", list.id),
        "visibility": "prv",
        "double_optin": false,
        "has_welcome": false,
        "marketing_permissions": false,
        "modules": [],
        "stats": {
            "member_count": subscribed,
            "total_contacts": list.total(),
            "unsubscribe_count": unsubscribed,
            "cleaned_count": cleaned,
            "member_count_since_send": subscribed,
            "unsubscribe_count_since_send": unsubscribed,
            "cleaned_count_since_send": cleaned,
            "campaign_count": 0,
            "campaign_last_sent": "",
            "merge_field_count": 2,
            "avg_sub_rate": rate(subscribed),
            "avg_unsub_rate": rate(unsubscribed),
            "target_sub_rate": 0,
            "open_rate": 0,
            "click_rate": 0,
            "last_sub_date": time(list.last_sub),
            "last_unsub_date": time(list.last_unsub),
        },
        "_links": [
            {"rel": "self", "href": format!("https://us1.api.mailchimp.com/3.0/lists/{}", list.id), "method": "GET"},
            {"rel": "members", "href": format!("https://us1.api.mailchimp.com/3.0/lists/{}/members", list.id), "method": "GET"},
        ],
    })
}

/// The `fields` / `exclude_fields` of a request, comma separated with dot notation.
#[derive(Debug, Default, Clone)]
pub(crate) struct Projection {
    pub(crate) fields: Option<Vec<String>>,
    pub(crate) exclude: Option<Vec<String>>,
}

impl Projection {
    pub(crate) fn from_params(params: &[(String, String)]) -> Self {
        let collect = |key: &str| {
            let values: Vec<String> = params
                .iter()
                .filter(|(name, _)| name == key || name == &format!("{key}[]"))
                .flat_map(|(_, value)| value.split(','))
                .map(|field| field.trim().to_owned())
                .filter(|field| !field.is_empty())
                .collect();
            (!values.is_empty()).then_some(values)
        };
        Self {
            fields: collect("fields"),
            exclude: collect("exclude_fields"),
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.fields.is_none() && self.exclude.is_none()
    }

    /// Keeps only `fields` (when given), then drops `exclude_fields`.
    pub(crate) fn apply(&self, value: &mut Value) {
        if let Some(fields) = &self.fields {
            let paths: Vec<Vec<&str>> = fields.iter().map(|f| f.split('.').collect()).collect();
            keep(value, &paths.iter().map(Vec::as_slice).collect::<Vec<_>>());
        }
        if let Some(exclude) = &self.exclude {
            for field in exclude {
                let path: Vec<&str> = field.split('.').collect();
                remove(value, &path);
            }
        }
    }
}

fn keep(value: &mut Value, paths: &[&[&str]]) {
    match value {
        Value::Array(items) => items.iter_mut().for_each(|item| keep(item, paths)),
        Value::Object(object) => {
            let keys: Vec<String> = object.keys().cloned().collect();
            for key in keys {
                let below: Vec<&[&str]> = paths
                    .iter()
                    .filter(|path| path.first() == Some(&key.as_str()))
                    .map(|path| &path[1..])
                    .collect();
                if below.is_empty() {
                    object.remove(&key);
                } else if below.iter().all(|rest| !rest.is_empty())
                    && let Some(child) = object.get_mut(&key)
                {
                    keep(child, &below);
                }
            }
        }
        _ => {}
    }
}

fn remove(value: &mut Value, path: &[&str]) {
    match value {
        Value::Array(items) => items.iter_mut().for_each(|item| remove(item, path)),
        Value::Object(object) => match path {
            [] => {}
            [last] => {
                object.remove(*last);
            }
            [first, rest @ ..] => {
                if let Some(child) = object.get_mut(*first) {
                    remove(child, rest);
                }
            }
        },
        _ => {}
    }
}

/// A 200 `application/json; charset=utf-8` answer, projected when asked.
pub(crate) fn json_response<T: Serialize>(body: &T, projection: &Projection) -> Response {
    let bytes = if projection.is_empty() {
        serde_json::to_vec(body)
    } else {
        serde_json::to_value(body).and_then(|mut value| {
            projection.apply(&mut value);
            serde_json::to_vec(&value)
        })
    };
    match bytes {
        Ok(bytes) => {
            let mut response = (StatusCode::OK, bytes).into_response();
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json; charset=utf-8"),
            );
            response
        }
        Err(error) => super::problem::Problem::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "Internal Server Error",
            format!("failed to serialize the answer: {error}"),
        )
        .into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn projects_dot_paths_through_arrays() {
        let mut value = json!({"members": [{"email_address": "a", "status": "s", "stats": {"x": 1, "y": 2}}], "total_items": 1, "list_id": "l"});
        Projection {
            fields: Some(vec![
                "members.email_address".into(),
                "members.stats.x".into(),
                "total_items".into(),
            ]),
            exclude: None,
        }
        .apply(&mut value);
        assert_eq!(
            value,
            json!({"members": [{"email_address": "a", "stats": {"x": 1}}], "total_items": 1})
        );
        Projection {
            fields: None,
            exclude: Some(vec!["members.stats".into()]),
        }
        .apply(&mut value);
        assert_eq!(
            value,
            json!({"members": [{"email_address": "a"}], "total_items": 1})
        );
    }

    #[test]
    fn formats_and_parses_mailchimp_timestamps() {
        let micros = parse_time("2021-03-02T19:04:19+00:00").expect("rfc3339");
        assert_eq!(time(micros), "2021-03-02T19:04:19+00:00");
        assert_eq!(parse_time("2021-03-02T19:04:19 00:00"), Some(micros));
        assert_eq!(parse_time("2021-03-02 19:04:19"), Some(micros));
        assert_eq!(time(0), "");
    }
}
