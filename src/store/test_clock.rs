//! The test clock's setting (`QUOTA_TEST_CLOCK`): an offset from the
//! system clock, in one row, so that every `serve` sharing the database
//! follows it and a restart keeps it. It only moves forward.

use deadpool_postgres::Pool;

/// The stored offset (ms), if the clock was ever set.
pub async fn offset_ms(pool: &Pool) -> anyhow::Result<Option<i64>> {
    Ok(pool
        .get()
        .await?
        .query_opt("SELECT offset_ms FROM test_clock", &[])
        .await?
        .map(|r| r.get(0)))
}

/// Move the clock to `offset_ms` when that is not back: `Ok(offset)`, or
/// `Err(current)` with the stored offset it would have moved back from.
/// One statement, so concurrent setters on several processes cannot move
/// it back between a read and a write.
pub async fn advance(pool: &Pool, offset_ms: i64) -> anyhow::Result<Result<i64, i64>> {
    let c = pool.get().await?;
    let moved = c
        .query_opt(
            "INSERT INTO test_clock (id, offset_ms) VALUES (true, $1)
             ON CONFLICT (id) DO UPDATE SET offset_ms = excluded.offset_ms, set_at = now()
             WHERE test_clock.offset_ms <= excluded.offset_ms
             RETURNING offset_ms",
            &[&offset_ms],
        )
        .await?;
    Ok(match moved {
        Some(r) => Ok(r.get(0)),
        None => Err(c
            .query_one("SELECT offset_ms FROM test_clock", &[])
            .await?
            .get(0)),
    })
}
