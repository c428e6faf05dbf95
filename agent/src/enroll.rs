//! Enrollment, the agent's side: make the robot's key (once; it never
//! leaves the robot), send a certificate request to the controller's
//! `POST /enroll` over TLS, and store the certificate and the controller's
//! CA (see [`crate::credentials`]).
//!
//! With a token the agent trusts only a controller whose CA matches the
//! token's pin, and refuses any other before sending anything. Without a
//! token the request waits for an operator; the agent logs its key
//! fingerprint and the CA pin it saw so that both sides can be compared,
//! and asks again until the robot is approved or rejected.

use crate::config::ControllerUrl;
use crate::credentials::{Credentials, load_or_create_key};
use anyhow::Context as _;
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper_util::rt::TokioIo;
use kiwi_protocol::Identity;
use kiwi_protocol::backoff::Backoff;
use kiwi_security::CaPin;
use kiwi_security::enroll::{ENROLL_PATH, EnrollRefusal, EnrollRequest, EnrollResponse};
use kiwi_security::pki::{certs_from_pem, key_fingerprint, robot_csr_pem};
use kiwi_security::token::EnrollmentToken;
use kiwi_security::verify::{self, ALPN_HTTP1, ControllerTrust, ControllerVerifier};
use rustls_pki_types::ServerName;
use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// How long one enrollment exchange may take.
pub const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(15);

/// The largest answer read.
const MAX_ANSWER: usize = 64 * 1024;

/// How an attempt failed: worth another try, or final.
#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    /// The controller said no (bad or used token, rejected robot, pinned CA
    /// mismatch): trying again will not help.
    #[error("{0}")]
    Refused(String),
    /// Network, controller busy or store unavailable: try again.
    #[error("{0}")]
    Transient(String, Option<Duration>),
}

/// Enrolls the robot (see the module documentation) and returns its
/// credentials. Retries transient failures with backoff; waits while an
/// operator has not decided; gives up when refused, when `shutdown` is
/// cancelled, or after `max_attempts` transient failures.
pub async fn enroll(
    state_dir: &Path,
    identity: &Identity,
    controller: &ControllerUrl,
    token: Option<&EnrollmentToken>,
    max_attempts: Option<u32>,
    source: Option<IpAddr>,
    shutdown: &CancellationToken,
) -> anyhow::Result<Credentials> {
    let key = {
        let dir = state_dir.to_path_buf();
        tokio::task::spawn_blocking(move || load_or_create_key(&dir))
            .await
            .context("key task failed")??
    };
    let csr_pem = robot_csr_pem(&key, identity.robot_id.0)?;
    let request = EnrollRequest {
        token: token.map(ToString::to_string),
        csr_pem,
        identity: identity.clone(),
    };
    let body = serde_json::to_vec(&request)?;
    let trust = match token {
        Some(t) => ControllerTrust::Pin(t.ca_pin.clone()),
        None => ControllerTrust::FirstUse,
    };
    tracing::info!(
        controller = %controller,
        robot_id = %identity.robot_id,
        key_fingerprint = %key_fingerprint(&key),
        with_token = token.is_some(),
        "enrolling"
    );
    let backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
    let mut failures = 0u32;
    let mut key = Some(key);
    loop {
        let verifier = ControllerVerifier::new(trust.clone());
        let attempt = tokio::select! {
            () = shutdown.cancelled() => anyhow::bail!("enrollment stopped: shutting down"),
            r = tokio::time::timeout(EXCHANGE_TIMEOUT, exchange(controller, source, &verifier, &body)) => r,
        };
        let attempt = match attempt {
            Err(_) => Err(EnrollError::Transient(
                "the controller did not answer in time".into(),
                None,
            )),
            Ok(r) => r,
        };
        let wait = match attempt {
            Ok(EnrollResponse::Issued {
                certificate_pem,
                ca_pem,
                robot_id,
                ..
            }) => {
                let ca = verifier
                    .accepted_ca()
                    .context("the controller's CA was not seen")?;
                let offered = certs_from_pem(&ca_pem)?.remove(0);
                if offered != ca {
                    anyhow::bail!(
                        "the controller answered with a CA ({}) other than the one it presented ({})",
                        CaPin::of(&offered),
                        CaPin::of(&ca)
                    );
                }
                if robot_id != identity.robot_id.0 {
                    anyhow::bail!(
                        "the controller issued a certificate for another robot ({robot_id})"
                    );
                }
                let cert = certs_from_pem(&certificate_pem)?.remove(0);
                let dir = state_dir.to_path_buf();
                let key = key.take().context("enrollment stored twice")?;
                let creds =
                    tokio::task::spawn_blocking(move || Credentials::store(&dir, key, cert, ca))
                        .await
                        .context("storing task failed")??;
                tracing::info!(
                    robot_id = %identity.robot_id,
                    not_after = ?creds.not_after(),
                    ca_pin = %CaPin::of(&offered),
                    "enrolled: certificate stored"
                );
                return Ok(creds);
            }
            Ok(EnrollResponse::Pending {
                enrollment_id,
                key_fingerprint,
                retry_after_s,
            }) => {
                let ca_pin = verifier.accepted_ca().map(|c| CaPin::of(&c).to_string());
                tracing::info!(
                    %enrollment_id,
                    key_fingerprint,
                    ca_pin = ca_pin.as_deref().unwrap_or("-"),
                    "waiting for an operator to approve this robot \
                     (POST /api/v2/enrollments/{{id}}/approve); compare the key fingerprint"
                );
                failures = 0;
                Duration::from_secs(u64::from(retry_after_s.clamp(1, 300)))
            }
            Err(EnrollError::Refused(why)) => anyhow::bail!("enrollment refused: {why}"),
            Err(EnrollError::Transient(why, retry_after)) => {
                failures += 1;
                if max_attempts.is_some_and(|max| failures >= max) {
                    anyhow::bail!("enrollment failed: {why}");
                }
                let wait =
                    backoff.delay_with_retry_after(failures, retry_after, rand::random::<f64>());
                tracing::warn!(error = why, retry_in = ?wait, "enrollment attempt failed");
                wait
            }
        };
        tokio::select! {
            () = shutdown.cancelled() => anyhow::bail!("enrollment stopped: shutting down"),
            () = tokio::time::sleep(wait) => {}
        }
    }
}

/// One `POST /enroll` over a new TLS connection.
async fn exchange(
    controller: &ControllerUrl,
    source: Option<IpAddr>,
    verifier: &Arc<ControllerVerifier>,
    body: &[u8],
) -> Result<EnrollResponse, EnrollError> {
    let transient = |what: &str, e: &dyn std::fmt::Display| {
        EnrollError::Transient(format!("{what} {controller}: {e}"), None)
    };
    let tcp = crate::transport::tcp_connect(controller.bare_host(), controller.port, source)
        .await
        .map_err(|e| transient("cannot connect to", &e))?;
    let _ = tcp.set_nodelay(true);
    let tls = verify::client_config(verifier.clone(), None, ALPN_HTTP1)
        .map_err(|e| EnrollError::Refused(format!("TLS settings: {e}")))?;
    let name = ServerName::try_from(controller.bare_host().to_string())
        .map_err(|e| EnrollError::Refused(format!("invalid controller host: {e}")))?;
    let stream = tokio_rustls::TlsConnector::from(Arc::new(tls))
        .connect(name, tcp)
        .await
        .map_err(|e| match verifier.refusal() {
            // The controller is not the one we trust: final.
            Some(why) => EnrollError::Refused(why),
            None => transient("TLS with", &e),
        })?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| transient("HTTP with", &e))?;
    let driver = tokio::spawn(connection);
    let request = hyper::Request::post(ENROLL_PATH)
        .header(
            hyper::header::HOST,
            format!("{}:{}", controller.host, controller.port),
        )
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::copy_from_slice(body)))
        .map_err(|e| EnrollError::Refused(format!("cannot build the request: {e}")))?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| transient("no answer from", &e))?;
    let status = response.status();
    let retry_after = response
        .headers()
        .get(hyper::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs);
    let bytes = Limited::new(response.into_body(), MAX_ANSWER)
        .collect()
        .await
        .map_err(|e| transient("cannot read the answer of", &e))?
        .to_bytes();
    driver.abort();
    if status.is_success() {
        return serde_json::from_slice(&bytes).map_err(|e| {
            EnrollError::Transient(format!("unreadable answer from {controller}: {e}"), None)
        });
    }
    let why = serde_json::from_slice::<EnrollRefusal>(&bytes).map_or_else(
        |_| format!("HTTP {status}"),
        |r| format!("{} ({})", r.detail, r.reason),
    );
    if status.as_u16() == 429 || status.is_server_error() {
        Err(EnrollError::Transient(
            format!("{controller}: {why}"),
            retry_after,
        ))
    } else {
        Err(EnrollError::Refused(why))
    }
}
