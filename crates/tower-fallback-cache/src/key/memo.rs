//! [`KeyMemo`]: the body digests of recent requests, so that a request sent again skips the
//! canonical parse and the hash of its body.
//!
//! Why a repeat can never get a wrong key, and why one tenant learns nothing of another:
//! - An entry is found by a 64-bit hash (xxh3) of the raw body, seeded per process (from
//!   the standard library's random hasher keys) and per partition, then **confirmed** by
//!   comparing the partition and every byte of the body with the ones it was made from. A
//!   hash collision is a miss, never another body's digest.
//! - One slot per hash: a body whose hash collides with a remembered one replaces it (or
//!   misses). There are no chains to walk, so bodies crafted to collide (which the seed
//!   makes impractical anyway) cost at most what a memo that is off costs: one parse.
//! - The partition is part of the hash and of the confirmation: a request finds only what
//!   its own partition sent. The bound is shared, so one partition's traffic can push out
//!   another's entries; that makes the other's next request as slow as without a memo, and
//!   reveals nothing to the one that pushed.
//! - The memo holds raw request bodies in memory (as the in-flight request does), for at
//!   most [`KeyMemo::new`]'s bounds; it is never written anywhere.

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, BuildHasherDefault, Hasher};
use std::sync::Mutex;

use super::{BodyDigest, KeyRules};
use crate::partition::PartitionId;

/// Shards, so that requests on several threads rarely wait for one another.
const SHARDS: usize = 8;

/// What the memo did for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Memo {
    /// The digest was remembered.
    Hit,
    /// It was computed (and remembered, within the bounds).
    Miss,
    /// The memo is off.
    Off,
}

/// Bounded memo from (partition, raw body) to the body's digest under one [`KeyRules`].
pub(crate) struct KeyMemo {
    seed: u64,
    max_entries: usize,
    max_bytes: usize,
    shards: Box<[Mutex<Shard>]>,
}

#[derive(Default)]
struct Shard {
    /// By the seeded hash of (partition, body).
    entries: HashMap<u64, Remembered, BuildHasherDefault<Identity>>,
    /// Insertion order, oldest first: (hash, serial). An entry replaced since has another
    /// serial, and its old place here is skipped.
    order: VecDeque<(u64, u64)>,
    bytes: usize,
    serial: u64,
}

struct Remembered {
    partition: PartitionId,
    body: Box<[u8]>,
    digest: BodyDigest,
    serial: u64,
}

impl KeyMemo {
    /// A memo of at most `max_entries` bodies and `max_bytes` of body bytes in all; either
    /// at 0 turns it off.
    pub(crate) fn new(max_entries: usize, max_bytes: usize) -> Self {
        let seed =
            std::collections::hash_map::RandomState::new().hash_one(0x6b65_795f_6d65_6d6f_u64);
        let on = max_entries > 0 && max_bytes > 0;
        Self {
            seed,
            max_entries: max_entries.div_ceil(SHARDS),
            max_bytes: max_bytes.div_ceil(SHARDS),
            shards: (0..if on { SHARDS } else { 0 })
                .map(|_| Mutex::new(Shard::default()))
                .collect(),
        }
    }

    /// The digest of `body` under `rules`, remembered or computed.
    pub(crate) fn body_digest(
        &self,
        rules: &KeyRules,
        partition: &PartitionId,
        body: &[u8],
    ) -> (BodyDigest, Memo) {
        // A body over a shard's byte bound is never kept: not worth a lookup.
        if self.shards.is_empty() || body.len() > self.max_bytes {
            return (rules.body_digest(body), Memo::Off);
        }
        let hash = self.hash(partition, body);
        let shard = self.shard(hash);
        {
            let shard = shard
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            if let Some(found) = shard.entries.get(&hash)
                && found.partition == *partition
                && *found.body == *body
            {
                return (found.digest, Memo::Hit);
            }
        }
        let digest = rules.body_digest(body);
        let mut shard = shard
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        shard.insert(
            hash,
            *partition,
            body,
            digest,
            self.max_entries,
            self.max_bytes,
        );
        (digest, Memo::Miss)
    }
}

impl KeyMemo {
    /// The seeded hash of (partition, body): the partition's first bytes (themselves a
    /// blake3 output) are mixed into the seed.
    fn hash(&self, partition: &PartitionId, body: &[u8]) -> u64 {
        let mut prefix = [0u8; 8];
        prefix.copy_from_slice(&partition.as_bytes()[..8]);
        xxhash_rust::xxh3::xxh3_64_with_seed(body, self.seed ^ u64::from_le_bytes(prefix))
    }

    /// The high bits pick the shard; the shard's map uses the hash as it is.
    fn shard(&self, hash: u64) -> &Mutex<Shard> {
        &self.shards[(hash >> 61) as usize % self.shards.len()]
    }
}

impl Shard {
    fn insert(
        &mut self,
        hash: u64,
        partition: PartitionId,
        body: &[u8],
        digest: BodyDigest,
        max_entries: usize,
        max_bytes: usize,
    ) {
        self.serial += 1;
        let serial = self.serial;
        let entry = Remembered {
            partition,
            body: body.into(),
            digest,
            serial,
        };
        self.bytes += body.len();
        if let Some(old) = self.entries.insert(hash, entry) {
            self.bytes -= old.body.len();
        }
        self.order.push_back((hash, serial));
        while self.entries.len() > max_entries || self.bytes > max_bytes {
            let Some((hash, serial)) = self.order.pop_front() else {
                break;
            };
            if self.entries.get(&hash).is_some_and(|e| e.serial == serial)
                && let Some(old) = self.entries.remove(&hash)
            {
                self.bytes -= old.body.len();
            }
        }
        // Places of replaced entries: dropped once they are as many as the live ones.
        if self.order.len() > 2 * self.entries.len() + 16 {
            let entries = &self.entries;
            self.order
                .retain(|(hash, serial)| entries.get(hash).is_some_and(|e| e.serial == *serial));
        }
    }
}

/// The seeded hash is the map's hash as it is.
#[derive(Default)]
struct Identity(u64);

impl Hasher for Identity {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            self.0 = (self.0 << 8) | u64::from(byte);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(body: &[u8]) -> BodyDigest {
        KeyRules::default().body_digest(body)
    }

    #[test]
    fn a_repeat_is_remembered_and_gets_the_same_digest() {
        let memo = KeyMemo::new(16, 1 << 20);
        let rules = KeyRules::default();
        let body = br#"{"model":"m","n":1}"#;
        let a = PartitionId::derive(b"a");
        assert_eq!(
            memo.body_digest(&rules, &a, body),
            (digest(body), Memo::Miss)
        );
        assert_eq!(
            memo.body_digest(&rules, &a, body),
            (digest(body), Memo::Hit)
        );
        // Another partition does not find it.
        let b = PartitionId::derive(b"b");
        assert_eq!(
            memo.body_digest(&rules, &b, body),
            (digest(body), Memo::Miss)
        );
        // Another body that canonicalizes alike has the same digest, found on its own.
        let other = br#"{ "n": 1, "model": "m" }"#;
        assert_eq!(
            memo.body_digest(&rules, &a, other),
            (digest(body), Memo::Miss)
        );
    }

    #[test]
    fn a_colliding_hash_is_a_miss_never_another_digest() {
        let rules = KeyRules::default();
        let memo = KeyMemo::new(16, 1 << 20);
        let a = PartitionId::derive(b"a");
        let b = PartitionId::derive(b"b");
        // Under the hash `[1]` has in `a`: another body, then `[1]` of another partition.
        let hash = memo.hash(&a, b"[1]");
        for (partition, body) in [(a, &b"[2]"[..]), (b, &b"[1]"[..])] {
            memo.shard(hash).lock().expect("unpoisoned").insert(
                hash,
                partition,
                body,
                digest(b"[2]"),
                4,
                1024,
            );
            assert_eq!(
                memo.body_digest(&rules, &a, b"[1]"),
                (digest(b"[1]"), Memo::Miss)
            );
            // The miss replaced the colliding entry: one per hash.
            let shard = memo.shard(hash).lock().expect("unpoisoned");
            assert_eq!(shard.entries.len(), 1);
            assert_eq!(shard.bytes, 3);
        }
        assert_eq!(
            memo.body_digest(&rules, &a, b"[1]"),
            (digest(b"[1]"), Memo::Hit)
        );
    }

    #[test]
    fn bounded_by_entries_and_bytes_and_off_at_zero() {
        let rules = KeyRules::default();
        let a = PartitionId::derive(b"a");
        let memo = KeyMemo::new(SHARDS * 2, 1 << 20);
        for n in 0..1000 {
            memo.body_digest(&rules, &a, format!("[{n}]").as_bytes());
        }
        let entries: usize = memo
            .shards
            .iter()
            .map(|s| s.lock().expect("unpoisoned").entries.len())
            .sum();
        assert!(entries <= SHARDS * 2, "{entries}");
        for shard in memo.shards.iter() {
            assert!(shard.lock().expect("unpoisoned").order.len() <= 2 * 2 + 16);
        }

        let memo = KeyMemo::new(1000, SHARDS * 64);
        for n in 0..1000 {
            memo.body_digest(&rules, &a, format!("[{n:>30}]").as_bytes());
        }
        for shard in memo.shards.iter() {
            assert!(shard.lock().expect("unpoisoned").bytes <= 64);
        }
        // A body over a shard's bound is not kept.
        let big = vec![b' '; 65];
        assert_eq!(memo.body_digest(&rules, &a, &big).1, Memo::Off);

        for off in [KeyMemo::new(0, 1 << 20), KeyMemo::new(16, 0)] {
            assert_eq!(
                off.body_digest(&rules, &a, b"[1]"),
                (digest(b"[1]"), Memo::Off)
            );
            assert_eq!(
                off.body_digest(&rules, &a, b"[1]"),
                (digest(b"[1]"), Memo::Off)
            );
        }
    }

    proptest::proptest! {
        /// The memo's digest is the direct one, for any body sent any number of times, in
        /// any partition, whatever the memo evicted on the way.
        #[test]
        fn the_memo_and_the_direct_path_give_equal_keys(
            bodies in proptest::collection::vec(
                proptest::prop_oneof![
                    "\\{\"model\":\"[a-c]\",\"n\":[0-9]\\}",
                    "\\{ \"n\" : [0-9] , \"model\" : \"[a-c]\" \\}",
                    "\\[[0-9. e-]{0,6}\\]",
                    "[ -~]{0,12}",
                ],
                1..40,
            ),
            partitions in proptest::collection::vec(0u8..3, 40),
            bound in 1usize..12,
        ) {
            let rules = KeyRules::default().ignore_fields(["n"]);
            let memo = KeyMemo::new(bound, 64 * bound);
            let (parts, ()) = http::Request::post("/v1/chat/completions")
                .body(())
                .expect("valid request")
                .into_parts();
            for _round in 0..3 {
                for (body, p) in bodies.iter().zip(&partitions) {
                    let partition = PartitionId::derive(&[*p]);
                    let (remembered, _) = memo.body_digest(&rules, &partition, body.as_bytes());
                    proptest::prop_assert_eq!(
                        rules.key_of_digest(&partition, &parts, &remembered),
                        rules.key(&partition, &parts, body.as_bytes())
                    );
                }
            }
        }
    }
}
