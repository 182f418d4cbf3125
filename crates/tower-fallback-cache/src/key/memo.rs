//! [`KeyMemo`]: the body digests of recent requests, so that a request sent again skips the
//! canonical parse and the hash of its body.
//!
//! Why a repeat can never get a wrong key, and why one tenant learns nothing of another:
//! - An entry is found by a 64-bit hash (foldhash, its quality variant) of the raw body,
//!   seeded per process (foldhash's random shared seed, and a seed from the standard
//!   library's random hasher keys) and per partition, then **confirmed** by comparing the
//!   partition and every byte of the body with the ones it was made from. A hash collision
//!   is a miss, never another body's digest. The hash only finds; it is not what makes an
//!   answer right, so it need not resist a crafted collision, only spread bodies well and
//!   cost little (about 950 instructions for 2 KiB, against 1,600 for xxh3 without AVX2).
//! - One slot per hash: a body whose hash collides with a remembered one replaces it (or
//!   misses). There are no chains to walk, so bodies crafted to collide (which the seeds
//!   make impractical anyway) cost at most what a memo that is off costs: one parse.
//! - The partition is part of the hash and of the confirmation: a request finds only what
//!   its own partition sent. The bound is shared, so one partition's traffic can push out
//!   another's entries; that makes the other's next request as slow as without a memo, and
//!   reveals nothing to the one that pushed.
//! - With a body, the memo keeps the key it last gave and the fields of the request's head
//!   it was derived from (method, target, media type, the rules' headers: [`KeyRules::write_head`]);
//!   a repeat whose head writes the very same fields gets that key without hashing them
//!   again. The key is a function of those fields and the body's digest, so it is the key
//!   the request would get anyway. Fields that may hold a credential (a `key` query
//!   parameter, a credential header among the rules' headers) are never kept: such a
//!   request has its head hashed every time.
//! - The memo holds raw request bodies (and those heads' fields) in memory, as the
//!   in-flight request does, for at most [`KeyMemo::new`]'s bounds; it is never written
//!   anywhere.

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, BuildHasherDefault, Hasher};
use std::sync::Mutex;

use http::request::Parts;

use super::{BodyDigest, CacheKey, KeyRules, finish, with_fields};
use crate::partition::{Credentials, PartitionId};

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
    /// The headers that carry credentials: a head with one among the rules' headers is
    /// never kept.
    credentials: Credentials,
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
    /// The fields of the last head sent with this body, and the key they gave with it.
    head: Option<(Box<[u8]>, CacheKey)>,
    serial: u64,
}

impl Remembered {
    /// The bytes it counts against the memo's bound.
    fn bytes(&self) -> usize {
        self.body.len() + self.head.as_ref().map_or(0, |(fields, _)| fields.len())
    }
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
            credentials: Credentials::default(),
            max_entries: max_entries.div_ceil(SHARDS),
            max_bytes: max_bytes.div_ceil(SHARDS),
            shards: (0..if on { SHARDS } else { 0 })
                .map(|_| Mutex::new(Shard::default()))
                .collect(),
        }
    }

    /// The memo of a layer whose credentials are `credentials`.
    pub(crate) fn with_credentials(mut self, credentials: Credentials) -> Self {
        self.credentials = credentials;
        self
    }

    /// The key of a request (`parts` and its whole `body`) under `rules`, with what the memo
    /// did for its body. Equal to `rules.key(partition, parts, body)`.
    pub(crate) fn key(
        &self,
        rules: &KeyRules,
        partition: &PartitionId,
        parts: &Parts,
        body: &[u8],
    ) -> (CacheKey, Memo) {
        // A body over a shard's byte bound is never kept: not worth a lookup.
        if self.shards.is_empty() || body.len() > self.max_bytes {
            return (
                rules.key_of_digest(partition, parts, &rules.body_digest(body)),
                Memo::Off,
            );
        }
        let hash = self.hash(partition, body);
        let shard = self.shard(hash);
        with_fields(|fields| {
            rules.write_head(fields, partition, parts);
            let found = {
                let shard = shard
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner());
                match shard.entries.get(&hash) {
                    Some(found) if found.partition == *partition && *found.body == *body => {
                        // A kept head holds no credential, nor then does one equal to it.
                        if let Some((head, key)) = &found.head
                            && **head == **fields
                        {
                            return (*key, Memo::Hit);
                        }
                        Some((found.digest, found.serial))
                    }
                    _ => None,
                }
            };
            // This head is kept if it holds no credential and fits beside its body.
            let head = (body.len() + fields.len() <= self.max_bytes
                && !rules.head_may_hold_credentials(parts, &self.credentials))
            .then(|| Box::<[u8]>::from(&fields[..]));
            let (digest, memo) = match found {
                Some((digest, _)) => (digest, Memo::Hit),
                None => (rules.body_digest(body), Memo::Miss),
            };
            let key = finish(fields, &digest);
            let mut shard = shard
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            match found {
                // The body stays; its head is the one just sent (unless the entry went
                // in the meantime).
                Some((_, serial)) => {
                    if let Some(head) = head {
                        shard.set_head(hash, serial, head, key, self.max_bytes);
                    }
                }
                None => shard.insert(
                    hash,
                    Remembered {
                        partition: *partition,
                        body: body.into(),
                        digest,
                        head: head.map(|head| (head, key)),
                        serial: 0,
                    },
                    self.max_entries,
                    self.max_bytes,
                ),
            }
            (key, memo)
        })
    }
}

impl KeyMemo {
    /// The seeded hash of (partition, body): the partition's first bytes (themselves a
    /// blake3 output) are mixed into the seed.
    fn hash(&self, partition: &PartitionId, body: &[u8]) -> u64 {
        let mut prefix = [0u8; 8];
        prefix.copy_from_slice(&partition.as_bytes()[..8]);
        let mut hasher = foldhash::quality::FoldHasher::with_seed(
            self.seed ^ u64::from_le_bytes(prefix),
            foldhash::SharedSeed::global_random(),
        );
        hasher.write(body);
        hasher.finish()
    }

    /// The high bits pick the shard; the shard's map uses the hash as it is.
    fn shard(&self, hash: u64) -> &Mutex<Shard> {
        &self.shards[(hash >> 61) as usize % self.shards.len()]
    }
}

impl Shard {
    fn insert(&mut self, hash: u64, mut entry: Remembered, max_entries: usize, max_bytes: usize) {
        self.serial += 1;
        let serial = self.serial;
        entry.serial = serial;
        self.bytes += entry.bytes();
        if let Some(old) = self.entries.insert(hash, entry) {
            self.bytes -= old.bytes();
        }
        self.order.push_back((hash, serial));
        self.evict(max_entries, max_bytes);
    }

    /// Gives the entry under `hash` (if it is still the one of `serial`) the fields of a
    /// new head and its key (a head that fits beside the entry's body in `max_bytes`).
    fn set_head(
        &mut self,
        hash: u64,
        serial: u64,
        head: Box<[u8]>,
        key: CacheKey,
        max_bytes: usize,
    ) {
        let Some(entry) = self.entries.get_mut(&hash).filter(|e| e.serial == serial) else {
            return;
        };
        let before = entry.bytes();
        entry.head = Some((head, key));
        let after = entry.bytes();
        self.bytes = self.bytes - before + after;
        self.evict(usize::MAX, max_bytes);
    }

    /// Drops the oldest entries until both bounds hold.
    fn evict(&mut self, max_entries: usize, max_bytes: usize) {
        while self.entries.len() > max_entries || self.bytes > max_bytes {
            let Some((hash, serial)) = self.order.pop_front() else {
                break;
            };
            self.remove(hash, serial);
        }
        // Places of replaced entries: dropped once they are as many as the live ones.
        if self.order.len() > 2 * self.entries.len() + 16 {
            let entries = &self.entries;
            self.order
                .retain(|(hash, serial)| entries.get(hash).is_some_and(|e| e.serial == *serial));
        }
    }

    /// Removes the entry under `hash` if it is still the one of `serial`.
    fn remove(&mut self, hash: u64, serial: u64) {
        if self.entries.get(&hash).is_some_and(|e| e.serial == serial)
            && let Some(old) = self.entries.remove(&hash)
        {
            self.bytes -= old.bytes();
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

    fn post(uri: &str, headers: &[(&str, &str)]) -> Parts {
        let mut request = http::Request::post(uri);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        request.body(()).expect("valid request").into_parts().0
    }

    fn chat() -> Parts {
        post(
            "/v1/chat/completions",
            &[("content-type", "application/json")],
        )
    }

    /// The head kept with the entry of `body` in `partition`, if any.
    fn kept_head(memo: &KeyMemo, partition: &PartitionId, body: &[u8]) -> Option<Vec<u8>> {
        let hash = memo.hash(partition, body);
        let shard = memo.shard(hash).lock().expect("unpoisoned");
        let entry = shard.entries.get(&hash).expect("the body is remembered");
        entry.head.as_ref().map(|(head, _)| head.to_vec())
    }

    #[test]
    fn a_repeat_is_remembered_and_gets_the_same_key() {
        let memo = KeyMemo::new(16, 1 << 20);
        let rules = KeyRules::default();
        let body = br#"{"model":"m","n":1}"#;
        let a = PartitionId::derive(b"a");
        let parts = chat();
        let key = rules.key(&a, &parts, body);
        assert_eq!(memo.key(&rules, &a, &parts, body), (key, Memo::Miss));
        assert_eq!(memo.key(&rules, &a, &parts, body), (key, Memo::Hit));
        // Another partition does not find it.
        let b = PartitionId::derive(b"b");
        assert_eq!(
            memo.key(&rules, &b, &parts, body),
            (rules.key(&b, &parts, body), Memo::Miss)
        );
        // Another body that canonicalizes alike has the same key, found on its own.
        let other = br#"{ "n": 1, "model": "m" }"#;
        assert_eq!(memo.key(&rules, &a, &parts, other), (key, Memo::Miss));
    }

    #[test]
    fn the_same_body_under_another_head_gets_that_heads_key() {
        let memo = KeyMemo::new(16, 1 << 20);
        let rules = KeyRules::default();
        let body = br#"{"model":"m"}"#;
        let a = PartitionId::derive(b"a");
        let heads = [
            chat(),
            post("/v1/responses", &[("content-type", "application/json")]),
            post("/v1/chat/completions", &[("content-type", "text/plain")]),
            post(
                "/v1/chat/completions",
                &[
                    ("content-type", "application/json"),
                    ("openai-project", "p"),
                ],
            ),
            post("https://api.example/v1/chat/completions", &[]),
        ];
        let keys: Vec<CacheKey> = heads.iter().map(|h| rules.key(&a, h, body)).collect();
        for (i, key) in keys.iter().enumerate() {
            assert!(
                !keys[..i].contains(key),
                "heads {i} and another share a key"
            );
        }
        // Each head in turn replaces the one kept, and each gets its own key from the
        // body's remembered digest, twice over.
        for round in 0..2 {
            for (head, key) in heads.iter().zip(&keys) {
                let memo_said = if round == 0 && std::ptr::eq(head, &heads[0]) {
                    Memo::Miss
                } else {
                    Memo::Hit
                };
                assert_eq!(memo.key(&rules, &a, head, body), (*key, memo_said));
                assert_eq!(memo.key(&rules, &a, head, body), (*key, Memo::Hit));
                assert!(kept_head(&memo, &a, body).is_some());
            }
        }
    }

    #[test]
    fn a_head_that_may_hold_a_credential_is_never_kept() {
        let body = br#"{"contents":[]}"#;
        let a = PartitionId::derive(b"a");
        let gemini = post(
            "/v1beta/models/gemini-2.5-flash:generateContent?key=AIza-secret",
            &[("content-type", "application/json")],
        );
        let rules = KeyRules::default();
        let memo = KeyMemo::new(16, 1 << 20);
        for memo_said in [Memo::Miss, Memo::Hit, Memo::Hit] {
            assert_eq!(
                memo.key(&rules, &a, &gemini, body),
                (rules.key(&a, &gemini, body), memo_said)
            );
            assert_eq!(kept_head(&memo, &a, body), None);
        }
        // A query without a `key` parameter is kept.
        let sse = post("/v1beta/models/m:streamGenerateContent?alt=sse", &[]);
        assert_eq!(
            memo.key(&rules, &a, &sse, body),
            (rules.key(&a, &sse, body), Memo::Hit)
        );
        assert!(kept_head(&memo, &a, body).is_some());

        // Rules that key on a credential header: no head is kept, whatever it holds.
        let rules = KeyRules::default().headers([http::header::AUTHORIZATION]);
        let memo = KeyMemo::new(16, 1 << 20);
        let bearer = post(
            "/v1/chat/completions",
            &[("authorization", "Bearer sk-secret")],
        );
        for memo_said in [Memo::Miss, Memo::Hit] {
            assert_eq!(
                memo.key(&rules, &a, &bearer, body),
                (rules.key(&a, &bearer, body), memo_said)
            );
            assert_eq!(kept_head(&memo, &a, body), None);
        }
    }

    #[test]
    fn a_colliding_hash_is_a_miss_never_another_key() {
        let rules = KeyRules::default();
        let memo = KeyMemo::new(16, 1 << 20);
        let a = PartitionId::derive(b"a");
        let b = PartitionId::derive(b"b");
        let parts = chat();
        // Under the hash `[1]` has in `a`: another body with the head `[1]` is sent with,
        // then `[1]` of another partition, each with the key of `[2]`.
        let hash = memo.hash(&a, b"[1]");
        let wrong = rules.key(&a, &parts, b"[2]");
        let head = with_fields(|fields| {
            rules.write_head(fields, &a, &parts);
            Box::<[u8]>::from(&fields[..])
        });
        for (partition, body) in [(a, &b"[2]"[..]), (b, &b"[1]"[..])] {
            memo.shard(hash).lock().expect("unpoisoned").insert(
                hash,
                Remembered {
                    partition,
                    body: body.into(),
                    digest: rules.body_digest(b"[2]"),
                    head: Some((head.clone(), wrong)),
                    serial: 0,
                },
                4,
                1024,
            );
            assert_eq!(
                memo.key(&rules, &a, &parts, b"[1]"),
                (rules.key(&a, &parts, b"[1]"), Memo::Miss)
            );
            // The miss replaced the colliding entry: one per hash, its body and head
            // counted.
            let shard = memo.shard(hash).lock().expect("unpoisoned");
            assert_eq!(shard.entries.len(), 1);
            assert_eq!(shard.bytes, 3 + head.len());
        }
        assert_eq!(
            memo.key(&rules, &a, &parts, b"[1]"),
            (rules.key(&a, &parts, b"[1]"), Memo::Hit)
        );
    }

    #[test]
    fn bounded_by_entries_and_bytes_and_off_at_zero() {
        let rules = KeyRules::default();
        let a = PartitionId::derive(b"a");
        let parts = chat();
        let memo = KeyMemo::new(SHARDS * 2, 1 << 20);
        for n in 0..1000 {
            memo.key(&rules, &a, &parts, format!("[{n}]").as_bytes());
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

        // Bodies and heads count against the bytes: bodies of 32 bytes and heads of
        // over 100 in shards of 256 bytes.
        let memo = KeyMemo::new(1000, SHARDS * 256);
        for n in 0..1000 {
            memo.key(&rules, &a, &parts, format!("[{n:>30}]").as_bytes());
        }
        for shard in memo.shards.iter() {
            let shard = shard.lock().expect("unpoisoned");
            assert!(shard.bytes <= 256, "{}", shard.bytes);
            let counted: usize = shard.entries.values().map(Remembered::bytes).sum();
            assert_eq!(shard.bytes, counted);
        }
        // A body that fits without its head is kept without it.
        let body = vec![b' '; 250];
        memo.key(&rules, &a, &parts, &body);
        assert_eq!(kept_head(&memo, &a, &body), None);
        assert_eq!(memo.key(&rules, &a, &parts, &body).1, Memo::Hit);
        // A body over a shard's bound is not kept.
        let big = vec![b' '; 257];
        assert_eq!(memo.key(&rules, &a, &parts, &big).1, Memo::Off);

        for off in [KeyMemo::new(0, 1 << 20), KeyMemo::new(16, 0)] {
            for _ in 0..2 {
                assert_eq!(
                    off.key(&rules, &a, &parts, b"[1]"),
                    (rules.key(&a, &parts, b"[1]"), Memo::Off)
                );
            }
        }
    }

    proptest::proptest! {
        /// The memo's key is the direct one, for any body sent any number of times with
        /// any of several heads, in any partition, whatever the memo evicted on the way.
        #[test]
        fn the_memo_and_the_direct_path_give_equal_keys(
            requests in proptest::collection::vec(
                (
                    proptest::prop_oneof![
                        "\\{\"model\":\"[a-c]\",\"n\":[0-9]\\}",
                        "\\{ \"n\" : [0-9] , \"model\" : \"[a-c]\" \\}",
                        "\\[[0-9. e-]{0,6}\\]",
                        "[ -~]{0,12}",
                    ],
                    0usize..5,
                    0u8..3,
                ),
                1..40,
            ),
            bound in 1usize..12,
        ) {
            let rules = KeyRules::default().ignore_fields(["n"]);
            let memo = KeyMemo::new(bound, 160 * bound);
            let heads = [
                chat(),
                post("/v1/responses", &[]),
                post("/v1/chat/completions", &[("openai-beta", "assistants=v2")]),
                post("/v1beta/models/m:generateContent?key=k", &[]),
                post("/v1beta/models/m:generateContent?key=l", &[]),
            ];
            for _round in 0..3 {
                for (body, head, p) in &requests {
                    let partition = PartitionId::derive(&[*p]);
                    let (remembered, _) =
                        memo.key(&rules, &partition, &heads[*head], body.as_bytes());
                    proptest::prop_assert_eq!(
                        remembered,
                        rules.key(&partition, &heads[*head], body.as_bytes())
                    );
                }
            }
        }
    }
}
