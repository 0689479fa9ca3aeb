//! The Mailchimp Marketing API emulator: `/3.0` over real HTTP with Mailchimp's wire shapes,
//! compliance rules, webhooks, the 10-connection limit, plus the `/_sandbox` control endpoints.

pub(crate) mod api;
pub(crate) mod control;
pub(crate) mod problem;
pub(crate) mod render;
pub(crate) mod store;
pub(crate) mod webhooks;
