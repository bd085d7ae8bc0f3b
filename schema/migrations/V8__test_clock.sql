-- The test clock (QUOTA_TEST_CLOCK=true, tests only): the service clock is
-- the system clock plus this offset. Stored so that every serve sharing the
-- database follows it and a restart keeps it; it only moves forward.
CREATE TABLE test_clock (
    id        boolean     PRIMARY KEY DEFAULT true CHECK (id),
    offset_ms bigint      NOT NULL,
    set_at    timestamptz NOT NULL DEFAULT now()
);
