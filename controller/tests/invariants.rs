//! Invariants `ARCHITECTURE.md` states about the controller's own source,
//! checked on the source itself. Each check also runs on a deliberate
//! violation, to show it would catch one.
//!
//! Held elsewhere: a `Transition` is built only through the table (its
//! fields are private; a `compile_fail` doctest in `domain/lifecycle.rs`),
//! an error becomes a status only in `api/problem.rs` (`Problem::new` is
//! private; the check below holds every other file to success statuses).

use std::path::{Path, PathBuf};

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// Every `.rs` file under `dir`, with its text.
fn rust_files(dir: &Path) -> Vec<(PathBuf, String)> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for entry in std::fs::read_dir(&d).unwrap_or_else(|e| panic!("{}: {e}", d.display())) {
            let path = entry.expect("a directory entry").path();
            if path.is_dir() {
                todo.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let text = std::fs::read_to_string(&path).expect("a source file");
                out.push((path, text));
            }
        }
    }
    out.sort();
    out
}

/// The lines of `text` that ship: those before its `#[cfg(test)]` module,
/// without comments, numbered from 1.
fn shipped_code(text: &str) -> impl Iterator<Item = (usize, &str)> {
    text.lines()
        .enumerate()
        .take_while(|(_, l)| l.trim() != "#[cfg(test)]")
        .map(|(n, l)| (n + 1, l.split("//").next().unwrap_or_default()))
        .filter(|(_, l)| !l.trim().is_empty())
}

// ---------------------------------------------------------------------------
// `domain` does no I/O and reads no clock.

/// What code that does I/O, reads a clock or draws random numbers names.
const NOT_IN_THE_DOMAIN: &[&str] = &[
    "std::fs",
    "std::net",
    "std::io",
    "std::env",
    "std::process",
    "std::thread",
    "tokio",
    "sqlx",
    "redis",
    "reqwest",
    "hyper",
    "axum",
    "rand",
    "::now(",
    ".elapsed(",
];

fn effects_in(text: &str) -> Vec<String> {
    shipped_code(text)
        .flat_map(|(n, line)| {
            NOT_IN_THE_DOMAIN
                .iter()
                .filter(move |bad| line.contains(*bad))
                .map(move |bad| format!("line {n}: {bad} in {:?}", line.trim()))
        })
        .collect()
}

#[test]
fn the_domain_does_no_io_and_reads_no_clock() {
    let files = rust_files(&src().join("domain"));
    assert!(files.len() >= 5, "the domain's files were not found");
    let found: Vec<String> = files
        .iter()
        .flat_map(|(path, text)| {
            effects_in(text)
                .into_iter()
                .map(move |v| format!("{}: {v}", path.display()))
        })
        .collect();
    assert!(
        found.is_empty(),
        "the domain does I/O or reads a clock:\n{found:#?}"
    );
}

#[test]
fn the_domain_check_catches_a_clock_and_a_file() {
    let violation = "pub fn decide() {\n    let now = chrono::Utc::now();\n    \
                     std::fs::read(\"x\");\n}\n#[cfg(test)]\nmod tests { fn t() { \
                     std::time::Instant::now(); } }\n";
    let found = effects_in(violation);
    assert_eq!(found.len(), 2, "{found:?}");
    assert!(effects_in("// Utc::now() in a comment is fine\n").is_empty());
}

// ---------------------------------------------------------------------------
// Only `api/problem.rs` turns errors into statuses.

/// The statuses a handler may answer on its own: successes.
const SUCCESS: &[&str] = &[
    "OK",
    "CREATED",
    "ACCEPTED",
    "NO_CONTENT",
    "NOT_MODIFIED",
    "SWITCHING_PROTOCOLS",
];

/// Every `StatusCode::NAME` in the shipped code of `text` that is not a
/// success.
fn error_statuses_in(text: &str) -> Vec<String> {
    let mut found = Vec::new();
    for (n, line) in shipped_code(text) {
        for (at, _) in line.match_indices("StatusCode::") {
            let name: String = line[at + "StatusCode::".len()..]
                .chars()
                .take_while(|c| c.is_ascii_uppercase() || *c == '_')
                .collect();
            if !SUCCESS.contains(&name.as_str()) {
                found.push(format!("line {n}: StatusCode::{name}"));
            }
        }
    }
    found
}

#[test]
fn only_problem_rs_turns_errors_into_statuses() {
    let root = src();
    let found: Vec<String> = rust_files(&root)
        .iter()
        .filter(|(path, _)| {
            let rel = path.strip_prefix(&root).expect("under src");
            // The mapping itself, and the test support that checks answers.
            rel != Path::new("api/problem.rs") && !rel.starts_with("testing")
        })
        .flat_map(|(path, text)| {
            error_statuses_in(text)
                .into_iter()
                .map(move |v| format!("{}: {v}", path.display()))
        })
        .collect();
    assert!(
        found.is_empty(),
        "an error status chosen outside api/problem.rs (add a constructor there):\n{found:#?}"
    );
}

#[test]
fn the_status_check_catches_an_error_status_chosen_in_a_handler() {
    let violation =
        "async fn h() -> Response {\n    (StatusCode::BAD_REQUEST, \"no\").into_response()\n}\n";
    assert_eq!(
        error_statuses_in(violation),
        ["line 2: StatusCode::BAD_REQUEST"]
    );
    assert!(error_statuses_in("(StatusCode::CREATED, body)").is_empty());
}

// ---------------------------------------------------------------------------
// `main.rs` is a thin binary.

/// The most lines of code `main.rs` may have: it calls into the library.
const THIN: usize = 12;

fn code_lines(text: &str) -> usize {
    shipped_code(text).count()
}

#[test]
fn main_rs_is_a_thin_binary() {
    let text = std::fs::read_to_string(src().join("main.rs")).expect("main.rs");
    let n = code_lines(&text);
    assert!(
        n <= THIN,
        "main.rs has {n} lines of code: commands belong in the library (cli.rs)"
    );
}

#[test]
fn the_thin_check_catches_a_command_in_main() {
    let violation: String = (0..40).map(|n| format!("let x{n} = {n};\n")).collect();
    assert!(code_lines(&violation) > THIN);
}
