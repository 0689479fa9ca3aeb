//! The fewest API calls any implementation could make for a piece of work, as issue #8 defines
//! them. The benchmark compares the calls the sandbox counted against these.

use optout_salesforce::soql::{encoded_len, quote};
use serde::Serialize;

/// Members per Mailchimp page (`count` is clamped to 1000).
pub const MAILCHIMP_PAGE: u64 = 1000;
/// Records per SOQL result page; more need `GET /query/{locator}` calls.
pub const SALESFORCE_QUERY_PAGE: u64 = 2000;
/// Records per composite sObject collection update.
pub const COLLECTION_SIZE: u64 = 200;
/// A Bulk API 2.0 job takes at least: create, upload, close, one status read.
pub const BULK_JOB_MIN_CALLS: u64 = 4;
/// Salesforce answers 414 above this request-URI length.
pub const URL_LIMIT: usize = 16_384;
/// The path in front of the statement of a GET query.
pub const QUERY_PATH: &str = "/services/data/v59.0/query?q=";
/// The allowance of "+ a few" calls on top of 1.05 × the bound (logins, describes).
pub const SLACK_CALLS: u64 = 5;
/// The allowed factor over the lower bound.
pub const BOUND_FACTOR: f64 = 1.05;

/// Mailchimp: the audience list, plus per audience one page per 1,000 changed members (at least
/// one page, since something must ask whether anything changed).
pub fn mailchimp_calls(changed_per_audience: &[u64]) -> u64 {
    1 + changed_per_audience
        .iter()
        .map(|changed| changed.div_ceil(MAILCHIMP_PAGE).max(1))
        .sum::<u64>()
}

/// Salesforce reads of one object for `emails`: the shortest statement (`SELECT Id FROM X WHERE
/// Email IN (...)`) in chunks as large as the URL limit allows, and at least one call per 2,000
/// records returned.
pub fn read_calls(object: &str, emails: &[String], records: u64) -> u64 {
    if emails.is_empty() {
        return 0;
    }
    let fixed =
        QUERY_PATH.len() + encoded_len(&format!("SELECT Id FROM {object} WHERE Email IN ()"));
    let budget = URL_LIMIT.saturating_sub(fixed).max(1) as u64;
    let comma = encoded_len(",") as u64;
    let bytes: u64 = emails
        .iter()
        .map(|email| encoded_len(&quote(email)) as u64 + comma)
        .sum::<u64>()
        - comma;
    bytes
        .div_ceil(budget)
        .max(records.div_ceil(SALESFORCE_QUERY_PAGE))
}

/// Salesforce writes of one object: collections of 200, or one Bulk API job if that is fewer.
pub fn write_calls(records_to_change: u64) -> u64 {
    if records_to_change == 0 {
        return 0;
    }
    records_to_change
        .div_ceil(COLLECTION_SIZE)
        .min(BULK_JOB_MIN_CALLS)
}

/// Whether `calls` is within 1.05 × `bound` + a few.
pub fn within(calls: u64, bound: u64) -> bool {
    #[allow(clippy::cast_precision_loss)]
    let allowed = bound as f64 * BOUND_FACTOR + SLACK_CALLS as f64;
    #[allow(clippy::cast_precision_loss)]
    let calls = calls as f64;
    calls <= allowed
}

/// The Salesforce lower bound of one phase, by part.
#[derive(Clone, Debug, Default, Serialize)]
pub struct SalesforceBound {
    /// One token request.
    pub login: u64,
    /// Reads of the dirty emails, per object.
    pub reads: u64,
    /// Writes of the records that had to change.
    pub writes: u64,
}

impl SalesforceBound {
    /// The whole bound.
    pub fn total(&self) -> u64 {
        self.login + self.reads + self.writes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mailchimp_counts_the_list_and_a_page_per_thousand() {
        assert_eq!(mailchimp_calls(&[1000, 1001, 0]), 1 + 1 + 2 + 1);
        assert_eq!(mailchimp_calls(&[]), 1);
    }

    #[test]
    fn reads_pack_emails_up_to_the_url_limit() {
        let emails: Vec<String> = (0..10_000).map(|n| format!("p{n:05}@x.io")).collect();
        // 'p00000@x.io' encodes to 19 bytes (quotes and @ as %XX each) + 3 for the comma.
        let per_email = encoded_len(&quote(&emails[0])) + 3;
        assert_eq!(per_email, 22);
        let bound = read_calls("Contact", &emails, 0);
        let budget =
            URL_LIMIT - QUERY_PATH.len() - encoded_len("SELECT Id FROM Contact WHERE Email IN ()");
        assert_eq!(bound, (10_000 * 22 - 3_u64).div_ceil(budget as u64));
        assert!((12..=14).contains(&bound), "{bound}");
        // Many records per email: result pages dominate.
        assert_eq!(read_calls("Contact", &emails[..10], 9_000), 5);
        assert_eq!(read_calls("Contact", &[], 0), 0);
    }

    #[test]
    fn writes_take_the_cheaper_of_collections_and_bulk() {
        assert_eq!(write_calls(0), 0);
        assert_eq!(write_calls(1), 1);
        assert_eq!(write_calls(600), 3);
        assert_eq!(write_calls(601), 4);
        assert_eq!(write_calls(100_000), BULK_JOB_MIN_CALLS);
    }

    #[test]
    fn within_allows_five_percent_and_a_few() {
        assert!(within(110, 100));
        assert!(!within(111, 100));
        assert!(within(5, 0));
        assert!(!within(6, 0));
    }
}
