pub mod homeserver;
pub mod nat;
pub mod net;
pub mod turn;
pub mod world;
