//! The subset of SOQL the sandbox understands:
//! `SELECT f1, f2 FROM Contact|Lead|Account [WHERE cond] [ORDER BY f [ASC|DESC] [NULLS FIRST|LAST]]
//! [LIMIT n] [OFFSET n]` with `=`, `!=`, `<>`, `<`, `>`, `<=`, `>=`, `[NOT] IN (...)`, `LIKE`,
//! `AND`, `OR`, `NOT`, parentheses, and string (backslash escapes), boolean, null, number and
//! datetime literals. String comparisons ignore case, as Salesforce's do.

use std::cmp::Ordering;
use std::collections::HashSet;

use chrono::{DateTime, NaiveDate};

use super::store::{Field, FieldKind, Object, OrgData, Value};

/// Why a statement was refused, as Salesforce's error code and message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum SoqlError {
    Malformed(String),
    InvalidField(String),
    InvalidType(String),
}

impl SoqlError {
    pub(crate) fn code(&self) -> &'static str {
        match self {
            SoqlError::Malformed(_) => "MALFORMED_QUERY",
            SoqlError::InvalidField(_) => "INVALID_FIELD",
            SoqlError::InvalidType(_) => "INVALID_TYPE",
        }
    }

    pub(crate) fn message(&self) -> &str {
        match self {
            SoqlError::Malformed(message)
            | SoqlError::InvalidField(message)
            | SoqlError::InvalidType(message) => message,
        }
    }
}

type Result<T> = std::result::Result<T, SoqlError>;

#[derive(Clone, Debug, PartialEq)]
enum Token {
    Word(String),
    Str(String),
    Literal(String),
    LParen,
    RParen,
    Comma,
    Op(Op),
}

/// Comparison operators.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Op {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

/// A literal after type checking against its field.
#[derive(Clone, Debug, PartialEq)]
enum Literal {
    Null,
    Bool(bool),
    Str(String),
    DateTime(i64),
}

/// A WHERE condition.
#[derive(Clone, Debug)]
enum Expr {
    And(Box<Expr>, Box<Expr>),
    Or(Box<Expr>, Box<Expr>),
    Not(Box<Expr>),
    Compare(Field, Op, Literal),
    /// Lower-cased values for text fields, so membership ignores case.
    In {
        field: Field,
        values: Vec<Literal>,
        lowered: HashSet<String>,
        negated: bool,
    },
    Like(Field, String),
}

/// A parsed statement.
#[derive(Clone, Debug)]
pub(crate) struct Query {
    pub(crate) object: Object,
    pub(crate) fields: Vec<Field>,
    filter: Option<Expr>,
    order: Vec<(Field, bool, bool)>,
    limit: Option<usize>,
    offset: usize,
}

fn malformed(message: impl Into<String>) -> SoqlError {
    SoqlError::Malformed(message.into())
}

fn tokenize(text: &str) -> Result<Vec<Token>> {
    let chars: Vec<char> = text.chars().collect();
    let mut tokens = Vec::new();
    let mut position = 0;
    while let Some(&current) = chars.get(position) {
        if current.is_whitespace() {
            position += 1;
            continue;
        }
        let next = chars.get(position + 1).copied();
        match current {
            '(' => tokens.push(Token::LParen),
            ')' => tokens.push(Token::RParen),
            ',' => tokens.push(Token::Comma),
            '=' => tokens.push(Token::Op(Op::Eq)),
            '!' if next == Some('=') => {
                tokens.push(Token::Op(Op::Ne));
                position += 1;
            }
            '<' => match next {
                Some('=') => {
                    tokens.push(Token::Op(Op::Le));
                    position += 1;
                }
                Some('>') => {
                    tokens.push(Token::Op(Op::Ne));
                    position += 1;
                }
                _ => tokens.push(Token::Op(Op::Lt)),
            },
            '>' => {
                if next == Some('=') {
                    tokens.push(Token::Op(Op::Ge));
                    position += 1;
                } else {
                    tokens.push(Token::Op(Op::Gt));
                }
            }
            '\'' => {
                let mut value = String::new();
                position += 1;
                loop {
                    let Some(&character) = chars.get(position) else {
                        return Err(malformed("unterminated string literal"));
                    };
                    match character {
                        '\'' => break,
                        '\\' => {
                            position += 1;
                            let escaped = match chars.get(position) {
                                Some('n') => '\n',
                                Some('r') => '\r',
                                Some('t') => '\t',
                                Some('b') => '\u{8}',
                                Some('f') => '\u{c}',
                                Some(&other @ ('\'' | '"' | '\\' | '_' | '%')) => other,
                                _ => {
                                    return Err(malformed(
                                        "Invalid string literal. Illegal character sequence '\\' in string literal.",
                                    ));
                                }
                            };
                            value.push(escaped);
                        }
                        other => value.push(other),
                    }
                    position += 1;
                }
                tokens.push(Token::Str(value));
            }
            character if character.is_ascii_alphabetic() || character == '_' => {
                let start = position;
                while chars
                    .get(position)
                    .is_some_and(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == '.')
                {
                    position += 1;
                }
                tokens.push(Token::Word(chars[start..position].iter().collect()));
                continue;
            }
            character
                if character.is_ascii_digit()
                    || ((character == '-' || character == '+')
                        && next.is_some_and(|c| c.is_ascii_digit())) =>
            {
                let start = position;
                position += 1;
                while chars.get(position).is_some_and(|c| {
                    c.is_ascii_alphanumeric() || matches!(c, ':' | '+' | '-' | '.')
                }) {
                    position += 1;
                }
                tokens.push(Token::Literal(chars[start..position].iter().collect()));
                continue;
            }
            other => return Err(malformed(format!("unexpected token: '{other}'"))),
        }
        position += 1;
    }
    Ok(tokens)
}

struct Parser {
    tokens: Vec<Token>,
    position: usize,
    object: Object,
    person_accounts: bool,
}

impl Parser {
    fn peek(&self) -> Option<&Token> {
        self.tokens.get(self.position)
    }

    fn next(&mut self) -> Option<Token> {
        let token = self.tokens.get(self.position).cloned();
        self.position += 1;
        token
    }

    fn peek_keyword(&self, keyword: &str) -> bool {
        matches!(self.peek(), Some(Token::Word(word)) if word.eq_ignore_ascii_case(keyword))
    }

    fn eat_keyword(&mut self, keyword: &str) -> bool {
        let found = self.peek_keyword(keyword);
        if found {
            self.position += 1;
        }
        found
    }

    fn expect_keyword(&mut self, keyword: &str) -> Result<()> {
        if self.eat_keyword(keyword) {
            Ok(())
        } else {
            Err(self.unexpected())
        }
    }

    fn unexpected(&self) -> SoqlError {
        match self.peek() {
            Some(token) => malformed(format!("unexpected token: {}", describe(token))),
            None => malformed("unexpected end of query"),
        }
    }

    fn field(&mut self) -> Result<Field> {
        match self.next() {
            Some(Token::Word(name)) => {
                let bare = name
                    .rsplit_once('.')
                    .map_or(name.as_str(), |(qualifier, field)| {
                        if qualifier.eq_ignore_ascii_case(self.object.name()) {
                            field
                        } else {
                            name.as_str()
                        }
                    });
                Field::resolve(self.object, bare, self.person_accounts).ok_or_else(|| {
                    SoqlError::InvalidField(format!(
                        "No such column '{bare}' on entity '{}'. If you are attempting to use a custom field, be sure to append the '__c' after the custom field name. Please reference your WSDL or the describe call for the appropriate names.",
                        self.object.name()
                    ))
                })
            }
            Some(token) => Err(malformed(format!("unexpected token: {}", describe(&token)))),
            None => Err(malformed("unexpected end of query")),
        }
    }

    fn literal(&mut self, field: Field) -> Result<Literal> {
        let token = self
            .next()
            .ok_or_else(|| malformed("unexpected end of query"))?;
        let kind = field.kind();
        let mismatch = |what: &str| {
            SoqlError::InvalidField(format!(
                "value of filter criterion for field '{}' must be of type {} and should not be {what}",
                field.name(),
                kind_name(kind)
            ))
        };
        match token {
            Token::Word(word) if word.eq_ignore_ascii_case("null") => Ok(Literal::Null),
            Token::Word(word)
                if word.eq_ignore_ascii_case("true") || word.eq_ignore_ascii_case("false") =>
            {
                if kind == FieldKind::Boolean {
                    Ok(Literal::Bool(word.eq_ignore_ascii_case("true")))
                } else {
                    Err(mismatch("a boolean"))
                }
            }
            Token::Str(text) => match kind {
                FieldKind::Text | FieldKind::Email | FieldKind::Id => Ok(Literal::Str(text)),
                _ => Err(mismatch("enclosed in quotes")),
            },
            Token::Literal(text) => match kind {
                FieldKind::DateTime => {
                    parse_datetime(&text).map(Literal::DateTime).ok_or_else(|| {
                        malformed(format!(
                            "line 1:0 no viable alternative at character '{text}'"
                        ))
                    })
                }
                _ => Err(mismatch("a number or date")),
            },
            other => Err(malformed(format!("unexpected token: {}", describe(&other)))),
        }
    }

    fn expression(&mut self) -> Result<Expr> {
        let mut left = self.conjunction()?;
        while self.eat_keyword("OR") {
            let right = self.conjunction()?;
            left = Expr::Or(Box::new(left), Box::new(right));
        }
        Ok(left)
    }

    fn conjunction(&mut self) -> Result<Expr> {
        let mut left = self.unary()?;
        while self.eat_keyword("AND") {
            let right = self.unary()?;
            left = Expr::And(Box::new(left), Box::new(right));
        }
        Ok(left)
    }

    fn unary(&mut self) -> Result<Expr> {
        if self.eat_keyword("NOT") {
            return Ok(Expr::Not(Box::new(self.unary()?)));
        }
        if self.peek() == Some(&Token::LParen) {
            self.position += 1;
            let inner = self.expression()?;
            if self.next() != Some(Token::RParen) {
                return Err(malformed("missing ')'"));
            }
            return Ok(inner);
        }
        self.predicate()
    }

    fn predicate(&mut self) -> Result<Expr> {
        let field = self.field()?;
        if self.eat_keyword("LIKE") {
            return match self.next() {
                Some(Token::Str(pattern)) if field.kind() != FieldKind::Boolean => {
                    Ok(Expr::Like(field, pattern))
                }
                _ => Err(malformed("LIKE needs a string pattern on a text field")),
            };
        }
        let negated = self.eat_keyword("NOT");
        if self.eat_keyword("IN") {
            if self.next() != Some(Token::LParen) {
                return Err(malformed("expected '(' after IN"));
            }
            let mut values = Vec::new();
            loop {
                values.push(self.literal(field)?);
                match self.next() {
                    Some(Token::Comma) => continue,
                    Some(Token::RParen) => break,
                    _ => return Err(malformed("expected ',' or ')' in IN list")),
                }
            }
            let lowered = values
                .iter()
                .filter_map(|value| match value {
                    Literal::Str(text) => Some(text.to_lowercase()),
                    _ => None,
                })
                .collect();
            return Ok(Expr::In {
                field,
                values,
                lowered,
                negated,
            });
        }
        if negated {
            return Err(self.unexpected());
        }
        match self.next() {
            Some(Token::Op(op)) => {
                let literal = self.literal(field)?;
                if literal == Literal::Null && !matches!(op, Op::Eq | Op::Ne) {
                    return Err(malformed("null can only be compared with = or !="));
                }
                Ok(Expr::Compare(field, op, literal))
            }
            Some(token) => Err(malformed(format!("unexpected token: {}", describe(&token)))),
            None => Err(malformed("unexpected end of query")),
        }
    }

    fn count(&mut self) -> Result<usize> {
        match self.next() {
            Some(Token::Literal(text)) => text
                .parse()
                .map_err(|_| malformed(format!("invalid number: {text}"))),
            _ => Err(malformed("expected a number")),
        }
    }
}

fn describe(token: &Token) -> String {
    match token {
        Token::Word(word) => word.clone(),
        Token::Str(text) => format!("'{text}'"),
        Token::Literal(text) => text.clone(),
        Token::LParen => "(".into(),
        Token::RParen => ")".into(),
        Token::Comma => ",".into(),
        Token::Op(op) => format!("{op:?}"),
    }
}

fn kind_name(kind: FieldKind) -> &'static str {
    match kind {
        FieldKind::Boolean => "boolean",
        FieldKind::DateTime => "dateTime",
        FieldKind::Id => "id",
        FieldKind::Text | FieldKind::Email => "string",
    }
}

/// Reads a SOQL datetime literal (`2024-05-01T10:00:00Z`, `...000+0000`, `+02:00`) or a date.
pub(crate) fn parse_datetime(text: &str) -> Option<i64> {
    if let Ok(at) = DateTime::parse_from_rfc3339(text) {
        return Some(at.timestamp_millis());
    }
    if let Ok(at) = DateTime::parse_from_str(text, "%Y-%m-%dT%H:%M:%S%.f%z") {
        return Some(at.timestamp_millis());
    }
    let date = NaiveDate::parse_from_str(text, "%Y-%m-%d").ok()?;
    Some(date.and_hms_opt(0, 0, 0)?.and_utc().timestamp_millis())
}

/// Parses a statement against the org's schema.
pub(crate) fn parse(text: &str, person_accounts: bool) -> Result<Query> {
    let tokens = tokenize(text)?;
    let mut parser = Parser {
        tokens,
        position: 0,
        object: Object::Contact,
        person_accounts,
    };
    parser.expect_keyword("SELECT")?;
    // The object comes after the field list: find it first so fields resolve against it.
    let from = parser
        .tokens
        .iter()
        .position(|token| matches!(token, Token::Word(w) if w.eq_ignore_ascii_case("FROM")));
    let Some(from) = from else {
        return Err(malformed("unexpected end of query, expecting FROM"));
    };
    let object = match parser.tokens.get(from + 1) {
        Some(Token::Word(name)) => Object::parse(name).ok_or_else(|| {
            SoqlError::InvalidType(format!(
                "sObject type '{name}' is not supported. If you are attempting to use a custom object, be sure to append the '__c' after the entity name. Please reference your WSDL or the describe call for the appropriate names."
            ))
        })?,
        _ => return Err(malformed("expected an object name after FROM")),
    };
    parser.object = object;
    let mut fields = Vec::new();
    loop {
        let field = parser.field()?;
        if !fields.contains(&field) {
            fields.push(field);
        }
        if parser.peek() == Some(&Token::Comma) {
            parser.position += 1;
            continue;
        }
        break;
    }
    parser.expect_keyword("FROM")?;
    parser.position += 1;
    let filter = if parser.eat_keyword("WHERE") {
        Some(parser.expression()?)
    } else {
        None
    };
    let mut order = Vec::new();
    if parser.eat_keyword("ORDER") {
        parser.expect_keyword("BY")?;
        loop {
            let field = parser.field()?;
            let ascending = if parser.eat_keyword("DESC") {
                false
            } else {
                parser.eat_keyword("ASC");
                true
            };
            // Salesforce puts nulls first when ascending, last when descending, unless told.
            let mut nulls_first = ascending;
            if parser.eat_keyword("NULLS") {
                if parser.eat_keyword("FIRST") {
                    nulls_first = true;
                } else {
                    parser.expect_keyword("LAST")?;
                    nulls_first = false;
                }
            }
            order.push((field, ascending, nulls_first));
            if parser.peek() == Some(&Token::Comma) {
                parser.position += 1;
                continue;
            }
            break;
        }
    }
    let limit = if parser.eat_keyword("LIMIT") {
        Some(parser.count()?)
    } else {
        None
    };
    let offset = if parser.eat_keyword("OFFSET") {
        parser.count()?
    } else {
        0
    };
    if parser.peek().is_some() {
        return Err(parser.unexpected());
    }
    Ok(Query {
        object,
        fields,
        filter,
        order,
        limit,
        offset,
    })
}

fn compare_values(left: &Value, right: &Literal) -> Option<Ordering> {
    match (left, right) {
        (Value::Bool(a), Literal::Bool(b)) => Some(a.cmp(b)),
        (Value::DateTime(a), Literal::DateTime(b)) => Some(a.cmp(b)),
        (Value::Str(a), Literal::Str(b)) => Some(compare_ignoring_case(a, b)),
        _ => None,
    }
}

fn compare_ignoring_case(left: &str, right: &str) -> Ordering {
    left.chars()
        .flat_map(char::to_lowercase)
        .cmp(right.chars().flat_map(char::to_lowercase))
}

fn like(text: &str, pattern: &str) -> bool {
    let text: Vec<char> = text.chars().flat_map(char::to_lowercase).collect();
    let pattern: Vec<char> = pattern.chars().flat_map(char::to_lowercase).collect();
    // Classic wildcard matching with backtracking over the last '%'.
    let (mut t, mut p) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        if p < pattern.len() && (pattern[p] == '_' || pattern[p] == text[t]) {
            t += 1;
            p += 1;
        } else if p < pattern.len() && pattern[p] == '%' {
            star = Some((p, t));
            p += 1;
        } else if let Some((star_p, star_t)) = star {
            p = star_p + 1;
            t = star_t + 1;
            star = Some((star_p, star_t + 1));
        } else {
            return false;
        }
    }
    pattern[p..].iter().all(|c| *c == '%')
}

fn matches(data: &OrgData, index: u32, expr: &Expr) -> bool {
    match expr {
        Expr::And(left, right) => matches(data, index, left) && matches(data, index, right),
        Expr::Or(left, right) => matches(data, index, left) || matches(data, index, right),
        Expr::Not(inner) => !matches(data, index, inner),
        Expr::Compare(field, op, literal) => {
            let value = data.get(index, *field);
            if *literal == Literal::Null {
                let is_null = value == Value::Null;
                return if *op == Op::Eq { is_null } else { !is_null };
            }
            if value == Value::Null {
                // Null is unequal to every non-null value, and never ordered.
                return *op == Op::Ne;
            }
            let Some(ordering) = compare_values(&value, literal) else {
                return false;
            };
            match op {
                Op::Eq => ordering == Ordering::Equal,
                Op::Ne => ordering != Ordering::Equal,
                Op::Lt => ordering == Ordering::Less,
                Op::Le => ordering != Ordering::Greater,
                Op::Gt => ordering == Ordering::Greater,
                Op::Ge => ordering != Ordering::Less,
            }
        }
        Expr::In {
            field,
            values,
            lowered,
            negated,
        } => {
            let value = data.get(index, *field);
            let found = match &value {
                Value::Str(text) => lowered.contains(&text.to_lowercase()),
                Value::Null => values.contains(&Literal::Null),
                other => values
                    .iter()
                    .any(|literal| compare_values(other, literal) == Some(Ordering::Equal)),
            };
            found != *negated
        }
        Expr::Like(field, pattern) => match data.get(index, *field) {
            Value::Str(text) => like(&text, pattern),
            _ => false,
        },
    }
}

/// Indexes to look at instead of a full scan, when the condition allows it.
fn candidates(data: &OrgData, expr: &Expr) -> Option<Vec<u32>> {
    match expr {
        Expr::Compare(Field::Email | Field::PersonEmail, Op::Eq, Literal::Str(email)) => {
            Some(data.with_email(email).to_vec())
        }
        Expr::In {
            field: Field::Email | Field::PersonEmail,
            lowered,
            negated: false,
            ..
        } => {
            let mut found: Vec<u32> = lowered
                .iter()
                .flat_map(|email| data.with_email(email).iter().copied())
                .collect();
            found.sort_unstable();
            found.dedup();
            Some(found)
        }
        Expr::Compare(Field::Id, Op::Eq, Literal::Str(id)) => {
            Some(data.lookup(None, id).into_iter().collect())
        }
        Expr::In {
            field: Field::Id,
            values,
            negated: false,
            ..
        } => {
            let mut found: Vec<u32> = values
                .iter()
                .filter_map(|value| match value {
                    Literal::Str(id) => data.lookup(None, id),
                    _ => None,
                })
                .collect();
            found.sort_unstable();
            found.dedup();
            Some(found)
        }
        Expr::Compare(Field::SystemModstamp, op, Literal::DateTime(at)) => {
            let at = *at;
            Some(match op {
                Op::Gt => data.modstamp_range((at + 1, 0)..),
                Op::Ge => data.modstamp_range((at, 0)..),
                Op::Lt => data.modstamp_range(..(at, 0)),
                Op::Le => data.modstamp_range(..(at + 1, 0)),
                Op::Eq => data.modstamp_range((at, 0)..(at + 1, 0)),
                Op::Ne => return None,
            })
        }
        Expr::And(left, right) => match (candidates(data, left), candidates(data, right)) {
            (Some(a), Some(b)) => Some(if a.len() <= b.len() { a } else { b }),
            (Some(a), None) => Some(a),
            (None, b) => b,
        },
        Expr::Or(left, right) => {
            let mut union = candidates(data, left)?;
            union.extend(candidates(data, right)?);
            union.sort_unstable();
            union.dedup();
            Some(union)
        }
        _ => None,
    }
}

/// A sort key: values computed once per row (text lower-cased), not once per comparison.
fn sort_key(data: &OrgData, index: u32, order: &[(Field, bool, bool)]) -> Vec<Value> {
    order
        .iter()
        .map(|(field, _, _)| match data.get(index, *field) {
            Value::Str(text) => Value::Str(text.to_lowercase()),
            other => other,
        })
        .collect()
}

fn compare_keys(left: &[Value], right: &[Value], order: &[(Field, bool, bool)]) -> Ordering {
    for ((a, b), (_, ascending, nulls_first)) in left.iter().zip(right).zip(order) {
        let ordering = match (a, b) {
            (Value::Null, Value::Null) => Ordering::Equal,
            (Value::Null, _) => {
                if *nulls_first {
                    Ordering::Less
                } else {
                    Ordering::Greater
                }
            }
            (_, Value::Null) => {
                if *nulls_first {
                    Ordering::Greater
                } else {
                    Ordering::Less
                }
            }
            (Value::Str(x), Value::Str(y)) => directed(x.cmp(y), *ascending),
            (Value::Bool(x), Value::Bool(y)) => directed(x.cmp(y), *ascending),
            (Value::DateTime(x), Value::DateTime(y)) => directed(x.cmp(y), *ascending),
            _ => Ordering::Equal,
        };
        if ordering != Ordering::Equal {
            return ordering;
        }
    }
    Ordering::Equal
}

fn directed(ordering: Ordering, ascending: bool) -> Ordering {
    if ascending {
        ordering
    } else {
        ordering.reverse()
    }
}

/// Runs a statement: the indexes of the matching records, ordered, limited.
pub(crate) fn execute(data: &OrgData, query: &Query, include_deleted: bool) -> Vec<u32> {
    let keep = |index: u32| {
        let Some(record) = data.records.get(index as usize) else {
            return false;
        };
        record.object == query.object
            && (include_deleted || !record.deleted)
            && query
                .filter
                .as_ref()
                .is_none_or(|filter| matches(data, index, filter))
    };
    let indexed = query
        .filter
        .as_ref()
        .and_then(|filter| candidates(data, filter));
    let mut found: Vec<u32> = match indexed {
        Some(list) => list.into_iter().filter(|index| keep(*index)).collect(),
        None => (0..u32::try_from(data.records.len()).unwrap_or(u32::MAX))
            .filter(|index| keep(*index))
            .collect(),
    };
    if !query.order.is_empty() {
        let mut keyed: Vec<(Vec<Value>, u32)> = found
            .into_iter()
            .map(|index| (sort_key(data, index, &query.order), index))
            .collect();
        // Stable, so ties keep insertion order.
        keyed.sort_by(|(a, _), (b, _)| compare_keys(a, b, &query.order));
        found = keyed.into_iter().map(|(_, index)| index).collect();
    }
    let skipped = found.into_iter().skip(query.offset);
    match query.limit {
        Some(limit) => skipped.take(limit).collect(),
        None => skipped.collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_typical_statement() {
        let query = parse(
            "SELECT Id, Email, HasOptedOutOfEmail FROM Contact WHERE Email IN ('a@x.com','b\\'c@x.com') AND (HasOptedOutOfEmail = false OR SystemModstamp > 2024-05-01T10:00:00Z) ORDER BY SystemModstamp ASC LIMIT 10",
            false,
        )
        .expect("parses");
        assert_eq!(query.object, Object::Contact);
        assert_eq!(query.fields.len(), 3);
        assert_eq!(query.limit, Some(10));
    }

    #[test]
    fn refuses_unknown_fields_and_bad_syntax() {
        assert_eq!(
            parse("SELECT Id, Foo FROM Contact", false)
                .unwrap_err()
                .code(),
            "INVALID_FIELD"
        );
        assert_eq!(
            parse("SELECT Id FROM Contact WHERE", false)
                .unwrap_err()
                .code(),
            "MALFORMED_QUERY"
        );
        assert_eq!(
            parse("SELECT Id FROM Contact WHERE Email = 'a", false)
                .unwrap_err()
                .code(),
            "MALFORMED_QUERY"
        );
        assert_eq!(
            parse("SELECT PersonEmail FROM Account", false)
                .unwrap_err()
                .code(),
            "INVALID_FIELD"
        );
        assert!(parse("SELECT PersonEmail FROM Account", true).is_ok());
        assert_eq!(
            parse("SELECT Id FROM Widget", false).unwrap_err().code(),
            "INVALID_TYPE"
        );
    }

    #[test]
    fn like_matches_wildcards_ignoring_case() {
        assert!(like("Someone@Example.com", "%@example.com"));
        assert!(like("abc", "a_c"));
        assert!(!like("abc", "a_d%"));
    }
}
