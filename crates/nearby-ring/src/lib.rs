//! Which member of a ring owns a key: **rendezvous** (highest-random-weight)
//! hashing. Every member scores every key; the highest score owns it.
//!
//! Why rendezvous and not a consistent-hash circle with virtual nodes:
//! - **Moves are minimal by construction.** Adding a member moves exactly
//!   the keys it now scores highest on, all onto it; removing one moves only
//!   its own keys. A circle gives the same only in expectation, and its
//!   balance depends on how many virtual nodes each member has.
//! - **Balance needs no tuning.** Each key's owner is a uniform draw over
//!   the members, so shares are within a few per cent of 1/n at any n.
//! - **The cost is O(members) per lookup**, a few nanoseconds each. A ring
//!   of Redis pub/sub servers has tens of members, and a node looks a
//!   channel up when it subscribes, not per message.
//!
//! The score is XXH3-64 of the key, seeded with XXH3-64 of the member's
//! name. XXH3's output is fixed by its specification (since xxHash 0.8.0),
//! unlike `std`'s `DefaultHasher`, so every process, machine and Rust
//! release computes the same owner.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed};

/// A set of members, by name (a pub/sub server's ring name).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ring {
    /// Sorted by name, no duplicates; each with its seed.
    members: Vec<(String, u64)>,
}

/// How strongly `member_seed` claims `key`: the rendezvous score.
pub fn score(member_seed: u64, key: &[u8]) -> u64 {
    xxh3_64_with_seed(key, member_seed)
}

/// A member's seed, from its name.
pub fn seed(name: &str) -> u64 {
    xxh3_64(name.as_bytes())
}

impl Ring {
    /// The ring of these members (duplicates count once; order is
    /// irrelevant).
    pub fn new<I, S>(names: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let mut members: Vec<(String, u64)> = names
            .into_iter()
            .map(|n| {
                let n = n.into();
                let s = seed(&n);
                (n, s)
            })
            .collect();
        members.sort();
        members.dedup_by(|a, b| a.0 == b.0);
        Ring { members }
    }

    /// The member that owns `key`; `None` for an empty ring. Equal scores
    /// (as good as never) go to the greater name, so the answer is the same
    /// everywhere.
    pub fn owner(&self, key: &[u8]) -> Option<&str> {
        self.members
            .iter()
            .max_by(|a, b| (score(a.1, key), &a.0).cmp(&(score(b.1, key), &b.0)))
            .map(|(n, _)| n.as_str())
    }

    /// The members' names, sorted.
    pub fn members(&self) -> impl Iterator<Item = &str> {
        self.members.iter().map(|(n, _)| n.as_str())
    }

    /// How many members.
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// No member.
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// This ring with `name` added.
    pub fn with(&self, name: &str) -> Ring {
        Ring::new(self.members().chain(std::iter::once(name)))
    }

    /// This ring without `name`.
    pub fn without(&self, name: &str) -> Ring {
        Ring::new(self.members().filter(|n| *n != name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    /// The channel names a node routes (`loc:ID`, `inbox:ID`).
    fn keys(n: u32) -> Vec<Vec<u8>> {
        (0..n).map(|i| format!("loc:{i}").into_bytes()).collect()
    }

    fn owners<'a>(ring: &'a Ring, keys: &[Vec<u8>]) -> Vec<&'a str> {
        keys.iter()
            .map(|k| ring.owner(k).expect("non-empty ring"))
            .collect()
    }

    #[test]
    fn the_hash_is_xxh3_as_specified() {
        // Reference vectors of XXH3-64 (xxHash's own test suite): the empty
        // input with seed 0, and with the seed 0x9E3779B185EBCA8D (PRIME64).
        assert_eq!(xxh3_64(b""), 0x2D06_8005_38D3_94C2);
        assert_eq!(
            xxh3_64_with_seed(b"", 0x9E37_79B1_85EB_CA8D),
            0xA8A6_B918_B2F0_364A
        );
    }

    #[test]
    fn an_empty_ring_owns_nothing() {
        assert_eq!(Ring::new(Vec::<String>::new()).owner(b"loc:1"), None);
        assert_eq!(Ring::new(["a"]).owner(b"loc:1"), Some("a"));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(12))]

        /// Order and duplicates of the member list do not matter: every
        /// process that knows the same members computes the same owners.
        #[test]
        fn every_process_computes_the_same_owner(
            names in proptest::collection::btree_set("[a-z0-9:.]{1,12}", 1..8),
            shuffle in any::<u64>(),
        ) {
            let names: Vec<String> = names.into_iter().collect();
            let mut other = names.clone();
            other.extend(names.iter().take(2).cloned()); // duplicates
            let k = other.len();
            other.rotate_left((shuffle % k as u64) as usize);
            other.reverse();
            let (a, b) = (Ring::new(names), Ring::new(other));
            let keys = keys(2_000);
            prop_assert_eq!(owners(&a, &keys), owners(&b, &keys));
        }

        /// With n members each owns 1/n of 100 000 channels, ± 10 %.
        #[test]
        fn members_hold_equal_shares(
            names in proptest::collection::btree_set("redis-[a-z0-9]{1,8}", 2..9),
        ) {
            let ring = Ring::new(names);
            let keys = keys(100_000);
            let mut count: HashMap<&str, usize> = HashMap::new();
            for o in owners(&ring, &keys) {
                *count.entry(o).or_default() += 1;
            }
            let fair = keys.len() as f64 / ring.len() as f64;
            prop_assert_eq!(count.len(), ring.len());
            for (m, c) in count {
                prop_assert!(
                    (c as f64 - fair).abs() <= fair * 0.10,
                    "{} holds {} of {} (fair {:.0})", m, c, keys.len(), fair
                );
            }
        }

        /// Adding a member moves about 1/(n+1) of the channels, all of them
        /// onto the new member.
        #[test]
        fn adding_a_member_moves_only_onto_it(
            names in proptest::collection::btree_set("redis-[a-z0-9]{1,8}", 1..8),
            new in "new-[a-z0-9]{1,8}",
        ) {
            let before = Ring::new(names);
            let after = before.with(&new);
            let keys = keys(100_000);
            let (old, now) = (owners(&before, &keys), owners(&after, &keys));
            let mut moved = 0usize;
            for (o, n) in old.iter().zip(&now) {
                if o != n {
                    prop_assert_eq!(*n, new.as_str(), "moved elsewhere than the new member");
                    moved += 1;
                }
            }
            let expected = keys.len() as f64 / after.len() as f64;
            prop_assert!(
                (moved as f64 - expected).abs() <= expected * 0.10,
                "moved {} of {}, expected about {:.0}", moved, keys.len(), expected
            );
        }

        /// Removing a member moves only that member's channels.
        #[test]
        fn removing_a_member_moves_only_its_channels(
            names in proptest::collection::btree_set("redis-[a-z0-9]{1,8}", 2..9),
            pick in any::<prop::sample::Index>(),
        ) {
            let before = Ring::new(names);
            let gone = pick.get(&before.members().collect::<Vec<_>>()).to_string();
            let after = before.without(&gone);
            prop_assert_eq!(after.len(), before.len() - 1);
            let keys = keys(20_000);
            for (o, n) in owners(&before, &keys).iter().zip(owners(&after, &keys)) {
                if *o == gone {
                    prop_assert_ne!(n, gone.as_str());
                } else {
                    prop_assert_eq!(*o, n, "a channel of a member that stayed moved");
                }
            }
        }
    }
}
