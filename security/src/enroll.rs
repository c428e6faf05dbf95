//! The enrollment exchange: `POST /enroll` on the agent port, over TLS, JSON
//! both ways. An agent sends its certificate request with its identity and,
//! when it has one, an enrollment token; the controller answers with the
//! robot's certificate, or that the request waits for an operator, or a
//! refusal (`{"reason", "detail"}` with a 4xx status).

use kiwi_protocol::Identity;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The enrollment endpoint on the agent port.
pub const ENROLL_PATH: &str = "/enroll";

/// The agent endpoint (WebSocket upgrade) on the agent port.
pub const AGENT_PATH: &str = "/agent";

/// The largest enrollment request the controller reads.
pub const MAX_ENROLL_BODY: usize = 16 * 1024;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EnrollRequest {
    /// An enrollment token's text; `None` asks an operator to approve.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// The robot's certificate request (PEM).
    pub csr_pem: String,
    /// Who the robot is (its robot id is the one the certificate names).
    pub identity: Identity,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum EnrollResponse {
    /// The robot's certificate (PEM), the CA that issued it (PEM), and when
    /// it expires (Unix ms).
    Issued {
        robot_id: Uuid,
        certificate_pem: String,
        ca_pem: String,
        not_after_ms: i64,
    },
    /// Waiting for an operator (`GET /api/v2/enrollments`); ask again after
    /// `retry_after_s`.
    Pending {
        enrollment_id: Uuid,
        key_fingerprint: String,
        retry_after_s: u32,
    },
}

/// A refused enrollment: a machine-readable reason and a sentence.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrollRefusal {
    pub reason: String,
    pub detail: String,
}
