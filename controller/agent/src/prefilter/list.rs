//! The deny list as plain data: which CIDRs, where each comes from, which counter slot it
//! counts in; and the map writes that move the datapath from what it holds to what the list
//! says. No I/O: the maps are behind [`DenyMaps`].

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use ipnetwork::Ipv4Network;

/// What is wrong with a deny-list request or file.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ListError {
    #[error("{input:?} is not a CIDR: {reason}")]
    InvalidCidr { input: String, reason: String },
    #[error("{input:?} has host bits set; the network is {network}")]
    HostBits { input: String, network: Ipv4Network },
    #[error("{input:?} is IPv6; the prefilter (like the datapath) filters IPv4 only")]
    Ipv6 { input: String },
    #[error("the prefilter deny list is full ({capacity} entries); cannot add {cidr}")]
    Full { cidr: Ipv4Network, capacity: u32 },
    #[error("{cidr} is not in the prefilter deny list")]
    NotListed { cidr: Ipv4Network },
    #[error("{cidr} comes from the prefilter file {}; remove it there and restart the agent", file.display())]
    FromFile { cidr: Ipv4Network, file: PathBuf },
    #[error("{}:{line}: {source}", path.display())]
    FileLine {
        path: PathBuf,
        line: usize,
        #[source]
        source: Box<ListError>,
    },
    #[error("no CIDR given")]
    Empty,
}

/// Parses one CIDR (`192.0.2.0/24`; a bare address is a /32). Host bits must be clear, so
/// a typo never denies more or less than was meant.
pub fn parse_cidr(input: &str) -> Result<Ipv4Network, ListError> {
    let s = input.trim();
    if s.contains(':') {
        return Err(ListError::Ipv6 {
            input: input.to_string(),
        });
    }
    let (addr, len) = match s.split_once('/') {
        Some((a, l)) => {
            let len: u8 = l.parse().map_err(|_| ListError::InvalidCidr {
                input: input.to_string(),
                reason: format!("prefix length {l:?} is not a number from 0 to 32"),
            })?;
            (a, len)
        }
        None => (s, 32),
    };
    let addr: Ipv4Addr = addr.parse().map_err(|_| ListError::InvalidCidr {
        input: input.to_string(),
        reason: format!("{addr:?} is not an IPv4 address"),
    })?;
    let net = Ipv4Network::new(addr, len).map_err(|_| ListError::InvalidCidr {
        input: input.to_string(),
        reason: format!("prefix length {len} is more than 32"),
    })?;
    if net.network() != addr {
        return Err(ListError::HostBits {
            input: input.to_string(),
            network: Ipv4Network::new(net.network(), len).unwrap_or(net),
        });
    }
    Ok(net)
}

/// Parses a list: one CIDR a line, `#` starts a comment, blank lines are skipped. An error
/// names the file and line.
pub fn parse_list(text: &str, path: &Path) -> Result<Vec<Ipv4Network>, ListError> {
    let mut out = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        out.push(parse_cidr(line).map_err(|e| ListError::FileLine {
            path: path.to_path_buf(),
            line: i + 1,
            source: Box::new(e),
        })?);
    }
    Ok(out)
}

/// The list in the format `parse_list` reads.
pub fn render_list<'a>(nets: impl IntoIterator<Item = &'a Ipv4Network>) -> String {
    let mut s =
        String::from("# Palisade prefilter entries added through the API; one CIDR a line.\n");
    for n in nets {
        s.push_str(&n.to_string());
        s.push('\n');
    }
    s
}

/// The prefilter's maps, as the list needs them.
pub trait DenyMaps {
    type Error;
    /// Inserts or replaces the entry for `net`, counting in `slot`. With `fresh`, the slot's
    /// counters are zeroed first (it may have counted for an entry since removed).
    fn insert(&mut self, net: Ipv4Network, slot: u32, fresh: bool) -> Result<(), Self::Error>;
    fn remove(&mut self, net: Ipv4Network) -> Result<(), Self::Error>;
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    pub slot: u32,
    pub from_file: bool,
    pub from_api: bool,
}

/// The deny list and where each entry comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DenyList {
    entries: BTreeMap<Ipv4Network, Entry>,
    capacity: u32,
    file: Option<PathBuf>,
}

/// Map writes: inserts first, removals last, so nothing meant to stay denied is ever missing.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// (CIDR, slot, fresh).
    pub inserts: Vec<(Ipv4Network, u32, bool)>,
    pub removals: Vec<Ipv4Network>,
}

impl Plan {
    /// Applies the plan; on a failed write, undoes the inserts it made that were not there
    /// before (best effort) and returns the error.
    pub fn apply<M: DenyMaps>(&self, maps: &mut M) -> Result<(), M::Error> {
        for (i, (net, slot, fresh)) in self.inserts.iter().enumerate() {
            if let Err(e) = maps.insert(*net, *slot, *fresh) {
                for (done, _, was_fresh) in &self.inserts[..i] {
                    if *was_fresh {
                        let _ = maps.remove(*done);
                    }
                }
                return Err(e);
            }
        }
        for net in &self.removals {
            maps.remove(*net)?;
        }
        Ok(())
    }
}

impl DenyList {
    /// The list the agent starts with: the file's entries and the API's saved ones, reusing
    /// the slots (and so the counters) of the entries the datapath already holds. The plan
    /// adds what is missing and then removes what no source lists any more.
    pub fn reconcile(
        held: &[(Ipv4Network, u32)],
        file: Option<(&Path, &[Ipv4Network])>,
        api: &[Ipv4Network],
        capacity: u32,
    ) -> Result<(Self, Plan), ListError> {
        let mut list = Self {
            entries: BTreeMap::new(),
            capacity,
            file: file.map(|(p, _)| p.to_path_buf()),
        };
        let held_slots: BTreeMap<Ipv4Network, u32> = held
            .iter()
            .copied()
            .filter(|(_, slot)| *slot < capacity)
            .collect();
        let mut wanted: BTreeMap<Ipv4Network, (bool, bool)> = BTreeMap::new();
        for n in file.map_or(&[][..], |(_, nets)| nets) {
            wanted.entry(*n).or_default().0 = true;
        }
        for n in api {
            wanted.entry(*n).or_default().1 = true;
        }
        let mut plan = Plan::default();
        // Held entries keep their slot, unless two held entries share one (then the second
        // gets a fresh one).
        let mut used = BTreeSet::new();
        for (net, (from_file, from_api)) in &wanted {
            if let Some(slot) = held_slots.get(net)
                && used.insert(*slot)
            {
                list.entries.insert(
                    *net,
                    Entry {
                        slot: *slot,
                        from_file: *from_file,
                        from_api: *from_api,
                    },
                );
            }
        }
        for (net, (from_file, from_api)) in &wanted {
            if list.entries.contains_key(net) {
                continue;
            }
            let slot = (0..capacity)
                .find(|s| !used.contains(s))
                .ok_or(ListError::Full {
                    cidr: *net,
                    capacity,
                })?;
            used.insert(slot);
            list.entries.insert(
                *net,
                Entry {
                    slot,
                    from_file: *from_file,
                    from_api: *from_api,
                },
            );
            plan.inserts.push((*net, slot, true));
        }
        for (net, slot) in held {
            match list.entries.get(net) {
                Some(e) if e.slot == *slot => {}
                // Held under another slot: rewrite it with the one the list chose.
                Some(e) => plan.inserts.push((*net, e.slot, true)),
                None => plan.removals.push(*net),
            }
        }
        Ok((list, plan))
    }

    pub fn entries(&self) -> impl Iterator<Item = (&Ipv4Network, &Entry)> {
        self.entries.iter()
    }

    pub fn capacity(&self) -> u32 {
        self.capacity
    }

    /// The entries the API added (what the agent saves).
    pub fn api_entries(&self) -> impl Iterator<Item = &Ipv4Network> {
        self.entries
            .iter()
            .filter(|(_, e)| e.from_api)
            .map(|(n, _)| n)
    }

    /// Adds CIDRs through the API: all or none. Entries already listed (by the file or the
    /// API) only gain the API as a source.
    pub fn add(&self, nets: &[Ipv4Network]) -> Result<(Self, Plan), ListError> {
        if nets.is_empty() {
            return Err(ListError::Empty);
        }
        let mut next = self.clone();
        let mut plan = Plan::default();
        let mut used: BTreeSet<u32> = next.entries.values().map(|e| e.slot).collect();
        for net in nets {
            if let Some(e) = next.entries.get_mut(net) {
                e.from_api = true;
                continue;
            }
            let slot = (0..self.capacity)
                .find(|s| !used.contains(s))
                .ok_or(ListError::Full {
                    cidr: *net,
                    capacity: self.capacity,
                })?;
            used.insert(slot);
            next.entries.insert(
                *net,
                Entry {
                    slot,
                    from_file: false,
                    from_api: true,
                },
            );
            plan.inserts.push((*net, slot, true));
        }
        Ok((next, plan))
    }

    /// Deletes CIDRs the API added: all or none. One the file lists cannot be deleted here.
    pub fn delete(&self, nets: &[Ipv4Network]) -> Result<(Self, Plan), ListError> {
        if nets.is_empty() {
            return Err(ListError::Empty);
        }
        let mut next = self.clone();
        let mut plan = Plan::default();
        for net in nets {
            let e = next
                .entries
                .get(net)
                .ok_or(ListError::NotListed { cidr: *net })?;
            if e.from_file {
                return Err(ListError::FromFile {
                    cidr: *net,
                    file: self.file.clone().unwrap_or_default(),
                });
            }
            next.entries.remove(net);
            plan.removals.push(*net);
        }
        Ok((next, plan))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Ipv4Network {
        parse_cidr(s).unwrap()
    }

    /// Maps in memory, recording the writes.
    #[derive(Default)]
    struct FakeMaps {
        held: BTreeMap<Ipv4Network, u32>,
        zeroed: Vec<u32>,
        writes: Vec<String>,
        fail_on: Option<Ipv4Network>,
    }

    impl DenyMaps for FakeMaps {
        type Error = String;
        fn insert(&mut self, n: Ipv4Network, slot: u32, fresh: bool) -> Result<(), String> {
            if self.fail_on == Some(n) {
                return Err(format!("no room for {n}"));
            }
            if fresh {
                self.zeroed.push(slot);
            }
            self.held.insert(n, slot);
            self.writes.push(format!("+{n}"));
            Ok(())
        }
        fn remove(&mut self, n: Ipv4Network) -> Result<(), String> {
            self.held.remove(&n);
            self.writes.push(format!("-{n}"));
            Ok(())
        }
    }

    #[test]
    fn cidrs_parse_strictly_and_say_what_is_wrong() {
        assert_eq!(net("192.0.2.0/24").to_string(), "192.0.2.0/24");
        assert_eq!(net(" 192.0.2.7 ").to_string(), "192.0.2.7/32");
        assert_eq!(net("0.0.0.0/0").prefix(), 0);
        let e = parse_cidr("10.0.0.1/8").unwrap_err();
        assert_eq!(
            e.to_string(),
            "\"10.0.0.1/8\" has host bits set; the network is 10.0.0.0/8"
        );
        assert!(
            parse_cidr("10.0.0.0/33")
                .unwrap_err()
                .to_string()
                .contains("more than 32")
        );
        assert!(
            parse_cidr("10.0.0/8")
                .unwrap_err()
                .to_string()
                .contains("\"10.0.0\" is not an IPv4 address")
        );
        assert!(
            parse_cidr("10.0.0.0/x")
                .unwrap_err()
                .to_string()
                .contains("prefix length \"x\"")
        );
        assert!(matches!(
            parse_cidr("2001:db8::/32"),
            Err(ListError::Ipv6 { .. })
        ));
    }

    #[test]
    fn a_file_error_names_the_file_and_line() {
        let text = "# outside\n192.0.2.0/24\n\n198.51.100.0/24 # lab\n10.0.0.300/8\n";
        let e = parse_list(text, Path::new("/etc/deny.txt")).unwrap_err();
        assert_eq!(
            e.to_string(),
            "/etc/deny.txt:5: \"10.0.0.300/8\" is not a CIDR: \"10.0.0.300\" is not an IPv4 address"
        );
        let ok = parse_list(&text.replace("10.0.0.300/8\n", ""), Path::new("f")).unwrap();
        assert_eq!(ok, vec![net("192.0.2.0/24"), net("198.51.100.0/24")]);
        let saved = render_list(&ok);
        assert_eq!(parse_list(&saved, Path::new("f")).unwrap(), ok);
    }

    #[test]
    fn a_restart_keeps_held_slots_adds_first_and_removes_what_no_source_lists() {
        let held = [(net("192.0.2.0/24"), 3), (net("203.0.113.0/24"), 0)];
        let file = [net("192.0.2.0/24"), net("198.51.100.0/24")];
        let (list, plan) =
            DenyList::reconcile(&held, Some((Path::new("f"), &file)), &[], 8).unwrap();
        let got: Vec<(String, u32)> = list
            .entries()
            .map(|(n, e)| (n.to_string(), e.slot))
            .collect();
        // The held entry keeps slot 3 (and its counters); the new one takes a free slot: 0 is
        // free once 203.0.113.0/24 goes.
        assert_eq!(
            got,
            vec![("192.0.2.0/24".into(), 3), ("198.51.100.0/24".into(), 0)]
        );
        let mut maps = FakeMaps {
            held: held.iter().copied().collect(),
            ..FakeMaps::default()
        };
        plan.apply(&mut maps).unwrap();
        assert_eq!(maps.writes, vec!["+198.51.100.0/24", "-203.0.113.0/24"]);
        assert_eq!(maps.zeroed, vec![0]);
        assert_eq!(maps.held.len(), 2);
    }

    #[test]
    fn an_unchanged_restart_writes_nothing() {
        let held = [(net("192.0.2.0/24"), 0), (net("198.51.100.0/24"), 1)];
        let file = [net("192.0.2.0/24")];
        let api = [net("198.51.100.0/24")];
        let (_, plan) = DenyList::reconcile(&held, Some((Path::new("f"), &file)), &api, 8).unwrap();
        assert_eq!(plan, Plan::default());
    }

    #[test]
    fn add_and_delete_are_all_or_nothing() {
        let (list, _) = DenyList::reconcile(&[], None, &[], 2).unwrap();
        let (list, plan) = list.add(&[net("192.0.2.0/24")]).unwrap();
        assert_eq!(plan.inserts, vec![(net("192.0.2.0/24"), 0, true)]);
        let e = list
            .add(&[net("198.51.100.0/24"), net("203.0.113.0/24")])
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "the prefilter deny list is full (2 entries); cannot add 203.0.113.0/24"
        );
        assert_eq!(list.entries().count(), 1, "a refused add changes nothing");
        let e = list
            .delete(&[net("192.0.2.0/24"), net("10.0.0.0/8")])
            .unwrap_err();
        assert_eq!(
            e,
            ListError::NotListed {
                cidr: net("10.0.0.0/8")
            }
        );
        let (list, plan) = list.delete(&[net("192.0.2.0/24")]).unwrap();
        assert_eq!(plan.removals, vec![net("192.0.2.0/24")]);
        assert_eq!(list.entries().count(), 0);
        assert_eq!(list.add(&[]).unwrap_err(), ListError::Empty);
    }

    #[test]
    fn an_entry_from_the_file_is_not_deleted_through_the_api() {
        let file = [net("192.0.2.0/24")];
        let (list, _) =
            DenyList::reconcile(&[], Some((Path::new("/etc/deny"), &file)), &[], 8).unwrap();
        let (list, plan) = list.add(&[net("192.0.2.0/24")]).unwrap();
        assert!(plan.inserts.is_empty(), "already denied: no write");
        assert_eq!(list.api_entries().count(), 1);
        assert_eq!(
            list.delete(&[net("192.0.2.0/24")]).unwrap_err().to_string(),
            "192.0.2.0/24 comes from the prefilter file /etc/deny; remove it there and restart the agent"
        );
    }

    #[test]
    fn a_failed_write_undoes_the_inserts_before_it() {
        let (list, _) = DenyList::reconcile(&[], None, &[], 8).unwrap();
        let (_, plan) = list
            .add(&[net("192.0.2.0/24"), net("198.51.100.0/24")])
            .unwrap();
        let mut maps = FakeMaps {
            fail_on: Some(net("198.51.100.0/24")),
            ..FakeMaps::default()
        };
        assert!(plan.apply(&mut maps).is_err());
        assert!(maps.held.is_empty());
    }

    #[test]
    fn a_deleted_entrys_slot_is_reused_with_fresh_counters() {
        let (list, _) = DenyList::reconcile(&[], None, &[], 8).unwrap();
        let (list, _) = list
            .add(&[net("192.0.2.0/24"), net("198.51.100.0/24")])
            .unwrap();
        let (list, _) = list.delete(&[net("192.0.2.0/24")]).unwrap();
        let (_, plan) = list.add(&[net("203.0.113.0/24")]).unwrap();
        assert_eq!(plan.inserts, vec![(net("203.0.113.0/24"), 0, true)]);
    }
}
