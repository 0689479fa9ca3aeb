//! Reading and writing the AMQP headers this crate relies on.

use std::time::{SystemTime, UNIX_EPOCH};

use lapin::types::{AMQPValue, FieldTable, LongString};

/// Milliseconds since the unix epoch, now.
pub(crate) fn now_unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| i64::try_from(elapsed.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// A header as a string, whichever string type the sender used.
pub(crate) fn string(headers: &FieldTable, key: &str) -> Option<String> {
    match headers.inner().get(key)? {
        AMQPValue::LongString(value) => {
            Some(String::from_utf8_lossy(value.as_bytes()).into_owned())
        }
        AMQPValue::ShortString(value) => Some(value.as_str().to_owned()),
        _ => None,
    }
}

/// A header as an integer, whichever integer type the sender used.
pub(crate) fn integer(headers: &FieldTable, key: &str) -> Option<i64> {
    integer_value(headers.inner().get(key)?)
}

pub(crate) fn integer_value(value: &AMQPValue) -> Option<i64> {
    match value {
        AMQPValue::ShortShortInt(value) => Some(i64::from(*value)),
        AMQPValue::ShortShortUInt(value) => Some(i64::from(*value)),
        AMQPValue::ShortInt(value) => Some(i64::from(*value)),
        AMQPValue::ShortUInt(value) => Some(i64::from(*value)),
        AMQPValue::LongInt(value) => Some(i64::from(*value)),
        AMQPValue::LongUInt(value) => Some(i64::from(*value)),
        AMQPValue::LongLongInt(value) => Some(*value),
        AMQPValue::Timestamp(value) => i64::try_from(*value).ok(),
        _ => None,
    }
}

pub(crate) fn insert_string(headers: &mut FieldTable, key: &str, value: &str) {
    headers.insert(key.into(), AMQPValue::LongString(LongString::from(value)));
}

pub(crate) fn insert_integer(headers: &mut FieldTable, key: &str, value: i64) {
    headers.insert(key.into(), AMQPValue::LongLongInt(value));
}

/// The first entry of RabbitMQ's `x-death` header (the most recent dead-lettering), if any.
pub(crate) fn first_death(headers: &FieldTable) -> Option<&FieldTable> {
    match headers.inner().get("x-death")? {
        AMQPValue::FieldArray(deaths) => match deaths.as_slice().first()? {
            AMQPValue::FieldTable(death) => Some(death),
            _ => None,
        },
        _ => None,
    }
}

/// The first routing key recorded in an `x-death` entry.
pub(crate) fn death_routing_key(death: &FieldTable) -> Option<String> {
    match death.inner().get("routing-keys")? {
        AMQPValue::FieldArray(keys) => match keys.as_slice().first()? {
            AMQPValue::LongString(key) => {
                Some(String::from_utf8_lossy(key.as_bytes()).into_owned())
            }
            AMQPValue::ShortString(key) => Some(key.as_str().to_owned()),
            _ => None,
        },
        _ => None,
    }
}

/// The time of an `x-death` entry in unix milliseconds (AMQP timestamps are seconds).
pub(crate) fn death_time_ms(death: &FieldTable) -> Option<i64> {
    match death.inner().get("time")? {
        AMQPValue::Timestamp(seconds) => i64::try_from(*seconds).ok().map(|seconds| seconds * 1000),
        other => integer_value(other).map(|seconds| seconds * 1000),
    }
}
