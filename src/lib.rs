//! End-to-end tests and benches of fallback-cache.

pub mod stores;
pub mod workload;
