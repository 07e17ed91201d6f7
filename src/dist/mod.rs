//! Running past one GPU (issue 31): which rank a process is ([`world`]), the rendezvous that
//! starts a multi-rank run ([`rendezvous`]) and the collectives between ranks
//! ([`collective`]: the trait the trainer calls, and ranks as threads of one process for emu and
//! CI). The data-parallel trainer and the NCCL backend build on these.

pub mod collective;
pub mod rendezvous;
pub mod world;
