//! Label and field selectors as list and watch requests carry them
//! (`labelSelector=app=web,tier in (a,b)`, `fieldSelector=metadata.name=web-0`).

use super::names::{label_value_errors, qualified_name_errors};
use super::status::Error;
use serde_json::{Map, Value};
use std::collections::BTreeSet;

/// The operator of one label requirement.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Operator {
    /// `key=value` or `key==value`
    Equals,
    /// `key!=value`: also matches objects without the label.
    NotEquals,
    /// `key in (a,b)`
    In,
    /// `key notin (a,b)`: also matches objects without the label.
    NotIn,
    /// `key`
    Exists,
    /// `!key`
    DoesNotExist,
    /// `key>3`: the label is an integer greater than the value.
    GreaterThan,
    /// `key<3`
    LessThan,
}

/// One requirement of a label selector.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Requirement {
    pub key: String,
    pub operator: Operator,
    pub values: BTreeSet<String>,
}

impl Requirement {
    fn matches(&self, labels: Option<&Map<String, Value>>) -> bool {
        let value = labels
            .and_then(|l| l.get(&self.key))
            .and_then(Value::as_str);
        match (self.operator, value) {
            (Operator::Exists, v) => v.is_some(),
            (Operator::DoesNotExist, v) => v.is_none(),
            (Operator::Equals | Operator::In, Some(v)) => self.values.contains(v),
            (Operator::NotEquals | Operator::NotIn, Some(v)) => !self.values.contains(v),
            (Operator::NotEquals | Operator::NotIn, None) => true,
            (Operator::GreaterThan | Operator::LessThan, Some(v)) => {
                let (Ok(have), Some(Ok(want))) = (
                    v.parse::<i64>(),
                    self.values.iter().next().map(|w| w.parse::<i64>()),
                ) else {
                    return false;
                };
                if self.operator == Operator::GreaterThan {
                    have > want
                } else {
                    have < want
                }
            }
            (_, None) => false,
        }
    }
}

/// A parsed label selector; empty selects everything.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LabelSelector {
    pub requirements: Vec<Requirement>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Token {
    Word(String),
    Comma,
    Equals,
    DoubleEquals,
    NotEquals,
    Not,
    Open,
    Close,
    Greater,
    Less,
}

impl Token {
    fn text(&self) -> &str {
        match self {
            Token::Word(w) => w,
            Token::Comma => ",",
            Token::Equals => "=",
            Token::DoubleEquals => "==",
            Token::NotEquals => "!=",
            Token::Not => "!",
            Token::Open => "(",
            Token::Close => ")",
            Token::Greater => ">",
            Token::Less => "<",
        }
    }
}

fn is_special(c: char) -> bool {
    c.is_whitespace() || matches!(c, ',' | '=' | '!' | '(' | ')' | '<' | '>')
}

fn tokens(text: &str) -> Vec<Token> {
    let mut out = Vec::new();
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        let token = match c {
            c if c.is_whitespace() => continue,
            ',' => Token::Comma,
            '(' => Token::Open,
            ')' => Token::Close,
            '>' => Token::Greater,
            '<' => Token::Less,
            '=' if chars.peek() == Some(&'=') => {
                chars.next();
                Token::DoubleEquals
            }
            '=' => Token::Equals,
            '!' if chars.peek() == Some(&'=') => {
                chars.next();
                Token::NotEquals
            }
            '!' => Token::Not,
            first => {
                let mut word = String::from(first);
                while let Some(&next) = chars.peek() {
                    if is_special(next) {
                        break;
                    }
                    word.push(next);
                    chars.next();
                }
                Token::Word(word)
            }
        };
        out.push(token);
    }
    out
}

struct Parser {
    tokens: Vec<Token>,
    at: usize,
}

impl Parser {
    fn peek(&self) -> Option<&Token> {
        self.tokens.get(self.at)
    }

    fn next(&mut self) -> Option<Token> {
        let token = self.tokens.get(self.at).cloned();
        self.at += 1;
        token
    }

    fn unexpected(found: Option<&Token>, expected: &str) -> Error {
        let found = found.map_or("end of string", Token::text);
        Error::bad_request(format!(
            "unable to parse requirement: found '{found}', expected: {expected}"
        ))
    }

    fn key(&mut self) -> Result<String, Error> {
        match self.next() {
            Some(Token::Word(word)) => Ok(word),
            other => Err(Self::unexpected(other.as_ref(), "identifier")),
        }
    }

    /// The value after `=`, `==` or `!=`: a word, or empty when the requirement ends.
    fn single_value(&mut self) -> Result<String, Error> {
        match self.peek() {
            None | Some(Token::Comma) => Ok(String::new()),
            Some(Token::Word(_)) => self.key(),
            other => Err(Self::unexpected(other, "identifier")),
        }
    }

    /// `(a, b, c)` after `in` or `notin`.
    fn value_set(&mut self) -> Result<BTreeSet<String>, Error> {
        match self.next() {
            Some(Token::Open) => {}
            other => return Err(Self::unexpected(other.as_ref(), "'('")),
        }
        let mut values = BTreeSet::new();
        let mut expect_value = true;
        loop {
            match self.next() {
                Some(Token::Word(word)) if expect_value => {
                    values.insert(word);
                    expect_value = false;
                }
                Some(Token::Comma) => {
                    if expect_value {
                        values.insert(String::new());
                    }
                    expect_value = true;
                }
                Some(Token::Close) => {
                    if expect_value && !values.is_empty() {
                        values.insert(String::new());
                    }
                    break;
                }
                other => return Err(Self::unexpected(other.as_ref(), "',' or ')'")),
            }
        }
        if values.is_empty() {
            return Err(Error::bad_request(
                "unable to parse requirement: for 'in', 'notin' operators, values set can't be empty",
            ));
        }
        Ok(values)
    }

    fn requirement(&mut self) -> Result<Requirement, Error> {
        let negated = self.peek() == Some(&Token::Not);
        if negated {
            self.next();
        }
        let key = self.key()?;
        let (operator, values) = if negated {
            (Operator::DoesNotExist, BTreeSet::new())
        } else {
            match self.peek().cloned() {
                None | Some(Token::Comma) => (Operator::Exists, BTreeSet::new()),
                Some(Token::Equals | Token::DoubleEquals) => {
                    self.next();
                    (Operator::Equals, BTreeSet::from([self.single_value()?]))
                }
                Some(Token::NotEquals) => {
                    self.next();
                    (Operator::NotEquals, BTreeSet::from([self.single_value()?]))
                }
                Some(Token::Word(word)) if word == "in" || word == "notin" => {
                    self.next();
                    let operator = if word == "in" {
                        Operator::In
                    } else {
                        Operator::NotIn
                    };
                    (operator, self.value_set()?)
                }
                Some(token @ (Token::Greater | Token::Less)) => {
                    self.next();
                    let value = self.key()?;
                    if value.parse::<i64>().is_err() {
                        return Err(Error::bad_request(format!(
                            "unable to parse requirement: for 'gt', 'lt' operators, the value must be an integer, not \"{value}\""
                        )));
                    }
                    let operator = if token == Token::Greater {
                        Operator::GreaterThan
                    } else {
                        Operator::LessThan
                    };
                    (operator, BTreeSet::from([value]))
                }
                other => {
                    return Err(Self::unexpected(
                        other.as_ref(),
                        "in, notin, =, ==, !=, gt, lt",
                    ));
                }
            }
        };
        check_key(&key)?;
        if !matches!(operator, Operator::GreaterThan | Operator::LessThan) {
            for value in &values {
                check_value(&key, value)?;
            }
        }
        Ok(Requirement {
            key,
            operator,
            values,
        })
    }
}

fn check_key(key: &str) -> Result<(), Error> {
    match qualified_name_errors(key).first() {
        None => Ok(()),
        Some(reason) => Err(Error::bad_request(format!(
            "unable to parse requirement: invalid label key \"{key}\": {reason}"
        ))),
    }
}

fn check_value(key: &str, value: &str) -> Result<(), Error> {
    match label_value_errors(value).first() {
        None => Ok(()),
        Some(reason) => Err(Error::bad_request(format!(
            "unable to parse requirement: invalid label value \"{value}\" for key \"{key}\": {reason}"
        ))),
    }
}

impl LabelSelector {
    /// Parses the text form; an empty or blank text selects everything.
    pub fn parse(text: &str) -> Result<Self, Error> {
        let mut parser = Parser {
            tokens: tokens(text),
            at: 0,
        };
        let mut requirements = Vec::new();
        if parser.peek().is_none() {
            return Ok(Self { requirements });
        }
        loop {
            requirements.push(parser.requirement()?);
            match parser.next() {
                None => break,
                Some(Token::Comma) => {}
                other => return Err(Parser::unexpected(other.as_ref(), "','")),
            }
        }
        Ok(Self { requirements })
    }

    pub fn is_empty(&self) -> bool {
        self.requirements.is_empty()
    }

    /// Whether an object with these `metadata.labels` is selected.
    pub fn matches(&self, labels: Option<&Map<String, Value>>) -> bool {
        self.requirements.iter().all(|r| r.matches(labels))
    }
}

/// The operator of one field requirement.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FieldOperator {
    Equals,
    NotEquals,
}

/// One requirement of a field selector.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldRequirement {
    /// A dotted path: `metadata.name`, `spec.nodeName`.
    pub field: String,
    pub operator: FieldOperator,
    pub value: String,
}

/// A parsed field selector; empty selects everything.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FieldSelector {
    pub requirements: Vec<FieldRequirement>,
}

impl FieldSelector {
    /// Parses `field=value,field!=value` (also `==`); empty terms are skipped.
    pub fn parse(text: &str) -> Result<Self, Error> {
        let mut requirements = Vec::new();
        for term in text.split(',').filter(|t| !t.is_empty()) {
            let (field, operator, value) = if let Some((f, v)) = term.split_once("!=") {
                (f, FieldOperator::NotEquals, v)
            } else if let Some((f, v)) = term.split_once("==") {
                (f, FieldOperator::Equals, v)
            } else if let Some((f, v)) = term.split_once('=') {
                (f, FieldOperator::Equals, v)
            } else {
                return Err(Error::bad_request(format!(
                    "invalid selector: '{text}'; can't understand '{term}'"
                )));
            };
            requirements.push(FieldRequirement {
                field: field.to_string(),
                operator,
                value: value.to_string(),
            });
        }
        Ok(Self { requirements })
    }

    pub fn is_empty(&self) -> bool {
        self.requirements.is_empty()
    }

    /// Refuses fields the resource does not offer for selection, as the real server does.
    pub fn check_fields(&self, selectable: &[String]) -> Result<(), Error> {
        for requirement in &self.requirements {
            let field = requirement.field.as_str();
            let known = field == "metadata.name"
                || field == "metadata.namespace"
                || selectable.iter().any(|s| s == field);
            if !known {
                return Err(Error::bad_request(format!(
                    "field label not supported: {field}"
                )));
            }
        }
        Ok(())
    }

    pub fn matches(&self, object: &Value) -> bool {
        self.requirements.iter().all(|r| {
            let have = field_value(object, &r.field);
            match r.operator {
                FieldOperator::Equals => have == r.value,
                FieldOperator::NotEquals => have != r.value,
            }
        })
    }
}

/// A field's value as text, as field selectors compare it; a missing field reads as "".
pub fn field_value(object: &Value, path: &str) -> String {
    let mut at = object;
    for part in path.split('.') {
        match at.get(part) {
            Some(next) => at = next,
            None => return String::new(),
        }
    }
    match at {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        other => other.to_string(),
    }
}

/// The label and field selectors of one list or watch request.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Selectors {
    pub label: LabelSelector,
    pub field: FieldSelector,
}

impl Selectors {
    /// Selects everything.
    pub fn everything() -> Self {
        Self::default()
    }

    /// Parses the `labelSelector` and `fieldSelector` query parameters.
    pub fn parse(label: Option<&str>, field: Option<&str>) -> Result<Self, Error> {
        Ok(Self {
            label: LabelSelector::parse(label.unwrap_or(""))?,
            field: FieldSelector::parse(field.unwrap_or(""))?,
        })
    }

    pub fn is_empty(&self) -> bool {
        self.label.is_empty() && self.field.is_empty()
    }

    pub fn matches(&self, object: &Value) -> bool {
        let labels = object
            .get("metadata")
            .and_then(|m| m.get("labels"))
            .and_then(Value::as_object);
        self.label.matches(labels) && self.field.matches(object)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn object(labels: Value) -> Value {
        json!({"metadata": {"name": "web-0", "namespace": "tracker", "labels": labels}, "spec": {"nodeName": "n1", "replicas": 3}})
    }

    fn selects(selector: &str, labels: Value) -> bool {
        Selectors::parse(Some(selector), None)
            .unwrap()
            .matches(&object(labels))
    }

    #[test]
    fn equality_selects_only_that_value() {
        assert!(selects("app=web", json!({"app": "web"})));
        assert!(selects("app==web", json!({"app": "web"})));
        assert!(!selects("app=web", json!({"app": "db"})));
        assert!(!selects("app=web", json!({})));
    }

    #[test]
    fn inequality_also_selects_objects_without_the_label() {
        assert!(selects("app!=web", json!({"app": "db"})));
        assert!(selects("app!=web", json!({})));
        assert!(!selects("app!=web", json!({"app": "web"})));
    }

    #[test]
    fn existence_and_absence() {
        assert!(selects("app", json!({"app": ""})));
        assert!(!selects("app", json!({})));
        assert!(selects("!app", json!({"tier": "x"})));
        assert!(!selects("!app", json!({"app": "web"})));
    }

    #[test]
    fn set_membership_with_spaces() {
        assert!(selects("tier in (a, b)", json!({"tier": "b"})));
        assert!(!selects("tier in (a,b)", json!({"tier": "c"})));
        assert!(!selects("tier in (a,b)", json!({})));
        assert!(selects("tier notin (a)", json!({"tier": "b"})));
        assert!(selects("tier notin (a)", json!({})));
        assert!(!selects("tier notin (a)", json!({"tier": "a"})));
    }

    #[test]
    fn comma_joins_requirements() {
        let labels = json!({"app": "web", "tier": "front"});
        assert!(selects(
            "app=web,tier in (front,back),!gone",
            labels.clone()
        ));
        assert!(!selects("app=web,tier=back", labels));
    }

    #[test]
    fn integer_comparisons() {
        assert!(selects("rank>2", json!({"rank": "3"})));
        assert!(!selects("rank>2", json!({"rank": "2"})));
        assert!(selects("rank<2", json!({"rank": "1"})));
        assert!(!selects("rank<2", json!({"rank": "x"})));
        assert!(Selectors::parse(Some("rank>x"), None).is_err());
    }

    #[test]
    fn empty_value_equality() {
        assert!(selects("app=", json!({"app": ""})));
        assert!(!selects("app=", json!({"app": "web"})));
    }

    #[test]
    fn blank_selects_everything() {
        assert!(LabelSelector::parse("").unwrap().is_empty());
        assert!(LabelSelector::parse("  ").unwrap().is_empty());
        assert!(selects("", json!({})));
    }

    #[test]
    fn invalid_label_selectors_are_bad_requests_with_a_message() {
        for bad in [
            "app=web,",
            "!app=web",
            "tier in ()",
            "tier in a",
            "tier in (a",
            "app=we b",
            "bad key=1",
            "a/b/c=1",
            "app=-x",
            "=x",
            "app web",
        ] {
            let err = LabelSelector::parse(bad).unwrap_err();
            assert_eq!(err.code(), 400, "{bad}");
            assert!(
                err.to_string().starts_with("unable to parse requirement"),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn field_selectors_compare_names_namespaces_and_paths() {
        let o = object(json!({}));
        let sel = |t: &str| FieldSelector::parse(t).unwrap().matches(&o);
        assert!(sel("metadata.name=web-0"));
        assert!(sel("metadata.name==web-0,metadata.namespace=tracker"));
        assert!(sel("metadata.name!=web-1"));
        assert!(!sel("metadata.namespace!=tracker"));
        assert!(sel("spec.nodeName=n1"));
        assert!(sel("spec.replicas=3"));
        assert!(sel("spec.missing="));
    }

    #[test]
    fn field_selectors_without_operator_are_refused() {
        let err = FieldSelector::parse("metadata.name").unwrap_err();
        assert_eq!(err.code(), 400);
        assert_eq!(
            err.to_string(),
            "invalid selector: 'metadata.name'; can't understand 'metadata.name'"
        );
    }

    #[test]
    fn unsupported_field_labels_are_refused() {
        let sel = FieldSelector::parse("spec.nodeName=n1").unwrap();
        let err = sel.check_fields(&[]).unwrap_err();
        assert_eq!(err.to_string(), "field label not supported: spec.nodeName");
        assert!(sel.check_fields(&["spec.nodeName".to_string()]).is_ok());
        assert!(
            FieldSelector::parse("metadata.name=a,metadata.namespace=b")
                .unwrap()
                .check_fields(&[])
                .is_ok()
        );
    }
}
