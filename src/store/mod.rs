//! Embedded persistent state under `data_dir`.

pub mod accounts;
