//! The Redis cache and leases against a real Redis (`REDIS_URL`, by
//! default 127.0.0.1:6379); each test works under a prefix of its own.

use super::*;
use crate::domain::Health;
use chrono::Utc;
use rand::seq::SliceRandom;
use std::process::Stdio;
use uuid::Uuid;

fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_string())
}

fn unreachable(url: &str, e: &RedisError) -> String {
    format!(
        "these tests need a real Redis, and none answers at {url} ({e}). \
         Start one with `redis-server --daemonize yes --save '' --appendonly no` \
         (or `sudo systemctl start redis-server`), or set REDIS_URL."
    )
}

/// A test's key prefix; deletes every key under it when dropped, also
/// when the test panics.
struct TestKeys {
    url: String,
    prefix: String,
}

impl TestKeys {
    fn new() -> TestKeys {
        TestKeys {
            url: redis_url(),
            prefix: format!("kiwi-test-{}:", Uuid::new_v4()),
        }
    }
}

impl Drop for TestKeys {
    fn drop(&mut self) {
        let Ok(client) = Client::open(self.url.as_str()) else {
            return;
        };
        let Ok(mut c) = client.get_connection_with_timeout(Duration::from_secs(1)) else {
            return;
        };
        let pattern = format!("{}*", self.prefix);
        let mut cursor = 0u64;
        loop {
            let Ok((next, keys)) = ::redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(1000)
                .query::<(u64, Vec<String>)>(&mut c)
            else {
                return;
            };
            if !keys.is_empty() {
                let _ = ::redis::cmd("DEL").arg(&keys).query::<i64>(&mut c);
            }
            if next == 0 {
                return;
            }
            cursor = next;
        }
    }
}

async fn cache_with(keys: &TestKeys, ttls: CacheTtls) -> (RedisCache, Arc<Metrics>) {
    let metrics = Arc::new(Metrics::new());
    let cache = RedisCache::connect(&keys.url, &keys.prefix, ttls, metrics.clone())
        .await
        .unwrap_or_else(|e| panic!("{}", unreachable(&keys.url, &e)));
    (cache, metrics)
}

async fn leases(keys: &TestKeys) -> Leases {
    Leases::connect(&keys.url, &keys.prefix, Arc::new(Metrics::new()))
        .await
        .unwrap_or_else(|e| panic!("{}", unreachable(&keys.url, &e)))
}

fn robot(id: RobotId, version: i64, seq: i64) -> Robot {
    let at = Utc::now();
    Robot {
        robot_id: id,
        version,
        state: LifecycleState::Ready,
        health: Health::healthy(),
        hostname: "kiwi-7".into(),
        ip_address: Some("10.0.0.7".into()),
        robot_type: "lekiwi".into(),
        model: Some("LeKiwi v1".into()),
        firmware_version: Some("1.2.3".into()),
        agent_version: Some("0.1.0".into()),
        deployment_version: None,
        hardware_id: "pi:1000000012345678".into(),
        mac_addresses: vec!["dc:a6:32:00:00:07".into()],
        last_heartbeat: Some(at),
        last_state_change: at,
        failure_count: 0,
        config: serde_json::json!({"arm": {"speed": 3}}),
        capabilities: vec!["camera".into()],
        metadata: serde_json::json!({}),
        discovered_at: at,
        provisioned_at: None,
        activated_at: None,
        updated_at: at,
        last_report_seq: seq,
        last_report: None,
    }
}

fn new_id() -> RobotId {
    RobotId(Uuid::new_v4())
}

async fn raw<T: ::redis::FromRedisValue>(cache: &RedisCache, cmd: &::redis::Cmd) -> T {
    let mut m = cache.conn.manager.clone();
    cmd.query_async(&mut m).await.expect("raw Redis command")
}

#[tokio::test]
async fn put_then_get_round_trips_the_row_and_counts_hits_and_misses() {
    let keys = TestKeys::new();
    let (cache, metrics) = cache_with(&keys, CacheTtls::default()).await;
    let r = robot(new_id(), 3, 7);
    assert_eq!(cache.get(r.robot_id).await.unwrap(), None);
    assert!(cache.put(&r).await.unwrap());
    assert_eq!(cache.get(r.robot_id).await.unwrap(), Some(r.clone()));
    assert_eq!(metrics.cache_hits.get(), 1);
    assert_eq!(metrics.cache_misses.get(), 1);
    cache.ping().await.unwrap();
}

#[tokio::test]
async fn an_older_row_never_replaces_a_newer_one() {
    let keys = TestKeys::new();
    let (cache, _) = cache_with(&keys, CacheTtls::default()).await;
    let id = new_id();
    assert!(cache.put(&robot(id, 5, 10)).await.unwrap());
    // Older version, even with a higher report seq.
    assert!(!cache.put(&robot(id, 4, 99)).await.unwrap());
    // Same version, lower report seq.
    assert!(!cache.put(&robot(id, 5, 9)).await.unwrap());
    // Same freshness: nothing to write.
    assert!(!cache.put(&robot(id, 5, 10)).await.unwrap());
    let got = cache.get(id).await.unwrap().unwrap();
    assert_eq!((got.version, got.last_report_seq), (5, 10));
    // Newer by report seq alone, then by version.
    assert!(cache.put(&robot(id, 5, 11)).await.unwrap());
    assert!(cache.put(&robot(id, 6, 0)).await.unwrap());
    let got = cache.get(id).await.unwrap().unwrap();
    assert_eq!((got.version, got.last_report_seq), (6, 0));
    // Numbers beyond a Lua double's exact range compare exactly.
    let big = i64::MAX - 1;
    assert!(cache.put(&robot(id, big, 0)).await.unwrap());
    assert!(!cache.put(&robot(id, big - 1, 5)).await.unwrap());
    assert!(cache.put(&robot(id, big + 1, 0)).await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_leave_the_newest_version() {
    let keys = TestKeys::new();
    let (cache, _) = cache_with(&keys, CacheTtls::default()).await;
    let id = new_id();
    let mut writers = Vec::new();
    for _ in 0..20 {
        // Each writer has its own connection, as separate processes would.
        let (writer, _) = cache_with(&keys, CacheTtls::default()).await;
        let mut versions: Vec<i64> = (1..=50).collect();
        versions.shuffle(&mut rand::rng());
        writers.push(tokio::spawn(async move {
            let mut wrote = Vec::new();
            for v in versions {
                if writer.put(&robot(id, v, v)).await.unwrap() {
                    wrote.push(v);
                }
            }
            wrote
        }));
    }
    let mut wrote = Vec::new();
    for w in writers {
        wrote.extend(w.await.unwrap());
    }
    let got = cache.get(id).await.unwrap().unwrap();
    assert_eq!(got.version, 50);
    assert_eq!(wrote.iter().filter(|&&v| v == 50).count(), 1);
    // No version was written twice: each write was strictly newer.
    let mut sorted = wrote.clone();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(sorted.len(), wrote.len());
}

#[tokio::test]
async fn indexes_follow_a_robot_that_moves() {
    let keys = TestKeys::new();
    let (cache, _) = cache_with(&keys, CacheTtls::default()).await;
    let id = new_id();
    let other = new_id();
    let mut r = robot(id, 1, 0);
    assert!(cache.put(&r).await.unwrap());
    let mut o = robot(other, 1, 0);
    o.ip_address = Some("10.0.0.8".into());
    assert!(cache.put(&o).await.unwrap());
    assert_eq!(cache.id_by_ip("10.0.0.7").await.unwrap(), Some(id));
    let mut both = vec![id, other];
    both.sort_unstable();
    assert_eq!(
        cache.ids_by_state(LifecycleState::Ready).await.unwrap(),
        both
    );
    assert_eq!(cache.ids_by_type("lekiwi").await.unwrap(), both);

    r.version = 2;
    r.state = LifecycleState::Active;
    r.robot_type = "xlerobot".into();
    r.ip_address = Some("10.0.0.9".into());
    assert!(cache.put(&r).await.unwrap());
    assert_eq!(
        cache.ids_by_state(LifecycleState::Ready).await.unwrap(),
        vec![other]
    );
    assert_eq!(
        cache.ids_by_state(LifecycleState::Active).await.unwrap(),
        vec![id]
    );
    assert_eq!(cache.ids_by_type("lekiwi").await.unwrap(), vec![other]);
    assert_eq!(cache.ids_by_type("xlerobot").await.unwrap(), vec![id]);
    assert_eq!(cache.id_by_ip("10.0.0.7").await.unwrap(), None);
    assert_eq!(cache.id_by_ip("10.0.0.9").await.unwrap(), Some(id));

    // An older row does not move the indexes back.
    assert!(!cache.put(&robot(id, 1, 0)).await.unwrap());
    assert_eq!(
        cache.ids_by_state(LifecycleState::Active).await.unwrap(),
        vec![id]
    );

    // The other robot takes over an IP: our robot leaving it later must
    // not delete the other robot's entry.
    o.version = 2;
    o.ip_address = Some("10.0.0.9".into());
    assert!(cache.put(&o).await.unwrap());
    r.version = 3;
    r.ip_address = None;
    assert!(cache.put(&r).await.unwrap());
    assert_eq!(cache.id_by_ip("10.0.0.9").await.unwrap(), Some(other));

    // Losing the watermark (expired meta) still leaves exact sets.
    let _: i64 = raw(&cache, ::redis::cmd("DEL").arg(cache.conn.key("meta", id))).await;
    r.version = 4;
    r.state = LifecycleState::Maintenance;
    r.robot_type = "unknown".into();
    assert!(cache.put(&r).await.unwrap());
    assert!(
        cache
            .ids_by_state(LifecycleState::Active)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(cache.ids_by_type("xlerobot").await.unwrap().is_empty());
    assert_eq!(
        cache
            .ids_by_state(LifecycleState::Maintenance)
            .await
            .unwrap(),
        vec![id]
    );
    assert_eq!(cache.ids_by_type("unknown").await.unwrap(), vec![id]);
}

#[tokio::test]
async fn ttls_are_the_configured_ones() {
    let keys = TestKeys::new();
    let ttls = CacheTtls {
        static_ttl: Duration::from_secs(7200),
        dynamic_ttl: Duration::from_secs(120),
    };
    let (cache, _) = cache_with(&keys, ttls).await;
    let r = robot(new_id(), 1, 0);
    assert!(cache.put(&r).await.unwrap());
    let pttl =
        |kind: &str, name: String| ::redis::cmd("PTTL").arg(cache.conn.key(kind, name)).clone();
    let within = |ms: i64, ttl: Duration| {
        let ttl = i64::try_from(ttl.as_millis()).unwrap();
        ms > ttl - 5_000 && ms <= ttl
    };
    let id = r.robot_id.to_string();
    let row: i64 = raw(&cache, &pttl("robot", id.clone())).await;
    assert!(within(row, ttls.dynamic_ttl), "robot: {row} ms");
    for (kind, name) in [
        ("meta", id),
        ("ip", "10.0.0.7".to_string()),
        ("state", "ready".to_string()),
        ("type", "lekiwi".to_string()),
    ] {
        let ms: i64 = raw(&cache, &pttl(kind, name.clone())).await;
        assert!(within(ms, ttls.static_ttl), "{kind}:{name}: {ms} ms");
    }
}

#[tokio::test]
async fn a_corrupt_row_is_a_miss_and_is_deleted() {
    let keys = TestKeys::new();
    let (cache, metrics) = cache_with(&keys, CacheTtls::default()).await;
    let r = robot(new_id(), 2, 0);
    assert!(cache.put(&r).await.unwrap());
    let key = cache.conn.key("robot", r.robot_id);
    let _: () = raw(&cache, ::redis::cmd("SET").arg(&key).arg("{not json")).await;
    assert_eq!(cache.get(r.robot_id).await.unwrap(), None);
    assert_eq!(metrics.cache_misses.get(), 1);
    let exists: i64 = raw(&cache, ::redis::cmd("EXISTS").arg(&key)).await;
    assert_eq!(exists, 0);
    // The current row refills it; an older one still cannot.
    assert!(!cache.put(&robot(r.robot_id, 1, 0)).await.unwrap());
    assert!(cache.put(&r).await.unwrap());
    assert_eq!(cache.get(r.robot_id).await.unwrap(), Some(r.clone()));

    // A key of another type is corrupt too, for reads and for writes.
    let _: i64 = raw(&cache, ::redis::cmd("DEL").arg(&key)).await;
    let _: i64 = raw(&cache, ::redis::cmd("LPUSH").arg(&key).arg("x")).await;
    assert_eq!(cache.get(r.robot_id).await.unwrap(), None);
    let _: i64 = raw(&cache, ::redis::cmd("LPUSH").arg(&key).arg("x")).await;
    assert!(cache.put(&r).await.unwrap());
    assert_eq!(cache.get(r.robot_id).await.unwrap(), Some(r));
}

#[tokio::test]
async fn invalidate_keeps_the_watermark() {
    let keys = TestKeys::new();
    let (cache, _) = cache_with(&keys, CacheTtls::default()).await;
    let r = robot(new_id(), 4, 2);
    assert!(cache.put(&r).await.unwrap());
    cache.invalidate(r.robot_id).await.unwrap();
    assert_eq!(cache.get(r.robot_id).await.unwrap(), None);
    assert!(!cache.put(&robot(r.robot_id, 3, 9)).await.unwrap());
    assert_eq!(cache.get(r.robot_id).await.unwrap(), None);
    assert!(cache.put(&r).await.unwrap());
    assert_eq!(cache.get(r.robot_id).await.unwrap(), Some(r));
}

#[tokio::test]
async fn racing_holders_exactly_one_acquires() {
    let keys = TestKeys::new();
    let (a, b) = (leases(&keys).await, leases(&keys).await);
    let ttl = Duration::from_secs(10);
    let (la, lb) = tokio::join!(
        a.acquire("net:10.0.0.0/24", "ctl-a", ttl),
        b.acquire("net:10.0.0.0/24", "ctl-b", ttl)
    );
    let (la, lb) = (la.unwrap(), lb.unwrap());
    assert!(la.is_some() != lb.is_some(), "{la:?} {lb:?}");
    let winner = la.or(lb).unwrap();
    assert_eq!(winner.fence().resource, "net:10.0.0.0/24");
    assert_eq!(winner.fence().token, winner.token());
}

#[tokio::test]
async fn tokens_strictly_increase() {
    let keys = TestKeys::new();
    let l = leases(&keys).await;
    let mut last = 0;
    for i in 0..5 {
        let lease = l
            .acquire("sweep", &format!("ctl-{i}"), Duration::from_secs(5))
            .await
            .unwrap()
            .expect("free lease");
        assert!(lease.token() > last, "{} after {last}", lease.token());
        last = lease.token();
        assert!(l.release(lease).await.unwrap());
    }
}

#[tokio::test]
async fn an_expired_lease_cannot_be_renewed_and_the_next_token_is_higher() {
    let keys = TestKeys::new();
    let (a, b) = (leases(&keys).await, leases(&keys).await);
    let old = a
        .acquire("sweep", "ctl-a", Duration::from_secs(5))
        .await
        .unwrap()
        .unwrap();
    // It expires now: Redis expires a key whose expiry time has passed.
    let _: i64 = {
        let mut m = a.conn.manager.clone();
        ::redis::cmd("PEXPIREAT")
            .arg(a.conn.key("lease", "sweep"))
            .arg(1)
            .query_async(&mut m)
            .await
            .unwrap()
    };
    assert!(!a.renew(&old).await.unwrap());
    let new = b
        .acquire("sweep", "ctl-b", Duration::from_secs(5))
        .await
        .unwrap()
        .unwrap();
    assert!(new.token() > old.token());
    assert!(!a.renew(&old).await.unwrap());
    // A stale lease of the same holder cannot touch a newer acquisition.
    assert!(b.release(new.clone()).await.unwrap());
    let again = b
        .acquire("sweep", "ctl-b", Duration::from_secs(5))
        .await
        .unwrap()
        .unwrap();
    assert!(!b.renew(&new).await.unwrap());
    assert!(!b.release(new).await.unwrap());
    assert!(b.renew(&again).await.unwrap());
}

#[tokio::test]
async fn release_by_a_non_holder_does_nothing() {
    let keys = TestKeys::new();
    let (a, b) = (leases(&keys).await, leases(&keys).await);
    let held = a
        .acquire("sweep", "ctl-a", Duration::from_secs(5))
        .await
        .unwrap()
        .unwrap();
    assert!(
        b.acquire("sweep", "ctl-b", Duration::from_secs(5))
            .await
            .unwrap()
            .is_none()
    );
    let forged = Lease {
        holder: "ctl-b".into(),
        ..held.clone()
    };
    assert!(!b.release(forged).await.unwrap());
    assert!(a.renew(&held).await.unwrap());
    assert!(
        b.acquire("sweep", "ctl-b", Duration::from_secs(5))
            .await
            .unwrap()
            .is_none()
    );
}

#[tokio::test]
async fn holding_renews_and_reports_a_lost_lease() {
    let keys = TestKeys::new();
    let metrics = Arc::new(Metrics::new());
    let l = Leases::connect(&keys.url, &keys.prefix, metrics.clone())
        .await
        .unwrap_or_else(|e| panic!("{}", unreachable(&keys.url, &e)));
    let ttl = Duration::from_millis(900);
    let lease = l.acquire("sweep", "ctl-a", ttl).await.unwrap().unwrap();
    let stop = CancellationToken::new();
    let lost = l.hold(&lease, &stop);
    // Held past its ttl thanks to renewal: its time to live is put back up
    // three times (each renewal is read as a time to live longer than the
    // one read before), longer than the ttl alone would have lasted.
    let pttl = async || -> i64 {
        let mut m = l.conn.manager.clone();
        ::redis::cmd("PTTL")
            .arg(l.conn.key("lease", "sweep"))
            .query_async(&mut m)
            .await
            .unwrap()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let (mut renewals, mut last) = (0, pttl().await);
    while renewals < 3 {
        assert!(
            std::time::Instant::now() < deadline,
            "{renewals} renewals within 10 s"
        );
        let now = pttl().await;
        assert!(now > 0, "the lease expired while held ({now})");
        if now > last {
            renewals += 1;
        }
        last = now;
        // Polling pace (a renewal comes every third of the ttl).
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!lost.is_cancelled());
    assert!(l.acquire("sweep", "ctl-b", ttl).await.unwrap().is_none());
    // Someone deletes it (as an expiry would): the holder learns it.
    let _: i64 = {
        let mut m = l.conn.manager.clone();
        ::redis::cmd("DEL")
            .arg(l.conn.key("lease", "sweep"))
            .query_async(&mut m)
            .await
            .unwrap()
    };
    tokio::time::timeout(ttl, lost.cancelled())
        .await
        .expect("lost lease reported within its ttl");
    assert_eq!(metrics.leases_lost.get(), 1);

    // run_holding: completes and releases, or stops with LeaseLost.
    let lease = l.acquire("sweep", "ctl-a", ttl).await.unwrap().unwrap();
    assert_eq!(l.run_holding(lease, async { 7 }).await.unwrap(), 7);
    let lease = l.acquire("sweep", "ctl-a", ttl).await.unwrap().unwrap();
    let key = l.conn.key("lease", "sweep");
    let mut m = l.conn.manager.clone();
    // Gone before the work starts: the first renewal is refused.
    let _: i64 = ::redis::cmd("DEL")
        .arg(key)
        .query_async(&mut m)
        .await
        .unwrap();
    let err = l
        .run_holding(lease, std::future::pending::<()>())
        .await
        .unwrap_err();
    assert!(matches!(err, RedisError::LeaseLost { .. }), "{err}");
}

#[tokio::test]
async fn connecting_to_a_closed_port_fails_fast() {
    let started = std::time::Instant::now();
    let err = RedisCache::connect(
        "redis://127.0.0.1:1",
        "kiwi-test:",
        CacheTtls::default(),
        Arc::new(Metrics::new()),
    )
    .await
    .unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    assert!(err.to_string().contains("127.0.0.1:1"), "{err}");
    let err = Leases::connect(
        "redis://:secret@127.0.0.1:1",
        "x:",
        Arc::new(Metrics::new()),
    )
    .await
    .unwrap_err();
    assert!(!err.to_string().contains("secret"), "{err}");
}

#[tokio::test]
async fn a_server_that_never_answers_does_not_stall() {
    // Accepts connections and never writes a byte.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let silent = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    let started = std::time::Instant::now();
    let connected = RedisCache::connect(
        &format!("redis://{addr}"),
        "kiwi-test:",
        CacheTtls::default(),
        Arc::new(Metrics::new()),
    )
    .await;
    if let Ok(cache) = connected {
        assert!(cache.get(new_id()).await.is_err());
    }
    assert!(
        started.elapsed() < Duration::from_millis(1500),
        "{:?}",
        started.elapsed()
    );
    silent.abort();
}

/// A throwaway `redis-server` on a free port.
async fn start_redis(port: u16) -> tokio::process::Child {
    let child = tokio::process::Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn();
    match child {
        Ok(child) => child,
        Err(e) => panic!(
            "cannot start `redis-server` ({e}): install it (Debian/Ubuntu: \
             `apt-get install redis-server`) so this test can stop and restart one"
        ),
    }
}

#[tokio::test]
async fn a_dead_redis_fails_fast_and_the_cache_recovers() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let url = format!("redis://127.0.0.1:{port}");
    let metrics = Arc::new(Metrics::new());
    let mut server = start_redis(port).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    let cache = loop {
        match RedisCache::connect(&url, "kiwi-test:", CacheTtls::default(), metrics.clone()).await {
            Ok(cache) => break cache,
            Err(e) if Instant::now() > deadline => panic!("throwaway redis-server: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    let r = robot(new_id(), 1, 0);
    assert!(cache.put(&r).await.unwrap());
    assert_eq!(cache.get(r.robot_id).await.unwrap(), Some(r.clone()));

    server.kill().await.unwrap();
    for _ in 0..3 {
        let started = std::time::Instant::now();
        let err = cache.get(r.robot_id).await.unwrap_err();
        assert!(
            started.elapsed() <= OP_DEADLINE + Duration::from_millis(500),
            "{:?}: {err}",
            started.elapsed()
        );
        assert!(cache.ping().await.is_err());
    }
    assert!(metrics.redis_errors.get() >= 6);

    // Back again (empty): the same handle reconnects and refills.
    let _server = start_redis(port).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while cache.put(&r).await.is_err() {
        assert!(Instant::now() < deadline, "cache did not reconnect");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(cache.get(r.robot_id).await.unwrap(), Some(r));
}
