//! End-to-end tests: the sandbox, the three service binaries, real RabbitMQ and PostgreSQL.
//! Build the binaries first: `cargo build --bins && cargo test -p optout-e2e`.

mod automated;
mod batching;
mod cli;
mod crashes;
mod dead_letters;
mod explain;
mod faults;
mod import;
mod migrate_only;
mod objects;
mod observability;
mod operations;
mod otlp;
mod realtime;
mod replicas;
mod rules;
mod secrets;
mod shutdown;
mod support;
