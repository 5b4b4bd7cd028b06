pub mod crypto;
pub mod homeserver;
pub mod nat;
pub mod net;
pub mod scenario;
pub mod turn;
pub mod world;
