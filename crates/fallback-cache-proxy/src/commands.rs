//! The proxy's subcommands: `fingerprint`. With no subcommand the proxy serves, as it
//! always has, so every existing invocation keeps working.

use std::ffi::OsString;
use std::io::Read;
use std::process::ExitCode;

use tower_fallback_cache::Tenants;

/// Runs the subcommand `args` names, if the first argument is one; `None` otherwise.
pub(crate) fn run(args: impl IntoIterator<Item = OsString>) -> Option<ExitCode> {
    let mut args = args.into_iter().skip(1);
    match args.next()?.to_str()? {
        "fingerprint" => Some(fingerprint(args.collect())),
        _ => None,
    }
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
    println!("{}", Tenants::fingerprint(key));
    ExitCode::SUCCESS
}
