//! What the command line runs: each function reads its inputs, calls the layers
//! below, and renders the result. `main.rs` only parses arguments.

pub mod bench;
pub mod bootstrap;
pub mod client;
pub mod crd;
pub mod dev;
pub mod gateway;
pub mod items;
pub mod node;
pub mod operator;
pub mod plan;
pub mod replica;
