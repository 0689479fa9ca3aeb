//! What the real-time paths share (webhooks, the Memberships API, imports): the Mailchimp client,
//! the audiences in scope, whether an audience's first sync completed, and a confirming publisher of
//! `MembersChanged` that reopens its channel after a failure.

use std::{
    collections::BTreeSet,
    sync::Arc,
    time::{Duration, Instant},
};

use chrono::{DateTime, Utc};
use lapin::types::FieldTable;
use optout_amqp::{MEMBERS_CHANGED_ROUTING_KEY, Publisher, Topology};
use optout_mailchimp::{MailchimpClient, Member};
use optout_proto::queue::v1::{MemberSnapshot, MembersChanged, Source};
use optout_salesforce::SalesforceClient;
use sqlx::PgPool;
use tokio::sync::Mutex;
use tracing::warn;

use crate::{
    Result, store,
    sync::{status_to_proto, timestamp},
};

/// The proto full name carried in the AMQP `type` property.
const MEMBERS_CHANGED_TYPE: &str = "optout.queue.v1.MembersChanged";
/// How long the account's audience list is trusted before it is read again on a miss.
const AUDIENCES_TTL: Duration = Duration::from_secs(60);

/// Shared state of the real-time paths; cheap to clone.
#[derive(Clone)]
pub struct Realtime {
    inner: Arc<Inner>,
}

struct Inner {
    client: MailchimpClient,
    salesforce: Option<SalesforceClient>,
    pool: PgPool,
    amqp: Arc<lapin::Connection>,
    topology: Topology,
    scope: Vec<String>,
    publisher: Mutex<Option<Publisher>>,
    audiences: Mutex<Option<(Instant, Vec<String>)>>,
    /// Audiences whose first sync is known to be complete (it never becomes incomplete again).
    synced: std::sync::Mutex<BTreeSet<String>>,
}

impl std::fmt::Debug for Realtime {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("Realtime")
            .field("topology", &self.inner.topology)
            .field("scope", &self.inner.scope)
            .field("salesforce", &self.inner.salesforce.is_some())
            .finish_non_exhaustive()
    }
}

impl Realtime {
    /// Real-time paths over ready connections. `scope` empty means every audience of the account;
    /// `salesforce` is needed only by imports.
    pub fn new(
        client: MailchimpClient,
        salesforce: Option<SalesforceClient>,
        pool: PgPool,
        amqp: Arc<lapin::Connection>,
        topology: Topology,
        scope: Vec<String>,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                client,
                salesforce,
                pool,
                amqp,
                topology,
                scope,
                publisher: Mutex::new(None),
                audiences: Mutex::new(None),
                synced: std::sync::Mutex::new(BTreeSet::new()),
            }),
        }
    }

    /// The Mailchimp client.
    pub fn client(&self) -> &MailchimpClient {
        &self.inner.client
    }

    /// The Salesforce client, when configured.
    pub fn salesforce(&self) -> Option<&SalesforceClient> {
        self.inner.salesforce.as_ref()
    }

    /// The audiences in scope that exist in the account, in id order.
    pub async fn audiences_in_scope(&self) -> Result<Vec<String>> {
        let known = self.known_audiences(false).await?;
        let scope = &self.inner.scope;
        Ok(known
            .into_iter()
            .filter(|id| scope.is_empty() || scope.contains(id))
            .collect())
    }

    /// Whether `audience_id` exists in the account and is in scope. The account's list is cached
    /// and read again on a miss once it is older than a minute (a new audience appears within it).
    pub async fn in_scope(&self, audience_id: &str) -> Result<bool> {
        let scope = &self.inner.scope;
        if !scope.is_empty() && !scope.iter().any(|id| id == audience_id) {
            return Ok(false);
        }
        if self
            .known_audiences(false)
            .await?
            .iter()
            .any(|id| id == audience_id)
        {
            return Ok(true);
        }
        Ok(self
            .known_audiences(true)
            .await?
            .iter()
            .any(|id| id == audience_id))
    }

    async fn known_audiences(&self, refresh_if_stale: bool) -> Result<Vec<String>> {
        let mut cache = self.inner.audiences.lock().await;
        let fresh = match cache.as_ref() {
            Some((read_at, _)) => !refresh_if_stale || read_at.elapsed() < AUDIENCES_TTL,
            None => false,
        };
        if let (true, Some((_, ids))) = (fresh, cache.as_ref()) {
            return Ok(ids.clone());
        }
        let mut ids: Vec<String> = self
            .inner
            .client
            .lists()
            .await?
            .into_iter()
            .map(|audience| audience.id)
            .collect();
        ids.sort();
        *cache = Some((Instant::now(), ids.clone()));
        Ok(ids)
    }

    /// True while the audience's first sync has not completed: a subscribed member first seen then is
    /// a baseline, not opt-in evidence (see `MembersChanged.first_sync`).
    pub async fn first_sync(&self, audience_id: &str) -> Result<bool> {
        if lock(&self.inner.synced).contains(audience_id) {
            return Ok(false);
        }
        let completed = store::audience(&self.inner.pool, audience_id)
            .await?
            .is_some_and(|row| row.first_sync_completed_at.is_some());
        if completed {
            lock(&self.inner.synced).insert(audience_id.to_owned());
        }
        Ok(!completed)
    }

    /// Publishes one `MembersChanged` and waits for the broker's confirm. A failed publish drops the
    /// channel so the next call opens a fresh one.
    pub async fn publish(
        &self,
        audience_id: &str,
        source: Source,
        members: Vec<MemberSnapshot>,
    ) -> Result<()> {
        if members.is_empty() {
            return Ok(());
        }
        let first_sync = self.first_sync(audience_id).await?;
        let prefix = match source {
            Source::Webhook => "webhook",
            Source::Api => "api",
            Source::Poll | Source::Unspecified => "poll",
        };
        let message = MembersChanged {
            audience_id: audience_id.to_owned(),
            source: source as i32,
            members,
            first_sync,
            run_id: format!("{prefix}:{}", uuid::Uuid::new_v4()),
            page: 0,
        };
        let publisher = self.publisher().await?;
        let published = publisher
            .publish_typed(
                MEMBERS_CHANGED_ROUTING_KEY,
                MEMBERS_CHANGED_TYPE,
                &message,
                FieldTable::default(),
            )
            .await;
        if let Err(error) = published {
            warn!(%audience_id, "publish failed; reopening the publisher channel");
            *self.inner.publisher.lock().await = None;
            return Err(error.into());
        }
        Ok(())
    }

    /// Publishes `email`'s current membership in every audience in scope but `except`, read now.
    ///
    /// An unsubscribe can make "unsubscribed in every audience" true, and the evaluator judges that
    /// on the memberships it knows. One it has not seen yet (its audience's first sync has not
    /// reached it, or it was added through the API, which sends no webhook) would be left out of
    /// that judgment, and the opt-out would stick: a first sync never unchecks a box. So the
    /// person's other memberships go out first; the fault-injection test found the false opt-out.
    /// A read that fails is skipped with a warning: the unsubscribe still goes out (an opt-out too
    /// many is the safe error), and the next poll brings the rest. Only a publish failure is an
    /// error.
    pub async fn publish_other_memberships(
        &self,
        except: &[&str],
        email: &str,
        source: Source,
    ) -> Result<()> {
        use futures::StreamExt as _;
        let audiences = match self.audiences_in_scope().await {
            Ok(audiences) => audiences,
            Err(error) => {
                warn!(error = %error.chain(), "cannot list audiences; unsubscribe published alone");
                return Ok(());
            }
        };
        let others: Vec<String> = audiences
            .into_iter()
            .filter(|id| !except.contains(&id.as_str()))
            .collect();
        let reads: Vec<_> = futures::stream::iter(others)
            .map(|audience_id| async move {
                let read = self.client().member(&audience_id, email).await;
                (audience_id, read)
            })
            .buffer_unordered(4)
            .collect()
            .await;
        for (audience_id, read) in reads {
            match read {
                Ok(member) => {
                    self.publish(
                        &audience_id,
                        source,
                        vec![member_snapshot(&member, Utc::now())],
                    )
                    .await?;
                }
                Err(optout_mailchimp::Error::NotFound { .. }) => {}
                Err(error) => {
                    warn!(%audience_id, %error, "cannot read another membership; unsubscribe published without it");
                }
            }
        }
        Ok(())
    }

    async fn publisher(&self) -> Result<Publisher> {
        let mut slot = self.inner.publisher.lock().await;
        if let Some(publisher) = slot.as_ref() {
            return Ok(publisher.clone());
        }
        let publisher = Publisher::new(&self.inner.amqp, self.inner.topology.clone()).await?;
        *slot = Some(publisher.clone());
        Ok(publisher)
    }
}

/// The snapshot of a member as Mailchimp answered it (`last_changed` as Mailchimp reports it, or
/// `fallback` when unset).
pub fn member_snapshot(member: &Member, fallback: DateTime<Utc>) -> MemberSnapshot {
    MemberSnapshot {
        email: member.email_address.clone(),
        status: status_to_proto(member.status) as i32,
        last_changed: Some(timestamp(member.last_changed.unwrap_or(fallback))),
    }
}

fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}
