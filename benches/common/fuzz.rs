//! A mutation fuzzer for the two parsers hostile bytes reach first: the
//! event decoder (every topic) and the admission request parser. Seeds are
//! the contract's own JSON examples and admission bodies; each input is a
//! seed with 1–8 random mutations (bit flips, byte inserts and deletes,
//! range copies, splices with another seed, hostile tokens: huge and
//! negative numbers, long decimals, deep nesting, long strings, odd
//! unicode, nulls). Every call runs under `catch_unwind` and is timed: a
//! panic, or a call slower than a second, is a finding.

use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::{Duration, Instant};

use quota_engine::sim::Rng;

/// `Rng::below` for lengths.
fn pick(rng: &mut Rng, n: usize) -> usize {
    rng.below(n as u64) as usize
}

const TOKENS: &[&str] = &[
    "null",
    "true",
    "-1",
    "0",
    "1e309",
    "-0",
    "18446744073709551616",
    "-9223372036854775809",
    "\"\"",
    "\"9999999999999999999999999999.9999999999999999999\"",
    "\"0.0000000000000000000000000000001\"",
    "\"-5\"",
    "\"NaN\"",
    "\"1e5\"",
    "[]",
    "{}",
    "\"\\u0000\"",
    "\"\\ud800\"",
    "\"日本語\"",
    "\"2026-13-45T99:99:99Z\"",
    "\"2026-11-27T10:00:00\"",
    "\"9999-12-31T23:59:59Z\"",
    "\"0000-01-01T00:00:00Z\"",
    "\"::1\"",
    "\"999.1.1.1\"",
    "\"10.0.0.0/33\"",
];

/// Replace the value after a random `:` (up to the next `,` or `}`).
fn replace_a_value(rng: &mut Rng, out: &mut Vec<u8>, with: Vec<u8>) {
    let colons: Vec<usize> = out
        .iter()
        .enumerate()
        .filter(|(_, b)| **b == b':')
        .map(|(i, _)| i)
        .collect();
    if let Some(&c) = colons.get(pick(rng, colons.len())) {
        let end = out[c + 1..]
            .iter()
            .position(|b| *b == b',' || *b == b'}')
            .map(|p| c + 1 + p)
            .unwrap_or(out.len());
        out.splice(c + 1..end, with);
    }
}

fn mutate(rng: &mut Rng, seeds: &[Vec<u8>], out: &mut Vec<u8>) {
    out.clear();
    out.extend_from_slice(&seeds[pick(rng, seeds.len())]);
    for _ in 0..1 + pick(rng, 8) {
        let len = out.len();
        match pick(rng, 10) {
            0 if len > 0 => {
                let i = pick(rng, len);
                out[i] ^= 1 << pick(rng, 8);
            }
            1 => {
                let i = pick(rng, len + 1);
                out.insert(i, rng.next_u64() as u8);
            }
            2 if len > 0 => {
                let i = pick(rng, len);
                let n = 1 + pick(rng, 16.min(len - i));
                out.drain(i..i + n);
            }
            3 if len > 0 => {
                let i = pick(rng, len);
                let n = 1 + pick(rng, 64.min(len - i));
                let chunk: Vec<u8> = out[i..i + n].to_vec();
                let at = pick(rng, out.len() + 1);
                out.splice(at..at, chunk);
            }
            4 => {
                let other = &seeds[pick(rng, seeds.len())];
                let cut = pick(rng, out.len() + 1);
                let from = pick(rng, other.len() + 1);
                out.truncate(cut);
                out.extend_from_slice(&other[from..]);
            }
            5 | 6 => {
                // Replace a JSON value with a hostile token.
                let t = TOKENS[pick(rng, TOKENS.len())].as_bytes().to_vec();
                replace_a_value(rng, out, t);
            }
            7 => {
                let depth = 1 + pick(rng, 5000);
                let mut v = vec![b'['; depth];
                v.extend(std::iter::repeat_n(b']', depth));
                let at = pick(rng, out.len() + 1);
                out.splice(at..at, v);
            }
            8 => {
                // Replace a JSON value with a long string.
                let n = pick(rng, 200_000);
                let mut v = vec![b'"'];
                v.extend(std::iter::repeat_n(b'a', n));
                v.push(b'"');
                replace_a_value(rng, out, v);
            }
            _ => {
                let i = pick(rng, len + 1);
                let t = TOKENS[pick(rng, TOKENS.len())].as_bytes().to_vec();
                out.splice(i..i, t);
            }
        }
    }
}

/// Run `target` on mutated seeds for `secs`; returns a report and whether
/// there was a finding.
pub fn run(
    name: &str,
    seeds: &[Vec<u8>],
    secs: u64,
    seed: u64,
    target: &dyn Fn(&[u8]) -> String,
) -> bool {
    let mut rng = Rng::new(seed | 1);
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut input = Vec::new();
    let mut n = 0u64;
    let mut outcomes: BTreeMap<String, u64> = BTreeMap::new();
    let mut slowest = (Duration::ZERO, Vec::new());
    let mut findings = Vec::new();
    // Silence the default panic message; findings are printed below.
    std::panic::set_hook(Box::new(|_| {}));
    while Instant::now() < deadline {
        for _ in 0..256 {
            mutate(&mut rng, seeds, &mut input);
            let t = Instant::now();
            let r = catch_unwind(AssertUnwindSafe(|| target(&input)));
            let took = t.elapsed();
            n += 1;
            if took > slowest.0 {
                slowest = (took, input.clone());
            }
            match r {
                Ok(outcome) => *outcomes.entry(outcome).or_default() += 1,
                Err(_) => findings.push(format!(
                    "panic on {:?}",
                    String::from_utf8_lossy(&input[..input.len().min(300)])
                )),
            }
            if took > Duration::from_secs(1) {
                findings.push(format!(
                    "{took:?} on {:?}",
                    String::from_utf8_lossy(&input[..input.len().min(300)])
                ));
            }
        }
    }
    let _ = std::panic::take_hook();
    println!(
        "fuzz {name}: {n} inputs in {secs} s ({:.0}/s), slowest {:?} ({} bytes), {} finding(s)",
        n as f64 / secs as f64,
        slowest.0,
        slowest.1.len(),
        findings.len()
    );
    let mut top: Vec<(&String, &u64)> = outcomes.iter().collect();
    top.sort_by(|a, b| b.1.cmp(a.1));
    for (o, c) in top.iter().take(12) {
        println!("  {c:>10}  {o}");
    }
    for f in findings.iter().take(20) {
        println!("  FINDING: {f}");
    }
    findings.is_empty()
}
