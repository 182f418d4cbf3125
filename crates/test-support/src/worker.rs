//! A second process for the store tests (`tests/stores_disk.rs`, `tests/stores_redis.rs`):
//! it stores answers through the layer, as an application or a proxy replica would. The
//! binary is the root package's `store-worker` (`tests/bin/store-worker.rs`), so the tests
//! find it as `CARGO_BIN_EXE_store-worker`; its logic is here.
//!
//! ```text
//! store-worker fill PATH COUNT         store answers 0..COUNT in the DiskStore at PATH, then exit
//! store-worker write-loop PATH         store answers 0, 1, 2... until killed; after every
//!                                      flush print "committed N" (answers 0..N are on disk)
//! store-worker hold PATH               open the DiskStore at PATH, print "open", keep it
//!                                      open until standard input closes
//! store-worker redis-put URL PREFIX I  store answer I in the Redis at URL under PREFIX, then
//!                                      print "stored KEY"
//! ```

use std::io::{Read, Write};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use crate::stores::{Upstream, send};
use tower::Layer;
use tower_fallback_cache::store::{DiskStore, RedisStore, Store};
use tower_fallback_cache::{FallbackCacheLayer, X_FALLBACK_CACHE_KEY};

type Failure = Box<dyn std::error::Error>;

/// Runs the worker with the process's arguments; the exit code says whether it succeeded.
pub fn main() -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("store-worker: {error}");
            return ExitCode::FAILURE;
        }
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    runtime.block_on(run(&args))
}

async fn run(args: &[String]) -> ExitCode {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let outcome = match args.as_slice() {
        ["fill", path, count] => fill(path, count).await,
        ["write-loop", path] => write_loop(path).await,
        ["hold", path] => hold(path),
        ["redis-put", url, prefix, i] => redis_put(url, prefix, i).await,
        _ => Err("usage: store-worker fill|write-loop|hold|redis-put ... (see the source)".into()),
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("store-worker: {error}");
            ExitCode::FAILURE
        }
    }
}

fn layer_on(store: impl Store) -> (FallbackCacheLayer, Arc<dyn Store>) {
    // Long enough for any test, short enough not to litter a shared Redis.
    let ttl = Duration::from_secs(600);
    let layer = FallbackCacheLayer::builder().store(store).ttl(ttl).build();
    let store = layer.store().clone();
    (layer, store)
}

async fn fill(path: &str, count: &str) -> Result<(), Failure> {
    let count: u32 = count.parse()?;
    let (layer, store) = layer_on(DiskStore::open(path)?);
    let service = layer.layer(Upstream::new());
    for i in 0..count {
        send(&service, i).await;
    }
    store.flush().await?;
    let stats = layer.stats().snapshot();
    if stats.stored != u64::from(count) || stats.store_errors != 0 {
        return Err(format!("stored {} of {count} answers: {stats:?}", stats.stored).into());
    }
    println!("stored {count}");
    Ok(())
}

async fn write_loop(path: &str) -> Result<(), Failure> {
    let (layer, store) = layer_on(DiskStore::open(path)?);
    let service = layer.layer(Upstream::new());
    let mut stdout = std::io::stdout();
    for i in 0.. {
        send(&service, i).await;
        if (i + 1).is_multiple_of(20) {
            store.flush().await?;
            writeln!(stdout, "committed {}", i + 1)?;
            stdout.flush()?;
        }
    }
    Ok(())
}

fn hold(path: &str) -> Result<(), Failure> {
    let store = DiskStore::open(path)?;
    println!("open");
    std::io::stdout().flush()?;
    std::io::stdin().read_to_end(&mut Vec::new())?;
    drop(store);
    Ok(())
}

async fn redis_put(url: &str, prefix: &str, i: &str) -> Result<(), Failure> {
    let i: u32 = i.parse()?;
    let store = RedisStore::builder(url).prefix(prefix).connect().await?;
    let (layer, _) = layer_on(store);
    let service = layer.layer(Upstream::new());
    let (_, headers, _) = send(&service, i).await;
    let stats = layer.stats().snapshot();
    if stats.stored != 1 {
        return Err(format!("the answer was not stored: {stats:?}").into());
    }
    let key = headers.get(X_FALLBACK_CACHE_KEY).ok_or("no key header")?;
    println!("stored {}", key.to_str()?);
    Ok(())
}
