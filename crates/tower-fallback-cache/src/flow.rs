//! The flow of one request through the layer: key, cache-first, quota breaker, upstream,
//! classify, fall back, mark. ARCHITECTURE.md tells it step by step.

use std::future::{Future, poll_fn};
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::Poll;
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes};
use http::header::{
    ACCEPT_ENCODING, AGE, CACHE_CONTROL, CONTENT_ENCODING, CONTENT_LENGTH, DATE, RETRY_AFTER,
};
use http::request::Parts;
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode};
use http_body::Body;
use tower_service::Service;

use crate::body::{
    Capture, CaptureSink, Collected, RequestBody, ResponseBody, bounded_by, collect_all,
    collect_up_to, content_length,
};
use crate::breaker::{Admission, Probe, quota_scope};
use crate::classify::Reason;
use crate::coalesce::{self, Turn};
use crate::deadline::within;
use crate::entry::{CachedResponse, key_header_value};
use crate::headers::age_value;
use crate::key::{CacheKey, KEY_VERSION, Memo};
use crate::partition::{Partition, PartitionId, credential_identity};
use crate::seal::Seal;
use crate::state::{Mode, Shared};
use crate::stats::Counters;
use crate::status::{CacheStatus, X_FALLBACK_CACHE, X_FALLBACK_CACHE_KEY, X_FALLBACK_CACHE_REASON};
use crate::store::{Store, StoreError, log_store_error};
use crate::throttle::LogThrottle;

/// Read by the OpenAI SDKs before any other retry rule.
const X_SHOULD_RETRY: HeaderName = HeaderName::from_static("x-should-retry");

/// How much of an error body is read to classify it.
const ERROR_BODY_LIMIT: usize = 64 * 1024;

/// What the flow gives for a request: the response, or the inner service's error.
type Served<B, E> = Result<Response<ResponseBody<B>>, E>;

/// The flow of one request (see ARCHITECTURE.md), given as its head and body.
///
/// A plain function returning an `async` block rather than an `async fn`: an `async fn`
/// keeps its arguments and a moved copy of each for its whole life, where the block uses
/// what it captured in place. `parts` is never moved to another binding until the request
/// goes upstream, so the future of a HIT holds the request's head once.
#[expect(
    clippy::manual_async_fn,
    reason = "an async fn would keep each argument twice in the future"
)]
pub(crate) fn serve<S, ReqB, ResB>(
    shared: Arc<Shared>,
    inner: S,
    parts: Parts,
    body: ReqB,
) -> impl Future<Output = Served<ResB, S::Error>>
where
    S: Service<Request<RequestBody<ReqB>>, Response = Response<ResB>>,
    ReqB: Body,
    ReqB::Data: Buf,
    ResB: Body,
    ResB::Data: Buf,
{
    async move {
        let counters = shared.stats.counters();
        Counters::add(&counters.requests);

        // 1. Key, or bypass.
        let declared_len = content_length(&parts.headers);
        // The request's `cache-control`, read once.
        let controls = Controls::of(&parts.headers);
        let bypass_because = if !shared.cacheable.allows(&parts.method, parts.uri.path()) {
            Some("not cacheable")
        } else if controls.no_store {
            Some("no-store")
        } else if declared_len.is_some_and(|len| len > shared.max_request_body as u64) {
            Some("body over max_request_body")
        } else {
            None
        };
        let bytes = match bypass_because {
            Some(why) => {
                let request = Request::from_parts(parts, RequestBody::passthrough(body));
                return bypass(&shared, inner, request, why).await;
            }
            // A body that says it fits (an exact `content-length`, a buffered body) is read in
            // place: it never has to move on half read. One longer than it said is read to its
            // end and forwarded whole, not keyed.
            None if bounded_by(&body, shared.max_request_body) => match collect_all(pin!(body))
                .await
            {
                Ok(bytes) if bytes.len() <= shared.max_request_body => bytes,
                Ok(bytes) => {
                    let request = Request::from_parts(parts, RequestBody::full(bytes));
                    return bypass(&shared, inner, request, "body over max_request_body").await;
                }
                Err((prefix, error)) => {
                    let request = Request::from_parts(parts, RequestBody::failed(prefix, error));
                    return bypass(&shared, inner, request, "request body failed").await;
                }
            },
            // Pinned on the heap to be read: a body longer than the limit moves on, half
            // read, to the inner service, and a body of any type (not only an `Unpin` one)
            // can move only so.
            None => match collect_up_to(Box::pin(body), shared.max_request_body).await {
                Collected::Complete(bytes) => bytes,
                Collected::Over { prefix, rest } => {
                    let request = Request::from_parts(parts, RequestBody::resumed(prefix, rest));
                    return bypass(&shared, inner, request, "body over max_request_body").await;
                }
                Collected::Failed { prefix, error } => {
                    let request = Request::from_parts(parts, RequestBody::failed(prefix, error));
                    return bypass(&shared, inner, request, "request body failed").await;
                }
            },
        };
        // In a block of its own, so that the tenant and the partition are not kept in the
        // future past it.
        let (key, credential, seal) = {
            // A credential of a tenant is partitioned, suspended and sealed as its tenant.
            let tenant = shared
                .tenants
                .as_ref()
                .and_then(|tenants| tenants.of(&parts, &shared.credentials));
            let partition =
                tenant.unwrap_or_else(|| shared.partition.of_with(&parts, &shared.credentials));
            let key = key_of(&shared, &partition, &parts, &bytes);
            // The breaker follows the credential the upstream judges, not the answer
            // partition (by default they are one and the same hash).
            let credential = match (tenant, &shared.partition) {
                (Some(_), _) | (None, Partition::ByCredential) => partition,
                _ => credential_identity(&parts, &shared.credentials),
            };
            // Sealed under the credential (or tenant) where answers are partitioned by it;
            // requests without one and shared partitions under the server secret alone.
            // Only a copy here: the key is derived where an entry is sealed or opened.
            let seal = shared.sealing.as_ref().and_then(|sealing| {
                let own = tenant.is_some()
                    || matches!(shared.partition, Partition::ByCredential)
                        && !partition.is_anonymous();
                sealing.seal(own.then_some(&partition))
            });
            (key, credential, seal)
        };
        let mut coverage = Coverage::new(&shared);

        // `only-if-cached` (RFC 9111, 5.2.1.7): the stored answer, or a 504; never the upstream.
        if controls.only_if_cached {
            let found = lookup(&shared, &key, seal.as_ref()).await;
            coverage.count(&shared, found.as_ref());
            return Ok(match found.filter(|(_, age)| controls.accepts(*age)) {
                Some((entry, age)) => {
                    Counters::add(&counters.hits);
                    tracing::debug!(%key, "HIT (only-if-cached)");
                    replay(entry, age, CacheStatus::Hit, key, None)
                }
                None => {
                    Counters::add(&counters.misses);
                    tracing::debug!(%key, "only-if-cached: nothing stored, 504");
                    not_cached(key)
                }
            });
        }

        // 2. Cache-first: a fresh answer is served without calling the upstream.
        let fresh_for = match shared.mode {
            Mode::CacheFirst { fresh_for } if !controls.no_cache => {
                if let Some(hit) =
                    fresh_hit(&shared, key, seal.as_ref(), fresh_for, &mut coverage).await
                {
                    return Ok(hit);
                }
                Some(fresh_for)
            }
            _ => None,
        };

        // 3. The quota breaker, here where no coalescing comes before it (fallback mode, or
        // `no-cache`): a suspended partition's request, every request while a quota is
        // exhausted, is answered without the upstream call's future.
        let admitted = match fresh_for {
            Some(_) => None,
            None => match admit(&shared, credential, &parts) {
                Ok(admitted) => Some(admitted),
                Err(suspension) => {
                    // On the heap too, but a small future, and nothing of the request kept
                    // beside it: its states would make the future of every request larger.
                    drop((parts, bytes, inner));
                    let answer = suspended(shared, key, seal, controls, coverage, suspension);
                    return Ok(Box::pin(answer).await);
                }
            },
        };

        // The rest goes on in a future of its own, on the heap: the future of every request
        // (boxed by the service) need not make room for the upstream call's states, nor copy
        // them, when a stored answer is served.
        let asked = Asked {
            parts,
            bytes,
            key,
            credential,
            seal,
            controls,
            coverage,
            fresh_for,
            admitted,
        };
        Box::pin(ask_upstream(shared, inner, asked)).await
    }
}

/// A keyed request on its way to the upstream, with what [`serve`] learned of it.
struct Asked {
    parts: Parts,
    bytes: Bytes,
    key: CacheKey,
    /// Whose quota the upstream judges (the breaker's partition).
    credential: PartitionId,
    seal: Option<Seal>,
    controls: Controls,
    coverage: Coverage,
    /// In cache-first mode (and not `no-cache`), how young a stored answer is served.
    fresh_for: Option<Duration>,
    /// The breaker's admission, when [`serve`] asked it already (no coalescing comes before
    /// the breaker); `None` when it is asked after coalescing.
    admitted: Option<Admitted>,
}

/// Whose quota a call spends (none for a request that spends none), and the probe it is,
/// if the breaker let it through as one.
type Admitted = (Option<PartitionId>, Option<Probe>);

/// A suspended partition's last quota error, and how long it stays suspended.
struct Suspension {
    last_error: Arc<CachedResponse>,
    retry_after: Duration,
}

/// Step 3 of the flow, the quota breaker: the call's admission, or the suspension of the
/// credential (for this account, project or model) that keeps it from the upstream.
/// Requests that spend no quota are never suspended.
fn admit(shared: &Shared, credential: PartitionId, parts: &Parts) -> Result<Admitted, Suspension> {
    let quota = if shared.breaker.is_enabled() {
        quota_scope(credential, parts)
    } else {
        None
    };
    match quota.map_or(Admission::Call, |quota| shared.breaker.admit(quota)) {
        Admission::Call => Ok((quota, None)),
        Admission::Probe(probe) => Ok((quota, Some(probe))),
        Admission::Suspended {
            last_error,
            retry_after,
        } => Err(Suspension {
            last_error,
            retry_after,
        }),
    }
}

/// The answer to a request of a suspended partition, without calling the upstream: the
/// stored answer (`FALLBACK`), or else the partition's last quota error, marked `MISS`, with
/// `retry-after` and `x-should-retry: false`.
async fn suspended<B: Body>(
    shared: Arc<Shared>,
    key: CacheKey,
    seal: Option<Seal>,
    controls: Controls,
    mut coverage: Coverage,
    suspension: Suspension,
) -> Response<ResponseBody<B>> {
    let counters = shared.stats.counters();
    Counters::add(&counters.suspended);
    let reason = Reason::InsufficientQuota;
    let seal = seal.as_ref();
    // Looked up just now: an answer found is served at the age it was found with.
    let looked = Looked::just_now(coverage.look(&shared, &key, seal).await);
    if let Some(served) = fall_back(&shared, key, seal, reason, controls, looked).await {
        return served;
    }
    Counters::add(&counters.misses);
    let Suspension {
        last_error,
        retry_after,
    } = suspension;
    tracing::debug!(%key, ?retry_after, "partition suspended: last quota error served");
    // Marked with its status, key and reason, `retry-after` and `x-should-retry`.
    let (mut parts, body) = stored_response(&last_error, 5).into_parts();
    mark(
        &mut parts.headers,
        &mut parts.extensions,
        CacheStatus::Miss,
        key,
        Some(reason),
        None,
    );
    let seconds = retry_after
        .as_secs()
        .saturating_add(u64::from(retry_after.subsec_nanos() > 0));
    parts
        .headers
        .insert(RETRY_AFTER, HeaderValue::from(seconds.max(1)));
    // The OpenAI SDKs retry a 429 after `retry-after`, up to two minutes; a retry within the
    // cooldown gets this same answer, so tell them not to.
    parts
        .headers
        .insert(X_SHOULD_RETRY, HeaderValue::from_static("false"));
    Response::from_parts(parts, body)
}

/// Steps 2 (coalescing) to 6 of the flow: the request was not answered from the store (nor,
/// when [`serve`] asked the breaker already, as a suspended partition's). A function
/// returning an `async` block, as [`serve`], so that its future keeps the fields of `asked`
/// once.
fn ask_upstream<S, ReqB, ResB>(
    shared: Arc<Shared>,
    mut inner: S,
    asked: Asked,
) -> impl Future<Output = Served<ResB, S::Error>>
where
    S: Service<Request<RequestBody<ReqB>>, Response = Response<ResB>>,
    ReqB: Body,
    ReqB::Data: Buf,
    ResB: Body,
    ResB::Data: Buf,
{
    let Asked {
        mut parts,
        bytes,
        key,
        credential,
        seal,
        controls,
        mut coverage,
        fresh_for,
        admitted,
    } = asked;
    async move {
        let counters = shared.stats.counters();

        // Identical requests that miss together make one call.
        let mut leader = None;
        if let Some(fresh_for) = fresh_for {
            // A follower waits for the leader at most `coalesce_wait` in all; when the
            // leader's answer is not stored, the followers join again and one leads; when
            // that one's is not stored either, each calls for itself (an upstream that keeps
            // failing would otherwise answer them one leader after another).
            let waited = Instant::now();
            let mut failed_leaders = 0;
            loop {
                match shared.in_flight.join(key) {
                    Turn::Lead(lead) => {
                        // The previous leader may have stored the answer between our
                        // lookup and our turn.
                        if let Some(hit) =
                            fresh_hit(&shared, key, seal.as_ref(), fresh_for, &mut coverage).await
                        {
                            return Ok(hit);
                        }
                        leader = Some(lead);
                        break;
                    }
                    Turn::Follow(call) => {
                        let left = shared.coalesce_wait.saturating_sub(waited.elapsed());
                        // The crate's own deadline, not a Tokio timer: a runtime built
                        // without `enable_time` would panic on one.
                        if within(left, coalesce::wait(call)).await.is_none() {
                            tracing::debug!(%key, "an identical request's call is taking long: calling the upstream");
                            break;
                        }
                        if let Some(hit) =
                            fresh_hit(&shared, key, seal.as_ref(), fresh_for, &mut coverage).await
                        {
                            Counters::add(&counters.coalesced);
                            return Ok(hit);
                        }
                        failed_leaders += 1;
                        if failed_leaders == 2 {
                            tracing::debug!(%key, "two identical requests' calls stored nothing: calling the upstream");
                            break;
                        }
                    }
                }
            }
        }

        // 3. The quota breaker (asked here when coalescing came first): a suspended
        // credential (for this account, project or model) does not call the upstream;
        // requests that spend no quota are never suspended.
        let (quota, probe) = match admitted.map_or_else(|| admit(&shared, credential, &parts), Ok) {
            Ok(admitted) => admitted,
            Err(suspension) => {
                return Ok(suspended(shared, key, seal, controls, coverage, suspension).await);
            }
        };

        // 4. Upstream. Asked for an uncompressed answer: a stored answer is served to clients
        // whatever they accept, and a stream is judged complete on its events. An answer that
        // comes encoded anyway is passed on as it is, never stored. Its readiness is awaited
        // here, not in `poll_ready`: the answers above never wait behind upstream
        // backpressure, and a readiness error is a failed call.
        // The judge of the answer comes from the request's protocol (its path).
        let rules = shared.protocols.completeness(&parts);
        parts
            .headers
            .insert(ACCEPT_ENCODING, HeaderValue::from_static("identity"));
        // The coverage lookup runs beside the call (the call is polled first) and is given up
        // if the call ends first, adding nothing to its latency.
        let call = async {
            match poll_fn(|cx| inner.poll_ready(cx)).await {
                Ok(()) => {
                    inner
                        .call(Request::from_parts(parts, RequestBody::full(bytes)))
                        .await
                }
                Err(error) => Err(error),
            }
        };
        let (called, arrived) = beside(call, coverage.look(&shared, &key, seal.as_ref())).await;
        let arrived = Looked::on_arrival(arrived.flatten());
        let response = match called {
            Ok(response) => response,
            Err(error) => {
                let reason = Reason::Unreachable;
                Counters::add(&counters.failures[reason as usize]);
                if let Some(served) =
                    fall_back(&shared, key, seal.as_ref(), reason, controls, arrived).await
                {
                    return Ok(served);
                }
                // A MISS without an answer: the caller answers for the upstream (the
                // proxy's 502 is marked MISS), and every request is counted under one status.
                Counters::add(&counters.misses);
                tracing::debug!(%key, %reason, "inner service failed; error returned");
                return Err(error);
            }
        };

        // 5. Classify.
        let status = response.status();
        if !status.is_client_error() && !status.is_server_error() {
            // An answer: a success is stored as it streams past; anything else (a redirect)
            // is only passed on.
            if let Some(probe) = probe.filter(|_| status.is_success()) {
                probe.succeeded();
            }
            Counters::add(&counters.misses);
            let (mut parts, body) = response.into_parts();
            clean_upstream_head(status, &mut parts.headers, true);
            // A 206 is a part of an answer, to a request whose `range` the key does not hold.
            let whole = status.is_success() && status != StatusCode::PARTIAL_CONTENT;
            let body = if whole
                && storable(&parts.headers, shared.max_response_body)
                && !followed_a_redirect(&parts.extensions)
            {
                let sink = CaptureSink {
                    key,
                    store: shared.store.clone(),
                    stats: shared.stats.clone(),
                    ttl: shared.ttl,
                    seal,
                    leader,
                };
                let headers = parts.headers.clone();
                let capture = Capture::new(sink, status, headers, shared.max_response_body, rules);
                ResponseBody::capture(body, capture)
            } else {
                tracing::debug!(%key, %status, "answer not storable (status, no-store, encoding, size or redirect)");
                if whole
                    && content_length(&parts.headers)
                        .is_some_and(|len| len > shared.max_response_body as u64)
                {
                    Counters::add(&counters.unstored_too_large);
                }
                ResponseBody::upstream(body)
            };
            mark(
                &mut parts.headers,
                &mut parts.extensions,
                CacheStatus::Miss,
                key,
                None,
                None,
            );
            tracing::debug!(%key, %status, "MISS");
            return Ok(Response::from_parts(parts, body));
        }
        let (mut parts, body) = response.into_parts();
        clean_upstream_head(status, &mut parts.headers, true);
        if followed_a_redirect(&parts.extensions) {
            // Another URL's error, about a request sent without this one's body (and, on
            // another host, without its credentials): it says nothing of this credential's
            // quota, so it is passed on as it came, neither classified (no FALLBACK) nor
            // given to the breaker. A probe dropped unsettled lets the next request probe.
            Counters::add(&counters.misses);
            tracing::debug!(%key, %status, "MISS: error reached through a redirect passed through");
            mark(
                &mut parts.headers,
                &mut parts.extensions,
                CacheStatus::Miss,
                key,
                None,
                None,
            );
            return Ok(Response::from_parts(parts, ResponseBody::upstream(body)));
        }
        // An error body that says it fits the limit is read in place; any other is pinned on
        // the heap to be read, so that the unread rest of a long one can move into the
        // response (only error bodies pay for it).
        let (prefix, error, rest) = if bounded_by(&body, ERROR_BODY_LIMIT) {
            match collect_all(pin!(body)).await {
                Ok(prefix) => (prefix, None, None),
                Err((prefix, error)) => (prefix, Some(error), None),
            }
        } else {
            match collect_up_to(Box::pin(body), ERROR_BODY_LIMIT).await {
                Collected::Complete(prefix) => (prefix, None, None),
                Collected::Over { prefix, rest } => (prefix, None, Some(rest)),
                Collected::Failed { prefix, error } => (prefix, Some(error), None),
            }
        };
        let reason = shared.classifier.classify(status, &parts.headers, &prefix);
        if let Some(quota) = quota
            && reason == Some(Reason::InsufficientQuota)
            && rest.is_none()
            && error.is_none()
        {
            // Kept whole, so that requests of a suspended partition get the same error (with
            // a `date` of when it is served, not of when it was first sent).
            let mut headers = parts.headers.clone();
            headers.remove(DATE);
            let last_error = CachedResponse::new(status, headers, vec![prefix.clone()]);
            shared
                .breaker
                .quota_exhausted(quota, Arc::new(last_error), probe);
        }

        // 6. Fall back.
        if let Some(reason) = reason {
            Counters::add(&counters.failures[reason as usize]);
            if let Some(served) =
                fall_back(&shared, key, seal.as_ref(), reason, controls, arrived).await
            {
                return Ok(served);
            }
        }
        Counters::add(&counters.misses);
        tracing::debug!(%key, %status, reason = reason.map(Reason::as_str), "MISS: upstream error passed through");
        mark(
            &mut parts.headers,
            &mut parts.extensions,
            CacheStatus::Miss,
            key,
            reason,
            None,
        );
        Ok(Response::from_parts(
            parts,
            ResponseBody::resumed(prefix, error, rest),
        ))
    }
}

/// A stored answer younger than `fresh_for`, served as `HIT`.
async fn fresh_hit<B: Body>(
    shared: &Shared,
    key: CacheKey,
    seal: Option<&Seal>,
    fresh_for: Duration,
    coverage: &mut Coverage,
) -> Option<Response<ResponseBody<B>>> {
    let found = lookup(shared, &key, seal).await;
    coverage.count(shared, found.as_ref());
    let (entry, age) = found?;
    if age >= fresh_for {
        return None;
    }
    Counters::add(&shared.stats.counters().hits);
    tracing::debug!(%key, "HIT");
    Some(replay(entry, age, CacheStatus::Hit, key, None))
}

/// The key of a request, its body's part from the key memo when the body was sent before.
fn key_of(shared: &Shared, partition: &PartitionId, parts: &Parts, body: &[u8]) -> CacheKey {
    let (key, memo) = shared
        .key_memo
        .key(&shared.key_rules, partition, parts, body);
    match memo {
        Memo::Hit => Counters::add(&shared.stats.counters().key_memo_hits),
        Memo::Miss => Counters::add(&shared.stats.counters().key_memo_misses),
        Memo::Off => {}
    }
    key
}

/// Forwards a request that is not keyed, and marks the answer `BYPASS`. Boxed: the future
/// of every request need not make room for the inner service's call.
fn bypass<S, ReqB, ResB>(
    shared: &Shared,
    inner: S,
    request: Request<RequestBody<ReqB>>,
    why: &'static str,
) -> Pin<Box<impl Future<Output = Served<ResB, S::Error>>>>
where
    S: Service<Request<RequestBody<ReqB>>, Response = Response<ResB>>,
    ReqB: Body,
    ResB: Body,
{
    Box::pin(forward_bypassed(shared, inner, request, why))
}

async fn forward_bypassed<S, ReqB, ResB>(
    shared: &Shared,
    mut inner: S,
    request: Request<RequestBody<ReqB>>,
    why: &'static str,
) -> Result<Response<ResponseBody<ResB>>, S::Error>
where
    S: Service<Request<RequestBody<ReqB>>, Response = Response<ResB>>,
    ReqB: Body,
    ResB: Body,
{
    Counters::add(&shared.stats.counters().bypassed);
    // `only-if-cached` never reaches the upstream, whatever else the request is: a request
    // the cache does not keep (a side effect, `no-store`, a body over the limit) is a 504.
    if Controls::of(request.headers()).only_if_cached {
        tracing::debug!(why, "BYPASS, only-if-cached: 504");
        let (mut parts, body) = not_cached_entry(Some(why)).into_parts();
        parts.headers.insert(
            X_FALLBACK_CACHE,
            HeaderValue::from_static(CacheStatus::Bypass.as_str()),
        );
        parts.extensions.insert(CacheStatus::Bypass);
        return Ok(Response::from_parts(parts, body));
    }
    tracing::debug!(why, "BYPASS");
    // The inner service can tell a bypassed request (its call's failure is not a MISS).
    let mut request = request;
    request.extensions_mut().insert(CacheStatus::Bypass);
    let body_failed = request.body_mut().watch_failure();
    let called = async {
        poll_fn(|cx| inner.poll_ready(cx)).await?;
        inner.call(request).await
    };
    let response = match called.await {
        Ok(response) => response,
        Err(error) => {
            // A failed call is the upstream's failure, as for a keyed request (its answer is
            // passed on unread, so no other reason is told), unless the client's body failed
            // first: then the call failed because of it.
            if !body_failed.is_some_and(|failed| failed.load(Ordering::Relaxed)) {
                let reason = Reason::Unreachable;
                Counters::add(&shared.stats.counters().failures[reason as usize]);
                tracing::debug!(why, %reason, "BYPASS: inner service failed; error returned");
            }
            return Err(error);
        }
    };
    let (mut parts, body) = response.into_parts();
    clean_upstream_head(parts.status, &mut parts.headers, false);
    parts.headers.insert(
        X_FALLBACK_CACHE,
        HeaderValue::from_static(CacheStatus::Bypass.as_str()),
    );
    parts.extensions.insert(CacheStatus::Bypass);
    Ok(Response::from_parts(parts, ResponseBody::upstream(body)))
}

/// The stored answer for a failed call, when the layer falls back on `reason` and has one
/// the request accepts (`max-stale`). `looked` is what the coverage lookup found, if it
/// looked: an answer found then is served, otherwise the store is asked again (an
/// identical request may have stored one since).
async fn fall_back<B: Body>(
    shared: &Shared,
    key: CacheKey,
    seal: Option<&Seal>,
    reason: Reason,
    controls: Controls,
    looked: Looked,
) -> Option<Response<ResponseBody<B>>> {
    if !shared.falls_back_on(reason) {
        return None;
    }
    let counters = shared.stats.counters();
    let found = match looked {
        // Found before the upstream call, which may have taken seconds: aged again.
        Looked::OnArrival(Some((entry, _))) => {
            let age = entry.age();
            (age <= shared.ttl).then_some((entry, age))
        }
        Looked::JustNow(found) => found,
        // The coverage lookup found nothing usable (or failed, counted once): not asked again.
        Looked::OnArrival(None) => None,
        Looked::Not => lookup(shared, &key, seal).await,
    };
    match found.filter(|(_, age)| controls.accepts(*age)) {
        Some((entry, age)) => {
            counters.fallback_age.observe(age);
            Counters::add(&counters.fallbacks);
            Counters::add(&counters.fallbacks_by_reason[reason as usize]);
            tracing::debug!(%key, %reason, "FALLBACK");
            Some(replay(entry, age, CacheStatus::Fallback, key, Some(reason)))
        }
        None => {
            Counters::add(&counters.fallback_misses);
            tracing::debug!(%key, %reason, "nothing stored to fall back on");
            None
        }
    }
}

/// A usable stored answer and its age.
type Found = Option<(Arc<CachedResponse>, Duration)>;

/// What the coverage lookup found for a request that falls back, if it looked.
enum Looked {
    /// It did not look (coverage is off, or the request was counted already, or the lookup
    /// was given up): [`fall_back`] asks the store.
    Not,
    /// When the request arrived, beside the upstream call: an answer found then is served
    /// at the age it has when it is served.
    OnArrival(Found),
    /// Just before falling back (a suspended partition's request, which calls nothing): an
    /// answer found is served at the age it was found with, without reading the clock again.
    JustNow(Found),
}

impl Looked {
    fn on_arrival(looked: Option<Found>) -> Self {
        looked.map_or(Self::Not, Self::OnArrival)
    }

    fn just_now(looked: Option<Found>) -> Self {
        looked.map_or(Self::Not, Self::JustNow)
    }
}

/// The answer under `key`, with its age, if it is usable: present, younger than the TTL,
/// of this key version, opened with its seal if it has one. A store error is counted and
/// is a miss; so is an entry sealing refuses.
async fn lookup(shared: &Shared, key: &CacheKey, seal: Option<&Seal>) -> Found {
    let store = &*shared.store;
    // An answer held in memory is read in place (no boxed store future); otherwise the
    // store is asked (a memory store alone is asked twice on a miss: a second map lookup).
    let found = match store.memory_tier() {
        Some(memory) => match memory.get_entry(key).await {
            Some(entry) => Ok(Some(entry)),
            None => ask(store, key, seal).await,
        },
        None => ask(store, key, seal).await,
    };
    match found {
        Ok(Some(entry)) if entry.key_version() == KEY_VERSION => {
            let age = entry.age();
            (age <= shared.ttl).then_some((entry, age))
        }
        Ok(Some(entry)) => {
            log_other_key_version(key, entry.key_version());
            None
        }
        Ok(None) => None,
        Err(error) => {
            let counters = shared.stats.counters();
            Counters::add(&counters.store_errors);
            // Where an entry should open under a seal, any entry that does not is refused.
            match &error {
                StoreError::Corrupt(entry) if seal.is_some() || entry.is_rejected() => {
                    Counters::add(&counters.rejected_entries);
                }
                StoreError::Corrupt(_) => Counters::add(&counters.corrupt_entries),
                _ => {}
            }
            log_store_error("get", &error);
            None
        }
    }
}

/// Says that the answer under `key` was stored by another release (its key version is not
/// [`KEY_VERSION`]) and is not served: once in a while at info level, else at debug level.
fn log_other_key_version(key: &CacheKey, version: u8) {
    static THROTTLE: LogThrottle = LogThrottle::new(LogThrottle::DEFAULT_QUIET);
    let by = if version < KEY_VERSION {
        "an earlier"
    } else {
        "a later"
    };
    if THROTTLE.first_in_a_while() {
        tracing::info!(
            %key,
            "an answer stored by {by} release (key version {version}, this one reads \
             {KEY_VERSION}) is not served; the next good answer replaces it (more within \
             {}s: at debug level)",
            THROTTLE.quiet().as_secs()
        );
    } else {
        tracing::debug!(%key, "an answer stored by {by} release (key version {version}) is not served");
    }
}

/// The store's own `get` (or `get_sealed`), given up after [`MAX_STORE_READ_WAIT`].
async fn ask(
    store: &dyn Store,
    key: &CacheKey,
    seal: Option<&Seal>,
) -> Result<Option<Arc<CachedResponse>>, StoreError> {
    let read = match seal {
        Some(seal) => store.get_sealed(key, seal),
        None => store.get(key),
    };
    // A read that does not finish (a store of the user's own without a timeout) is a
    // store error, never a request kept waiting.
    within(MAX_STORE_READ_WAIT, read)
        .await
        .unwrap_or(Err(StoreError::Timeout {
            store: "the layer's",
            timeout: MAX_STORE_READ_WAIT,
        }))
}

/// The longest a request waits for the store to answer a read ([`Store::get`]): the
/// built-in stores answer within their own bound (the disk store's read timeout, 1 s by
/// default; Redis's operation timeout, 250 ms by default). A read of a store of the user's
/// own that takes longer is given up, counted in `store_errors`, and the request goes on
/// as if nothing were stored.
pub(crate) const MAX_STORE_READ_WAIT: Duration = Duration::from_secs(2);

fn replay<B: Body>(
    entry: Arc<CachedResponse>,
    age: Duration,
    status: CacheStatus,
    key: CacheKey,
    reason: Option<Reason>,
) -> Response<ResponseBody<B>> {
    // Marked with its status, key and age, and its reason if it has one.
    let marks = 3 + usize::from(reason.is_some());
    let (mut parts, body) = stored_response(&entry, marks).into_parts();
    let key_value = entry.key_header(&key);
    mark(
        &mut parts.headers,
        &mut parts.extensions,
        status,
        (key, key_value),
        reason,
        Some(age),
    );
    Response::from_parts(parts, body)
}

/// A stored answer as a response: its status, its headers, its body frame by frame, with
/// room for `marks` headers more.
///
/// Room for exactly the marking headers that follow, so that adding them does not grow the
/// map again, and no more: the map's table is a power of two (a HIT of three stored headers
/// fits in a table of eight, where one more header would take sixteen), and past a few
/// headers each step is an allocation of over a kilobyte, which glibc's malloc serves from
/// its main heap rather than from its per-thread cache (which ends at 1,032 bytes).
fn stored_response<B: Body>(
    entry: &Arc<CachedResponse>,
    marks: usize,
) -> Response<ResponseBody<B>> {
    let mut response = Response::new(ResponseBody::replay(entry.clone()));
    *response.status_mut() = entry.status();
    let headers = response.headers_mut();
    headers.reserve(entry.headers().len() + marks);
    for (name, value) in entry.headers() {
        headers.append(name.clone(), value.clone());
    }
    response
}

/// Marks a response: `x-fallback-cache`, the key (given with its header value, or encoded
/// here), the reason and the age, as headers and as extensions.
fn mark(
    headers: &mut HeaderMap,
    extensions: &mut http::Extensions,
    status: CacheStatus,
    key: impl Into<Keyed>,
    reason: Option<Reason>,
    age: Option<Duration>,
) {
    let Keyed(key, key_value) = key.into();
    headers.insert(X_FALLBACK_CACHE, HeaderValue::from_static(status.as_str()));
    headers.insert(X_FALLBACK_CACHE_KEY, key_value);
    if let Some(reason) = reason {
        headers.insert(
            X_FALLBACK_CACHE_REASON,
            HeaderValue::from_static(reason.as_str()),
        );
        extensions.insert(reason);
    }
    if let Some(age) = age {
        headers.insert(AGE, age_value(age.as_secs()));
    }
    extensions.insert(status);
    extensions.insert(key);
}

/// A key and its `x-fallback-cache-key` value.
struct Keyed(CacheKey, HeaderValue);

impl From<CacheKey> for Keyed {
    fn from(key: CacheKey) -> Self {
        Self(key, key_header_value(key.hex_digits()))
    }
}

impl From<(CacheKey, HeaderValue)> for Keyed {
    fn from((key, value): (CacheKey, HeaderValue)) -> Self {
        Self(key, value)
    }
}

/// Whether an answer with these headers may be stored: not `no-store`, not announced
/// larger than the limit, and not encoded (asked for `identity`, an upstream that sends
/// gzip anyway has its answer passed on, never replayed to a client that may not read it).
fn storable(headers: &HeaderMap, max_response_body: usize) -> bool {
    let too_long = content_length(headers).is_some_and(|len| len > max_response_body as u64);
    let encoded = headers
        .get_all(CONTENT_ENCODING)
        .iter()
        .any(|v| !v.as_bytes().eq_ignore_ascii_case(b"identity"));
    !too_long && !encoded && !cache_control_has(headers, "no-store")
}

/// Whether the answer is one the inner service reached by following a redirect (a
/// [`ReqwestService`](crate::reqwest::ReqwestService) whose client follows them): another
/// URL's answer, never stored under this request's key.
fn followed_a_redirect(extensions: &http::Extensions) -> bool {
    #[cfg(feature = "reqwest")]
    {
        extensions.get::<crate::reqwest::Redirected>().is_some()
    }
    #[cfg(not(feature = "reqwest"))]
    {
        let _ = extensions;
        false
    }
}

/// The upstream's head made fit to go out: the cache's marks are the cache's, so the
/// upstream's own `x-fallback-cache*` headers (and, when the layer marks the answer, its
/// `age`) are dropped; a 204 or 304 carries no `content-length` (RFC 9110, 8.6).
fn clean_upstream_head(status: StatusCode, headers: &mut HeaderMap, marked: bool) {
    let marks: Vec<HeaderName> = headers
        .keys()
        .filter(|name| name.as_str().starts_with("x-fallback-cache"))
        .cloned()
        .collect();
    for name in marks {
        headers.remove(name);
    }
    if marked {
        headers.remove(AGE);
    }
    if status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
        headers.remove(CONTENT_LENGTH);
    }
}

fn cache_control_has(headers: &HeaderMap, directive: &str) -> bool {
    headers
        .get_all(CACHE_CONTROL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|d| d.trim().eq_ignore_ascii_case(directive))
}

/// Counts a keyed request as covered or uncovered, once: from the first lookup the flow
/// makes anyway (cache-first), or from a lookup of its own beside the upstream call.
struct Coverage {
    /// Whether the request is still to be counted.
    pending: bool,
}

impl Coverage {
    fn new(shared: &Shared) -> Self {
        Self {
            pending: shared.coverage,
        }
    }

    fn count(&mut self, shared: &Shared, found: Option<&(Arc<CachedResponse>, Duration)>) {
        if !std::mem::take(&mut self.pending) {
            return;
        }
        let counters = shared.stats.counters();
        match found {
            Some((_, age)) => {
                Counters::add(&counters.covered);
                counters.covered_age.observe(*age);
            }
            None => Counters::add(&counters.uncovered),
        }
    }

    /// The lookup of a request not counted yet, counted; `None` when it was counted
    /// already (or coverage is off) and nothing was looked up.
    async fn look(
        &mut self,
        shared: &Shared,
        key: &CacheKey,
        seal: Option<&Seal>,
    ) -> Option<Found> {
        if !self.pending {
            return None;
        }
        let found = lookup(shared, key, seal).await;
        self.count(shared, found.as_ref());
        Some(found)
    }
}

/// What a request's `cache-control` asks of the cache (RFC 9111, 5.2.1).
#[derive(Debug, Clone, Copy, Default)]
struct Controls {
    /// `no-store`: neither looked up nor stored (the request bypasses the layer).
    no_store: bool,
    /// `no-cache`: not served from the store before the upstream is asked (cache-first).
    no_cache: bool,
    /// `max-stale=N`: serve a stored answer at most this old, as a fallback or for
    /// `only-if-cached`.
    max_stale: Option<Duration>,
    /// `only-if-cached`: never call the upstream.
    only_if_cached: bool,
}

impl Controls {
    fn of(headers: &HeaderMap) -> Self {
        let mut controls = Self::default();
        for directive in headers
            .get_all(CACHE_CONTROL)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
        {
            let directive = directive.trim();
            let (name, value) = match directive.split_once('=') {
                Some((name, value)) => (name.trim(), Some(value.trim().trim_matches('"'))),
                None => (directive, None),
            };
            if name.eq_ignore_ascii_case("only-if-cached") {
                controls.only_if_cached = true;
            } else if name.eq_ignore_ascii_case("no-store") {
                controls.no_store = true;
            } else if name.eq_ignore_ascii_case("no-cache") {
                controls.no_cache = true;
            } else if name.eq_ignore_ascii_case("max-stale") {
                // Without a value, any age is accepted (RFC 9111, 5.2.1.2); a value that
                // is not a number of seconds is ignored, as an unknown directive is.
                if let Some(Ok(seconds)) = value.map(str::parse::<u64>) {
                    let limit = Duration::from_secs(seconds);
                    controls.max_stale = Some(controls.max_stale.map_or(limit, |l| l.min(limit)));
                }
            }
        }
        controls
    }

    /// Whether a stored answer this old may be served for this request.
    fn accepts(&self, age: Duration) -> bool {
        self.max_stale.is_none_or(|limit| age <= limit)
    }
}

/// The answer to `only-if-cached` when nothing usable is stored: a 504 the OpenAI SDKs do
/// not retry, marked `MISS`.
fn not_cached<B: Body>(key: CacheKey) -> Response<ResponseBody<B>> {
    let (mut parts, body) = not_cached_entry(None).into_parts();
    mark(
        &mut parts.headers,
        &mut parts.extensions,
        CacheStatus::Miss,
        key,
        None,
        None,
    );
    Response::from_parts(parts, body)
}

/// The 504 of `only-if-cached`, unmarked; `bypassed` says why the request is not one the
/// cache keeps, when it is not.
fn not_cached_entry<B: Body>(bypassed: Option<&str>) -> Response<ResponseBody<B>> {
    let mut headers = HeaderMap::new();
    headers.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(X_SHOULD_RETRY, HeaderValue::from_static("false"));
    let message = match bypassed {
        None => "only-if-cached: no stored answer for this request".to_owned(),
        Some(why) => format!("only-if-cached: this request is not one the cache keeps ({why})"),
    };
    let message = serde_json::Value::String(message);
    let body = bytes::Bytes::from(format!(
        r#"{{"error":{{"message":{message},"type":"fallback_cache_error","code":"not_cached"}}}}"#
    ));
    headers.insert(CONTENT_LENGTH, HeaderValue::from(body.len()));
    let entry = Arc::new(CachedResponse::new(
        StatusCode::GATEWAY_TIMEOUT,
        headers,
        vec![body],
    ));
    // Marked with its status, and its key where it has one.
    stored_response::<B>(&entry, 2)
}

/// Runs `b` beside `a` in this task, `a` polled first, until `a` is done: `a`'s output, and
/// `b`'s if it was done by then. `b` never delays `a`: a store that is slow to answer the
/// coverage lookup costs the request that count, not time.
async fn beside<A: Future, B: Future>(a: A, b: B) -> (A::Output, Option<B::Output>) {
    let (mut a, mut b) = (pin!(a), pin!(b));
    let mut out_b = None;
    poll_fn(|cx| {
        let done = a.as_mut().poll(cx);
        if out_b.is_none() {
            if let Poll::Ready(value) = b.as_mut().poll(cx) {
                out_b = Some(value);
            }
        }
        match done {
            Poll::Ready(value) => Poll::Ready((value, out_b.take())),
            Poll::Pending => Poll::Pending,
        }
    })
    .await
}
