//! ② Collection: drains the kernel maps and ring buffers of each family every interval and
//! aggregates what they report, one file per family.

pub mod db;
pub mod tcp;
