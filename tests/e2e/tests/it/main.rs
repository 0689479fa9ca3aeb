//! End-to-end tests: the sandbox, the three service binaries, real RabbitMQ and PostgreSQL.
//! Build the binaries first: `cargo build --bins && cargo test -p optout-e2e`.

mod batching;
mod cli;
mod crashes;
mod dead_letters;
mod migrate_only;
mod objects;
mod observability;
mod replicas;
mod rules;
mod support;
