//! A parser for `application/x-www-form-urlencoded` bodies with PHP-style bracket keys, the format of
//! Mailchimp's list webhooks: `data[merges][ADDRESS][addr1]=...` nests to any depth (up to a bound),
//! `a[]=x` appends, and a repeated key keeps its last value (as PHP and most frameworks do; Mailchimp's
//! own samples repeat `data[reason]`).
//!
//! The parser is total: any input yields a tree or a [`FormError`], never a panic. Bounds on the body
//! size, the number of fields and the nesting depth keep a hostile body from costing much.

use std::collections::BTreeMap;

/// Largest body accepted (Mailchimp's payloads are a few hundred bytes; merge fields add a little).
pub const MAX_BODY_BYTES: usize = 64 * 1024;
/// Most `key=value` pairs accepted.
pub const MAX_FIELDS: usize = 1000;
/// Deepest bracket nesting accepted (PHP's default `max_input_nesting_level` is 64).
pub const MAX_DEPTH: usize = 32;

/// Why a body was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FormError {
    /// The body is larger than [`MAX_BODY_BYTES`].
    #[error("form body larger than {MAX_BODY_BYTES} bytes")]
    TooLarge,
    /// More than [`MAX_FIELDS`] pairs.
    #[error("form has more than {MAX_FIELDS} fields")]
    TooManyFields,
    /// A key nests deeper than [`MAX_DEPTH`].
    #[error("form key nests deeper than {MAX_DEPTH} levels")]
    TooDeep,
}

/// One node of a parsed form: a value, or named children.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FormValue {
    /// A leaf value.
    Text(String),
    /// Children by key (numeric keys of `[]` appends are decimal strings).
    Map(BTreeMap<String, FormValue>),
}

impl FormValue {
    /// The text of a leaf, `None` for a map.
    pub fn as_text(&self) -> Option<&str> {
        match self {
            FormValue::Text(text) => Some(text),
            FormValue::Map(_) => None,
        }
    }
}

/// A parsed form: top-level keys to values.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Form {
    root: BTreeMap<String, FormValue>,
}

impl Form {
    /// Parses a form body. Invalid percent-escapes and invalid UTF-8 are decoded lossily (U+FFFD);
    /// pairs with an empty name are ignored, as PHP does.
    pub fn parse(body: &[u8]) -> Result<Self, FormError> {
        if body.len() > MAX_BODY_BYTES {
            return Err(FormError::TooLarge);
        }
        let mut form = Form::default();
        for (count, (key, value)) in url::form_urlencoded::parse(body).enumerate() {
            if count >= MAX_FIELDS {
                return Err(FormError::TooManyFields);
            }
            let path = split_key(&key)?;
            form.insert(&path, value.into_owned());
        }
        Ok(form)
    }

    /// The node at `path` (`["data", "merges", "EMAIL"]`).
    pub fn node(&self, path: &[&str]) -> Option<&FormValue> {
        let (first, rest) = path.split_first()?;
        let mut node = self.root.get(*first)?;
        for segment in rest {
            match node {
                FormValue::Map(children) => node = children.get(*segment)?,
                FormValue::Text(_) => return None,
            }
        }
        Some(node)
    }

    /// The text at `path`, `None` when absent or a map.
    pub fn text(&self, path: &[&str]) -> Option<&str> {
        self.node(path).and_then(FormValue::as_text)
    }

    /// Whether the form has no fields.
    pub fn is_empty(&self) -> bool {
        self.root.is_empty()
    }

    fn insert(&mut self, path: &[Segment], value: String) {
        let Some((first, rest)) = path.split_first() else {
            return;
        };
        let key = match first {
            Segment::Name(name) if !name.is_empty() => name.clone(),
            // An empty or `[]` top-level name: PHP drops the pair.
            _ => return,
        };
        insert_into(&mut self.root, key, rest, value);
    }
}

/// One step of a key path.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Segment {
    Name(String),
    /// `[]`: the next numeric index.
    Append,
}

fn insert_into(
    map: &mut BTreeMap<String, FormValue>,
    key: String,
    rest: &[Segment],
    value: String,
) {
    let Some((next, deeper)) = rest.split_first() else {
        // Last wins: a repeated key (or a key that was a map) takes the new value.
        map.insert(key, FormValue::Text(value));
        return;
    };
    let child = map
        .entry(key)
        .or_insert_with(|| FormValue::Map(BTreeMap::new()));
    if let FormValue::Text(_) = child {
        // `a=1&a[b]=2`: the later, nested assignment wins.
        *child = FormValue::Map(BTreeMap::new());
    }
    let FormValue::Map(children) = child else {
        return;
    };
    let next_key = match next {
        Segment::Name(name) => name.clone(),
        Segment::Append => next_index(children).to_string(),
    };
    insert_into(children, next_key, deeper, value);
}

/// PHP appends at one past the largest integer key.
fn next_index(children: &BTreeMap<String, FormValue>) -> u64 {
    children
        .keys()
        .filter_map(|key| key.parse::<u64>().ok())
        .max()
        .map_or(0, |max| max.saturating_add(1))
}

/// Splits `data[merges][EMAIL]` into `data`, `merges`, `EMAIL`. Like PHP, a `[` without its `]`
/// ends the bracket part and the rest of the key is ignored; text after a `]` that does not open a
/// new bracket is ignored too.
fn split_key(key: &str) -> Result<Vec<Segment>, FormError> {
    let (base, mut rest) = match key.find('[') {
        // A name starting with `[` has no base: PHP keeps the whole key as a name then.
        Some(0) | None => return Ok(vec![Segment::Name(key.to_owned())]),
        Some(index) => (&key[..index], &key[index..]),
    };
    let mut path = vec![Segment::Name(base.to_owned())];
    while let Some(after_open) = rest.strip_prefix('[') {
        let Some(close) = after_open.find(']') else {
            break;
        };
        if path.len() > MAX_DEPTH {
            return Err(FormError::TooDeep);
        }
        let inner = &after_open[..close];
        path.push(if inner.is_empty() {
            Segment::Append
        } else {
            Segment::Name(inner.to_owned())
        });
        rest = &after_open[close + 1..];
    }
    Ok(path)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const UNSUBSCRIBE: &str = "type=unsubscribe&fired_at=2009-03-26+21%3A40%3A57&data%5Baction%5D=unsub\
        &data%5Breason%5D=manual&data%5Bid%5D=8a25ff1d98&data%5Blist_id%5D=a6b5da1054\
        &data%5Bemail%5D=api%2Bunsub%40mailchimp.com&data%5Bemail_type%5D=html\
        &data%5Bmerges%5D%5BEMAIL%5D=api%2Bunsub%40mailchimp.com&data%5Bmerges%5D%5BFNAME%5D=Mailchimp\
        &data%5Bip_opt%5D=10.20.10.30&data%5Bcampaign_id%5D=cb398d21d2";

    #[test]
    fn parses_mailchimps_unsubscribe_sample() {
        let form = Form::parse(UNSUBSCRIBE.as_bytes()).expect("parses");
        assert_eq!(form.text(&["type"]), Some("unsubscribe"));
        assert_eq!(form.text(&["fired_at"]), Some("2009-03-26 21:40:57"));
        assert_eq!(
            form.text(&["data", "email"]),
            Some("api+unsub@mailchimp.com")
        );
        assert_eq!(form.text(&["data", "merges", "FNAME"]), Some("Mailchimp"));
        assert_eq!(form.text(&["data", "list_id"]), Some("a6b5da1054"));
    }

    #[test]
    fn nests_bracket_keys_to_any_depth() {
        let form = Form::parse(
            b"data[merges][ADDRESS][addr1]=1+Main&data[merges][GROUPINGS][0][groups]=A,B&a[b][c][d][e][f]=deep",
        )
        .expect("parses");
        assert_eq!(
            form.text(&["data", "merges", "ADDRESS", "addr1"]),
            Some("1 Main")
        );
        assert_eq!(
            form.text(&["data", "merges", "GROUPINGS", "0", "groups"]),
            Some("A,B")
        );
        assert_eq!(form.text(&["a", "b", "c", "d", "e", "f"]), Some("deep"));
        assert!(form.text(&["data", "merges"]).is_none(), "a map is no text");
    }

    #[test]
    fn keeps_the_last_of_repeated_keys() {
        let form =
            Form::parse(b"data[reason]=manual&data[reason]=hard&type=a&type=b").expect("parses");
        assert_eq!(form.text(&["data", "reason"]), Some("hard"));
        assert_eq!(form.text(&["type"]), Some("b"));
    }

    #[test]
    fn appends_empty_brackets_as_numeric_indexes() {
        let form = Form::parse(b"tags[]=a&tags[]=b&tags[7]=c&tags[]=d").expect("parses");
        assert_eq!(form.text(&["tags", "0"]), Some("a"));
        assert_eq!(form.text(&["tags", "1"]), Some("b"));
        assert_eq!(form.text(&["tags", "8"]), Some("d"));
    }

    #[test]
    fn tolerates_unbalanced_brackets_and_empty_names() {
        let form = Form::parse(b"a[b=1&c]d=2&=3&[x]=4&e[f]g=5&h[i][=6").expect("parses");
        assert_eq!(form.text(&["a[b"]), None);
        assert_eq!(
            form.text(&["a"]),
            Some("1"),
            "an unclosed bracket ends the key"
        );
        assert_eq!(form.text(&["c]d"]), Some("2"));
        assert_eq!(form.text(&["[x]"]), Some("4"));
        assert_eq!(form.text(&["e", "f"]), Some("5"));
        assert_eq!(form.text(&["h", "i"]), Some("6"));
    }

    #[test]
    fn a_later_nested_key_replaces_a_value_and_the_other_way_round() {
        let form = Form::parse(b"a=1&a[b]=2").expect("parses");
        assert_eq!(form.text(&["a", "b"]), Some("2"));
        let form = Form::parse(b"a[b]=2&a=1").expect("parses");
        assert_eq!(form.text(&["a"]), Some("1"));
    }

    #[test]
    fn refuses_bodies_over_the_limits() {
        assert_eq!(
            Form::parse(&vec![b'a'; MAX_BODY_BYTES + 1]),
            Err(FormError::TooLarge)
        );
        let many = "a=1&".repeat(MAX_FIELDS + 1);
        assert_eq!(Form::parse(many.as_bytes()), Err(FormError::TooManyFields));
        let deep = format!("a{}=1", "[x]".repeat(MAX_DEPTH + 1));
        assert_eq!(Form::parse(deep.as_bytes()), Err(FormError::TooDeep));
        let at_limit = format!("a{}=1", "[x]".repeat(MAX_DEPTH));
        assert!(Form::parse(at_limit.as_bytes()).is_ok());
    }

    #[test]
    fn decodes_invalid_escapes_and_utf8_lossily() {
        let form = Form::parse(b"a=%ZZ%FF%e2%82&b=caf%C3%A9").expect("parses");
        assert!(form.text(&["a"]).is_some());
        assert_eq!(form.text(&["b"]), Some("café"));
    }

    proptest! {
        #[test]
        fn never_panics_on_arbitrary_bytes(body in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let _ = Form::parse(&body);
        }

        #[test]
        fn never_panics_on_bracket_heavy_text(body in "[a-z\\[\\]=&%0-9+]{0,400}") {
            let _ = Form::parse(body.as_bytes());
        }

        #[test]
        fn round_trips_simple_nested_keys(
            path in proptest::collection::vec("[a-zA-Z0-9_]{1,8}", 1..6),
            value in "\\PC{0,20}",
        ) {
            let key = match path.split_first() {
                Some((first, rest)) => format!("{first}{}", rest.iter().map(|s| format!("[{s}]")).collect::<String>()),
                None => unreachable!("at least one segment"),
            };
            let body = url::form_urlencoded::Serializer::new(String::new()).append_pair(&key, &value).finish();
            let form = Form::parse(body.as_bytes()).expect("parses");
            let segments: Vec<&str> = path.iter().map(String::as_str).collect();
            prop_assert_eq!(form.text(&segments), Some(value.as_str()));
        }
    }
}
