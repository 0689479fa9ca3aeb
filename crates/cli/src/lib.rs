//! `optoutctl`, the operator's command line, as a library: the e2e tests reuse its admin
//! clients, its sync-and-wait logic and its child-process supervision.

pub mod admin;
pub mod children;
pub mod cli;
pub mod dlq;
mod error;
pub mod explain;
pub mod health;
pub mod import;
pub mod status;
pub mod sync;
pub mod up;

pub use error::{Error, Result};
