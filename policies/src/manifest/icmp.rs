//! Cilium's `icmps` rules.

use serde::Deserialize;

use super::error::{FieldPath, Invalid, Problem};
use super::ports::IntOrString;
use crate::model::{Port, PortSpec, Protocol};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct IcmpRuleDoc {
    fields: Option<Vec<IcmpFieldDoc>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct IcmpFieldDoc {
    #[serde(rename = "type")]
    icmp_type: IntOrString,
    family: Option<String>,
}

/// ICMPv4 message types Cilium names.
const ICMP_TYPES: [(&str, u8); 6] = [
    ("EchoReply", 0),
    ("DestinationUnreachable", 3),
    ("Redirect", 5),
    ("EchoRequest", 8),
    ("TimeExceeded", 11),
    ("ParameterProblem", 12),
];

/// Every ICMP type the rules list, as ICMP "ports" (the type is matched where a port would be).
pub(crate) fn icmp_ports(
    rules: &[IcmpRuleDoc],
    path: &FieldPath,
) -> Result<Vec<PortSpec>, Invalid> {
    let mut ports = Vec::new();
    for (i, rule) in rules.iter().enumerate() {
        let fields_path = path.index(i).key("fields");
        let fields = rule.fields.as_deref().unwrap_or_default();
        // An entry without types would leave a rule with no ports, which means every port of
        // every protocol: far more than an ICMP rule intends.
        if fields.is_empty() {
            return Err(fields_path.invalid(Problem::NoIcmpFields));
        }
        for (j, field) in fields.iter().enumerate() {
            ports.push(icmp_field(field, &fields_path.index(j))?);
        }
    }
    Ok(ports)
}

fn icmp_field(doc: &IcmpFieldDoc, path: &FieldPath) -> Result<PortSpec, Invalid> {
    match doc.family.as_deref() {
        None | Some("IPv4") => {}
        Some("IPv6") => {
            return Err(path
                .key("family")
                .invalid(Problem::Ipv6("family IPv6".into())));
        }
        Some(other) => {
            return Err(path
                .key("family")
                .invalid(Problem::UnknownIcmpFamily(other.to_string())));
        }
    }
    let icmp_type = icmp_type(&doc.icmp_type).map_err(|p| path.key("type").invalid(p))?;
    Ok(PortSpec {
        protocol: Protocol::Icmp,
        port: Port::Range {
            port: icmp_type.into(),
            end: icmp_type.into(),
        },
    })
}

fn icmp_type(value: &IntOrString) -> Result<u8, Problem> {
    match value {
        IntOrString::Int(n) => u8::try_from(*n).map_err(|_| Problem::IcmpTypeOutOfRange(*n)),
        IntOrString::Str(name) => ICMP_TYPES
            .iter()
            .find(|(known, _)| known == name)
            .map(|(_, n)| *n)
            .ok_or_else(|| Problem::UnknownIcmpType(name.clone())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ports(yaml: &str) -> Result<Vec<PortSpec>, Invalid> {
        let docs: Vec<IcmpRuleDoc> = serde_norway::from_str(yaml).expect("test YAML");
        icmp_ports(&docs, &FieldPath::root().key("icmps"))
    }

    fn icmp(t: u16) -> PortSpec {
        PortSpec {
            protocol: Protocol::Icmp,
            port: Port::Range { port: t, end: t },
        }
    }

    #[test]
    fn icmp_types_by_number_or_name_become_icmp_ports() {
        let p = ports(
            "[{fields: [{type: 8}, {type: EchoReply, family: IPv4}]}, {fields: [{type: 255}]}]",
        )
        .unwrap();
        assert_eq!(p, vec![icmp(8), icmp(0), icmp(255)]);
    }

    #[test]
    fn every_named_icmp_type_is_known() {
        for (name, n) in ICMP_TYPES {
            assert_eq!(icmp_type(&IntOrString::Str(name.into())), Ok(n));
        }
        assert_eq!(
            icmp_type(&IntOrString::Str("DestinationUnreachable".into())),
            Ok(3)
        );
        assert_eq!(icmp_type(&IntOrString::Str("TimeExceeded".into())), Ok(11));
    }

    #[test]
    fn unknown_or_out_of_range_icmp_type_is_rejected() {
        let err = ports("[{fields: [{type: Ping}]}]").unwrap_err();
        assert_eq!(err.field.as_deref(), Some("icmps[0].fields[0].type"));
        assert!(err.problem.to_string().contains("EchoRequest"));
        let err = ports("[{fields: [{type: 8}, {type: 256}]}]").unwrap_err();
        assert_eq!(err.field.as_deref(), Some("icmps[0].fields[1].type"));
        assert_eq!(err.problem, Problem::IcmpTypeOutOfRange(256));
    }

    #[test]
    fn icmpv6_is_not_supported_yet() {
        let err = ports("[{fields: [{type: 128, family: IPv6}]}]").unwrap_err();
        assert_eq!(err.field.as_deref(), Some("icmps[0].fields[0].family"));
        assert!(
            err.problem
                .to_string()
                .contains("IPv6 is not supported yet")
        );
        let err = ports("[{fields: [{type: 8, family: ipv4}]}]").unwrap_err();
        assert_eq!(err.problem, Problem::UnknownIcmpFamily("ipv4".into()));
    }

    #[test]
    fn an_icmp_entry_without_types_is_rejected() {
        for yaml in ["[{}]", "[{fields: []}]"] {
            let err = ports(yaml).unwrap_err();
            assert_eq!(err.field.as_deref(), Some("icmps[0].fields"));
            assert_eq!(err.problem, Problem::NoIcmpFields);
        }
    }
}
