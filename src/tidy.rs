//! Repository rules as tests (after rust-analyzer's `tidy.rs`), so the
//! code map in the README cannot silently rot:
//!
//! - dependencies run one way: `event ← ledger ← admission ← store ← api ←
//!   serve/cli`; `codes`, `clock`, `limits` and `metrics` are leaves; the
//!   `consumers` crate knows nothing of this one;
//! - the pure modules (`event`, `ledger`, `admission`, `codes`) name no
//!   tokio, Postgres, Kafka, axum or wall clock;
//! - SQL appears only in `store`.
//!
//! Test code (`tests.rs`, `proptest.rs`, `#[cfg(test)] mod tests`) is left
//! out: a test may use what it likes.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// The crate's top-level modules.
const MODULES: &[&str] = &[
    "admission",
    "api",
    "cli",
    "clock",
    "codes",
    "config",
    "console",
    "event",
    "ledger",
    "limits",
    "metrics",
    "replay",
    "serve",
    "sim",
    "store",
];

/// What each module may name of the crate besides itself; a module not
/// listed may name anything.
const MAY_NAME: &[(&str, &[&str])] = &[
    ("event", &[]),
    ("codes", &[]),
    ("clock", &[]),
    ("limits", &[]),
    ("metrics", &[]),
    ("ledger", &["event"]),
    ("admission", &["event", "ledger", "codes"]),
    (
        "store",
        &[
            "event",
            "ledger",
            "admission",
            "codes",
            "clock",
            "limits",
            "metrics",
        ],
    ),
    (
        "api",
        &[
            "event",
            "ledger",
            "admission",
            "codes",
            "clock",
            "limits",
            "metrics",
            "store",
        ],
    ),
    // The console sits beside the API and asks it every question.
    (
        "console",
        &[
            "event",
            "ledger",
            "admission",
            "codes",
            "clock",
            "limits",
            "metrics",
            "store",
            "api",
        ],
    ),
];

const PURE: &[&str] = &["event", "ledger", "admission", "codes"];

/// Names a pure module must not use: IO, runtimes, frameworks, the clock.
const IMPURE: &[&str] = &[
    "tokio",
    "tokio_postgres",
    "deadpool_postgres",
    "postgres_types",
    "rdkafka",
    "quota_consumers",
    "axum",
    "Utc::now",
    "Local::now",
    "Instant::now",
    "SystemTime",
    "crate::clock",
    "std::fs",
    "std::net::TcpStream",
];

/// Text that only SQL has.
const SQL: &[&str] = &[
    "SELECT ",
    "INSERT INTO",
    "DELETE FROM",
    "UPDATE ",
    " SET ",
    "COPY ",
    "pg_notify",
    ".query(",
    ".query_one(",
    ".query_opt(",
    ".query_raw(",
    ".execute(",
    ".copy_in(",
];

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).expect("readable src dir").flatten() {
        let p = e.path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The top-level module a file belongs to (`src/store/load.rs` → `store`).
fn module_of(path: &Path) -> String {
    let rel = path.strip_prefix(src()).expect("under src");
    let first = rel.components().next().expect("a component");
    first
        .as_os_str()
        .to_string_lossy()
        .trim_end_matches(".rs")
        .to_string()
}

/// A file's production code: test files and `#[cfg(test)]` modules left
/// out, comments removed.
fn production_code(path: &Path) -> Option<String> {
    let name = path.file_name()?.to_string_lossy();
    if name == "tests.rs" || name == "proptest.rs" || name == "tidy.rs" {
        return None;
    }
    let text = std::fs::read_to_string(path).ok()?;
    let mut code = String::new();
    let mut lines = text.lines().peekable();
    while let Some(line) = lines.next() {
        let t = line.trim_start();
        if t == "#[cfg(test)]"
            && lines
                .peek()
                .is_some_and(|n| n.trim_start().starts_with("mod "))
        {
            skip_item(&mut lines);
            continue;
        }
        if t.starts_with("//") {
            continue;
        }
        code.push_str(line);
        code.push('\n');
    }
    Some(code)
}

/// Skip the item that starts at the next line: `mod x;`, or `mod x {`
/// through its closing brace (braces counted; test code keeps them
/// balanced).
fn skip_item<'a>(lines: &mut std::iter::Peekable<impl Iterator<Item = &'a str>>) {
    let mut depth = 0i64;
    for line in lines.by_ref() {
        depth += line.matches('{').count() as i64 - line.matches('}').count() as i64;
        if depth <= 0 && (line.contains('}') || line.trim_end().ends_with(';')) {
            return;
        }
    }
}

/// The crate modules a text names through `crate::` paths.
fn crate_modules(code: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    for (i, _) in code.match_indices("crate::") {
        let rest = &code[i + "crate::".len()..];
        let names: Vec<&str> = match rest.strip_prefix('{') {
            Some(group) => group
                .split('}')
                .next()
                .unwrap_or("")
                .split(',')
                .map(|s| s.trim().split("::").next().unwrap_or(""))
                .collect(),
            None => vec![rest
                .split(|c: char| !(c.is_alphanumeric() || c == '_'))
                .next()
                .unwrap_or("")],
        };
        found.extend(
            names
                .into_iter()
                .filter(|n| MODULES.contains(n))
                .map(str::to_string),
        );
    }
    found
}

fn production_files() -> Vec<(PathBuf, String, String)> {
    let mut files = Vec::new();
    rust_files(&src(), &mut files);
    files.sort();
    files
        .into_iter()
        .filter_map(|p| {
            let code = production_code(&p)?;
            let module = module_of(&p);
            Some((p, module, code))
        })
        .collect()
}

#[test]
fn dependencies_run_one_way() {
    let mut broken = Vec::new();
    for (path, module, code) in production_files() {
        let Some((_, allowed)) = MAY_NAME.iter().find(|(m, _)| *m == module) else {
            continue;
        };
        for named in crate_modules(&code) {
            if named != module && !allowed.contains(&named.as_str()) {
                broken.push(format!("{} names `{named}`", path.display()));
            }
        }
    }
    assert!(
        broken.is_empty(),
        "dependency direction broken:\n{}",
        broken.join("\n")
    );
}

#[test]
fn pure_modules_do_no_io_and_read_no_clock() {
    let mut broken = Vec::new();
    for (path, module, code) in production_files() {
        if !PURE.contains(&module.as_str()) {
            continue;
        }
        for name in IMPURE {
            if code.contains(name) {
                broken.push(format!("{} names `{name}`", path.display()));
            }
        }
    }
    assert!(
        broken.is_empty(),
        "impure code in a pure module:\n{}",
        broken.join("\n")
    );
}

#[test]
fn sql_appears_only_in_store() {
    let mut broken = Vec::new();
    for (path, module, code) in production_files() {
        if module == "store" {
            continue;
        }
        for needle in SQL {
            if code.contains(needle) {
                broken.push(format!("{} contains `{}`", path.display(), needle.trim()));
            }
        }
    }
    assert!(
        broken.is_empty(),
        "SQL outside store:\n{}",
        broken.join("\n")
    );
}

#[test]
fn the_consumers_crate_knows_nothing_of_the_engine() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("consumers");
    let manifest = std::fs::read_to_string(dir.join("Cargo.toml")).expect("consumers manifest");
    let depends = manifest.lines().any(|l| {
        l.trim_start().starts_with("quota-engine") || l.trim_start().starts_with("quota_engine")
    });
    assert!(!depends, "consumers depends on the engine");
    let mut files = Vec::new();
    rust_files(&dir.join("src"), &mut files);
    for f in files {
        let text = std::fs::read_to_string(&f).expect("readable");
        assert!(
            !text.contains("quota_engine::"),
            "{} names the engine",
            f.display()
        );
    }
}

#[test]
fn the_rules_catch_what_they_are_for() {
    assert_eq!(
        crate_modules("use crate::{api::AppState, event::Event};\nlet x = crate::store::ping;"),
        ["api", "event", "store"].map(String::from).into()
    );
    let dir = std::env::temp_dir().join(format!("tidy-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let f = dir.join("x.rs");
    std::fs::write(
        &f,
        "fn a() {}\n// crate::api\n#[cfg(test)]\nmod tests { use crate::api; }\n",
    )
    .unwrap();
    assert!(crate_modules(&production_code(&f).unwrap()).is_empty());
    std::fs::remove_dir_all(&dir).unwrap();
}
