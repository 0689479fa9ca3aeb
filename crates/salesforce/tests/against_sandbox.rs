//! The client against the sandbox's Salesforce emulator over real TLS.

use std::time::Duration;

use anyhow::{Context, Result};
use futures::TryStreamExt;
use optout_salesforce::{Auth, Error, RecordUpdate, SalesforceClient, SalesforceConfig, soql};
use optout_sandbox::salesforce::{self, NewRecord, OrgSettings, SalesforceEndpoint, SalesforceOrg};
use optout_sandbox::shared::{FaultSettings, Shared};
use secrecy::SecretString;
use serde::Deserialize;
use serde_json::json;
use tokio_util::sync::CancellationToken;

/// A running emulator with an org the test filled itself.
struct TestOrg {
    org: SalesforceOrg,
    shared: Shared,
    endpoint: SalesforceEndpoint,
    shutdown: CancellationToken,
}

impl Drop for TestOrg {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

impl TestOrg {
    async fn start(person_accounts: bool, fill: impl FnOnce(&SalesforceOrg)) -> Result<TestOrg> {
        let org = SalesforceOrg::new(OrgSettings {
            person_accounts,
            daily_api_budget: 1_000_000,
        });
        fill(&org);
        let shared = Shared::default();
        let shutdown = CancellationToken::new();
        let state_dir =
            std::env::temp_dir().join(format!("optout-salesforce-test-{}", fastrand_suffix()));
        let endpoint = salesforce::start(
            org.clone(),
            shared.clone(),
            "127.0.0.1:0".parse()?,
            &state_dir,
            shutdown.clone(),
        )
        .await
        .context("failed to start the salesforce emulator")?;
        Ok(TestOrg {
            org,
            shared,
            endpoint,
            shutdown,
        })
    }

    fn config(&self) -> SalesforceConfig {
        let mut config = SalesforceConfig::new(
            self.endpoint.login_url.clone(),
            Auth::ClientCredentials {
                client_id: self.endpoint.client_id.clone(),
                client_secret: SecretString::from(self.endpoint.client_secret.clone()),
            },
        );
        config.ca_file = Some(self.endpoint.ca_file.clone());
        config.timeout = Duration::from_secs(10);
        config
    }

    fn client(&self) -> Result<SalesforceClient> {
        Ok(SalesforceClient::new(self.config())?)
    }
}

fn fastrand_suffix() -> String {
    format!(
        "{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    )
}

fn contact(email: &str, last_name: &str) -> NewRecord {
    NewRecord::Contact {
        email: email.into(),
        first_name: "Test".into(),
        last_name: last_name.into(),
        opted_out: false,
    }
}

fn lead(email: &str, converted: bool) -> NewRecord {
    NewRecord::Lead {
        email: email.into(),
        first_name: "Lee".into(),
        last_name: "Lead".into(),
        company: "Acme".into(),
        opted_out: false,
        converted,
    }
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Row {
    id: String,
    #[serde(default)]
    email: Option<String>,
    #[serde(default)]
    has_opted_out_of_email: Option<bool>,
}

fn opt_out(object: &str, id: &str) -> RecordUpdate {
    let mut fields = serde_json::Map::new();
    fields.insert("HasOptedOutOfEmail".into(), json!(true));
    RecordUpdate {
        object: object.into(),
        id: id.into(),
        fields,
    }
}

#[tokio::test]
async fn client_credentials_query_follows_next_records_url() -> Result<()> {
    let sandbox = TestOrg::start(false, |org| {
        for number in 0..2_500 {
            org.insert(contact(&format!("pager{number}@example.com"), "Pager"));
        }
        org.insert(contact("other@example.com", "Other"));
    })
    .await?;
    let client = sandbox.client()?;
    let rows: Vec<Row> = client
        .query("SELECT Id, Email FROM Contact WHERE LastName = 'Pager'")
        .await?;
    assert_eq!(rows.len(), 2_500);
    assert!(
        rows.iter()
            .all(|row| row.id.starts_with("003") && row.id.len() == 18)
    );
    let pages: Vec<Vec<Row>> = client
        .query_stream("SELECT Id FROM Contact WHERE LastName = 'Pager'".to_owned())
        .try_collect()
        .await?;
    assert_eq!(
        pages.iter().map(Vec::len).collect::<Vec<_>>(),
        vec![2_000, 500]
    );
    let usage = client.limits().context("Sforce-Limit-Info was parsed")?;
    assert_eq!(usage.max, 1_000_000);
    assert!(
        usage.used >= 4,
        "four data calls were counted, saw {}",
        usage.used
    );
    assert_eq!(usage.used, sandbox.org.api_usage().0);
    Ok(())
}

#[tokio::test]
async fn jwt_bearer_login_works_and_wrong_user_is_refused() -> Result<()> {
    let sandbox = TestOrg::start(false, |org| {
        org.insert(contact("jwt@example.com", "Jwt"));
    })
    .await?;
    let key = std::fs::read_to_string(&sandbox.endpoint.jwt_private_key_file)?;
    let mut config = sandbox.config();
    config.auth = Auth::JwtBearer {
        client_id: sandbox.endpoint.client_id.clone(),
        username: sandbox.endpoint.jwt_username.clone(),
        private_key_pem: SecretString::from(key.clone()),
        audience: sandbox.endpoint.login_url.clone(),
    };
    let client = SalesforceClient::new(config.clone())?;
    let rows: Vec<Row> = client.query("SELECT Id, Email FROM Contact").await?;
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].email.as_deref(), Some("jwt@example.com"));

    config.auth = Auth::JwtBearer {
        client_id: sandbox.endpoint.client_id.clone(),
        username: "stranger@example.com".into(),
        private_key_pem: SecretString::from(key),
        audience: sandbox.endpoint.login_url.clone(),
    };
    let refused = SalesforceClient::new(config)?
        .query::<Row>("SELECT Id FROM Contact")
        .await;
    assert!(
        matches!(refused, Err(Error::Auth { ref error, .. }) if error == "invalid_grant"),
        "{refused:?}"
    );
    Ok(())
}

#[tokio::test]
async fn wrong_client_secret_is_an_auth_error() -> Result<()> {
    let sandbox = TestOrg::start(false, |_| {}).await?;
    let mut config = sandbox.config();
    config.auth = Auth::ClientCredentials {
        client_id: sandbox.endpoint.client_id.clone(),
        client_secret: SecretString::from("wrong"),
    };
    let refused = SalesforceClient::new(config)?
        .query::<Row>("SELECT Id FROM Contact")
        .await;
    let error = refused.expect_err("wrong secret is refused");
    assert!(matches!(error, Error::Auth { .. }), "{error:?}");
    assert!(!error.is_retryable());
    Ok(())
}

#[tokio::test]
async fn soql_injection_attempt_returns_no_extra_rows() -> Result<()> {
    let sandbox = TestOrg::start(false, |org| {
        org.insert(contact("a@example.com", "A"));
        org.insert(contact("b@example.com", "B"));
        org.insert(contact("O'Brien@Example.com", "C"));
    })
    .await?;
    let client = sandbox.client()?;
    let attack = "x' OR Email != '";
    let rows: Vec<Row> = client
        .query(&format!(
            "SELECT Id FROM Contact WHERE Email = {}",
            soql::quote(attack)
        ))
        .await?;
    assert!(rows.is_empty());
    let rows: Vec<Row> = client
        .query(&format!(
            "SELECT Id, Email FROM Contact WHERE Email IN {}",
            soql::in_list([attack, "o'brien@example.com"])
        ))
        .await?;
    assert_eq!(rows.len(), 1, "only the case-insensitive match of O'Brien");
    assert_eq!(rows[0].email.as_deref(), Some("O'Brien@Example.com"));
    Ok(())
}

#[tokio::test]
async fn chunked_in_clauses_fit_the_uri_limit_and_long_ones_get_414() -> Result<()> {
    let emails: Vec<String> = (0..3_000)
        .map(|number| format!("someone.with.a.long.name{number}@example.com"))
        .collect();
    let sandbox = TestOrg::start(false, |org| {
        for email in emails.iter().step_by(10) {
            org.insert(contact(email, "Chunk"));
        }
    })
    .await?;
    let client = sandbox.client()?;
    let statements = soql::chunk_in_clauses(
        "SELECT Id, Email FROM Contact WHERE Email IN ",
        &emails,
        " AND IsDeleted = false",
        soql::DEFAULT_MAX_ENCODED_LEN,
    );
    assert!(statements.len() > 1);
    let mut found = 0;
    for statement in &statements {
        found += client.query::<Row>(statement).await?.len();
    }
    assert_eq!(found, 300);
    let too_long = format!(
        "SELECT Id FROM Contact WHERE Email IN {}",
        soql::in_list(emails[..500].iter().map(String::as_str))
    );
    let refused = client.query::<Row>(&too_long).await;
    assert!(
        matches!(refused, Err(Error::Api { status: 414, .. })),
        "{refused:?}"
    );
    Ok(())
}

#[tokio::test]
async fn malformed_queries_and_unknown_fields_are_typed() -> Result<()> {
    let sandbox = TestOrg::start(false, |_| {}).await?;
    let client = sandbox.client()?;
    let bad_field = client
        .query::<Row>("SELECT Id, PersonEmail FROM Account")
        .await;
    assert!(
        matches!(bad_field, Err(Error::InvalidField { .. })),
        "{bad_field:?}"
    );
    let bad_syntax = client
        .query::<Row>("SELECT Id FROM Contact WHERE Email = ")
        .await;
    assert!(
        matches!(bad_syntax, Err(Error::MalformedQuery { .. })),
        "{bad_syntax:?}"
    );
    assert!(!client.has_person_accounts().await?);
    Ok(())
}

#[tokio::test]
async fn person_accounts_are_detected_and_mirror_their_contact() -> Result<()> {
    let mut account_id = String::new();
    let sandbox = TestOrg::start(true, |org| {
        account_id = org.insert(NewRecord::PersonAccount {
            email: "person@example.com".into(),
            first_name: "Pat".into(),
            last_name: "Person".into(),
            opted_out: false,
        });
    })
    .await?;
    let client = sandbox.client()?;
    assert!(client.has_person_accounts().await?);
    let mut fields = serde_json::Map::new();
    fields.insert("PersonHasOptedOutOfEmail".into(), json!(true));
    let results = client
        .update_collection(&[RecordUpdate {
            object: "Account".into(),
            id: account_id.clone(),
            fields,
        }])
        .await?;
    assert!(results[0].success, "{results:?}");
    let contacts: Vec<Row> = client
        .query("SELECT Id, Email, HasOptedOutOfEmail FROM Contact WHERE IsPersonAccount = true AND Email = 'PERSON@example.com'")
        .await?;
    assert_eq!(contacts.len(), 1);
    assert_eq!(contacts[0].has_opted_out_of_email, Some(true));
    Ok(())
}

#[tokio::test]
async fn composite_update_reports_a_converted_lead_per_record() -> Result<()> {
    let mut ids = Vec::new();
    let sandbox = TestOrg::start(false, |org| {
        ids.push(org.insert(contact("c@example.com", "C")));
        ids.push(org.insert(lead("converted@example.com", true)));
        ids.push(org.insert(lead("open@example.com", false)));
    })
    .await?;
    let client = sandbox.client()?;
    let results = client
        .update_collection(&[
            opt_out("Contact", &ids[0]),
            opt_out("Lead", &ids[1]),
            opt_out("Lead", &ids[2]),
        ])
        .await?;
    assert_eq!(results.len(), 3);
    assert!(results[0].success && results[2].success);
    assert!(!results[1].success);
    assert_eq!(
        results[1].errors[0].status_code,
        "CANNOT_UPDATE_CONVERTED_LEAD"
    );
    assert!(!results[1].errors[0].is_retryable());
    let leads: Vec<Row> = client
        .query("SELECT Id, HasOptedOutOfEmail FROM Lead WHERE IsConverted = false")
        .await?;
    assert_eq!(leads.len(), 1);
    assert_eq!(leads[0].has_opted_out_of_email, Some(true));
    Ok(())
}

#[tokio::test]
async fn collections_longer_than_200_are_chunked_and_lock_failures_are_retryable() -> Result<()> {
    let mut ids = Vec::new();
    let sandbox = TestOrg::start(false, |org| {
        for number in 0..450 {
            ids.push(org.insert(contact(&format!("many{number}@example.com"), "Many")));
        }
    })
    .await?;
    let client = sandbox.client()?;
    let updates: Vec<RecordUpdate> = ids.iter().map(|id| opt_out("Contact", id)).collect();
    let results = client.update_collection(&updates).await?;
    assert_eq!(results.len(), 450);
    assert!(results.iter().all(|result| result.success));
    let calls = sandbox.shared.stats.snapshot();
    let patches = calls
        .calls
        .values()
        .flat_map(|per| per.get("PATCH /composite/sobjects"))
        .sum::<u64>();
    assert_eq!(patches, 3);

    sandbox.shared.faults.set(FaultSettings {
        unable_to_lock_row_rate: 1.0,
        ..FaultSettings::default()
    });
    let results = client.update_collection(&updates[..2]).await?;
    assert!(
        results
            .iter()
            .all(|result| !result.success && result.errors[0].is_retryable())
    );
    Ok(())
}

#[tokio::test]
async fn bulk_update_job_reports_successes_and_failures() -> Result<()> {
    let mut ids = Vec::new();
    let sandbox = TestOrg::start(false, |org| {
        ids.push(org.insert(contact("bulk1@example.com", "Bulk")));
        ids.push(org.insert(contact("bulk2@example.com", "Bulk")));
        ids.push(org.insert(lead("bulk3@example.com", false)));
    })
    .await?;
    let client = sandbox.client()?;
    let csv = format!(
        "Id,HasOptedOutOfEmail\n{},true\n{},TRUE\n{},true\n",
        ids[0], ids[1], ids[2]
    );
    let result = client.bulk_update("Contact", csv.clone(), 3).await?;
    assert!(result.job_id.starts_with("750"));
    // Every row was processed, so the successes are the rows not in failedResults: not downloaded.
    assert!(result.rest_succeeded);
    assert!(result.successful.is_empty());
    assert_eq!(result.failed.len(), 1);
    assert_eq!(result.failed[0]["sf__Id"], ids[2]);
    assert!(
        result.failed[0]["sf__Error"].starts_with("MALFORMED_ID"),
        "{:?}",
        result.failed
    );
    assert_eq!(bulk_result_reads(&sandbox), (0, 1));

    // When the job processed fewer rows than were sent, both lists must be read.
    let result = client.bulk_update("Contact", csv, 4).await?;
    assert!(!result.rest_succeeded);
    assert_eq!(result.successful.len(), 2);
    assert_eq!(result.failed.len(), 1);
    assert_eq!(bulk_result_reads(&sandbox), (1, 2));

    // Nothing failed: the status read is the only call after closing the job.
    let clean = format!("Id,HasOptedOutOfEmail\n{},true\n", ids[0]);
    let result = client.bulk_update("Contact", clean, 1).await?;
    assert!(result.rest_succeeded && result.failed.is_empty());
    assert_eq!(bulk_result_reads(&sandbox), (1, 2));
    let opted: Vec<Row> = client
        .query("SELECT Id FROM Contact WHERE HasOptedOutOfEmail = true")
        .await?;
    assert_eq!(opted.len(), 2);
    Ok(())
}

/// Calls to `successfulResults` and `failedResults` the sandbox counted so far.
fn bulk_result_reads(sandbox: &TestOrg) -> (u64, u64) {
    let stats = sandbox.shared.stats.snapshot();
    let count = |route: &str| {
        stats
            .calls
            .values()
            .flat_map(|per| per.get(route))
            .sum::<u64>()
    };
    (
        count("GET /jobs/ingest/{job}/successfulResults"),
        count("GET /jobs/ingest/{job}/failedResults"),
    )
}

#[tokio::test]
async fn token_is_refreshed_after_every_token_expires() -> Result<()> {
    let sandbox = TestOrg::start(false, |org| {
        org.insert(contact("refresh@example.com", "Refresh"));
    })
    .await?;
    let client = sandbox.client()?;
    assert_eq!(
        client.query::<Row>("SELECT Id FROM Contact").await?.len(),
        1
    );
    sandbox.org.expire_tokens();
    assert_eq!(
        client.query::<Row>("SELECT Id FROM Contact").await?.len(),
        1
    );
    let tokens = sandbox.shared.stats.snapshot();
    let logins = tokens
        .calls
        .values()
        .flat_map(|per| per.get("POST /services/oauth2/token"))
        .sum::<u64>();
    assert_eq!(logins, 2);
    Ok(())
}

#[tokio::test]
async fn retries_ride_out_injected_503s() -> Result<()> {
    let sandbox = TestOrg::start(false, |org| {
        org.insert(contact("retry@example.com", "Retry"));
    })
    .await?;
    let mut config = sandbox.config();
    config.max_retries = 10;
    let client = SalesforceClient::new(config)?;
    client.query::<Row>("SELECT Id FROM Contact").await?;
    let mut faults = FaultSettings::default();
    faults.salesforce.rate_503 = 0.3;
    sandbox.shared.faults.set(faults);
    for _ in 0..20 {
        assert_eq!(
            client.query::<Row>("SELECT Id FROM Contact").await?.len(),
            1
        );
    }
    let calls = sandbox.shared.stats.snapshot();
    let queries = calls
        .calls
        .values()
        .flat_map(|per| per.get("GET /query"))
        .sum::<u64>();
    assert!(queries > 21, "some 503s were retried, saw {queries} calls");
    Ok(())
}

#[tokio::test]
async fn request_limit_exceeded_is_reported_not_retried() -> Result<()> {
    let sandbox = TestOrg::start(false, |org| {
        org.insert(contact("limit@example.com", "Limit"));
    })
    .await?;
    let client = sandbox.client()?;
    client.query::<Row>("SELECT Id FROM Contact").await?;
    sandbox.org.set_api_usage(Some(1_000_000), None);
    let refused = client.query::<Row>("SELECT Id FROM Contact").await;
    let error = refused.expect_err("budget exhausted");
    assert!(
        matches!(error, Error::RequestLimitExceeded { .. }),
        "{error:?}"
    );
    assert!(!error.is_retryable());
    assert_eq!(
        client.limits().map(|usage| (usage.used, usage.max)),
        Some((1_000_000, 1_000_000))
    );
    Ok(())
}

#[tokio::test]
async fn incremental_poll_by_system_modstamp_sees_every_write() -> Result<()> {
    let mut ids = Vec::new();
    let sandbox = TestOrg::start(false, |org| {
        for number in 0..5 {
            ids.push(org.insert(contact(&format!("poll{number}@example.com"), "Poll")));
        }
    })
    .await?;
    let client = sandbox.client()?;
    #[derive(Debug, Deserialize)]
    #[serde(rename_all = "PascalCase")]
    struct Stamped {
        id: String,
        system_modstamp: String,
    }
    let all: Vec<Stamped> = client
        .query("SELECT Id, SystemModstamp FROM Contact ORDER BY SystemModstamp DESC LIMIT 1")
        .await?;
    let watermark =
        optout_salesforce::parse_datetime(&all[0].system_modstamp).context("datetime parses")?;
    for id in &ids[..3] {
        client.update_collection(&[opt_out("Contact", id)]).await?;
    }
    let changed: Vec<Stamped> = client
        .query(&format!(
            "SELECT Id, SystemModstamp FROM Contact WHERE SystemModstamp > {} ORDER BY SystemModstamp ASC",
            soql::datetime(watermark)
        ))
        .await?;
    assert_eq!(
        changed
            .iter()
            .map(|row| row.id.as_str())
            .collect::<Vec<_>>(),
        ids[..3].iter().map(String::as_str).collect::<Vec<_>>()
    );
    let stamps: Vec<_> = changed
        .iter()
        .map(|row| row.system_modstamp.clone())
        .collect();
    let mut unique = stamps.clone();
    unique.dedup();
    assert_eq!(
        unique.len(),
        3,
        "every write got its own millisecond: {stamps:?}"
    );
    Ok(())
}

#[tokio::test]
async fn sandbox_start_serves_salesforce_with_its_published_credentials() -> Result<()> {
    let sandbox = optout_sandbox::Sandbox::start(optout_sandbox::SandboxConfig {
        members: 50,
        audiences: 1,
        ..optout_sandbox::SandboxConfig::default()
    })
    .await?;
    let info = sandbox.info().clone();
    let mut config = SalesforceConfig::new(
        info.salesforce_login_url.clone(),
        Auth::ClientCredentials {
            client_id: info.salesforce_client_id.clone(),
            client_secret: SecretString::from(info.salesforce_client_secret.clone()),
        },
    );
    config.ca_file = Some(info.salesforce_ca_file.clone());
    let client = SalesforceClient::new(config)?;
    let contacts: Vec<Row> = client.query("SELECT Id, Email FROM Contact").await?;
    let leads: Vec<Row> = client.query("SELECT Id, Email FROM Lead").await?;
    assert!(
        !contacts.is_empty() || !leads.is_empty(),
        "the generator filled the org"
    );
    sandbox.shutdown().await;
    Ok(())
}
