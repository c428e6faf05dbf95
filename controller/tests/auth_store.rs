//! The auth store's behaviour, checked the same way on both backends: the
//! embedded SQLite store on a temporary directory and PostgreSQL on a
//! database of each test's own (two stores on one database standing in
//! for two controllers).

use chrono::{DateTime, Duration, TimeZone, Utc};
use kiwi_controller::store::auth::{
    ApiTokenRecord, AuthStore, CertificateRecord, EnrollmentStatus, EnrollmentTokenRecord, Role,
    TokenUse,
};
use kiwi_controller::store::postgres::PostgresStore;
use kiwi_controller::store::sqlite::SqliteStore;
use kiwi_controller::store::{EventStore, StoreError};
use kiwi_controller::testing::TestDatabase;
use kiwi_protocol::RobotId;
use serde_json::json;
use std::sync::Arc;
use tempfile::TempDir;
use uuid::Uuid;

async fn sqlite() -> (TempDir, SqliteStore) {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = SqliteStore::open(&dir.path().join("kiwi.db"))
        .await
        .expect("open");
    (dir, store)
}

async fn postgres(db: &TestDatabase) -> PostgresStore {
    PostgresStore::connect(db.url(), 8)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to {}: {e}", db.url()))
}

/// An instant `s` seconds after a fixed origin, with microseconds (what
/// both backends keep).
fn t(s: i64) -> DateTime<Utc> {
    Utc.timestamp_opt(1_800_000_000, 123_456_000).unwrap() + Duration::seconds(s)
}

fn hash(n: u64) -> String {
    format!("{n:064x}")
}

fn robot(n: u128) -> RobotId {
    RobotId(Uuid::from_u128(
        0x6175_7468_0000_0000_0000_0000_0000_0000 + n,
    ))
}

fn api_token(id: &str, role: Role, created: i64) -> ApiTokenRecord {
    ApiTokenRecord {
        id: id.into(),
        name: format!("label of {id}"),
        role,
        secret_hash: hash(created as u64),
        created_at: t(created),
        expires_at: None,
        revoked_at: None,
    }
}

fn enrollment_token(id: &str, uses: u32, expires: i64) -> EnrollmentTokenRecord {
    EnrollmentTokenRecord {
        id: id.into(),
        secret_hash: hash(7),
        created_at: t(0),
        expires_at: t(expires),
        uses_total: uses,
        uses_left: uses,
        revoked_at: None,
    }
}

fn certificate(serial: &str, robot_id: RobotId, issued: i64, not_after: i64) -> CertificateRecord {
    CertificateRecord {
        serial: serial.into(),
        robot_id,
        key_fingerprint: format!("sha256:{}", hash(issued as u64)),
        not_before: t(issued - 60),
        not_after: t(not_after),
        issued_at: t(issued),
        revoked_at: None,
    }
}

fn assert_invalid<T: std::fmt::Debug>(result: Result<T, StoreError>) {
    assert!(matches!(result, Err(StoreError::Invalid(_))), "{result:?}");
}

fn assert_refused<T: std::fmt::Debug>(result: Result<T, StoreError>) {
    assert!(
        matches!(result, Err(StoreError::InvalidTransition(_))),
        "{result:?}"
    );
}

// ---------------------------------------------------------------------------
// The behaviour, once for both backends.

async fn check_api_tokens(store: Arc<dyn AuthStore>) {
    assert!(store.api_tokens().await.unwrap().is_empty());
    let a = ApiTokenRecord {
        expires_at: Some(t(3600)),
        ..api_token("tok-a", Role::Admin, 1)
    };
    let b = api_token("tok-b", Role::Viewer, 2);
    let c = ApiTokenRecord {
        name: String::new(),
        ..api_token("tok-c", Role::Operator, 2)
    };
    for token in [&c, &b, &a] {
        store.insert_api_token(token).await.unwrap();
    }
    assert_invalid(store.insert_api_token(&b).await);

    assert_eq!(store.api_token("tok-a").await.unwrap(), Some(a.clone()));
    assert_eq!(store.api_token("tok-z").await.unwrap(), None);
    assert_eq!(
        store.api_tokens().await.unwrap(),
        [a.clone(), b.clone(), c.clone()],
        "by created_at, then id"
    );

    assert!(store.revoke_api_token("tok-a", t(5)).await.unwrap());
    assert!(
        store.revoke_api_token("tok-a", t(6)).await.unwrap(),
        "still there"
    );
    assert!(!store.revoke_api_token("tok-z", t(6)).await.unwrap());
    let revoked = store.api_token("tok-a").await.unwrap().expect("a token");
    assert_eq!(
        revoked,
        ApiTokenRecord {
            revoked_at: Some(t(5)),
            ..a
        },
        "the first revocation stands"
    );
    assert_eq!(store.api_token("tok-b").await.unwrap(), Some(b));

    let shown = serde_json::to_value(&revoked).unwrap();
    assert_eq!(shown["role"], json!("admin"));
    assert!(shown.get("secret_hash").is_none(), "{shown}");
}

async fn check_enrollment_token_uses(store: Arc<dyn AuthStore>) {
    let good = hash(7);
    let bad = hash(8);
    store
        .insert_enrollment_token(&enrollment_token("e-two", 2, 100))
        .await
        .unwrap();
    store
        .insert_enrollment_token(&enrollment_token("e-late", 5, 100))
        .await
        .unwrap();
    store
        .insert_enrollment_token(&enrollment_token("e-revoked", 5, 100))
        .await
        .unwrap();
    assert_invalid(
        store
            .insert_enrollment_token(&enrollment_token("e-two", 1, 100))
            .await,
    );
    assert_invalid(
        store
            .insert_enrollment_token(&EnrollmentTokenRecord {
                uses_left: 3,
                ..enrollment_token("e-more-left-than-total", 2, 100)
            })
            .await,
    );

    let uses = |id: &str, hash: &str, at: i64| {
        let (store, id, hash) = (store.clone(), id.to_string(), hash.to_string());
        async move { store.use_enrollment_token(&id, &hash, t(at)).await.unwrap() }
    };
    assert_eq!(
        uses("e-two", &good, 10).await,
        TokenUse::Accepted { uses_left: 1 }
    );
    assert_eq!(uses("e-two", &bad, 11).await, TokenUse::WrongSecret);
    assert_eq!(
        uses("e-two", &good, 12).await,
        TokenUse::Accepted { uses_left: 0 }
    );
    assert_eq!(uses("e-two", &good, 13).await, TokenUse::UsedUp);
    assert_eq!(uses("e-two", &bad, 13).await, TokenUse::WrongSecret);
    assert_eq!(uses("e-none", &good, 13).await, TokenUse::Unknown);

    assert_eq!(uses("e-late", &good, 100).await, TokenUse::Expired);
    assert_eq!(uses("e-late", &bad, 100).await, TokenUse::WrongSecret);
    assert_eq!(
        uses("e-late", &good, 99).await,
        TokenUse::Accepted { uses_left: 4 }
    );

    assert!(
        store
            .revoke_enrollment_token("e-revoked", t(20))
            .await
            .unwrap()
    );
    assert!(
        store
            .revoke_enrollment_token("e-revoked", t(21))
            .await
            .unwrap()
    );
    assert!(
        !store
            .revoke_enrollment_token("e-none", t(21))
            .await
            .unwrap()
    );
    assert_eq!(uses("e-revoked", &good, 30).await, TokenUse::Revoked);
    assert_eq!(
        uses("e-revoked", &good, 200).await,
        TokenUse::Revoked,
        "revoked before expired"
    );
    assert_eq!(uses("e-revoked", &bad, 30).await, TokenUse::WrongSecret);

    assert_eq!(
        store.enrollment_tokens().await.unwrap(),
        [
            EnrollmentTokenRecord {
                uses_left: 4,
                ..enrollment_token("e-late", 5, 100)
            },
            EnrollmentTokenRecord {
                revoked_at: Some(t(20)),
                ..enrollment_token("e-revoked", 5, 100)
            },
            EnrollmentTokenRecord {
                uses_left: 0,
                ..enrollment_token("e-two", 2, 100)
            },
        ],
        "by created_at, then id; refusals took nothing"
    );
    let shown = serde_json::to_value(&store.enrollment_tokens().await.unwrap()[0]).unwrap();
    assert!(shown.get("secret_hash").is_none(), "{shown}");
}

/// 20 uses at once of a token with one use left, spread over `stores`
/// (several stores: several controllers): exactly one is accepted.
async fn check_last_use_goes_once(stores: &[Arc<dyn AuthStore>]) {
    stores[0]
        .insert_enrollment_token(&enrollment_token("e-once", 1, 100))
        .await
        .unwrap();
    // Every connection is open before the race, and all start together.
    for store in stores {
        store.enrollment_tokens().await.unwrap();
    }
    let start = Arc::new(tokio::sync::Barrier::new(20));
    let tries: Vec<_> = (0..20)
        .map(|n| {
            let store = stores[n % stores.len()].clone();
            let start = start.clone();
            tokio::spawn(async move {
                start.wait().await;
                store
                    .use_enrollment_token("e-once", &hash(7), t(1))
                    .await
                    .unwrap()
            })
        })
        .collect();
    let mut outcomes = Vec::new();
    for task in tries {
        outcomes.push(task.await.expect("a use"));
    }
    let accepted = outcomes
        .iter()
        .filter(|o| **o == TokenUse::Accepted { uses_left: 0 })
        .count();
    let used_up = outcomes.iter().filter(|o| **o == TokenUse::UsedUp).count();
    assert_eq!((accepted, used_up), (1, 19), "{outcomes:?}");
    for store in stores {
        assert_eq!(store.enrollment_tokens().await.unwrap()[0].uses_left, 0);
    }
}

async fn check_enrollments(store: Arc<dyn AuthStore>) {
    let first = store
        .note_enrollment(
            robot(1),
            "sha256:k1",
            &json!({"hostname": "kiwi-1", "addresses": ["10.0.0.5"]}),
            "10.0.0.5",
            t(1),
        )
        .await
        .unwrap();
    assert_eq!(first.status, EnrollmentStatus::Pending);
    assert_eq!(
        (first.robot_id, first.key_fingerprint.as_str()),
        (robot(1), "sha256:k1")
    );
    assert_eq!((first.first_seen, first.last_seen), (t(1), t(1)));
    assert_eq!((first.decided_at, first.decided_by.clone()), (None, None));

    let again = store
        .note_enrollment(
            robot(1),
            "sha256:k1",
            &json!({"hostname": "kiwi-1b"}),
            "10.0.0.6",
            t(2),
        )
        .await
        .unwrap();
    let mut expected = first.clone();
    expected.identity = json!({"hostname": "kiwi-1b"});
    expected.source_addr = "10.0.0.6".into();
    expected.last_seen = t(2);
    assert_eq!(again, expected, "same id, first_seen and status");
    let e1 = again;

    let e2 = store
        .note_enrollment(robot(1), "sha256:k2", &json!({}), "10.0.0.5", t(3))
        .await
        .unwrap();
    let e3 = store
        .note_enrollment(robot(2), "sha256:k1", &json!({}), "10.0.0.7", t(4))
        .await
        .unwrap();
    assert!(e1.id != e2.id && e2.id != e3.id && e1.id != e3.id);
    assert_eq!(store.enrollment(e1.id).await.unwrap(), Some(e1.clone()));
    assert_eq!(store.enrollment(Uuid::new_v4()).await.unwrap(), None);
    let all = [e1.clone(), e2.clone(), e3.clone()];
    assert_eq!(store.enrollments(None).await.unwrap(), all);
    assert_eq!(
        store
            .enrollments(Some(EnrollmentStatus::Pending))
            .await
            .unwrap(),
        all
    );
    assert!(
        store
            .enrollments(Some(EnrollmentStatus::Approved))
            .await
            .unwrap()
            .is_empty()
    );

    // Pending -> Approved, then Issued (keeping who approved).
    let approved = store
        .decide_enrollment(e1.id, EnrollmentStatus::Approved, "alice", t(5))
        .await
        .unwrap()
        .expect("a record");
    let mut expected = e1.clone();
    expected.status = EnrollmentStatus::Approved;
    expected.decided_at = Some(t(5));
    expected.decided_by = Some("alice".into());
    assert_eq!(approved, expected);
    let noted = store
        .note_enrollment(robot(1), "sha256:k1", &json!({"n": 3}), "10.0.0.6", t(6))
        .await
        .unwrap();
    assert_eq!(noted.status, EnrollmentStatus::Approved);
    assert_eq!(
        (noted.id, noted.first_seen, noted.last_seen),
        (e1.id, t(1), t(6))
    );
    for refused in [EnrollmentStatus::Pending, EnrollmentStatus::Approved] {
        assert_refused(store.decide_enrollment(e1.id, refused, "bob", t(7)).await);
    }
    assert_eq!(store.enrollment(e1.id).await.unwrap(), Some(noted.clone()));
    let issued = store
        .decide_enrollment(e1.id, EnrollmentStatus::Issued, "controller", t(8))
        .await
        .unwrap()
        .expect("a record");
    assert_eq!(issued.status, EnrollmentStatus::Issued);
    assert_eq!(
        (issued.decided_at, issued.decided_by.as_deref()),
        (Some(t(5)), Some("alice"))
    );
    for refused in [
        EnrollmentStatus::Pending,
        EnrollmentStatus::Approved,
        EnrollmentStatus::Rejected,
        EnrollmentStatus::Issued,
    ] {
        assert_refused(store.decide_enrollment(e1.id, refused, "bob", t(9)).await);
    }
    assert_eq!(store.enrollment(e1.id).await.unwrap(), Some(issued.clone()));

    // Pending -> Rejected is final; Pending -> Issued is not a move.
    assert_refused(
        store
            .decide_enrollment(e2.id, EnrollmentStatus::Issued, "bob", t(9))
            .await,
    );
    let rejected = store
        .decide_enrollment(e2.id, EnrollmentStatus::Rejected, "bob", t(10))
        .await
        .unwrap()
        .expect("a record");
    assert_eq!(
        (
            rejected.status,
            rejected.decided_at,
            rejected.decided_by.as_deref()
        ),
        (EnrollmentStatus::Rejected, Some(t(10)), Some("bob"))
    );
    assert_refused(
        store
            .decide_enrollment(e2.id, EnrollmentStatus::Approved, "alice", t(11))
            .await,
    );

    // Approved -> Rejected.
    store
        .decide_enrollment(e3.id, EnrollmentStatus::Approved, "alice", t(12))
        .await
        .unwrap()
        .expect("a record");
    let withdrawn = store
        .decide_enrollment(e3.id, EnrollmentStatus::Rejected, "carol", t(13))
        .await
        .unwrap()
        .expect("a record");
    assert_eq!(withdrawn.decided_by.as_deref(), Some("carol"));

    assert_eq!(
        store
            .decide_enrollment(Uuid::new_v4(), EnrollmentStatus::Approved, "alice", t(14))
            .await
            .unwrap(),
        None
    );
    assert_eq!(
        serde_json::to_value(&issued).unwrap()["status"],
        json!("issued")
    );
    assert_eq!(
        store
            .enrollments(Some(EnrollmentStatus::Issued))
            .await
            .unwrap(),
        [issued]
    );
    assert_eq!(
        store
            .enrollments(Some(EnrollmentStatus::Rejected))
            .await
            .unwrap(),
        [rejected, withdrawn]
    );
}

async fn check_certificates(store: Arc<dyn AuthStore>) {
    let (r1, r2) = (robot(1), robot(2));
    let c1 = certificate("0a01", r1, 10, 1000);
    let c2 = certificate("0a00", r1, 20, 500);
    let c3 = certificate("0b00", r2, 30, 1000);
    for cert in [&c2, &c3, &c1] {
        store.insert_certificate(cert).await.unwrap();
    }
    assert_invalid(
        store
            .insert_certificate(&certificate("0a01", r2, 40, 1000))
            .await,
    );
    assert_eq!(
        store.certificates(r1).await.unwrap(),
        [c1.clone(), c2.clone()],
        "by issued_at"
    );
    assert!(store.certificates(robot(3)).await.unwrap().is_empty());
    assert!(store.revoked_serials(t(100)).await.unwrap().is_empty());

    assert_eq!(store.revoke_certificates(r1, t(100)).await.unwrap(), 2);
    assert_eq!(store.revoke_certificates(r1, t(101)).await.unwrap(), 0);
    assert_eq!(
        store.revoke_certificates(robot(3), t(101)).await.unwrap(),
        0
    );
    let revoked = |c: &CertificateRecord| CertificateRecord {
        revoked_at: Some(t(100)),
        ..c.clone()
    };
    assert_eq!(
        store.certificates(r1).await.unwrap(),
        [revoked(&c1), revoked(&c2)]
    );
    assert_eq!(store.certificates(r2).await.unwrap(), [c3]);

    assert_eq!(
        store.revoked_serials(t(100)).await.unwrap(),
        ["0a00", "0a01"]
    );
    assert_eq!(
        store.revoked_serials(t(500)).await.unwrap(),
        ["0a01"],
        "an expired certificate needs no revocation"
    );
    assert!(store.revoked_serials(t(1000)).await.unwrap().is_empty());

    // A new certificate for the robot after the revocation is valid.
    store
        .insert_certificate(&certificate("0c00", r1, 200, 2000))
        .await
        .unwrap();
    assert_eq!(store.certificates(r1).await.unwrap().len(), 3);
    assert_eq!(
        store.revoked_serials(t(200)).await.unwrap(),
        ["0a00", "0a01"]
    );
}

/// One test per backend for each check.
macro_rules! on_both_backends {
    ($name:ident, $check:ident) => {
        mod $name {
            use super::*;

            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn sqlite_auth() {
                let (_dir, store) = sqlite().await;
                $check(store.auth()).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn postgres_auth() {
                let db = TestDatabase::create().await;
                let store = postgres(&db).await;
                $check(store.auth()).await;
                store.close().await;
            }
        }
    };
}

async fn check_last_use_goes_once_on_one(store: Arc<dyn AuthStore>) {
    check_last_use_goes_once(&[store]).await;
}

on_both_backends!(api_tokens, check_api_tokens);
on_both_backends!(enrollment_token_uses, check_enrollment_token_uses);
on_both_backends!(last_use_goes_once, check_last_use_goes_once_on_one);
on_both_backends!(enrollments, check_enrollments);
on_both_backends!(certificates, check_certificates);

// ---------------------------------------------------------------------------
// Backend-specific.

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_auth_is_shared_by_controllers_on_one_database() {
    let db = TestDatabase::create().await;
    let (a, b) = (postgres(&db).await, postgres(&db).await);
    check_last_use_goes_once(&[a.auth(), b.auth()]).await;

    // Both note the same agent at once: one record.
    let notes: Vec<_> = (0..10)
        .map(|n| {
            let store = if n % 2 == 0 { a.auth() } else { b.auth() };
            tokio::spawn(async move {
                store
                    .note_enrollment(robot(9), "sha256:k9", &json!({ "n": n }), "10.0.0.9", t(n))
                    .await
                    .unwrap()
            })
        })
        .collect();
    let mut ids = Vec::new();
    for note in notes {
        ids.push(note.await.expect("a note").id);
    }
    ids.dedup();
    assert_eq!(ids.len(), 1, "{ids:?}");
    let id = ids[0];

    // One controller's decision is the other's.
    a.auth()
        .decide_enrollment(id, EnrollmentStatus::Approved, "alice", t(20))
        .await
        .unwrap()
        .expect("a record");
    assert_refused(
        b.auth()
            .decide_enrollment(id, EnrollmentStatus::Approved, "bob", t(21))
            .await,
    );
    a.close().await;
    b.close().await;
}

#[tokio::test]
async fn sqlite_auth_records_survive_a_reopen() {
    let (dir, store) = sqlite().await;
    let token = api_token("tok-a", Role::Operator, 1);
    store.auth().insert_api_token(&token).await.unwrap();
    store
        .auth()
        .insert_enrollment_token(&enrollment_token("e-one", 3, 100))
        .await
        .unwrap();
    assert_eq!(
        store
            .auth()
            .use_enrollment_token("e-one", &hash(7), t(1))
            .await
            .unwrap(),
        TokenUse::Accepted { uses_left: 2 }
    );
    // An auth handle kept past the store's close fails, it does not write.
    let kept = store.auth();
    store.close().await;
    assert!(matches!(
        kept.revoke_api_token("tok-a", t(2)).await,
        Err(StoreError::Unavailable(_))
    ));
    drop(store);

    let store = SqliteStore::open(&dir.path().join("kiwi.db"))
        .await
        .expect("reopen");
    assert_eq!(store.auth().api_tokens().await.unwrap(), [token]);
    assert_eq!(
        store.auth().enrollment_tokens().await.unwrap()[0].uses_left,
        2
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_auth_concurrent_uses_each_take_one_while_reads_go_on() {
    let (_dir, store) = sqlite().await;
    let auth = store.auth();
    auth.insert_enrollment_token(&enrollment_token("e-many", 1000, 100))
        .await
        .unwrap();
    let uses: Vec<_> = (0..100)
        .map(|_| {
            let auth = auth.clone();
            tokio::spawn(async move { auth.use_enrollment_token("e-many", &hash(7), t(1)).await })
        })
        .collect();
    // Reads (of the log and of auth records) go on meanwhile.
    for _ in 0..20 {
        store.head().await.unwrap();
        auth.enrollment_tokens().await.unwrap();
    }
    let mut left = Vec::new();
    for task in uses {
        match task.await.expect("a use").unwrap() {
            TokenUse::Accepted { uses_left } => left.push(uses_left),
            other => panic!("{other:?}"),
        }
    }
    left.sort_unstable();
    assert_eq!(left, (900..1000).collect::<Vec<_>>());
}
