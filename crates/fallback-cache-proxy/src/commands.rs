//! The proxy's subcommands: `fingerprint`, `export`, `import`, and the offline `stats` and
//! `purge` (see [`crate::offline`]). With no subcommand the proxy serves, as it always has,
//! so every existing invocation keeps working.

use std::ffi::OsString;
use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use tower_fallback_cache::{Store, Tenants};

use crate::parse::StoreSpec;
use crate::snapshot;

/// `export`: writes a store's entries, sealed as they are, to a snapshot file.
#[derive(Debug, Parser)]
#[command(name = "fallback-cache-proxy export")]
struct Export {
    /// The store to read: disk:PATH, redis://host:port/db or redis+cluster://host:port.
    #[arg(long, value_name = "STORE")]
    store: String,
    /// The snapshot file to write (replaced whole, never left half-written).
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
    /// The CA certificates (PEM) a rediss:// store's certificate is verified against, for a
    /// private CA; the system roots without it.
    #[arg(long, env = "FALLBACK_CACHE_REDIS_CA_FILE", value_name = "FILE")]
    redis_ca_file: Option<PathBuf>,
}

/// `import`: loads a snapshot file into a store, after checking all of it.
#[derive(Debug, Parser)]
#[command(name = "fallback-cache-proxy import")]
struct Import {
    /// The store to write: disk:PATH or redis://host:port/db.
    #[arg(long, value_name = "STORE")]
    store: String,
    /// The snapshot file to read.
    #[arg(long = "in", value_name = "FILE")]
    input: PathBuf,
    /// The CA certificates (PEM) a rediss:// store's certificate is verified against, for a
    /// private CA; the system roots without it.
    #[arg(long, env = "FALLBACK_CACHE_REDIS_CA_FILE", value_name = "FILE")]
    redis_ca_file: Option<PathBuf>,
}

/// Runs the subcommand `args` names, if the first argument is one; `None` otherwise.
pub(crate) fn run(args: impl IntoIterator<Item = OsString>) -> Option<ExitCode> {
    let args: Vec<OsString> = args.into_iter().collect();
    let rest = || args.iter().skip(2).cloned();
    Some(match args.get(1)?.to_str()? {
        "fingerprint" => fingerprint(rest().collect()),
        "export" => snapshot_command(
            Export::try_parse_from(std::iter::once("export".into()).chain(rest())).map(Job::Export),
        ),
        "import" => snapshot_command(
            Import::try_parse_from(std::iter::once("import".into()).chain(rest())).map(Job::Import),
        ),
        "stats" | "purge" => crate::offline::run(args),
        _ => return None,
    })
}

/// `fallback-cache-proxy fingerprint`: the fingerprint of the credential read from stdin
/// (an API key, or `Bearer KEY`), for the --tenants file. The key is never printed.
fn fingerprint(rest: Vec<OsString>) -> ExitCode {
    if !rest.is_empty() {
        eprintln!(
            "usage: fallback-cache-proxy fingerprint < key-file (reads the API key from stdin; \
             it is never an argument, which the process list shows)"
        );
        return ExitCode::from(2);
    }
    let mut key = String::new();
    if let Err(error) = std::io::stdin().read_to_string(&mut key) {
        eprintln!("error: cannot read the key from stdin: {error}");
        return ExitCode::FAILURE;
    }
    let key = key.trim();
    let key = match key.split_once(' ') {
        Some((scheme, rest)) if scheme.eq_ignore_ascii_case("bearer") => rest.trim(),
        _ => key,
    };
    if key.is_empty() {
        eprintln!("error: no key on stdin");
        return ExitCode::FAILURE;
    }
    out!("{}", Tenants::fingerprint(key));
    ExitCode::SUCCESS
}

enum Job {
    Export(Export),
    Import(Import),
}

fn snapshot_command(job: Result<Job, clap::Error>) -> ExitCode {
    let job = match job {
        Ok(job) => job,
        Err(error) => {
            let _ = error.print();
            return ExitCode::from(2);
        }
    };
    let runtime = match crate::runtime() {
        Ok(runtime) => runtime,
        Err(code) => return code,
    };
    let done = runtime.block_on(async {
        match job {
            Job::Export(export) => run_export(export).await,
            Job::Import(import) => run_import(import).await,
        }
    });
    match done {
        Ok(()) => ExitCode::SUCCESS,
        Err(why) => {
            eprintln!("error: {why}");
            ExitCode::FAILURE
        }
    }
}

async fn run_export(export: Export) -> Result<(), String> {
    let shown = shown(&export.store);
    let store = open(&export.store, export.redis_ca_file.as_deref(), Create::No).await?;
    let entries = store
        .export()
        .await
        .map_err(|error| format!("cannot read {shown}: {error}"))?;
    let bytes: usize = entries.iter().map(|entry| entry.value.len()).sum();
    out!(
        "read {} entries ({bytes} bytes) from {}",
        entries.len(),
        shown
    );
    let encoded = snapshot::encode(&entries);
    let partial = export.out.with_extension("partial");
    write_private(&partial, &encoded)
        .and_then(|()| std::fs::rename(&partial, &export.out))
        .map_err(|error| format!("cannot write {}: {error}", export.out.display()))?;
    out!(
        "wrote {} entries to {} ({} bytes)",
        entries.len(),
        export.out.display(),
        encoded.len()
    );
    Ok(())
}

/// Writes `bytes` to a new file at `path` readable by its owner only (mode 0600, as the
/// store file): a snapshot holds answers, in clear where they were stored unsealed. Synced
/// before it is renamed into place.
fn write_private(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    // The mode applies to a file created here, not to one left by an earlier run.
    match std::fs::remove_file(path) {
        Err(error) if error.kind() != std::io::ErrorKind::NotFound => return Err(error),
        _ => {}
    }
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

async fn run_import(import: Import) -> Result<(), String> {
    let bytes = std::fs::read(&import.input)
        .map_err(|error| format!("cannot read {}: {error}", import.input.display()))?;
    // The whole file is checked before the store is touched: nothing half-imported.
    let entries = snapshot::decode(&bytes)
        .map_err(|why| format!("{} refused: {why}", import.input.display()))?;
    let total = entries.len();
    let entries = snapshot::live(entries);
    out!(
        "{}: {total} entries, checksum ok, {} not expired",
        import.input.display(),
        entries.len()
    );
    let shown = shown(&import.store);
    let store = open(&import.store, import.redis_ca_file.as_deref(), Create::Yes).await?;
    let count = entries.len();
    store
        .import(entries)
        .await
        .map_err(|error| format!("cannot write {shown}: {error}"))?;
    out!("imported {count} entries into {shown}");
    Ok(())
}

/// About how many bytes of a snapshot an import into a disk store writes and makes durable
/// at a time: an import that fails part way (a full disk) has the batches before it kept,
/// and says how many entries they held.
const IMPORT_BATCH: u64 = 8 * 1024 * 1024;

/// Whether a disk store's file may be created: an import may start a new one, an export
/// reads one that exists (a typo in its path is an error, not an empty snapshot).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Create {
    Yes,
    No,
}

/// A `--store` setting as it may be shown: a URL's password hidden however the URL is
/// written (after a space, its scheme in capitals), as the server shows its settings.
fn shown(spec: &str) -> String {
    if spec.contains("://") {
        crate::parse::redact(spec)
    } else {
        spec.to_owned()
    }
}

/// The store of record a setting names (no memory tier in front). A damaged file is
/// reported, never moved aside: offline commands leave files as they find them.
async fn open(
    setting: &str,
    ca_file: Option<&std::path::Path>,
    create: Create,
) -> Result<Arc<dyn Store>, String> {
    // Named in messages with its password hidden.
    let spec = shown(setting);
    #[cfg(not(feature = "redis"))]
    let _ = ca_file;
    match StoreSpec::parse(setting).map_err(|why| format!("--store {spec}: {why}"))? {
        StoreSpec::Memory => Err(format!(
            "--store {spec}: a memory store lives and dies with its process; export and import need disk:PATH or redis://host:port/db"
        )),
        #[cfg(feature = "disk")]
        StoreSpec::Disk(path) => {
            if create == Create::No && !path.is_file() {
                return Err(format!("{}: no such store file", path.display()));
            }
            let store = tokio::task::spawn_blocking(move || {
                tower_fallback_cache::store::DiskStore::builder(path)
                    .on_corrupt(tower_fallback_cache::store::OnCorrupt::Refuse)
                    .max_queued_bytes(2 * IMPORT_BATCH)
                    .open()
            })
            .await
            .map_err(|error| format!("opening {spec} failed: {error}"))?
            .map_err(|error| format!("cannot open {spec}: {error}"))?;
            Ok(Arc::new(store))
        }
        #[cfg(feature = "redis")]
        StoreSpec::Redis(url) => crate::store::open_redis(&url, ca_file)
            .await
            .map_err(|error| format!("cannot connect to {spec}: {error}")),
        #[allow(unreachable_patterns)]
        _ => Err(format!("--store {spec}: this build has no such store")),
    }
}
