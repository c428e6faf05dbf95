//! Test support shared by this crate's tests, the cross-crate tests, the
//! benchmark and the fuzz targets: a real PostgreSQL database of each test's
//! own, ([`sshd`]) a real OpenSSH server standing in for a robot without an
//! agent, and ([`rest`]) the REST API driven with generated requests. Not
//! used by the controller itself.
//!
//! The server is `DATABASE_URL`, else [`DEFAULT_DATABASE_URL`];
//! `scripts/services.sh` exports the former in CI. A server that does not
//! answer fails the test with a message that says how to start one.

pub mod rest;
pub mod sshd;

/// Robots made through the fleet, as their agents would make them.
pub mod robots {
    use crate::domain::decide::CommandIntent;
    use crate::domain::event::IdentityFacts;
    use crate::domain::{Action, Input};
    use crate::fleet::{Context, Fleet};
    use kiwi_protocol::RobotId;

    /// Takes robot `id` through discovered → provisioning → ready, as an
    /// agent connecting and answering `Provision` would.
    pub async fn ready_robot(fleet: &Fleet, id: RobotId, facts: IdentityFacts) {
        let ctx = Context::new("test");
        for input in [
            Input::AgentConnected { facts },
            Input::Operator(Action::Provision),
            Input::CommandAnswered {
                command: CommandIntent::Provision,
                error: None,
            },
        ] {
            fleet
                .apply(id, input, &ctx)
                .await
                .expect("the fleet applies the input");
        }
    }
}

/// Hand-made agent messages for tests that speak the protocol themselves.
pub mod messages {
    use kiwi_protocol::message::{
        AgentHealth, AgentMessage, HealthStatus, Hello, Report, Telemetry, WorkloadState,
    };
    use kiwi_protocol::{HardwareId, Identity, RobotId, RobotType, version};

    /// The robot id of the test robot `name` (a configured hardware id).
    pub fn robot_id(name: &str) -> RobotId {
        RobotId::from_hardware(&HardwareId::Configured(name.into()))
    }

    /// The `Hello` of the test robot `name`, offering every version.
    pub fn hello(name: &str) -> AgentMessage {
        let hardware_id = HardwareId::Configured(name.into());
        AgentMessage::Hello(Hello {
            identity: Identity {
                robot_id: RobotId::from_hardware(&hardware_id),
                hardware_id,
                hostname: name.into(),
                robot_type: RobotType::Lekiwi,
                model: None,
                os_version: None,
                agent_version: "test".into(),
                mac_addresses: vec![],
                ip_addresses: vec![],
            },
            versions: version::SUPPORTED.to_vec(),
            last_acked_seq: 0,
        })
    }

    /// A healthy report with sequence number `seq`.
    pub fn report(seq: u64) -> AgentMessage {
        AgentMessage::Report(Report {
            seq,
            time_ms: 1,
            health: AgentHealth {
                status: HealthStatus::Healthy,
                reasons: vec![],
            },
            workload: WorkloadState::Running,
            maintenance: false,
            telemetry: Telemetry::default(),
        })
    }
}

use sqlx::postgres::PgConnection;
use sqlx::{AssertSqlSafe, Connection};
use std::time::Duration;
use uuid::Uuid;

/// The PostgreSQL server used when `DATABASE_URL` is not set.
pub const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// How long connecting may take before the test fails.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

const HOW_TO_START_POSTGRES: &str = "start one (e.g. `. scripts/services.sh`, which starts a \
     throwaway server from the installed PostgreSQL binaries and exports DATABASE_URL, or \
     `pg_ctlcluster 15 main start`), or set DATABASE_URL to a server where this user may \
     create databases; the binaries come with `apt-get install postgresql`";

/// The PostgreSQL server of the tests: `DATABASE_URL` or the default.
pub fn database_server_url() -> String {
    std::env::var("DATABASE_URL")
        .ok()
        .filter(|u| !u.trim().is_empty())
        .unwrap_or_else(|| DEFAULT_DATABASE_URL.to_string())
}

/// `url` with its database replaced by `name` (the query string kept).
pub fn with_database(url: &str, name: &str) -> String {
    let (base, query) = url
        .split_once('?')
        .map_or((url, None), |(b, q)| (b, Some(q)));
    let authority_start = base.find("://").map_or(0, |i| i + 3);
    let authority_end = base[authority_start..]
        .find('/')
        .map_or(base.len(), |i| authority_start + i);
    let mut out = format!("{}/{name}", &base[..authority_end]);
    if let Some(q) = query {
        out.push('?');
        out.push_str(q);
    }
    out
}

/// A connection to the PostgreSQL server at `url`, or an error that says
/// what went wrong.
pub async fn pg_connect(url: &str) -> anyhow::Result<PgConnection> {
    match tokio::time::timeout(CONNECT_TIMEOUT, PgConnection::connect(url)).await {
        Ok(Ok(conn)) => Ok(conn),
        Ok(Err(e)) => Err(anyhow::anyhow!("{e}")),
        Err(_) => Err(anyhow::anyhow!("no answer within {CONNECT_TIMEOUT:?}")),
    }
}

/// A database of one test (random name `kiwi_test_<uuid>`), dropped with
/// `DROP DATABASE … WITH (FORCE)` when this guard drops, also on a panic.
#[derive(Debug)]
pub struct TestDatabase {
    name: String,
    url: String,
    server: String,
}

impl TestDatabase {
    /// Creates a database on the tests' server ([`database_server_url`]).
    pub async fn create() -> TestDatabase {
        TestDatabase::create_on(&database_server_url()).await
    }

    /// Creates a database on the server at `server_url` (a URL of any
    /// database there that this user may connect to).
    pub async fn create_on(server_url: &str) -> TestDatabase {
        let name = format!("kiwi_test_{}", Uuid::new_v4().simple());
        let mut conn = pg_connect(server_url).await.unwrap_or_else(|e| {
            panic!(
                "this test needs a real PostgreSQL, and none answers at {server_url} ({e}): \
                 {HOW_TO_START_POSTGRES}"
            )
        });
        sqlx::query(AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut conn)
            .await
            .unwrap_or_else(|e| {
                panic!("cannot create the test database {name} on {server_url}: {e}")
            });
        let _ = conn.close().await;
        TestDatabase {
            url: with_database(server_url, &name),
            name,
            server: server_url.to_string(),
        }
    }

    /// The URL of this database (what a store or a controller is given).
    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The URL of the server's maintenance database this one was made from.
    pub fn server_url(&self) -> &str {
        &self.server
    }

    /// A new connection to this database.
    pub async fn connect(&self) -> anyhow::Result<PgConnection> {
        pg_connect(&self.url).await
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let (name, server) = (self.name.clone(), self.server.clone());
        // A thread and runtime of its own: this may run inside a runtime
        // (which must not block on itself) or while unwinding.
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(anyhow::Error::from)?;
            runtime.block_on(async move {
                let mut conn = pg_connect(&server).await?;
                sqlx::query(AssertSqlSafe(format!(
                    "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                )))
                .execute(&mut conn)
                .await?;
                conn.close().await?;
                anyhow::Ok(())
            })
        })
        .join();
        match dropped {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("could not drop test database {}: {e:#}", self.name),
            Err(_) => eprintln!("dropping test database {} panicked", self.name),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::with_database;

    #[test]
    fn a_database_name_replaces_the_urls() {
        assert_eq!(
            with_database("postgres://u:p@h:5432/postgres?sslmode=disable", "x"),
            "postgres://u:p@h:5432/x?sslmode=disable"
        );
        assert_eq!(with_database("postgres://h", "x"), "postgres://h/x");
    }
}
