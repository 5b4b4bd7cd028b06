//! Passwords, access tokens and TURN credentials never reach the logs, at any level.

use std::time::Duration;

use call_assist::sim::world::{World, WorldConfig};
use call_assist_core::{AgentEvent, CallPolicy, CallState};
use call_assist_tests::capture_logs;

#[test]
fn secrets_never_appear_in_logs_at_trace_level() {
    let ((tokens, trace_len), logs) = capture_logs(tracing::Level::TRACE, || {
        let mut world = World::new(WorldConfig::default());
        world.hs.set_turn_server(
            vec!["turn:turn.sim.local:3478?transport=udp".into()],
            "1767225600:@alice:sim.local".into(),
            "TURN-PASSWORD-d41d8cd9".into(),
            86400,
        );
        let caller = world.add_agent("caller", "alice", CallPolicy::Anyone);
        let callee = world.add_agent("callee", "bob", CallPolicy::Anyone);
        world.agent(callee).auto_answer = true;
        let room = world.create_room(&[caller, callee]);
        assert!(world.run_until_synced());
        let call_id = world.place_call(caller, &room);
        assert!(world.run_until(Duration::from_secs(10), |w| {
            w.agents[caller].reached(&call_id, CallState::Connected)
        }));
        world.run_for(Duration::from_secs(1));
        let tokens: Vec<String> = world
            .agents
            .iter()
            .flat_map(|a| a.events.iter())
            .filter_map(|(_, e)| match e {
                AgentEvent::LoggedIn { access_token, .. } => Some(access_token.expose().to_owned()),
                _ => None,
            })
            .collect();
        assert!(
            world.agents[caller].agent.turn_servers().is_some(),
            "TURN credentials fetched"
        );
        (tokens, world.trace.len())
    });
    assert!(trace_len > 0);
    assert!(
        logs.len() > 10_000,
        "trace-level logs were captured ({} bytes)",
        logs.len()
    );
    assert_eq!(tokens.len(), 2);
    for secret in
        tokens
            .iter()
            .map(String::as_str)
            .chain(["pw-alice", "pw-bob", "TURN-PASSWORD-d41d8cd9"])
    {
        assert!(!secret.is_empty());
        assert!(
            !logs.contains(secret),
            "secret {secret:?} found in the logs"
        );
    }
}
