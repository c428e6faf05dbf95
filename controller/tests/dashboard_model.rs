//! The dashboard's decisions (`controller/dashboard/model.js`: routes,
//! counts, filters, the event-stream parser, reconnect delays, error text)
//! under Node's test runner. The page itself is tested in a real browser
//! by `tests/tests/dashboard.rs`.

use std::path::Path;
use std::process::Command;

#[test]
fn the_dashboard_model_passes_its_tests() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("dashboard");
    let out = Command::new("node")
        .arg("--test")
        .arg("tests/model.test.js")
        .current_dir(&dir)
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run node ({e}): the dashboard's tests need Node.js (Debian: nodejs; scripts/test installs it)")
        });
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "node --test failed ({}):\n{report}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    // The runner found and ran the tests (not an empty pass).
    let passed = report
        .lines()
        .find_map(|l| l.strip_prefix("# pass "))
        .and_then(|n| n.trim().parse::<u32>().ok());
    assert!(passed.is_some_and(|n| n >= 10), "{report}");
}
