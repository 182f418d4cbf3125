//! The store worker: a second process for the store tests (see
//! `fallback_cache_test_support::worker`). A binary of the root package, so the tests in
//! `tests/` find it as `CARGO_BIN_EXE_store-worker`.

fn main() -> std::process::ExitCode {
    fallback_cache_test_support::worker::main()
}
