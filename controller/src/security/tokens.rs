//! Tokens as the controller makes and checks them.
//!
//! - [`create_api_token`] and [`create_enrollment_token`] are the one place
//!   tokens are made (the `token` commands and the admin API both call
//!   them): a random id and secret, of which only the secret's hash is
//!   stored.
//! - [`ApiAuth`] checks the bearer token of an API request. It keeps the
//!   tokens it has seen in memory (the read path must stay cheap) and asks
//!   the store only for an id it does not know, so that a token made by the
//!   CLI while the controller runs works at once. Every [`REFRESH`] the whole
//!   table is read again, so that a token revoked elsewhere (the CLI,
//!   another controller) stops working within seconds; one revoked through
//!   this controller ([`ApiAuth::revoke`]) stops at once. Failures are
//!   charged to the address's API failure budget
//!   ([`AbuseLimits::auth_failed`]); a valid token is never refused for
//!   what its address did before.

use super::limits::{AbuseLimits, Surface};
use crate::store::StoreError;
use crate::store::auth::{ApiTokenRecord, AuthStore, EnrollmentTokenRecord, Role};
use chrono::{DateTime, SubsecRound as _, Utc};
use kiwi_protocol::RobotId;
use kiwi_security::CaPin;
use kiwi_security::token::{ApiToken, EnrollmentToken, secret_matches};
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

/// How long a new enrollment token is valid unless told otherwise.
pub const DEFAULT_ENROLLMENT_TTL: Duration = Duration::from_secs(3600);
/// How many robots a new enrollment token admits unless told otherwise.
pub const DEFAULT_ENROLLMENT_USES: u32 = 1;
/// The longest validity a token may be given (the CA's own).
pub const MAX_TTL: Duration = super::pki::CA_VALIDITY;
/// The longest label of an API token, in bytes.
pub const MAX_NAME: usize = 128;
/// How often [`ApiAuth`] reads the whole token table again.
pub const REFRESH: Duration = Duration::from_secs(5);

/// Checks a token's time to live: more than nothing, at most [`MAX_TTL`].
pub fn check_ttl(ttl: Duration) -> Result<(), String> {
    if ttl.is_zero() {
        Err("ttl must be longer than zero".into())
    } else if ttl > MAX_TTL {
        Err(format!(
            "ttl must be at most {} days",
            MAX_TTL.as_secs() / 86_400
        ))
    } else {
        Ok(())
    }
}

/// Checks an API token's label.
pub fn check_name(name: &str) -> Result<(), String> {
    if name.len() > MAX_NAME {
        Err(format!("name must be at most {MAX_NAME} bytes"))
    } else if name.chars().any(char::is_control) {
        Err("name must not contain control characters".into())
    } else {
        Ok(())
    }
}

/// Checks an enrollment token's number of uses.
pub fn check_uses(uses: u32) -> Result<(), String> {
    if uses == 0 {
        Err("uses must be at least 1".into())
    } else {
        Ok(())
    }
}

/// Now, as both backends keep it (microseconds).
fn now() -> DateTime<Utc> {
    Utc::now().trunc_subsecs(6)
}

fn expiry(now: DateTime<Utc>, ttl: Duration) -> Result<DateTime<Utc>, StoreError> {
    check_ttl(ttl).map_err(StoreError::Invalid)?;
    chrono::Duration::from_std(ttl)
        .ok()
        .and_then(|d| now.checked_add_signed(d))
        .ok_or_else(|| StoreError::Invalid(format!("ttl {ttl:?} is out of range")))
}

/// Makes and stores a new API token; the returned token is the only copy
/// of its secret.
pub async fn create_api_token(
    store: &dyn AuthStore,
    role: Role,
    name: &str,
    ttl: Option<Duration>,
) -> Result<(ApiToken, ApiTokenRecord), StoreError> {
    check_name(name).map_err(StoreError::Invalid)?;
    let created_at = now();
    let token = ApiToken::generate();
    let record = ApiTokenRecord {
        id: token.id.clone(),
        name: name.to_string(),
        role,
        secret_hash: token.secret_hash(),
        created_at,
        expires_at: ttl.map(|ttl| expiry(created_at, ttl)).transpose()?,
        revoked_at: None,
    };
    store.insert_api_token(&record).await?;
    Ok((token, record))
}

/// Makes and stores a new enrollment token pinning `pin`, good for `uses`
/// enrollments within `ttl`, of `robot` only when given; the returned
/// token is the only copy of its secret.
pub async fn create_enrollment_token(
    store: &dyn AuthStore,
    pin: CaPin,
    ttl: Duration,
    uses: u32,
    robot: Option<RobotId>,
) -> Result<(EnrollmentToken, EnrollmentTokenRecord), StoreError> {
    check_uses(uses).map_err(StoreError::Invalid)?;
    let created_at = now();
    let token = EnrollmentToken::generate(pin);
    let record = EnrollmentTokenRecord {
        id: token.id.clone(),
        secret_hash: token.secret_hash(),
        created_at,
        expires_at: expiry(created_at, ttl)?,
        uses_total: uses,
        uses_left: uses,
        revoked_at: None,
        robot_id: robot,
    };
    store.insert_enrollment_token(&record).await?;
    Ok((token, record))
}

/// Where an API token stands at `now`: `revoked`, `expired` or `active`.
pub fn api_token_status(t: &ApiTokenRecord, now: DateTime<Utc>) -> &'static str {
    if t.revoked_at.is_some() {
        "revoked"
    } else if t.expires_at.is_some_and(|e| e <= now) {
        "expired"
    } else {
        "active"
    }
}

/// Where an enrollment token stands at `now`: `revoked`, `expired`,
/// `used_up` or `active`.
pub fn enrollment_token_status(t: &EnrollmentTokenRecord, now: DateTime<Utc>) -> &'static str {
    if t.revoked_at.is_some() {
        "revoked"
    } else if t.expires_at <= now {
        "expired"
    } else if t.uses_left == 0 {
        "used_up"
    } else {
        "active"
    }
}

/// Why an API request's token was refused. [`ApiRefusal::reason`] is the
/// metric label; nothing here shows a secret.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ApiRefusal {
    #[error("no bearer token was sent")]
    Missing,
    #[error("the bearer token is not a kiwi API token")]
    Malformed,
    #[error("no such API token")]
    Unknown,
    #[error("the API token's secret is wrong")]
    WrongSecret,
    #[error("the API token has expired")]
    Expired,
    #[error("the API token has been revoked")]
    Revoked,
    /// The address spent its failure budget; it may try again after this.
    #[error("too many failed authentications from this address")]
    Blocked { retry_after: Duration },
    /// The store could not be asked about a token it has not seen yet.
    #[error("the token cannot be checked now")]
    Unavailable,
}

impl ApiRefusal {
    pub fn reason(self) -> &'static str {
        match self {
            ApiRefusal::Missing => "missing",
            ApiRefusal::Malformed => "malformed",
            ApiRefusal::Unknown => "unknown",
            ApiRefusal::WrongSecret => "wrong_secret",
            ApiRefusal::Expired => "expired",
            ApiRefusal::Revoked => "revoked",
            ApiRefusal::Blocked { .. } => "blocked",
            ApiRefusal::Unavailable => "unavailable",
        }
    }
}

/// Who an accepted API request comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub token_id: String,
    pub role: Role,
}

/// Where [`ApiAuth`] reads the time: the monotonic clock for its reloads,
/// the wall clock for expiries. Tests give it one they move themselves.
trait Clock: Send + Sync + std::fmt::Debug {
    fn instant(&self) -> Instant;
    fn utc(&self) -> DateTime<Utc>;
}

/// The system's clocks.
#[derive(Debug)]
struct SystemClock;

impl Clock for SystemClock {
    fn instant(&self) -> Instant {
        Instant::now()
    }

    fn utc(&self) -> DateTime<Utc> {
        Utc::now()
    }
}

/// The tokens known to this controller, and when they were last read in
/// full.
#[derive(Debug, Default)]
struct Known {
    tokens: HashMap<String, Arc<ApiTokenRecord>>,
    loaded: Option<Instant>,
}

/// Checks API bearer tokens (see the module documentation).
#[derive(Debug)]
pub struct ApiAuth {
    store: Arc<dyn AuthStore>,
    limits: Arc<AbuseLimits>,
    refresh: Duration,
    known: RwLock<Known>,
    /// Held by the one request that reloads the table.
    reloading: tokio::sync::Mutex<()>,
    clock: Arc<dyn Clock>,
}

impl ApiAuth {
    pub fn new(store: Arc<dyn AuthStore>, limits: Arc<AbuseLimits>) -> Self {
        ApiAuth::with_refresh(store, limits, REFRESH)
    }

    pub fn with_refresh(
        store: Arc<dyn AuthStore>,
        limits: Arc<AbuseLimits>,
        refresh: Duration,
    ) -> Self {
        ApiAuth::with_clock(store, limits, refresh, Arc::new(SystemClock))
    }

    fn with_clock(
        store: Arc<dyn AuthStore>,
        limits: Arc<AbuseLimits>,
        refresh: Duration,
        clock: Arc<dyn Clock>,
    ) -> Self {
        ApiAuth {
            store,
            limits,
            refresh,
            known: RwLock::default(),
            reloading: tokio::sync::Mutex::default(),
            clock,
        }
    }

    pub fn store(&self) -> &Arc<dyn AuthStore> {
        &self.store
    }

    /// Checks the token text a request presented (`None`: none) from `ip`.
    /// A valid token is accepted whatever the address did before; every
    /// refusal of a presented token is charged to the address's API budget,
    /// and once that is spent its refusals are `Blocked` (told to wait).
    pub async fn verify(&self, presented: Option<&str>, ip: IpAddr) -> Result<Caller, ApiRefusal> {
        let text = presented.ok_or(ApiRefusal::Missing)?;
        let checked = self.check(text).await;
        match checked {
            Err(refusal) if refusal != ApiRefusal::Unavailable => {
                self.limits.auth_failed(Surface::Api, ip);
                match self.limits.blocked(Surface::Api, ip) {
                    Some(retry_after) => Err(ApiRefusal::Blocked { retry_after }),
                    None => Err(refusal),
                }
            }
            other => other,
        }
    }

    async fn check(&self, text: &str) -> Result<Caller, ApiRefusal> {
        let token: ApiToken = text.parse().map_err(|_| ApiRefusal::Malformed)?;
        self.reload_if_due().await;
        let record = match self.cached(&token.id) {
            Some(r) => r,
            None => self.fetch(&token.id).await?,
        };
        if !secret_matches(&token.secret, &record.secret_hash) {
            Err(ApiRefusal::WrongSecret)
        } else if record.revoked_at.is_some() {
            Err(ApiRefusal::Revoked)
        } else if record.expires_at.is_some_and(|e| e <= self.clock.utc()) {
            Err(ApiRefusal::Expired)
        } else {
            Ok(Caller {
                token_id: record.id.clone(),
                role: record.role,
            })
        }
    }

    fn cached(&self, id: &str) -> Option<Arc<ApiTokenRecord>> {
        self.known
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .tokens
            .get(id)
            .cloned()
    }

    /// Reads one token this controller has not seen (made by the CLI or
    /// another controller since the last reload).
    async fn fetch(&self, id: &str) -> Result<Arc<ApiTokenRecord>, ApiRefusal> {
        match self.store.api_token(id).await {
            Ok(Some(record)) => Ok(self.remember(record)),
            Ok(None) => Err(ApiRefusal::Unknown),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read an API token");
                Err(ApiRefusal::Unavailable)
            }
        }
    }

    /// Keeps a record, never letting it undo a revocation already known
    /// (revocation is final).
    fn remember(&self, mut record: ApiTokenRecord) -> Arc<ApiTokenRecord> {
        let mut known = self.known.write().unwrap_or_else(|p| p.into_inner());
        if record.revoked_at.is_none()
            && let Some(old) = known.tokens.get(&record.id)
        {
            record.revoked_at = old.revoked_at;
        }
        let record = Arc::new(record);
        known.tokens.insert(record.id.clone(), record.clone());
        record
    }

    /// Reads the whole table again when the last read is older than the
    /// refresh period. One request does it; the others meanwhile go on
    /// with what is known.
    async fn reload_if_due(&self) {
        let due = |known: &Known| {
            known
                .loaded
                .is_none_or(|t| self.clock.instant().saturating_duration_since(t) >= self.refresh)
        };
        if !due(&self.known.read().unwrap_or_else(|p| p.into_inner())) {
            return;
        }
        let Ok(_elected) = self.reloading.try_lock() else {
            return;
        };
        // The read below may take a while: mark it started so that nobody
        // else starts one, even if it fails.
        {
            let mut known = self.known.write().unwrap_or_else(|p| p.into_inner());
            if !due(&known) {
                return;
            }
            known.loaded = Some(self.clock.instant());
        }
        match self.store.api_tokens().await {
            Ok(all) => {
                let mut known = self.known.write().unwrap_or_else(|p| p.into_inner());
                let mut tokens: HashMap<_, _> = all
                    .into_iter()
                    .map(|t| (t.id.clone(), Arc::new(t)))
                    .collect();
                // A revocation this controller made while the read was in
                // flight stays in force.
                for (id, old) in &known.tokens {
                    if let (Some(at), Some(new)) = (old.revoked_at, tokens.get_mut(id))
                        && new.revoked_at.is_none()
                    {
                        Arc::make_mut(new).revoked_at = Some(at);
                    }
                }
                known.tokens = tokens;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot reload API tokens; keeping the known ones");
            }
        }
    }

    /// Makes an API token (see [`create_api_token`]) that works here at
    /// once.
    pub async fn create(
        &self,
        role: Role,
        name: &str,
        ttl: Option<Duration>,
    ) -> Result<(ApiToken, ApiTokenRecord), StoreError> {
        let (token, record) = create_api_token(self.store.as_ref(), role, name, ttl).await?;
        self.remember(record.clone());
        Ok((token, record))
    }

    /// Revokes an API token in the store and here at once; `Ok(None)` when
    /// there is no such token.
    pub async fn revoke(&self, id: &str) -> Result<Option<ApiTokenRecord>, StoreError> {
        let now = now();
        if !self.store.revoke_api_token(id, now).await? {
            return Ok(None);
        }
        let record = match self.store.api_token(id).await? {
            Some(r) => r,
            None => return Ok(None),
        };
        let mut revoked = record.clone();
        revoked.revoked_at.get_or_insert(now);
        self.remember(revoked);
        Ok(Some(record))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;
    use crate::security::LimitSettings;
    use crate::store::EventStore as _;
    use crate::store::sqlite::SqliteStore;

    const IP: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 88, 0, 7));

    /// A clock that stands still until a test moves it.
    #[derive(Debug)]
    struct TestClock(std::sync::Mutex<(Instant, DateTime<Utc>)>);

    impl TestClock {
        fn new() -> Arc<TestClock> {
            Arc::new(TestClock(std::sync::Mutex::new((
                Instant::now(),
                Utc::now(),
            ))))
        }

        fn advance(&self, by: Duration) {
            let mut at = self.0.lock().unwrap();
            at.0 += by;
            at.1 += chrono::Duration::from_std(by).unwrap();
        }

        fn set_utc(&self, utc: DateTime<Utc>) {
            self.0.lock().unwrap().1 = utc;
        }
    }

    impl Clock for TestClock {
        fn instant(&self) -> Instant {
            self.0.lock().unwrap().0
        }

        fn utc(&self) -> DateTime<Utc> {
            self.0.lock().unwrap().1
        }
    }

    async fn setup(
        failures: u32,
    ) -> (
        tempfile::TempDir,
        Arc<dyn AuthStore>,
        ApiAuth,
        Arc<Metrics>,
        Arc<TestClock>,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("kiwi.db"))
            .await
            .unwrap();
        let auth_store = store.auth();
        let metrics = Arc::new(Metrics::new());
        let limits = Arc::new(AbuseLimits::new(
            LimitSettings {
                auth_failures_per_minute: failures,
                ..LimitSettings::default()
            },
            metrics.clone(),
        ));
        let clock = TestClock::new();
        let auth = ApiAuth::with_clock(auth_store.clone(), limits, REFRESH, clock.clone());
        (dir, auth_store, auth, metrics, clock)
    }

    #[tokio::test]
    async fn tokens_are_checked_with_a_reason_for_each_refusal() {
        let (_dir, store, auth, _, clock) = setup(100).await;
        let (admin, _) = create_api_token(store.as_ref(), Role::Admin, "ci", None)
            .await
            .unwrap();
        let text = admin.to_string();
        assert_eq!(
            auth.verify(Some(&text), IP).await.unwrap(),
            Caller {
                token_id: admin.id.clone(),
                role: Role::Admin
            }
        );
        assert_eq!(auth.verify(None, IP).await, Err(ApiRefusal::Missing));
        assert_eq!(
            auth.verify(Some("Basic abc"), IP).await,
            Err(ApiRefusal::Malformed)
        );
        let unknown = ApiToken::generate().to_string();
        assert_eq!(
            auth.verify(Some(&unknown), IP).await,
            Err(ApiRefusal::Unknown)
        );
        let wrong = ApiToken {
            id: admin.id.clone(),
            secret: ApiToken::generate().secret,
        }
        .to_string();
        assert_eq!(
            auth.verify(Some(&wrong), IP).await,
            Err(ApiRefusal::WrongSecret)
        );
        let (short, record) = create_api_token(
            store.as_ref(),
            Role::Viewer,
            "",
            Some(Duration::from_secs(3600)),
        )
        .await
        .unwrap();
        let short = short.to_string();
        let expires_at = record.expires_at.unwrap();
        clock.set_utc(expires_at - chrono::Duration::microseconds(1));
        assert!(
            auth.verify(Some(&short), IP).await.is_ok(),
            "valid until its expiry"
        );
        clock.set_utc(expires_at);
        assert_eq!(
            auth.verify(Some(&short), IP).await,
            Err(ApiRefusal::Expired),
            "refused from its expiry on"
        );
        auth.revoke(&admin.id).await.unwrap().unwrap();
        assert_eq!(
            auth.verify(Some(&text), IP).await,
            Err(ApiRefusal::Revoked),
            "revoked here: refused at once"
        );
        assert_eq!(auth.revoke("0000000000000000").await.unwrap(), None);
    }

    #[tokio::test]
    async fn revocations_made_elsewhere_are_seen_after_a_reload() {
        let (_dir, store, auth, _, clock) = setup(100).await;
        let (viewer, _) = create_api_token(store.as_ref(), Role::Viewer, "", None)
            .await
            .unwrap();
        let text = viewer.to_string();
        assert!(auth.verify(Some(&text), IP).await.is_ok());
        store.revoke_api_token(&viewer.id, now()).await.unwrap();
        clock.advance(REFRESH - Duration::from_millis(1));
        assert!(
            auth.verify(Some(&text), IP).await.is_ok(),
            "not read again before the refresh period is over"
        );
        clock.advance(Duration::from_millis(1));
        assert_eq!(auth.verify(Some(&text), IP).await, Err(ApiRefusal::Revoked));
    }

    #[tokio::test]
    async fn failures_block_bad_tokens_from_the_address_but_never_good_ones() {
        let (_dir, store, auth, metrics, _) = setup(2).await;
        let unknown = ApiToken::generate().to_string();
        for _ in 0..2 {
            assert_eq!(
                auth.verify(Some(&unknown), IP).await,
                Err(ApiRefusal::Unknown)
            );
        }
        assert!(matches!(
            auth.verify(Some(&unknown), IP).await,
            Err(ApiRefusal::Blocked { .. })
        ));
        // A token made elsewhere since (never seen here) works from it.
        let (good, _) = create_api_token(store.as_ref(), Role::Viewer, "", None)
            .await
            .unwrap();
        assert!(auth.verify(Some(&good.to_string()), IP).await.is_ok());
        assert!(
            metrics
                .encode()
                .contains("rate_limited_total{limit=\"auth_failures\"} 1")
        );
    }

    #[test]
    fn arguments_are_checked() {
        assert!(check_ttl(Duration::ZERO).is_err());
        assert!(check_ttl(MAX_TTL + Duration::from_secs(1)).is_err());
        assert!(check_ttl(Duration::from_secs(3600)).is_ok());
        assert!(check_uses(0).is_err());
        assert!(check_name(&"x".repeat(MAX_NAME + 1)).is_err());
        assert!(check_name("line\nbreak").is_err());
        assert!(check_name("ci deploy").is_ok());
    }
}
