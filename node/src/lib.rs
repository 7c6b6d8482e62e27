//! The weft agent: the sans-IO [`Agent`] and, around it, the tokio shell, the control API and
//! the command line.

pub mod agent;
pub mod alloc;
pub mod api;
pub mod cli;
pub mod client;
pub mod config;
pub mod demo;
pub mod dpthread;
pub mod error;
pub mod format;
pub mod persist;
pub mod read;
pub mod shell;
pub mod store;
pub mod view;

pub use agent::{Agent, Command, CommandId, CommandResult, Dump, NetworkDef, NetworkInfo, Output, Reply};
pub use error::AgentError;
