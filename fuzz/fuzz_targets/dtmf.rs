#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| call_assist_core::fuzzing::dtmf(data));
