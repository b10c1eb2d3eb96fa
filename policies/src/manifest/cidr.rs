//! CIDR parsing for ipBlock / fromCIDR / fromCIDRSet. IPv4 only for now.

use std::net::IpAddr;

use ipnetwork::Ipv4Network;

use super::error::{CidrError, Problem};

/// Whether a bare address (no `/prefix`) is accepted as a /32.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum BareAddress {
    /// Cilium's fromCIDR/toCIDR take single addresses.
    Allowed,
    /// Kubernetes' ipBlock requires a CIDR.
    Rejected,
}

/// Parses `a.b.c.d/len`. Host bits are accepted and cleared (`10.1.2.3/8` is `10.0.0.0/8`),
/// as Kubernetes does when it matches.
pub(crate) fn parse_cidr(text: &str, bare: BareAddress) -> Result<Ipv4Network, Problem> {
    let invalid = |reason| Problem::InvalidCidr {
        value: text.to_string(),
        reason,
    };
    let (address_text, prefix_text) = match text.split_once('/') {
        Some((address, prefix)) => (address, Some(prefix)),
        None => (text, None),
    };
    // std's parser takes only the canonical dotted quad (no `10.1`, no leading zeros), which
    // is what Kubernetes accepts too.
    let address: IpAddr = address_text
        .parse()
        .map_err(|_| invalid(CidrError::BadAddress(address_text.to_string())))?;
    let IpAddr::V4(address) = address else {
        return Err(Problem::Ipv6(format!("{text:?}")));
    };
    let prefix = match (prefix_text, bare) {
        (Some(p), _) => {
            parse_prefix(p).ok_or_else(|| invalid(CidrError::BadPrefix(p.to_string())))?
        }
        (None, BareAddress::Allowed) => 32,
        (None, BareAddress::Rejected) => return Err(invalid(CidrError::MissingPrefix)),
    };
    let network = Ipv4Network::new(address, prefix)
        .and_then(|n| Ipv4Network::new(n.network(), prefix))
        .map_err(|_| invalid(CidrError::BadPrefix(prefix.to_string())))?;
    Ok(network)
}

fn parse_prefix(text: &str) -> Option<u8> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse::<u8>().ok().filter(|p| *p <= 32)
}

/// Parses an `except` entry of `cidr`, which must lie strictly inside it.
pub(crate) fn parse_except(
    cidr: Ipv4Network,
    text: &str,
    bare: BareAddress,
) -> Result<Ipv4Network, Problem> {
    let except = parse_cidr(text, bare)?;
    if except.prefix() > cidr.prefix() && cidr.contains(except.network()) {
        Ok(except)
    } else {
        Err(Problem::ExceptOutsideCidr { except, cidr })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Ipv4Network {
        s.parse().unwrap()
    }

    #[test]
    fn cidrs_parse_and_host_bits_are_cleared() {
        assert_eq!(
            parse_cidr("10.0.0.0/8", BareAddress::Rejected),
            Ok(net("10.0.0.0/8"))
        );
        assert_eq!(
            parse_cidr("10.1.2.3/8", BareAddress::Rejected),
            Ok(net("10.0.0.0/8"))
        );
        assert_eq!(
            parse_cidr("0.0.0.0/0", BareAddress::Rejected),
            Ok(net("0.0.0.0/0"))
        );
    }

    #[test]
    fn bare_addresses_are_slash_32_only_where_allowed() {
        assert_eq!(
            parse_cidr("10.1.2.3", BareAddress::Allowed),
            Ok(net("10.1.2.3/32"))
        );
        assert!(matches!(
            parse_cidr("10.1.2.3", BareAddress::Rejected),
            Err(Problem::InvalidCidr {
                reason: CidrError::MissingPrefix,
                ..
            })
        ));
    }

    #[test]
    fn malformed_cidrs_are_rejected() {
        for bad in [
            "10.0.0.0/33",
            "10.0.0.0/",
            "10.0.0.0/+8",
            "10.0.0/8",
            "010.0.0.0/8",
            "x/8",
            "",
            " 10.0.0.0/8",
        ] {
            let err = parse_cidr(bad, BareAddress::Allowed).unwrap_err();
            assert!(matches!(err, Problem::InvalidCidr { .. }), "{bad:?}: {err}");
        }
        let err = parse_cidr("10.0.0.0/33", BareAddress::Rejected).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("invalid CIDR \"10.0.0.0/33\": "),
            "{err}"
        );
    }

    #[test]
    fn ipv6_is_rejected_as_unsupported() {
        for v6 in ["fd00::/8", "::1", "::ffff:10.0.0.1/128"] {
            let err = parse_cidr(v6, BareAddress::Allowed).unwrap_err();
            assert_eq!(err, Problem::Ipv6(format!("{v6:?}")));
            assert!(err.to_string().contains("IPv6 is not supported yet"));
        }
    }

    #[test]
    fn except_must_be_strictly_inside_the_cidr() {
        let cidr = net("10.0.0.0/8");
        assert_eq!(
            parse_except(cidr, "10.1.0.0/16", BareAddress::Rejected),
            Ok(net("10.1.0.0/16"))
        );
        for outside in ["10.0.0.0/8", "11.0.0.0/16", "0.0.0.0/0"] {
            assert!(matches!(
                parse_except(cidr, outside, BareAddress::Rejected),
                Err(Problem::ExceptOutsideCidr { .. })
            ));
        }
        assert!(matches!(
            parse_except(cidr, "fd00::/16", BareAddress::Rejected),
            Err(Problem::Ipv6(_))
        ));
    }
}
