//! The sidecar's integration tests, in one binary (linked once). Each starts the real
//! `conneqt-guard` binary against the simulator and a backend on 127.0.0.1.

// The library tests' helpers (client, problem+json checks), shared rather than copied.
#[path = "../../../tests/it/support.rs"]
mod support;
// The README's behaviour table, written once for the library and the sidecar.
#[path = "../../../tests/it/behaviour.rs"]
mod behaviour;

mod sidecar;
#[path = "../../../tests/it/system.rs"]
mod system;
mod wire;

mod forward_auth;
mod proxy;
mod relay;
mod replicas;
mod security;

// A real redis-server for the shared tier's tests.
#[path = "../../../tests/it/redis_server.rs"]
mod redis_server;
