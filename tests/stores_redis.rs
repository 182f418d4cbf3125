//! The Redis store: one cache for many replicas, and a Redis that stops or stalls is never
//! an outage.
//!
//! Tests that share Redis use `FALLBACK_CACHE_TEST_REDIS_URL` (set by `scripts/test.sh`) or
//! start their own redis-server; tests that stop or pause Redis always start their own.

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fallback_cache_test_support::stores::{
    QUOTA_ERROR, RedisServer, Upstream, answer, marked, send, shared_redis, unique_prefix,
};
use tower::Layer;
use tower_fallback_cache::store::{MemoryStore, RedisStore, Store, StoreError, Tiered};
use tower_fallback_cache::{
    CacheKey, CachedResponse, FallbackCacheLayer, QuotaBreaker, X_FALLBACK_CACHE_KEY,
};

const WORKER: &str = env!("CARGO_BIN_EXE_store-worker");

fn key_of(headers: &http::HeaderMap) -> CacheKey {
    let key = headers[X_FALLBACK_CACHE_KEY].to_str().expect("ASCII key");
    key.parse().expect("a key in hex")
}

#[tokio::test]
async fn an_answer_stored_by_one_replica_is_served_by_another() {
    let (url, _own_server) = shared_redis();
    let prefix = unique_prefix("replicas");
    let output = Command::new(WORKER)
        .args(["redis-put", &url, &prefix, "7"])
        .output()
        .expect("the worker runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "worker failed: {stderr}");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stored_key = stdout
        .trim_end()
        .strip_prefix("stored ")
        .expect("`stored KEY`");

    let store = RedisStore::builder(&url)
        .prefix(&prefix)
        .connect()
        .await
        .expect("connect");
    let layer = FallbackCacheLayer::builder().store(store).build();
    let service = layer.layer(Upstream::out_of_quota());

    let (status, headers, body) = send(&service, 7).await;
    assert_eq!(headers["x-fallback-cache"], "FALLBACK");
    assert_eq!(headers[X_FALLBACK_CACHE_KEY], stored_key);
    assert_eq!(status, 200);
    assert_eq!(body, answer(7));

    // Only what the other replica stored is there.
    let (status, headers, body) = send(&service, 8).await;
    assert_eq!((status.as_u16(), marked(&headers)), (429, "MISS"));
    assert_eq!(body, QUOTA_ERROR);
}

/// What one replica removes from Redis, every replica's memory tier drops: the removal is
/// published, and each tiered store on the same Redis and prefix listens (not one under
/// another prefix, which does not share the answers either).
#[tokio::test]
async fn a_removal_through_one_replica_leaves_no_copy_in_another_s_memory() {
    let (url, _own_server) = shared_redis();
    removals_reach_every_replica(&url).await;
    // A Redis Cluster passes what is published on one node to every other.
    if let Some(cluster) = cluster_url() {
        removals_reach_every_replica(&cluster).await;
    }
}

/// The Redis Cluster scripts/test.sh started, or `None` after saying why that part of a
/// test is skipped. Under `CI=true` a missing cluster is a failure: CI runs scripts/test.sh.
fn cluster_url() -> Option<String> {
    const CLUSTER_URL_VAR: &str = "FALLBACK_CACHE_TEST_REDIS_CLUSTER_URL";
    match std::env::var(CLUSTER_URL_VAR) {
        Ok(url) if !url.trim().is_empty() => Some(url),
        _ => {
            let why = format!(
                "{CLUSTER_URL_VAR} is not set: run scripts/test.sh, which starts a Redis Cluster"
            );
            assert!(std::env::var("CI").as_deref() != Ok("true"), "{why}");
            eprintln!("skipped: {why}");
            None
        }
    }
}

async fn removals_reach_every_replica(url: &str) {
    let prefix = unique_prefix("removals");
    let replica = |prefix: String| {
        let url = url.to_owned();
        async move {
            let redis = RedisStore::builder(&url)
                .prefix(prefix)
                .connect()
                .await
                .expect("connect");
            Tiered::new(MemoryStore::new(1 << 20), redis)
        }
    };
    let (one, two) = (replica(prefix.clone()).await, replica(prefix).await);
    let elsewhere = replica(unique_prefix("removals-other")).await;
    let key = CacheKey::from_bytes([7; 32]);
    let entry = Arc::new(CachedResponse::new(
        http::StatusCode::OK,
        http::HeaderMap::new(),
        vec![bytes::Bytes::from_static(b"an answer to purge")],
    ));
    for store in [&one, &elsewhere] {
        store
            .put(key, entry.clone(), Duration::from_secs(60))
            .await
            .expect("put");
        store.flush().await.expect("flush");
    }
    // The second replica reads it from Redis into its memory tier.
    assert!(two.get(&key).await.expect("get").is_some());
    assert!(two.front().get(&key).await.expect("front").is_some());

    // Each store listens from the start; a removal before any listener is connected says
    // that no replica heard it.
    let deadline = Instant::now() + Duration::from_secs(10);
    while let Err(error) = one.remove(&key).await {
        assert!(Instant::now() < deadline, "{error}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    while two.front().get(&key).await.expect("front").is_some() {
        assert!(
            Instant::now() < deadline,
            "still in the other replica's memory"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(two.get(&key).await.expect("get").is_none());
    // Under another prefix, another cache: untouched.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(elsewhere.get(&key).await.expect("get").is_some());
    assert!(elsewhere.front().get(&key).await.expect("front").is_some());
}

#[tokio::test]
async fn answers_live_under_their_prefix_until_their_ttl() {
    let (url, _own_server) = shared_redis();
    let store = RedisStore::builder(&url)
        .prefix(unique_prefix("ttl"))
        .connect()
        .await
        .expect("connect");
    let other = RedisStore::builder(&url)
        .prefix(unique_prefix("ttl-other"))
        .connect()
        .await
        .expect("connect");
    let key = CacheKey::from_bytes([7; 32]);
    let entry = std::sync::Arc::new(CachedResponse::new(
        http::StatusCode::OK,
        http::HeaderMap::new(),
        vec![answer(1)],
    ));

    store
        .put(key, entry.clone(), Duration::from_secs(1))
        .await
        .expect("put");
    let found = store.get(&key).await.expect("get").expect("stored");
    assert_eq!(*found, *entry);
    assert!(
        other.get(&key).await.expect("get").is_none(),
        "another prefix is another cache"
    );

    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        store.get(&key).await.expect("get").is_none(),
        "Redis expired it"
    );

    // A time to live past what Redis takes (`--ttl 213503982334d`) is cut, not refused.
    store
        .put(key, entry.clone(), Duration::MAX)
        .await
        .expect("a put with the longest time to live");
    let found = store.get(&key).await.expect("get").expect("stored");
    assert_eq!(*found, *entry);
}

#[tokio::test]
async fn requests_go_on_while_redis_is_down_and_storing_resumes_when_it_returns() {
    let mut server = RedisServer::start();
    let timeout = Duration::from_millis(250);
    let store = RedisStore::builder(server.url())
        .prefix(unique_prefix("outage"))
        .timeout(timeout)
        .connect()
        .await
        .expect("connect");
    let upstream = Upstream::new();
    // Without the quota breaker: the quota error below must not suspend the requests that
    // show storing resume.
    let layer = FallbackCacheLayer::builder()
        .store(store.clone())
        .quota_breaker(QuotaBreaker::disabled())
        .build();
    let service = layer.layer(upstream.clone());
    let (status, _, _) = send(&service, 0).await;
    assert_eq!(status, 200);
    assert_eq!(layer.stats().snapshot().stored, 1);

    server.stop();
    for i in 1..=8 {
        let started = Instant::now();
        let sent = tokio::time::timeout(Duration::from_secs(10), send(&service, i));
        let (status, headers, body) = sent.await.expect("the request completes");
        assert_eq!((status.as_u16(), marked(&headers)), (200, "MISS"));
        assert_eq!(body, answer(i));
        // Generous: the store gives up after 250 ms.
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "request {i}: {:?}",
            started.elapsed()
        );
    }
    let stats = layer.stats().snapshot();
    assert_eq!(stats.stored, 1, "{stats:?}");
    assert!(
        stats.store_errors >= 8,
        "each failed write is counted: {stats:?}"
    );

    // Out of quota with Redis gone: the client gets the upstream's own error, not a hang.
    upstream.set_out_of_quota(true);
    let (status, headers, body) = send(&service, 0).await;
    assert_eq!((status.as_u16(), marked(&headers)), (429, "MISS"));
    assert_eq!(body, QUOTA_ERROR);
    upstream.set_out_of_quota(false);

    server.restart();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut i = 100;
    let resumed_with = loop {
        let (_, headers, _) = send(&service, i).await;
        if let Ok(Some(_)) = store.get(&key_of(&headers)).await {
            break i;
        }
        assert!(
            Instant::now() < deadline,
            "storing did not resume: {:?}",
            layer.stats().snapshot()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        i += 1;
    };

    upstream.set_out_of_quota(true);
    let (status, headers, body) = send(&service, resumed_with).await;
    assert_eq!((status.as_u16(), marked(&headers)), (200, "FALLBACK"));
    assert_eq!(body, answer(resumed_with));
}

#[tokio::test]
async fn a_redis_that_stops_answering_costs_a_request_at_most_the_timeout() {
    let server = RedisServer::start();
    let store = RedisStore::builder(server.url())
        .prefix(unique_prefix("paused"))
        .timeout(Duration::from_millis(200))
        .connect()
        .await
        .expect("connect");
    let upstream = Upstream::new();
    let layer = FallbackCacheLayer::builder().store(store).build();
    let service = layer.layer(upstream.clone());
    send(&service, 0).await;
    assert_eq!(layer.stats().snapshot().stored, 1);

    // Redis holds every client's commands for 5 s.
    assert_eq!(
        server
            .command(&["CLIENT", "PAUSE", "5000", "ALL"])
            .expect("pause"),
        "+OK"
    );
    upstream.set_out_of_quota(true);
    let started = Instant::now();
    let (status, headers, body) = send(&service, 0).await;
    let waited = started.elapsed();

    assert_eq!((status.as_u16(), marked(&headers)), (429, "MISS"));
    assert_eq!(body, QUOTA_ERROR);
    assert!(
        waited < Duration::from_millis(2500),
        "waited {waited:?} for a paused Redis"
    );
    assert_eq!(layer.stats().snapshot().store_errors, 1);
}

#[tokio::test]
async fn a_paused_redis_behind_the_memory_tier_delays_no_answer_and_gets_them_on_resume() {
    let server = RedisServer::start();
    // A long operation timeout: an answer that waited for Redis would take all of it.
    let timeout = Duration::from_secs(2);
    let redis = RedisStore::builder(server.url())
        .prefix(unique_prefix("sigstop"))
        .timeout(timeout)
        .connect()
        .await
        .expect("connect");
    let layer = FallbackCacheLayer::builder()
        .store(Tiered::new(MemoryStore::new(16 << 20), redis.clone()))
        .build();
    let upstream = Upstream::new();
    let service = layer.layer(upstream.clone());

    server.pause();
    let mut keys = Vec::new();
    for i in 0..5 {
        let started = Instant::now();
        let sent = tokio::time::timeout(Duration::from_secs(30), send(&service, i));
        let (status, headers, body) = sent.await.expect("the answer ends");
        let took = started.elapsed();
        assert_eq!((status.as_u16(), marked(&headers)), (200, "MISS"));
        assert_eq!(body, answer(i));
        assert!(
            took < timeout / 2,
            "answer {i} took {took:?} with Redis paused: it waited for the Redis write"
        );
        keys.push(key_of(&headers));
    }
    let stats = layer.stats().snapshot();
    assert_eq!((stats.stored, stats.store_errors), (5, 0), "{stats:?}");

    // Meanwhile the memory tier has them.
    upstream.set_out_of_quota(true);
    let (status, headers, body) = send(&service, 4).await;
    assert_eq!((status.as_u16(), marked(&headers)), (200, "FALLBACK"));
    assert_eq!(body, answer(4));

    server.resume();
    let deadline = Instant::now() + Duration::from_secs(30);
    for (i, key) in keys.iter().enumerate() {
        while !matches!(redis.get(key).await, Ok(Some(_))) {
            assert!(
                Instant::now() < deadline,
                "answer {i} did not reach Redis after it resumed"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    assert!(redis.health().is_healthy(), "{:?}", redis.health());
}

#[tokio::test]
async fn a_single_node_url_at_a_cluster_node_is_refused_with_the_cluster_url() {
    let Some(cluster) = cluster_url() else {
        return;
    };
    let node = fallback_cache_test_support::stores::first_cluster_node(&cluster);
    let error = RedisStore::connect(format!("redis://{node}/0"))
        .await
        .expect_err("a cluster node is not a single Redis");
    assert!(
        matches!(error, StoreError::Backend { store: "redis", .. }),
        "{error}"
    );
    let message = error.to_string();
    assert!(
        message.contains(&format!(
            "{node} is a Redis Cluster node: use redis+cluster://{node}"
        )),
        "{message}"
    );
    assert_eq!(message.lines().count(), 1, "{message}");

    // The cluster URL of the same node opens.
    let store = RedisStore::connect(format!("redis+cluster://{node}"))
        .await
        .expect("the cluster URL");
    assert!(store.is_cluster());
}

#[tokio::test]
async fn a_redis_that_refuses_info_opens_as_one_node() {
    // A managed Redis may forbid INFO (and CLUSTER): the store still opens, and works.
    let server = RedisServer::start();
    let reply = server
        .command(&[
            "ACL",
            "SETUSER",
            "app",
            "on",
            ">app-secret",
            "~*",
            "&*",
            "+@all",
            "-info",
            "-cluster",
        ])
        .expect("ACL SETUSER");
    assert_eq!(reply, "+OK");
    let url = server.url().replace("redis://", "redis://app:app-secret@");
    let refused = Command::new("redis-cli")
        .args(["-u", &url, "info", "cluster"])
        .output()
        .expect("redis-cli runs");
    let refused = format!(
        "{}{}",
        String::from_utf8_lossy(&refused.stdout),
        String::from_utf8_lossy(&refused.stderr)
    );
    assert!(refused.contains("NOPERM"), "INFO is allowed: {refused}");

    let store = RedisStore::builder(&url)
        .prefix(unique_prefix("no-info"))
        .connect()
        .await
        .expect("a Redis that refuses INFO opens");
    assert!(!store.is_cluster());
    let key = CacheKey::from_bytes([9; 32]);
    let entry = std::sync::Arc::new(CachedResponse::new(
        http::StatusCode::OK,
        http::HeaderMap::new(),
        vec![answer(2)],
    ));
    store
        .put(key, entry.clone(), Duration::from_secs(60))
        .await
        .expect("put");
    let found = store.get(&key).await.expect("get").expect("stored");
    assert_eq!(*found, *entry);
}

#[tokio::test]
async fn an_import_that_stops_part_way_says_how_far_it_went() {
    let mut server = RedisServer::start();
    let redis = RedisStore::builder(server.url())
        .prefix(unique_prefix("import"))
        .connect()
        .await
        .expect("connect");
    let until = std::time::SystemTime::now() + Duration::from_secs(600);
    let entries = |n: u8| {
        (0..n)
            .map(|i| {
                tower_fallback_cache::store::RawEntry::new(
                    CacheKey::from_bytes([i; 32]),
                    vec![i; 16],
                    until,
                )
            })
            .collect::<Vec<_>>()
    };
    redis.import(entries(2)).await.expect("an import");
    server.stop();
    let error = redis.import(entries(3)).await.expect_err("Redis is gone");
    assert!(
        error
            .to_string()
            .contains("(after 0 of 3 entries were written)"),
        "{error}"
    );
}

/// A Redis user that may not SUBSCRIBE leaves every replica deaf to removals: a removal then
/// says so, rather than that it reached them.
#[tokio::test]
async fn a_removal_no_replica_can_hear_is_an_error() {
    let server = RedisServer::start();
    let reply = server
        .command(&[
            "ACL",
            "SETUSER",
            "nosub",
            "on",
            ">nosub-password",
            "~*",
            "&*",
            "+@all",
            "-subscribe",
        ])
        .expect("ACL SETUSER");
    assert_eq!(reply.trim(), "+OK");
    let url = server
        .url()
        .replace("redis://", "redis://nosub:nosub-password@");
    let redis = RedisStore::builder(&url)
        .prefix(unique_prefix("deaf"))
        .connect()
        .await
        .expect("connect");
    let store = Tiered::new(MemoryStore::new(1 << 20), redis);
    let key = CacheKey::from_bytes([9; 32]);
    let entry = Arc::new(CachedResponse::new(
        http::StatusCode::OK,
        http::HeaderMap::new(),
        vec![bytes::Bytes::from_static(b"an answer")],
    ));
    store
        .put(key, entry, Duration::from_secs(60))
        .await
        .expect("put");
    store.flush().await.expect("flush");
    let error = store.remove(&key).await.expect_err("no one listens");
    assert!(error.to_string().contains("no replica heard it"), "{error}");
    assert!(
        !error.to_string().contains("failed: redis store failed"),
        "{error}"
    );
    // Removed from Redis all the same: only the other replicas' memory is not reached.
    assert!(store.back().get(&key).await.expect("get").is_none());
}

/// After Redis restarts while no operation used the store, the first one finds the old
/// connection gone: it is tried again on a new one instead of failing (a purge would say
/// 503, `/healthz` degraded, with Redis fine).
#[tokio::test]
async fn the_first_operation_after_an_unwatched_restart_succeeds() {
    let mut server = RedisServer::start();
    let redis = RedisStore::builder(server.url())
        .prefix(unique_prefix("restart"))
        .connect()
        .await
        .expect("connect");
    let key = CacheKey::from_bytes([3; 32]);
    assert!(redis.get(&key).await.expect("get").is_none());
    server.restart();
    assert!(
        redis
            .get(&key)
            .await
            .expect("the first get after the restart")
            .is_none(),
    );
    assert!(redis.health().is_healthy(), "{:?}", redis.health());
}
