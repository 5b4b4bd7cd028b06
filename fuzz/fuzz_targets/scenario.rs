#![no_main]
// Two agents through the simulator, driven by the input; invariants checked after every step.
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    call_assist::sim::scenario::run_bytes(data);
});
