//! Circuit breakers over the real controller: a robot whose probe goes
//! unanswered counts a failure; at the threshold its circuit opens, which
//! `GET /api/v2/robots/{id}`, every list (`circuit_state`), the deployable
//! list and the metrics show, a restarted controller remembers, and an
//! operator can reset.

use kiwi_tests::{
    Agent, ControllerOptions, State, secs, test_serial, wait_for_state, wait_ready_and_connected,
    wait_until,
};
use reqwest::{Method, StatusCode};
use serde_json::Value;
use uuid::Uuid;

async fn circuit(api: &kiwi_tests::Api, id: Uuid) -> Value {
    let robot: Value = api
        .get_json(&format!("/api/v2/robots/{id}"))
        .await
        .expect("GET robot");
    robot["circuit"].clone()
}

/// `id`'s `circuit_state` as `GET /api/v2/robots/{id}` and the robot list
/// give it (they must agree).
async fn circuit_state(api: &kiwi_tests::Api, id: Uuid) -> String {
    let robot: Value = api
        .get_json(&format!("/api/v2/robots/{id}"))
        .await
        .expect("GET robot");
    let list: Value = api.get_json("/api/v2/robots").await.expect("GET robots");
    let listed = list["robots"]
        .as_array()
        .expect("robots")
        .iter()
        .find(|r| r["robot_id"] == id.to_string())
        .expect("the robot is listed");
    assert_eq!(robot["circuit_state"], robot["circuit"]["state"], "{robot}");
    assert_eq!(listed["circuit_state"], robot["circuit_state"], "{listed}");
    robot["circuit_state"]
        .as_str()
        .expect("a state")
        .to_string()
}

/// The reasons `GET /api/v2/robots/deployable` gives for excluding `id`.
async fn exclusion(api: &kiwi_tests::Api, id: Uuid) -> Vec<String> {
    let list: Value = api
        .get_json("/api/v2/robots/deployable")
        .await
        .expect("GET deployable");
    list["excluded"]
        .as_array()
        .expect("excluded is a list")
        .iter()
        .find(|e| e["robot_id"] == id.to_string())
        .map(|e| {
            e["reasons"]
                .as_array()
                .expect("reasons")
                .iter()
                .map(|r| r.as_str().expect("a reason is text").to_string())
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unanswered_probe_opens_the_circuit_which_survives_a_restart_until_reset() {
    let mut controller = ControllerOptions::new()
        .heartbeat_interval("250ms")
        .liveness_timeout("60s")
        // One failure opens it, so that one hung agent is enough.
        .setting("circuit_failure_threshold", "1")
        .start()
        .await;
    let mut agent = Agent::start(&controller, &test_serial(61));
    let id = agent.robot_id();
    let api = controller.api().clone();
    wait_ready_and_connected(&api, id, secs(30)).await;
    let closed = circuit(&api, id).await;
    assert_eq!(closed["state"], "closed", "{closed}");
    assert_eq!(closed["failures"], 0, "{closed}");
    assert_eq!(circuit_state(&api, id).await, "closed");

    // Hung: suspected, probed, the probe goes unanswered.
    agent.pause();
    wait_for_state(&api, id, State::Offline, secs(10)).await;
    let open = wait_until(secs(10), || async {
        let c = circuit(&api, id).await;
        anyhow::ensure!(c["state"] == "open", "circuit {c}");
        Ok(c)
    })
    .await;
    assert!(open["opened_at"].is_string(), "{open}");
    assert!(open["retry_at"].is_string(), "{open}");
    assert_eq!(open["success_threshold"], 3, "{open}");
    assert_eq!(circuit_state(&api, id).await, "open");
    let reasons = exclusion(&api, id).await;
    assert!(
        reasons.iter().any(|r| r.starts_with("circuit open")),
        "{reasons:?}"
    );
    assert_eq!(
        api.metric("circuit_breakers", &[("state", "open")])
            .await
            .unwrap(),
        1.0
    );

    // Persisted: a restarted controller still has it open.
    agent.resume();
    controller.restart().await;
    let api = controller.api().clone();
    wait_ready_and_connected(&api, id, secs(30)).await;
    assert_eq!(
        circuit(&api, id).await,
        open,
        "the same breaker after a restart"
    );

    // A viewer may not reset it; an operator may.
    let path = format!("/api/v2/robots/{id}/circuit/reset");
    let viewer = api.as_token(Some(&controller.create_token(&["--role", "viewer"])));
    let refused = viewer.request(Method::POST, &path, None).await.unwrap();
    assert_eq!(refused.status, StatusCode::FORBIDDEN, "{}", refused.body);
    let operator = api.as_token(Some(&controller.create_token(&["--role", "operator"])));
    let reset = operator.request(Method::POST, &path, None).await.unwrap();
    assert_eq!(reset.status, StatusCode::OK, "{}", reset.body);
    let body: Value = serde_json::from_str(&reset.body).unwrap();
    assert_eq!(body["circuit"]["state"], "closed", "{body}");
    assert_eq!(circuit(&api, id).await["state"], "closed");
    assert_eq!(circuit_state(&api, id).await, "closed");
    assert!(
        !exclusion(&api, id)
            .await
            .iter()
            .any(|r| r.starts_with("circuit")),
        "no circuit reason after the reset"
    );
    assert_eq!(
        api.metric("circuit_breakers", &[("state", "open")])
            .await
            .unwrap(),
        0.0
    );
    let unknown = operator
        .request(
            Method::POST,
            &format!("/api/v2/robots/{}/circuit/reset", Uuid::new_v4()),
            None,
        )
        .await
        .unwrap();
    assert_eq!(unknown.status, StatusCode::NOT_FOUND, "{}", unknown.body);
}

/// The acceptance end to end: a failed probe opens the circuit (threshold
/// 1 here); once the agent is back and the open timeout has passed, trial
/// probes go through one at a time and three answered ones close it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_the_open_timeout_trial_probes_close_the_circuit_of_a_robot_that_came_back() {
    let controller = ControllerOptions::new()
        .heartbeat_interval("250ms")
        .liveness_timeout("60s")
        .setting("circuit_failure_threshold", "1")
        .setting("circuit_open_timeout", "2s")
        .start()
        .await;
    let mut agent = Agent::start(&controller, &test_serial(62));
    let id = agent.robot_id();
    let api = controller.api().clone();
    wait_ready_and_connected(&api, id, secs(30)).await;
    agent.pause();
    wait_for_state(&api, id, State::Offline, secs(10)).await;
    let open = wait_until(secs(10), || async {
        let c = circuit(&api, id).await;
        anyhow::ensure!(c["state"] == "open", "circuit {c}");
        Ok(c)
    })
    .await;
    let probes_before = api.metric("liveness_probes_total", &[]).await.unwrap();
    agent.resume();
    wait_ready_and_connected(&api, id, secs(30)).await;
    let closed = wait_until(secs(20), || async {
        let c = circuit(&api, id).await;
        anyhow::ensure!(c["state"] == "closed", "circuit {c}");
        Ok(c)
    })
    .await;
    assert_eq!(closed["failures"], 0, "{closed}");
    let trials = api.metric("liveness_probes_total", &[]).await.unwrap() - probes_before;
    assert!(
        trials >= 3.0,
        "three answered trials close it ({trials} probes sent; opened {open})"
    );
    assert!(
        exclusion(&api, id).await.is_empty(),
        "deployable again once closed"
    );
}
