//! `static-http`: the HTTP stack of `fallback-cache-proxy` with nothing on top, a baseline
//! for `benches/load/run.sh`.
//!
//! The same hyper server (HTTP/1.1 and HTTP/2 by prior knowledge, `TCP_NODELAY`), the same
//! threads as the proxy's default `--workers auto` (an accept loop on a work-stealing
//! runtime handing each connection to the one of one thread per CPU, each with a
//! single-threaded runtime, that has the fewest open), the same allocator (mimalloc), and
//! no proxy, layer, router, watchdog, metrics or logs: every request's body is read and
//! answered `200` with the bytes of one file. The proxy's HIT against it is what the proxy
//! adds to its HTTP stack; against nginx's `return 200`, what the whole costs.
//!
//! ```sh
//! static-http ANSWER_FILE [LISTEN_ADDR]   # prints "listening on http://ADDR" on stderr
//! ```

use std::convert::Infallible;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let (Some(file), listen) = (args.next(), args.next()) else {
        eprintln!("usage: static-http ANSWER_FILE [LISTEN_ADDR]");
        return ExitCode::from(2);
    };
    let answer = match std::fs::read(&file) {
        Ok(bytes) => Bytes::from(bytes),
        Err(error) => {
            eprintln!("static-http: cannot read {file}: {error}");
            return ExitCode::FAILURE;
        }
    };
    let listen: SocketAddr = match listen.as_deref().unwrap_or("127.0.0.1:0").parse() {
        Ok(addr) => addr,
        Err(error) => {
            eprintln!("static-http: bad listen address: {error}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("static-http: no runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve(listen, answer)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("static-http: {error}");
            ExitCode::FAILURE
        }
    }
}

/// A connection-serving thread: where to send it connections, and how many it has open.
struct Worker {
    connections: tokio::sync::mpsc::UnboundedSender<std::net::TcpStream>,
    open: Arc<AtomicUsize>,
}

/// One thread per CPU, each with a single-threaded runtime serving the connections sent
/// to it, as the proxy's workers do.
fn workers(answer: &Bytes) -> std::io::Result<Vec<Worker>> {
    let count = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
    (0..count)
        .map(|index| {
            let (connections, mut taken) = tokio::sync::mpsc::unbounded_channel();
            let open = Arc::new(AtomicUsize::new(0));
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let (answer, counted) = (answer.clone(), open.clone());
            std::thread::Builder::new()
                .name(format!("static-worker-{index}"))
                .spawn(move || {
                    runtime.block_on(async move {
                        while let Some(stream) = taken.recv().await {
                            let Ok(stream) = tokio::net::TcpStream::from_std(stream) else {
                                counted.fetch_sub(1, Ordering::Relaxed);
                                continue;
                            };
                            let (answer, counted) = (answer.clone(), counted.clone());
                            tokio::spawn(async move {
                                serve_connection(stream, answer).await;
                                counted.fetch_sub(1, Ordering::Relaxed);
                            });
                        }
                    });
                })?;
            Ok(Worker { connections, open })
        })
        .collect()
}

async fn serve(listen: SocketAddr, answer: Bytes) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let workers = workers(&answer)?;
    eprintln!("static-http listening on http://{}", listener.local_addr()?);
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                eprintln!("static-http: accept: {error}");
                continue;
            }
        };
        // As the proxy does: each write goes out at once.
        let _ = stream.set_nodelay(true);
        let (Some(worker), Ok(stream)) = (
            workers
                .iter()
                .min_by_key(|worker| worker.open.load(Ordering::Relaxed)),
            stream.into_std(),
        ) else {
            continue;
        };
        worker.open.fetch_add(1, Ordering::Relaxed);
        if worker.connections.send(stream).is_err() {
            worker.open.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

async fn serve_connection(stream: tokio::net::TcpStream, answer: Bytes) {
    let service = hyper::service::service_fn(move |request: Request<Incoming>| {
        let answer = answer.clone();
        async move {
            // The body is read, as the proxy reads it to key the request.
            let _ = request.into_body().collect().await;
            let mut response = Response::new(Full::new(answer));
            response
                .headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            Ok::<_, Infallible>(response)
        }
    });
    let _ = auto::Builder::new(TokioExecutor::new())
        .serve_connection(TokioIo::new(stream), service)
        .await;
}
