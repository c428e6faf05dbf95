//! Rebuild when a migration changes: `sqlx::migrate!` embeds them at compile
//! time, and cargo does not watch files outside the crate by itself.
fn main() {
    println!("cargo:rerun-if-changed=../migrations");
}
