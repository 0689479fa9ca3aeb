//! Emulators of the Mailchimp Marketing API and the Salesforce REST API over real HTTP, in memory,
//! with a seeded data generator, fault injection and call accounting.
//!
//! Owners while under construction: `mailchimp/`, `generator.rs`, `main.rs` and this file belong to
//! the Mailchimp half; `salesforce/` to the Salesforce half; `shared.rs` to both.

pub mod shared;
