#![no_main]
// A peer's SDP on a real str0m Rtc: answered, renegotiated, taken as an answer.
libfuzzer_sys::fuzz_target!(|data: &[u8]| call_assist_core::fuzzing::negotiate(data));
