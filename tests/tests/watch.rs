//! The watch stream: a client resuming from the last event it saw (by
//! `Last-Event-ID` or `?after=`) gets exactly the later events, including
//! those appended while it was away: no gap, no duplicate, in order.

use std::time::Duration;

use kiwi_tests::{
    Agent, Api, ControllerOptions, Event, Resume, State, Watch, secs, test_serial, wait_for_state,
};

const DELIVERY: Duration = Duration::from_secs(20);

/// Receives from `watch` until the event at `last` has arrived, and checks
/// that what arrived is exactly `expected` (the stored events after the
/// resume point, up to `last`).
async fn assert_delivers_exactly(watch: &mut Watch, expected: &[Event], how: &str) {
    let last = expected.last().expect("something to expect").position;
    let got = watch
        .collect_until(DELIVERY, |events| {
            events.last().is_some_and(|e| e.position >= last)
        })
        .await
        .unwrap_or_else(|e| panic!("{how}: {e:#}"));
    let got_positions: Vec<i64> = got.iter().map(|e| e.position).collect();
    let expected_positions: Vec<i64> = expected.iter().map(|e| e.position).collect();
    assert_eq!(got_positions, expected_positions, "{how}: positions");
    assert_eq!(got, expected, "{how}: the events are the stored ones");
}

/// The stored log after `after`, up to and including position `until`.
async fn log_between(api: &Api, after: i64, until: i64) -> Vec<Event> {
    let log = api.all_events().await.expect("the event log");
    let positions: Vec<i64> = log.iter().map(|e| e.position).collect();
    assert!(
        positions.windows(2).all(|w| w[0] < w[1]),
        "positions are unique: {positions:?}"
    );
    log.into_iter()
        .filter(|e| e.position > after && e.position <= until)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resuming_delivers_exactly_the_later_events() {
    let controller = ControllerOptions::new().auto_provision(false).start().await;
    let api = controller.api();
    let first = Agent::start(&controller, &test_serial(1));
    let a = first.robot_id();
    wait_for_state(api, a, State::Discovered, secs(30)).await;
    api.act(a, "provision", None).await.expect("provision");
    wait_for_state(api, a, State::Ready, secs(20)).await;
    api.act(a, "activate", None).await.expect("activate");

    // From the start: the whole log so far.
    let log = api.all_events().await.expect("the event log");
    assert!(
        log.len() >= 4,
        "discovered, provisioning, provisioned, activated: {log:#?}"
    );
    let mut watch = Watch::connect(api, Resume::After(0))
        .await
        .expect("watch from the start");
    assert_delivers_exactly(&mut watch, &log, "?after=0").await;
    drop(watch);

    // A client that saw up to the middle of the log goes away...
    let seen = log[log.len() / 2].position;

    // ...while more happens: maintenance of one robot, a second robot.
    api.act(
        a,
        "maintenance/start",
        Some(serde_json::json!({"reason": "test"})),
    )
    .await
    .expect("maintenance/start");
    wait_for_state(api, a, State::Maintenance, secs(20)).await;
    api.act(a, "maintenance/end", None)
        .await
        .expect("maintenance/end");
    wait_for_state(api, a, State::Ready, secs(20)).await;
    let second = Agent::start(&controller, &test_serial(2));
    let b = second.robot_id();
    wait_for_state(api, b, State::Discovered, secs(30)).await;
    api.act(b, "provision", None).await.expect("provision b");
    wait_for_state(api, b, State::Ready, secs(20)).await;

    // One more event after the clients reconnected proves nothing extra
    // hides behind the expected ones.
    let mut by_header = Watch::connect(api, Resume::LastEventId(seen))
        .await
        .expect("resume with Last-Event-ID");
    let mut by_query = Watch::connect(api, Resume::After(seen))
        .await
        .expect("resume with ?after=");
    let activated = api.act(a, "activate", None).await.expect("activate again");
    assert_eq!(activated.state, State::Active);
    let last = wait_activation(api, a).await;

    let expected = log_between(api, seen, last).await;
    assert!(
        expected.iter().any(|e| e.robot_id == b) && expected.len() >= 6,
        "the events appended while away are expected: {expected:#?}"
    );
    assert_delivers_exactly(&mut by_header, &expected, "Last-Event-ID").await;
    assert_delivers_exactly(&mut by_query, &expected, "?after=").await;

    // Resuming at the very end delivers only what comes next.
    let mut at_end = Watch::connect(api, Resume::LastEventId(last))
        .await
        .expect("resume at the end");
    api.act(a, "deactivate", None).await.expect("deactivate");
    let next = at_end
        .next_event(DELIVERY)
        .await
        .expect("the next event after the end");
    assert!(next.position > last, "{next:#?}");
    let stored = log_between(api, last, next.position).await;
    assert_eq!(
        stored.first(),
        Some(&next),
        "the first event after the resume point is delivered first"
    );
}

/// The position of the latest `robot_activated` event of `id`.
async fn wait_activation(api: &Api, id: uuid::Uuid) -> i64 {
    kiwi_tests::wait_until(secs(10), move || async move {
        let events = api.events(id).await?;
        let activations: Vec<i64> = events
            .iter()
            .filter(|e| e.kind == "robot_activated")
            .map(|e| e.position)
            .collect();
        anyhow::ensure!(
            activations.len() >= 2,
            "activations so far: {activations:?}"
        );
        Ok(*activations.last().unwrap())
    })
    .await
}
