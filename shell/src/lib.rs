//! call-assist: the binary's library part. Drivers of the sans-IO core: the simulated world
//! (`sim`, mock mode) and media sources/sinks (`media`).

pub mod bench;
pub mod demo;
pub mod live;
pub mod media;
pub mod serve;
pub mod sim;
pub mod sweep;
