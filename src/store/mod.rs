//! Embedded persistent state under `data_dir`.

pub mod accounts;

pub use accounts::{Account, AccountStore, StoreError};
