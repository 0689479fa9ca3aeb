//! Mailchimp's timestamp wire format: `2021-03-02T19:04:19+00:00`, and `""` when unset.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Deserializer, Serializer};

/// Formats a time the way Mailchimp writes and accepts it.
pub(crate) fn format(time: &DateTime<Utc>) -> String {
    time.format("%Y-%m-%dT%H:%M:%S+00:00").to_string()
}

/// Serde for `Option<DateTime<Utc>>` fields that Mailchimp sends as `""` when unset.
pub(crate) mod optional {
    use super::*;

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<DateTime<Utc>>, D::Error> {
        let text: Option<String> = Option::deserialize(deserializer)?;
        match text.as_deref().map(str::trim) {
            None | Some("") => Ok(None),
            Some(text) => DateTime::parse_from_rfc3339(text)
                .map(|time| Some(time.with_timezone(&Utc)))
                .map_err(serde::de::Error::custom),
        }
    }

    pub(crate) fn serialize<S: Serializer>(
        time: &Option<DateTime<Utc>>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        match time {
            Some(time) => serializer.serialize_str(&super::format(time)),
            None => serializer.serialize_str(""),
        }
    }
}
