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

// ---------------------------------------------------------------------------
// Arrows point down: a module never imports one above it.

/// The controller's modules from the bottom up, each with the modules it
/// must never name (ARCHITECTURE.md, "Layers"). A module is a file
/// (`fleet` is `fleet.rs`) or a folder (`store` is `store/`).
const LAYERS: &[(&str, &[&str])] = &[
    (
        "domain",
        &[
            "store",
            "fleet",
            "link",
            "api",
            "serve",
            "cache",
            "sessions",
            "metrics",
            "discovery",
            "security",
            "replay",
            "watch",
            "liveness",
            "recovery",
            "breakers",
            "config",
            "ops",
            "cli",
            "listen",
        ],
    ),
    (
        "store",
        &[
            "fleet",
            "link",
            "api",
            "serve",
            "replay",
            "discovery",
            "security",
            "watch",
            "liveness",
            "recovery",
            "sessions",
            "cache",
            "cli",
        ],
    ),
    (
        "sessions",
        &[
            "fleet",
            "link",
            "api",
            "serve",
            "store",
            "discovery",
            "security",
            "watch",
            "liveness",
            "recovery",
            "cli",
        ],
    ),
    (
        "metrics",
        &[
            "discovery",
            "link",
            "fleet",
            "api",
            "serve",
            "store",
            "security",
            "cli",
        ],
    ),
    (
        "replay",
        &["fleet", "link", "api", "serve", "discovery", "security"],
    ),
    (
        "fleet",
        &[
            "link",
            "api",
            "serve",
            "discovery",
            "security",
            "liveness",
            "recovery",
            "cli",
        ],
    ),
    ("security", &["link", "api", "serve", "discovery", "cli"]),
];

/// Where the shipped code of `text` names one of `forbidden` modules.
fn upward_imports(text: &str, forbidden: &[&str]) -> Vec<String> {
    shipped_code(text)
        .flat_map(|(n, line)| {
            forbidden
                .iter()
                .filter(move |m| {
                    let path = format!("crate::{m}");
                    line.match_indices(&path).any(|(at, _)| {
                        !line[at + path.len()..]
                            .starts_with(|c: char| c == '_' || c.is_alphanumeric())
                    })
                })
                .map(move |m| format!("line {n}: crate::{m} in {:?}", line.trim()))
        })
        .collect()
}

/// Files that are test modules as a whole: declared `#[cfg(test)] mod x;`
/// by their parent (`store/conformance.rs`, `store/sqlite/tests.rs`).
fn test_only_files(files: &[(PathBuf, String)]) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for (path, text) in files {
        let name = path
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or_default();
        let dir = if matches!(name, "mod" | "lib" | "main") {
            path.parent().expect("a directory").to_path_buf()
        } else {
            path.with_extension("")
        };
        let lines: Vec<&str> = text.lines().map(str::trim).collect();
        for pair in lines.windows(2) {
            let declared = pair[1]
                .trim_start_matches("pub(crate) ")
                .trim_start_matches("pub ")
                .strip_prefix("mod ")
                .and_then(|rest| rest.strip_suffix(';'));
            if let (true, Some(module)) = (pair[0] == "#[cfg(test)]", declared) {
                out.push(dir.join(format!("{module}.rs")));
                out.push(dir.join(module).join("mod.rs"));
            }
        }
    }
    out
}

#[test]
fn no_module_imports_one_above_it() {
    let root = src();
    let files = rust_files(&root);
    let tests = test_only_files(&files);
    assert!(
        tests.contains(&root.join("store/conformance.rs")),
        "test modules are told apart: {tests:?}"
    );
    let mut found = Vec::new();
    for (path, text) in files.iter().filter(|(p, _)| !tests.contains(p)) {
        let rel = path
            .strip_prefix(&root)
            .expect("under src")
            .to_string_lossy()
            .to_string();
        for (module, forbidden) in LAYERS {
            if rel == format!("{module}.rs") || rel.starts_with(&format!("{module}/")) {
                found.extend(
                    upward_imports(text, forbidden)
                        .into_iter()
                        .map(|f| format!("{rel}: {f}")),
                );
            }
        }
    }
    assert!(found.is_empty(), "upward arrows:\n{}", found.join("\n"));
}

#[test]
fn the_layer_check_catches_the_store_calling_up() {
    let violation =
        "use crate::store::Append;\nfn f() { let _ = crate::replay::Rebuild::new(vec![]); }\n";
    let found = upward_imports(violation, &["replay", "fleet"]);
    assert_eq!(found.len(), 1, "{found:?}");
    assert!(found[0].contains("crate::replay"));
    // A module whose name begins like a forbidden one is not it.
    assert!(upward_imports("use crate::replayed::X;\n", &["replay"]).is_empty());
    // Test code is not shipped.
    assert!(upward_imports("#[cfg(test)]\nuse crate::replay::X;\n", &["replay"]).is_empty());
}

// ---------------------------------------------------------------------------
// No source file a newcomer would dread.

/// The most lines a file under `controller/src` may have.
const LONGEST: usize = 1200;

fn too_long(text: &str) -> bool {
    text.lines().count() > LONGEST
}

#[test]
fn no_source_file_is_over_1200_lines() {
    let root = src();
    let long: Vec<String> = rust_files(&root)
        .into_iter()
        .filter(|(_, text)| too_long(text))
        .map(|(path, text)| format!("{}: {} lines", path.display(), text.lines().count()))
        .collect();
    assert!(
        long.is_empty(),
        "split these by concern:\n{}",
        long.join("\n")
    );
}

#[test]
fn the_length_check_catches_a_long_file() {
    assert!(too_long(&"fn f() {}\n".repeat(LONGEST + 1)));
    assert!(!too_long(&"fn f() {}\n".repeat(LONGEST)));
}
