#![no_main]
// Arbitrary datagrams (STUN, DTLS, SRTP, TURN) into a connected call in the simulator.
libfuzzer_sys::fuzz_target!(|data: &[u8]| call_assist::sim::scenario::datagrams(data));
