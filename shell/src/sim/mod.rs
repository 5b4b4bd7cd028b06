pub mod homeserver;
pub mod net;
pub mod world;
