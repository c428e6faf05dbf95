//! The shared Redis layer: a multi-index cache of read-model rows in front of
//! the store, and leases with fencing tokens for work that only one
//! controller may do at a time (a sweep of a network).
//!
//! Keys, all under the configured prefix:
//!
//! | key              | value                                        | TTL     |
//! |------------------|----------------------------------------------|---------|
//! | `robot:{id}`     | the row's JSON                               | dynamic |
//! | `meta:{id}`      | hash: `v`, `s` (freshness), `state`, `type`, `ip` | static  |
//! | `ip:{ip}`        | robot id                                     | static  |
//! | `state:{state}`  | set of robot ids                             | static  |
//! | `type:{type}`    | set of robot ids                             | static  |
//! | `types`          | set of every `type:` set in use              | static  |
//! | `lease:{res}`    | `{token}#{holder}`                           | lease   |
//! | `fence:{res}`    | the last fencing token handed out            | none    |
//!
//! Invariants:
//!
//! - **Coherence.** Every write of a row is one Lua script that compares the
//!   stored freshness `(version, last_report_seq)` with the new row's, so an
//!   older row never replaces a newer one, whatever the number of writers and
//!   processes. The freshness lives in `meta:{id}`, which outlives the row
//!   (static TTL), so a late writer cannot resurrect an old row after the
//!   row expired or was invalidated either.
//! - **Exact indexes.** The same script moves the id between `state:` and
//!   `type:` sets and `ip:` keys, so while a robot's `meta:` is alive an id is
//!   in exactly one state set and one type set. The index keys expire with
//!   the static TTL; readers treat an id without a row as a miss and go to
//!   the store.
//! - **Bounded waits.** Every operation has a deadline ([`OP_DEADLINE`]); a
//!   dead Redis costs a request at most that, and the connection manager
//!   reconnects by itself when Redis returns.
//! - **Fencing tokens only grow**, even across a Redis restart that lost the
//!   data: a new token is at least the server's clock in milliseconds.
//!
//! The scripts touch keys they compute from stored values, so this layer
//! needs a standalone Redis (not a cluster).

use crate::domain::{LifecycleState, Robot};
use crate::metrics::Metrics;
use crate::store::Fence;
use ::redis::aio::{ConnectionManager, ConnectionManagerConfig};
use ::redis::{Client, Script};
use kiwi_protocol::RobotId;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// How long one request to Redis may wait for its answer.
pub const RESPONSE_TIMEOUT: Duration = Duration::from_millis(250);
/// How long one attempt to (re)connect to Redis may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_millis(250);
/// The most any one operation of this module waits, reconnect included.
pub const OP_DEADLINE: Duration = Duration::from_millis(500);

/// Time to live of cached data: identity and indexes change rarely, the
/// row (health, last report) often.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheTtls {
    /// `ip:`, `state:`, `type:` and `meta:` keys (original design: 3600 s).
    pub static_ttl: Duration,
    /// `robot:` rows (original design: 300 s).
    pub dynamic_ttl: Duration,
}

impl Default for CacheTtls {
    fn default() -> Self {
        CacheTtls {
            static_ttl: Duration::from_secs(3600),
            dynamic_ttl: Duration::from_secs(300),
        }
    }
}

/// What went wrong talking to Redis. The messages name the operation and
/// carry the client's cause.
#[derive(Debug, thiserror::Error)]
pub enum RedisError {
    #[error("invalid Redis URL {url}: {cause}")]
    InvalidUrl {
        url: String,
        cause: ::redis::RedisError,
    },
    #[error("cannot connect to Redis at {url}: {cause}")]
    Connect {
        url: String,
        cause: ::redis::RedisError,
    },
    #[error("cannot connect to Redis at {url}: no answer within {after:?}")]
    ConnectTimeout { url: String, after: Duration },
    #[error("Redis {op} failed: {cause}")]
    Command {
        op: &'static str,
        cause: ::redis::RedisError,
    },
    #[error("Redis {op} got no answer within {after:?}")]
    Timeout { op: &'static str, after: Duration },
    #[error("cannot encode robot {robot_id} for Redis: {cause}")]
    Encode {
        robot_id: RobotId,
        cause: serde_json::Error,
    },
    /// The lease's renewal was refused or could not be confirmed before it
    /// expired: another controller may hold it now.
    #[error("lease on {resource} was lost while held")]
    LeaseLost { resource: String },
}

impl RedisError {
    /// An answer that did not come in time: Redis (or this process) is
    /// slow, which says nothing about what Redis holds. Any other failure
    /// means the connection broke or Redis refused, and Redis may have
    /// restarted meanwhile.
    pub fn is_timeout(&self) -> bool {
        match self {
            RedisError::Timeout { .. } | RedisError::ConnectTimeout { .. } => true,
            RedisError::Command { cause, .. } | RedisError::Connect { cause, .. } => {
                cause.is_timeout()
            }
            _ => false,
        }
    }
}

/// The URL without its password, for messages.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme + 3 => {
            format!("{}***{}", &url[..scheme + 3], &url[at..])
        }
        _ => url.to_string(),
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

/// One connection (multiplexed, self-reconnecting) and the key prefix,
/// shared by the cache and the leases.
#[derive(Debug, Clone)]
struct Conn {
    manager: ConnectionManager,
    prefix: Arc<str>,
    metrics: Arc<Metrics>,
}

impl Conn {
    fn config() -> ConnectionManagerConfig {
        // No retry loop inside the manager: a failed reconnect fails the
        // waiting request at once, and the next request starts a new attempt.
        ConnectionManagerConfig::new()
            .set_response_timeout(Some(RESPONSE_TIMEOUT))
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_number_of_retries(0)
    }

    fn client(url: &str) -> Result<Client, RedisError> {
        Client::open(url).map_err(|cause| RedisError::InvalidUrl {
            url: redact(url),
            cause,
        })
    }

    async fn connect(url: &str, prefix: &str, metrics: Arc<Metrics>) -> Result<Conn, RedisError> {
        let client = Self::client(url)?;
        let manager = tokio::time::timeout(
            OP_DEADLINE,
            ConnectionManager::new_with_config(client, Self::config()),
        )
        .await
        .map_err(|_| RedisError::ConnectTimeout {
            url: redact(url),
            after: OP_DEADLINE,
        })?
        .map_err(|cause| RedisError::Connect {
            url: redact(url),
            cause,
        })?;
        Ok(Conn {
            manager,
            prefix: prefix.into(),
            metrics,
        })
    }

    fn lazy(url: &str, prefix: &str, metrics: Arc<Metrics>) -> Result<Conn, RedisError> {
        let manager = ConnectionManager::new_lazy_with_config(Self::client(url)?, Self::config())
            .map_err(|cause| RedisError::Connect {
            url: redact(url),
            cause,
        })?;
        Ok(Conn {
            manager,
            prefix: prefix.into(),
            metrics,
        })
    }

    fn key(&self, kind: &str, name: impl std::fmt::Display) -> String {
        format!("{}{kind}:{name}", self.prefix)
    }

    /// Runs one request under [`OP_DEADLINE`], counting failures.
    async fn run<T>(
        &self,
        op: &'static str,
        request: impl Future<Output = ::redis::RedisResult<T>>,
    ) -> Result<T, RedisError> {
        let result = match tokio::time::timeout(OP_DEADLINE, request).await {
            Ok(Ok(value)) => return Ok(value),
            Ok(Err(cause)) => RedisError::Command { op, cause },
            Err(_) => RedisError::Timeout {
                op,
                after: OP_DEADLINE,
            },
        };
        self.metrics.redis_errors.inc();
        Err(result)
    }

    async fn query<T: ::redis::FromRedisValue>(
        &self,
        op: &'static str,
        cmd: &::redis::Cmd,
    ) -> Result<T, RedisError> {
        let mut m = self.manager.clone();
        self.run(op, cmd.query_async(&mut m)).await
    }

    async fn ping(&self) -> Result<(), RedisError> {
        let pong: String = self.query("PING", &::redis::cmd("PING")).await?;
        debug_assert_eq!(pong, "PONG");
        Ok(())
    }
}

/// Writes a row if it is newer than the stored one, and moves the indexes.
///
/// KEYS: row, meta. ARGV: prefix, id, version, seq, json, state, type, ip
/// (empty: none), dynamic TTL ms, static TTL ms, meta TTL ms, then every
/// lifecycle state. Returns 1 if it wrote, 0 if the stored row is as new.
const PUT_SCRIPT: &str = r#"
-- Compares two canonical decimal integers exactly (no float rounding).
local function cmp(a, b)
  local na, nb = a:sub(1, 1) == '-', b:sub(1, 1) == '-'
  if na ~= nb then
    if na then return -1 else return 1 end
  end
  if na then a, b = b:sub(2), a:sub(2) end
  if #a ~= #b then
    if #a < #b then return -1 else return 1 end
  end
  if a == b then return 0 end
  if a < b then return -1 else return 1 end
end
local function int(x) return x and string.match(x, '^%-?%d+$') ~= nil end

local row, meta = KEYS[1], KEYS[2]
local prefix, id, v, s, json = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local state, rtype, ip = ARGV[6], ARGV[7], ARGV[8]
local dyn, stat, meta_ttl = ARGV[9], ARGV[10], ARGV[11]

-- A key of the wrong type was not written by us: drop it.
local mt = redis.call('TYPE', meta).ok
if mt ~= 'hash' and mt ~= 'none' then redis.call('DEL', meta) end
local rt = redis.call('TYPE', row).ok
if rt ~= 'string' and rt ~= 'none' then redis.call('DEL', row) end

local old = redis.call('HMGET', meta, 'v', 's', 'state', 'type', 'ip')
if int(old[1]) and int(old[2]) and old[3] and old[4] and old[5] then
  local c = cmp(old[1], v)
  if c == 0 then c = cmp(old[2], s) end
  -- Older: refuse. As new: refuse unless the row itself is gone (expired
  -- or invalidated), which this refills.
  if c > 0 then return 0 end
  if c == 0 and redis.call('EXISTS', row) == 1 then return 0 end
  if old[3] ~= state then redis.call('SREM', prefix .. 'state:' .. old[3], id) end
  if old[4] ~= rtype then redis.call('SREM', prefix .. 'type:' .. old[4], id) end
  if old[5] ~= '' and old[5] ~= ip then
    local ipkey = prefix .. 'ip:' .. old[5]
    if redis.call('GET', ipkey) == id then redis.call('DEL', ipkey) end
  end
else
  -- No usable watermark: the id may linger in any set a set refreshed by
  -- other robots kept alive. Remove it from all of them.
  for i = 12, #ARGV do
    if ARGV[i] ~= state then redis.call('SREM', prefix .. 'state:' .. ARGV[i], id) end
  end
  for _, t in ipairs(redis.call('SMEMBERS', prefix .. 'types')) do
    if t ~= rtype then redis.call('SREM', prefix .. 'type:' .. t, id) end
  end
end

redis.call('SET', row, json, 'PX', dyn)
redis.call('HSET', meta, 'v', v, 's', s, 'state', state, 'type', rtype, 'ip', ip)
redis.call('PEXPIRE', meta, meta_ttl)
local sk = prefix .. 'state:' .. state
redis.call('SADD', sk, id)
redis.call('PEXPIRE', sk, stat)
local tk = prefix .. 'type:' .. rtype
redis.call('SADD', tk, id)
redis.call('PEXPIRE', tk, stat)
redis.call('SADD', prefix .. 'types', rtype)
redis.call('PEXPIRE', prefix .. 'types', stat)
if ip ~= '' then redis.call('SET', prefix .. 'ip:' .. ip, id, 'PX', stat) end
return 1
"#;

/// The Redis cache of read-model rows. Cheap to clone; all clones share one
/// connection.
#[derive(Debug, Clone)]
pub struct RedisCache {
    conn: Conn,
    ttls: CacheTtls,
    put: Arc<Script>,
}

impl RedisCache {
    /// Connects to `url` (e.g. `redis://127.0.0.1:6379/0`) and fails fast,
    /// within [`OP_DEADLINE`], when Redis does not answer.
    pub async fn connect(
        url: &str,
        prefix: &str,
        ttls: CacheTtls,
        metrics: Arc<Metrics>,
    ) -> Result<RedisCache, RedisError> {
        Ok(Self::with(Conn::connect(url, prefix, metrics).await?, ttls))
    }

    /// Like [`connect`](Self::connect) but without connecting yet: the
    /// first operation connects, so a controller started while Redis is
    /// down uses it once it is up. Fails only on an invalid URL. Needs a
    /// Tokio runtime.
    pub fn connect_lazy(
        url: &str,
        prefix: &str,
        ttls: CacheTtls,
        metrics: Arc<Metrics>,
    ) -> Result<RedisCache, RedisError> {
        Ok(Self::with(Conn::lazy(url, prefix, metrics)?, ttls))
    }

    fn with(conn: Conn, ttls: CacheTtls) -> RedisCache {
        RedisCache {
            conn,
            ttls,
            put: Arc::new(Script::new(PUT_SCRIPT)),
        }
    }

    /// Leases on the same connection and prefix.
    pub fn leases(&self) -> Leases {
        Leases::with(self.conn.clone())
    }

    pub fn ttls(&self) -> CacheTtls {
        self.ttls
    }

    /// Stores `robot` unless Redis holds a row at least as new (by version,
    /// then report sequence), and moves it in the indexes. Returns whether
    /// it wrote. Atomic on the server.
    pub async fn put(&self, robot: &Robot) -> Result<bool, RedisError> {
        let json = serde_json::to_string(robot).map_err(|cause| RedisError::Encode {
            robot_id: robot.robot_id,
            cause,
        })?;
        let id = robot.robot_id.to_string();
        let static_ms = millis(self.ttls.static_ttl);
        let dynamic_ms = millis(self.ttls.dynamic_ttl);
        let mut invocation = self.put.prepare_invoke();
        invocation
            .key(self.conn.key("robot", &id))
            .key(self.conn.key("meta", &id))
            .arg(&*self.conn.prefix)
            .arg(&id)
            .arg(robot.version)
            .arg(robot.last_report_seq)
            .arg(json)
            .arg(robot.state.as_str())
            .arg(&robot.robot_type)
            .arg(robot.ip_address.as_deref().unwrap_or(""))
            .arg(dynamic_ms)
            .arg(static_ms)
            // The watermark must outlive the row it guards.
            .arg(static_ms.max(dynamic_ms));
        for state in LifecycleState::ALL {
            invocation.arg(state.as_str());
        }
        let mut m = self.conn.manager.clone();
        let wrote: i64 = self
            .conn
            .run("put", invocation.invoke_async(&mut m))
            .await?;
        Ok(wrote == 1)
    }

    /// One robot's row, counting a cache hit or miss. A row that does not
    /// decode is deleted and counted as a miss.
    pub async fn get(&self, id: RobotId) -> Result<Option<Robot>, RedisError> {
        let key = self.conn.key("robot", id);
        let mut m = self.conn.manager.clone();
        let reply = tokio::time::timeout(
            OP_DEADLINE,
            ::redis::cmd("GET")
                .arg(&key)
                .query_async::<Option<Vec<u8>>>(&mut m),
        )
        .await;
        let bytes = match reply {
            Ok(Ok(bytes)) => bytes,
            // Something else wrote a non-string under our key: corrupt.
            Ok(Err(cause)) if cause.code() == Some("WRONGTYPE") => {
                self.drop_corrupt(id, &key, "wrong key type").await;
                return Ok(None);
            }
            Ok(Err(cause)) => {
                self.conn.metrics.redis_errors.inc();
                return Err(RedisError::Command { op: "get", cause });
            }
            Err(_) => {
                self.conn.metrics.redis_errors.inc();
                return Err(RedisError::Timeout {
                    op: "get",
                    after: OP_DEADLINE,
                });
            }
        };
        let Some(bytes) = bytes else {
            self.conn.metrics.cache_misses.inc();
            return Ok(None);
        };
        match serde_json::from_slice::<Robot>(&bytes) {
            Ok(robot) => {
                self.conn.metrics.cache_hits.inc();
                Ok(Some(robot))
            }
            Err(e) => {
                self.drop_corrupt(id, &key, &e.to_string()).await;
                Ok(None)
            }
        }
    }

    /// Deletes an undecodable row (its watermark stays, so the next put of
    /// the current row refills it) and counts the read as a miss.
    async fn drop_corrupt(&self, id: RobotId, key: &str, why: &str) {
        tracing::warn!(robot_id = %id, error = why, "corrupt robot row in Redis, deleting it");
        self.conn.metrics.cache_misses.inc();
        if let Err(e) = self
            .conn
            .query::<i64>("delete corrupt row", ::redis::cmd("DEL").arg(key))
            .await
        {
            tracing::warn!(robot_id = %id, error = %e, "cannot delete corrupt robot row");
        }
    }

    /// The robot last stored with this IP address.
    pub async fn id_by_ip(&self, ip: &str) -> Result<Option<RobotId>, RedisError> {
        let value: Option<String> = self
            .conn
            .query("id_by_ip", ::redis::cmd("GET").arg(self.conn.key("ip", ip)))
            .await?;
        Ok(value.and_then(|v| v.parse().ok()))
    }

    /// Ids of robots in `state`, sorted.
    pub async fn ids_by_state(&self, state: LifecycleState) -> Result<Vec<RobotId>, RedisError> {
        self.members("ids_by_state", self.conn.key("state", state.as_str()))
            .await
    }

    /// Ids of robots of `robot_type`, sorted.
    pub async fn ids_by_type(&self, robot_type: &str) -> Result<Vec<RobotId>, RedisError> {
        self.members("ids_by_type", self.conn.key("type", robot_type))
            .await
    }

    async fn members(&self, op: &'static str, key: String) -> Result<Vec<RobotId>, RedisError> {
        let members: Vec<String> = self
            .conn
            .query(op, ::redis::cmd("SMEMBERS").arg(key))
            .await?;
        let mut ids: Vec<RobotId> = members.iter().filter_map(|m| m.parse().ok()).collect();
        ids.sort_unstable();
        Ok(ids)
    }

    /// Removes the robot's row so the next read goes to the store. Its
    /// freshness watermark and index entries stay: a late writer still
    /// cannot put back an older row, and a put of the current row refills.
    pub async fn invalidate(&self, id: RobotId) -> Result<(), RedisError> {
        let _: i64 = self
            .conn
            .query(
                "invalidate",
                ::redis::cmd("DEL").arg(self.conn.key("robot", id)),
            )
            .await?;
        Ok(())
    }

    /// Whether Redis answers (for `/readyz`).
    pub async fn ping(&self) -> Result<(), RedisError> {
        self.conn.ping().await
    }
}

/// Takes a lease if free and hands out the next fencing token.
/// KEYS: lease, fence. ARGV: holder, ttl ms. Returns the token or nil.
const ACQUIRE_SCRIPT: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 1 then return false end
-- At least the server clock in ms, so tokens keep growing even if Redis
-- restarted without its data (the store remembers the highest token).
local now = redis.call('TIME')
local floor = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local last = tonumber(redis.call('GET', KEYS[2]) or '0') or 0
local token = math.max(last + 1, floor)
redis.call('SET', KEYS[2], string.format('%d', token))
redis.call('SET', KEYS[1], string.format('%d', token) .. '#' .. ARGV[1], 'PX', ARGV[2])
return token
"#;

/// Extends a lease still held by this acquisition. KEYS: lease.
/// ARGV: value, ttl ms. Returns 1 or 0.
const RENEW_SCRIPT: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"#;

/// Frees a lease still held by this acquisition. KEYS: lease. ARGV: value.
const RELEASE_SCRIPT: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"#;

/// A held lease: the right to do the work named `resource` until it expires,
/// proved to the store by its fencing token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    resource: String,
    holder: String,
    /// Strictly greater than every token handed out before for `resource`.
    token: u64,
    ttl: Duration,
    /// When the acquire request was sent: the lease expires no earlier than
    /// `acquired_at + ttl` unless renewed.
    acquired_at: Instant,
}

impl Lease {
    pub fn resource(&self) -> &str {
        &self.resource
    }

    pub fn holder(&self) -> &str {
        &self.holder
    }

    pub fn token(&self) -> u64 {
        self.token
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// The proof the store checks before recording this work's results.
    pub fn fence(&self) -> Fence {
        Fence {
            resource: self.resource.clone(),
            token: self.token,
        }
    }

    /// What the lease key holds while this acquisition holds it: the token
    /// makes a stale `Lease` of the same holder unable to renew a newer one.
    fn value(&self) -> String {
        format!("{}#{}", self.token, self.holder)
    }
}

/// Distributed leases with fencing tokens. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Leases {
    conn: Conn,
    scripts: Arc<LeaseScripts>,
}

#[derive(Debug)]
struct LeaseScripts {
    acquire: Script,
    renew: Script,
    release: Script,
}

impl Leases {
    /// Connects to `url`, failing fast like [`RedisCache::connect`].
    pub async fn connect(
        url: &str,
        prefix: &str,
        metrics: Arc<Metrics>,
    ) -> Result<Leases, RedisError> {
        Ok(Self::with(Conn::connect(url, prefix, metrics).await?))
    }

    fn with(conn: Conn) -> Leases {
        Leases {
            conn,
            scripts: Arc::new(LeaseScripts {
                acquire: Script::new(ACQUIRE_SCRIPT),
                renew: Script::new(RENEW_SCRIPT),
                release: Script::new(RELEASE_SCRIPT),
            }),
        }
    }

    /// Takes the lease on `resource` for `ttl` if nobody holds it.
    pub async fn acquire(
        &self,
        resource: &str,
        holder: &str,
        ttl: Duration,
    ) -> Result<Option<Lease>, RedisError> {
        let acquired_at = Instant::now();
        let mut m = self.conn.manager.clone();
        let token: Option<u64> = self
            .conn
            .run(
                "acquire lease",
                self.scripts
                    .acquire
                    .key(self.conn.key("lease", resource))
                    .key(self.conn.key("fence", resource))
                    .arg(holder)
                    .arg(millis(ttl))
                    .invoke_async(&mut m),
            )
            .await?;
        Ok(token.map(|token| Lease {
            resource: resource.to_string(),
            holder: holder.to_string(),
            token,
            ttl,
            acquired_at,
        }))
    }

    /// Extends the lease by its ttl. `false`: it was lost (expired, and maybe
    /// taken by another holder); stop the work.
    pub async fn renew(&self, lease: &Lease) -> Result<bool, RedisError> {
        let mut m = self.conn.manager.clone();
        let renewed: i64 = self
            .conn
            .run(
                "renew lease",
                self.scripts
                    .renew
                    .key(self.conn.key("lease", &lease.resource))
                    .arg(lease.value())
                    .arg(millis(lease.ttl))
                    .invoke_async(&mut m),
            )
            .await?;
        Ok(renewed == 1)
    }

    /// Frees the lease if this acquisition still holds it. Returns whether
    /// it did; a lease someone else holds now is left alone.
    pub async fn release(&self, lease: Lease) -> Result<bool, RedisError> {
        let mut m = self.conn.manager.clone();
        let released: i64 = self
            .conn
            .run(
                "release lease",
                self.scripts
                    .release
                    .key(self.conn.key("lease", &lease.resource))
                    .arg(lease.value())
                    .invoke_async(&mut m),
            )
            .await?;
        Ok(released == 1)
    }

    /// Keeps `lease` alive in the background, renewing every ttl/3. The
    /// returned token (a child of `stop`) fires when the lease is lost:
    /// renewal refused, or not confirmed before the lease could have
    /// expired. Cancel it (or `stop`) to end renewal, before releasing.
    pub fn hold(&self, lease: &Lease, stop: &CancellationToken) -> CancellationToken {
        let lost = stop.child_token();
        let token = lost.clone();
        let leases = self.clone();
        let lease = lease.clone();
        tokio::spawn(async move {
            let period = (lease.ttl / 3).max(Duration::from_millis(1));
            let mut expires = lease.acquired_at + lease.ttl;
            loop {
                let wake = (Instant::now() + period).min(expires);
                tokio::select! {
                    () = token.cancelled() => return,
                    () = tokio::time::sleep_until(wake) => {}
                }
                let sent = Instant::now();
                if sent >= expires {
                    tracing::warn!(resource = %lease.resource, token = lease.token,
                        "lease not renewed before it could expire");
                    break;
                }
                match leases.renew(&lease).await {
                    Ok(true) => expires = sent + lease.ttl,
                    Ok(false) => {
                        tracing::warn!(resource = %lease.resource, token = lease.token,
                            "lease lost: renewal refused");
                        break;
                    }
                    // Retried on the next tick while the lease may still be
                    // ours; the deadline above decides when to give up.
                    Err(e) => tracing::warn!(resource = %lease.resource, error = %e,
                        "cannot renew lease, retrying"),
                }
            }
            if !token.is_cancelled() {
                leases.conn.metrics.leases_lost.inc();
                token.cancel();
            }
        });
        lost
    }

    /// Runs `work` while holding `lease`, then releases it. If the lease is
    /// lost first, `work` is dropped and [`RedisError::LeaseLost`] returned;
    /// the store's fence check covers whatever it had started.
    pub async fn run_holding<T>(
        &self,
        lease: Lease,
        work: impl Future<Output = T>,
    ) -> Result<T, RedisError> {
        let stop = CancellationToken::new();
        let lost = self.hold(&lease, &stop);
        let outcome = tokio::select! {
            value = work => Some(value),
            () = lost.cancelled() => None,
        };
        stop.cancel();
        let Some(value) = outcome else {
            return Err(RedisError::LeaseLost {
                resource: lease.resource,
            });
        };
        let resource = lease.resource.clone();
        if let Err(e) = self.release(lease).await {
            // It expires by itself after its ttl.
            tracing::warn!(%resource, error = %e, "cannot release lease");
        }
        Ok(value)
    }
}

#[cfg(test)]
mod tests {
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
            .acquire("sweep", "ctl-a", Duration::from_millis(100))
            .await
            .unwrap()
            .unwrap();
        tokio::time::sleep(Duration::from_millis(250)).await;
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
        // Held well past its ttl thanks to renewal.
        tokio::time::sleep(Duration::from_millis(2000)).await;
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
        let work = async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let _: i64 = ::redis::cmd("DEL")
                .arg(key)
                .query_async(&mut m)
                .await
                .unwrap();
            std::future::pending::<()>().await
        };
        let err = l.run_holding(lease, work).await.unwrap_err();
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
            match RedisCache::connect(&url, "kiwi-test:", CacheTtls::default(), metrics.clone())
                .await
            {
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
}
