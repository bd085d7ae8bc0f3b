//! End-to-end tests: one binary, a module per area. Tests that need the
//! stack read DATABASE_URL and KAFKA_BROKERS (scripts/test.sh provides
//! them); each test makes its own database, topics and consumer group.

mod access;
mod admission;
mod billing;
mod common;
mod console;
mod cycles;
mod deadletter;
mod faults;
mod finance;
mod fuzz_http;
mod holds;
mod hostile;
mod ingest;
mod notify;
mod replay;
mod reports;
mod schemas;
mod webdriver;
mod world;
