//! One batcher per process: hold requests that arrive while a batch's
//! transaction runs wait for the next one, and the process's leases on hot
//! accounts live here, owned by the one task that places batches.

use deadpool_postgres::Pool;

use super::lease::Leases;
use super::{place_batch, Answer, Decided, NewHold, Placed};
use crate::codes::ErrorCode;

/// What a hold request comes back with: the placed hold or the check that
/// failed; Err when the batch's transaction failed.
pub type PlaceResult = Result<Result<Placed, ErrorCode>, String>;

type Job = (NewHold, tokio::sync::oneshot::Sender<PlaceResult>);

/// One per process: hold requests that arrive while a batch's transaction
/// runs wait for the next one (group commit), and a process has one hold
/// transaction in flight; holds on hot accounts draw on the process's
/// leases, so most batches lock no row another process's batches lock.
#[derive(Clone)]
pub struct HoldBatcher {
    tx: tokio::sync::mpsc::Sender<Job>,
}

impl HoldBatcher {
    pub fn spawn(pool: Pool, clock: crate::clock::Clock) -> HoldBatcher {
        let (tx, mut rx) =
            tokio::sync::mpsc::channel::<Job>(crate::limits::HOLD_QUEUE);
        tokio::spawn(async move {
            let mut leases = Leases::new();
            loop {
                // The views' notice waits for the next batch, until it is due.
                // Already due here means the last batch did not send it (it
                // was decided on locked rows): it goes now, before the queue,
                // which under load is never empty.
                let first = match leases.untold.wait(std::time::Instant::now()) {
                    None => rx.recv().await,
                    Some(wait) => {
                        let got = if wait.is_zero() {
                            None
                        } else {
                            tokio::time::timeout(wait, rx.recv()).await.ok()
                        };
                        let Some(first) = got else {
                            super::fast::tell_untold(&pool, &mut leases.untold).await;
                            continue;
                        };
                        first
                    }
                };
                let Some(first) = first else { break };
                let mut jobs = vec![first];
                while jobs.len() < crate::limits::HOLD_BATCH_MAX {
                    match rx.try_recv() {
                        Ok(j) => jobs.push(j),
                        Err(_) => break,
                    }
                }
                let (holds, replies): (Vec<NewHold>, Vec<_>) = jobs.into_iter().unzip();
                let started = std::time::Instant::now();
                let mut replies = Some(replies);
                let mut answer = |answers: &[Result<Placed, ErrorCode>]| {
                    for (reply, a) in replies.take().into_iter().flatten().zip(answers) {
                        let _ = reply.send(Ok(a.clone()));
                    }
                };
                let result = place_with_retry(&pool, &holds, &clock, &mut leases, &mut answer).await;
                tracing::debug!(
                    holds = holds.len(),
                    ms = started.elapsed().as_secs_f64() * 1e3,
                    path = result.as_ref().map_or("failed", |r| r.1),
                    "hold batch"
                );
                match result {
                    Ok((answers, _)) => answer(&answers),
                    Err(e) => {
                        tracing::error!(error = format!("{e:#}"), holds = holds.len(), "hold batch failed");
                        for reply in replies.into_iter().flatten() {
                            let _ = reply.send(Err(e.to_string()));
                        }
                    }
                }
            }
        });
        HoldBatcher { tx }
    }

    /// Place one hold with whatever else is waiting.
    pub async fn place(&self, h: NewHold) -> PlaceResult {
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.tx
            .send((h, reply))
            .await
            .map_err(|_| "the hold batcher has stopped".to_string())?;
        answer
            .await
            .map_err(|_| "the hold batcher dropped the request".to_string())?
    }
}

/// A batch, retried once when Postgres breaks a deadlock or a connection
/// (nothing of a failed transaction stays).
///
/// A failed batch forgets the process's leases: whether its commit landed
/// is unknown, so what they have left is too. The sweepers return them when
/// they end.
async fn place_with_retry(
    pool: &Pool,
    holds: &[NewHold],
    clock: &crate::clock::Clock,
    leases: &mut Leases,
    answer: Answer<'_>,
) -> anyhow::Result<Decided> {
    match place_batch(pool, holds, clock(), leases, &mut *answer).await {
        Ok(a) => Ok(a),
        Err(e) => {
            tracing::warn!(error = format!("{e:#}"), "hold batch failed; retrying once");
            leases.forget();
            let again = place_batch(pool, holds, clock(), leases, answer).await;
            if again.is_err() {
                leases.forget();
            }
            again
        }
    }
}
