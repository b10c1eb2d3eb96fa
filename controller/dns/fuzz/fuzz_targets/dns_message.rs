//! Arbitrary bytes through everything the DNS proxy does with a message: reading a client's
//! query (and answering it REFUSED or SERVFAIL), reading a server's answer to it, and learning
//! that answer into the name cache that `toFQDNs` selects from. None may panic, and each keeps
//! its promises: a query read once reads the same from the proxy's own answer, learned names
//! are valid names, and every learned address is one the answer held.
#![no_main]

use libfuzzer_sys::fuzz_target;
use palisade_dns::message::{parse_answer, parse_query};
use palisade_engine::fqdn::{FqdnCache, FqdnLimits};
use palisade_policies::endpoint::EndpointId;
use palisade_policies::fqdn::{FqdnSelector, normalize_name, selected_addresses};

fuzz_target!(|data: &[u8]| {
    // The input is a query, or (split at its first byte) a query and an answer to it.
    if let Ok(q) = parse_query(data) {
        for reply in [q.refused(), q.servfail()] {
            let reply = reply.expect("the proxy's own answers always encode");
            let echoed = parse_answer(&reply, &q.question).expect("its own answer reads back");
            assert!(echoed.addresses.is_empty());
        }
    }
    let Some((&split, rest)) = data.split_first() else {
        return;
    };
    let (query, answer) = rest.split_at(usize::from(split).min(rest.len()));
    let Ok(q) = parse_query(query) else {
        return;
    };
    if q.question.name != "." {
        assert_eq!(
            normalize_name(&q.question.name).as_deref(),
            Ok(q.question.name.as_str())
        );
    }
    let Ok(a) = parse_answer(answer, &q.question) else {
        return;
    };
    if q.question.name != "." {
        assert_eq!(a.names.first(), Some(&q.question.name));
    }
    for n in &a.names {
        assert!(normalize_name(n).is_ok(), "learned name {n:?} is no name");
    }
    let mut cache = FqdnCache::default();
    let limits = FqdnLimits {
        min_ttl: 1,
        max_per_name: 4,
    };
    cache.learn(EndpointId(1), &a.names, &a.addresses, a.ttl, 0, limits);
    let names = cache.names();
    for (name, ips) in names {
        assert!(a.names.contains(name));
        assert!(ips.len() <= limits.max_per_name);
        assert!(ips.iter().all(|ip| a.addresses.contains(ip)));
    }
    let everything = FqdnSelector::pattern("*").expect("valid");
    assert!(selected_addresses(&everything, names).all(|ip| a.addresses.contains(&ip)));
    let back = FqdnCache::restore(&cache.entries());
    assert_eq!(back, cache);
});
