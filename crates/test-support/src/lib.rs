//! What the end-to-end tests, the benches and the store worker of fallback-cache share (not
//! published): numbered requests and their answers, an upstream that runs out of quota,
//! redis-server helpers ([`stores`]), realistic request and answer bodies ([`workload`]),
//! and the store worker's logic ([`worker`]).

pub mod stores;
pub mod worker;
pub mod workload;
