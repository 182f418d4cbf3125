use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use redb::{ReadableTable, ReadableTableMetadata, TableHandle};

use super::*;
use crate::entry::EntryError;

const HOUR: Duration = Duration::from_secs(3600);

fn entry(body: impl Into<Bytes>) -> Arc<CachedResponse> {
    let mut headers = HeaderMap::new();
    headers.insert(
        "content-type",
        "application/json".parse().expect("header value"),
    );
    Arc::new(CachedResponse::new(
        StatusCode::OK,
        headers,
        vec![body.into()],
    ))
}

fn key(i: u32) -> CacheKey {
    CacheKey::from_bytes(*blake3::hash(&i.to_le_bytes()).as_bytes())
}

fn body_of(entry: &CachedResponse) -> Bytes {
    entry.frames().concat().into()
}

async fn body_at(store: &DiskStore, i: u32) -> Option<Bytes> {
    let found = store.get(&key(i)).await.expect("disk get");
    found.map(|entry| body_of(&entry))
}

#[test]
fn a_runtime_without_a_timer_reads_the_store() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = DiskStore::open(dir.path().join("answers.redb")).expect("open");
    // No `enable_time`: the read timeout is the store's own, not a Tokio timer.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a runtime");
    runtime.block_on(async {
        store.put(key(1), entry("kept"), HOUR).await.expect("put");
        store.flush().await.expect("flush");
        assert_eq!(body_at(&store, 1).await.as_deref(), Some(&b"kept"[..]));
        assert_eq!(body_at(&store, 2).await, None);
    });
}

#[tokio::test]
async fn an_answer_is_visible_at_once_and_after_a_reopen() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("answers.redb");
    let store = DiskStore::open(&path).expect("open");
    let original = entry("one");
    store
        .put(key(1), original.clone(), HOUR)
        .await
        .expect("put");
    assert_eq!(body_at(&store, 1).await.as_deref(), Some(&b"one"[..]));
    store.flush().await.expect("flush");
    assert_eq!(store.usage().entries, Some(1));
    drop(store);

    let store = DiskStore::open(&path).expect("reopen");
    let found = store
        .get(&key(1))
        .await
        .expect("get")
        .expect("kept across a reopen");
    assert_eq!(*found, *original, "status, headers, body and time are kept");
    assert_eq!(store.usage().entries, Some(1));
}

#[tokio::test]
async fn dropping_the_store_commits_what_is_queued() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("answers.redb");
    let store = DiskStore::open(&path).expect("open");
    for i in 0..300 {
        store
            .put(key(i), entry(format!("answer {i}")), HOUR)
            .await
            .expect("put");
    }
    drop(store);

    let store = DiskStore::open(&path).expect("reopen");
    for i in 0..300 {
        assert_eq!(
            body_at(&store, i).await,
            Some(Bytes::from(format!("answer {i}"))),
            "answer {i}"
        );
    }
}

#[tokio::test]
async fn a_newer_answer_replaces_the_older_one() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = DiskStore::open(dir.path().join("answers.redb")).expect("open");
    store.put(key(1), entry("first"), HOUR).await.expect("put");
    store.flush().await.expect("flush");
    let one = store.usage();
    store.put(key(1), entry("second"), HOUR).await.expect("put");
    store.flush().await.expect("flush");
    assert_eq!(body_at(&store, 1).await.as_deref(), Some(&b"second"[..]));
    assert_eq!(store.usage().entries, Some(1));
    // "second" is one byte longer than "first".
    assert_eq!(store.usage().bytes.map(|b| b - 1), one.bytes);
}

#[tokio::test]
async fn a_removed_answer_is_gone_before_and_after_its_commit() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = DiskStore::open(dir.path().join("answers.redb")).expect("open");
    store.put(key(1), entry("one"), HOUR).await.expect("put");
    store.flush().await.expect("flush");
    store.remove(&key(1)).await.expect("remove");
    assert_eq!(body_at(&store, 1).await, None);
    store.flush().await.expect("flush");
    assert_eq!(body_at(&store, 1).await, None);
    let usage = store.usage();
    assert_eq!(
        (usage.entries, usage.bytes),
        (Some(0), Some(0)),
        "{usage:?}"
    );
}

/// An expired answer is never served and is swept, through the expiry index; an answer
/// written again with a longer time to live is not swept with its first write, and the
/// indexes keep one row for each answer held.
#[tokio::test]
async fn an_expired_answer_is_not_served_and_is_swept() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = DiskStore::builder(dir.path().join("answers.redb"))
        .sweep_interval(Duration::from_millis(50))
        .open()
        .expect("open");
    let ttl = Duration::from_secs(2);
    let put_at = std::time::Instant::now();
    store.put(key(1), entry("short"), ttl).await.expect("put");
    store.put(key(2), entry("long"), HOUR).await.expect("put");
    store.put(key(3), entry("first"), ttl).await.expect("put");
    store.flush().await.expect("flush");
    store.put(key(3), entry("again"), HOUR).await.expect("put");
    assert!(body_at(&store, 1).await.is_some());
    store.flush().await.expect("flush");
    assert_eq!(store.usage().entries, Some(3));
    assert_eq!(
        index_rows(&store),
        (3, 3),
        "the first write's rows went with it"
    );

    tokio::time::sleep_until((put_at + ttl + Duration::from_millis(100)).into()).await;
    assert_eq!(
        body_at(&store, 1).await,
        None,
        "expired answers are never served"
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while store.usage().entries != Some(2) && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        store.usage().entries,
        Some(2),
        "the sweep removed the expired answer"
    );
    assert!(body_at(&store, 2).await.is_some());
    assert_eq!(body_at(&store, 3).await.as_deref(), Some(&b"again"[..]));
    assert_eq!(
        index_rows(&store),
        (2, 2),
        "one row of each index per answer"
    );
}

/// The rows of the expiry index and of the age index.
fn index_rows(store: &DiskStore) -> (u64, u64) {
    let (db, _) = store.shared.database().expect("the file is open");
    let txn = db.begin_read().expect("read txn");
    let expiry = txn.open_table(EXPIRY).expect("expiry").len().expect("len");
    let by_age = txn.open_table(BY_AGE).expect("by_age").len().expect("len");
    (expiry, by_age)
}

#[tokio::test]
async fn past_max_bytes_the_oldest_answers_are_evicted() {
    let dir = tempfile::tempdir().expect("temp dir");
    let max = 64 * 1024;
    let store = DiskStore::builder(dir.path().join("answers.redb"))
        .max_bytes(max)
        .open()
        .expect("open");
    // 100 answers of 4 KiB: about six times the bound.
    for i in 0..100 {
        store
            .put(key(i), entry(vec![b'x'; 4096]), HOUR)
            .await
            .expect("put");
        if i % 10 == 9 {
            store.flush().await.expect("flush");
        }
    }
    let usage = store.usage();
    assert!(usage.bytes.expect("bytes") <= max, "{usage:?}");
    assert!(
        body_at(&store, 0).await.is_none(),
        "the oldest answer is evicted"
    );
    assert!(
        body_at(&store, 99).await.is_some(),
        "the newest answer is kept"
    );
    let kept = usage.entries.expect("entries");
    assert!((10..100).contains(&kept), "{usage:?}");
}

#[tokio::test]
async fn a_corrupt_value_is_an_error_never_an_answer() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = DiskStore::open(dir.path().join("answers.redb")).expect("open");
    store.put(key(1), entry("intact"), HOUR).await.expect("put");
    store.flush().await.expect("flush");

    tamper(&store, |txn| {
        let mut table = txn.open_table(ENTRIES).expect("entries table");
        let mut record = table
            .get(key(1).as_bytes())
            .expect("get")
            .expect("held")
            .value()
            .to_vec();
        let last = record.len() - 1;
        record[last] ^= 0x01;
        table
            .insert(key(1).as_bytes(), record.as_slice())
            .expect("insert");
        table
            .insert(key(2).as_bytes(), &b"short"[..])
            .expect("insert");
    });

    let flipped = store
        .get(&key(1))
        .await
        .expect_err("a flipped byte is caught");
    assert!(
        matches!(flipped, StoreError::Corrupt(EntryError::Checksum)),
        "{flipped}"
    );
    let short = store
        .get(&key(2))
        .await
        .expect_err("a cut record is caught");
    assert!(
        matches!(short, StoreError::Corrupt(EntryError::Length { .. })),
        "{short}"
    );
}

#[cfg(unix)]
#[test]
fn the_file_is_readable_by_its_owner_only() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("answers.redb");
    let store = DiskStore::open(&path).expect("open");
    let mode = std::fs::metadata(&path)
        .expect("metadata")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    drop(store);
}

#[test]
fn a_missing_directory_is_named_in_the_error() {
    let dir = tempfile::tempdir().expect("temp dir");
    let missing = dir.path().join("no-such-dir");
    let error = DiskStore::open(missing.join("answers.redb")).expect_err("no directory");
    let message = error.to_string();
    assert!(message.contains("does not exist"), "{message}");
    assert!(
        message.contains(&missing.display().to_string()),
        "{message}"
    );
}

#[test]
fn a_file_that_is_not_a_store_is_refused() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("notes.txt");
    std::fs::write(&path, vec![b'n'; 8192]).expect("write");
    let error = DiskStore::open(&path).expect_err("not a redb file");
    assert!(error.to_string().contains("as a disk store"), "{error}");
    assert_eq!(
        std::fs::read(&path).expect("read"),
        vec![b'n'; 8192],
        "the file is left as it was"
    );
}

/// A damaged table definition (the fixed width, alignment or type name redb keeps for each
/// table) is damage, never a file of another kind: each byte around every stored type name
/// is flipped in turn, and the file either opens or is reported damaged.
#[tokio::test]
async fn a_damaged_table_definition_is_damage_not_a_foreign_file() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("answers.redb");
    {
        let store = DiskStore::open(&path).expect("a new store");
        for i in 0..3 {
            let body = vec![b'a' + i as u8; 1000 + 9000 * i as usize];
            store.put(key(i), entry(body), HOUR).await.expect("put");
        }
        store.flush().await.expect("flush");
    }
    let intact = std::fs::read(&path).expect("the file");
    let mut damaged = 0;
    let mut tried = 0;
    for name in ["(u64,u64)", "(u64,u32)", "[u8;32]"] {
        let name = name.as_bytes();
        let found: Vec<usize> = intact
            .windows(name.len())
            .enumerate()
            .filter(|(_, window)| *window == name)
            .map(|(at, _)| at)
            .collect();
        assert!(
            !found.is_empty(),
            "{} is stored",
            String::from_utf8_lossy(name)
        );
        for at in found {
            for byte in at.saturating_sub(24)..at + name.len() {
                let mut copy = intact.clone();
                copy[byte] ^= 0xff;
                std::fs::write(&path, &copy).expect("the damaged copy");
                tried += 1;
                let opened = DiskStore::builder(&path)
                    .on_corrupt(OnCorrupt::Refuse)
                    .open();
                if let Err(error) = opened {
                    assert!(
                        error.to_string().contains("is damaged"),
                        "byte {byte} ({} at {at}): {error}",
                        String::from_utf8_lossy(name)
                    );
                    damaged += 1;
                }
            }
        }
    }
    assert!(
        damaged > 0,
        "none of {tried} damaged copies was found damaged"
    );
}

/// Damage at the head of each page (where redb keeps a page's kind, its allocator state
/// and its tree headers), a byte at a time: the file opens and serves each answer whole or
/// not at all, or is reported damaged; never another error, a panic, an abort of the
/// process (a panic while redb unwinds from another, in a commit on a damaged file), or a
/// different answer. Dropping each store closes its file under the guard too.
#[tokio::test]
async fn damage_at_any_page_head_is_reported_or_costs_answers_never_a_wrong_one() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("answers.redb");
    let bodies: Vec<Bytes> = (0..3)
        .map(|i| Bytes::from(vec![b'a' + i as u8; 1000 + 9000 * i as usize]))
        .collect();
    {
        let store = DiskStore::open(&path).expect("a new store");
        for (i, body) in bodies.iter().enumerate() {
            store
                .put(key(i as u32), entry(body.clone()), HOUR)
                .await
                .expect("put");
        }
        store.flush().await.expect("flush");
    }
    let intact = std::fs::read(&path).expect("the file");
    let (mut opened, mut damaged, mut served) = (0, 0, 0);
    for page in (0..intact.len()).step_by(4096) {
        for byte in page..(page + 16).min(intact.len()) {
            let mut copy = intact.clone();
            copy[byte] ^= 0xff;
            std::fs::write(&path, &copy).expect("the damaged copy");
            let store = match DiskStore::builder(&path)
                .on_corrupt(OnCorrupt::Refuse)
                .open()
            {
                Ok(store) => store,
                Err(error) => {
                    assert!(
                        error.to_string().contains("is damaged"),
                        "byte {byte}: {error}"
                    );
                    damaged += 1;
                    continue;
                }
            };
            opened += 1;
            for (i, body) in bodies.iter().enumerate() {
                if let Ok(Some(found)) = store.get(&key(i as u32)).await {
                    assert_eq!(&body_of(&found), body, "byte {byte}: answer {i}");
                    served += 1;
                }
            }
        }
    }
    assert!(
        opened > 0 && damaged > 0,
        "opened {opened}, damaged {damaged}"
    );
    // Damage in a page no answer is read from costs nothing: answers were checked, and
    // served whole, not only refused.
    assert!(served > 0, "opened {opened} times, no answer served");
}

#[test]
fn a_file_already_open_is_refused() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("answers.redb");
    let first = DiskStore::open(&path).expect("open");
    let error = DiskStore::open(&path).expect_err("one store per file");
    assert!(error.to_string().contains("already open"), "{error}");
    drop(first);
    DiskStore::open(&path).expect("free again once the first store is dropped");
}

/// A body of `len` bytes that differ from one position to the next, so that a chunk put
/// back in the wrong place changes the answer.
fn numbered_body(len: usize) -> Bytes {
    (0..len).map(|i| (i % 251) as u8).collect()
}

/// The write sequence of the record under `key`.
fn sequence_of(store: &DiskStore, key: &CacheKey) -> u64 {
    let (db, _) = store.shared.database().expect("the file is open");
    let txn = db.begin_read().expect("read txn");
    let table = txn.open_table(ENTRIES).expect("entries table");
    let head = table.get(key.as_bytes()).expect("get").expect("held");
    Record::parse(head.value()).expect("a record").sequence
}

/// The lengths of the page chunks, then of the quarter chunks, of the record under `key`,
/// checked to be numbered from 0 without a gap.
fn chunk_rows(store: &DiskStore, key: &CacheKey) -> (Vec<usize>, Vec<usize>) {
    let sequence = sequence_of(store, key);
    let (db, _) = store.shared.database().expect("the file is open");
    let txn = db.begin_read().expect("read txn");
    let rows = |definition: TableDefinition<'_, (u64, u32), &[u8]>| {
        let table = txn.open_table(definition).expect("chunks table");
        let rows = table
            .range((sequence, 0)..=(sequence, u32::MAX))
            .expect("range")
            .map(|row| row.expect("row"));
        (0..)
            .zip(rows)
            .map(|(number, (key, chunk))| {
                assert_eq!(key.value().1, number, "numbered in order");
                chunk.value().len()
            })
            .collect::<Vec<_>>()
    };
    (rows(CHUNKS), rows(SMALL_CHUNKS))
}

/// Every chunk row in the file.
fn all_chunks(store: &DiskStore) -> u64 {
    let (db, _) = store.shared.database().expect("the file is open");
    let txn = db.begin_read().expect("read txn");
    let len = |definition: TableDefinition<'_, (u64, u32), &[u8]>| {
        let table = txn.open_table(definition).expect("chunks table");
        table.len().expect("len")
    };
    len(CHUNKS) + len(SMALL_CHUNKS)
}

/// A store holding answers 1 to `count`, each a 10,000-byte body (a page chunk of 8 KiB
/// and a quarter chunk), committed.
async fn long_answers(count: u32) -> (tempfile::TempDir, DiskStore) {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = DiskStore::open(dir.path().join("answers.redb")).expect("open");
    for i in 1..=count {
        store
            .put(key(i), entry(numbered_body(10_000)), HOUR)
            .await
            .expect("put");
    }
    store.flush().await.expect("flush");
    (dir, store)
}

/// Alters the store's file behind its back, in one committed write transaction.
fn tamper(store: &DiskStore, alter: impl FnOnce(&redb::WriteTransaction)) {
    let (db, _) = store.shared.database().expect("the file is open");
    let txn = db.begin_write().expect("write txn");
    alter(&txn);
    txn.commit().expect("commit");
}

/// Answers longer than about 1 KiB are cut into chunks and read back whole, byte for
/// byte, before and after a reopen; replacing or removing one leaves no chunk behind, and
/// the store's weight comes back to nothing.
#[tokio::test]
async fn a_long_answer_is_kept_in_chunks_and_read_back_whole() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("answers.redb");
    let store = DiskStore::open(&path).expect("open");
    // Each body with the page chunks (the largest first, each filling a page of 4, 8, 16,
    // 32 or 64 KiB) and quarter chunks its record is cut into (a record is the body and
    // about 100 bytes more).
    const PAGE: [usize; 5] = [4_076, 8_172, 16_364, 32_748, 65_516];
    const QUARTER: usize = 1_007;
    let lens: [(usize, &[usize], &[usize]); 10] = [
        (0, &[], &[]),
        (800, &[], &[]),
        (1_000, &[], &[QUARTER]),
        (2_100, &[], &[QUARTER; 2]),
        (4_096, &[PAGE[0]], &[]),
        (6_500, &[PAGE[0]], &[QUARTER; 2]),
        (3 * 4_076 + 17, &[PAGE[1], PAGE[0]], &[]),
        (100_000, &[PAGE[4], PAGE[3]], &[QUARTER]),
        (16_384, &[PAGE[2]], &[]),
        (200_000, &[PAGE[4]; 3], &[QUARTER; 3]),
    ];
    for (i, (len, _, _)) in (0..).zip(lens) {
        store
            .put(key(i), entry(numbered_body(len)), HOUR)
            .await
            .expect("put");
    }
    store.flush().await.expect("flush");
    for (i, (len, pages, quarters)) in (0..).zip(lens) {
        assert_eq!(
            body_at(&store, i).await,
            Some(numbered_body(len)),
            "{len} B"
        );
        assert_eq!(
            chunk_rows(&store, &key(i)),
            (pages.to_vec(), quarters.to_vec()),
            "{len} B"
        );
    }
    let held = all_chunks(&store);
    let listed = store.list().expect("list");
    assert_eq!(listed.len(), lens.len());
    assert!(
        listed.iter().any(|entry| entry.bytes > 200_000),
        "{listed:?}"
    );
    drop(store);

    let store = DiskStore::open(&path).expect("reopen");
    for (i, (len, _, _)) in (0..).zip(lens) {
        assert_eq!(
            body_at(&store, i).await,
            Some(numbered_body(len)),
            "{len} B"
        );
    }
    let exported = store.export().await.expect("export");
    assert_eq!(exported.len(), lens.len());
    let other = DiskStore::open(dir.path().join("copy.redb")).expect("open");
    other.import(exported).await.expect("import");
    other.flush().await.expect("flush");
    for (i, (len, _, _)) in (0..).zip(lens) {
        assert_eq!(
            body_at(&other, i).await,
            Some(numbered_body(len)),
            "copied {len} B"
        );
    }

    // A long answer replaced by a short one, and another removed: their chunks go.
    let count = |(pages, quarters): (Vec<usize>, Vec<usize>)| (pages.len() + quarters.len()) as u64;
    let gone = count(chunk_rows(&store, &key(6))) + count(chunk_rows(&store, &key(7)));
    assert_eq!(gone, 2 + 3);
    store.put(key(7), entry("short"), HOUR).await.expect("put");
    store.remove(&key(6)).await.expect("remove");
    store.flush().await.expect("flush");
    assert_eq!(body_at(&store, 7).await.as_deref(), Some(&b"short"[..]));
    assert_eq!(body_at(&store, 6).await, None);
    assert_eq!(chunk_rows(&store, &key(7)), (vec![], vec![]));
    assert_eq!(all_chunks(&store), held - gone, "the chunks of both went");
    for i in 0..lens.len() as u32 {
        store.remove(&key(i)).await.expect("remove");
    }
    store.flush().await.expect("flush");
    let usage = store.usage();
    assert_eq!(
        (usage.entries, usage.bytes),
        (Some(0), Some(0)),
        "{usage:?}"
    );
    assert_eq!(all_chunks(&store), 0);
}

/// A chunk flipped or missing makes the read an error: never a shorter or altered answer,
/// nor a shorter record in a snapshot. A stray chunk past the end is never read.
#[tokio::test]
async fn a_damaged_chunk_is_an_error_never_a_shorter_answer() {
    let (_dir, store) = long_answers(5).await;
    assert_eq!(chunk_rows(&store, &key(1)), (vec![8_172], vec![1_007]));

    let [one, two, three, four, five] = [1, 2, 3, 4, 5].map(|i| sequence_of(&store, &key(i)));
    tamper(&store, |txn| {
        let mut table = txn.open_table(CHUNKS).expect("chunks table");
        let mut chunk = table
            .get((one, 0))
            .expect("get")
            .expect("held")
            .value()
            .to_vec();
        chunk[100] ^= 0x01;
        table.insert((one, 0), chunk.as_slice()).expect("insert");
        table.remove((two, 0)).expect("remove");
        table.insert((three, 1), &b"more"[..]).expect("insert");
        let mut small = txn.open_table(SMALL_CHUNKS).expect("small chunks table");
        small.remove((four, 0)).expect("remove");
        small.insert((five, 0), &b"short"[..]).expect("insert");
    });

    let flipped = store.get(&key(1)).await.expect_err("a flipped byte");
    assert!(
        matches!(flipped, StoreError::Corrupt(EntryError::Checksum)),
        "{flipped}"
    );
    for (i, what) in [
        (2, "a missing page chunk"),
        (4, "a missing quarter chunk"),
        (5, "a quarter chunk cut short"),
    ] {
        let error = store.get(&key(i)).await.expect_err(what);
        assert!(
            matches!(error, StoreError::Corrupt(EntryError::Length { .. })),
            "{what}: {error}"
        );
    }
    assert_eq!(body_at(&store, 3).await, Some(numbered_body(10_000)));
    // A snapshot leaves out the records that are not whole (export does not decode).
    let mut exported: Vec<_> = store
        .export()
        .await
        .expect("export")
        .iter()
        .map(|entry| entry.key)
        .collect();
    exported.sort_by_key(|key| *key.as_bytes());
    let mut whole = vec![key(1), key(3)];
    whole.sort_by_key(|key| *key.as_bytes());
    assert_eq!(exported, whole);
}

/// A head whose entry header announces a length it does not have (a forged or flipped
/// length) is a damaged entry: the read allocates nothing for the length and fails at
/// once, and the next answer under the key replaces it and its chunks.
#[tokio::test]
async fn a_head_announcing_a_forged_length_is_an_error_and_is_replaced() {
    let (_dir, store) = long_answers(2).await;
    let before = store.usage().bytes;

    tamper(&store, |txn| {
        let mut table = txn.open_table(ENTRIES).expect("entries table");
        for (i, announced) in [(1, u64::MAX / 2), (2, 20_000)] {
            let mut head = table
                .get(key(i).as_bytes())
                .expect("get")
                .expect("held")
                .value()
                .to_vec();
            // The entry's length field: after the record's 16 bytes, the magic and version.
            head[16 + 6..16 + 14].copy_from_slice(&announced.to_le_bytes());
            table
                .insert(key(i).as_bytes(), head.as_slice())
                .expect("insert");
        }
    });

    for i in 1..=2 {
        let error = store.get(&key(i)).await.expect_err("a forged length");
        assert!(
            matches!(error, StoreError::Corrupt(EntryError::Length { .. })),
            "{error}"
        );
    }
    store.put(key(1), entry("fresh"), HOUR).await.expect("put");
    store.put(key(2), entry("fresh"), HOUR).await.expect("put");
    store.flush().await.expect("flush");
    assert_eq!(body_at(&store, 1).await.as_deref(), Some(&b"fresh"[..]));
    assert_eq!(
        all_chunks(&store),
        0,
        "the old chunks went with their heads"
    );
    assert!(store.usage().bytes < before, "{:?}", store.usage());
}

/// Writes a file as a release of `layout` (1 or 2) left it: answers 1 to 3 (bodies of
/// 9,000, 20,000 and 300 bytes) and answer 4, already expired, each record whole (layout 1)
/// or cut into 4 KiB pages and quarters (layout 2), indexed by age and by (expiry, key).
fn earlier_file(path: &Path, layout: u64) -> Vec<(u32, Arc<CachedResponse>)> {
    let answers = [(1, 9_000), (2, 20_000), (3, 300), (4, 5_000)]
        .map(|(i, len)| (i, entry(numbered_body(len))));
    let db = Database::create(path).expect("create");
    let txn = db.begin_write().expect("write txn");
    {
        let mut entries = txn.open_table(ENTRIES).expect("entries");
        let mut chunks = txn.open_table(CHUNKS).expect("chunks");
        let mut small_chunks = txn.open_table(SMALL_CHUNKS).expect("small chunks");
        let mut by_age = txn.open_table(BY_AGE).expect("by_age");
        let mut by_expiry = txn.open_table(BY_EXPIRY).expect("by_expiry");
        let mut bytes = 0;
        for (sequence, (i, answer)) in (0..).zip(&answers) {
            let expires_at = match i {
                4 => unix_millis(SystemTime::now() - HOUR),
                _ => unix_millis(SystemTime::now() + HOUR),
            };
            let record = Record::encode(expires_at, sequence, &answer.encode());
            bytes += Record::weight(record.len());
            let (head, pages, quarters) = match layout {
                1 => (&record[..], vec![], &[][..]),
                _ => record::Cut::of(record.len() as u64, record::LAYOUT_2_ORDER).split(&record),
            };
            entries.insert(key(*i).as_bytes(), head).expect("insert");
            for (number, page) in (0..).zip(pages) {
                chunks.insert((sequence, number), page).expect("insert");
            }
            for (number, quarter) in (0..).zip(quarters.chunks(record::QUARTER_CHUNK)) {
                small_chunks
                    .insert((sequence, number), quarter)
                    .expect("insert");
            }
            by_age.insert(sequence, key(*i).as_bytes()).expect("insert");
            by_expiry
                .insert((expires_at, key(*i).as_bytes()), ())
                .expect("insert");
        }
        let mut meta = txn.open_table(META).expect("meta");
        meta.insert("layout", layout).expect("insert");
        meta.insert("bytes", bytes).expect("insert");
        meta.insert("next_sequence", answers.len() as u64)
            .expect("insert");
    }
    txn.commit().expect("commit");
    answers.to_vec()
}

/// Asserts that `store` serves each answer under its key, as it was put.
async fn serves(store: &DiskStore, answers: &[(u32, Arc<CachedResponse>)], what: &str) {
    for (i, answer) in answers {
        let found = store.get(&key(*i)).await.expect("get").expect("kept");
        assert_eq!(*found, **answer, "{what}: answer {i}");
    }
}

/// The layout a file is labelled with, and whether it still has the expiry index of
/// layouts 1 and 2.
fn layout_of(path: &Path) -> (Option<u64>, bool) {
    let db = Database::open(path).expect("open");
    let txn = db.begin_read().expect("read txn");
    let meta = txn.open_table(META).expect("meta");
    let layout = meta
        .get("layout")
        .expect("get")
        .map(|layout| layout.value());
    let by_expiry = txn
        .list_tables()
        .expect("tables")
        .any(|table| table.name() == "by_expiry");
    (layout, by_expiry)
}

/// A file of layout 1 (every record whole under its key) or 2 (records cut into 4 KiB
/// pages) opens and serves its answers as they were written, its expired answer is swept
/// through the rebuilt expiry index, new answers are cut into larger chunks beside the old
/// ones, and it is relabelled 3; a file of a layout this release does not know is refused
/// and left as it was.
#[tokio::test]
async fn a_file_of_an_earlier_layout_opens_and_a_later_one_is_refused() {
    for layout in [1, 2] {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("answers.redb");
        let answers = earlier_file(&path, layout);
        let store = DiskStore::open(&path).expect("a file of an earlier layout opens");
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while store.usage().entries != Some(3) && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(store.usage().entries, Some(3), "layout {layout}: swept");
        assert_eq!(store.get(&key(4)).await.expect("get"), None);
        serves(&store, &answers[..3], &format!("layout {layout}")).await;
        if layout == 2 {
            assert_eq!(
                chunk_rows(&store, &key(2)),
                (vec![4_076; 4], vec![1_007; 3]),
                "kept as it was cut"
            );
        }
        // A new answer of the same length is cut into larger chunks, beside the old one.
        store
            .put(key(5), answers[1].1.clone(), HOUR)
            .await
            .expect("put");
        store.flush().await.expect("flush");
        assert_eq!(chunk_rows(&store, &key(5)), (vec![16_364], vec![1_007; 3]));
        drop(store);
        assert_eq!(layout_of(&path), (Some(3), false), "relabelled");

        let store = DiskStore::open(&path).expect("reopen");
        let mut held = answers[..3].to_vec();
        held.push((5, answers[1].1.clone()));
        serves(&store, &held, &format!("layout {layout}, after a reopen")).await;
        // Replaced under the new layout, and removed: nothing is left and nothing miscounted.
        store
            .put(key(2), answers[1].1.clone(), HOUR)
            .await
            .expect("put");
        store.flush().await.expect("flush");
        assert_eq!(chunk_rows(&store, &key(2)), (vec![16_364], vec![1_007; 3]));
        assert_eq!(
            *store.get(&key(2)).await.expect("get").expect("kept"),
            *answers[1].1
        );
        for i in 1..=5 {
            store.remove(&key(i)).await.expect("remove");
        }
        store.flush().await.expect("flush");
        let usage = store.usage();
        assert_eq!(
            (usage.entries, usage.bytes),
            (Some(0), Some(0)),
            "{usage:?}"
        );
        assert_eq!(all_chunks(&store), 0);
    }

    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("answers.redb");
    drop(DiskStore::open(&path).expect("a new file"));
    {
        let db = Database::open(&path).expect("open");
        let txn = db.begin_write().expect("write txn");
        txn.open_table(META)
            .expect("meta")
            .insert("layout", 4)
            .expect("insert");
        txn.commit().expect("commit");
    }
    let error = DiskStore::open(&path).expect_err("a later layout");
    assert!(error.to_string().contains("layout 4"), "{error}");
    assert_eq!(
        layout_of(&path),
        (Some(4), false),
        "left where it was, as it was"
    );
}
