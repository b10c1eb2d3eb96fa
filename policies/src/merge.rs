//! Two sorted maps walked side by side: what is only in one, what is in both. The compile
//! compares thousands of identities, names and ipcache entries at every change, and one walk
//! over both costs less than a lookup per entry.

use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::iter::Peekable;

/// One key of either map, with its values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side<'a, K, V> {
    Left(&'a K, &'a V),
    Right(&'a K, &'a V),
    Both(&'a K, &'a V, &'a V),
}

/// The keys of `left` and `right` in order, each once.
pub fn merge_join<'a, K: Ord, V>(
    left: &'a BTreeMap<K, V>,
    right: &'a BTreeMap<K, V>,
) -> MergeJoin<'a, K, V> {
    MergeJoin {
        left: left.iter().peekable(),
        right: right.iter().peekable(),
    }
}

pub struct MergeJoin<'a, K, V> {
    left: Peekable<std::collections::btree_map::Iter<'a, K, V>>,
    right: Peekable<std::collections::btree_map::Iter<'a, K, V>>,
}

impl<'a, K: Ord, V> Iterator for MergeJoin<'a, K, V> {
    type Item = Side<'a, K, V>;

    fn next(&mut self) -> Option<Self::Item> {
        let order = match (self.left.peek(), self.right.peek()) {
            (None, None) => return None,
            (Some(_), None) => Ordering::Less,
            (None, Some(_)) => Ordering::Greater,
            (Some((a, _)), Some((b, _))) => a.cmp(b),
        };
        Some(match order {
            Ordering::Less => {
                let (k, v) = self.left.next()?;
                Side::Left(k, v)
            }
            Ordering::Greater => {
                let (k, v) = self.right.next()?;
                Side::Right(k, v)
            }
            Ordering::Equal => {
                let (k, a) = self.left.next()?;
                let (_, b) = self.right.next()?;
                Side::Both(k, a, b)
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_comes_once_in_order_with_its_sides() {
        let a: BTreeMap<u8, char> = [(1, 'a'), (3, 'c'), (5, 'e')].into();
        let b: BTreeMap<u8, char> = [(2, 'B'), (3, 'C'), (6, 'F')].into();
        let got: Vec<Side<'_, u8, char>> = merge_join(&a, &b).collect();
        assert_eq!(
            got,
            vec![
                Side::Left(&1, &'a'),
                Side::Right(&2, &'B'),
                Side::Both(&3, &'c', &'C'),
                Side::Left(&5, &'e'),
                Side::Right(&6, &'F'),
            ]
        );
        assert_eq!(merge_join(&a, &BTreeMap::new()).count(), 3);
    }
}
