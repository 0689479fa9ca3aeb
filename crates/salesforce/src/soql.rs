//! Building SOQL safely: string literals with backslash escapes, `IN (...)` lists, and
//! splitting long `IN` lists into several statements that each fit in a GET URL.

use chrono::{DateTime, SecondsFormat, Utc};

/// Default limit for the URL-encoded length of one statement made by [`chunk_in_clauses`]:
/// Salesforce answers 414 when the request URI passes 16,384 bytes. The URI is the request
/// line's target, the path (`/services/data/v59.0/query?q=`, 29 bytes) and the statement; the
/// host travels in its own header. 128 bytes leave room for any API version and path. Every
/// byte given away costs calls: reads of the dirty emails are most of the writer's traffic.
pub const DEFAULT_MAX_ENCODED_LEN: usize = 16_384 - 128;

/// Quotes `value` as a SOQL string literal: `O'Brien` becomes `'O\'Brien'`. Escapes
/// backslash, both quotes, and the control characters `\n \r \t \b \f`.
pub fn quote(value: &str) -> String {
    let mut quoted = String::with_capacity(value.len() + 2);
    quoted.push('\'');
    for character in value.chars() {
        match character {
            '\\' => quoted.push_str("\\\\"),
            '\'' => quoted.push_str("\\'"),
            '"' => quoted.push_str("\\\""),
            '\n' => quoted.push_str("\\n"),
            '\r' => quoted.push_str("\\r"),
            '\t' => quoted.push_str("\\t"),
            '\u{8}' => quoted.push_str("\\b"),
            '\u{c}' => quoted.push_str("\\f"),
            other => quoted.push(other),
        }
    }
    quoted.push('\'');
    quoted
}

/// A parenthesised list of quoted values: `('a','b')`.
pub fn in_list<'a>(values: impl IntoIterator<Item = &'a str>) -> String {
    let quoted: Vec<String> = values.into_iter().map(quote).collect();
    format!("({})", quoted.join(","))
}

/// A SOQL dateTime literal (unquoted, UTC, milliseconds): `2024-05-01T10:00:00.000Z`.
pub fn datetime(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// Length of `text` once form-URL-encoded as the `q` parameter (space as `+`, everything but
/// `A-Za-z0-9*-._` as `%XX` per byte). Encoding is per byte, so lengths add up.
pub fn encoded_len(text: &str) -> usize {
    text.bytes()
        .map(|byte| {
            if byte.is_ascii_alphanumeric() || matches!(byte, b'*' | b'-' | b'.' | b'_' | b' ') {
                1
            } else {
                3
            }
        })
        .sum()
}

/// Splits `values` into statements `{prefix}('v1','v2',...){suffix}` whose URL-encoded length
/// stays within `max_len` ([`DEFAULT_MAX_ENCODED_LEN`] suits GET queries). Every value lands in
/// exactly one statement, in order; a value too long to fit even alone gets a statement of its
/// own (which Salesforce will then refuse). No values, no statements.
pub fn chunk_in_clauses(
    prefix: &str,
    values: &[String],
    suffix: &str,
    max_len: usize,
) -> Vec<String> {
    let mut packer = InClausePacker::new(prefix, suffix, max_len);
    let mut statements: Vec<String> = values
        .iter()
        .filter_map(|value| packer.push(value))
        .collect();
    statements.extend(packer.finish());
    statements
}

/// [`chunk_in_clauses`] one value at a time, for values that arrive as a stream: a statement is
/// handed out as soon as the next value would not fit, so only one partly filled list is held.
#[derive(Clone, Debug)]
pub struct InClausePacker {
    prefix: String,
    suffix: String,
    max_len: usize,
    /// Encoded length of the statement around an empty list.
    fixed: usize,
    /// The quoted values so far, comma-separated (never empty once it holds one: a value is
    /// at least its quotes).
    list: String,
    /// Encoded length of the statement holding `list`.
    len: usize,
}

impl InClausePacker {
    /// Packs into `{prefix}(...){suffix}` statements of at most `max_len` encoded bytes.
    pub fn new(prefix: &str, suffix: &str, max_len: usize) -> Self {
        let fixed = encoded_len(prefix) + encoded_len("()") + encoded_len(suffix);
        Self {
            prefix: prefix.to_owned(),
            suffix: suffix.to_owned(),
            max_len,
            fixed,
            list: String::new(),
            len: fixed,
        }
    }

    /// Adds `value`; returns the statement of the values before it when `value` did not fit.
    pub fn push(&mut self, value: &str) -> Option<String> {
        let quoted = quote(value);
        let added = encoded_len(&quoted);
        let full = if !self.list.is_empty() && self.len + encoded_len(",") + added > self.max_len {
            self.finish()
        } else {
            None
        };
        if !self.list.is_empty() {
            self.list.push(',');
            self.len += encoded_len(",");
        }
        self.list.push_str(&quoted);
        self.len += added;
        full
    }

    /// The statement of the values not handed out yet, if any; the packer starts over empty.
    pub fn finish(&mut self) -> Option<String> {
        if self.list.is_empty() {
            return None;
        }
        let statement = format!("{}({}){}", self.prefix, self.list, self.suffix);
        self.list.clear();
        self.len = self.fixed;
        Some(statement)
    }
}

/// Reads one literal starting at `text[0] == '\''` the way Salesforce's lexer does;
/// returns the value and the rest after the closing quote.
fn unquote(text: &str) -> Option<(String, &str)> {
    let mut chars = text.char_indices();
    if chars.next()?.1 != '\'' {
        return None;
    }
    let mut value = String::new();
    while let Some((position, character)) = chars.next() {
        match character {
            '\'' => return Some((value, &text[position + 1..])),
            '\\' => value.push(match chars.next()?.1 {
                'n' => '\n',
                'r' => '\r',
                't' => '\t',
                'b' => '\u{8}',
                'f' => '\u{c}',
                other @ ('\\' | '\'' | '"') => other,
                _ => return None,
            }),
            other => value.push(other),
        }
    }
    None
}

/// The string literals of a statement, as Salesforce's lexer reads them, or `None` when a literal
/// is unterminated or holds an unknown escape. The oracle of the injection tests: a statement built
/// with [`quote`] around a value must yield exactly that value, whatever the value holds.
pub fn literals(statement: &str) -> Option<Vec<String>> {
    let mut found = Vec::new();
    let mut rest = statement;
    while let Some(start) = rest.find('\'') {
        let (value, after) = unquote(&rest[start..])?;
        found.push(value);
        rest = after;
    }
    Some(found)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn nasty_email() -> impl Strategy<Value = String> {
        prop_oneof![
            any::<String>(),
            "[a-z'\"\\\\ \n\r\t%_()=,]{0,40}@[a-z.']{1,20}",
            Just("x' OR Email != '".to_owned()),
            Just("\\' OR Id != null OR Email = \\'".to_owned()),
            ".{200,400}",
        ]
    }

    #[test]
    fn quotes_obrien_with_a_backslash() {
        assert_eq!(quote("O'Brien"), "'O\\'Brien'");
        assert_eq!(quote("a\\b"), "'a\\\\b'");
        assert_eq!(in_list(["a@x.com", "b@y.com"]), "('a@x.com','b@y.com')");
    }

    #[test]
    fn formats_datetime_literals_in_utc_with_millis() {
        let at = DateTime::parse_from_rfc3339("2024-05-01T10:00:00+02:00")
            .expect("valid")
            .with_timezone(&Utc);
        assert_eq!(datetime(at), "2024-05-01T08:00:00.000Z");
    }

    proptest! {
        #[test]
        fn no_email_breaks_out_of_its_literal(email in nasty_email()) {
            let quoted = quote(&email);
            let (value, rest) = unquote(&quoted).expect("quoted literal parses");
            prop_assert_eq!(&value, &email);
            prop_assert!(rest.is_empty());
            let statement = format!("SELECT Id FROM Contact WHERE Email = {quoted} AND IsDeleted = false");
            prop_assert_eq!(literals(&statement).expect("lexes"), vec![email]);
        }

        #[test]
        fn in_lists_hold_exactly_their_values(emails in proptest::collection::vec(nasty_email(), 0..20)) {
            let statement = format!("SELECT Id FROM Lead WHERE Email IN {}", in_list(emails.iter().map(String::as_str)));
            prop_assert_eq!(literals(&statement).expect("lexes"), emails);
        }

        #[test]
        fn chunks_keep_every_value_once_and_fit(
            emails in proptest::collection::vec("[a-z0-9.+'%]{1,60}@[a-z]{1,20}\\.com", 0..400),
            max_len in 600usize..4_000,
        ) {
            let prefix = "SELECT Id, Email FROM Contact WHERE Email IN ";
            let suffix = " AND IsDeleted = false";
            let statements = chunk_in_clauses(prefix, &emails, suffix, max_len);
            let mut seen = Vec::new();
            for statement in &statements {
                prop_assert!(encoded_len(statement) <= max_len, "statement too long: {}", encoded_len(statement));
                prop_assert!(statement.starts_with(prefix) && statement.ends_with(suffix));
                seen.extend(literals(statement).expect("lexes"));
            }
            prop_assert_eq!(seen, emails);
        }
    }
}
