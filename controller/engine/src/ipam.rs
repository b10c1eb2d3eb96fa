//! Endpoint address allocation from the pod CIDR. Pure.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use ipnetwork::Ipv4Network;

/// The node's own address in local mode: the first host address of the pod CIDR.
pub fn node_ip(pod_cidr: &Ipv4Network) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(pod_cidr.network()) + 1)
}

/// The lowest free host address of `pod_cidr`, skipping the network and broadcast addresses,
/// the node address and every address in `used`.
pub fn allocate(pod_cidr: &Ipv4Network, used: &BTreeSet<Ipv4Addr>) -> Option<Ipv4Addr> {
    let first = u32::from(pod_cidr.network());
    let last = u32::from(pod_cidr.broadcast());
    let node = node_ip(pod_cidr);
    (first + 1..last)
        .map(Ipv4Addr::from)
        .find(|ip| *ip != node && !used.contains(ip))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocates_lowest_free_after_the_node_address() {
        let cidr: Ipv4Network = "10.200.0.0/16".parse().unwrap();
        assert_eq!(node_ip(&cidr), Ipv4Addr::new(10, 200, 0, 1));
        let mut used = BTreeSet::new();
        assert_eq!(allocate(&cidr, &used), Some(Ipv4Addr::new(10, 200, 0, 2)));
        used.insert(Ipv4Addr::new(10, 200, 0, 2));
        used.insert(Ipv4Addr::new(10, 200, 0, 4));
        assert_eq!(allocate(&cidr, &used), Some(Ipv4Addr::new(10, 200, 0, 3)));
    }

    #[test]
    fn exhausted_pool_yields_none() {
        let cidr: Ipv4Network = "10.0.0.0/30".parse().unwrap();
        // .0 network, .1 node, .2 usable, .3 broadcast
        let used: BTreeSet<Ipv4Addr> = [Ipv4Addr::new(10, 0, 0, 2)].into();
        assert_eq!(allocate(&cidr, &used), None);
    }
}
