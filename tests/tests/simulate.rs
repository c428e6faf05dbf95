//! Load: `kiwi-agent simulate --count 500` against one controller; every
//! virtual robot becomes `ready` and is listed, once, in id order.

use std::time::Duration;

use kiwi_tests::{ControllerOptions, Simulator, SimulatorOptions, State, secs, wait_until_every};
use uuid::Uuid;

const COUNT: usize = 500;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_simulated_agents_become_ready() {
    let controller = ControllerOptions::new().start().await;
    let api = controller.api();
    let mut simulator = Simulator::start(&controller, COUNT);
    let mut expected: Vec<Uuid> = simulator.robot_ids();
    expected.sort();
    expected.dedup();
    assert_eq!(expected.len(), COUNT, "simulated ids are distinct");

    let expected_ref = &expected;
    // Listing 500 robots is not free on 2 shared cores: poll gently.
    let robots = wait_until_every(secs(60), Duration::from_millis(500), move || async move {
        let page = api.robots_page("limit=1000").await?;
        let ready = page
            .robots
            .iter()
            .filter(|r| r.state == State::Ready)
            .count();
        anyhow::ensure!(
            page.robots.len() == COUNT && ready == COUNT,
            "{} robots listed, {ready} ready",
            page.robots.len()
        );
        anyhow::ensure!(page.next_cursor.is_none(), "one page holds all 500");
        Ok(page.robots)
    })
    .await;
    assert!(simulator.is_running(), "the simulator is still running");

    let listed: Vec<Uuid> = robots.iter().map(|r| r.robot_id).collect();
    assert_eq!(
        listed, *expected_ref,
        "exactly the simulated robots, ordered by robot_id"
    );
    assert!(robots.iter().all(|r| r.connected), "all connected");

    // Cursor pagination walks the same list.
    let mut paged = Vec::new();
    let mut query = "limit=150".to_string();
    loop {
        let page = api.robots_page(&query).await.expect("a page");
        assert!(page.robots.len() <= 150, "a page respects its limit");
        paged.extend(page.robots.iter().map(|r| r.robot_id));
        match page.next_cursor {
            Some(cursor) => query = format!("limit=150&cursor={cursor}"),
            None => break,
        }
        assert!(paged.len() <= COUNT, "pagination does not loop");
    }
    assert_eq!(paged, listed, "pages concatenate to the full list");

    simulator.stop(secs(30)).await;
}

/// `--source-network`: every agent connects from an address of the
/// network, in turn, and the controller records that address as its
/// robot's (the per-address limits then see a fleet, not one host).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_connect_from_the_addresses_of_their_source_network() {
    let controller = ControllerOptions::new().start().await;
    let api = controller.api();
    // A /29 has six host addresses, 127.3.0.1 to 127.3.0.6: eight agents
    // use the first two twice.
    let simulator = SimulatorOptions::new(8)
        .prefix("src")
        .source_network("127.3.0.0/29")
        .start(&controller);
    let robots = wait_until_every(secs(30), Duration::from_millis(200), move || async move {
        let page = api.robots_page("limit=100").await?;
        anyhow::ensure!(
            page.robots.len() == 8 && page.robots.iter().all(|r| r.connected),
            "{} robots listed",
            page.robots.len()
        );
        Ok(page.robots)
    })
    .await;
    let ids = simulator.robot_ids();
    for (i, id) in ids.iter().enumerate() {
        let robot = robots
            .iter()
            .find(|r| r.robot_id == *id)
            .expect("every simulated robot is listed");
        let expected = format!("127.3.0.{}", i % 6 + 1);
        assert_eq!(
            robot.field("ip_address").as_str(),
            Some(expected.as_str()),
            "agent {i} connects from address number {} of the network",
            i % 6 + 1
        );
    }
}
