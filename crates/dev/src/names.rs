//! Name rules of Kubernetes objects, label keys and values, and the random parts the API
//! server invents: uids and the suffix of `metadata.generateName`.

use super::status::Error;
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};

/// Which rule the names of a resource's objects follow.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum NameRule {
    /// RFC 1123 subdomain (custom resources, pods, config maps, secrets, ...).
    #[default]
    Subdomain,
    /// RFC 1123 label (namespaces).
    Label,
    /// RFC 1035 label: starts with a letter (services).
    Label1035,
}

const SUBDOMAIN_MAX: usize = 253;
const LABEL_MAX: usize = 63;

fn is_lower_alnum(c: char) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit()
}

fn is_alnum(c: char) -> bool {
    c.is_ascii_alphanumeric()
}

/// `[a-z0-9]([-a-z0-9]*[a-z0-9])?`
fn is_label_shape(text: &str) -> bool {
    let (Some(first), Some(last)) = (text.chars().next(), text.chars().last()) else {
        return false;
    };
    is_lower_alnum(first)
        && is_lower_alnum(last)
        && text.chars().all(|c| is_lower_alnum(c) || c == '-')
}

/// The reasons `name` is not an RFC 1123 label; empty when it is one.
pub fn dns1123_label_errors(name: &str) -> Vec<String> {
    let mut errors = Vec::new();
    if name.len() > LABEL_MAX {
        errors.push(format!("must be no more than {LABEL_MAX} characters"));
    }
    if !is_label_shape(name) {
        errors.push(
            "a lowercase RFC 1123 label must be lower case letters, digits or '-', \
             and start and end with a letter or digit (e.g. 'my-name' or '123-abc')"
                .to_string(),
        );
    }
    errors
}

/// The reasons `name` is not an RFC 1123 subdomain; empty when it is one.
pub fn dns1123_subdomain_errors(name: &str) -> Vec<String> {
    let mut errors = Vec::new();
    if name.len() > SUBDOMAIN_MAX {
        errors.push(format!("must be no more than {SUBDOMAIN_MAX} characters"));
    }
    if !name.split('.').all(is_label_shape) {
        errors.push(
            "a lowercase RFC 1123 subdomain must be lower case letters, digits, '-' or '.', \
             and start and end with a letter or digit (e.g. 'example.com')"
                .to_string(),
        );
    }
    errors
}

/// The reasons `name` is not an RFC 1035 label; empty when it is one.
pub fn dns1035_label_errors(name: &str) -> Vec<String> {
    let mut errors = Vec::new();
    if name.len() > LABEL_MAX {
        errors.push(format!("must be no more than {LABEL_MAX} characters"));
    }
    let starts_with_letter = name.chars().next().is_some_and(|c| c.is_ascii_lowercase());
    if !starts_with_letter || !is_label_shape(name) {
        errors.push(
            "a DNS-1035 label must be lower case letters, digits or '-', start with a \
             letter and end with a letter or digit (e.g. 'my-name' or 'abc-123')"
                .to_string(),
        );
    }
    errors
}

/// The reasons `name` breaks `rule`; empty when it keeps it.
pub fn name_errors(rule: NameRule, name: &str) -> Vec<String> {
    match rule {
        NameRule::Subdomain => dns1123_subdomain_errors(name),
        NameRule::Label => dns1123_label_errors(name),
        NameRule::Label1035 => dns1035_label_errors(name),
    }
}

/// `([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]`, the shape of label values and of the name
/// part of qualified names.
fn is_label_value_shape(text: &str) -> bool {
    let (Some(first), Some(last)) = (text.chars().next(), text.chars().last()) else {
        return false;
    };
    is_alnum(first)
        && is_alnum(last)
        && text
            .chars()
            .all(|c| is_alnum(c) || c == '-' || c == '_' || c == '.')
}

/// The reasons `key` is not a qualified name (`[prefix/]name`, as label and annotation keys
/// must be); empty when it is one.
pub fn qualified_name_errors(key: &str) -> Vec<String> {
    let mut errors = Vec::new();
    let parts: Vec<&str> = key.split('/').collect();
    let name = match parts.as_slice() {
        [name] => *name,
        [prefix, name] => {
            if prefix.is_empty() {
                errors.push("prefix part must be non-empty".to_string());
            } else {
                errors.extend(
                    dns1123_subdomain_errors(prefix)
                        .into_iter()
                        .map(|e| format!("prefix part {e}")),
                );
            }
            *name
        }
        _ => {
            errors.push(
                "a qualified name is a name with an optional DNS subdomain prefix and '/' \
                 (e.g. 'example.com/MyName')"
                    .to_string(),
            );
            return errors;
        }
    };
    if name.is_empty() {
        errors.push("name part must be non-empty".to_string());
    } else {
        if name.len() > LABEL_MAX {
            errors.push(format!(
                "name part must be no more than {LABEL_MAX} characters"
            ));
        }
        if !is_label_value_shape(name) {
            errors.push(
                "name part must be letters, digits, '-', '_' or '.', and start and end \
                 with a letter or digit (e.g. 'MyName', 'my.name' or '123-abc')"
                    .to_string(),
            );
        }
    }
    errors
}

/// The reasons `value` is not a label value; empty when it is one (the empty string is).
pub fn label_value_errors(value: &str) -> Vec<String> {
    let mut errors = Vec::new();
    if value.len() > LABEL_MAX {
        errors.push(format!("must be no more than {LABEL_MAX} characters"));
    }
    if !value.is_empty() && !is_label_value_shape(value) {
        errors.push(
            "a valid label value is empty or letters, digits, '-', '_' or '.', starting \
             and ending with a letter or digit (e.g. 'MyValue', 'my_value' or '12345')"
                .to_string(),
        );
    }
    errors
}

fn random_bytes<const N: usize>() -> Result<[u8; N], Error> {
    let mut bytes = [0u8; N];
    SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| Error::Internal {
            message: "the system random number generator failed".to_string(),
        })?;
    Ok(bytes)
}

/// A fresh random uid in the shape of a version 4 UUID, as the real server gives.
pub fn new_uid() -> Result<String, Error> {
    let mut b = random_bytes::<16>()?;
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    Ok(format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    ))
}

/// The letters of generated suffixes: lowercase alphanumerics without vowels and look-alikes,
/// so that suffixes never spell words, as Kubernetes does.
const SUFFIX_ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
const SUFFIX_LENGTH: usize = 5;

/// A name made from `metadata.generateName`: the base, cut so the result fits in 63
/// characters, then five random characters.
pub fn generate_name(base: &str) -> Result<String, Error> {
    let keep = LABEL_MAX - SUFFIX_LENGTH;
    let mut name: String = base.chars().take(keep).collect();
    let mut drawn = 0;
    // Rejection sampling keeps every letter equally likely.
    let limit = (256 / SUFFIX_ALPHABET.len() * SUFFIX_ALPHABET.len()) as u8;
    while drawn < SUFFIX_LENGTH {
        for byte in random_bytes::<16>()? {
            if byte < limit && drawn < SUFFIX_LENGTH {
                name.push(char::from(
                    SUFFIX_ALPHABET[usize::from(byte) % SUFFIX_ALPHABET.len()],
                ));
                drawn += 1;
            }
        }
    }
    Ok(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subdomains_take_dots_but_not_capitals_or_edges() {
        assert!(dns1123_subdomain_errors("sampl-tokyo.v1").is_empty());
        assert!(!dns1123_subdomain_errors("Tokyo").is_empty());
        assert!(!dns1123_subdomain_errors("-tokyo").is_empty());
        assert!(!dns1123_subdomain_errors("tokyo.").is_empty());
        assert!(!dns1123_subdomain_errors("").is_empty());
        assert!(!dns1123_subdomain_errors("a/b").is_empty());
        assert!(!dns1123_subdomain_errors(&"a".repeat(254)).is_empty());
    }

    #[test]
    fn labels_refuse_dots_and_1035_labels_refuse_leading_digits() {
        assert!(dns1123_label_errors("tracker").is_empty());
        assert!(!dns1123_label_errors("a.b").is_empty());
        assert!(dns1123_label_errors("1abc").is_empty());
        assert!(!dns1035_label_errors("1abc").is_empty());
        assert!(dns1035_label_errors("abc-1").is_empty());
        assert!(!dns1123_label_errors(&"a".repeat(64)).is_empty());
    }

    #[test]
    fn qualified_names_have_an_optional_subdomain_prefix() {
        assert!(qualified_name_errors("app").is_empty());
        assert!(qualified_name_errors("app.kubernetes.io/name").is_empty());
        assert!(qualified_name_errors("My_Name.x").is_empty());
        assert!(!qualified_name_errors("/name").is_empty());
        assert!(!qualified_name_errors("a/b/c").is_empty());
        assert!(!qualified_name_errors("Example.com/name").is_empty());
        assert!(!qualified_name_errors("bad key").is_empty());
        assert!(!qualified_name_errors("").is_empty());
    }

    #[test]
    fn label_values_may_be_empty_but_not_spaced() {
        assert!(label_value_errors("").is_empty());
        assert!(label_value_errors("v1.2_x-Y").is_empty());
        assert!(!label_value_errors("a b").is_empty());
        assert!(!label_value_errors("-a").is_empty());
        assert!(!label_value_errors(&"a".repeat(64)).is_empty());
    }

    #[test]
    fn uids_are_uuid_shaped_and_differ() {
        let a = new_uid().unwrap();
        let b = new_uid().unwrap();
        assert_ne!(a, b);
        let groups: Vec<usize> = a.split('-').map(str::len).collect();
        assert_eq!(groups, [8, 4, 4, 4, 12]);
        assert_eq!(&a[14..15], "4");
        assert!(a.chars().all(|c| c == '-' || c.is_ascii_hexdigit()));
    }

    #[test]
    fn generated_names_add_five_safe_characters_and_fit_63() {
        let name = generate_name("web-").unwrap();
        assert_eq!(name.len(), 9);
        assert!(name.starts_with("web-"));
        assert!(name[4..].bytes().all(|b| SUFFIX_ALPHABET.contains(&b)));
        let long = generate_name(&"x".repeat(80)).unwrap();
        assert_eq!(long.len(), 63);
    }
}
