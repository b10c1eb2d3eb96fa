//! Ports as manifests write them: numbers, named ports, ranges.

use std::fmt;

use serde::de::{self, Deserialize, Deserializer, Visitor};

use super::error::Problem;

/// Kubernetes' IntOrString: a YAML integer or a YAML string.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum IntOrString {
    Int(i64),
    Str(String),
}

impl<'de> Deserialize<'de> for IntOrString {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct IntOrStringVisitor;

        impl Visitor<'_> for IntOrStringVisitor {
            type Value = IntOrString;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an integer or a string")
            }

            fn visit_i64<E: de::Error>(self, v: i64) -> Result<IntOrString, E> {
                Ok(IntOrString::Int(v))
            }

            fn visit_u64<E: de::Error>(self, v: u64) -> Result<IntOrString, E> {
                i64::try_from(v)
                    .map(IntOrString::Int)
                    .map_err(|_| E::invalid_value(de::Unexpected::Unsigned(v), &self))
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<IntOrString, E> {
                Ok(IntOrString::Str(v.to_string()))
            }
        }

        deserializer.deserialize_any(IntOrStringVisitor)
    }
}

/// A port number in 1..=65535.
pub(crate) fn port_number(n: i64) -> Result<u16, Problem> {
    u16::try_from(n)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| Problem::PortOutOfRange(n.to_string()))
}

/// The end of a port range starting at `port`.
pub(crate) fn end_port(port: u16, end_port: i64) -> Result<u16, Problem> {
    u16::try_from(end_port)
        .ok()
        .filter(|end| *end >= port)
        .ok_or(Problem::EndPortOutOfRange { port, end_port })
}

/// A named port must be an IANA service name (RFC 6335), as Kubernetes requires of container
/// port names, or it could never match one.
pub(crate) fn validate_port_name(name: &str) -> Result<(), Problem> {
    let invalid = |why| Problem::InvalidPortName {
        value: name.to_string(),
        why,
    };
    if name.is_empty() || name.len() > 15 {
        return Err(invalid("a port name must be 1 to 15 characters long"));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Err(invalid(
            "a port name may contain only lowercase letters, digits and '-'",
        ));
    }
    if !name.bytes().any(|b| b.is_ascii_lowercase()) {
        return Err(invalid("a port name must contain at least one letter"));
    }
    if name.starts_with('-') || name.ends_with('-') || name.contains("--") {
        return Err(invalid(
            "a port name must not begin or end with '-' or contain \"--\"",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn int_or_string_reads_both_yaml_forms() {
        let v: Vec<IntOrString> = serde_norway::from_str("[80, http, '443', -1]").unwrap();
        assert_eq!(
            v,
            vec![
                IntOrString::Int(80),
                IntOrString::Str("http".into()),
                IntOrString::Str("443".into()),
                IntOrString::Int(-1)
            ]
        );
        assert!(serde_norway::from_str::<IntOrString>("1.5").is_err());
        assert!(serde_norway::from_str::<IntOrString>("[1]").is_err());
    }

    #[test]
    fn port_numbers_are_1_to_65535() {
        assert_eq!(port_number(1), Ok(1));
        assert_eq!(port_number(65535), Ok(65535));
        for bad in [0, -1, 65536] {
            assert_eq!(
                port_number(bad),
                Err(Problem::PortOutOfRange(bad.to_string()))
            );
        }
    }

    #[test]
    fn end_port_is_at_least_port_and_at_most_65535() {
        assert_eq!(end_port(80, 80), Ok(80));
        assert_eq!(end_port(80, 65535), Ok(65535));
        assert!(end_port(80, 79).is_err());
        assert!(end_port(80, 65536).is_err());
    }

    #[test]
    fn port_names_follow_iana_service_name_rules() {
        for good in ["http", "h2c", "metrics-9090", "a", "abcdefghijklmno"] {
            assert_eq!(validate_port_name(good), Ok(()), "{good}");
        }
        for bad in [
            "",
            "abcdefghijklmnop",
            "HTTP",
            "http_alt",
            "80",
            "-http",
            "http-",
            "a--b",
        ] {
            assert!(validate_port_name(bad).is_err(), "{bad:?} accepted");
        }
    }
}
