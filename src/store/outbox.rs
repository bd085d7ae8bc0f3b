//! The notification outbox (contract, "Notifications"): notifications are
//! recorded in the transaction that decided them; from there every `serve`
//! process publishes them to the notifications topic (key: the account id;
//! at least once, consumers drop repeats by id) and, with a webhook
//! configured, POSTs each once it succeeds, signed, with backoff for 24
//! hours. Both work on their own small pool and lock the rows they take
//! (`SKIP LOCKED`), so processes share the work and a slow or failing
//! webhook never slows ingestion.

use std::time::Duration;

use chrono::{DateTime, Utc};
use deadpool_postgres::Pool;
use hmac::{Hmac, Mac};
use rdkafka::producer::{FutureProducer, FutureRecord};
use sha2::Sha256;

/// Where notifications go besides the table.
#[derive(Clone)]
pub struct Outbox {
    pub pool: Pool,
    pub producer: FutureProducer,
    pub topic: String,
    pub webhook: Option<Webhook>,
}

#[derive(Clone)]
pub struct Webhook {
    pub url: String,
    pub secret: String,
    pub http: reqwest::Client,
}

/// How long a notification is retried before the webhook gives up on it.
const GIVE_UP_AFTER: chrono::Duration = chrono::Duration::hours(24);
/// The longest wait between two attempts.
const MAX_BACKOFF_SECS: i64 = 3600;
/// Rows one pass takes.
const PUBLISH_BATCH: i64 = 500;
const DELIVER_BATCH: i64 = 20;

/// `sha256=<hex HMAC-SHA256 of body with secret>`: the `X-Quota-Signature`
/// header.
pub fn signature(secret: &str, body: &[u8]) -> String {
    let mut mac =
        Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes a key of any length");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// The wait before attempt `n + 1` after `n` failed ones: 1 s doubling,
/// at most an hour.
pub fn backoff(failed: i32) -> chrono::Duration {
    chrono::Duration::seconds((1i64 << failed.clamp(0, 12)).min(MAX_BACKOFF_SECS))
}

impl Outbox {
    /// Publish what is not yet published, in recorded order; returns how
    /// many.
    pub async fn publish(&self) -> anyhow::Result<usize> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        let rows = tx
            .query(
                "SELECT event_id, id, payload::text FROM notifications WHERE published_at IS NULL AND NOT replayed ORDER BY recorded_at, event_id LIMIT $1 FOR UPDATE SKIP LOCKED",
                &[&PUBLISH_BATCH],
            )
            .await?;
        if rows.is_empty() {
            return Ok(0);
        }
        let mut sends = Vec::with_capacity(rows.len());
        for r in &rows {
            let (key, payload): (&str, &str) = (r.get(1), r.get(2));
            let record = FutureRecord::to(&self.topic).key(key).payload(payload);
            sends.push(self.producer.send(record, Duration::from_secs(10)));
        }
        for s in futures_util::future::join_all(sends).await {
            if let Err((e, _)) = s {
                anyhow::bail!("publishing notifications: {e}");
            }
        }
        let ids: Vec<&str> = rows.iter().map(|r| r.get(0)).collect();
        tx.execute(
            "UPDATE notifications SET published_at = now() WHERE event_id = ANY($1)",
            &[&ids],
        )
        .await?;
        tx.commit().await?;
        Ok(ids.len())
    }

    /// POST the notifications that are due to the webhook; returns how many
    /// it accepted.
    pub async fn deliver(&self) -> anyhow::Result<usize> {
        let Some(hook) = &self.webhook else {
            return Ok(0);
        };
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        let rows = tx
            .query(
                "SELECT event_id, payload::text, attempts, first_attempt_at FROM notifications
                 WHERE delivered_at IS NULL AND NOT replayed AND next_attempt_at IS NOT NULL AND next_attempt_at <= now()
                 ORDER BY next_attempt_at LIMIT $1 FOR UPDATE SKIP LOCKED",
                &[&DELIVER_BATCH],
            )
            .await?;
        let posts = rows.iter().map(|r| hook.post(r.get(0), r.get(1)));
        let results = futures_util::future::join_all(posts).await;
        let now = Utc::now();
        let mut delivered = 0;
        for (r, result) in rows.iter().zip(results) {
            let id: &str = r.get(0);
            let attempts: i32 = r.get::<_, i32>(2) + 1;
            let first: DateTime<Utc> = r.get::<_, Option<DateTime<Utc>>>(3).unwrap_or(now);
            match result {
                Ok(()) => {
                    delivered += 1;
                    tx.execute("UPDATE notifications SET delivered_at = $2, attempts = $3, first_attempt_at = $4, next_attempt_at = NULL, last_error = NULL WHERE event_id = $1", &[&id, &now, &attempts, &first]).await?;
                }
                Err(why) => {
                    let next = now + backoff(attempts - 1);
                    let (next, why) = if next - first > GIVE_UP_AFTER {
                        (None, format!("gave up after 24 hours: {why}"))
                    } else {
                        (Some(next), why)
                    };
                    tx.execute("UPDATE notifications SET attempts = $2, first_attempt_at = $3, next_attempt_at = $4, last_error = $5 WHERE event_id = $1", &[&id, &attempts, &first, &next, &why]).await?;
                }
            }
        }
        tx.commit().await?;
        Ok(delivered)
    }
}

/// Notifications recorded, newest first (of a kind, an id, within a
/// period),
/// each as published plus its `delivery` state; with its account's kind and
/// id for scoping.
pub async fn list(
    pool: &Pool,
    kind: Option<&str>,
    id: Option<&str>,
    from: Option<DateTime<Utc>>,
    to: Option<DateTime<Utc>>,
    limit: i64,
) -> anyhow::Result<Vec<(String, String, serde_json::Value)>> {
    let rows = pool
        .get()
        .await?
        .query(
            "SELECT kind, id, payload, recorded_at, replayed, published_at, attempts, next_attempt_at, delivered_at, last_error FROM notifications
             WHERE ($1::text IS NULL OR kind = $1) AND ($2::text IS NULL OR id = $2) AND ($3::timestamptz IS NULL OR occurred_at >= $3) AND ($4::timestamptz IS NULL OR occurred_at < $4)
             ORDER BY occurred_at DESC, event_id LIMIT $5",
            &[&kind, &id, &from, &to, &limit],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| {
            let mut n: serde_json::Value = r.get(2);
            let attempts: i32 = r.get(6);
            let next: Option<DateTime<Utc>> = r.get(7);
            let delivered: Option<DateTime<Utc>> = r.get(8);
            let state = match (r.get::<_, bool>(4), delivered, next) {
                (true, ..) => "replayed",
                (_, Some(_), _) => "delivered",
                (_, None, None) => "abandoned",
                (_, None, Some(_)) if attempts > 0 => "retrying",
                _ => "pending",
            };
            n["delivery"] = serde_json::json!({"recorded_at": r.get::<_, DateTime<Utc>>(3), "published_at": r.get::<_, Option<DateTime<Utc>>>(5),
                "webhook": {"state": state, "attempts": attempts, "next_attempt_at": next, "delivered_at": delivered, "last_error": r.get::<_, Option<String>>(9)}});
            (r.get(0), r.get(1), n)
        })
        .collect())
}

impl Webhook {
    /// One signed POST; anything but a 2xx is a failure, with its reason.
    async fn post(&self, event_id: &str, body: &str) -> Result<(), String> {
        let r = self
            .http
            .post(&self.url)
            .header("content-type", "application/json")
            .header("x-quota-event-id", event_id)
            .header(
                "x-quota-signature",
                signature(&self.secret, body.as_bytes()),
            )
            .body(body.to_string())
            .send()
            .await
            .map_err(|e| format!("request failed: {e}"))?;
        let status = r.status();
        if status.is_success() {
            Ok(())
        } else {
            Err(format!("the webhook answered {status}"))
        }
    }
}

/// Publish and deliver until `shutdown`: each every 200 ms, sooner while
/// there is more.
pub async fn run(outbox: Outbox, mut shutdown: tokio::sync::watch::Receiver<bool>) {
    loop {
        let published = match outbox.publish().await {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(error = %e, "publishing notifications failed");
                0
            }
        };
        let delivered = match outbox.deliver().await {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(error = %e, "delivering notifications failed");
                0
            }
        };
        let pause = if published > 0 || delivered > 0 {
            Duration::from_millis(10)
        } else {
            Duration::from_millis(200)
        };
        tokio::select! {
            _ = shutdown.changed() => return,
            _ = tokio::time::sleep(pause) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_signature_is_the_hmac_sha256_of_the_body_and_backoff_doubles_to_an_hour() {
        // RFC 4231, test case 2.
        assert_eq!(
            signature("Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        let secs: Vec<i64> = (0..14).map(|n| backoff(n).num_seconds()).collect();
        assert_eq!(&secs[..4], &[1, 2, 4, 8]);
        assert_eq!(secs[13], 3600);
    }
}
