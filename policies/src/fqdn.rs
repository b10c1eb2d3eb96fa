//! DNS names in policy: the selectors of `toFQDNs` and `rules.dns` (Cilium's `matchName` and
//! `matchPattern`), how they match a name, and the names the DNS proxy learned with their
//! addresses, which `toFQDNs` peers resolve against.
//!
//! Names are compared as Cilium compares them: case-insensitively, without the trailing dot.
//! In a pattern, `*` stands for any run of the characters a DNS label may hold (letters,
//! digits, `-` and `_`) but never a dot, so `*.example.com` matches `api.example.com` but
//! neither `example.com` nor `a.b.example.com`; a pattern that is `*` alone matches every name.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

/// The longest name DNS carries (RFC 1035 §3.1, in its dotted text form).
pub const MAX_NAME_LEN: usize = 253;
/// The longest label.
pub const MAX_LABEL_LEN: usize = 63;

/// One `matchName` or `matchPattern`, normalized (lower case, no trailing dot).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum FqdnSelector {
    MatchName(String),
    MatchPattern(String),
}

impl fmt::Display for FqdnSelector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FqdnSelector::MatchName(n) => write!(f, "matchName: {n}"),
            FqdnSelector::MatchPattern(p) => write!(f, "matchPattern: {p}"),
        }
    }
}

/// Why a name or pattern is not one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("the name is empty")]
    Empty,
    #[error("the name is {0} characters long, more than the {MAX_NAME_LEN} DNS allows")]
    TooLong(usize),
    #[error("label {0:?} is longer than the {MAX_LABEL_LEN} characters DNS allows")]
    LabelTooLong(String),
    #[error("the name has an empty label (two dots in a row, or a leading dot)")]
    EmptyLabel,
    #[error("character {0:?} cannot appear in a DNS name")]
    BadCharacter(char),
    #[error("`**` may only begin a pattern, as `**.` (any number of labels, at least one)")]
    MisplacedDoubleStar,
}

fn is_label_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'-' || b == b'_'
}

/// Lower-cases `text`, drops one trailing dot, and checks it is a name (or, with `wildcards`,
/// a pattern: `*` allowed in labels).
fn normalize(text: &str, wildcards: bool) -> Result<String, NameError> {
    let lower = text.trim_end_matches('.').to_ascii_lowercase();
    if lower.is_empty() {
        return Err(NameError::Empty);
    }
    if lower.len() > MAX_NAME_LEN {
        return Err(NameError::TooLong(lower.len()));
    }
    // Cilium's multi-level wildcard: a leading `**.`, and nowhere else.
    let body = match lower.strip_prefix("**.") {
        Some(rest) if wildcards => rest,
        _ => &lower,
    };
    if wildcards && body.contains("**") {
        return Err(NameError::MisplacedDoubleStar);
    }
    for label in body.split('.') {
        if label.is_empty() {
            return Err(NameError::EmptyLabel);
        }
        if label.len() > MAX_LABEL_LEN {
            return Err(NameError::LabelTooLong(label.to_string()));
        }
        let allowed = |c: char| u8::try_from(c).is_ok_and(is_label_char) || (wildcards && c == '*');
        if let Some(c) = label.chars().find(|c| !allowed(*c)) {
            return Err(NameError::BadCharacter(c));
        }
    }
    Ok(lower)
}

/// A name as policy compares it: lower case, no trailing dot.
pub fn normalize_name(text: &str) -> Result<String, NameError> {
    normalize(text, false)
}

impl FqdnSelector {
    pub fn name(text: &str) -> Result<Self, NameError> {
        normalize(text, false).map(FqdnSelector::MatchName)
    }

    pub fn pattern(text: &str) -> Result<Self, NameError> {
        normalize(text, true).map(FqdnSelector::MatchPattern)
    }

    /// Whether the (normalized) `name` is selected.
    pub fn matches(&self, name: &str) -> bool {
        match self {
            FqdnSelector::MatchName(n) => n == name,
            FqdnSelector::MatchPattern(p) if p == "*" => true,
            // `**.rest`: one or more labels, then what `rest` matches.
            FqdnSelector::MatchPattern(p) => match p.strip_prefix("**.") {
                Some(rest) => name
                    .match_indices('.')
                    .any(|(i, _)| i > 0 && glob(rest.as_bytes(), &name.as_bytes()[i + 1..])),
                None => glob(p.as_bytes(), name.as_bytes()),
            },
        }
    }
}

/// `*` matches any run of label characters (no dot); everything else matches itself.
/// Iterative with one backtrack point per star, so it is linear in practice and never
/// recursive on untrusted input.
fn glob(pattern: &[u8], name: &[u8]) -> bool {
    let (mut p, mut n) = (0, 0);
    // Where the last star was, and how much of the name it had taken.
    let mut star: Option<(usize, usize)> = None;
    while n < name.len() {
        if p < pattern.len() && pattern[p] == b'*' {
            star = Some((p, n));
            p += 1;
        } else if p < pattern.len() && pattern[p] == name[n] {
            p += 1;
            n += 1;
        } else if let Some((sp, sn)) = star
            && is_label_char(name[sn])
        {
            // The star takes one more character (never a dot).
            star = Some((sp, sn + 1));
            p = sp + 1;
            n = sn + 1;
        } else {
            return false;
        }
    }
    pattern[p..].iter().all(|b| *b == b'*')
}

/// Whether any selector of `selectors` selects `name`.
pub fn any_matches<'a>(selectors: impl IntoIterator<Item = &'a FqdnSelector>, name: &str) -> bool {
    selectors.into_iter().any(|s| s.matches(name))
}

/// What the DNS proxy learned: each name and the addresses its answers held (every endpoint's
/// lookups together), which is what `toFQDNs` peers select.
pub type LearnedNames = BTreeMap<String, BTreeSet<Ipv4Addr>>;

/// The names whose learned addresses differ between `old` and `new` (learned, expired, or
/// with addresses gained or lost): what a compile following learned names re-resolves.
/// One merge walk over both (sorted) maps.
pub fn changed_names(old: &LearnedNames, new: &LearnedNames) -> BTreeSet<String> {
    crate::merge::merge_join(old, new)
        .filter_map(|side| match side {
            crate::merge::Side::Left(name, _) | crate::merge::Side::Right(name, _) => {
                Some(name.clone())
            }
            crate::merge::Side::Both(name, was, now) => (was != now).then(|| name.clone()),
        })
        .collect()
}

/// The addresses a `toFQDNs` selector stands for now.
pub fn selected_addresses<'a>(
    selector: &FqdnSelector,
    names: &'a LearnedNames,
) -> impl Iterator<Item = Ipv4Addr> + 'a {
    let selector = selector.clone();
    names
        .iter()
        .filter(move |(name, _)| selector.matches(name))
        .flat_map(|(_, ips)| ips.iter().copied())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern(p: &str) -> FqdnSelector {
        FqdnSelector::pattern(p).unwrap()
    }

    #[test]
    fn names_are_normalized() {
        assert_eq!(
            FqdnSelector::name("API.Example.COM.").unwrap(),
            FqdnSelector::MatchName("api.example.com".into())
        );
        assert_eq!(normalize_name("a_b-c.d").unwrap(), "a_b-c.d");
    }

    #[test]
    fn bad_names_are_refused_with_the_reason() {
        assert_eq!(FqdnSelector::name(""), Err(NameError::Empty));
        assert_eq!(FqdnSelector::name("a..b"), Err(NameError::EmptyLabel));
        assert_eq!(FqdnSelector::name("*.a"), Err(NameError::BadCharacter('*')));
        assert_eq!(FqdnSelector::name("a b"), Err(NameError::BadCharacter(' ')));
        assert!(matches!(
            FqdnSelector::name(&"a".repeat(64)),
            Err(NameError::LabelTooLong(_))
        ));
        let long = vec!["a".repeat(60); 5].join(".");
        assert!(matches!(
            FqdnSelector::name(&long),
            Err(NameError::TooLong(_))
        ));
        assert!(FqdnSelector::pattern("*.a").is_ok());
    }

    #[test]
    fn a_star_matches_within_one_label() {
        let p = pattern("*.example.com");
        assert!(p.matches("api.example.com"));
        assert!(p.matches("a-b_c.example.com"));
        assert!(!p.matches("example.com"));
        assert!(!p.matches("a.b.example.com"));
        assert!(!p.matches("api.example.org"));
        let p = pattern("api*.example.com");
        assert!(p.matches("api.example.com"));
        assert!(p.matches("api-v2.example.com"));
        assert!(!p.matches("web.example.com"));
        let p = pattern("*cilium*.io");
        assert!(!p.matches("docs.cilium.io"));
        assert!(p.matches("mycilium-x.io"));
    }

    #[test]
    fn a_leading_double_star_matches_any_number_of_labels() {
        let p = pattern("**.cilium.io");
        assert!(p.matches("app.cilium.io"));
        assert!(p.matches("test.app.cilium.io"));
        assert!(!p.matches("cilium.io"));
        assert!(!p.matches("app.cilium.org"));
        let p = pattern("**.api-*.example.com");
        assert!(p.matches("a.b.api-v2.example.com"));
        assert!(!p.matches("a.api.example.com"));
        for misplaced in ["a.**.com", "**", "***.com", "x**.com", "**.a.**.b"] {
            assert_eq!(
                FqdnSelector::pattern(misplaced),
                Err(NameError::MisplacedDoubleStar),
                "{misplaced}"
            );
        }
        assert_eq!(
            FqdnSelector::name("**.a.com"),
            Err(NameError::BadCharacter('*'))
        );
    }

    #[test]
    fn a_lone_star_matches_every_name() {
        assert!(pattern("*").matches("a.b.c"));
        assert!(pattern("*").matches("x"));
    }

    #[test]
    fn a_name_matches_only_itself() {
        let n = FqdnSelector::name("api.example.com").unwrap();
        assert!(n.matches("api.example.com"));
        assert!(!n.matches("x.api.example.com"));
    }

    #[test]
    fn changed_names_are_those_learned_expired_or_with_other_addresses() {
        let a = |o: u8| Ipv4Addr::new(192, 0, 2, o);
        let old: LearnedNames = [
            ("gone.test".to_string(), [a(1)].into()),
            ("same.test".to_string(), [a(2)].into()),
            ("moved.test".to_string(), [a(3)].into()),
        ]
        .into();
        let new: LearnedNames = [
            ("same.test".to_string(), [a(2)].into()),
            ("moved.test".to_string(), [a(3), a(4)].into()),
            ("zzz.new.test".to_string(), [a(5)].into()),
        ]
        .into();
        let changed: Vec<_> = changed_names(&old, &new).into_iter().collect();
        assert_eq!(changed, ["gone.test", "moved.test", "zzz.new.test"]);
        assert!(changed_names(&new, &new).is_empty());
    }

    #[test]
    fn selectors_pick_the_addresses_of_their_names() {
        let mut names = LearnedNames::new();
        names.insert("a.example.com".into(), [Ipv4Addr::new(1, 1, 1, 1)].into());
        names.insert("b.example.com".into(), [Ipv4Addr::new(2, 2, 2, 2)].into());
        names.insert("c.other.org".into(), [Ipv4Addr::new(3, 3, 3, 3)].into());
        let got: BTreeSet<_> = selected_addresses(&pattern("*.example.com"), &names).collect();
        assert_eq!(
            got,
            [Ipv4Addr::new(1, 1, 1, 1), Ipv4Addr::new(2, 2, 2, 2)].into()
        );
    }
}
