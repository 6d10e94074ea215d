//! Test support for the HTTP method firewall: the throwaway two-host network
//! ([`lab`]) that the end-to-end tests (`tests/tests/e2e.rs`), `cargo xtask demo` and the
//! benchmarks run the real `filterd`, a real backend and real clients in, and the TCP
//! segments ([`frames`]) that `BPF_PROG_TEST_RUN` callers feed the classifiers.
//!
//! This crate owns test scaffolding only. It must not contain firewall logic
//! (parsing, matching, the 405 response): tests assert what a user sees from
//! outside, so they must not share code with the thing under test. It must not
//! touch the host's own network: everything it creates lives in network
//! namespaces it names uniquely and deletes again.

pub mod frames;
pub mod lab;
pub mod verifier;
