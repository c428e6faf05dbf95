//! Logging set-up. Under systemd (`JOURNAL_STREAM` is set and journald's
//! socket answers) every event goes to journald with its fields as journal
//! fields (`EVENT_TYPE`, `AGGREGATE_ID`, `CORRELATION_ID`, ..., and those of
//! the spans it happened in); otherwise JSON lines on stderr with
//! `timestamp`, `level`, `target`, the message and every field, the
//! enclosing span's fields under `span`.
//!
//! The filter is `KIWI_LOG`, else `RUST_LOG`, else the program's default
//! (`info`, or `warn` for commands that talk to a person).

use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// The filter: `KIWI_LOG`, else `RUST_LOG`, else `default`. An invalid
/// directive falls back to `default` with a note on stderr, rather than
/// logging nothing.
fn filter(default: &str) -> EnvFilter {
    for var in ["KIWI_LOG", "RUST_LOG"] {
        if let Ok(text) = std::env::var(var) {
            match EnvFilter::try_new(&text) {
                Ok(f) => return f,
                Err(e) => eprintln!("{var}={text:?} is not a log filter ({e}); using {default:?}"),
            }
        }
    }
    EnvFilter::new(default)
}

/// Whether systemd connected stderr to the journal (see
/// `systemd.exec(5)`, `$JOURNAL_STREAM`).
pub fn under_journald() -> bool {
    std::env::var_os("JOURNAL_STREAM").is_some()
}

/// Installs the global subscriber for `program` (its journald
/// `SYSLOG_IDENTIFIER`).
pub fn init(program: &str, default: &str) {
    let filter = filter(default);
    if under_journald() {
        match tracing_journald::layer() {
            Ok(journald) => {
                let journald = journald
                    .with_syslog_identifier(program.to_string())
                    // Field names as written (`CORRELATION_ID`, not
                    // `F_CORRELATION_ID`): `journalctl CORRELATION_ID=...`.
                    .with_field_prefix(None);
                tracing_subscriber::registry()
                    .with(filter)
                    .with(journald)
                    .init();
                return;
            }
            Err(e) => {
                eprintln!("{program}: journald is not reachable ({e}); logging JSON to stderr");
            }
        }
    }
    tracing_subscriber::fmt()
        .json()
        .flatten_event(true)
        .with_current_span(true)
        .with_span_list(false)
        .with_target(true)
        .with_writer(std::io::stderr)
        .with_env_filter(filter)
        .init();
}
