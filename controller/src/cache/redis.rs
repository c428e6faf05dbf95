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
mod tests;
