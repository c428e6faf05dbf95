//! Redis in front of the store, with the controller built in-process:
//! reads go through it, a dead Redis costs no API error (reads fall back,
//! `/readyz` says degraded), and when it returns it is refilled before it is
//! read again, so it never serves a row older than one already
//! acknowledged. Uses a throwaway `redis-server` ([`RedisServer`]) so the
//! test can freeze, kill and restart it.

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use kiwi_controller::config::Config;
use kiwi_controller::domain::decide::CommandIntent;
use kiwi_controller::domain::event::IdentityFacts;
use kiwi_controller::domain::{Action, Input};
use kiwi_controller::fleet::Context;
use kiwi_controller::security::tokens::create_api_token;
use kiwi_controller::serve::Components;
use kiwi_controller::store::auth::Role;
use kiwi_protocol::{HardwareId, RobotId};
use kiwi_tests::RedisServer;
use serde_json::Value;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

/// A viewer token of `c`, made in its store as `token create` would.
async fn viewer_token(c: &Components) -> String {
    let (token, _) = create_api_token(c.store.auth().as_ref(), Role::Viewer, "redis tier", None)
        .await
        .expect("a viewer token");
    token.to_string()
}

async fn get(c: &Components, uri: &str) -> (StatusCode, Value) {
    // A token per request: tests share no state, and making one is a
    // store write that touches no robot.
    let token = viewer_token(c).await;
    let resp = c
        .api_router()
        .oneshot(
            Request::get(uri)
                .header("authorization", format!("Bearer {token}"))
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    let status = resp.status();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

fn metric(c: &Components, name: &str) -> f64 {
    c.metrics
        .encode()
        .lines()
        .find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok()))
        .unwrap_or(0.0)
}

async fn wait_for(what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A controller's components on the embedded store in `state_dir`, with
/// `redis` in front of it under a key prefix of their own.
async fn with_redis(redis: &RedisServer, state_dir: &std::path::Path) -> Components {
    let config = Config {
        state_dir: state_dir.to_path_buf(),
        auto_provision: false,
        discovery_interval: Duration::ZERO,
        redis_url: Some(redis.url()),
        redis_prefix: format!("kiwi-test-{}:", uuid::Uuid::new_v4().simple()),
        ..Config::default()
    };
    Components::build(config, CancellationToken::new())
        .await
        .unwrap()
}

#[tokio::test]
async fn redis_outage_costs_no_error_and_never_serves_stale_rows() {
    let mut redis = RedisServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let c = with_redis(&redis, dir.path()).await;
    let id = RobotId::from_hardware(&HardwareId::Configured("redis-tier".into()));
    let apply = async |input| {
        c.fleet
            .apply(id, input, &Context::new("test"))
            .await
            .unwrap();
    };
    apply(Input::AgentConnected {
        facts: IdentityFacts {
            hostname: "r".into(),
            ip_address: Some("127.0.0.1".into()),
            robot_type: "lekiwi".into(),
            model: None,
            firmware_version: None,
            agent_version: None,
            hardware_id: "configured:redis-tier".into(),
            mac_addresses: vec![],
        },
    })
    .await;
    apply(Input::Operator(Action::Provision)).await;
    apply(Input::CommandAnswered {
        command: CommandIntent::Provision,
        error: None,
    })
    .await;
    let uri = format!("/api/v2/robots/{id}");

    wait_for("Redis up", async || {
        c.shared_cache.as_ref().unwrap().is_up()
    })
    .await;
    let hits = metric(&c, "cache_hits_total");
    let (status, body) = get(&c, &uri).await;
    assert_eq!(
        (status, body["state"].as_str()),
        (StatusCode::OK, Some("ready"))
    );
    assert!(
        metric(&c, "cache_hits_total") > hits,
        "the read was served by Redis"
    );

    redis.pause();
    // Reads keep working during the outage, and so do writes.
    for _ in 0..5 {
        let (status, _) = get(&c, &uri).await;
        assert_eq!(status, StatusCode::OK);
    }
    apply(Input::Operator(Action::Activate {
        deployment_version: None,
    }))
    .await;
    let (status, body) = get(&c, &uri).await;
    assert_eq!(
        (status, body["state"].as_str()),
        (StatusCode::OK, Some("active"))
    );
    let (status, ready) = get(&c, "/readyz").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(ready["status"], "degraded");

    // Redis comes back still holding the row that says "ready": it must be
    // refilled before it is read again.
    redis.resume();
    wait_for("Redis refilled", async || {
        c.shared_cache.as_ref().unwrap().is_up()
    })
    .await;
    let hits = metric(&c, "cache_hits_total");
    let (_, body) = get(&c, &uri).await;
    assert_eq!(body["state"], "active");
    assert!(metric(&c, "cache_hits_total") > hits, "hits resumed");
    let (_, ready) = get(&c, "/readyz").await;
    assert_eq!(ready["status"], "ready");

    // And a Redis that died and came back empty is filled again too.
    redis.kill();
    let (status, _) = get(&c, &uri).await;
    assert_eq!(status, StatusCode::OK);
    redis.start_again().await;
    wait_for("Redis refilled after a restart", async || {
        c.shared_cache.as_ref().unwrap().is_up()
    })
    .await;
    let (_, body) = get(&c, &uri).await;
    assert_eq!(body["state"], "active");
}

/// Robots in the read model of the stalling-refill test: far more than the
/// refill puts back between two stalls.
const STALLED_REFILL_ROBOTS: usize = 600;

/// How long Redis stalls writes, and how often: a put that meets the
/// start of a stall times out (`RESPONSE_TIMEOUT`, 250 ms).
const STALL: Duration = Duration::from_millis(350);
const STALL_EVERY: Duration = Duration::from_millis(400);

/// A busy Redis (every write stalled past the response timeout again and
/// again) does not keep the tier from coming back: a refill carries on past
/// the puts that timed out, and a repair puts them again, instead of
/// starting over.
#[tokio::test]
async fn a_refill_completes_while_redis_keeps_stalling_writes() {
    let mut redis = RedisServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let c = with_redis(&redis, dir.path()).await;
    let shared = c.shared_cache.as_ref().unwrap().clone();
    for i in 0..STALLED_REFILL_ROBOTS {
        let hardware_id = format!("stalled-{i}");
        let id = RobotId::from_hardware(&HardwareId::Configured(hardware_id.clone()));
        let facts = IdentityFacts {
            hostname: hardware_id.clone(),
            ip_address: None,
            robot_type: "lekiwi".into(),
            model: None,
            firmware_version: None,
            agent_version: None,
            hardware_id: format!("configured:{hardware_id}"),
            mac_addresses: vec![],
        };
        c.fleet
            .apply(id, Input::AgentConnected { facts }, &Context::new("test"))
            .await
            .unwrap();
    }
    wait_for("Redis up", async || shared.is_up()).await;

    // Redis comes back empty, and from then on writes stall for 350 ms
    // (longer than the response timeout) of every 400 ms.
    redis.kill();
    let first = RobotId::from_hardware(&HardwareId::Configured("stalled-0".into()));
    let (status, _) = get(&c, &format!("/api/v2/robots/{first}")).await;
    assert_eq!(status, StatusCode::OK);
    assert!(!shared.is_up(), "a read noticed that Redis is gone");
    redis.start_again().await;
    let client = ::redis::Client::open(redis.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let mut stalls = 0;
    let mut synced_while_stalling = false;
    // Bounded: at most 50 stalls (20 s).
    while stalls < 50 {
        ::redis::cmd("CLIENT")
            .arg("PAUSE")
            .arg(STALL.as_millis() as u64)
            .arg("WRITE")
            .query_async::<()>(&mut conn)
            .await
            .unwrap();
        stalls += 1;
        tokio::time::sleep(STALL_EVERY).await;
        if shared.is_up() && shared.unsynced_robots() == 0 {
            synced_while_stalling = true;
            break;
        }
    }
    assert!(
        synced_while_stalling,
        "the cache was not refilled and repaired within {stalls} stalls of {STALL:?} every \
         {STALL_EVERY:?} (status {}, {} robots unsynced)",
        shared.status(),
        shared.unsynced_robots()
    );
    eprintln!("refilled {STALLED_REFILL_ROBOTS} robots after {stalls} stalls");
    // Every robot is in Redis again, with its row as the store has it.
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    for i in [0, STALLED_REFILL_ROBOTS / 2, STALLED_REFILL_ROBOTS - 1] {
        let id = RobotId::from_hardware(&HardwareId::Configured(format!("stalled-{i}")));
        let (status, body) = get(&c, &format!("/api/v2/robots/{id}")).await;
        assert_eq!(
            (status, body["hostname"].as_str()),
            (StatusCode::OK, Some(format!("stalled-{i}").as_str()))
        );
    }
    let keys: Vec<String> = ::redis::cmd("KEYS")
        .arg(format!("{}robot:*", c.config.redis_prefix))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(
        keys.len(),
        STALLED_REFILL_ROBOTS,
        "every robot's row is in Redis"
    );
}

/// A source that finds nothing; held, it says when a round has reached it
/// and finishes only once let go, so the lease can change hands meanwhile.
#[derive(Debug, Clone, Default)]
struct Held {
    gate: Option<Arc<Gate>>,
}

#[derive(Debug, Default)]
struct Gate {
    reached: tokio::sync::Notify,
    go: tokio::sync::Notify,
}

#[async_trait::async_trait]
impl kiwi_controller::discovery::DiscoverySource for Held {
    fn method(&self) -> &'static str {
        "held"
    }
    async fn discover(&self) -> Result<Vec<kiwi_controller::discovery::Sighting>, String> {
        if let Some(gate) = &self.gate {
            gate.reached.notify_one();
            gate.go.notified().await;
        }
        Ok(Vec::new())
    }
}

#[tokio::test]
async fn only_the_lease_holder_records_a_discovery_round() {
    use kiwi_controller::cache::redis::Leases;
    use kiwi_controller::discovery::{DISCOVERY_LEASE, Discovery, Round};
    use kiwi_controller::store::{DiscoverySession, StoreError};

    let redis = RedisServer::start().await;
    let url = redis.url();
    let prefix = format!("kiwi-test-{}:", uuid::Uuid::new_v4().simple());
    let dir = tempfile::tempdir().unwrap();
    let config = Config {
        state_dir: dir.path().to_path_buf(),
        discovery_interval: Duration::ZERO,
        ..Config::default()
    };
    let c = Components::build(config, CancellationToken::new())
        .await
        .unwrap();
    let leases = Leases::connect(&url, &prefix, c.metrics.clone())
        .await
        .unwrap();
    let discovery = |source: Held| {
        Discovery::new(
            c.fleet.clone(),
            c.store.clone(),
            c.cache.clone(),
            c.metrics.clone(),
            vec![Box::new(source)],
        )
        .with_leases(leases.clone(), "this-controller".into())
    };

    // Another controller holds the lease: this one does not run the round.
    let other = leases
        .acquire(DISCOVERY_LEASE, "other-controller", Duration::from_secs(5))
        .await
        .unwrap()
        .expect("free lease");
    assert!(matches!(
        discovery(Held::default()).round().await,
        Ok(Round::HeldElsewhere)
    ));
    leases.release(other).await.unwrap();
    assert!(matches!(
        discovery(Held::default()).round().await,
        Ok(Round::Done(_))
    ));

    // This controller's lease is lost mid-round and another controller
    // takes it and records: the late results are refused by the store.
    let gate = Arc::new(Gate::default());
    let held = discovery(Held {
        gate: Some(gate.clone()),
    });
    let round = tokio::spawn(async move { held.round().await });
    // The round holds the lease and runs its source.
    gate.reached.notified().await;
    let status = std::process::Command::new("redis-cli")
        .args([
            "-p",
            &redis.port().to_string(),
            "DEL",
            &format!("{prefix}lease:{DISCOVERY_LEASE}"),
        ])
        .status()
        .unwrap();
    assert!(status.success());
    let thief = leases
        .acquire(DISCOVERY_LEASE, "other-controller", Duration::from_secs(5))
        .await
        .unwrap()
        .expect("the lease was freed");
    let now = chrono::Utc::now();
    let session = DiscoverySession {
        session_id: uuid::Uuid::new_v4(),
        methods: vec!["other".into()],
        started_at: now,
        finished_at: now,
        duration_ms: 0,
        robots_found: 0,
        new_robots: 0,
        results: Vec::new(),
    };
    c.store
        .record_discovery(&session, Some(&thief.fence()))
        .await
        .unwrap();
    // The source finishes now, late.
    gate.go.notify_one();
    match round.await.unwrap() {
        Err(kiwi_controller::discovery::DiscoveryError::Store(StoreError::Fenced { .. }))
        | Err(kiwi_controller::discovery::DiscoveryError::LeaseLost) => {}
        other => panic!("a controller that lost its lease recorded anyway: {other:?}"),
    }
}
