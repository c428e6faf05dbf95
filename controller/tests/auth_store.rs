//! The auth store's behaviour, checked the same way on both backends: the
//! embedded SQLite store on a temporary directory and PostgreSQL on a
//! database of each test's own (two stores on one database standing in
//! for two controllers).

use chrono::{DateTime, Duration, TimeZone, Utc};
use kiwi_controller::store::auth::{
    ApiTokenRecord, AuthStore, CertificateRecord, EndedEnrollments, EnrollmentCursor,
    EnrollmentRecord, EnrollmentStatus, EnrollmentTokenRecord, NewEnrollment, Noted, PendingCap,
    PendingLimits, Role, TokenUse,
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
        robot_id: None,
    }
}

/// Caps no test below reaches unless it means to.
const ROOMY: PendingLimits = PendingLimits {
    total: 1000,
    per_address: 1000,
};

/// Notes a plain request (no reason) under roomy caps.
async fn note(
    store: &dyn AuthStore,
    robot_id: RobotId,
    key: &str,
    identity: serde_json::Value,
    source: &str,
    at: DateTime<Utc>,
) -> EnrollmentRecord {
    noted(store, robot_id, key, source, ROOMY, at, &identity).await
}

async fn noted(
    store: &dyn AuthStore,
    robot_id: RobotId,
    key: &str,
    source: &str,
    limits: PendingLimits,
    at: DateTime<Utc>,
    identity: &serde_json::Value,
) -> EnrollmentRecord {
    match try_note(store, robot_id, key, source, limits, at, identity).await {
        Noted::Recorded(r) => r,
        other => panic!("not recorded: {other:?}"),
    }
}

async fn try_note(
    store: &dyn AuthStore,
    robot_id: RobotId,
    key: &str,
    source: &str,
    limits: PendingLimits,
    at: DateTime<Utc>,
    identity: &serde_json::Value,
) -> Noted {
    store
        .note_enrollment(
            NewEnrollment {
                robot_id,
                key_fingerprint: key,
                identity,
                source_addr: source,
                reason: None,
            },
            limits,
            at,
        )
        .await
        .unwrap()
}

/// Every request with `status` (None: all), in one page.
async fn list(store: &dyn AuthStore, status: Option<EnrollmentStatus>) -> Vec<EnrollmentRecord> {
    store.enrollments(status, None, 1000).await.unwrap()
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
        async move {
            store
                .use_enrollment_token(&id, &hash, robot(1), t(at))
                .await
                .unwrap()
        }
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

    // A token made for one robot enrolls that robot only.
    let bound = EnrollmentTokenRecord {
        robot_id: Some(robot(2)),
        ..enrollment_token("e-bound", 2, 100)
    };
    store.insert_enrollment_token(&bound).await.unwrap();
    assert_eq!(
        store.enrollment_token("e-bound").await.unwrap(),
        Some(bound.clone())
    );
    assert_eq!(store.enrollment_token("e-none").await.unwrap(), None);
    assert_eq!(uses("e-bound", &good, 30).await, TokenUse::WrongRobot);
    assert_eq!(
        store
            .use_enrollment_token("e-bound", &good, robot(2), t(30))
            .await
            .unwrap(),
        TokenUse::Accepted { uses_left: 1 }
    );

    assert_eq!(
        store.enrollment_tokens().await.unwrap(),
        [
            EnrollmentTokenRecord {
                uses_left: 1,
                ..bound
            },
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
                    .use_enrollment_token("e-once", &hash(7), robot(1), t(1))
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
    let store = store.as_ref();
    let first = note(
        store,
        robot(1),
        "sha256:k1",
        json!({"hostname": "kiwi-1", "addresses": ["10.0.0.5"]}),
        "10.0.0.5",
        t(1),
    )
    .await;
    assert_eq!(first.status, EnrollmentStatus::Pending);
    assert_eq!(
        (first.robot_id, first.key_fingerprint.as_str()),
        (robot(1), "sha256:k1")
    );
    assert_eq!((first.first_seen, first.last_seen), (t(1), t(1)));
    assert_eq!((first.decided_at, first.decided_by.clone()), (None, None));

    let again = note(
        store,
        robot(1),
        "sha256:k1",
        json!({"hostname": "kiwi-1b"}),
        "10.0.0.6",
        t(2),
    )
    .await;
    let mut expected = first.clone();
    expected.identity = json!({"hostname": "kiwi-1b"});
    expected.source_addr = "10.0.0.6".into();
    expected.last_seen = t(2);
    assert_eq!(again, expected, "same id, first_seen and status");
    let e1 = again;

    let e2 = note(store, robot(1), "sha256:k2", json!({}), "10.0.0.5", t(3)).await;
    let e3 = note(store, robot(2), "sha256:k1", json!({}), "10.0.0.7", t(4)).await;
    assert!(e1.id != e2.id && e2.id != e3.id && e1.id != e3.id);
    assert_eq!(store.enrollment(e1.id).await.unwrap(), Some(e1.clone()));
    assert_eq!(store.enrollment(Uuid::new_v4()).await.unwrap(), None);
    let all = [e1.clone(), e2.clone(), e3.clone()];
    assert_eq!(list(store, None).await, all);
    assert_eq!(list(store, Some(EnrollmentStatus::Pending)).await, all);
    assert!(
        list(store, Some(EnrollmentStatus::Approved))
            .await
            .is_empty()
    );
    // Pages: two, then the rest after the second.
    assert_eq!(store.enrollments(None, None, 2).await.unwrap(), all[..2]);
    let after = Some(EnrollmentCursor::after(&all[1]));
    assert_eq!(store.enrollments(None, after, 2).await.unwrap(), all[2..]);
    let after = Some(EnrollmentCursor::after(&all[2]));
    assert!(store.enrollments(None, after, 2).await.unwrap().is_empty());

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
    let noted = note(
        store,
        robot(1),
        "sha256:k1",
        json!({"n": 3}),
        "10.0.0.6",
        t(6),
    )
    .await;
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
        list(store, Some(EnrollmentStatus::Issued)).await,
        std::slice::from_ref(&issued)
    );
    assert_eq!(
        list(store, Some(EnrollmentStatus::Rejected)).await,
        [rejected.clone(), withdrawn]
    );

    // Issued once: asked again, the request starts over as pending (an
    // operator decides again), with its id and first_seen.
    let asked = note(store, robot(1), "sha256:k1", json!({}), "10.0.0.6", t(15)).await;
    assert_eq!(
        (asked.id, asked.status, asked.first_seen, asked.decided_by),
        (e1.id, EnrollmentStatus::Pending, t(1), None)
    );
    // A rejected request stays rejected.
    let again = note(store, robot(1), "sha256:k2", json!({}), "10.0.0.5", t(15)).await;
    assert_eq!(again.status, EnrollmentStatus::Rejected);
}

/// Decommissioning ends every request of the robot that is not final and
/// revokes the unused tokens made for it; a request asked again after that
/// starts over as pending.
async fn check_ending_enrollments(store: Arc<dyn AuthStore>) {
    let store = store.as_ref();
    let (r1, r2) = (robot(1), robot(2));
    let pending = note(store, r1, "sha256:k1", json!({}), "10.0.0.5", t(1)).await;
    let approved = note(store, r1, "sha256:k2", json!({}), "10.0.0.5", t(2)).await;
    let issued = note(store, r1, "sha256:k3", json!({}), "10.0.0.5", t(3)).await;
    let rejected = note(store, r1, "sha256:k4", json!({}), "10.0.0.5", t(4)).await;
    let other = note(store, r2, "sha256:k1", json!({}), "10.0.0.6", t(5)).await;
    let decide = |id, to| store.decide_enrollment(id, to, "alice", t(6));
    decide(approved.id, EnrollmentStatus::Approved)
        .await
        .unwrap();
    decide(issued.id, EnrollmentStatus::Approved).await.unwrap();
    decide(issued.id, EnrollmentStatus::Issued).await.unwrap();
    decide(rejected.id, EnrollmentStatus::Rejected)
        .await
        .unwrap();
    for (id, robot_id) in [("e-r1", Some(r1)), ("e-r2", Some(r2)), ("e-any", None)] {
        store
            .insert_enrollment_token(&EnrollmentTokenRecord {
                robot_id,
                ..enrollment_token(id, 1, 100)
            })
            .await
            .unwrap();
    }

    let ended = store.end_enrollments(r1, "admin", t(10)).await.unwrap();
    assert_eq!(
        ended,
        EndedEnrollments {
            enrollments: 3,
            tokens: 1
        }
    );
    let status = |id| async move { store.enrollment(id).await.unwrap().unwrap() };
    for id in [pending.id, approved.id, issued.id] {
        let e = status(id).await;
        assert_eq!(
            (e.status, e.decided_at, e.decided_by.as_deref()),
            (EnrollmentStatus::Revoked, Some(t(10)), Some("admin"))
        );
    }
    assert_eq!(status(rejected.id).await.status, EnrollmentStatus::Rejected);
    assert_eq!(status(other.id).await.status, EnrollmentStatus::Pending);
    let tokens = store.enrollment_tokens().await.unwrap();
    let revoked: Vec<_> = tokens
        .iter()
        .filter(|t| t.revoked_at.is_some())
        .map(|t| t.id.as_str())
        .collect();
    assert_eq!(revoked, ["e-r1"]);
    assert_eq!(
        store
            .use_enrollment_token("e-r1", &hash(7), r1, t(11))
            .await
            .unwrap(),
        TokenUse::Revoked
    );
    // Nothing moves a revoked request but its robot asking again.
    for to in [EnrollmentStatus::Approved, EnrollmentStatus::Issued] {
        assert_refused(store.decide_enrollment(issued.id, to, "bob", t(11)).await);
    }
    let back = note(store, r1, "sha256:k3", json!({}), "10.0.0.5", t(12)).await;
    assert_eq!(
        (back.id, back.status, back.decided_at),
        (issued.id, EnrollmentStatus::Pending, None)
    );
    assert_eq!(
        store.end_enrollments(r1, "admin", t(13)).await.unwrap(),
        EndedEnrollments {
            enrollments: 1,
            tokens: 0
        },
        "again: only what came back"
    );
}

/// Pending requests are capped in total and per address; a robot asking
/// about its own request is never refused; stale ones expire.
async fn check_pending_caps_and_expiry(store: Arc<dyn AuthStore>) {
    let store = store.as_ref();
    let caps = PendingLimits {
        total: 4,
        per_address: 2,
    };
    let id = json!({});
    let a = "10.0.0.5";
    let b = "10.0.0.6";
    let first = noted(store, robot(1), "sha256:k1", a, caps, t(1), &id).await;
    noted(store, robot(2), "sha256:k1", a, caps, t(2), &id).await;
    assert_eq!(
        try_note(store, robot(3), "sha256:k1", a, caps, t(3), &id).await,
        Noted::TooMany(PendingCap::PerAddress)
    );
    // Asking again about one's own request is fine, from any address.
    let again = noted(store, robot(1), "sha256:k1", b, caps, t(4), &id).await;
    assert_eq!((again.id, again.last_seen), (first.id, t(4)));
    // That request now counts for b: a has room for one more.
    noted(store, robot(3), "sha256:k1", a, caps, t(5), &id).await;
    noted(store, robot(4), "sha256:k1", b, caps, t(6), &id).await;
    assert_eq!(
        try_note(store, robot(5), "sha256:k1", "10.0.0.7", caps, t(7), &id).await,
        Noted::TooMany(PendingCap::Total)
    );
    assert_eq!(
        list(store, None).await.len(),
        4,
        "nothing stored when refused"
    );
    // A decided request frees its place.
    store
        .decide_enrollment(first.id, EnrollmentStatus::Rejected, "alice", t(8))
        .await
        .unwrap();
    noted(store, robot(5), "sha256:k1", "10.0.0.7", caps, t(9), &id).await;

    // Expiry: pending requests nobody asked about since `before`.
    assert_eq!(
        store.expire_enrollments(t(5)).await.unwrap(),
        1,
        "robot 2's"
    );
    let left: Vec<_> = list(store, None).await.iter().map(|e| e.robot_id).collect();
    assert_eq!(left, [robot(1), robot(3), robot(4), robot(5)]);
    assert_eq!(
        store.expire_enrollments(t(100)).await.unwrap(),
        3,
        "every pending one; the rejected one stays"
    );
    assert_eq!(
        list(store, None)
            .await
            .iter()
            .map(|e| e.status)
            .collect::<Vec<_>>(),
        [EnrollmentStatus::Rejected]
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
on_both_backends!(ending_enrollments, check_ending_enrollments);
on_both_backends!(pending_caps_and_expiry, check_pending_caps_and_expiry);

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
                note(
                    store.as_ref(),
                    robot(9),
                    "sha256:k9",
                    json!({ "n": n }),
                    "10.0.0.9",
                    t(n),
                )
                .await
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
            .use_enrollment_token("e-one", &hash(7), robot(1), t(1))
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
            tokio::spawn(async move {
                auth.use_enrollment_token("e-many", &hash(7), robot(1), t(1))
                    .await
            })
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
