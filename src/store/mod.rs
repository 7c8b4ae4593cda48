//! Embedded persistent state under `data_dir`.

pub mod accounts;
pub mod queue;

pub use accounts::{Account, AccountStore, StoreError};
