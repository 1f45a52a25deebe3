//! The library's integration tests, in one binary (linked once) with one module per area. Each
//! runs the layer behind a real server over real sockets on 127.0.0.1 against the simulator.

mod support;

mod behaviour;

mod cache;
mod compile;
mod grpc;
mod http;
mod metrics;
mod resilience;
mod secrets;
mod skip;
mod upstream_request;

// The shared tier (feature `redis`), against a real redis-server.
#[cfg(feature = "redis")]
mod redis_server;
#[cfg(feature = "redis")]
mod replicas;
#[cfg(feature = "redis")]
mod system;
