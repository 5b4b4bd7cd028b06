//! One seed drives everything: a scenario run twice with one seed leaves the same trace, and a
//! different seed leaves a different one.

use call_assist::sim::world::World;
use call_assist_tests::scenarios;
use call_assist_tests::*;

/// Runs `scenario` with seeds 3, 3 and 4 and checks the traces.
fn replays_exactly(name: &str, scenario: impl Fn(u64) -> World) {
    let first = scenario(3);
    let again = scenario(3);
    let other = scenario(4);
    assert!(
        first.trace.len() > 50,
        "{name}: trace too short to mean anything"
    );
    assert_eq!(
        first.trace_hash(),
        again.trace_hash(),
        "{name}: same seed, different hash"
    );
    let diverged = first
        .trace
        .iter()
        .zip(&again.trace)
        .position(|(a, b)| a != b);
    assert_eq!(
        diverged.map(|i| (&first.trace[i], &again.trace[i])),
        None,
        "{name}: same seed, traces diverge"
    );
    assert_eq!(
        first.trace.len(),
        again.trace.len(),
        "{name}: same seed, trace lengths differ"
    );
    assert_ne!(
        first.trace_hash(),
        other.trace_hash(),
        "{name}: seeds 3 and 4 gave one hash"
    );
}

#[test]
fn basic_call_replays_exactly_from_its_seed() {
    replays_exactly("basic", |seed| {
        scenarios::basic_call(config(seed)).scene.world
    });
}

#[test]
fn lossy_call_replays_exactly_from_its_seed() {
    replays_exactly("loss", |seed| scenarios::lossy_call(seed).scene.world);
}

#[test]
fn glare_replays_exactly_from_its_seed() {
    replays_exactly("glare", |seed| scenarios::glare(config(seed)).scene.world);
}

#[test]
fn homeserver_outage_replays_exactly_from_its_seed() {
    replays_exactly("hs-outage", |seed| {
        scenarios::homeserver_outage(config(seed)).scene.world
    });
}
