//! A controller restart, clean (SIGTERM) or not (SIGKILL), loses nothing:
//! robots, events and the read model survive, agents reconnect by
//! themselves, and the reports they made while it was down arrive after it
//! returns, each exactly once.

use std::collections::BTreeMap;

use anyhow::ensure;
use kiwi_tests::{
    Agent, AgentOptions, Controller, ControllerOptions, Event, Robot, made_between, now_ms, secs,
    test_serial, wait_for_robot, wait_ready_and_connected, wait_until,
};
use uuid::Uuid;

#[derive(Debug, Clone, Copy)]
enum Outage {
    /// SIGTERM: a clean shutdown.
    Stop,
    /// SIGKILL: no chance to flush or say goodbye.
    Kill,
}

/// The read-model fields that a restart must not change.
fn stable_fields(robot: &Robot) -> serde_json::Value {
    serde_json::json!({
        "robot_id": robot.robot_id,
        "hostname": robot.hostname,
        "robot_type": robot.robot_type,
        "model": robot.field("model"),
        "agent_version": robot.field("agent_version"),
        "firmware_version": robot.field("firmware_version"),
        "discovered_at": robot.field("discovered_at"),
        "provisioned_at": robot.field("provisioned_at"),
    })
}

async fn restart_loses_nothing(outage: Outage) {
    let mut controller = ControllerOptions::new()
        .heartbeat_interval("200ms")
        .report_interval("200ms")
        .start()
        .await;
    let agents: Vec<Agent> = (1..=2)
        .map(|n| {
            AgentOptions::new(&test_serial(n))
                .report_interval("200ms")
                .start(&controller)
        })
        .collect();
    let ids: Vec<Uuid> = agents.iter().map(Agent::robot_id).collect();
    for &id in &ids {
        wait_ready_and_connected(controller.api(), id, secs(30)).await;
        wait_for_robot(controller.api(), id, secs(20), "reporting", |r| {
            r.last_report_seq >= 3
        })
        .await;
    }

    let robots_before: BTreeMap<Uuid, Robot> = controller
        .api()
        .robots()
        .await
        .expect("robots before")
        .into_iter()
        .map(|r| (r.robot_id, r))
        .collect();
    let mut events_before: BTreeMap<Uuid, Vec<Event>> = BTreeMap::new();
    for &id in &ids {
        events_before.insert(id, controller.api().events(id).await.expect("events"));
    }
    let last_position_before = events_before
        .values()
        .flatten()
        .map(|e| e.position)
        .max()
        .expect("there are events");

    let down_at = now_ms();
    match outage {
        Outage::Stop => controller.stop().await,
        Outage::Kill => controller.kill(),
    }
    // The outage lasts until every agent has made three reports during it
    // (kept in its outbox: nobody takes them).
    wait_until(secs(30), || async {
        let now = now_ms();
        for agent in &agents {
            let made = made_between(&agent.outbox()?, down_at, now);
            ensure!(
                made >= 3,
                "robot {}: {made} reports made since the controller went down at {down_at}",
                agent.robot_id()
            );
        }
        Ok(())
    })
    .await;
    let up_at = now_ms();
    controller.start_again().await;

    check_nothing_lost(
        &controller,
        &robots_before,
        &events_before,
        last_position_before,
    )
    .await;

    let mut made_during_outage = Vec::new();
    for &id in &ids {
        wait_ready_and_connected(controller.api(), id, secs(30)).await;
        let during = check_reports_exactly_once(&controller, id, down_at, up_at).await;
        made_during_outage.push((id, during));
    }
    // The outage lasted until each agent had made three reports: all of
    // them were delivered after it.
    assert!(
        made_during_outage.iter().all(|(_, seqs)| seqs.len() >= 3),
        "reports made during the outage {down_at}..{up_at} (Unix ms) and delivered, \
         by robot: {made_during_outage:?}; each agent had made at least 3"
    );
    assert!(controller.is_running());
}

/// Every robot, every event and the stable read model survived; the log
/// goes on after the last position instead of starting over.
async fn check_nothing_lost(
    controller: &Controller,
    robots_before: &BTreeMap<Uuid, Robot>,
    events_before: &BTreeMap<Uuid, Vec<Event>>,
    last_position_before: i64,
) {
    let api = controller.api();
    let robots_after: BTreeMap<Uuid, Robot> = api
        .robots()
        .await
        .expect("robots after the restart")
        .into_iter()
        .map(|r| (r.robot_id, r))
        .collect();
    assert_eq!(
        robots_after.keys().collect::<Vec<_>>(),
        robots_before.keys().collect::<Vec<_>>(),
        "the same robots"
    );
    for (id, before) in robots_before {
        let after = &robots_after[id];
        assert_eq!(stable_fields(after), stable_fields(before), "robot {id}");
        assert!(
            after.version >= before.version,
            "robot {id}: version went back from {} to {}",
            before.version,
            after.version
        );
    }
    for (id, before) in events_before {
        let after = api.events(*id).await.expect("events after the restart");
        assert!(
            after.len() >= before.len() && after[..before.len()] == before[..],
            "robot {id}: the events before the restart are kept as they were\n\
             before: {before:#?}\nafter: {after:#?}"
        );
        for new in &after[before.len()..] {
            assert!(
                new.position > last_position_before,
                "robot {id}: new event {} at position {} reuses an old position (last was {})",
                new.kind,
                new.position,
                last_position_before
            );
        }
    }
}

/// The robot's reports are 1..=N without gaps or duplicates and agree with
/// `last_report_seq`; returns the seqs of those made while the controller
/// was down.
async fn check_reports_exactly_once(
    controller: &Controller,
    id: Uuid,
    down_at: i64,
    up_at: i64,
) -> Vec<u64> {
    let api = controller.api();
    // Reports leave the outbox in order, so once one made after the restart
    // is stored, everything made during the outage must be too.
    wait_until(secs(30), move || async move {
        let reports = api.reports(id).await?;
        let newest = reports.iter().filter_map(|r| r.time_ms()).max();
        ensure!(
            newest.is_some_and(|t| t > up_at),
            "robot {id}: {} reports, newest made at {newest:?}, none yet after the restart at {up_at}",
            reports.len()
        );
        Ok(())
    })
    .await;
    // Reports keep arriving: read the list between two reads of the robot.
    let floor = api.robot_required(id).await.expect("robot").last_report_seq;
    let reports = api.reports(id).await.expect("reports");
    let ceiling = api.robot_required(id).await.expect("robot").last_report_seq;

    let seqs: Vec<u64> = reports.iter().map(|r| r.seq).collect();
    let n = u64::try_from(seqs.len()).unwrap();
    assert_eq!(
        seqs,
        (1..=n).collect::<Vec<_>>(),
        "robot {id}: report seqs are 1..={n} without gaps or duplicates"
    );
    assert!(
        floor <= n && n <= ceiling,
        "robot {id}: last_report_seq ({floor} before listing, {ceiling} after) \
         disagrees with the {n} listed reports"
    );
    for r in &reports {
        assert_eq!(r.robot_id, id);
        assert!(r.time_ms().is_some(), "report {} has a time: {r:?}", r.seq);
    }
    reports
        .iter()
        .filter(|r| r.time_ms().is_some_and(|t| t > down_at && t < up_at))
        .map(|r| r.seq)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_after_sigterm_loses_nothing() {
    restart_loses_nothing(Outage::Stop).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_after_sigkill_loses_nothing() {
    restart_loses_nothing(Outage::Kill).await;
}
