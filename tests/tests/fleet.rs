//! A small fleet: agents join and are provisioned by themselves; an operator
//! drives a robot through its lifecycle over the API while a watch client
//! sees every transition; the state machine refuses what it must.

use std::collections::BTreeMap;

use anyhow::ensure;
use kiwi_tests::{
    Agent, ControllerOptions, Event, Resume, State, Watch, secs, test_serial, wait_for_state,
    wait_until,
};
use reqwest::StatusCode;
use serde_json::json;
use uuid::Uuid;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_agents_join_and_become_ready() {
    let controller = ControllerOptions::new().start().await;
    let api = controller.api();
    let agents: Vec<Agent> = (1..=3)
        .map(|n| Agent::start(&controller, &test_serial(n)))
        .collect();
    let expected: BTreeMap<Uuid, String> = agents
        .iter()
        .map(|a| (a.robot_id(), a.hostname().to_string()))
        .collect();
    assert_eq!(expected.len(), 3, "the test serials give distinct ids");

    let expected_ref = &expected;
    let robots = wait_until(secs(30), move || async move {
        let robots = api.robots().await?;
        let ids: Vec<Uuid> = robots.iter().map(|r| r.robot_id).collect();
        ensure!(
            ids == expected_ref.keys().copied().collect::<Vec<_>>(),
            "listed ids {ids:?}, expected {:?}",
            expected_ref.keys()
        );
        for robot in &robots {
            ensure!(
                robot.state == State::Ready && robot.connected,
                "robot {} ({:?}) is {}, connected {}",
                robot.robot_id,
                robot.hostname,
                robot.state,
                robot.connected
            );
        }
        Ok(robots)
    })
    .await;

    for robot in &robots {
        assert_eq!(
            robot.hostname.as_deref(),
            Some(expected[&robot.robot_id].as_str()),
            "hostname of {}",
            robot.robot_id
        );
        assert_eq!(robot.robot_type, "lekiwi", "type of {}", robot.robot_id);
        let one = api
            .robot_required(robot.robot_id)
            .await
            .expect("GET one robot");
        assert_eq!(one.robot_id, robot.robot_id);
        assert_eq!(one.hostname, robot.hostname);

        // The log tells how it got there: discovered, then provisioned by
        // the controller itself.
        let events = api.events(robot.robot_id).await.expect("events");
        assert_eq!(
            events.first().map(|e| (e.kind.as_str(), e.version)),
            Some(("robot_discovered", 1)),
            "first event of {}: {events:#?}",
            robot.robot_id
        );
        let transitions: Vec<(State, State)> =
            events.iter().filter_map(Event::transition).collect();
        assert_eq!(
            transitions,
            vec![
                (State::Discovered, State::Provisioning),
                (State::Provisioning, State::Ready)
            ],
            "transitions of {}",
            robot.robot_id
        );
        let versions: Vec<i64> = events.iter().map(|e| e.version).collect();
        let consecutive: Vec<i64> = (1..=i64::try_from(events.len()).unwrap()).collect();
        assert_eq!(versions, consecutive, "versions of {}", robot.robot_id);
        assert!(
            events.last().unwrap().version <= one.version,
            "read model version {} behind its log",
            one.version
        );
    }

    // Filters agree with the list.
    let ready = api
        .robots_where("state=ready")
        .await
        .expect("filter by state");
    assert_eq!(ready.len(), 3);
    let lekiwis = api
        .robots_where("robot_type=lekiwi")
        .await
        .expect("filter by type");
    assert_eq!(lekiwis.len(), 3);
    let active = api
        .robots_where("state=active")
        .await
        .expect("filter by state");
    assert!(active.is_empty(), "no robot is active: {active:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_drives_the_lifecycle_and_watch_sees_each_transition() {
    let controller = ControllerOptions::new().auto_provision(false).start().await;
    let api = controller.api();
    let agent = Agent::start(&controller, &test_serial(1));
    let id = agent.robot_id();
    let robot = wait_for_state(api, id, State::Discovered, secs(30)).await;
    assert!(robot.connected, "the agent is connected: {robot:#?}");

    let mut watch = Watch::connect(api, Resume::Fresh)
        .await
        .expect("connect the watch stream");

    // Provision: the controller asks the agent, whose answer makes it ready.
    let after = api
        .act(id, "provision", None)
        .await
        .expect("provision a discovered robot");
    assert!(
        matches!(after.state, State::Provisioning | State::Ready),
        "after provision the robot is {}",
        after.state
    );
    wait_for_state(api, id, State::Ready, secs(20)).await;

    // Refused: a ready robot is not in maintenance.
    let refused = api
        .action(id, "maintenance/end", None)
        .await
        .expect("POST maintenance/end")
        .expect_err("maintenance/end on a ready robot must be refused");
    assert_eq!(refused.status, StatusCode::CONFLICT, "{refused}");
    refused.check_well_formed().unwrap();
    assert_eq!(
        refused.member("current_state"),
        &json!("ready"),
        "{refused}"
    );
    let allowed: Vec<&str> = refused
        .member("allowed_states")
        .as_array()
        .unwrap_or_else(|| panic!("allowed_states is a list: {refused}"))
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    for state in ["active", "maintenance", "failed"] {
        assert!(
            allowed.contains(&state),
            "{state} is allowed from ready: {refused}"
        );
    }
    assert!(
        !allowed.contains(&"ready") && !allowed.contains(&"provisioning"),
        "{refused}"
    );
    let detail = refused.detail().to_ascii_lowercase();
    assert!(
        detail.contains("activ") && detail.contains("maintenance"),
        "the detail names what is allowed: {refused}"
    );

    let active = api
        .act(
            id,
            "activate",
            Some(json!({"deployment_version": "v1.2.3"})),
        )
        .await
        .expect("activate a ready robot");
    assert_eq!(active.state, State::Active);
    assert_eq!(active.field("deployment_version"), &json!("v1.2.3"));

    api.act(
        id,
        "maintenance/start",
        Some(json!({"reason": "battery swap"})),
    )
    .await
    .expect("start maintenance of an active robot");
    wait_for_state(api, id, State::Maintenance, secs(20)).await;

    api.act(id, "maintenance/end", None)
        .await
        .expect("end maintenance");
    let back = wait_for_state(api, id, State::Ready, secs(20)).await;
    assert!(back.connected);

    let expected = [
        (
            "robot_provisioning_started",
            State::Discovered,
            State::Provisioning,
        ),
        ("robot_provisioned", State::Provisioning, State::Ready),
        ("robot_activated", State::Ready, State::Active),
        ("robot_maintenance_start", State::Active, State::Maintenance),
        ("robot_maintenance_end", State::Maintenance, State::Ready),
    ];
    let is_transition_of_robot = |e: &Event| e.robot_id == id && e.transition().is_some();
    let seen = watch
        .collect_until(secs(20), |events| {
            events.iter().filter(|e| is_transition_of_robot(e)).count() >= expected.len()
        })
        .await
        .expect("the watch stream delivers the transitions");

    let positions: Vec<i64> = seen.iter().map(|e| e.position).collect();
    assert!(
        positions.windows(2).all(|w| w[0] < w[1]),
        "watch ids strictly increase: {positions:?}"
    );
    let transitions: Vec<(&str, State, State)> = seen
        .iter()
        .filter(|e| is_transition_of_robot(e))
        .map(|e| {
            let (from, to) = e.transition().unwrap();
            (e.kind.as_str(), from, to)
        })
        .collect();
    assert_eq!(transitions, expected.to_vec());

    // What the stream said is what the log holds.
    let stored: BTreeMap<i64, Event> = api
        .events(id)
        .await
        .expect("events")
        .into_iter()
        .map(|e| (e.position, e))
        .collect();
    for event in seen.iter().filter(|e| e.robot_id == id) {
        assert_eq!(
            stored.get(&event.position),
            Some(event),
            "streamed event {} matches the stored one",
            event.position
        );
    }
    // The refused action left no trace: the log's transitions are exactly
    // the five above.
    let stored_transitions: Vec<(State, State)> =
        stored.values().filter_map(Event::transition).collect();
    assert_eq!(
        stored_transitions,
        expected
            .iter()
            .map(|(_, f, t)| (*f, *t))
            .collect::<Vec<_>>()
    );
}
